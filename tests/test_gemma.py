"""Gemma 2 and Gemma 3 (text) against transformers' PyTorch models: logit parity, the soft-caps and
sliding windows really acting, round trip, greedy generation past the window, sharded loading, the
reward-model export, a preset-free `jaxrl sft`, and the options refused.

The tiny models are built so that everything Gemma adds shows in the logits: a sliding window of 4
(shorter than the 9-token prompt and every generation), Gemma 2's soft-caps small enough to bite,
`query_pre_attn_scalar` unlike head_dim, Gemma 3's own layer pattern and a scaled global RoPE.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import hf_fixtures as fx
from jaxrl import cli
from jaxrl import generation as gen
from jaxrl.errors import JaxrlError
from jaxrl.models.hf import config_from_hf, load_pretrained, save_pretrained
from jaxrl.parallel.sharding import model_shardings

WINDOW = 4
_BASE = dict(vocab_size=fx.VOCAB, pad_token_id=0, bos_token_id=2, eos_token_id=3, hidden_size=64,
             intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=128, rms_norm_eps=1e-6, sliding_window=WINDOW, query_pre_attn_scalar=24,
             initializer_range=0.2)  # weights large enough that attention scores reach the soft-cap
# variant -> (model_type, config): Gemma 2 with its default alternating layers (sliding first), tied as
# Gemma ships it, and untied; Gemma 3 with a layer pattern of its own, linear-scaled global RoPE and a
# local base, untied; and tied with the Hub's every-6th-layer-global pattern. (A tied tiny random model
# greedily repeats its last token, its own embedding dominating the residual stream, so generation is
# compared on the untied ones.)
_GEMMA2 = dict(_BASE, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
VARIANTS = {
    "gemma2": ("gemma2", _GEMMA2),
    "gemma2-untied": ("gemma2", dict(_GEMMA2, tie_word_embeddings=False)),
    "gemma3": ("gemma3_text", dict(
        _BASE, tie_word_embeddings=False,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    "gemma3-tied": ("gemma3_text", dict(_BASE, num_hidden_layers=6)),
}


def _make(directory, model_type, kw, *, score=False, seed=0):
    """A random tiny HF model (eager attention: the soft-capped path) saved with the test tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **kw)
    cls = AutoModelForSequenceClassification if score else AutoModelForCausalLM
    if score:
        cfg.num_labels = 1
    model = cls.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # non-zero (zero-centred) norm weights, so a missing "1 +" shows
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(directory)
    fx.make_tokenizer().save_pretrained(directory)
    return model


def _hf(directory, **over):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", **over).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """variant -> (directory, torch model, jaxrl model), fp32."""
    out = {}
    for name, (model_type, kw) in VARIANTS.items():
        d = str(tmp_path_factory.mktemp(name))
        out[name] = (d, _make(d, model_type, kw), load_pretrained(d))
    return out


_logits = fx.jaxrl_logits
_rel_diff = fx.rel_diff


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logit_parity_with_transformers(models, name):
    _, torch_model, model = models[name]
    ids, mask = fx.padded_batch()  # rows of 9, 5, 2 tokens: the 9-token row exceeds the window
    ref = fx.torch_logits(torch_model, ids, mask)
    out = _logits(model, ids, mask)
    diff = _rel_diff(out, ref, mask)
    print(f"{name}: max |diff| / max |ref| = {diff:.2e}")
    assert diff < 1e-4


def test_the_config_reads_every_gemma_switch(models):
    g2, g3 = models["gemma2"][2].config, models["gemma3"][2].config
    assert g2.sliding_layers == (True, False, True, False)  # Gemma 2 alternates, sliding first
    assert g3.sliding_layers == (True, True, False, True)
    assert models["gemma3-tied"][2].config.sliding_layers == (True,) * 5 + (False,)  # every 6th global
    assert (g2.attn_softcap, g2.final_softcap, g3.attn_softcap, g3.final_softcap) == (2.0, 3.0, 0.0, 0.0)
    assert g2.query_pre_attn_scalar == 24 and g2.norm_offset == 1.0 and g2.scale_embeddings and g2.post_norms
    assert not g2.qk_norm and g3.qk_norm and g2.tie_embeddings and not g3.tie_embeddings
    assert (g3.rope_theta, dict(g3.rope_scaling)["factor"], g3.rope_local_theta, g3.rope_local_scaling) == \
        (1e6, 4.0, 1e4, None)


@pytest.mark.parametrize("name, over", [
    ("gemma2", dict(attn_logit_softcapping=None)),
    ("gemma2", dict(final_logit_softcapping=None)),
    ("gemma2", dict(layer_types=["full_attention"] * 4)),
    ("gemma3", dict(layer_types=["full_attention"] * 4)),
])
def test_the_fixtures_soft_caps_and_windows_change_the_logits(models, name, over):
    """Without it, transformers' own logits move by > 5%: the parity tests above see each feature."""
    directory, torch_model, _ = models[name]
    ids, mask = fx.padded_batch()
    ref = fx.torch_logits(torch_model, ids, mask)
    change = _rel_diff(fx.torch_logits(_hf(directory, **over), ids, mask), ref, mask)
    print(f"{name} with {over}: logits move by {change:.2f} of max |logit|")
    assert change > 0.05


