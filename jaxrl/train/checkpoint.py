"""The one checkpoint module: orbax `CheckpointManager` with two items per step.

Each step directory holds
- `state`: a pytree of (possibly sharded) jax arrays, e.g. `{"model": nnx.state(model), "opt": ...}`,
  saved and restored shard by shard with `StandardSave` / `StandardRestore`;
- `extra`: a small JSON object (data iterator position, RNG key as a list, loss scale, config echo)
  that lets a resumed run continue exactly where the saved one stopped.

Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it only once every process has
finished, so a step directory that exists under its final name is complete; a save killed half-way
leaves a temporary directory that `latest_step()` never reports. All processes call `save` and
`restore`; orbax coordinates them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp

from jaxrl.errors import JaxrlError

# What orbax/tensorstore say when a step's item or array files are gone or shorter than recorded.
_DAMAGED = re.compile(r"NOT_FOUND|OUT_OF_RANGE|DATA_LOSS|does not exist|was not found|No such file")


class Checkpointer:
    """Saves and restores `(state pytree, extra JSON)` per step, keeping the last `keep` steps."""

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3, async_save: bool = True):
        """Args:
        directory: where step directories go; created if missing.
        keep: how many of the latest steps to keep; `None` keeps all.
        async_save: write in a background thread after the arrays are copied off the devices, so
          training continues during the write; `wait()` blocks until it is on disk.
        """
        if keep is not None and keep < 1:
            raise JaxrlError(f"checkpoint keep={keep} must be at least 1 (or None to keep every step)")
        # Orbax needs an absolute path: every process must name the same directory.
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extra"))

    def save(self, step: int, state_pytree: Any, extra: Mapping[str, Any] | None = None) -> bool:
        """Starts saving `state_pytree` and `extra` as `step` (asynchronously when `async_save`).

        Args:
          step: the optimizer step; a step at or before the latest saved one is skipped.
          state_pytree: a pytree of jax arrays (sharded or not); leaves must not be donated before the
            copy off the device finishes, which `save` waits for before returning.
          extra: JSON-serialisable values; numpy scalars and arrays are converted to lists/numbers.

        Returns:
          Whether a save was started.
        """
        extra = _to_json(extra or {})
        args = ocp.args.Composite(state=ocp.args.StandardSave(state_pytree), extra=ocp.args.JsonSave(extra))
        return self._manager.save(int(step), args=args)

    def latest_step(self) -> int | None:
        """The newest finalised step, or `None` when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every finalised step, oldest first."""
        return sorted(self._manager.all_steps())

    def restore(self, step: int | None = None, target: Any = None) -> tuple[Any, dict]:
        """Restores `(state, extra)` of `step` (default: the latest).

        Args:
          step: which step; `None` means `latest_step()`.
          target: the state's abstract pytree, leaves `jax.ShapeDtypeStruct(shape, dtype,
            sharding=...)` (e.g. `jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
            sharding=x.sharding), state)`); arrays are read straight into those shardings, each
            device loading only its shards. `None` restores with the shardings recorded at save time,
            which only works on the same device set.

        Returns:
          `(state, extra)`.
        """
        available = self.all_steps()
        if step is None:
            if not available:
                raise JaxrlError(f"no checkpoint in {self.directory}; train first or point to another directory")
            step = available[-1]
        elif step not in available:
            raise JaxrlError(
                f"no checkpoint for step {step} in {self.directory}; available steps: {available or 'none'}"
            )
        state_args = ocp.args.StandardRestore() if target is None else ocp.args.StandardRestore(target)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=state_args, extra=ocp.args.JsonRestore())
            )
        except (KeyError, OSError, ValueError) as e:
            if isinstance(e, ValueError) and not _DAMAGED.search(str(e)):
                raise  # not a damaged file: e.g. a target whose shapes differ from the saved ones
            raise JaxrlError(self._damaged(step, available, e)) from None
        return restored.state, dict(restored.extra)

    def _damaged(self, step: int, available: list[int], error: BaseException) -> str:
        """The error for a finalised step whose files have gone missing or been cut short since."""
        step_dir = os.path.join(self.directory, str(step))
        earlier = [s for s in available if s < step]
        detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        resume = (f"delete {step_dir} to resume from step {earlier[-1]}, the previous checkpoint"
                  if earlier else f"delete {step_dir} to start from step 0")
        return (f"checkpoint step {step} in {step_dir} is corrupt or incomplete (a file is missing or "
                f"truncated: {detail}); {resume}, or start afresh with a new --output")

    def wait(self) -> None:
        """Blocks until any save in progress is finalised on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes any save in progress and releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _to_json(extra: Mapping[str, Any]) -> dict:
    """`extra` as plain JSON types; a value JSON cannot hold is named in the error."""

    def convert(value):
        if hasattr(value, "tolist"):  # numpy/jax scalars and arrays, e.g. an RNG key's data
            return value.tolist()
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    try:
        return json.loads(json.dumps(dict(extra), default=convert))
    except (TypeError, ValueError) as e:
        raise JaxrlError(f"checkpoint extra {sorted(extra)} cannot be saved as JSON: {e}") from e
