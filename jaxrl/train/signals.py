"""SIGTERM/SIGINT as a request to stop, so the loop can save a checkpoint and exit cleanly.

Inside `with StopSignal() as stop:` the first SIGTERM (a preempted VM, a cluster scheduler) or SIGINT
(Ctrl-C) only records its name in `stop.requested`; the loop checks it after each step, saves and
leaves. A second signal goes to the handler that was there before, so a second Ctrl-C still
interrupts at once when the save itself hangs.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence

import numpy as np


class StopSignal:
    """Context manager that turns SIGTERM/SIGINT into a flag and restores the old handlers on exit."""

    def __init__(self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested: str | None = None  # the first signal's name, e.g. "SIGTERM"
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopSignal:
        # Python only lets the main thread install handlers; elsewhere (a loop in a worker thread)
        # signals keep their old meaning and `requested` stays None.
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            return
        previous = self._previous.get(signal.Signals(signum), signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            # Re-deliver with the default action (terminate) now that the user insisted.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def requested_anywhere(self) -> bool:
        """Whether any process got a stop signal; a collective, so every process must call it together.

        A scheduler may signal only some hosts, but a checkpoint save needs all of them: deciding on
        the gathered flag keeps the processes in step.
        """
        import jax

        local = self.requested is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(local))))
