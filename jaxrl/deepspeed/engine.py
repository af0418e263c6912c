"""A DeepSpeed-style engine for any Flax NNX model: `jaxrl.initialize(model, optimizer, config)`.

The DeepSpeed loop::

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config="ds_config.json")
    for batch in loader:
        loss = engine(batch)            # forward on this rank's micro-batch
        engine.backward(loss)           # gradients, accumulated
        engine.step()                   # an optimizer update on every gradient_accumulation_steps-th call

becomes::

    engine = jaxrl.initialize(model=model, optimizer=optax.adam(1e-3), config="ds_config.json")
    for batch in loader:                # the global micro-batch: train_batch_size / gradient_accumulation_steps rows
        metrics = engine.step(loss_fn, batch)   # forward, backward, accumulate, update when due: one jitted call

`loss_fn(model, batch)` returns a scalar loss or `(loss, aux)`; the scalars of the dict `aux` come back
as metrics. The step is `jaxrl.train.step.train_step`'s: gradients in a `shard_map` over the data axes
with the ZeRO stage's collectives, `optax.MultiSteps` for accumulation, DeepSpeed's fp16 loss scaler.
The ZeRO layout comes from `generic_zero_layout`: at stage 3 every parameter is split over the
data-parallel devices on its largest dimension they divide.

Precision: fp16/bf16 in DeepSpeed turn the module itself to half precision, with fp32 master weights
in the optimizer. An arbitrary NNX module's dtype cannot be switched from outside, so the engine casts
instead: `loss_fn` receives a copy of the model whose floating-point variables are cast to the compute
dtype, and a micro-batch whose floating-point leaves are cast too (cast back inside `loss_fn` where a
value must stay fp32, e.g. regression targets). A layer that fixes its own `dtype` computes in it
regardless. The parameters the optimizer updates stay in their own (fp32) dtype; the loss is
taken to fp32 before scaling.

Scope: single-process (the micro-batch is a host array placed on the mesh); the step trains the
model's `nnx.Param`s, and other state (batch statistics, RNG counters) is read but not updated.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrl.deepspeed import config as deepspeed_config
from jaxrl.deepspeed.config import DeepSpeedConfig
from jaxrl.errors import JaxrlError
from jaxrl.parallel.mesh import make_mesh, settle
from jaxrl.parallel.sharding import DATA_AXES, data_parallel_size, generic_zero_layout
from jaxrl.precision import dtype_of, skipped_steps_of
from jaxrl.train.checkpoint import Checkpointer
from jaxrl.train.step import StateLayout, TrainState, train_step

log = logging.getLogger(__name__)

UserLossFn = Callable[[nnx.Module, Any], Any]  # (model, batch) -> loss | (loss, aux dict)
_MANY_LOSS_FNS = 8  # distinct loss functions after which a warning says each one compiles its own step


def _floating(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if _floating(x) else x, tree)


def _cast_model(model: nnx.Module, dtype) -> nnx.Module:
    """A copy of `model` with floating variables in `dtype`; gradients flow back through the cast."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, _cast_floats(state, dtype))


def trainer_loss(loss_fn: UserLossFn, compute_dtype=None):
    """`loss_fn` in the `(model, batch) -> (loss, metrics)` form `train_step` takes.

    Casts model and batch to `compute_dtype` (None: no cast), takes the loss to fp32, keeps the scalar
    entries of `aux` as metrics, and weights every device equally (`weight` 1, overridable from `aux`):
    the per-device means of a mean loss then average to the global mean, and the fp16 loss scale is
    not multiplied by the rows per device (which would overflow fp16 gradients).
    """

    def wrapped(model, batch):
        if compute_dtype is not None:
            model, batch = _cast_model(model, compute_dtype), _cast_floats(batch, compute_dtype)
        out = loss_fn(model, batch)
        if isinstance(out, tuple):
            if len(out) != 2 or not isinstance(out[1], Mapping):
                raise JaxrlError(f"loss_fn must return a loss or (loss, aux dict); got a tuple of {len(out)} "
                                 f"with {type(out[-1]).__name__} last")
            loss, aux = out
        else:
            loss, aux = out, {}
        loss = jnp.asarray(loss)
        if loss.ndim != 0:
            raise JaxrlError(f"loss_fn must return a scalar loss, got shape {loss.shape}; reduce it (e.g. .mean())")
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items() if jnp.ndim(v) == 0}
        metrics.setdefault("weight", jnp.ones((), jnp.float32))
        return loss.astype(jnp.float32), metrics

    return wrapped


