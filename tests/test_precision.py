"""Loss scaling: DeepSpeed scale dynamics, skipped steps leave the optimizer untouched, state lookup."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrl.errors import JaxrlError
from jaxrl.optim import LossScaleConfig, OptimConfig, make_optimizer
from jaxrl.precision import (
    LossScaleState,
    dtype_of,
    loss_scale_of,
    loss_scaled,
    skip_nonfinite,
    skipped_steps_of,
)

INF = float("inf")


def _params():
    return {"w": jnp.arange(6.0).reshape(2, 3) / 10, "b": jnp.array([0.5, -1.0, 2.0])}


def _grads(value: float):
    """Gradients equal to ``value`` everywhere (inf/nan to overflow)."""
    return jax.tree_util.tree_map(lambda p: jnp.full_like(p, value), _params())


def _counters(state: LossScaleState):
    return (float(state.scale), int(state.good_steps), int(state.hysteresis_left), int(state.skipped))


def _run(tx, pattern: str):
    """Feeds one step per character ('o' = overflow, '.' = finite); returns the counters after each."""
    step = jax.jit(tx.update)
    state = tx.init(_params())
    out = []
    for c in pattern:
        _, state = step(_grads(INF if c == "o" else 1.0), state, _params())
        out.append(_counters(state))
    return out


def test_dtype_of():
    assert dtype_of("fp32") == jnp.float32
    assert dtype_of("bf16") == jnp.bfloat16
    assert dtype_of("fp16") == jnp.float16
    with pytest.raises(JaxrlError, match="precision.compute must be one of fp32, bf16, fp16"):
        dtype_of("fp8")


def test_dynamic_scale_follows_deepspeed_step_by_step():
    tx = loss_scaled(optax.sgd(1.0), init_scale=8.0, window=2, hysteresis=2, min_scale=2.0)
    # (scale, good_steps, hysteresis_left, skipped) after each step, worked out by hand from
    # DeepSpeed's update_scale.
    expected = [
        (8.0, 0, 1, 1),  # o: hysteresis 2 -> 1, scale kept
        (4.0, 0, 1, 2),  # o: hysteresis used up -> halve
        (2.0, 0, 1, 3),  # o: halve again (hysteresis is not refilled by halving)
        (2.0, 0, 1, 4),  # o: floored at min_scale
        (2.0, 1, 1, 4),  # .: 0 finite steps before this one: no growth
        (2.0, 2, 1, 4),  # .: 1 before
        (4.0, 3, 2, 4),  # .: 2 before = window -> double, refill hysteresis
        (4.0, 4, 2, 4),  # .
        (8.0, 5, 2, 4),  # .: 4 before -> double again
        (8.0, 0, 1, 5),  # o: hysteresis 2 -> 1
        (8.0, 1, 1, 5),  # .: no refill without consecutive_hysteresis
        (4.0, 0, 1, 6),  # o: so this one halves
    ]
    assert _run(tx, "oooo.....o.o") == expected


def test_consecutive_hysteresis_refills_on_every_finite_step():
    tx = loss_scaled(optax.sgd(1.0), init_scale=8.0, window=100, hysteresis=2, min_scale=1.0,
                     consecutive_hysteresis=True)
    assert _run(tx, "o.o") == [(8.0, 0, 1, 1), (8.0, 1, 2, 1), (8.0, 0, 1, 2)]


def _deepspeed_reference(pattern, scale, window, hysteresis, min_scale):
    """DeepSpeed's cur_iter / last_overflow_iter formulation, in plain Python."""
    cur_iter, last_overflow, hyst, out = 0, -1, hysteresis, []
    for c in pattern:
        if c == "o":
            if hysteresis == 1 or hyst == 1:
                scale = max(scale / 2, min_scale)
            else:
                hyst -= 1
            last_overflow = cur_iter
        else:
            stable = cur_iter - last_overflow - 1
            if stable > 0 and stable % window == 0:
                hyst = hysteresis
                scale *= 2
        cur_iter += 1
        out.append(scale)
    return out


@pytest.mark.parametrize("window,hysteresis", [(3, 2), (1, 1)])
def test_dynamic_scale_matches_deepspeed_formulation_on_random_pattern(window, hysteresis):
    rng = np.random.default_rng(0)
    pattern = "".join(rng.choice(["o", ".", ".", "."], size=60))
    tx = loss_scaled(optax.sgd(1.0), init_scale=2.0**10, window=window, hysteresis=hysteresis, min_scale=4.0)
    got = [s for s, *_ in _run(tx, pattern)]
    assert got == _deepspeed_reference(pattern, 2.0**10, window, hysteresis, 4.0)


def test_static_scale_never_changes_but_still_skips():
    tx = loss_scaled(optax.sgd(1.0), init_scale=128.0, dynamic=False)
    out = _run(tx, "oo....o")
    assert [s for s, *_ in out] == [128.0] * 7
    assert out[-1][3] == 3


