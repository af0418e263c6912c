"""The one shared loop: resume, update, log, evaluate, checkpoint, stop cleanly, export.

Every algorithm plugs in an `update(state, step) -> (state, metrics)` (one optimizer step for SFT and
the reward model, one rollout + PPO epochs for step 3); the loop owns everything around it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Callable

import jax
import numpy as np

from jaxrl.config import save_yaml
from jaxrl.errors import JaxrlError
from jaxrl.train.checkpoint import Checkpointer
from jaxrl.train.metrics import MetricsWriter
from jaxrl.train.progress import Progress
from jaxrl.train.signals import StopSignal

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Loop:
    """What one run trains; the callables close over their models, data and config."""

    name: str  # 'sft', 'reward', 'ppo': the progress-bar label
    steps: int
    state: Any  # pytree of arrays, checkpointed whole
    update: Callable[[Any, int], tuple[Any, dict]]
    evaluate: Callable[[Any], dict] | None = None
    export: Callable[[Any, str], None] | None = None  # writes an HF directory
    data_state: Callable[[], dict] = dict  # iterator position (and RNG) to checkpoint
    restore_data: Callable[[dict], None] = lambda _: None
    show: tuple[str, ...] = ("loss",)  # metrics on the progress bar
    allow_nonfinite: bool = False  # fp16: the loss scaler skips overflowing steps instead
    config: Any = None  # the run's config, echoed to OUTPUT/config.yaml when the loop starts


@dataclasses.dataclass(frozen=True)
class Schedule:
    log_every: int
    eval_every: int  # 0: only at the end
    save_every: int  # 0: only at the end
    export_every: int  # 0: only at the end
    keep: int


def run(loop: Loop, schedule: Schedule, output: str) -> Any:
    """Trains `loop.state` to `loop.steps`, resuming from OUTPUT/checkpoints when it holds any.

    Returns the final state. SIGTERM/SIGINT save a checkpoint and raise `Interrupted`. Nothing is
    written under `output` before this call, so a run rejected while loading its inputs leaves none.
    """
    if loop.config is not None and jax.process_index() == 0:
        save_yaml(loop.config, os.path.join(output, "config.yaml"))
    ckpt = Checkpointer(os.path.join(output, "checkpoints"), keep=schedule.keep)
    metrics = MetricsWriter(output)
    state, start = _resume(loop, ckpt, metrics)
    progress = Progress(loop.steps, initial=start, log_every=schedule.log_every, show=loop.show,
                        desc=loop.name)
    try:
        with StopSignal() as stop:
            for step in range(start + 1, loop.steps + 1):
                state, m = loop.update(state, step)
                m = jax.device_get(m)
                _check_finite(m, step, loop)
                progress.update(step, m)
                if step % schedule.log_every == 0 or step == loop.steps:
                    metrics.write(step, m)
                if loop.evaluate and _due(step, schedule.eval_every, loop.steps):
                    metrics.write(step, {f"eval/{k}": v for k, v in loop.evaluate(state).items()})
                # Decided on every process's flag: a scheduler may signal only some hosts, and the
                # save below is collective.
                stopping = stop.requested_anywhere()
                if _due(step, schedule.save_every, loop.steps) or stopping:
                    ckpt.save(step, state, {"step": step, "data": loop.data_state()})
                if loop.export and schedule.export_every and step % schedule.export_every == 0 \
                        and step != loop.steps:
                    loop.export(state, os.path.join(output, f"hf-step{step}"))
                if stopping:
                    ckpt.wait()
                    raise Interrupted(f"{loop.name}: {stop.requested or 'a stop signal on another process'} "
                                      f"received; checkpoint saved at step {step} "
                                      f"in {output}/checkpoints; run the same command again to resume")
        ckpt.wait()
        if loop.export:
            loop.export(state, os.path.join(output, "hf"))
        metrics.plot()
    finally:
        progress.close()
        metrics.close()
        ckpt.close()
    return state


class Interrupted(JaxrlError):
    """The run stopped on a signal after saving a checkpoint."""


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _resume(loop: Loop, ckpt: Checkpointer, metrics: MetricsWriter):
    latest = ckpt.latest_step()
    if latest is None:
        metrics.truncate_after(-1)  # a fresh run in an old directory starts a fresh log
        return loop.state, 0
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), loop.state)
    state, extra = ckpt.restore(latest, target=target)
    loop.restore_data(extra.get("data", {}))
    metrics.truncate_after(latest)
    log.info("%s: resumed from the checkpoint at step %d", loop.name, latest)
    if latest > loop.steps:
        raise JaxrlError(f"{loop.name}: the checkpoint in {ckpt} is at step {latest}, past train.steps="
                         f"{loop.steps}; raise train.steps or use a new --output")
    return state, latest


def _check_finite(m: dict, step: int, loop: Loop) -> None:
    loss = m.get("loss")
    if loss is None or math.isfinite(float(np.asarray(loss))):
        return
    if loop.allow_nonfinite:
        return  # fp16: the loss scaler skipped this step and lowered the scale
    raise JaxrlError(
        f"{loop.name}: the loss became non-finite ({float(loss)}) at step {step}; the update was skipped and "
        "the run stopped. Lower optim.lr, raise optim.warmup_steps or keep optim.clip_norm > 0, and resume "
        "from the last checkpoint")
