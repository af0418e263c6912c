"""The one metrics writer: `OUTPUT/metrics.jsonl`, TensorBoard scalars and PNG curves.

Every algorithm logs through `MetricsWriter`, so every run leaves the same three records:

- `metrics.jsonl`: one JSON object per `write` call, `{"step": N, "<name>": value, ...}`, flushed at
  once so a killed run keeps every line it logged;
- TensorBoard event files (through tensorboardX, no TensorFlow) in `OUTPUT/tensorboard/`;
- `OUTPUT/plots/<name>.png`, one curve per metric, drawn by `plot()` at the end of a run.

Every JSON file is strict JSON (RFC 8259), which `jq`, JavaScript's `JSON.parse` and most readers
other than Python's require: a non-finite value (the NaN `grad_norm` of an fp16 step the loss scaler
skipped, an infinite loss) is written as `null`, through `strict_json`. The skip itself stays visible
as the `skipped_steps` counter the step logs; TensorBoard gets no point for that step and the PNG
curve a gap there.

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
        self._file.write(strict_json(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in record.items():
                # A non-finite value is a missing point: TensorBoard gets nothing for this step, not a NaN.
                if name != "step" and math.isfinite(value):
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
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            # strict_json also turns the NaN of a file written before this writer was strict into null.
            f.writelines(strict_json(r) + "\n" for r in kept)
        os.replace(tmp, self.path)
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


def strict_json(data: Any, **kwargs) -> str:
    """`json.dumps(data, **kwargs)` as strict JSON: every non-finite float (NaN, +-inf) becomes `null`.

    Python's `json` writes NaN and Infinity by default, which RFC 8259 does not allow. Floats are
    sanitised recursively through dicts, lists and tuples (numpy floats included); the dump then runs
    with `allow_nan=False`, so a non-finite value that escaped sanitising raises instead of being written.

    Args:
      data: JSON-ready data (dicts with string keys, lists, tuples, numbers, strings, bools, None).
      kwargs: passed on to `json.dumps` (`indent`, `sort_keys`, ...).
    Returns:
      The JSON text.
    """
    return json.dumps(_finite_or_none(data), allow_nan=False, **kwargs)


def _finite_or_none(data: Any) -> Any:
    if isinstance(data, (float, np.floating)):
        return float(data) if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {k: _finite_or_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite_or_none(v) for v in data]
    return data


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


def _curve(records: list[dict], name: str) -> tuple[list[int], list[float]]:
    """The steps and values of metric `name` to draw, NaN where the value is missing.

    A line that holds `name` as null (or, in a file from before strict JSON, NaN or an infinity)
    gives NaN at its step: a gap in the curve, not a point and not a line drawn across the skipped
    step. Lines without `name` at all (an eval line among train lines) are not part of the curve.
    """
    steps, values = [], []
    for r in records:
        if name not in r:
            continue
        value = r[name]
        steps.append(r["step"])
        values.append(float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan)
    return steps, values


def _plot_one(records: list[dict], name: str, plot_dir: str) -> str:
    path = os.path.join(plot_dir, name.replace("/", "_") + ".png")
    _figure(records, name).savefig(path)
    return path


def _figure(records: list[dict], name: str):
    """The matplotlib Figure of one metric's curve."""
    # Figure + Agg canvas directly, not pyplot: no global backend switch, no figure registry to leak.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, values = _curve(records, name)
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if steps:
        # matplotlib draws no marker at a NaN and breaks the line there: a missing step is a gap.
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.set_title(name)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig
