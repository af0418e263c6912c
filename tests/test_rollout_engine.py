"""The slot engine against the static sampler: same greedy completions (mixed prompt lengths, EOS at
various lengths, more prompts than slots), reproducible sampling, shared group prefill, compile counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from compiles import compiles
import hf_fixtures as fx
from jaxrl import generation as gen
from jaxrl import rollout_engine as engine
from jaxrl.errors import JaxrlError
from jaxrl.models.hf import load_pretrained
from jaxrl.parallel.sharding import model_shardings

N = 12
SMALL = engine.EngineConfig(slots=4, chunk_steps=3, length_block=16)  # many refills and length buckets


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("llama"))
    fx.make_hf_model("llama", d)
    return d, load_pretrained(d)


def _prompts(seed=0, count=11):
    """Prompt lengths 1..40: prompt buckets 16, 32 and 64 in one run."""
    rng = np.random.default_rng(seed)
    lengths = [1, 40, 7, 16, 17, 3, 33, 2, 25, 9, 12][:count]
    return [rng.integers(4, fx.VOCAB, size=n).tolist() for n in lengths]


def _static(model, prompts, cfg, rng=None):
    """The static sampler's outputs for all prompts in one left-padded batch, as numpy."""
    ids, mask = gen.pad_prompts(prompts, gen.prompt_bucket(max(map(len, prompts)), 128), len(prompts), cfg.pad_id)
    out = gen.generate_batch(model, ids, mask, cfg, jax.random.key(0) if rng is None else rng)
    return {k: np.asarray(v) for k, v in out.items()}


def _slots(model, prompts, cfg, seed=0, eng=SMALL, stats=None):
    out = engine.generate_slots(model, prompts, cfg, jax.random.key(seed), engine=eng, stats=stats)
    return {k: np.asarray(v) for k, v in out.items()}


def test_per_row_cache_index_matches_one_row_at_a_time(llama):
    _, model = llama
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(4, fx.VOCAB, size=(3, 2)), jnp.int32)
    offsets = jnp.array([0, 5, 9], jnp.int32)
    cache = model.init_cache(3, 16)
    cache = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), cache)  # stale contents
    kv_mask = (jnp.arange(16)[None] < offsets[:, None] + 2).astype(jnp.int32)
    positions = offsets[:, None] + jnp.arange(2)
    hidden, new = model.forward(ids, positions=positions, cache=cache, cache_index=offsets, kv_mask=kv_mask)
    for r in range(3):
        one = jax.tree.map(lambda x: x[:, r:r + 1], cache)
        h, c = model.forward(ids[r:r + 1], positions=positions[r:r + 1], cache=one, cache_index=int(offsets[r]),
                             kv_mask=kv_mask[r:r + 1])
        np.testing.assert_allclose(hidden[r:r + 1], h, atol=1e-5)
        np.testing.assert_allclose(new["k"][:, r:r + 1], c["k"], atol=1e-6)


def test_greedy_matches_static_sampler_token_for_token(llama):
    _, model = llama
    prompts = _prompts()
    free = _static(model, prompts, gen.sampler_config(model, max_new_tokens=N, eos_ids=()))
    # EOS ids the model really emits, at different steps, so rows end at many lengths
    eos = (int(free["tokens"][0, 1]), int(free["tokens"][3, 6]), int(free["tokens"][6, 9]))
    cfg = gen.sampler_config(model, max_new_tokens=N, eos_ids=eos)
    ref = _static(model, prompts, cfg)
    stats = {}
    out = _slots(model, prompts, cfg, stats=stats)
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])
    np.testing.assert_array_equal(out["mask"], ref["mask"])
    np.testing.assert_allclose(out["logprobs"], ref["logprobs"], atol=2e-5)
    lengths = ref["mask"].sum(1)
    assert len(set(lengths.tolist())) >= 4 and lengths.max() == N and lengths.min() <= 2, lengths
    assert stats["prefills"] > 2 and stats["prefill_rows"] == len(prompts)  # 11 prompts through 4 slots
    # fewer decode steps than the static batch's N per 4 rows would need
    assert stats["decode_steps"] < N * -(-len(prompts) // 4)


SAMPLED = dict(max_new_tokens=N, temperature=0.9, top_k=20)


def _short(seed=0, count=7):
    """Prompts of one bucket (16)."""
    return [p[:10] for p in _prompts(seed, count)]


def test_sampling_is_reproducible_per_prompt_not_per_slot(llama):
    _, model = llama
    prompts = _short(seed=2)
    cfg = gen.sampler_config(model, **SAMPLED)
    a = _slots(model, prompts, cfg, seed=3)
    b = _slots(model, prompts, cfg, seed=3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # another schedule (refill as soon as one slot is free) puts prompts in other slots at other times
    other = _slots(model, prompts, cfg, seed=3, eng=dataclasses.replace(SMALL, refill_at=1))
    np.testing.assert_array_equal(other["tokens"], a["tokens"])
    np.testing.assert_allclose(other["logprobs"], a["logprobs"], atol=2e-5)
    assert (_slots(model, prompts, cfg, seed=4)["tokens"] != a["tokens"]).any()
    # log-probs are log pi(token) under the raw logits of the full forward, 0 off the mask
    i = 1
    seq = np.concatenate([prompts[i], a["tokens"][i]])[None]
    logits = np.asarray(model(jnp.asarray(seq)))[0, len(prompts[i]) - 1:-1]  # (N, V)
    want = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), a["tokens"][i][:, None], 1)[:, 0]
    np.testing.assert_allclose(a["logprobs"][i], want * a["mask"][i], atol=1e-4)
    assert len(np.unique(a["tokens"])) > 5


