"""The one way the tests check recompilation: count, by function name, what jax compiles in a block.

    with compiles() as counts:
        generate(...)
    assert counts["prefill"] == 1

jax lowers and compiles a jitted function once per key of argument shapes, dtypes, shardings and static
arguments; with `jax_log_compiles` on it logs each such compilation ("Compiling jit(<name>) ..."), and that
log is what is counted. Nothing in jaxrl keeps a counter for the tests, and a new entry in a jit's dispatch
cache that reuses a compiled program (e.g. for an argument committed to its devices) is not a recompile.
"""

from __future__ import annotations

import collections
import contextlib
import logging

import jax

_LOG = logging.getLogger("jax._src.interpreters.pxla")  # where jax logs each lowering to compile


class _Counter(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.counts: collections.Counter = collections.Counter()

    def emit(self, record):
        if record.msg.startswith("Compiling ") and record.args:
            self.counts[_name(str(record.args[0]))] += 1


def _name(module: str) -> str:
    """The function's name in its compiled module's name: 'jit(step)' (or 'jit_step' in older jax) -> 'step'."""
    if module.startswith("jit(") and module.endswith(")"):
        return module[4:-1]
    return module.removeprefix("jit_")


@contextlib.contextmanager
def compiles():
    """Yields a Counter {function name: compilations inside the block}, filled as the block runs."""
    counter = _Counter()
    _LOG.addHandler(counter)
    try:
        with jax.log_compiles(True):
            yield counter.counts
    finally:
        _LOG.removeHandler(counter)
