"""The typed `reward` block for Python reward functions (step 3 with `algorithm=grpo` and kin).

Kept here rather than in `jaxrl.config` because `reward` there is step 2's section (the reward model's
`margin`); the wiring of step 3 embeds this dataclass (its fields are the `reward.*` keys below) and
`jaxrl.config.from_dict` reads it like any section, errors naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import math

# Short names of the built-in reward functions -> their specs.
BUILTINS = {
    "math_answer": "jaxrl.rewards.builtin:math_answer",
    "exact_match": "jaxrl.rewards.builtin:exact_match",
    "synthetic_task": "jaxrl.rewards.builtin:synthetic_task",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardFunctionsConfig:
    """Python reward functions: `fn(prompts, completions, **row_fields) -> list[float]`, run in workers."""

    # Specs "package.module:function" (or a built-in: math_answer, exact_match, synthetic_task).
    functions: tuple[str, ...] = ()
    # One weight per function (the reward is sum_i weight_i * f_i); empty: all 1.
    weights: tuple[float, ...] = ()
    # Seconds one function may take on one batch; past it its rows get on_error and its worker is replaced.
    timeout_s: float = 30.0
    # The reward given to rows a function failed on (raised, timed out, bad or non-finite value).
    on_error: float = 0.0
    # Worker processes; 0: one per function (up to the CPU count), so a batch's functions run in parallel.
    workers: int = 0

    def __post_init__(self):
        # Imported here: jaxrl.config pulls in JAX, and the reward workers import this module.
        from jaxrl.config import _check

        for i, spec in enumerate(self.functions):
            module, sep, name = BUILTINS.get(spec, spec).partition(":")
            _check(bool(sep and module and name), f"functions[{i}]",
                   f"must be 'package.module:function' or one of {', '.join(BUILTINS)}; got {spec!r}")
        _check(not self.weights or len(self.weights) == len(self.functions), "weights",
               f"has {len(self.weights)} entries for {len(self.functions)} functions: give one per function "
               "or none (all 1)")
        _check(all(math.isfinite(w) for w in self.weights), "weights", f"must be finite, got {self.weights}")
        _check(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
        _check(math.isfinite(self.on_error), "on_error", f"must be a finite number, got {self.on_error}")
        _check(self.workers >= 0, "workers", f"must be >= 0 (0: one per function), got {self.workers}")
