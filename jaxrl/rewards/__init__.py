"""Rewards computed by code: built-in functions, spec loading, and the worker pool that runs them.

`jaxrl.rewards.math_answer`, `jaxrl.rewards.exact_match` and `jaxrl.rewards.synthetic_task` are the
built-ins (also addressable by those short names in `reward.functions`). Exports are imported lazily so
that a reward worker process, which imports this package, starts without JAX.
"""

_EXPORTS = {
    "math_answer": "jaxrl.rewards.builtin",
    "exact_match": "jaxrl.rewards.builtin",
    "synthetic_task": "jaxrl.rewards.builtin",
    "extract_answer": "jaxrl.rewards.builtin",
    "parse_number": "jaxrl.rewards.builtin",
    "BUILTINS": "jaxrl.rewards.config",
    "RewardFunctionsConfig": "jaxrl.rewards.config",
    "RewardRunner": "jaxrl.rewards.runner",
    "PendingRewards": "jaxrl.rewards.runner",
    "combine": "jaxrl.rewards.runner",
    "load_function": "jaxrl.rewards.runner",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxrl.rewards' has no attribute {name!r}")