def test_overflow_step_changes_nothing_then_training_resumes():
    scale = 1024.0
    inner = optax.adam(0.1)
    tx = loss_scaled(inner, init_scale=scale, window=1000, hysteresis=1, min_scale=1.0)
    params = _params()
    g1 = {"w": jnp.array([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]]), "b": jnp.array([0.1, 0.2, -0.3])}
    g2 = jax.tree_util.tree_map(lambda g: -2 * g + 0.25, g1)
    scaled = lambda g, s: jax.tree_util.tree_map(lambda x: x * s, g)  # noqa: E731

    state = tx.init(params)
    ref_state = inner.init(params)
    upd, state = tx.update(scaled(g1, scale), state, params)
    ref_upd, ref_state = inner.update(g1, ref_state, params)
    chex.assert_trees_all_close(upd, ref_upd, rtol=1e-6)

    bad = dict(scaled(g2, scale), b=jnp.array([1.0, jnp.nan, 1.0]))
    before = state.inner_state
    upd, state = tx.update(bad, state, params)
    for leaf in jax.tree_util.tree_leaves(upd):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
    for new, old in zip(jax.tree_util.tree_leaves(state.inner_state), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(new, old)
    assert int(state.skipped) == 1 and float(state.scale) == scale / 2

    # The next finite step equals Adam's second step, as if the bad step never happened.
    upd, state = tx.update(scaled(g2, scale / 2), state, params)
    ref_upd, ref_state = inner.update(g2, ref_state, params)
    chex.assert_trees_all_close(upd, ref_upd, rtol=1e-6)
    chex.assert_trees_all_close(state.inner_state, ref_state, rtol=1e-6)
    assert int(state.inner_state[0].count) == 2


def test_skip_nonfinite_counts_and_keeps_state():
    tx = skip_nonfinite(optax.adam(0.1))
    state = tx.init(_params())
    upd, state = tx.update(_grads(1.0), state, _params())
    assert float(jnp.abs(upd["w"]).sum()) > 0
    before = state.inner_state
    upd, state = tx.update(_grads(-INF), state, _params())
    assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(upd))
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.inner_state, before)
    assert int(skipped_steps_of(state)) == 1 and float(loss_scale_of(state)) == 1.0


def test_loss_scale_found_inside_multisteps_and_absent_is_one():
    ls = LossScaleConfig(enabled=True, initial_scale_power=4, hysteresis=1)
    tx = make_optimizer(OptimConfig(grad_accum=2), 10, loss_scale=ls)
    state = tx.init(_params())
    assert isinstance(state, optax.MultiStepsState)
    assert float(loss_scale_of(state)) == 16.0
    # Overflow in the first micro-batch: the skip (and the halving) happens at the boundary.
    _, state = tx.update(_grads(INF), state, _params())
    assert float(loss_scale_of(state)) == 16.0 and int(skipped_steps_of(state)) == 0
    _, state = tx.update(_grads(1.0), state, _params())
    assert float(loss_scale_of(state)) == 8.0 and int(skipped_steps_of(state)) == 1

    plain = optax.adam(0.1).init(_params())
    assert float(loss_scale_of(plain)) == 1.0 and int(skipped_steps_of(plain)) == 0


def test_loss_scale_of_nnx_optimizer_state():
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    ls = LossScaleConfig(enabled=True, initial_scale_power=5)
    opt = nnx.Optimizer(model, make_optimizer(OptimConfig(), 10, loss_scale=ls), wrt=nnx.Param)
    assert float(loss_scale_of(opt.opt_state)) == 32.0
    assert int(skipped_steps_of(opt.opt_state)) == 0


def test_jitted_update_on_sharded_params_keeps_sharding():
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    tx = loss_scaled(optax.adam(0.1), init_scale=4.0, window=10, hysteresis=1, min_scale=1.0)
    with jax.set_mesh(mesh):
        params = {"w": jax.device_put(jnp.ones((8, 2)), sharding)}
        state = tx.init(params)

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(grads, state):
            return tx.update(grads, state, params)

        grads = {"w": jax.device_put(np.full((8, 2), 4.0, np.float32), sharding)}
        upd, state = step(grads, state)
        assert upd["w"].sharding.is_equivalent_to(sharding, 2)
        assert state.inner_state[0].mu["w"].sharding.is_equivalent_to(sharding, 2)
        np.testing.assert_allclose(upd["w"], -0.1, rtol=1e-5)  # Adam's first step is -lr * sign(g)
        bad_w = np.array(grads["w"])
        bad_w[3, 1] = INF
        bad = {"w": jax.device_put(bad_w, sharding)}
        upd, state = step(bad, state)
    np.testing.assert_array_equal(upd["w"], 0.0)
    assert float(state.scale) == 2.0 and int(state.skipped) == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(init_scale=0.0), "init_scale"),
        (dict(window=0), "window"),
        (dict(hysteresis=0), "hysteresis"),
        (dict(min_scale=0.0), "min_scale"),
    ],
)
def test_bad_scaler_arguments_raise(kwargs, match):
    with pytest.raises(JaxrlError, match=match):
        loss_scaled(optax.sgd(1.0), **kwargs)
