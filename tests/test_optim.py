"""Optimizer: schedules, decay mask, gradient accumulation, config validation."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl.errors import JaxrlError
from jaxrl.optim import LossScaleConfig, OptimConfig, decay_mask, make_optimizer, make_schedule


def _params():
    return {"w": jnp.arange(1.0, 7.0).reshape(2, 3) / 10, "b": jnp.array([0.5, -1.0, 2.0])}


@pytest.mark.parametrize(
    "schedule,expected",
    [
        # lr=1, warmup 2, total 10, min_lr_ratio 0.1: u = (t - 2) / 8 after warmup.
        ("cosine", {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 6: 0.55, 10: 0.1, 20: 0.1}),
        ("linear", {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.775, 6: 0.55, 10: 0.1, 20: 0.1}),
        ("constant", {0: 0.0, 1: 0.5, 2: 1.0, 6: 1.0, 20: 1.0}),
    ],
)
def test_schedule_values(schedule, expected):
    cfg = OptimConfig(lr=1.0, schedule=schedule, warmup_steps=2, min_lr_ratio=0.1)
    sched = make_schedule(cfg, 10)
    for step, lr in expected.items():
        np.testing.assert_allclose(float(sched(step)), lr, rtol=1e-6, atol=1e-7, err_msg=f"step {step}")


def test_schedule_without_warmup_starts_at_lr():
    sched = make_schedule(OptimConfig(lr=2.0, schedule="cosine"), 4)
    np.testing.assert_allclose([float(sched(t)) for t in (0, 2, 4)], [2.0, 1.0, 0.0], atol=1e-6)


def test_schedule_rejects_warmup_longer_than_run():
    with pytest.raises(JaxrlError, match="optim.warmup_steps"):
        make_schedule(OptimConfig(warmup_steps=11), 10)


def test_decay_mask_on_dict_and_nnx_state():
    assert decay_mask(_params()) == {"w": True, "b": False}
    state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param)
    mask = nnx.to_pure_dict(decay_mask(state))
    assert mask == {"kernel": True, "bias": False}


def test_weight_decay_skips_biases():
    cfg = OptimConfig(lr=0.1, weight_decay=0.1, schedule="constant", clip_norm=0.0)
    tx = make_optimizer(cfg, 10)
    params = _params()
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    upd, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_array_equal(upd["b"], np.zeros(3))
    # Zero gradients leave Adam's direction 0, so only the decay -lr * wd * w remains.
    np.testing.assert_allclose(upd["w"], -0.01 * params["w"], rtol=1e-6)


def test_grad_accum_equals_one_step_on_the_mean():
    base = dict(lr=0.1, weight_decay=0.01, schedule="cosine", warmup_steps=1, clip_norm=0.5)
    k = 3
    micro = [
        jax.tree_util.tree_map(lambda p, i=i: jnp.sin(p * (i + 1)) + 0.3 * i, _params()) for i in range(k)
    ]
    mean = jax.tree_util.tree_map(lambda *g: sum(g) / k, *micro)
    params = _params()

    acc = make_optimizer(OptimConfig(**base, grad_accum=k), 10)
    one = make_optimizer(OptimConfig(**base), 10)
    acc_state, one_state = acc.init(params), one.init(params)
    acc_update, one_update = jax.jit(acc.update), jax.jit(one.update)
    for _ in range(2):  # two optimizer steps, so warmup and the moments both matter
        for i, g in enumerate(micro):
            upd, acc_state = acc_update(g, acc_state, params)
            if i < k - 1:
                np.testing.assert_array_equal(upd["w"], 0.0)
        ref, one_state = one_update(mean, one_state, params)
        chex.assert_trees_all_close(upd, ref, atol=1e-6, rtol=1e-6)
    assert float(jnp.abs(ref["w"]).sum()) > 0  # step 0 has lr 0 (warmup); step 1 moves


def test_clipping_sees_unscaled_gradients():
    # eps=1 makes Adam's step ~ the clipped gradient itself, so a clip of the scaled one would show.
    cfg = OptimConfig(lr=1.0, schedule="constant", clip_norm=1e-3, b1=0.0, b2=0.0, eps=1.0)
    ls = LossScaleConfig(enabled=True, initial_scale_power=10)
    scaled = make_optimizer(cfg, 10, loss_scale=ls)
    plain = make_optimizer(cfg, 10)
    params = _params()
    grads = jax.tree_util.tree_map(lambda p: 0.5 * p, params)
    upd, _ = scaled.update(jax.tree_util.tree_map(lambda g: g * 1024.0, grads), scaled.init(params), params)
    ref, _ = plain.update(grads, plain.init(params), params)
    chex.assert_trees_all_close(upd, ref, rtol=1e-6)


def test_nnx_optimizer_step_runs():
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    cfg = OptimConfig(lr=0.1, weight_decay=0.1, schedule="constant")
    opt = nnx.Optimizer(model, make_optimizer(cfg, 10), wrt=nnx.Param)
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grads = jax.tree_util.tree_map(jnp.zeros_like, nnx.state(model, nnx.Param))
    opt.update(model, grads)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np.testing.assert_array_equal(after["bias"], before["bias"])
    np.testing.assert_allclose(after["kernel"], 0.99 * before["kernel"], rtol=1e-6)


@pytest.mark.parametrize(
    "field,value",
    [
        ("lr", 0.0), ("weight_decay", -0.1), ("b1", 1.0), ("b2", -0.5), ("eps", 0.0),
        ("schedule", "step"), ("warmup_steps", -1), ("min_lr_ratio", 1.5), ("clip_norm", -1.0),
        ("grad_accum", 0), ("grad_accum", 1.5),
    ],
)
def test_bad_optim_config_names_the_field(field, value):
    with pytest.raises(JaxrlError, match=f"optim.{field} "):
        OptimConfig(**{field: value})


def test_grad_accum_message():
    with pytest.raises(JaxrlError, match="^optim.grad_accum must be >= 1, got 0$"):
        OptimConfig(grad_accum=0)


@pytest.mark.parametrize(
    "field,value",
    [
        ("initial_scale_power", -1), ("loss_scale_window", 0), ("hysteresis", 0),
        ("min_loss_scale", 0.0), ("static_scale", -1.0),
    ],
)
def test_bad_loss_scale_config_names_the_field(field, value):
    with pytest.raises(JaxrlError, match=f"loss_scale.{field} "):
        LossScaleConfig(**{field: value})


def test_loss_scale_from_mapping():
    tx = make_optimizer(OptimConfig(), 10, loss_scale={"enabled": True, "static_scale": 64.0})
    state = tx.init(_params())
    assert float(state.scale) == 64.0
    with pytest.raises(JaxrlError, match="unknown loss_scale keys \\['scale_window'\\]"):
        make_optimizer(OptimConfig(), 10, loss_scale={"scale_window": 10})
