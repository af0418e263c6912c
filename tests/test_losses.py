"""SFT, reward and PPO losses against numbers computed by hand (numpy) on small hand-made tensors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl.algorithms import ppo
from jaxrl.algorithms.reward import reward_loss
from jaxrl.algorithms.sft import sft_loss, token_logprobs
from jaxrl.models.config import preset
from jaxrl.models.transformer import ScoreModel, Transformer


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def split_rows(batch, n):
    return {k: v[:n] for k, v in batch.items()}, {k: v[n:] for k, v in batch.items()}


# jitted once per shape: op-by-op dispatch of the model would compile every op for every new shape
jit_sft_loss = nnx.jit(sft_loss)
jit_reward_loss = nnx.jit(reward_loss)
jit_logits = nnx.jit(lambda model, ids, mask: model(ids, mask))
jit_scores = nnx.jit(lambda model, ids, mask: model.sequence_score(ids, mask))


def jitted(fn, **static):
    """`fn` with its keyword settings bound, compiled as one program (op-by-op dispatch is slower)."""
    return jax.jit(functools.partial(fn, **static))


def combined(results):
    """What the data-parallel step computes: sum(loss * weight) / sum(weight)."""
    num = sum(float(loss) * float(m["weight"]) for loss, m in results)
    return num / sum(float(m["weight"]) for _, m in results)


@pytest.fixture(scope="module")
def lm():
    return Transformer(preset("tiny"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def sft_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(4, 7)).astype(np.int32)
    attention = np.array([[1] * 7, [1] * 5 + [0] * 2, [1] * 6 + [0], [1] * 4 + [0] * 3], np.int32)
    # prompts of 3, 2, 4, 1 tokens are not targets; padding is not either
    loss_mask = attention.copy()
    for row, prompt in enumerate([3, 2, 4, 1]):
        loss_mask[row, :prompt] = 0
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


# ----------------------------------------------------------------------------------------- SFT


def test_token_logprobs_gathers_next_token():
    logits = np.array([[[1.0, 2.0, 0.0], [0.5, 0.5, 3.0], [0.0, 0.0, 0.0]]], np.float32)  # (1, 3, 3)
    tokens = np.array([[2, 1, 2]])
    want = [np_log_softmax(logits[0, 0])[1], np_log_softmax(logits[0, 1])[2]]
    got = token_logprobs(jnp.asarray(logits), jnp.asarray(tokens))
    assert got.shape == (1, 2)
    np.testing.assert_allclose(got[0], want, rtol=1e-6)


def test_sft_loss_is_masked_cross_entropy(lm, sft_batch):
    loss, metrics = jit_sft_loss(lm, sft_batch)
    logits = np.asarray(jit_logits(lm, sft_batch["input_ids"], sft_batch["attention_mask"]))
    ids, w = sft_batch["input_ids"], sft_batch["loss_mask"][:, 1:]
    logp = np_log_softmax(logits[:, :-1].astype(np.float64))
    nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    correct = logits[:, :-1].argmax(-1) == ids[:, 1:]
    assert w.sum() == 4 + 3 + 2 + 3
    np.testing.assert_allclose(float(loss), (nll * w).sum() / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), (correct * w).sum() / w.sum(), rtol=1e-6)
    assert float(metrics["weight"]) == w.sum() and metrics["weight"].dtype == jnp.float32
    assert float(metrics["loss"]) == float(loss)


def test_sft_loss_weighted_halves_equal_full_batch(lm, sft_batch):
    full, _ = jit_sft_loss(lm, sft_batch)
    halves = [jit_sft_loss(lm, part) for part in split_rows(sft_batch, 2)]
    assert halves[0][1]["weight"] != halves[1][1]["weight"]  # unequal token counts: plain mean would differ
    np.testing.assert_allclose(combined(halves), float(full), atol=1e-6)


def test_sft_loss_empty_slice_gives_zero_weight_not_nan(lm, sft_batch):
    batch = dict(sft_batch, loss_mask=np.zeros_like(sft_batch["loss_mask"]))
    loss, metrics = jit_sft_loss(lm, batch)
    assert float(loss) == 0.0 and float(metrics["weight"]) == 0.0


# ------------------------------------------------------------------------------------- reward



# ------------------------------------------------------------------------- LM head in chunks (big vocabularies)


def _value_and_grads(loss_fn, chunk, batch, cfg=None, sharding=None, vocab_chunk=0):
    """loss, metrics and d loss / d params of `loss_fn` on a tiny model whose LM head runs `chunk` positions
    (and `vocab_chunk` vocabulary entries) at a time (0: all at once), jitted; with `sharding`, the batch
    is placed on it (rows over 8 devices)."""
    model = Transformer(cfg or preset("tiny"), rngs=nnx.Rngs(0), logits_chunk=chunk, vocab_chunk=vocab_chunk)
    graphdef, params = nnx.split(model)
    if sharding is not None:
        batch = jax.device_put(batch, sharding)
    fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(nnx.merge(graphdef, p), b), has_aux=True))
    (loss, metrics), grads = fn(params, batch)
    return jax.device_get((loss, metrics, grads))


def _actor_batch(rng, rows=4, prompt=3, response=6):
    seq = rng.integers(0, 64, size=(rows, prompt + response)).astype(np.int32)
    resp = np.array([[1] * response, [1] * 4 + [0] * 2, [1] * 5 + [0], [1] * 2 + [0] * 4], np.int32)[:rows]
    ptx = rng.integers(0, 64, size=(rows, 7)).astype(np.int32)
    return ppo.Rollout(seq=seq, attention_mask=np.concatenate([np.ones((rows, prompt), np.int32), resp], 1),
                       response_mask=resp, old_logprobs=rng.normal(-4, 0.5, (rows, response)).astype(np.float32),
                       advantages=rng.normal(size=(rows, response)).astype(np.float32),
                       ptx=ppo.Ptx(input_ids=ptx, attention_mask=np.ones_like(ptx), loss_mask=np.ones_like(ptx),
                                   ratio=np.full((rows,), 0.7, np.float32)))


ACTOR_LOSS = functools.partial(ppo.actor_loss, prompt_len=3, clip_ratio=0.2, entropy_coef=0.3, ptx_coef=0.5)


@pytest.mark.parametrize("loss_name, chunk, vocab_chunk, tied", [
    ("sft", 4, 0, False), ("sft", 1, 0, False), ("actor", 4, 0, False), ("actor", 5, 0, False),
    ("sft", 0, 24, False), ("actor", 4, 10, True),
])
def test_chunked_lm_head_equals_one_pass(sft_batch, loss_name, chunk, vocab_chunk, tied):
    """SFT cross-entropy and accuracy, PPO log-probs, entropy and ptx loss: the same losses, metrics and
    gradients whether the LM head runs over all positions at once or a chunk at a time (a last chunk
    that is padded included), and over the whole vocabulary of 64 or slices of it (24 and 10: a last
    slice that overlaps the one before; tied embeddings: the slices come from the embedding table)."""
    if loss_name == "sft":
        loss_fn, batch = sft_loss, sft_batch
    else:
        loss_fn, batch = ACTOR_LOSS, _actor_batch(np.random.default_rng(1))
    cfg = preset("tiny", tie_embeddings=tied)
    want_loss, want_m, want_g = _value_and_grads(loss_fn, 0, batch, cfg)
    got_loss, got_m, got_g = _value_and_grads(loss_fn, chunk, batch, cfg, vocab_chunk=vocab_chunk)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
    assert set(got_m) == set(want_m)
    for k in want_m:
        np.testing.assert_allclose(float(got_m[k]), float(want_m[k]), rtol=1e-6, atol=1e-7, err_msg=k)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_g), jax.tree.leaves(got_g)):
        scale = float(np.abs(want).max())
        assert scale > 0, jax.tree_util.keystr(path)
        assert float(np.abs(got - want).max()) <= 1e-6 * scale, jax.tree_util.keystr(path)


def test_chunked_lm_head_under_a_sharded_batch_equals_one_device(sft_batch):
    """Rows over 8 devices (GSPMD, as the PPO scoring forwards run): the chunk map keeps the numbers."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = {k: np.tile(v, (2, 1)) for k, v in sft_batch.items()}  # 8 rows
    want_loss, _, want_g = _value_and_grads(sft_loss, 0, batch)
    with jax.set_mesh(mesh):
        got_loss, _, got_g = _value_and_grads(sft_loss, 2, batch, sharding=NamedSharding(mesh, P("data")))
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
    for want, got in zip(jax.tree.leaves(want_g), jax.tree.leaves(got_g)):
        assert float(np.abs(got - want).max()) <= 1e-6 * float(np.abs(want).max())


