"""Reward functions: the built-ins on hand-written cases; the worker pool with functions that raise, hang,
die, return NaN, the wrong length or non-numbers; weights; specs that do not exist."""

import logging
import os
import time

import numpy as np
import pytest
from reward_fixtures import length

from jaxrl.config import from_dict
from jaxrl.data.synthetic import check
from jaxrl.errors import JaxrlError
from jaxrl.rewards import (RewardFunctionsConfig, RewardRunner, combine, exact_match, extract_answer,
                           load_function, math_answer, parse_number, synthetic_task)
from jaxrl.rewards.runner import needed_fields

# ------------------------------------------------------------------------------------------- built-ins
EXTRACT = [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{3}{4}} and later \\boxed{x^{2}+1}", "x^{2}+1"),  # the last box, nested braces
    ("first \\boxed{1}, final \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("#### 1 \n#### $1,234.", "$1,234."),
    ("I think 3 apples plus 4 is 7.", "7"),
    ("costs $1,250 in total", "1,250"),
    ("it drops to \u22125 degrees", "-5"),
    ("half: 3/4 of it", "3/4"),
    ("no digits here", None),
    ("\\boxed{unclosed", None),  # an unbalanced box is no answer (and no number follows)
]


@pytest.mark.parametrize("text, want", EXTRACT)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize("text, want", [
    ("72", 72.0), ("$1,234.50.", 1234.5), ("\\$5", 5.0), ("-3/4", -0.75), ("\\frac{3}{4}", 0.75),
    ("-\\dfrac{1}{8}", -0.125), ("1,000,000", 1e6), (" 0.5 ", 0.5), ("12 apples", None), ("x", None),
    ("1/0", None), ("10\\text{ cm}", 10.0),
])
def test_parse_number(text, want):
    assert parse_number(text) == want


MATH = [  # completion, answer, reward
    ("... so she has \\boxed{72} clips", "72", 1.0),
    ("#### 1,000", "1000", 1.0),
    ("The total is $18.", "18", 1.0),
    ("The total is 18.0", "#### 18", 1.0),  # a GSM8K reference reduced to its final answer
    ("she ends with -4 apples", "-4", 1.0),
    ("\\boxed{\\frac{3}{4}}", "0.75", 1.0),
    ("3/4 of the cake", "3/4", 1.0),
    ("\\boxed{72}", "73", 0.0),
    ("I computed 72, not 27", "72", 0.0),  # the last number counts
    ("no answer", "5", 0.0),
    ("\\boxed{x+1}", "x+1", 1.0),  # a symbolic reference is compared as a string
]


def test_math_answer_table():
    completions, answers, want = zip(*MATH)
    assert math_answer(["q"] * len(MATH), list(completions), answer=list(answers)) == list(want)


def test_exact_match_and_synthetic_checker():
    assert exact_match(["q"] * 3, [" 82\n", "82.", "82"], answer=["82", "82", 82]) == [1.0, 0.0, 1.0]
    prompts, completions = ["37+45=", "37+45=", "9+1=", "2+2="], ["82", "83", "10<eos><pad>", " 4 "]
    got = synthetic_task(prompts, completions, answer=[None] * 4)  # extra row fields are ignored
    assert got == [1.0, 0.0, 1.0, 1.0] == [float(check(p, c)) for p, c in zip(prompts, completions)]


# -------------------------------------------------------------------------------------------- loading
def test_specs_that_do_not_exist_name_the_spec():
    with pytest.raises(JaxrlError, match="'no_such_module_xyz:f'.*cannot import module 'no_such_module_xyz'"):
        load_function("no_such_module_xyz:f")
    with pytest.raises(JaxrlError, match="'reward_fixtures:missing'.*no function 'missing'"):
        load_function("reward_fixtures:missing")
    with pytest.raises(JaxrlError, match="no function 'NOT_CALLABLE'"):
        load_function("reward_fixtures:NOT_CALLABLE")
    assert load_function("math_answer") is math_answer
    assert load_function("jaxrl.rewards:exact_match") is exact_match


def test_config_errors_name_the_key():
    with pytest.raises(JaxrlError, match=r"reward\.functions\[0\] must be 'package.module:function'"):
        from_dict(RewardFunctionsConfig, {"functions": ["no_colon"]}, "reward")
    with pytest.raises(JaxrlError, match=r"reward\.weights has 1 entries for 2 functions"):
        from_dict(RewardFunctionsConfig, {"functions": ["math_answer", "exact_match"], "weights": [1.0]}, "reward")
    with pytest.raises(JaxrlError, match=r"reward\.timeout_s must be > 0"):
        from_dict(RewardFunctionsConfig, {"timeout_s": 0}, "reward")
    with pytest.raises(JaxrlError, match="reward.functions is empty"):
        RewardRunner(RewardFunctionsConfig())


def test_runner_with_a_missing_function_fails_at_start_naming_it():
    cfg = RewardFunctionsConfig(functions=("math_answer", "reward_fixtures:missing"), workers=1)
    with pytest.raises(JaxrlError, match="'reward_fixtures:missing'"):
        RewardRunner(cfg)