def test_a_group_shares_one_prefill(llama):
    _, model = llama
    base = _short(count=3)
    group = [p for p in base for _ in range(4)]  # G = 4 consecutive samples per prompt, one group per refill
    greedy = gen.sampler_config(model, max_new_tokens=N, eos_ids=())
    stats = {}
    out = _slots(model, group, greedy, stats=stats)
    ref = _static(model, base, greedy)
    np.testing.assert_array_equal(out["tokens"], np.repeat(ref["tokens"], 4, axis=0))
    assert stats["prefill_rows"] == 12 and stats["prefill_prompts"] == 3
    sampled = _slots(model, group, gen.sampler_config(model, **SAMPLED))
    assert len({tuple(r) for r in sampled["tokens"][:4]}) > 1  # the samples of one prompt differ


def test_one_compile_per_bucket(llama):
    _, model = llama
    cfg = gen.sampler_config(model, max_new_tokens=N, eos_ids=(3,))
    prompts = [[5, 6, 7], [9] * 10, [11, 12], [13] * 5, [14]]  # one prompt bucket (16), 5 prompts > 4 slots
    with compiles() as first:
        _slots(model, prompts, cfg)
    assert first["decode_chunk"] <= 2 and first["init_state"] == 1  # S = 16 + 12 = 28: length buckets 16, 28
    with compiles() as second:
        _slots(model, [[20, 21], [22] * 9, [23] * 3, [24], [25] * 6], cfg)
    assert second["decode_chunk"] == second["prefill_slots"] == second["init_state"] == 0


def test_tensor_parallel_model_with_sharded_slots_gives_the_same_tokens(llama):
    directory, model = llama
    mesh = jax.make_mesh((4, 1, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        tp_model = load_pretrained(directory, shardings=model_shardings(shard_params=False))
    prompts = _short(count=6)
    cfg = gen.sampler_config(model, max_new_tokens=N, eos_ids=(3,))
    rows = NamedSharding(mesh, P("data"))
    out = engine.generate_slots(tp_model, prompts, cfg, jax.random.key(0), engine=SMALL, batch_sharding=rows)
    np.testing.assert_array_equal(np.asarray(out["tokens"]), _slots(model, prompts, cfg)["tokens"])
    with pytest.raises(JaxrlError, match="slots=6 must be a multiple of the 4 row shards"):
        engine.generate_slots(tp_model, prompts, cfg, jax.random.key(0), engine=engine.EngineConfig(slots=6),
                              batch_sharding=rows)


def test_generate_api_and_bad_inputs(llama):
    _, model = llama
    prompts = _short(count=5)
    assert engine.generate(model, prompts, max_new_tokens=N, slots=4) == gen.generate(model, prompts, max_new_tokens=N)
    with pytest.raises(JaxrlError, match="prompt 1 is empty"):
        engine.generate(model, [[4], []])
    with pytest.raises(JaxrlError, match="chunk_steps must be >= 1"):
        engine.EngineConfig(chunk_steps=0)
    with pytest.raises(JaxrlError, match="refill_at"):
        engine.EngineConfig(slots=4, refill_at=5)
