"""Loss scaling: DeepSpeed scale dynamics, skipped steps leave the optimizer untouched, state lookup."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from compiles import compiles
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


class _DeepSpeedScaler:
    """DeepSpeed's dynamic loss scaler, re-stated from its source for these tests.

    Source: ``DynamicLossScaler.__init__`` and ``DynamicLossScaler.update_scale`` in
    deepspeed/runtime/fp16/loss_scaler.py, DeepSpeed 0.17.1 (unchanged through 0.19.8), the scaler
    of the ZeRO 1-3 fp16 optimizers. The state is DeepSpeed's own counters, not ours:

    * start: ``cur_iter = 0``, ``last_overflow_iter = -1``, ``cur_hysteresis = delayed_shift``.
    * overflow: halve (floored at ``min_scale``) if ``delayed_shift == 1 or cur_hysteresis == 1``,
      else ``cur_hysteresis -= 1``; then ``last_overflow_iter = cur_iter``.
    * finite: ``consecutive_hysteresis`` refills ``cur_hysteresis``; with
      ``stable_interval = cur_iter - last_overflow_iter - 1``, double when ``stable_interval > 0`` and
      ``stable_interval % scale_window == 0``, refilling ``cur_hysteresis`` there when not consecutive.
    * every step: ``cur_iter += 1``.

    ``raise_error_at_min_scale`` is off: DeepSpeed raises on an overflow at the minimum, jaxrl's
    jitted step cannot and keeps the minimum (see ``jaxrl.precision.next_scale``).
    """

    def __init__(self, init_scale, scale_window, min_scale, delayed_shift, consecutive_hysteresis=False):
        self.cur_scale, self.scale_window, self.min_scale = init_scale, scale_window, min_scale
        self.delayed_shift, self.consecutive = delayed_shift, consecutive_hysteresis
        self.cur_iter, self.last_overflow_iter, self.cur_hysteresis = 0, -1, delayed_shift

    def update_scale(self, overflow: bool) -> None:
        if overflow:
            if 1 in (self.delayed_shift, self.cur_hysteresis):
                self.cur_scale = max(self.cur_scale / 2.0, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive:
                self.cur_hysteresis = self.delayed_shift
            stable_interval = self.cur_iter - self.last_overflow_iter - 1
            if stable_interval > 0 and stable_interval % self.scale_window == 0:
                if not self.consecutive:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= 2.0
        self.cur_iter += 1

    def counters(self):
        """Ours in DeepSpeed's terms: (scale, finite steps since the last overflow, hysteresis left)."""
        return self.cur_scale, self.cur_iter - self.last_overflow_iter - 1, self.cur_hysteresis


def _scan_counters(tx, overflow: np.ndarray):
    """Runs ``tx`` over a bool pattern in one ``lax.scan``; (scale, good, hysteresis, skipped) per step."""
    params = _params()

    def body(state, o):
        grads = jax.tree_util.tree_map(lambda p: jnp.where(o, INF, 1.0) * jnp.ones_like(p), params)
        _, state = tx.update(grads, state, params)
        return state, (state.scale, state.good_steps, state.hysteresis_left, state.skipped)

    _, out = jax.jit(lambda s, o: jax.lax.scan(body, s, o))(tx.init(params), jnp.asarray(overflow))
    return list(zip(*(np.asarray(x).tolist() for x in out)))


def test_scale_first_doubles_on_the_window_plus_first_finite_step():
    # Worked by hand from DeepSpeed 0.17.1+ update_scale: init 8, window 2, finite steps only; before
    # step i (cur_iter = i) stable_interval = i - (-1) - 1 = i, so the scale doubles after steps 2 and 4.
    # The scale each of the five steps multiplies its loss by: [8, 8, 8, 16, 16]. DeepSpeed <= 0.17.0
    # ((cur_iter - last_overflow_iter) % window == 0: after steps 1 and 3) used [8, 8, 16, 16, 32].
    tx = loss_scaled(optax.sgd(1.0), init_scale=8.0, window=2, hysteresis=2, min_scale=1.0)
    after = [s for s, *_ in _run(tx, ".....")]
    used = [8.0] + after[:-1]
    assert used == [8.0, 8.0, 8.0, 16.0, 16.0]
    ds = _DeepSpeedScaler(8.0, 2, 1.0, 2)
    ds_used = []
    for _ in range(5):
        ds_used.append(ds.cur_scale)
        ds.update_scale(False)
    assert ds_used == used


def test_dynamic_scale_follows_deepspeed_step_by_step():
    tx = loss_scaled(optax.sgd(1.0), init_scale=8.0, window=2, hysteresis=2, min_scale=2.0)
    # (scale, good_steps, hysteresis_left, skipped) after each step, worked out by hand from
    # DeepSpeed's DynamicLossScaler.update_scale (0.17.1+; good_steps = cur_iter - last_overflow_iter - 1).
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