class Engine:
    """A model, its optimizer and sharded state on a mesh, trained one micro-batch per `step` call.

    Attributes:
      config: the parsed DeepSpeed config (batch sizes resolved for this mesh).
      mesh: the ('data', 'fsdp', 'tensor') mesh; the batch is split over 'data' x 'fsdp'.
      state: the TrainState (parameters, optimizer state with loss scale and accumulator, micro-steps).
      micro_steps: `step` calls so far; global_steps: optimizer steps (micro_steps / accumulation).
    """

    def __init__(self, model: nnx.Module, optimizer: optax.GradientTransformation, config: DeepSpeedConfig, mesh):
        self.config, self.mesh = config, mesh
        self.optimizer = optimizer
        self.layout = generic_zero_layout(nnx.state(model), mesh, config.zero_stage)
        self.compute_dtype = None if config.compute == "fp32" else dtype_of(config.compute)
        # Where the state lives, for every loss: `step` adds one jitted step per loss_fn on this layout.
        self._states = StateLayout(model, optimizer, mesh=mesh, layout=self.layout)
        with jax.set_mesh(mesh):
            self.state: TrainState = self._states.init_state(model)
        self._steps: dict[Callable, Callable] = {}
        self.micro_steps = 0
        self._skipped = jnp.copy(skipped_steps_of(self.state.opt_state))  # the state is donated

    # --------------------------------------------------------------------------------------- training
    @property
    def model(self) -> nnx.Module:
        """The NNX module holding the current parameters (shares their buffers; stale after the next step)."""
        return self._states.model(self.state)

    @property
    def global_steps(self) -> int:
        return self.micro_steps // self.config.grad_accum

    @property
    def train_batch_size(self) -> int:
        return self.config.train_batch_size

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.config.grad_accum

    @property
    def micro_batch_size(self) -> int:
        """Rows each `step` call takes: the global micro-batch over all data-parallel devices."""
        return self.config.micro_batch

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the next `step` call ends an accumulation window (and so updates the parameters)."""
        return (self.micro_steps + 1) % self.config.grad_accum == 0

    def step(self, loss_fn: UserLossFn, batch) -> dict[str, jax.Array]:
        """Forward and backward on one global micro-batch; the optimizer update on every
        `gradient_accumulation_steps`-th call.

        The jitted step is built and compiled once per `loss_fn` object and reused on later calls with
        the same object: define `loss_fn` once, not as a new lambda per call (each new function object
        compiles a new step).

        Args:
          loss_fn: `(model, batch) -> loss` or `(loss, aux dict)`.
          batch: a pytree of arrays whose leading dimension is `micro_batch_size`.
        Returns:
          device scalars: `loss` (this micro-batch's), `grad_norm`, `loss_scale`, `skipped_steps`,
          `applied` (bool: the parameters changed on this call), and the scalars of `aux`.
        """
        self._check_batch(batch)
        step = self._step_for(loss_fn)
        with jax.set_mesh(self.mesh):
            self.state, metrics = settle(step(self.state, batch))
        self.micro_steps += 1
        metrics = dict(metrics)
        metrics.pop("weight", None)
        boundary = self.micro_steps % self.config.grad_accum == 0
        skipped = metrics["skipped_steps"]
        # An overflowing fp16 step (or a non-finite one) is skipped: it changes no parameter.
        metrics["applied"] = jnp.logical_and(boundary, skipped == self._skipped)
        self._skipped = skipped
        if boundary and self.global_steps % self.config.steps_per_print == 0:
            log.info("step %d: loss %.6g, loss scale %g, skipped %d", self.global_steps, float(metrics["loss"]),
                     float(metrics["loss_scale"]), int(skipped))
        return metrics

    def _step_for(self, loss_fn: UserLossFn) -> Callable:
        step = self._steps.get(loss_fn)
        if step is None:
            if len(self._steps) == _MANY_LOSS_FNS:
                warnings.warn(f"engine.step has seen {_MANY_LOSS_FNS + 1} different loss functions and compiled a "
                              f"step for each; pass the same function object to reuse its step", stacklevel=3)
            step = train_step(self._states, trainer_loss(loss_fn, self.compute_dtype))
            self._steps[loss_fn] = step
        return step

    def _check_batch(self, batch) -> None:
        rows = {getattr(x, "shape", (None,))[0] if getattr(x, "ndim", 0) else None for x in jax.tree.leaves(batch)}
        want = self.micro_batch_size
        if rows != {want}:
            c = self.config
            raise JaxrlError(
                f"engine.step takes the global micro-batch: {want} rows in every leaf (train_batch_size "
                f"{c.train_batch_size} / gradient_accumulation_steps {c.grad_accum} = train_micro_batch_size_per_gpu "
                f"{c.micro_batch_per_device} x {c.dp_size} data-parallel devices); got leading sizes "
                f"{sorted(rows, key=str)}")

    # ---------------------------------------------------------------------------------- checkpoints
    def save(self, directory: str | os.PathLike, client_state: Mapping[str, Any] | None = None) -> int:
        """Writes the whole state (parameters, optimizer state with loss scale and accumulator, steps)
        to `directory`, as step `micro_steps`; `client_state` (JSON) comes back from `load`.

        Returns:
          the step number saved under.
        """
        extra = {"micro_steps": self.micro_steps, "global_steps": self.global_steps,
                 "client_state": dict(client_state or {})}
        with Checkpointer(directory, keep=None, async_save=False) as ckpt:
            ckpt.save(self.micro_steps, self.state, extra)
        return self.micro_steps

    def load(self, directory: str | os.PathLike, step: int | None = None) -> dict:
        """Restores the state saved by `save` (the latest step unless `step`) onto this engine's mesh.

        Returns:
          the `client_state` given to `save`.
        """
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
        with Checkpointer(directory, keep=None, async_save=False) as ckpt:
            try:
                state, extra = ckpt.restore(step, target=target)
            except JaxrlError:
                raise
            except Exception as e:  # orbax's structure/shape mismatch errors
                raise JaxrlError(f"the checkpoint in {directory} does not fit this engine's model and optimizer "
                                 f"(same model, optimizer and config needed): {e}") from e
        self.state = state if isinstance(state, TrainState) else TrainState(**state)
        self.micro_steps = int(extra["micro_steps"])
        self._skipped = jnp.copy(skipped_steps_of(self.state.opt_state))  # the state is donated
        return dict(extra.get("client_state", {}))


def initialize(model: nnx.Module, optimizer: optax.GradientTransformation | None = None,
               config: Mapping | str | os.PathLike | None = None, *, mesh=None) -> Engine:
    """A DeepSpeed-style training engine for `model` over the current devices.

    Args:
      model: any Flax NNX module.
      optimizer: an optax GradientTransformation; None builds the config's `optimizer` and `scheduler`
        sections (Adam, AdamW, SGD; WarmupLR, WarmupDecayLR, WarmupCosineLR). Either way the engine adds
        `gradient_clipping`, fp16 loss scaling and gradient accumulation around it.
      config: a DeepSpeed config dict or JSON path (see `jaxrl.deepspeed.config` for the keys understood).
      mesh: a ready ('data', 'fsdp', 'tensor') mesh; default from the config's "mesh" key (ours), else
        every device on 'data'.
    Returns:
      the Engine; train with `engine.step(loss_fn, micro_batch)`.
    """
    if config is None:
        raise JaxrlError("jaxrl.initialize needs config=: a DeepSpeed config dict or the path of its JSON file")
    raw = deepspeed_config.load(config)
    if mesh is None:
        mesh = make_mesh(**deepspeed_config.mesh_sizes(raw))
    for axis in (*DATA_AXES, "tensor"):
        if axis not in mesh.shape:
            raise JaxrlError(f"the engine's mesh needs the axes data, fsdp and tensor (jaxrl.parallel.mesh.make_mesh); "
                             f"got {tuple(mesh.shape)}")
    ds = deepspeed_config.parse(raw, data_parallel_size(mesh))
    tx = deepspeed_config.make_optimizer(ds, optimizer)
    return Engine(model, tx, ds, mesh)