def test_chunked_lm_head_cuts_the_compiled_temporaries_by_the_chunk_factor():
    """V = 32768, T = 64, 8 rows on a tiny model: the (B, T, V) fp32 logits (64 MiB) dominate XLA's
    temporaries; in chunks of 8 positions only one chunk's logits exist, in the SFT gradient step and in
    the reference forward (PPO log-probs)."""
    cfg = preset("tiny", vocab_size=32768, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                 intermediate_size=64)
    rows, length, chunk = 8, 64, 8
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": ids, "loss_mask": ids}

    def temporaries(logits_chunk):
        graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0),
                                                                         logits_chunk=logits_chunk)))
        step = jax.jit(jax.grad(lambda p, b: sft_loss(nnx.merge(graphdef, p), b)[0]))
        forward = jax.jit(lambda p, b: ppo.response_logprobs(nnx.merge(graphdef, p), b["input_ids"],
                                                             b["attention_mask"], 1)[0])
        return [f.lower(params, batch).compile().memory_analysis().temp_size_in_bytes for f in (step, forward)]

    (step_full, fwd_full), (step_chunked, fwd_chunked) = temporaries(0), temporaries(chunk)
    factor = length // chunk
    print(f"temporaries, one pass -> chunks of {chunk}: SFT gradient step {step_full / 2**20:.2f} -> "
          f"{step_chunked / 2**20:.2f} MiB, forward {fwd_full / 2**20:.2f} -> {fwd_chunked / 2**20:.2f} MiB")
    logits = rows * (length - 1) * cfg.vocab_size * 4  # (B, T - 1, V) fp32: every position with a target
    assert fwd_full >= logits and step_full >= logits  # the one-pass programs hold the whole batch's logits
    assert fwd_full / fwd_chunked > 0.75 * factor
    # The gradient step keeps the head's (V, E) gradient accumulator besides its two chunk-sized buffers.
    assert step_full / step_chunked > 0.5 * factor