def test_growth_refills_hysteresis_only_without_consecutive_hysteresis():
    # By hand, window 1, hysteresis 3: "oo" leaves 1; the first '.' (stable_interval 0) neither grows
    # nor refills; the second (stable_interval 1) doubles and refills to 3, so the next "oo" is absorbed
    # and only the third overflow halves.
    tx = loss_scaled(optax.sgd(1.0), init_scale=16.0, window=1, hysteresis=3, min_scale=1.0)
    got = [(s, h) for s, _, h, _ in _run(tx, "oo..ooo")]
    assert got == [(16.0, 2), (16.0, 1), (16.0, 1), (32.0, 3), (32.0, 2), (32.0, 1), (16.0, 1)]


def test_consecutive_hysteresis_refills_on_every_finite_step():
    tx = loss_scaled(optax.sgd(1.0), init_scale=8.0, window=100, hysteresis=2, min_scale=1.0,
                     consecutive_hysteresis=True)
    assert _run(tx, "o.o") == [(8.0, 0, 1, 1), (8.0, 1, 2, 1), (8.0, 0, 1, 2)]


@pytest.mark.parametrize("window,hysteresis,consecutive", [(1, 1, False), (3, 2, False), (2, 3, True), (5, 2, True)])
def test_dynamic_scale_matches_deepspeed_on_a_random_200_step_pattern(window, hysteresis, consecutive):
    overflow = np.random.default_rng(window * 10 + hysteresis).random(200) < 0.3
    tx = loss_scaled(optax.sgd(1.0), init_scale=2.0**10, window=window, hysteresis=hysteresis, min_scale=4.0,
                     consecutive_hysteresis=consecutive)
    ds = _DeepSpeedScaler(2.0**10, window, 4.0, hysteresis, consecutive)
    expected = []
    for o in overflow:
        ds.update_scale(bool(o))
        expected.append(ds.counters() + (int(np.sum(overflow[:len(expected) + 1])),))
    assert _scan_counters(tx, overflow) == expected
    assert len({s for s, *_ in expected}) > 3  # the pattern moves the scale both ways


def test_scale_dependent_overflow_skips_the_steps_deepspeed_skips():
    # fp16 backward: the gradient of S * L is S * g rounded to fp16, inf once it passes 65504; so which
    # steps are skipped depends on the scale the scaler chose, and an error in the scale compounds.
    g = 2.0 ** np.random.default_rng(1).uniform(-6.0, 4.0, size=200)  # (200,) true gradient per step
    tx = loss_scaled(optax.sgd(1.0), init_scale=2.0**16, window=4, hysteresis=2, min_scale=1.0)
    params = {"w": jnp.zeros((3,), jnp.float32)}

    def body(state, g_t):
        grads = {"w": jnp.full((3,), state.scale * g_t, jnp.float32).astype(jnp.float16)}
        updates, state = tx.update(grads, state, params)
        return state, (state.scale, state.skipped, updates["w"][0])

    _, (scales, skipped, updates) = jax.jit(lambda s, x: jax.lax.scan(body, s, x))(
        tx.init(params), jnp.asarray(g, jnp.float32))

    ds = _DeepSpeedScaler(2.0**16, 4, 1.0, 2)
    ds_scales, ds_skipped, applied = [], [], []
    for g_t in g:
        with np.errstate(over="ignore"):  # the overflow is the point
            overflow = bool(np.isinf(np.float16(np.float32(ds.cur_scale) * np.float32(g_t))))
        applied.append(not overflow)
        ds.update_scale(overflow)
        ds_scales.append(ds.cur_scale)
        ds_skipped.append(len(applied) - sum(applied))
    assert np.asarray(scales).tolist() == ds_scales
    assert np.asarray(skipped).tolist() == ds_skipped
    assert 20 < ds_skipped[-1] < 180  # both kinds of step occur
    # Applied steps move w by -g (unscaled, to fp16 rounding), skipped ones not at all.
    np.testing.assert_allclose(np.asarray(updates), np.where(applied, -g, 0.0), rtol=2e-3)


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
        def step(grads, state):
            return tx.update(grads, state, params)

        grads = {"w": jax.device_put(np.full((8, 2), 4.0, np.float32), sharding)}
        with compiles() as counts:
            upd, state = step(grads, state)
            assert upd["w"].sharding.is_equivalent_to(sharding, 2)
            assert state.inner_state[0].mu["w"].sharding.is_equivalent_to(sharding, 2)
            np.testing.assert_allclose(upd["w"], -0.1, rtol=1e-5)  # Adam's first step is -lr * sign(g)
            bad_w = np.array(grads["w"])
            bad_w[3, 1] = INF
            bad = {"w": jax.device_put(bad_w, sharding)}
            upd, state = step(bad, state)
    assert counts["step"] == 1  # the overflowing step reuses the finite one's compilation
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