# ------------------------------------------------------------------------------------------ the pool
PROMPTS = ["p0", "p1", "p2"]
COMPLETIONS = ["a", "bb", "\\boxed{3}"]
ROWS = [{"prompt": "p0", "answer": "1"}, {"prompt": "p1", "answer": "2"}, {"prompt": "p2", "answer": "3"}]
ON_ERROR = -1.0
# spec -> (weight, expected rewards, rows that failed)
FUNCTIONS = {
    "reward_fixtures:length": (1.0, [1, 2, 9], 0),
    "reward_fixtures:echo_answer": (0.5, [1, 2, 3], 0),  # row fields arrive as keyword lists
    "reward_fixtures:raises": (1.0, [ON_ERROR] * 3, 3),
    "reward_fixtures:hangs": (1.0, [ON_ERROR] * 3, 3),
    "reward_fixtures:nan_first": (1.0, [ON_ERROR, 1, 1], 1),
    "reward_fixtures:wrong_length": (1.0, [ON_ERROR] * 3, 3),
    "reward_fixtures:bad_entries": (1.0, [ON_ERROR, ON_ERROR, 2], 2),
    "reward_fixtures:not_a_list": (1.0, [ON_ERROR] * 3, 3),
    "reward_fixtures:exits": (1.0, [ON_ERROR] * 3, 3),
    "math_answer": (2.0, [0, 0, 1], 0),
}


@pytest.fixture(scope="module")
def runner():
    cfg = RewardFunctionsConfig(functions=tuple(FUNCTIONS), weights=tuple(w for w, _, _ in FUNCTIONS.values()),
                                timeout_s=1.0, on_error=ON_ERROR, workers=3)
    with RewardRunner(cfg) as r:
        yield r


def test_failing_functions_give_on_error_and_the_run_goes_on(runner, caplog):
    want = sum(w * np.array(v, float) for w, v, _ in FUNCTIONS.values())
    for attempt in range(2):  # the second batch runs on the replaced workers
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="jaxrl.rewards"):
            start = time.perf_counter()
            pending = runner.submit(PROMPTS, COMPLETIONS, ROWS, extra_terms=[("reward_model", [0.5, 0.0, -1.0], 2.0)])
            submitted = time.perf_counter() - start
            total, metrics = pending.result()
        assert submitted < 0.5 <= time.perf_counter() - start  # submit does not wait for the 1 s timeout
        np.testing.assert_allclose(total, want + 2.0 * np.array([0.5, 0.0, -1.0]))
        for spec, (_, values, errors) in FUNCTIONS.items():
            name = spec.rpartition(":")[2]
            assert metrics[f"reward/{name}/errors"] == errors, name
            assert metrics[f"reward/{name}/mean"] == pytest.approx(np.mean(values))
            logged = [r.getMessage() for r in caplog.records if f"reward function {name} " in r.getMessage()]
            assert len(logged) == (1 if errors else 0), (name, logged)
        assert 1.0 <= metrics["reward/hangs/time_s"] < 5.0
        assert metrics["reward/reward_model/mean"] == pytest.approx(-0.5 / 3)
        assert metrics["reward/total"] == pytest.approx(total.mean())
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "RuntimeError: boom" in messages and "timed out after 1 s" in messages and "died" in messages
    assert "returned 1 values for 3 completions" in messages and "returned float" in messages


def test_needed_row_fields_are_read_from_signatures_and_checked(runner):
    """A function's required parameters after (prompts, completions) are the row fields it needs; a data
    source or batch without one is a JaxrlError naming the function, the field and the source."""
    def fn(prompts, completions, answer, *rest, level, unit="m", **_):
        return []

    assert needed_fields(fn) == ("answer", "level") and needed_fields(length) == ()
    assert runner.needs["math_answer"] == ("answer",) and runner.needs["reward_fixtures:length"] == ()
    assert runner.missing_fields(["answer", "id"]) == []
    with pytest.raises(JaxrlError, match=r"reward function echo_answer needs the row field 'answer'; reward "
                                         r"function math_answer needs the row field 'answer', but the rows of "
                                         r"data.path=q\.jsonl have no such column \(their fields: id\)"):
        runner.check_fields(["id"], "data.path=q.jsonl")
    with pytest.raises(JaxrlError, match="the rows of this reward batch have no such column"):
        runner.submit(PROMPTS, COMPLETIONS, [{"prompt": p} for p in PROMPTS])
    total, _ = runner(PROMPTS, COMPLETIONS, ROWS)  # the runner still scores the next batch
    assert total.shape == (3,)


def test_a_timed_out_worker_is_killed():
    cfg = RewardFunctionsConfig(functions=("reward_fixtures:pid", "reward_fixtures:hangs"), timeout_s=0.5,
                                workers=1)
    with RewardRunner(cfg) as r:
        before, _ = r(["p"], ["c"])  # pid first, then hangs on the same worker
        after, _ = r(["p"], ["c"])
    old, new = int(before[0]), int(after[0])
    assert old != new  # the pid function ran on a fresh worker
    with pytest.raises(ProcessLookupError):
        os.kill(old, 0)


def test_combine_weights_reward_model_scores():
    total, metrics = combine([("rm", [1.0, 2.0], 0.5), ("f", [1.0, 0.0], 2.0)])
    np.testing.assert_allclose(total, [2.5, 1.0])
    assert metrics == {"reward/rm/mean": 1.5, "reward/f/mean": 0.5}
    with pytest.raises(JaxrlError, match="'rm' has non-finite"):
        combine([("rm", [float("nan")], 1.0)])