@pytest.fixture(scope="module")
def rm():
    return ScoreModel(preset("tiny"), rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def pair_batch():
    rng = np.random.default_rng(1)
    lengths_c, lengths_r = [6, 4, 3, 5], [3, 6, 6, 2]
    batch = {}
    for side, lengths in (("chosen", lengths_c), ("rejected", lengths_r)):
        batch[f"{side}_input_ids"] = rng.integers(0, 64, size=(4, 6)).astype(np.int32)
        batch[f"{side}_attention_mask"] = (np.arange(6)[None] < np.array(lengths)[:, None]).astype(np.int32)
    return batch


def test_reward_loss_is_bradley_terry_on_last_token_scores(rm, pair_batch):
    loss, metrics = jit_reward_loss(rm, pair_batch)
    rc = np.asarray(jit_scores(rm, pair_batch["chosen_input_ids"], pair_batch["chosen_attention_mask"]))
    rr = np.asarray(jit_scores(rm, pair_batch["rejected_input_ids"], pair_batch["rejected_attention_mask"]))
    d = (rc - rr).astype(np.float64)
    np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp(-d))), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(d > 0))
    np.testing.assert_allclose(float(metrics["chosen_score"]), rc.mean(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["rejected_score"]), rr.mean(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["margin"]), d.mean(), rtol=1e-5, atol=1e-7)
    assert float(metrics["weight"]) == 4.0


def test_reward_loss_unequal_lengths_and_split(rm, pair_batch):
    full, _ = jit_reward_loss(rm, pair_batch)
    # rejected padded to 8 columns instead of 6: the two-forward path; right padding changes no score
    longer = dict(pair_batch)
    for key in ("rejected_input_ids", "rejected_attention_mask"):
        longer[key] = np.pad(pair_batch[key], ((0, 0), (0, 2)))
    loss, _ = jit_reward_loss(rm, longer)
    np.testing.assert_allclose(float(loss), float(full), rtol=1e-5)
    halves = [jit_reward_loss(rm, part) for part in split_rows(pair_batch, 2)]
    np.testing.assert_allclose(combined(halves), float(full), atol=1e-6)


def test_reward_loss_is_stable_for_large_margins():
    class Fixed:
        def sequence_score(self, ids, mask):
            return jnp.where(ids[:, 0] == 1, 200.0, -200.0).astype(jnp.float32)

    ones, zeros = np.ones((2, 3), np.int32), np.zeros((2, 3), np.int32)
    batch = {"chosen_input_ids": ones, "chosen_attention_mask": ones,
             "rejected_input_ids": zeros, "rejected_attention_mask": ones}
    loss, metrics = reward_loss(Fixed(), batch)
    assert float(loss) == 0.0 and float(metrics["accuracy"]) == 1.0
    swapped = dict(batch, chosen_input_ids=zeros, rejected_input_ids=ones)
    np.testing.assert_allclose(float(reward_loss(Fixed(), swapped)[0]), 400.0, rtol=1e-6)


