"""Reward functions for tests/test_rewards.py, imported by name in the reward worker processes."""

import os
import time


def length(prompts, completions, **_):
    return [len(c) for c in completions]


def constant(prompts, completions, **_):
    return [1.0] * len(completions)


def echo_answer(prompts, completions, answer, **_):
    return [float(a) for a in answer]


def raises(prompts, completions, **_):
    raise RuntimeError("boom")


def hangs(prompts, completions, **_):
    time.sleep(600)
    return [1.0] * len(completions)


def nan_first(prompts, completions, **_):
    return [float("nan")] + [1.0] * (len(completions) - 1)


def wrong_length(prompts, completions, **_):
    return [1.0]


def bad_entries(prompts, completions, **_):
    return ["x", None] + [2.0] * (len(completions) - 2)


def not_a_list(prompts, completions, **_):
    return 3.0


def exits(prompts, completions, **_):
    os._exit(3)


def pid(prompts, completions, **_):
    return [float(os.getpid())] * len(completions)


NOT_CALLABLE = 1.0
