"""GRPO-family math (jaxrl.algorithms.grpo) against hand arithmetic, torch's std (TRL/veRL's formula), the
published formulas, and the data-parallel step's weighting rule on 8 devices with accumulation."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

from jaxrl.algorithms import grpo
from jaxrl.parallel.mesh import make_mesh
from jaxrl.parallel.sharding import DATA_AXES

A = np.testing.assert_allclose


# ------------------------------------------------------------------------------------------ advantages
def test_grpo_advantage_is_group_normalised_with_unbiased_std():
    scores = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 1.0, 0.0, 0.0], np.float32)
    got = np.asarray(grpo.grpo_advantages(jnp.asarray(scores), 4))
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735; group 2: all equal -> 0
    s1 = math.sqrt(1.0 / 3.0)
    A(got[:4], [0.5 / (s1 + 1e-6), -0.5 / (s1 + 1e-6), -0.5 / (s1 + 1e-6), 0.5 / (s1 + 1e-6)], rtol=1e-6)
    A(got[4:8], 0.0, atol=0)
    # TRL's GRPOTrainer: (r - view(-1, G).mean(1)) / (view(-1, G).std(1) + eps), torch's unbiased std
    t = torch.tensor(scores, dtype=torch.float64).view(-1, 4)
    want = ((t - t.mean(1, keepdim=True)) / (t.std(1, keepdim=True) + 1e-6)).view(-1).numpy()
    A(got, want, rtol=1e-5, atol=1e-6)


def test_dr_grpo_advantage_has_no_std_division():
    got = grpo.grpo_advantages(jnp.array([1.0, 0.0, 0.0, 0.0, 4.0, 2.0]), 3, scale_by_std=False)
    A(got, [2 / 3, -1 / 3, -1 / 3, -2.0, 2.0, 0.0], rtol=1e-6)


def test_rloo_baseline_leaves_each_sample_out():
    got = grpo.rloo_advantages(jnp.array([1.0, 0.0, 0.0, 1.0, 3.0, 1.0]), 3)
    # 1 - (0 + 0)/2, 0 - (1 + 0)/2, 0 - (1 + 0)/2 ; 1 - (3 + 1)/2, 3 - (1 + 1)/2, 1 - (1 + 3)/2
    A(got, [1.0, -0.5, -0.5, -1.0, 2.0, -1.0], rtol=1e-6)


def test_group_estimators_reject_a_bad_group():
    with pytest.raises(ValueError, match="at least 2"):
        grpo.grpo_advantages(jnp.ones(4), 1)
    with pytest.raises(ValueError, match="whole number of groups"):
        grpo.rloo_advantages(jnp.ones(5), 2)


def test_token_advantages_broadcast_on_the_mask():
    got = grpo.token_advantages(jnp.array([2.0, -1.0]), jnp.array([[1, 1, 0], [1, 0, 0]]))
    A(got, [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])


def test_reinforce_pp_kl_reward_discounted_return_and_batch_whitening():
    scores = jnp.array([1.0, 0.0])
    kl = jnp.array([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])  # 9.0 is off the mask
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    adv, ret = jax.jit(functools.partial(grpo.reinforce_pp_advantages, kl_coef=0.5, gamma=0.9))(scores, kl, mask)
    # rewards row 0: -0.05, -0.1, -0.15 + 1; row 1: -0.2, -0.25 (its last token is t = 1)
    r2 = 0.85
    r1 = -0.1 + 0.9 * r2
    r0 = -0.05 + 0.9 * r1
    q1 = -0.25
    q0 = -0.2 + 0.9 * q1
    A(ret, [[r0, r1, r2], [q0, q1, 0.0]], rtol=1e-6)
    flat = np.array([r0, r1, r2, q0, q1])
    white = (flat - flat.mean()) / np.sqrt(flat.var() + 1e-8)
    A(adv, [[white[0], white[1], white[2]], [white[3], white[4], 0.0]], rtol=1e-5)


# ----------------------------------------------------------------------------------------------- DAPO
def test_overlong_penalty_is_dapo_piecewise_formula():
    lengths = jnp.array([3, 6, 7, 8, 10, 11])
    got = grpo.overlong_penalty(lengths, max_len=10, buffer=4)
    # L_max - L_cache = 6: 0 up to 6, (6 - |y|) / 4 up to 10, -1 beyond
    A(got, [0.0, 0.0, -0.25, -0.5, -1.0, -1.0], rtol=1e-6)
    A(grpo.overlong_penalty(lengths, max_len=10, buffer=4, factor=0.5)[3], -0.25)
    with pytest.raises(ValueError, match="overlong buffer"):
        grpo.overlong_penalty(lengths, max_len=10, buffer=0)


def test_dynamic_sampling_keeps_groups_with_different_rewards():
    scores = jnp.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 1e-3])
    keep = np.asarray(jax.jit(grpo.dynamic_sampling_keep, static_argnums=1)(scores, 4))
    assert keep.tolist() == [True] * 4 + [False] * 8 + [True] * 4


# ----------------------------------------------------------------------------------------- aggregation
LOSS = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]], np.float32)
MASK = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)


@pytest.mark.parametrize("mode, want, weight", [
    ("token_mean", (1 + 2 + 3 + 5) / 4, 4),
    ("seq_mean_token_mean", ((1 + 2 + 3) / 3 + 5 / 1) / 2, 2),  # the empty row is not a sequence
    ("seq_mean_token_sum_norm", ((1 + 2 + 3) / 8 + 5 / 8) / 2, 2),
])
def test_aggregation_modes_by_hand(mode, want, weight):
    loss, w = grpo.aggregate(jnp.asarray(LOSS), jnp.asarray(MASK), mode, max_len=8)
    A(loss, want, rtol=1e-6)
    assert float(w) == weight == float(grpo.aggregation_count(jnp.asarray(MASK), mode))


def test_aggregation_rejects_unknown_mode_and_missing_max_len():
    with pytest.raises(ValueError, match="token_mean"):
        grpo.aggregate(jnp.asarray(LOSS), jnp.asarray(MASK), "mean")
    with pytest.raises(ValueError, match="max_len"):
        grpo.aggregate(jnp.asarray(LOSS), jnp.asarray(MASK), "seq_mean_token_sum_norm")


# -------------------------------------------------------------------------------------------- losses
RATIOS = np.array([[0.5, 1.0, 1.5], [1.2, 0.7, 5.0]])
ADV = np.array([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])


def _policy(clip_ratio_c=None, is_weights=None):
    old = np.full((2, 3), -1.0)
    fn = functools.partial(grpo.clipped_policy_loss, clip_low=0.2, clip_high=0.28, clip_ratio_c=clip_ratio_c)

    def loss(lp):
        return fn(lp, jnp.asarray(old), jnp.asarray(ADV), jnp.ones((2, 3)), is_weights=is_weights)

    lp = jnp.asarray(old + np.log(RATIOS))
    (value, metrics), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(lp)
    return float(value), metrics, np.asarray(grad)


def test_dapo_asymmetric_clip_by_hand():
    value, metrics, grad = _policy()
    # A = +1: -min(r, clip(r, 0.8, 1.28)) -> -0.5, -1.0, -1.28 (clipped at 1 + clip_high)
    # A = -1:  max(r, clip(r, 0.8, 1.28)) ->  1.2,  0.8 (clipped at 1 - clip_low), 5.0
    A(value, (-0.5 - 1.0 - 1.28 + 1.2 + 0.8 + 5.0) / 6, rtol=1e-6)
    A(metrics["clipfrac"], 2 / 6, rtol=1e-6)
    # d/dlogp of -A r / N is -A r / 6 where unclipped, 0 where clipped
    A(grad, [[-0.5 / 6, -1.0 / 6, 0.0], [1.2 / 6, 0.0, 5.0 / 6]], rtol=1e-5, atol=1e-7)
    # approx_kl = mean (r - 1) - log r
    A(metrics["approx_kl"], np.mean(RATIOS - 1 - np.log(RATIOS)), rtol=1e-5)
    assert float(metrics["weight"]) == 6


def test_dual_clip_bounds_negative_advantage_loss():
    value, metrics, grad = _policy(clip_ratio_c=3.0)
    # the A = -1, r = 5 token: min(5, c = 3) = 3, and no gradient
    A(value, (-0.5 - 1.0 - 1.28 + 1.2 + 0.8 + 3.0) / 6, rtol=1e-6)
    A(metrics["clipfrac"], 3 / 6, rtol=1e-6)
    A(grad[1, 2], 0.0, atol=0)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        _policy(clip_ratio_c=1.0)


def test_tis_weights_are_capped_ratios_and_scale_the_loss():
    sampler = jnp.log(jnp.array([[0.1, 0.4, 0.2], [0.5, 0.5, 0.5]]))
    trainer = jnp.log(jnp.array([[0.3, 0.2, 0.2], [0.5, 0.75, 0.25]]))
    w = grpo.tis_weights(trainer, sampler, cap=2.0)
    A(w, [[2.0, 0.5, 1.0], [1.0, 1.5, 0.5]], rtol=1e-5)  # 3.0 capped at 2
    value, _, _ = _policy(is_weights=w)
    per_token = np.array([[-0.5, -1.0, -1.28], [1.2, 0.8, 5.0]]) * np.asarray(w)
    A(value, per_token.mean(), rtol=1e-5)


def test_gspo_sequence_ratio_clipped_per_sequence_and_its_gradient():
    old = jnp.asarray(np.log([[0.5, 0.25, 0.1], [0.2, 0.4, 0.3]]))
    delta = np.array([[0.1, -0.04, 0.0], [0.3, 0.6, 9.0]])  # row 1's last token is off the mask
    mask = jnp.array([[1, 1, 1], [1, 1, 0]], jnp.float32)
    adv = jnp.array([[2.0] * 3, [1.0] * 3])
    lp = old + delta
    fn = functools.partial(grpo.gspo_loss, clip_low=0.2, clip_high=0.3)
    (value, metrics), grad = jax.jit(jax.value_and_grad(lambda x: fn(x, old, adv, mask), has_aux=True))(lp)
    s0 = math.exp((0.1 - 0.04 + 0.0) / 3)  # geometric mean of row 0's token ratios: 1.0202, inside
    s1 = math.exp((0.3 + 0.6) / 2)  # 1.568, above 1 + 0.3: clipped, no gradient
    A(value, (-2.0 * s0 + -1.0 * 1.3) / 2, rtol=1e-5)
    A(metrics["seq_ratio"], (s0 + s1) / 2, rtol=1e-5)
    A(metrics["clipfrac"], 0.5, rtol=1e-6)
    # sequence-level objective 1/N sum_i -A_i s_i: d/dlogp_0t = -A_0 s_0 / |y_0| / N
    A(grad, [[-2.0 * s0 / 3 / 2] * 3, [0.0] * 3], rtol=1e-5, atol=1e-7)

    # inside the clip range, the token form's gradient is the published sequence objective's
    def sequence_objective(x):
        s = jnp.exp(jnp.sum((x - old) * mask, 1) / mask.sum(1))
        return jnp.mean(-adv[:, 0] * s)

    small = old + delta * 0.1
    g_token = jax.jit(jax.grad(lambda x: fn(x, old, adv, mask)[0]))(small)
    A(g_token, jax.jit(jax.grad(sequence_objective))(small), rtol=1e-5, atol=1e-7)


def test_kl_estimators_by_hand():
    lp, ref = jnp.array([[-1.0, -2.0]]), jnp.array([[-1.5, -1.0]])
    d = np.array([0.5, -1.0])  # log pi - log pi_ref
    A(grpo.kl_estimate(lp, ref, "k1"), [d], rtol=1e-6)
    A(grpo.kl_estimate(lp, ref, "k2"), [0.5 * d ** 2], rtol=1e-6)
    # Schulman: k3 = exp(ref - logp) - (ref - logp) - 1
    A(grpo.kl_estimate(lp, ref, "k3"), [[math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]], rtol=1e-6)
    loss, m = grpo.kl_loss(lp, ref, jnp.array([[1, 0]]), estimator="k3")
    A(loss, math.exp(-0.5) + 0.5 - 1, rtol=1e-6)
    assert float(m["weight"]) == 1
    with pytest.raises(ValueError, match="k1"):
        grpo.kl_estimate(lp, ref, "k4")


def test_logprob_mismatch_metrics_by_hand():
    sampler = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, -7.0]])
    trainer = jnp.array([[-1.05, -1.8, -3.0], [-0.4, -0.5, 0.0]])  # last token off the mask
    m = grpo.logprob_mismatch(sampler, trainer, jnp.array([[1, 1, 1], [1, 1, 0]]))
    A(m["mismatch/max_abs"], 0.2, rtol=1e-5)
    A(m["mismatch/mean_abs"], (0.05 + 0.2 + 0 + 0.1 + 0) / 5, rtol=1e-5)
    # ratios exp(-0.05)=0.951, exp(0.2)=1.221, 1, exp(0.1)=1.105, 1 -> two outside [0.9, 1.1]
    A(m["mismatch/frac_outside"], 2 / 5, rtol=1e-6)


# ---------------------------------------------------------------- exact over devices and accumulation
ROWS, WIDTH, ACCUM = 32, 5, 2


def _rollout():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, WIDTH + 1, size=ROWS)
    lengths[:8] = WIDTH  # the first micro-batch has many more tokens than the second
    lengths[-3] = 0  # an empty response
    return {
        "x": rng.normal(size=(ROWS, WIDTH)).astype(np.float32),
        "old": rng.normal(size=(ROWS, WIDTH)).astype(np.float32) * 0.1,
        "adv": rng.normal(size=(ROWS, WIDTH)).astype(np.float32),
        "mask": (np.arange(WIDTH)[None] < lengths[:, None]).astype(np.float32),
    }


def _loss_fn(mode, w, b, global_count=None, shards=1):
    """A toy policy: log-probs = w * x, with the clipped loss plus a k3 KL term."""
    lp = w[None] * b["x"] * 0.1
    kw = dict(agg=mode, max_len=WIDTH, global_count=global_count, shards=shards)
    pl, m = grpo.clipped_policy_loss(lp, b["old"], b["adv"], b["mask"], clip_low=0.2, clip_high=0.28, **kw)
    kl, _ = grpo.kl_loss(lp, b["old"] - 0.2, b["mask"], estimator="k3", agg=mode, max_len=WIDTH,
                         global_count=global_count, shards=shards)
    return pl + 0.1 * kl, m


@functools.cache
def _step_grads(mode, mesh, shards, use_global):
    """What jaxrl.train.step does per micro-batch: psum(grad(loss * weight)) / psum(weight) over DATA_AXES.

    Returns a jitted (w, batch, global_count) -> (gradient, loss), compiled once per mesh."""
    def local(w, b, global_count):
        def objective(w):
            loss, m = _loss_fn(mode, w, b, global_count if use_global else None, shards)
            return loss * m["weight"], (loss, m["weight"])

        g, (loss, weight) = jax.grad(objective, has_aux=True)(w)
        total = jax.lax.psum(weight, DATA_AXES)
        return jax.lax.psum(g, DATA_AXES) / total, jax.lax.psum(loss * weight, DATA_AXES) / total

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(DATA_AXES), P()), out_specs=(P(), P()),
                                 axis_names=set(DATA_AXES), check_vma=False))


@pytest.mark.parametrize("mode", grpo.AGGREGATIONS)
def test_aggregation_is_exact_on_8_devices_with_grad_accum(mode):
    batch = _rollout()
    w = jnp.linspace(-1.0, 1.0, WIDTH)
    # one device, one batch: the aggregate's plain formula over the whole optimizer step
    want_loss, want_g = jax.jit(jax.value_and_grad(lambda w: _loss_fn(mode, w, batch)[0]))(w)
    global_count = grpo.aggregation_count(jnp.asarray(batch["mask"]), mode)
    micro = [{k: v[i * ROWS // ACCUM:(i + 1) * ROWS // ACCUM] for k, v in batch.items()} for i in range(ACCUM)]
    for mesh, shards in [(make_mesh(1, 1, 1, devices=jax.devices()[:1]), ACCUM),
                         (make_mesh(2, 4, 1), 8 * ACCUM)]:
        with jax.set_mesh(mesh):
            outs = [_step_grads(mode, mesh, shards, True)(w, mb, global_count) for mb in micro]
        # optax.MultiSteps: the mean of the micro-batch gradients
        g = sum(o[0] for o in outs) / ACCUM
        loss = sum(o[1] for o in outs) / ACCUM
        A(g, want_g, rtol=1e-5, atol=1e-7)
        A(loss, want_loss, rtol=1e-5)
    if mode == "token_mean":  # the local count alone is exact over devices, but not over unequal micro-batches
        with jax.set_mesh(mesh):
            outs = [_step_grads(mode, mesh, 1, False)(w, mb, global_count) for mb in micro]
        assert not np.allclose(sum(o[0] for o in outs) / ACCUM, want_g, rtol=1e-3)
