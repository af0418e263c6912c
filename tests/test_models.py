"""The transformer against transformers' PyTorch models: logit parity, round trip, sharded loading, errors."""

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
from jaxrl.errors import JaxrlError
from jaxrl.models.hf import load_pretrained, save_pretrained
from jaxrl.parallel.sharding import model_shardings

# family name -> (HF model_type, config overrides): OPT both with pre-LN (OPT-125m/1.3b shape) and with
# post-LN + word_embed_proj_dim != hidden_size (OPT-350m shape).
VARIANTS = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "opt-350m": ("opt", {}),
    "opt-1.3b": ("opt", dict(do_layer_norm_before=True, word_embed_proj_dim=64)),
    "gpt2": ("gpt2", {}),
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    out = {}
    for name, (family, over) in VARIANTS.items():
        d = str(tmp_path_factory.mktemp(name))
        out[name] = (d, fx.make_hf_model(family, d, **over))
    return out


def _rel_diff(out, ref, mask):
    m = mask.astype(bool)
    return float(np.abs(out - ref)[m].max() / np.abs(ref[m]).max())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logit_parity_with_transformers(hf_models, name):
    directory, torch_model = hf_models[name]
    ids, mask = fx.padded_batch()
    ref = fx.torch_logits(torch_model, ids, mask)
    model = load_pretrained(directory)
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert out.shape == ref.shape
    diff = _rel_diff(out, ref, mask)
    print(f"{name}: max |diff| / max |ref| = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("name", ["llama", "opt-350m", "gpt2"])
def test_round_trip_loads_in_transformers(hf_models, name, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, _ = hf_models[name]
    model = load_pretrained(directory)
    out_dir = str(tmp_path / "export")
    save_pretrained(model, out_dir)
    reloaded, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert AutoTokenizer.from_pretrained(out_dir).eos_token == "<eos>"
    ids, mask = fx.padded_batch()
    ref = fx.torch_logits(reloaded.eval(), ids, mask)
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert _rel_diff(out, ref, mask) < 1e-5
    assert not any(n.startswith("export.tmp") for n in os.listdir(tmp_path))


def test_loading_under_a_mesh_places_each_tensor_on_its_shards(hf_models):
    directory, torch_model = hf_models["llama"]
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    sh = model_shardings(shard_params=True)
    with jax.set_mesh(mesh):
        model = load_pretrained(directory, shardings=sh)
    q = model.layers.attn.q.kernel[...]  # (L, D, N*H): layers stacked, the layer axis unsharded
    assert q.sharding.spec == P(None, ("data", "fsdp"), "tensor")
    assert q.addressable_shards[0].data.shape == (2, 64 // 4, 64 // 2)  # a slice, not a replica
    down = model.layers.mlp.down.kernel[...]
    assert down.sharding.spec == P(None, "tensor", ("data", "fsdp"))
    ids, mask = fx.padded_batch()
    ref = fx.torch_logits(torch_model, ids, mask)
    with jax.set_mesh(mesh):
        out = np.asarray(jax.jit(lambda i, m: model(i, m))(jnp.asarray(ids), jnp.asarray(mask)))
    assert _rel_diff(out, ref, mask) < 1e-4


def test_bad_directories_give_clear_errors(hf_models, tmp_path):
    directory, _ = hf_models["llama"]
    with pytest.raises(JaxrlError, match="does not exist"):
        load_pretrained(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(JaxrlError, match="no config.json"):
        load_pretrained(str(empty))

    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    with pytest.raises(JaxrlError, match="unsupported architecture.*t5"):
        load_pretrained(str(t5))

    pickled = tmp_path / "pickled"
    shutil.copytree(directory, pickled)
    os.rename(pickled / "model.safetensors", pickled / "pytorch_model.bin")
    with pytest.raises(JaxrlError, match="pickle"):
        load_pretrained(str(pickled))

    wrong = tmp_path / "wrong"
    shutil.copytree(directory, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(JaxrlError, match=r"gate_proj.weight has shape \(96, 64\), expected \(80, 64\)"):
        load_pretrained(str(wrong))


def test_sharded_safetensors_index_loads(hf_models, tmp_path):
    directory, torch_model = hf_models["llama"]
    torch_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    shutil.copy(os.path.join(directory, "tokenizer.json"), tmp_path)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 1
    ids, mask = fx.padded_batch()
    out = np.asarray(load_pretrained(str(tmp_path))(jnp.asarray(ids), jnp.asarray(mask)))
    assert _rel_diff(out, fx.torch_logits(torch_model, ids, mask), mask) < 1e-4
    os.remove(tmp_path / sorted(n for n in os.listdir(tmp_path) if n.endswith(".safetensors"))[0])
    with pytest.raises(JaxrlError, match="which is missing"):
        load_pretrained(str(tmp_path))


def test_a_frozen_model_is_read_slice_by_slice_into_bf16(hf_models, monkeypatch):
    """param_dtype=bf16 (PPO's reference and reward models): each device's slice of the checkpoint is cast
    as it is read, the per-device bytes halve, and the bf16-compute forward equals that of the same model
    stored in fp32 within bf16 rounding."""
    from jaxrl.models import hf

    directory, _ = hf_models["llama"]
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    sh = model_shardings(shard_params=True)
    reads, real = [], jax.make_array_from_callback

    def recording(shape, sharding, callback):
        def read(index):
            piece = callback(index)
            reads.append((tuple(shape), piece.shape, piece.dtype))
            return piece
        return real(shape, sharding, read)

    with jax.set_mesh(mesh):
        master = load_pretrained(directory, dtype=jnp.bfloat16, shardings=sh)
        monkeypatch.setattr(hf.jax, "make_array_from_callback", recording)
        frozen = load_pretrained(directory, dtype=jnp.bfloat16, shardings=sh, param_dtype=jnp.bfloat16)
    assert reads and all(dtype == jnp.bfloat16 for _, _, dtype in reads)
    assert any(piece != full for full, piece, _ in reads)  # per-device slices, not whole tensors
    master_p, frozen_p = (jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (master, frozen))
    assert {x.dtype for x in master_p} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in frozen_p} == {jnp.dtype(jnp.bfloat16)}
    per_device = lambda leaves: sum(x.addressable_shards[0].data.nbytes for x in leaves)  # noqa: E731
    print(f"per-device parameter bytes: fp32 {per_device(master_p)}, bf16 {per_device(frozen_p)}")
    assert 2 * per_device(frozen_p) == per_device(master_p)
    for m, f in zip(master_p, frozen_p):  # the same weights, rounded once
        np.testing.assert_array_equal(np.asarray(f), np.asarray(m.astype(jnp.bfloat16)))
    ids, mask = fx.padded_batch()
    with jax.set_mesh(mesh):
        want, got = (np.asarray(jax.jit(lambda i, a, m=m: m(i, a))(jnp.asarray(ids), jnp.asarray(mask)))
                     for m in (master, frozen))
    diff = _rel_diff(got, want, mask)
    print(f"bf16-stored vs fp32-stored forward in bf16 compute: max |diff| / max |ref| = {diff:.2e}")
    assert diff < 2e-2