# -------------------------------------------------------------------------------- PPO: masked stats


def test_masked_mean_var_whiten():
    x = jnp.array([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 0]])
    assert float(ppo.masked_mean(x, mask)) == 2.5
    np.testing.assert_allclose(ppo.masked_mean(x, mask, axis=1), [1.5, 3.5])
    np.testing.assert_allclose(float(ppo.masked_var(x, mask)), 1.25)  # mean of 2.25, .25, .25, 2.25
    np.testing.assert_allclose(float(ppo.masked_var(x, mask, unbiased=True)), 1.25 * 4 / 3, rtol=1e-6)
    w = ppo.whiten(x, mask)
    want = (np.array([1.0, 2.0, 3.0, 4.0]) - 2.5) / np.sqrt(1.25 + 1e-8)
    np.testing.assert_allclose(np.asarray(w)[:, :2].ravel(), want, rtol=1e-5)
    assert float(w[0, 2]) == 0.0 and float(w[1, 2]) == 0.0
    np.testing.assert_allclose(np.asarray(ppo.whiten(x, mask, shift_mean=False))[:, :2].ravel(),
                               want + 2.5, rtol=1e-5)
    assert float(ppo.masked_mean(x, jnp.zeros_like(mask))) == 0.0


# --------------------------------------------------------------------------- PPO: rewards, GAE


def test_kl_penalty_k1_k3():
    logp = jnp.array([[-1.0, -2.0, -0.5]])
    ref = jnp.array([[-1.5, -2.0, 0.0]])
    np.testing.assert_allclose(ppo.kl_penalty(logp, ref, "k1"), [[0.5, 0.0, -0.5]], atol=1e-7)
    r = np.exp(np.array([-0.5, 0.0, 0.5]))
    np.testing.assert_allclose(ppo.kl_penalty(logp, ref, "k3"), [(r - 1) - np.log(r)], rtol=1e-6)
    assert (np.asarray(ppo.kl_penalty(logp, ref, "k3")) >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        ppo.kl_penalty(logp, ref, "k2")


SCORE = jnp.array([3.0, -0.4, 7.0, 1.0])
KL = jnp.array([[0.1, 0.2, 0.3, 0.4]] * 4)
# row 0 ends with EOS at t=2; row 1 was cut at max length (every token valid, no EOS);
# row 2 ends at t=0; row 3 has an empty response
MASK = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
ENDED = jnp.array([True, False, True, True])


def test_shaped_rewards_kl_plus_clipped_score_at_last_token():
    got = jitted(ppo.shaped_rewards, kl_coef=0.5, clip_reward=5.0)(SCORE, KL, MASK, ended=ENDED)
    want = np.array([
        [-0.05, -0.1, -0.15 + 3.0, 0.0],
        [-0.05, -0.1, -0.15, -0.2 - 0.4],  # truncated: its score still applies at its last token
        [-0.05 + 5.0, 0.0, 0.0, 0.0],  # 7 clipped to 5
        [0.0, 0.0, 0.0, 0.0],
    ])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_shaped_rewards_truncated_penalty_replaces_score_of_cut_rows():
    got = jitted(ppo.shaped_rewards, kl_coef=0.5, clip_reward=5.0, truncated_penalty=-1.0)(
        SCORE, KL, MASK, ended=ENDED)
    np.testing.assert_allclose(got[1], [-0.05, -0.1, -0.15, -0.2 - 1.0], rtol=1e-6)
    np.testing.assert_allclose(got[0, 2], -0.15 + 3.0, rtol=1e-6)  # rows that ended keep their score
    with pytest.raises(ValueError, match="ended"):
        ppo.shaped_rewards(SCORE, KL, MASK, kl_coef=0.5, clip_reward=5.0, truncated_penalty=-1.0)


def gae_loop(rewards, values, mask, gamma, lam):
    """GAE by the definition, one row and one valid step at a time."""
    adv, ret = np.zeros_like(rewards), np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_value = next_adv = 0.0
        for t in reversed(steps):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t]
            adv[b, t], ret[b, t] = next_adv, next_adv + values[b, t]
    return adv, ret


