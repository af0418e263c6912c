"""Precision policy and DeepSpeed-style loss scaling as an optax transformation.

fp16 cannot hold small gradients, so the loss is multiplied by a scale ``S`` before differentiation and
the gradients are divided by ``S`` before the optimizer sees them. The scale lives in the optimizer
state (:class:`LossScaleState`); the train step reads it with :func:`loss_scale_of`::

    scale = loss_scale_of(opt_state)                     # () f32
    grads = jax.grad(lambda p: loss_fn(p) * scale)(params)
    updates, opt_state = tx.update(grads, opt_state, params)

A step whose gradients are not finite changes no parameter and no optimizer moment; it only moves the
scale and counts itself in ``skipped``.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrl.errors import JaxrlError

_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def dtype_of(name: str, *, field: str = "precision.compute") -> jnp.dtype:
    """Maps a precision name (``fp32``, ``bf16``, ``fp16``) to its jnp dtype.

    Args:
      name: the precision name from the config.
      field: the config key the name came from, used in the error message.
    Returns:
      ``jnp.float32``, ``jnp.bfloat16`` or ``jnp.float16``.
    """
    if name not in _DTYPES:
        allowed = ", ".join(_DTYPES)
        raise JaxrlError(f"{field} must be one of {allowed}; got {name!r}")
    return jnp.dtype(_DTYPES[name])


class LossScaleState(NamedTuple):
    """Optimizer state of :func:`loss_scaled`: the inner state plus the scaler's counters."""

    inner_state: optax.OptState  # state of the wrapped transformation, untouched on skipped steps
    scale: jax.Array  # () f32, the loss scale S the next step's loss is multiplied by
    good_steps: jax.Array  # () i32, consecutive finite steps since the last overflow (or the start)
    hysteresis_left: jax.Array  # () i32, overflows still tolerated before S shrinks
    skipped: jax.Array  # () i32, total steps skipped because their gradients were not finite


def all_finite(tree: Any) -> jax.Array:
    """True iff every element of every leaf is finite: ``all_l all(isfinite(x_l))``; () bool."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def unscale(grads: Any, scale: jax.Array) -> Any:
    """Divides every gradient by the loss scale: ``g / S``.

    Low-precision gradients are promoted to float32 first: fp16 cannot even hold the default
    ``S = 2**16`` (its maximum is 65504).
    """

    def one(g):
        wide = jnp.promote_types(g.dtype, jnp.float32)
        return g.astype(wide) / scale.astype(wide)

    return jax.tree_util.tree_map(one, grads)


def _select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Leaf-wise ``where(pred, a, b)``; the chosen side comes back bit-identical."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def next_scale(
    finite: jax.Array,
    scale: jax.Array,
    good_steps: jax.Array,
    hysteresis_left: jax.Array,
    *,
    window: int,
    hysteresis: int,
    min_scale: float,
    consecutive_hysteresis: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One step of DeepSpeed's ``DynamicLossScaler.update_scale``, on scalars.

    The reference is ``DynamicLossScaler`` in deepspeed/runtime/fp16/loss_scaler.py as of DeepSpeed
    0.17.1 (checked against 0.19.8), the scaler of the ZeRO 1-3 fp16 optimizers. Its counters map onto
    ours as ``g = cur_iter - last_overflow_iter - 1`` (DeepSpeed's ``stable_interval``: the finite steps
    since the last overflow, or since the start where ``last_overflow_iter = -1``, *before* this one)
    and ``h = cur_hysteresis`` (refilled to ``hysteresis``, DeepSpeed's ``delayed_shift``):

    * overflow: if ``h <= 1``: ``S <- max(S / 2, min_scale)`` (``h`` stays); else ``h <- h - 1``
      (``S`` stays). ``g <- 0``. ``h`` is *not* refilled by shrinking.
    * finite: if ``g > 0 and g % window == 0``: ``S <- 2 S`` and ``h <- hysteresis``.
      With ``consecutive_hysteresis`` ``h <- hysteresis`` on every finite step instead.
      ``g <- g + 1``.

    So from a fresh start or an overflow the scale first doubles on the ``window + 1``-th finite step,
    then every ``window`` finite steps. DeepSpeed up to 0.17.0 tested
    ``(cur_iter - last_overflow_iter) % scale_window == 0`` instead and doubled one step earlier, on
    the ``window``-th; 0.17.1 changed it to the formula above, which is the one followed here.

    Two differences remain: DeepSpeed raises when an overflow would halve a scale already at
    ``min_scale`` (``raise_error_at_min_scale``); under jit the scale stays at the minimum and the
    step is skipped. And ZeRO stage 0's ``FP16_Optimizer._update_scale`` has no hysteresis (it
    halves on every overflow); here every stage uses the ZeRO 1-3 scaler.

    Returns:
      the new ``(scale, good_steps, hysteresis_left)``.
    """
    shrink = hysteresis_left <= 1
    scale_o = jnp.where(shrink, jnp.maximum(scale / 2, min_scale), scale)
    hyst_o = jnp.where(shrink, hysteresis_left, hysteresis_left - 1)

    grow = (good_steps > 0) & (good_steps % window == 0)
    scale_f = jnp.where(grow, scale * 2, scale)
    hyst_f = jnp.where(grow | consecutive_hysteresis, hysteresis, hysteresis_left)

    new_scale = jnp.where(finite, scale_f, scale_o).astype(jnp.float32)
    new_good = jnp.where(finite, good_steps + 1, 0).astype(jnp.int32)
    new_hyst = jnp.where(finite, hyst_f, hyst_o).astype(jnp.int32)
    return new_scale, new_good, new_hyst


