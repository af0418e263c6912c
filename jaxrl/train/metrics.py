"""The one metrics writer: `OUTPUT/metrics.jsonl`, TensorBoard scalars and PNG curves.

Every algorithm logs through `MetricsWriter`, so every run leaves the same three records:

- `metrics.jsonl`: one JSON object per `write` call, `{"step": N, "<name>": value, ...}`, flushed at
  once so a killed run keeps every line it logged;
- TensorBoard event files (through tensorboardX, no TensorFlow) in `OUTPUT/tensorboard/`;
- `OUTPUT/plots/<name>.png`, one curve per metric, drawn by `plot()` at the end of a run.

Only process 0 writes (`enabled`), so a multi-host run has one record, not one per host.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jaxrl.errors import JaxrlError
from jaxrl.io import atomic_write

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends metrics to `OUTPUT/metrics.jsonl` and TensorBoard; draws PNG curves on request.

    The writer appends: a resumed run first calls `truncate_after(resume_step)` so that lines logged
    after the checkpoint it resumes from (and then logged again) are not duplicated.
    """

    def __init__(self, output_dir: str | os.PathLike, *, enabled: bool | None = None, tensorboard: bool = True):
        """Args:
        output_dir: the run's output directory; created if missing.
        enabled: whether this process writes anything; `None` means "only process 0". It is resolved
          here rather than as a default argument so that importing this module does not start jax.
        tensorboard: also write TensorBoard scalars under `output_dir/tensorboard`.
        """
        self.output_dir = os.fspath(output_dir)
        self.path = os.path.join(self.output_dir, METRICS_FILE)
        self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
        self._tensorboard = tensorboard
        self._file = None
        self._tb = None
        if self.enabled:
            os.makedirs(self.output_dir, exist_ok=True)
            self._open()

    def _open(self, purge_step: int | None = None) -> None:
        self._file = open(self.path, "a", encoding="utf-8")
        if self._tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it

            # purge_step makes TensorBoard hide events at or after it from earlier (killed) runs.
            self._tb = SummaryWriter(os.path.join(self.output_dir, "tensorboard"), purge_step=purge_step)

    def _close_handles(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs one step: appends `{"step": step, **metrics}` as one line and flushes it.

        Args:
          step: the optimizer step the metrics belong to.
          metrics: name -> scalar (Python, numpy or jax). Names keep their slashes (`reward/mean`).
        """
        if not self.enabled:
            return
        if self._file is None:
            raise JaxrlError(f"metrics writer for {self.path} is closed; create a new MetricsWriter")
        record = {"step": int(step)}
        for name, value in metrics.items():
            if name == "step":
                raise ValueError("'step' is reserved in metrics.jsonl; pass the step as write(step, ...)")
            record[name] = _to_scalar(name, value)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in record.items():
                if name != "step":
                    self._tb.add_scalar(name, value, global_step=record["step"])

    def truncate_after(self, step: int) -> None:
        """Drops every logged line with a step greater than `step` (call it when resuming from `step`).

        A partial last line, left by a run killed mid-write, is dropped too. The file is replaced
        atomically, so a kill during truncation leaves either the old or the new file.
        """
        if not self.enabled:
            return
        self._close_handles()
        kept = [r for r in _read_records(self.path, missing_ok=True) if r["step"] <= step]
        with atomic_write(self.path) as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._open(purge_step=step + 1)

    def plot(self, names: Iterable[str] | None = None) -> list[str]:
        """Draws one PNG curve per metric into `OUTPUT/plots/<name>.png` (`/` in names becomes `_`).

        Args:
          names: the metrics to draw; `None` draws every metric in `metrics.jsonl`.

        Returns:
          The paths written (empty off process 0).
        """
        if not self.enabled:
            return []
        if self._file is not None:
            self._file.flush()
        # The file, not memory, is the source, so a resumed run's plot covers the whole run.
        records = _read_records(self.path, missing_ok=True)
        if names is None:
            names = sorted({k for r in records for k in r if k != "step"})
        plot_dir = os.path.join(self.output_dir, "plots")
        os.makedirs(plot_dir, exist_ok=True)
        return [_plot_one(records, name, plot_dir) for name in names]

    def close(self) -> None:
        """Flushes and closes the JSONL file and the TensorBoard writer."""
        self._close_handles()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Reads a metrics file (or a run directory holding `metrics.jsonl`) into a list of dicts.

    A partial last line (a run killed mid-write) is skipped; any other malformed line is an error.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    return _read_records(path, missing_ok=False)


def _read_records(path: str, *, missing_ok: bool) -> list[dict]:
    if not os.path.exists(path):
        if missing_ok:
            return []
        raise JaxrlError(f"no metrics file at {path}; pass a run's output directory or its metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    # A complete file ends with "\n", so the last piece is "" or a line cut short by a kill: skip it.
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise JaxrlError(f"{path}:{number} is not a JSON object ({e}); fix or delete that line") from e
        if not isinstance(record, dict) or "step" not in record:
            raise JaxrlError(f"{path}:{number} has no 'step'; every metrics line needs one")
        records.append(record)
    return records


def _to_scalar(name: str, value: Any) -> int | float | bool:
    """Python scalar from a Python, numpy or (replicated) jax scalar."""
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric {name!r} has shape {array.shape}; metrics must be scalars")
    scalar = array.reshape(()).item()
    if not isinstance(scalar, (bool, int, float)):
        raise ValueError(f"metric {name!r} is a {type(scalar).__name__}; metrics must be numbers")
    return scalar


def _plot_one(records: list[dict], name: str, plot_dir: str) -> str:
    # Figure + Agg canvas directly, not pyplot: no global backend switch, no figure registry to leak.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
    points = [(s, v) for s, v in points if math.isfinite(v)]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.set_title(name)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = os.path.join(plot_dir, name.replace("/", "_") + ".png")
    fig.savefig(path)
    return path
