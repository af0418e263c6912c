"""A thin progress display: a tqdm bar on a terminal, plain log lines everywhere else.

On a TTY the bar shows rate, ETA and a few metrics as its postfix. In a log file (a cluster job,
`nohup`, CI) a redrawn bar is noise, so every `log_every` steps one line goes out instead:
`step 20/100 loss=0.6931 (3.21 it/s, eta 00:25)`. Only process 0 shows anything.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm


class Progress:
    """Progress of a loop over steps `initial+1 .. total`, as a bar or as periodic log lines."""

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        log_every: int = 10,
        show: Sequence[str] | None = None,
        desc: str | None = None,
        enabled: bool | None = None,
        bar: bool | None = None,
        stream: TextIO | None = None,
    ):
        """Args:
        total: the last step.
        initial: the step the loop starts after (the resumed step), so rate and ETA count only
          steps run now.
        log_every: steps between plain log lines (no effect on the bar).
        show: metric names to display; `None` shows every metric passed to `update`.
        desc: a label in front of the bar / lines, e.g. "sft".
        enabled: whether anything is shown; `None` means "only on process 0".
        bar: force the bar on (True) or off (False); `None` uses it only when `stream` is a TTY.
        stream: where to write; default stderr.
        """
        if enabled is None:
            import jax

            enabled = jax.process_index() == 0
        self.total = int(total)
        self.initial = int(initial)
        self.log_every = max(1, int(log_every))
        self.show = None if show is None else tuple(show)
        self.desc = desc
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.step = self.initial
        self._metrics: dict[str, Any] = {}
        self._start = time.perf_counter()
        use_bar = _isatty(self.stream) if bar is None else bar
        self._bar = None
        if enabled and use_bar:
            self._bar = tqdm(total=self.total, initial=self.initial, desc=desc, file=self.stream, dynamic_ncols=True)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Records that `step` is done, with optional metrics to display (they stay until replaced).

        Metrics may be jax arrays; they are read only when shown, so pass them at log steps to
        avoid waiting on the device every step.
        """
        if not self.enabled:
            return
        previous, self.step = self.step, int(step)
        if metrics is not None:
            self._metrics = dict(metrics)
        if self._bar is not None:
            if metrics is not None:
                self._bar.set_postfix_str(self._format_metrics(), refresh=False)
            self._bar.update(self.step - previous)
        elif self.step % self.log_every == 0 or self.step == self.total:
            print(self.format_line(), file=self.stream, flush=True)

    def format_line(self) -> str:
        """The plain log line for the current step."""
        elapsed = time.perf_counter() - self._start
        done = self.step - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = tqdm.format_interval((self.total - self.step) / rate) if rate > 0 else "?"
        parts = [f"{self.desc}:"] if self.desc else []
        parts.append(f"step {self.step}/{self.total}")
        if self._metrics:
            parts.append(self._format_metrics())
        parts.append(f"({rate:.3g} it/s, eta {eta})")
        return " ".join(parts)

    def _format_metrics(self) -> str:
        names = self._metrics if self.show is None else [n for n in self.show if n in self._metrics]
        return " ".join(f"{name}={_format_value(self._metrics[name])}" for name in names)

    def close(self) -> None:
        """Closes the bar (a no-op for plain lines)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _format_value(value: Any) -> str:
    array = np.asarray(value)
    if array.size != 1:
        return f"<{array.shape}>"
    scalar = array.reshape(()).item()
    if isinstance(scalar, float):
        return f"{scalar:.4g}"
    return str(scalar)