@pytest.mark.parametrize("name", list(VARIANTS))
def test_round_trip_loads_in_transformers(models, name, tmp_path):
    from transformers import AutoModelForCausalLM

    _, torch_model, model = models[name]
    out_dir = str(tmp_path / "export")
    save_pretrained(model, out_dir)
    reloaded, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True,
                                                          attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(reloaded).__name__ == type(torch_model).__name__
    for key in ("layer_types", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping",
                "query_pre_attn_scalar", "rope_parameters", "tie_word_embeddings", "head_dim"):
        assert getattr(reloaded.config, key) == getattr(torch_model.config, key), key
    assert load_pretrained(out_dir).config == model.config
    ids, mask = fx.padded_batch()
    assert _rel_diff(_logits(model, ids, mask), fx.torch_logits(reloaded.eval(), ids, mask), mask) < 1e-5


def _hf_greedy(torch_model, ids, mask, n, eos_ids):
    import torch

    with torch.no_grad():
        out = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                   max_new_tokens=n, min_new_tokens=0, pad_token_id=0, eos_token_id=list(eos_ids))
    return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("name", ["gemma2-untied", "gemma3"])
def test_batched_greedy_generation_matches_transformers_past_the_window(models, name):
    """12 new tokens after prompts of 9, 5 and 2: every row's decode steps attend through a window of 4
    (sliding layers) and, for Gemma 2, through the soft-caps, as transformers' cached decode does."""
    _, torch_model, model = models[name]
    ids, mask = fx.padded_batch()
    n = 12
    ref = _hf_greedy(torch_model, ids, mask, n, (fx.VOCAB + 1,))  # an id never emitted: no early stop
    prompts = [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)]
    out = gen.generate(model, prompts, max_new_tokens=n, eos_ids=(fx.VOCAB + 1,))
    assert out == ref.tolist()
    assert all(len(set(row)) > 1 for row in out)  # not a constant stream


def test_loading_under_a_mesh_places_each_tensor_on_its_shards(models):
    directory, torch_model, _ = models["gemma3"]
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        model = load_pretrained(directory, shardings=model_shardings(shard_params=True))
    q = model.layers.attn.q.kernel[...]  # (L, D, N*H)
    assert q.sharding.spec == P(None, ("data", "fsdp"), "tensor")
    assert q.addressable_shards[0].data.shape == (4, 64 // 4, 64 // 2)
    assert model.layers.attn.q_norm.scale[...].shape == (4, 16)  # (L, H) per-head norm, stacked
    ids, mask = fx.padded_batch()
    with jax.set_mesh(mesh):
        out = np.asarray(jax.jit(lambda i, m: model(i, m))(jnp.asarray(ids), jnp.asarray(mask)))
    assert _rel_diff(out, fx.torch_logits(torch_model, ids, mask), mask) < 1e-4


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_reward_model_export_scores_equal_transformers(models, name, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    directory, _, _ = models[name]
    model = load_pretrained(directory, kind="score")  # a reward model started from the causal LM
    kernel = model.score.kernel
    kernel[...] = jax.random.normal(jax.random.key(0), kernel.shape, kernel.dtype)
    out_dir = tmp_path / "rm"
    save_pretrained(model, str(out_dir))
    arch = json.loads((out_dir / "config.json").read_text())["architectures"]
    hf, info = AutoModelForSequenceClassification.from_pretrained(out_dir, output_loading_info=True,
                                                                  attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert arch == [type(hf).__name__] and arch[0].endswith("ForSequenceClassification")
    ids, mask = fx.padded_batch()
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        ref = hf.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(pos)).logits[:, 0].numpy()
    ours = np.asarray(model.sequence_score(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.ptp(ours) > 1e-3
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("name, layout", [
    ("gemma2", ["zero_stage=3", "mesh.data=1", "mesh.fsdp=-1", "precision.compute=bf16"]),  # one layer gathered
    ("gemma3", []),  # the default: data parallel over the 8 devices, fp32
])
def test_preset_free_sft_runs_and_exports(models, name, layout, tmp_path):
    """16-token rows through a window of 4: the training forward and backward use the sliding layers."""
    directory, torch_model, _ = models[name]
    out = tmp_path / "run"
    args = ["sft", "--output", str(out), f"model.path={directory}", "data.max_len=16", "data.max_prompt_len=8",
            "train.steps=3", "train.batch_size=8", "train.log_every=1", "train.eval_every=0", "optim.lr=1e-3",
            *layout]
    assert cli.main(args) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    trained = _hf(str(out / "hf"))
    assert type(trained).__name__ == type(torch_model).__name__
    assert trained.config.layer_types == torch_model.config.layer_types
    ids, mask = fx.padded_batch()
    before, after = fx.torch_logits(torch_model, ids, mask), fx.torch_logits(trained, ids, mask)
    assert np.isfinite(after).all() and _rel_diff(after, before, mask) > 1e-4  # the weights moved


def _cfg(model_type="gemma2", **over):
    from transformers import AutoConfig

    return {**AutoConfig.for_model(model_type, **_BASE).to_dict(), **over}


@pytest.mark.parametrize("over, message", [
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention=true"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}),
     r"rope_parameters: rope_type 'yarn' is not supported"),
    (dict(layer_types=["sliding_attention", "chunked_attention"] * 2),
     r"layer_types must list one of .* for each of the 4 layers"),
    (dict(hidden_activation="gelu_fast"), "activation 'gelu_fast' is not supported"),
])
def test_unsupported_gemma2_options_name_the_key(over, message):
    with pytest.raises(JaxrlError, match=message):
        config_from_hf(_cfg(**over))


def test_unsupported_gemma3_options_name_the_key():
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}
    with pytest.raises(JaxrlError, match=r"rope_parameters.sliding_attention: rope_type 'dynamic'"):
        config_from_hf(_cfg("gemma3_text", rope_parameters=rope))
    with pytest.raises(JaxrlError, match="multimodal Gemma3ForConditionalGeneration.*gemma3_text"):
        config_from_hf({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]})


def test_hub_style_gemma3_config_reads_as_transformers_normalises_it():
    """The Hub's Gemma 3 files predate rope_parameters/layer_types: rope_theta, rope_local_base_freq,
    rope_scaling and sliding_window_pattern mean the same model."""
    from transformers import AutoConfig

    old = {k: v for k, v in _BASE.items()}
    old.update(model_type="gemma3_text", num_hidden_layers=7, rope_theta=1e6, rope_local_base_freq=1e4,
               rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window_pattern=3)
    ours = config_from_hf(old)
    assert ours.sliding_layers == (True, True, False, True, True, False, True)
    kw = {k: v for k, v in old.items() if k != "model_type"}
    assert ours == config_from_hf(AutoConfig.for_model("gemma3_text", **kw).to_dict())
    assert (ours.rope_theta, dict(ours.rope_scaling)["factor"], ours.rope_local_theta) == (1e6, 8.0, 1e4)