def test_gae_by_hand_monte_carlo_case():
    # gamma = lam = 1: A_t = (sum of rewards from t) - V_t
    adv, ret = jitted(ppo.gae, gamma=1.0, lam=1.0)(
        jnp.array([[0.0, 0.0, 1.0]]), jnp.array([[0.5, 0.25, 0.75]]), jnp.array([[1, 1, 1]]))
    np.testing.assert_allclose(adv, [[0.5, 0.75, 0.25]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[1.0, 1.0, 1.0]], rtol=1e-6)


def test_gae_matches_loop_with_masks_and_truncation():
    rng = np.random.default_rng(2)
    mask = np.array([[0, 1, 1, 1, 0, 0],  # prompt column, response, padding after EOS
                     [1, 1, 1, 1, 1, 1],  # cut at max length: no bootstrap past the end
                     [1, 1, 0, 1, 1, 0],  # a hole is skipped over
                     [0, 0, 0, 0, 0, 0]])
    rewards = rng.normal(size=mask.shape).astype(np.float32)
    values = rng.normal(size=mask.shape).astype(np.float32)
    adv, ret = jitted(ppo.gae, gamma=0.9, lam=0.8)(rewards, values, mask)
    want_adv, want_ret = gae_loop(rewards.astype(np.float64), values.astype(np.float64), mask, 0.9, 0.8)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)
    assert (np.asarray(adv)[mask == 0] == 0).all() and (np.asarray(ret)[mask == 0] == 0).all()
    # the last valid step of a row: A = r - V (nothing after it)
    np.testing.assert_allclose(adv[0, 3], rewards[0, 3] - values[0, 3], rtol=1e-6)
    np.testing.assert_allclose(adv[1, 5], rewards[1, 5] - values[1, 5], rtol=1e-6)


# ---------------------------------------------------------------------------------- PPO: losses


def test_policy_loss_by_hand():
    adv = jnp.array([[1.0, -1.0, 2.0, 5.0]])
    ratio = np.array([1.5, 0.5, 1.1, 9.0])
    old = jnp.zeros((1, 4))
    logp = jnp.log(jnp.asarray(ratio))[None]
    mask = jnp.array([[1, 1, 1, 0]])
    policy_loss = jitted(ppo.policy_loss, clip_ratio=0.2)
    loss, m = policy_loss(logp, old, adv, mask)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped);
    # token 2: max(-2.2, -2.2) = -2.2 (inside the range); token 3 masked
    np.testing.assert_allclose(float(loss), (-1.2 + 0.8 - 2.2) / 3, rtol=1e-6)
    np.testing.assert_allclose(float(m["clipfrac"]), 2 / 3, rtol=1e-6)
    r = ratio[:3]
    np.testing.assert_allclose(float(m["approx_kl"]), np.mean((r - 1) - np.log(r)), rtol=1e-5)
    assert float(m["weight"]) == 3.0 and float(m["policy_loss"]) == float(loss)
    # gradient only through unclipped tokens: d/dlogp_2 = -A * ratio / n
    grad = jax.jit(jax.grad(lambda lp: policy_loss(lp, old, adv, mask)[0]))(logp)
    np.testing.assert_allclose(grad, [[0.0, 0.0, -2.0 * 1.1 / 3, 0.0]], rtol=1e-5, atol=1e-7)


