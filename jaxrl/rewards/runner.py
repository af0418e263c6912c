"""Reward functions run in worker processes, with a per-batch timeout and per-row error isolation.

A reward function is named by a spec `"package.module:function"` and called as

    function(prompts: list[str], completions: list[str], **row_fields) -> list[float]

with every other field of the batch's rows (e.g. `answer`) as a list aligned with the completions. It runs
in a worker process, never in the training process: a JAX process is multithreaded, so the workers come
from the `forkserver` context (a small single-threaded server forks them; `spawn` where there is none),
never from a fork of the trainer. One worker per function by default, so the functions of a batch run in
parallel, and `submit` returns at once so the trainer can keep the accelerator busy meanwhile.

Nothing a function does can stop or corrupt the run. If it raises, runs past `timeout_s` (its worker is
killed and replaced), kills its worker, returns something that is not a list of the batch's length, or
returns an entry that is not a real number or not finite, the rows concerned get `on_error`; the failure
is counted per function in the metrics (`reward/<name>/errors`) and logged with the function's name.

As always with the `forkserver` and `spawn` start methods, the workers import the program's main module
(as `__mp_main__`): a script that builds a RewardRunner keeps its work under `if __name__ == "__main__":`
(the `jaxrl` command does). A call's timeout counts from its dispatch to a ready worker; a worker's
start-up and the import of the functions are not part of it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from jaxrl.errors import JaxrlError
from jaxrl.rewards.config import BUILTINS, RewardFunctionsConfig

log = logging.getLogger("jaxrl.rewards")
STARTUP_S = 120.0  # how long a worker may take to start and import the functions


# ---------------------------------------------------------------------------------------------------
# Loading specs (in the workers; `check_specs` runs it in one worker before training starts)


def resolve_spec(spec: str) -> str:
    """A built-in's short name -> its full spec; anything else unchanged."""
    return BUILTINS.get(spec, spec)


def load_function(spec: str):
    """The callable named by `spec` ("package.module:function" or a built-in's name).

    Raises:
      JaxrlError naming the spec when it is malformed, its module cannot be imported, or it has no such
      callable.
    """
    full = resolve_spec(spec)
    module_name, sep, attr = full.partition(":")
    if not sep or not module_name or not attr:
        raise JaxrlError(f"reward function {spec!r} is not 'package.module:function' "
                         f"(or a built-in: {', '.join(BUILTINS)})")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module itself failing at import
        raise JaxrlError(f"reward function {spec!r}: cannot import module {module_name!r} "
                         f"({type(e).__name__}: {e}); check the name and that it is on PYTHONPATH") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise JaxrlError(f"reward function {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


def needed_fields(fn) -> tuple[str, ...]:
    """The row fields `fn` cannot run without: its parameters after (prompts, completions) that have no
    default and are not *args/**kwargs (`math_answer(prompts, completions, answer, **_)` -> ("answer",))."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a callable without a signature: nothing declared
        return ()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in params[2:] if p.kind in named and p.default is inspect.Parameter.empty)


# ---------------------------------------------------------------------------------------------------
# The worker process


def _entry(x):
    """A returned entry as a float, or a short description of why it is not a real number."""
    if isinstance(x, (bool, int, float, np.integer, np.floating, np.bool_)):
        return float(x)
    return f"an entry of type {type(x).__name__}"


def _worker_main(conn, sys_path: list[str], specs: tuple[str, ...]) -> None:
    """Imports every function, says ("ready", {spec: needed fields}) (or ("error", why)), then serves
    (spec, prompts, completions, fields) requests until the pipe closes or None arrives."""
    sys.path[:] = sys_path  # the trainer's import path when the worker started (forkserver's may be older)
    try:
        functions = {spec: load_function(spec) for spec in specs}
        conn.send(("ready", {spec: needed_fields(fn) for spec, fn in functions.items()}))
    except JaxrlError as e:
        conn.send(("error", str(e)))
        return
    except Exception as e:
        conn.send(("error", f"loading the reward functions failed: {type(e).__name__}: {e}"))
        return
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the trainer is gone
        if request is None:
            return
        spec, prompts, completions, fields = request
        try:
            out = functions[spec](prompts, completions, **fields)
            if isinstance(out, (str, bytes, Mapping)) or not hasattr(out, "__len__"):
                reply = ("bad", f"returned {type(out).__name__}, not a list of floats")
            else:
                reply = ("ok", [_entry(x) for x in out])
        except Exception as e:  # the function's own failure: report it, keep serving
            reply = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")
        try:
            conn.send(reply)
        except Exception as e:  # e.g. an unpicklable entry slipped through
            conn.send(("error", f"its result could not be sent back ({type(e).__name__}: {e})"))


class _Worker:
    """One worker process and its pipe. It is `starting` until its ("ready", needs) arrives: a call's
    timeout never includes a worker's start-up or the import of the functions."""

    def __init__(self, ctx, specs: tuple[str, ...], startup_s: float):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, list(sys.path), specs), daemon=True,
                                   name="jaxrl-reward-worker")
        self.process.start()
        child.close()
        self.ready_by = time.perf_counter() + startup_s
        self.needs: dict[str, tuple[str, ...]] = {}  # spec -> the row fields it needs (`needed_fields`)

    def started(self) -> str | None:
        """Reads the start-up message: None when ready, else why the worker could not start."""
        try:
            status, message = self.conn.recv()
        except (EOFError, OSError):
            return "the worker process died while starting"
        if status != "ready":
            return message
        self.needs = message
        return None

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