def _check_scaler_args(init_scale, window, hysteresis, min_scale) -> None:
    if not (init_scale > 0 and init_scale < float("inf")):
        raise JaxrlError(f"loss scale init_scale must be a positive finite number, got {init_scale}")
    if int(window) != window or window < 1:
        raise JaxrlError(f"loss scale window must be an integer >= 1, got {window}")
    if int(hysteresis) != hysteresis or hysteresis < 1:
        raise JaxrlError(f"loss scale hysteresis must be an integer >= 1, got {hysteresis}")
    if not min_scale > 0:
        raise JaxrlError(f"loss scale min_scale must be > 0, got {min_scale}")


def loss_scaled(
    inner: optax.GradientTransformation,
    *,
    init_scale: float = 2.0**16,
    window: int = 1000,
    hysteresis: int = 2,
    min_scale: float = 1.0,
    dynamic: bool = True,
    consecutive_hysteresis: bool = False,
) -> optax.GradientTransformation:
    """Wraps ``inner`` so it takes gradients of the *scaled* loss ``S * L``.

    ``update(grads, state, params)`` computes ``g = grads / S``; if every ``g`` is finite it returns
    ``inner.update(g, ...)``, otherwise zero updates and ``inner_state`` unchanged (bit-identical),
    ``skipped + 1``. Then ``S`` moves by :func:`next_scale` (DeepSpeed ``DynamicLossScaler``) when
    ``dynamic``, or stays at ``init_scale`` (DeepSpeed's static ``loss_scale > 0``, which still
    skips non-finite steps).

    Args:
      inner: the transformation that sees unscaled gradients (clipping, AdamW, ...).
      init_scale: the first scale, DeepSpeed ``2**initial_scale_power``; the fixed scale if static.
      window: DeepSpeed ``loss_scale_window``.
      hysteresis: DeepSpeed ``hysteresis`` (``delayed_shift``).
      min_scale: DeepSpeed ``min_loss_scale``.
      dynamic: False for a static scale.
      consecutive_hysteresis: DeepSpeed ``consecutive_hysteresis``.
    Returns:
      a GradientTransformation whose state is a :class:`LossScaleState`.
    """
    _check_scaler_args(init_scale, window, hysteresis, min_scale)
    # Dividing by a fixed 1.0 is exact; skipping it keeps bf16/fp32 gradients in their own dtype.
    identity_scale = not dynamic and init_scale == 1.0

    def init_fn(params):
        return LossScaleState(
            inner_state=inner.init(params),
            scale=jnp.asarray(init_scale, jnp.float32),
            good_steps=jnp.zeros((), jnp.int32),
            hysteresis_left=jnp.asarray(hysteresis, jnp.int32),
            skipped=jnp.zeros((), jnp.int32),
        )

    def update_fn(grads, state, params=None):
        grads = grads if identity_scale else unscale(grads, state.scale)
        finite = all_finite(grads)
        # Both branches are computed and selected (no lax.cond): the select keeps every leaf's
        # sharding and the skipped branch is the rare one.
        updates, inner_state = inner.update(grads, state.inner_state, params)
        updates = _select(finite, updates, jax.tree_util.tree_map(jnp.zeros_like, updates))
        inner_state = _select(finite, inner_state, state.inner_state)
        if dynamic:
            scale, good, hyst = next_scale(
                finite, state.scale, state.good_steps, state.hysteresis_left,
                window=window, hysteresis=hysteresis, min_scale=min_scale,
                consecutive_hysteresis=consecutive_hysteresis,
            )
        else:
            scale, good, hyst = state.scale, state.good_steps, state.hysteresis_left
        skipped = state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32)
        return updates, LossScaleState(inner_state, scale, good, hyst, skipped)

    return optax.GradientTransformation(init_fn, update_fn)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optax.apply_if_finite`` semantics without a give-up limit, counting skipped steps.

    A static loss scale of 1: a step with any non-finite gradient gives zero updates, leaves
    ``inner_state`` bit-identical and increments ``skipped``.
    """
    return loss_scaled(inner, init_scale=1.0, dynamic=False)


def _loss_scale_states(opt_state: Any) -> list[LossScaleState]:
    """Every outermost :class:`LossScaleState` in an optimizer state tree (chain, MultiSteps, ...)."""
    is_ls = lambda x: isinstance(x, LossScaleState)  # noqa: E731
    return [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_ls) if is_ls(x)]


def _value(x: Any) -> jax.Array:
    """The array inside an ``nnx.Optimizer`` state variable, or ``x`` itself."""
    return x.get_value() if isinstance(x, nnx.Variable) else jnp.asarray(x)


def loss_scale_of(opt_state: Any) -> jax.Array:
    """The current loss scale S found anywhere in ``opt_state``; 1.0 when there is none. () f32.

    Works on raw optax states (also nested in ``optax.chain`` / ``optax.MultiSteps``) and on
    ``nnx.Optimizer.opt_state``.
    """
    states = _loss_scale_states(opt_state)
    return _value(states[0].scale) if states else jnp.ones((), jnp.float32)


def skipped_steps_of(opt_state: Any) -> jax.Array:
    """Total optimizer steps skipped as non-finite; 0 when ``opt_state`` has no loss-scale state. () i32."""
    states = _loss_scale_states(opt_state)
    return _value(states[0].skipped) if states else jnp.zeros((), jnp.int32)