def test_value_loss_by_hand():
    values = jnp.array([[1.0, 0.0, 2.0, 3.0]])
    old = jnp.array([[0.0, 0.0, 1.9, 0.0]])
    returns = jnp.array([[0.0, 1.0, 2.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    value_loss = jitted(ppo.value_loss, value_clip=0.2)
    loss, m = value_loss(values, old, returns, mask)
    # token 0: v_clip 0.2: max(1, .04) = 1; token 1: max(1, 1) = 1; token 2: v_clip 2.0: max(0, 0) = 0
    np.testing.assert_allclose(float(loss), 0.5 * 2.0 / 3, rtol=1e-6)
    assert float(m["vf_clipfrac"]) == 0.0 and float(m["weight"]) == 3.0
    # clipped term larger: V moved away from a return that lies on the far side of V_old
    loss, m = value_loss(jnp.array([[1.0]]), jnp.array([[0.0]]), jnp.array([[2.0]]), jnp.array([[1]]))
    np.testing.assert_allclose(float(loss), 0.5 * 1.8**2, rtol=1e-6)
    assert float(m["vf_clipfrac"]) == 1.0


def test_losses_weighted_halves_equal_full_batch():
    rng = np.random.default_rng(3)
    shape = (4, 5)
    logp, old, adv, v, old_v, ret = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(6))
    mask = jnp.asarray(np.array([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]))
    for fn, args in ((jitted(ppo.policy_loss, clip_ratio=0.2), (logp, old, adv)),
                     (jitted(ppo.value_loss, value_clip=0.2), (v, old_v, ret))):
        full, _ = fn(*args, mask)
        halves = [fn(*(a[s] for a in args), mask[s]) for s in (slice(0, 2), slice(2, 4))]
        np.testing.assert_allclose(combined(halves), float(full), atol=1e-6)


def test_entropy_from_logits():
    logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [np.log(3.0), 0.0, 0.0, 0.0], [100.0, 0, 0, 0]]])
    # uniform: log 4; p = (1/2, 1/6, 1/6, 1/6); third token masked
    h1 = -(0.5 * np.log(0.5) + 3 * (1 / 6) * np.log(1 / 6))
    got = jax.jit(ppo.entropy_from_logits)(logits, jnp.array([[1, 1, 0]]))
    np.testing.assert_allclose(float(got), (np.log(4.0) + h1) / 2, rtol=1e-6)


# ------------------------------------------------------------------------------- KL control, EMA


def test_kl_coef_update_proportional_rule():
    # error clipped to +0.2 and -0.2; inside the clip: kl 5.5 / target 5 - 1 = 0.1
    np.testing.assert_allclose(float(ppo.kl_coef_update(0.1, 60.0, 256, target=5.0, horizon=10000)),
                               0.1 * (1 + 0.2 * 256 / 10000), rtol=1e-6)
    np.testing.assert_allclose(float(ppo.kl_coef_update(0.1, 0.0, 256, target=5.0, horizon=10000)),
                               0.1 * (1 - 0.2 * 256 / 10000), rtol=1e-6)
    np.testing.assert_allclose(float(ppo.kl_coef_update(0.1, 5.5, 100, target=5.0, horizon=1000)),
                               0.1 * 1.01, rtol=1e-6)
    assert ppo.kl_coef_update(0.1, 60.0, 256, target=None, horizon=10000) == 0.1
    jitted = jax.jit(lambda c, k: ppo.kl_coef_update(c, k, 100, target=5.0, horizon=1000))
    np.testing.assert_allclose(float(jitted(0.1, 5.5)), 0.1 * 1.01, rtol=1e-6)


def test_ema_update_treewise():
    ema = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0)}}
    params = {"a": jnp.array([3.0, 2.0]), "b": {"c": jnp.array(0.0)}}
    out = ppo.ema_update(ema, params, 0.75)
    np.testing.assert_allclose(out["a"], [1.5, 2.0])
    np.testing.assert_allclose(float(out["b"]["c"]), 3.0)


def test_packed_rows_equal_separate_examples():
    """SFT with data.packing: a packed row's loss and logits equal those of its examples run alone."""
    import numpy as np
    from flax import nnx

    from jaxrl.algorithms.sft import sft_loss
    from jaxrl.data.tokenize import pack_rows, pad_rows
    from jaxrl.models.config import preset
    from jaxrl.models.transformer import Transformer

    model = Transformer(preset("tiny"), rngs=nnx.Rngs(3))
    examples = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    masks = [[1] * len(x) for x in examples]  # loss on every token (loss_on_prompt), boundaries included
    packed = pack_rows(examples, masks, 16, 0)
    assert packed["segment_ids"].shape == (1, 16) and packed["segment_ids"].max() == 3
    loss, m = sft_loss(model, packed)
    alone = {"input_ids": pad_rows(examples, 16, 0), "attention_mask": pad_rows(masks, 16, 0),
             "loss_mask": pad_rows(masks, 16, 0)}
    ref, ref_m = sft_loss(model, alone)
    assert float(m["weight"]) == float(ref_m["weight"]) == 9.0  # 4 + 2 + 3 targets, none across a boundary
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
    logits = model(packed["input_ids"], packed["attention_mask"], positions=packed["positions"],
                   segment_ids=packed["segment_ids"])
    np.testing.assert_allclose(np.asarray(logits[0, 5:8]), np.asarray(model(alone["input_ids"][1:2])[0, :3]),
                               rtol=1e-5, atol=1e-6)
