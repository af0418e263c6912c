"""Qwen3, Llama 3.2 and Phi-3 against transformers' PyTorch models: logit parity, export and reload, greedy
generation, sharded loading, reward-model export, a preset-free `jaxrl sft`, and refused options."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import hf_fixtures as fx
from test_generation import assert_greedy_matches_transformers
from jaxrl import cli
from jaxrl.errors import JaxrlError
from jaxrl.models.hf import load_pretrained, save_pretrained
from jaxrl.models.transformer import Transformer
from jaxrl.parallel.sharding import model_shardings

_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}
# LongRoPE with an original context of 4 positions: the padded batch's longest row (9 tokens) is past it,
# so its forward uses the long factors; partial_rotary_factor 0.75 rotates 12 of each head's 16 features.
_LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(6)],
             "long_factor": [1.0 + 0.5 * i for i in range(6)]}

# variant -> (HF model_type, config overrides). head_dim 32 differs from hidden_size / heads (16).
VARIANTS = {
    "qwen3": ("qwen3", dict(head_dim=32)),
    "qwen3-tied-bias": ("qwen3", dict(head_dim=32, tie_word_embeddings=True, attention_bias=True)),
    # a 3-token window on the second layer only (transformers' max_window_layers): rows of 9 tokens see it
    "qwen3-window": ("qwen3", dict(head_dim=32, use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    "llama3.2": ("llama", dict(head_dim=32, tie_word_embeddings=True, rope_theta=500000.0,
                               rope_scaling=_LLAMA3_ROPE)),
    "phi3": ("phi3", dict(sliding_window=4)),  # a window shorter than the batch's rows
    "phi3-longrope": ("phi3", dict(max_position_embeddings=64, original_max_position_embeddings=4,
                                   rope_scaling=_LONGROPE, partial_rotary_factor=0.75)),
}


def make_model(variant: str, directory: str, *, seed: int = 0):
    """Saves a random tiny HF model of `variant` (and the fixtures' tokenizer); returns the torch model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    family, over = VARIANTS[variant]
    cfg = AutoConfig.for_model(family, vocab_size=fx.VOCAB, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                               **{**_COMMON, **over})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so a mapping slip shows in the logits
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    fx.make_tokenizer().save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """variant -> (directory, torch model, jaxrl model), fp32."""
    out = {}
    for name in VARIANTS:
        d = str(tmp_path_factory.mktemp(name))
        out[name] = (d, make_model(name, d), load_pretrained(d))
    return out


_logits = fx.jaxrl_logits
_rel_diff = fx.rel_diff


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logit_parity_with_transformers(hf_models, name):
    _, torch_model, model = hf_models[name]
    ids, mask = fx.padded_batch()
    ref = fx.torch_logits(torch_model, ids, mask)
    out = _logits(model, ids, mask)
    assert out.shape == ref.shape
    diff = _rel_diff(out, ref, mask)
    print(f"{name}: max |diff| / max |ref| = {diff:.2e}")
    assert diff < 1e-4


def test_the_decoder_reads_each_family_switch(hf_models):
    cfg = {name: m.config for name, (_, _, m) in hf_models.items()}
    assert cfg["qwen3"].qk_norm and cfg["qwen3"].head_dim == 32 and not cfg["qwen3"].tie_embeddings
    assert not cfg["qwen3"].qkv_bias and cfg["qwen3-tied-bias"].qkv_bias and cfg["qwen3-tied-bias"].out_bias
    assert hf_models["qwen3-tied-bias"][2].lm_head is None  # tied: the embedding is the head
    assert cfg["llama3.2"].tie_embeddings and dict(cfg["llama3.2"].rope_scaling)["rope_type"] == "llama3"
    assert not cfg["llama3.2"].qk_norm
    assert cfg["phi3"].sliding_window == 4 and cfg["phi3"].rotary_dim == 0
    assert cfg["phi3-longrope"].rotary_dim == 12 and dict(cfg["phi3-longrope"].rope_scaling)["rope_type"] == "longrope"


def test_longrope_uses_the_short_factors_within_the_original_context(hf_models):
    """A batch whose positions stay within original_max_position_embeddings (4) takes the short factors,
    as transformers does; the long factors would give other logits."""
    _, torch_model, model = hf_models["phi3-longrope"]
    ids, mask = fx.padded_batch()
    ids, mask = ids[:, -4:], mask[:, -4:]  # positions 0..3
    ref = fx.torch_logits(torch_model, ids, mask)
    out = _logits(model, ids, mask)
    diff = _rel_diff(out, ref, mask)
    print(f"phi3-longrope (short factors): max |diff| / max |ref| = {diff:.2e}")
    assert diff < 1e-4
    scaling = dict(model.config.rope_scaling)
    scaling["short_factor"] = scaling["long_factor"]
    long_cfg = model.config.replace(rope_scaling=tuple(sorted(scaling.items())))
    swapped = Transformer(long_cfg, rngs=nnx.Rngs(0))  # the same weights, the long factors at every length
    nnx.update(swapped, nnx.state(model, nnx.Param))
    wrong = _rel_diff(_logits(swapped, ids, mask), ref, mask)
    print(f"phi3-longrope with the long factors at these positions: {wrong:.2e}")
    assert wrong > 100 * diff


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_reloads_in_transformers(hf_models, name, tmp_path):
    from transformers import AutoModelForCausalLM

    directory, _, model = hf_models[name]
    out_dir = str(tmp_path / "export")
    save_pretrained(model, out_dir)
    reloaded, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(reloaded).__name__ == json.load(open(os.path.join(directory, "config.json")))["architectures"][0]
    ids, mask = fx.padded_batch()
    ref = fx.torch_logits(reloaded.eval(), ids, mask)
    assert _rel_diff(_logits(model, ids, mask), ref, mask) < 1e-5
    if name.startswith("phi3"):  # fused in the checkpoint again, as Phi-3 stores them
        from safetensors.numpy import load_file

        tensors = load_file(os.path.join(out_dir, "model.safetensors"))
        assert tensors["model.layers.0.self_attn.qkv_proj.weight"].shape == ((4 + 2 * 2) * 16, 64)
        assert tensors["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 96, 64)
        assert not any("q_proj" in k or "gate_proj" in k for k in tensors)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_generation_matches_transformers(hf_models, name):
    _, torch_model, model = hf_models[name]
    assert_greedy_matches_transformers(torch_model, model)


@pytest.mark.parametrize("name", ["qwen3", "phi3"])
def test_loading_under_a_2x2x2_mesh_reads_slices(hf_models, name):
    directory, torch_model, _ = hf_models[name]
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        model = load_pretrained(directory, shardings=model_shardings(shard_params=True))
    attn, mlp = model.layers.attn, model.layers.mlp
    n_h = 4 * model.config.head_dim
    q, k = attn.q.kernel[...], attn.k.kernel[...]
    assert q.sharding.spec == P(None, ("data", "fsdp"), "tensor") and k.sharding.spec == q.sharding.spec
    assert q.addressable_shards[0].data.shape == (2, 64 // 4, n_h // 2)  # a slice, not a replica
    assert mlp.gate.kernel[...].addressable_shards[0].data.shape == (2, 64 // 4, 96 // 2)
    if name == "qwen3":
        assert attn.q_norm.scale[...].shape == (2, 32) and attn.k_norm.scale[...].shape == (2, 32)
    ids, mask = fx.padded_batch()
    ref = fx.torch_logits(torch_model, ids, mask)
    with jax.set_mesh(mesh):
        out = np.asarray(jax.jit(lambda i, m: model(i, m))(jnp.asarray(ids), jnp.asarray(mask)))
    assert _rel_diff(out, ref, mask) < 1e-4


@pytest.mark.parametrize("name", ["qwen3", "phi3"])
def test_reward_model_exports_as_sequence_classifier(hf_models, name, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    directory, _, _ = hf_models[name]
    model = load_pretrained(directory, kind="score")  # a reward model started from the causal LM
    kernel = model.score.kernel
    kernel[...] = jax.random.normal(jax.random.key(0), kernel.shape, kernel.dtype)  # a non-trivial head
    out = str(tmp_path / "rm")
    save_pretrained(model, out)
    hf, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(hf).__name__ == f"{'Qwen3' if name == 'qwen3' else 'Phi3'}ForSequenceClassification"
    ids, mask = fx.padded_batch()  # left-padded: the last token of every row is real
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        ref = hf.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(pos)).logits[:, 0].numpy()
    ours = np.asarray(model.sequence_score(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.ptp(ours) > 1e-3
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("name", ["qwen3", "llama3.2", "phi3-longrope"])
def test_preset_free_sft_runs_on_the_hf_model(hf_models, name, tmp_path):
    directory, _, _ = hf_models[name]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i % 7}+{i // 7}=", "response": str(i % 7 + i // 7)}) + "\n"
                            for i in range(32)))
    out = tmp_path / "run"
    assert cli.main(["sft", "--output", str(out), f"model.path={directory}", f"data.path={data}",
                     "data.split=1,0,0", "data.max_len=16", "data.max_prompt_len=8", "train.steps=3",
                     "train.batch_size=8", "train.eval_every=0", "train.log_every=1"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    exported = json.loads((out / "hf" / "config.json").read_text())
    assert exported["model_type"] == VARIANTS[name][0]
    trained = load_pretrained(str(out / "hf"))
    assert trained.config == hf_models[name][2].config


def _edited(directory, tmp_path, **changes):
    d = tmp_path / "edited"
    shutil.copytree(directory, d)
    cfg = json.loads((d / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.mark.parametrize("name, changes, message", [
    ("phi3", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}),
     r"rope_scaling.rope_type 'yarn' is not supported for model_type 'phi3' \(supported: default, longrope\)"),
    ("phi3-longrope", dict(rope_parameters={**_LONGROPE, "short_factor": [1.0] * 5, "rope_theta": 10000.0,
                                            "original_max_position_embeddings": 4}),
     r"rope_scaling.short_factor has 5 entries, expected 6"),
    ("phi3-longrope", dict(rope_parameters={"rope_type": "longrope", "long_factor": [1.0] * 6,
                                            "rope_theta": 10000.0, "original_max_position_embeddings": 4}),
     r"rope_scaling.short_factor is missing"),
    ("qwen3", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0}),
     r"rope_type 'longrope' is not supported for model_type 'qwen3'"),
    ("llama3.2", dict(rope_parameters={**_LLAMA3_ROPE, "rope_theta": 5e5, "partial_rotary_factor": 0.5}),
     r"partial_rotary_factor 0.5 is not supported for model_type 'llama'"),
])
def test_unsupported_options_name_the_key(hf_models, tmp_path, name, changes, message):
    directory = _edited(hf_models[name][0], tmp_path, **changes)
    with pytest.raises(JaxrlError, match=message):
        load_pretrained(directory)


def test_qwen3_sliding_window_on_every_layer_is_read(hf_models, tmp_path):
    directory = _edited(hf_models["qwen3"][0], tmp_path, use_sliding_window=True, sliding_window=8,
                        layer_types=["sliding_attention"] * 2)
    assert load_pretrained(directory).config.sliding_window == 8
    directory = _edited(hf_models["qwen3"][0], tmp_path / "off", use_sliding_window=False, sliding_window=8)
    assert load_pretrained(directory).config.sliding_window == 0
    assert hf_models["qwen3-window"][2].config.sliding_layers == (False, True)


def test_phi3_lora_on_split_projections_exports_fused(hf_models, tmp_path):
    """LoRA on q, k, v, gate and up (split from Phi-3's fused weights): the export merges each branch and
    fuses the parts again, and transformers' reload gives the LoRA model's logits."""
    from transformers import AutoModelForCausalLM

    from jaxrl.models.lora import add_lora

    directory, _, _ = hf_models["phi3"]
    model = add_lora(load_pretrained(directory), rank=4, alpha=8.0, targets=("q", "k", "v", "gate", "up"))
    for _, var in nnx.iter_graph(model):  # B starts at zero: make every branch change its projection
        if isinstance(var, nnx.LoRAParam):
            var[...] = 0.1 * jax.random.normal(jax.random.key(var.size), var.shape, var.dtype)
    ids, mask = fx.padded_batch()
    ours = _logits(model, ids, mask)
    assert _rel_diff(ours, _logits(load_pretrained(directory), ids, mask), mask) > 1e-2
    save_pretrained(model, str(tmp_path / "merged"))
    reloaded, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert _rel_diff(ours, fx.torch_logits(reloaded.eval(), ids, mask), mask) < 1e-5


def test_phi3_config_in_the_hub_spelling_is_read(hf_models, tmp_path):
    """Phi-3.5 / Phi-4-mini's config.json spelling: `rope_scaling` with the old `type` key, and
    `partial_rotary_factor` and `original_max_position_embeddings` at the top level."""
    from transformers import AutoModelForCausalLM

    directory = _edited(hf_models["phi3-longrope"][0], tmp_path, rope_parameters=None, rope_theta=10000.0,
                        rope_scaling={"type": "longrope", "short_factor": _LONGROPE["short_factor"],
                                      "long_factor": _LONGROPE["long_factor"]},
                        partial_rotary_factor=0.75, original_max_position_embeddings=4)
    model = load_pretrained(directory)
    assert model.config == hf_models["phi3-longrope"][2].config
    ids, mask = fx.padded_batch()
    ref = fx.torch_logits(AutoModelForCausalLM.from_pretrained(directory).eval(), ids, mask)
    assert _rel_diff(_logits(model, ids, mask), ref, mask) < 1e-4