def _context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


# ---------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class _Call:
    index: int  # which function
    worker: _Worker | None = None
    deadline: float = 0.0
    started: float = 0.0


class PendingRewards:
    """One batch being scored; `result()` waits for it (at most about timeout_s per function)."""

    def __init__(self, runner: "RewardRunner", request: tuple, batch: int, extra_terms):
        self._runner, self._request, self._batch, self._extra = runner, request, batch, extra_terms
        self._queue = list(range(len(runner.specs)))
        self._running: list[_Call] = []
        self._results: dict[int, tuple] = {}
        self._dispatch()

    def _dispatch(self) -> None:
        while self._queue and self._runner._idle:
            call = _Call(self._queue.pop(0), self._runner._idle.pop())
            spec = self._runner.specs[call.index]
            call.started = time.perf_counter()
            call.deadline = call.started + self._runner.config.timeout_s
            try:
                call.worker.conn.send((spec,) + self._request)
            except OSError:  # the idle worker died since its last call: replace it, try again
                self._runner._replace(call.worker)
                self._queue.insert(0, call.index)
                continue
            self._running.append(call)

    def result(self) -> tuple[np.ndarray, dict[str, float]]:
        """(B,) combined rewards (float64) and the metrics: per function `reward/<name>/mean`, `/errors`
        (rows that got on_error), `/time_s`; `reward/<term>/mean` for each extra term; `reward/total`."""
        runner = self._runner
        while self._running or self._queue:
            if not self._running and not runner._starting:  # no worker left to run the rest
                for index in self._queue:
                    self._results[index] = (("error", "no reward worker could be started"), 0.0)
                self._queue = []
                break
            deadlines = [c.deadline for c in self._running] + [w.ready_by for w in runner._starting]
            wait = max(0.0, min(deadlines) - time.perf_counter())
            conns = [c.worker.conn for c in self._running] + [w.conn for w in runner._starting]
            ready = multiprocessing.connection.wait(conns, timeout=wait)
            now = time.perf_counter()
            for call in list(self._running):
                if call.worker.conn in ready:
                    try:
                        reply = call.worker.conn.recv()
                        runner._idle.append(call.worker)
                    except (EOFError, OSError):  # the function took its worker down (os._exit, a crash)
                        reply = ("error", "its worker process died")
                        runner._replace(call.worker)
                elif now >= call.deadline:
                    reply = ("error", f"timed out after {runner.config.timeout_s:g} s; its worker was replaced")
                    runner._replace(call.worker)
                else:
                    continue
                self._results[call.index] = (reply, now - call.started)
                self._running.remove(call)
            for worker in list(runner._starting):
                if worker.conn in ready or now >= worker.ready_by:
                    runner._started(worker, worker.started() if worker.conn in ready else "start-up timed out")
            self._dispatch()
        runner._pending = None
        return runner._finish(self._results, self._batch, self._extra)


