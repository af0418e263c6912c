"""The optimizer: clip -> AdamW (warmup + decay schedule, no decay on norms/biases), wrapped in
loss scaling (fp16) or non-finite skipping, then gradient accumulation (``optax.MultiSteps``).

Order matters: the loss-scale wrapper sits outside clipping so the clip sees *unscaled* gradients,
and MultiSteps sits outside everything so one optimizer step (and one scale update) happens per
``grad_accum`` micro-batches, on their mean.
"""
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrl.errors import JaxrlError
from jaxrl.precision import loss_scaled, skip_nonfinite

SCHEDULES = ("constant", "linear", "cosine")


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise JaxrlError(msg)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedule (config key ``optim``)."""

    lr: float = 1e-4  # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.0  # decoupled (AdamW) decay, applied to rank >= 2 weights only
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.95  # Adam second-moment decay
    eps: float = 1e-8  # Adam denominator epsilon
    schedule: str = "cosine"  # decay after warmup: constant | linear | cosine
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0 to lr
    min_lr_ratio: float = 0.0  # the decay ends at min_lr_ratio * lr
    clip_norm: float = 1.0  # clip gradients to this global L2 norm; 0 turns clipping off
    grad_accum: int = 1  # micro-batches per optimizer step (optax.MultiSteps)

    def __post_init__(self):
        _require(math.isfinite(self.lr) and self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(0 <= self.b1 < 1, f"optim.b1 must be in [0, 1), got {self.b1}")
        _require(0 <= self.b2 < 1, f"optim.b2 must be in [0, 1), got {self.b2}")
        _require(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        _require(
            self.schedule in SCHEDULES,
            f"optim.schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}",
        )
        _require(
            _is_int(self.warmup_steps) and self.warmup_steps >= 0,
            f"optim.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}",
        )
        _require(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.clip_norm >= 0, f"optim.clip_norm must be >= 0 (0 = off), got {self.clip_norm}")
        _require(
            _is_int(self.grad_accum) and self.grad_accum >= 1,
            f"optim.grad_accum must be >= 1, got {self.grad_accum!r}",
        )


@dataclasses.dataclass(frozen=True)
class LossScaleConfig:
    """fp16 loss scaling with DeepSpeed's ``fp16`` fields (config key ``loss_scale``).

    The defaults are DeepSpeed's for an ``fp16`` section that leaves a field out, bare
    ``{"enabled": true}`` included: the fields of ``DeepSpeedFP16Config``
    (deepspeed/runtime/precision_config.py, equal to the ``FP16_*_DEFAULT`` constants in
    deepspeed/runtime/constants.py), which DeepSpeed 0.17.1 on hands to the scaler in every case.
    (Up to 0.17.0 a section naming none of the dynamic-scaling fields left ``DynamicLossScaler`` its
    own constructor defaults instead: 2**32, hysteresis 1.)
    """

    enabled: bool = False  # scale the loss (turned on by fp16 compute)
    initial_scale_power: int = 16  # dynamic scaling starts at 2**initial_scale_power
    loss_scale_window: int = 1000  # finite steps between scale doublings (the first on the window + 1-th)
    hysteresis: int = 2  # overflows tolerated before the scale halves
    min_loss_scale: float = 1.0  # the scale never halves below this
    static_scale: float = 0.0  # > 0: a fixed scale (DeepSpeed loss_scale); 0: dynamic
    consecutive_hysteresis: bool = False  # refill hysteresis on every finite step, not only on growth

    def __post_init__(self):
        _require(
            _is_int(self.initial_scale_power) and 0 <= self.initial_scale_power <= 126,
            f"loss_scale.initial_scale_power must be an integer in [0, 126], got {self.initial_scale_power!r}",
        )
        _require(
            _is_int(self.loss_scale_window) and self.loss_scale_window >= 1,
            f"loss_scale.loss_scale_window must be an integer >= 1, got {self.loss_scale_window!r}",
        )
        _require(
            _is_int(self.hysteresis) and self.hysteresis >= 1,
            f"loss_scale.hysteresis must be an integer >= 1, got {self.hysteresis!r}",
        )
        _require(self.min_loss_scale > 0, f"loss_scale.min_loss_scale must be > 0, got {self.min_loss_scale}")
        _require(
            math.isfinite(self.static_scale) and self.static_scale >= 0,
            f"loss_scale.static_scale must be >= 0 (0 = dynamic), got {self.static_scale}",
        )


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer step ``t`` (``W = warmup_steps``, ``D = total_steps - W``)::

        t < W:  lr * t / W
        t >= W: constant  lr
                linear    lr * (1 - (1 - r) * min(u, 1))              u = (t - W) / D
                cosine    lr * (r + (1 - r) * (1 + cos(pi * min(u, 1))) / 2)

    with ``r = min_lr_ratio`` (HF ``get_scheduler`` warmup, as DeepSpeed-Chat uses, ending at ``r * lr``).
    """
    _require(_is_int(total_steps) and total_steps >= 1, f"train.steps must be an integer >= 1, got {total_steps!r}")
    _require(
        cfg.warmup_steps <= total_steps,
        f"optim.warmup_steps ({cfg.warmup_steps}) must be <= train.steps ({total_steps})",
    )
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    end = cfg.lr * cfg.min_lr_ratio
    decay = {
        "constant": lambda: optax.constant_schedule(cfg.lr),
        "linear": lambda: optax.linear_schedule(cfg.lr, end, decay_steps),
        "cosine": lambda: optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio),
    }[cfg.schedule]()
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def decay_mask(params: Any) -> Any:
    """Weight-decay mask: True for leaves of rank >= 2 (matrices, embeddings), False for rank <= 1
    (norm scales, biases). Same tree as ``params`` (any pytree, ``nnx.State`` included)."""
    return jax.tree_util.tree_map(lambda x: jnp.ndim(x) >= 2, params)