class RewardRunner:
    """A pool of reward workers for the functions of a `RewardFunctionsConfig`.

    Usage:
        with RewardRunner(cfg) as rewards:          # starts the workers, checks every spec loads
            pending = rewards.submit(prompts, completions, rows)
            ...                                     # the trainer's own work
            scores, metrics = pending.result()

    Args:
      config: the functions, weights, timeout, on_error value and worker count.
    Raises:
      JaxrlError naming the spec when a function cannot be loaded.
    """

    def __init__(self, config: RewardFunctionsConfig):
        if not config.functions:
            raise JaxrlError("reward.functions is empty: name at least one 'package.module:function'")
        self.config = config
        self.specs = tuple(config.functions)
        self.weights = config.weights or (1.0,) * len(self.specs)
        self.names = _names(self.specs)
        self._ctx = _context()
        n = config.workers or min(len(self.specs), os.cpu_count() or 1)
        self._starting = [self._new_worker() for _ in range(n)]
        self._idle: list[_Worker] = []
        self._pending: PendingRewards | None = None
        try:
            for worker in list(self._starting):  # every spec loads, or a clear error before training starts
                ok = worker.conn.poll(max(0.0, worker.ready_by - time.perf_counter()))
                problem = worker.started() if ok else f"starting took longer than {STARTUP_S:g} s"
                if problem is not None:
                    raise JaxrlError(problem)
                self._starting.remove(worker)
                self._idle.append(worker)
                self.needs = worker.needs
        except BaseException:
            self.close()
            raise

    def missing_fields(self, fields: Iterable[str]) -> list[tuple[str, str]]:
        """(function name, field) for every field a function needs (`needed_fields`) not in `fields`."""
        have = set(fields)
        return [(name, f) for spec, name in zip(self.specs, self.names) for f in self.needs.get(spec, ())
                if f not in have]

    def check_fields(self, fields: Iterable[str], source: str) -> None:
        """Raises a JaxrlError naming each function, the field it needs and `source` (the data files)
        when the rows of `source`, which have `fields`, lack a field some function needs."""
        missing = self.missing_fields(fields)
        if missing:
            what = "; ".join(f"reward function {name} needs the row field {field!r}" for name, field in missing)
            have = ", ".join(sorted(set(fields))) or "none"
            raise JaxrlError(f"{what}, but the rows of {source} have no such column (their fields: {have}); "
                             "add the column to the data or drop the function from reward.functions")

    def _new_worker(self) -> _Worker:
        return _Worker(self._ctx, tuple(dict.fromkeys(self.specs)), STARTUP_S)

    def _started(self, worker: _Worker, problem: str | None) -> None:
        """A replacement worker finished starting: idle if it is ready, else dropped from the pool."""
        self._starting.remove(worker)
        if problem is None:
            self._idle.append(worker)
        else:
            log.warning("a replacement reward worker could not start (%s); the pool has one worker less", problem)
            worker.kill()

    def submit(self, prompts: Sequence[str], completions: Sequence[str], rows: Sequence[Mapping] = (),
               extra_terms: Sequence[tuple[str, Sequence[float], float]] = ()) -> PendingRewards:
        """Starts scoring one batch and returns at once.

        Args:
          prompts, completions: B strings each.
          rows: B dicts (the dataset rows): every key but `prompt` is passed as a keyword argument holding
            the B values (None where a row lacks the key). Empty: no extra fields.
          extra_terms: (name, B scores, weight) terms added to the total, e.g. a learned reward model's
            scores `("reward_model", scores, 0.5)`.
        """
        if self._pending is not None:
            raise RuntimeError("RewardRunner.submit: the previous batch's result() was not collected")
        b = len(completions)
        if len(prompts) != b or (rows and len(rows) != b):
            raise JaxrlError(f"reward batch has {len(prompts)} prompts, {b} completions and {len(rows)} rows; "
                             "pass one of each per sample")
        keys = dict.fromkeys(k for row in rows for k in row if k != "prompt")
        self.check_fields(keys, "this reward batch")
        fields = {k: [row.get(k) for row in rows] for k in keys}
        self._pending = PendingRewards(self, (list(prompts), list(completions), fields), b, extra_terms)
        return self._pending

    def __call__(self, prompts, completions, rows=(), extra_terms=()):
        """`submit(...).result()`."""
        return self.submit(prompts, completions, rows, extra_terms).result()

    def _replace(self, worker: _Worker) -> None:
        """Kills a hung or dead worker and starts another (it joins the idle ones once it is ready)."""
        worker.kill()
        self._starting.append(self._new_worker())

    def _finish(self, results, batch, extra_terms):
        on_error = self.config.on_error
        total = np.zeros(batch, np.float64)
        metrics = {}
        for i, (spec, name, weight) in enumerate(zip(self.specs, self.names, self.weights)):
            (status, payload), seconds = results[i]
            values, errors, reason = _validate(status, payload, batch, on_error)
            if errors:
                log.warning("reward function %s (%s): %d of %d rows got reward.on_error=%g: %s",
                            name, spec, errors, batch, on_error, reason)
            total += weight * values
            metrics.update({f"reward/{name}/mean": float(values.mean()) if batch else 0.0,
                            f"reward/{name}/errors": float(errors), f"reward/{name}/time_s": seconds})
        if extra_terms:
            terms, extra = combine([(name, scores, weight) for name, scores, weight in extra_terms])
            total += terms
            metrics.update(extra)
        metrics["reward/total"] = float(total.mean()) if batch else 0.0
        return total, metrics

    def close(self) -> None:
        """Stops the workers (also on leaving a `with` block)."""
        for worker in self._idle + self._starting:
            worker.stop()
        if self._pending is not None:
            for call in self._pending._running:
                call.worker.kill()
        self._idle, self._starting, self._pending = [], [], None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _validate(status: str, payload, batch: int, on_error: float) -> tuple[np.ndarray, int, str]:
    """A function's reply -> (B,) values with on_error where invalid, how many rows failed, and why."""
    if status != "ok":
        return np.full(batch, on_error), batch, payload
    if len(payload) != batch:
        return np.full(batch, on_error), batch, f"returned {len(payload)} values for {batch} completions"
    bad = [i for i, x in enumerate(payload) if isinstance(x, str) or not math.isfinite(x)]
    values = np.array([on_error if isinstance(x, str) else x for x in payload], np.float64)
    values[bad] = on_error  # also the non-finite ones
    reason = ""
    if bad:
        first = payload[bad[0]]
        reason = f"row {bad[0]} is {first if isinstance(first, str) else repr(first)} (not a finite number)"
    return values, len(bad), reason


def combine(terms: Sequence[tuple[str, Sequence[float], float]]) -> tuple[np.ndarray, dict[str, float]]:
    """sum_k weight_k * scores_k over (name, scores (B,), weight) terms, and `reward/<name>/mean` each.

    For scores computed in the trainer (a learned reward model's), which must already be finite.
    """
    arrays = [np.asarray(s, np.float64) for _, s, _ in terms]
    if len({a.shape for a in arrays}) > 1:
        raise JaxrlError(f"reward terms have different shapes {[a.shape for a in arrays]}; one score per sample")
    for (name, _, _), a in zip(terms, arrays):
        if not np.all(np.isfinite(a)):
            raise JaxrlError(f"reward term {name!r} has non-finite scores")
    total = sum(w * a for (_, _, w), a in zip(terms, arrays))
    return total, {f"reward/{name}/mean": float(a.mean()) for (name, _, _), a in zip(terms, arrays)}


def _names(specs: Sequence[str]) -> list[str]:
    """Metric names: the function's name, or the full spec where two functions share a name."""
    short = [resolve_spec(s).rpartition(":")[2] for s in specs]
    names = [n if short.count(n) == 1 else resolve_spec(s) for n, s in zip(short, specs)]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]  # the same spec twice