def _as_loss_scale_config(loss_scale: LossScaleConfig | Mapping | None) -> LossScaleConfig | None:
    if loss_scale is None or isinstance(loss_scale, LossScaleConfig):
        return loss_scale
    if not isinstance(loss_scale, Mapping):
        raise JaxrlError(f"loss_scale must be a LossScaleConfig or a mapping, got {type(loss_scale).__name__}")
    fields = {f.name for f in dataclasses.fields(LossScaleConfig)}
    unknown = sorted(set(loss_scale) - fields)
    _require(not unknown, f"unknown loss_scale keys {unknown}; allowed: {', '.join(sorted(fields))}")
    return LossScaleConfig(**loss_scale)


def wrap_optimizer(inner: optax.GradientTransformation, *, clip_norm: float, loss_scale: LossScaleConfig | None,
                   grad_accum: int) -> optax.GradientTransformation:
    """``MultiSteps(skip_or_scale(chain(clip_by_global_norm(clip_norm), inner)), grad_accum)``: what every
    optimizer in jaxrl runs as, the runs' AdamW and the DeepSpeed engine's configured or given optimizer.

    Args:
      inner: the update rule (with its learning rate or schedule).
      clip_norm: global L2 norm the unscaled gradients are clipped to; 0 turns clipping off.
      loss_scale: enabled: fp16 loss scaling (static when ``static_scale`` > 0, else DeepSpeed's dynamic
        scaler); None or disabled: non-finite steps are skipped and counted, the scale fixed at 1.
      grad_accum: micro-batches per update (``accumulate``).
    """
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), inner) if clip_norm > 0 else inner
    ls = loss_scale
    if ls is None or not ls.enabled:
        tx = skip_nonfinite(tx)
    elif ls.static_scale > 0:
        tx = loss_scaled(tx, init_scale=ls.static_scale, dynamic=False)
    else:
        tx = loss_scaled(tx, init_scale=2.0**ls.initial_scale_power, window=ls.loss_scale_window,
                         hysteresis=ls.hysteresis, min_scale=ls.min_loss_scale,
                         consecutive_hysteresis=ls.consecutive_hysteresis)
    return accumulate(tx, grad_accum)


def make_optimizer(
    cfg: OptimConfig,
    total_steps: int,
    *,
    loss_scale: LossScaleConfig | Mapping | None = None,
) -> optax.GradientTransformation:
    """``MultiSteps(skip_or_scale(chain(clip_by_global_norm, adamw)), grad_accum)`` (``wrap_optimizer``).

    Args:
      cfg: the optimizer config.
      total_steps: optimizer steps of the run (micro-batches / grad_accum), for the schedule.
      loss_scale: a :class:`LossScaleConfig` (or a mapping of its fields); enabled means the
        gradients passed to ``update`` are those of the scaled loss ``loss_scale_of(state) * L``.
    Returns:
      a plain GradientTransformation; non-finite steps are skipped and counted.
    """
    adamw = optax.adamw(
        make_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=decay_mask,
    )
    return wrap_optimizer(adamw, clip_norm=cfg.clip_norm, loss_scale=_as_loss_scale_config(loss_scale),
                          grad_accum=cfg.grad_accum)


def accumulate(tx: optax.GradientTransformation, every: int) -> optax.GradientTransformation:
    """`optax.MultiSteps(tx, every)`, with the accumulator reset by selection after each window.

    MultiSteps clears its accumulator by multiplying it with 0, and `0 * inf` is NaN: after one fp16
    overflow every later window would be non-finite and skipped. Selecting zeros keeps the overflow
    confined to its own window, as DeepSpeed's skipped step is.
    """
    if every == 1:
        return tx
    multi = optax.MultiSteps(tx, every_k_schedule=every)

    def update(grads, state, params=None):
        updates, state = multi.update(grads, state, params)
        fresh = state.mini_step == 0
        acc = jax.tree.map(lambda a: jnp.where(fresh, jnp.zeros_like(a), a), state.acc_grads)
        return updates, state._replace(acc_grads=acc)

    return optax.GradientTransformation(multi.init, update)


def window_grads(opt_state: Any, grads: Any) -> Any:
    """The gradient of the accumulation window once ``grads`` joins it (before ``update``).

    With ``grad_accum = k`` (a ``MultiSteps`` state holding the running mean ``acc`` of the window's
    first ``n`` micro-batch gradients) this is ``acc + (grads - acc) / (n + 1)``; at the window's last
    micro-batch it is the gradient the optimizer applies. Without accumulation it is ``grads``.
    """
    if not isinstance(opt_state, optax.MultiStepsState):
        return grads
    n = opt_state.mini_step.astype(jnp.float32)
    return jax.tree.map(lambda a, g: a + (g - a) / (n + 1), opt_state.acc_grads, grads)
