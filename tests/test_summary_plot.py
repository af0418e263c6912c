"""`summary.png` (jaxrl.train.summary_plot) drawn from hand-made metrics rows, for PPO and for GRPO, through
the pipeline's own `_plot` on a pipeline directory; what it sums by hand."""

import json
import os

import numpy as np
import pytest
from matplotlib.image import imread

from jaxrl.commands import pipeline
from jaxrl.train import summary_plot


def _rows(steps, **curves):
    """One metrics row per step with each curve's value at it (a callable of the step)."""
    return [{"step": s, **{k.replace("__", "/"): f(s) for k, f in curves.items()}} for s in steps]


RL = dict(loss=lambda s: 1.0 / s, reward__score=lambda s: 0.01 * s, kl=lambda s: 0.001 * s,
          time__generation=lambda s: 1.0, time__reward=lambda s: 0.5, time__experience=lambda s: 0.5,
          time__train=lambda s: 2.0)


def _pipeline_dir(root, algorithm):
    """A pipeline directory as `jaxrl pipeline algorithm=<algorithm>` leaves it: each step's metrics.jsonl
    (with an eval row) and summary.json."""
    dirs = {i: os.path.join(root, d.format(algorithm=algorithm)) for i, d in pipeline.STEP_DIRS.items()}
    runs = {1: _rows(range(10, 101, 10), loss=lambda s: 2.0 - s / 100),
            3: _rows(range(5, 51, 5), **RL) + [{"step": 50, "eval/task_accuracy": 0.4}]}
    if algorithm == "ppo":
        runs[2] = _rows(range(10, 101, 10), loss=lambda s: 0.7 - s / 500, accuracy=lambda s: 0.5 + s / 400)
    for i, rows in runs.items():
        os.makedirs(dirs[i])
        with open(os.path.join(dirs[i], "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    summary = {"sft": {"task_accuracy": 0.2}, algorithm: {"task_accuracy_before": 0.2, "task_accuracy_after": 0.4,
                                                           "kl": 0.05}}
    if algorithm == "ppo":
        summary["reward"] = {"pairwise_accuracy": 0.75}
    return dirs, summary


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_pipeline_writes_a_readable_summary_png(tmp_path, algorithm):
    dirs, summary = _pipeline_dir(str(tmp_path), algorithm)
    pipeline._plot(str(tmp_path), summary, dirs, algorithm)
    path = tmp_path / "summary.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(str(path))
    assert pixels.shape[:2] == (900, 1170) and pixels.std() > 0.01
    assert not os.path.exists(f"{path}.tmp")


def test_the_page_has_every_panel_and_the_time_split_is_summed():
    """The figure holds a panel per figure the issue lists, each with data drawn (no reward-model panel
    without a reward model); the time split sums the logged steps' timers (10 logged steps: by hand)."""
    rl = _rows(range(5, 51, 5), **RL)
    assert summary_plot.time_split(rl) == {"generation": 10.0, "reward scoring": 5.0, "experience": 5.0,
                                           "training": 20.0}
    runs = {"sft": _rows(range(1, 4), loss=lambda s: 1.0), "reward": _rows(range(1, 4), loss=lambda s: 0.5,
                                                                          accuracy=lambda s: 0.6),
            "ppo": rl + [{"step": 50, "eval/task_accuracy": 0.4}]}
    summary = {"ppo": {"task_accuracy_before": 0.2, "task_accuracy_after": 0.4}}
    fig = summary_plot.summary_figure(summary, runs, "ppo")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:8] == ["step 1 SFT: loss", "step 2 reward model: loss", "step 3 ppo: loss",
                          "step 2 reward model: pairwise accuracy", "step 3 ppo: reward (rollouts)",
                          "step 3 ppo: KL to the reference", "held-out task accuracy",
                          "step 3 time split (logged steps)"]
    assert all(ax.lines for ax in fig.axes[:7])  # a curve in every panel
    np.testing.assert_allclose(fig.axes[5].lines[0].get_ydata(), [0.001 * s for s in range(5, 51, 5)])
    shares = sorted(round(p.get_width(), 6) for p in fig.axes[7].patches)
    assert shares == [0.125, 0.125, 0.25, 0.5]
    grpo = summary_plot.summary_figure({}, {"grpo": rl}, "grpo")
    assert not grpo.axes[1].lines and not grpo.axes[3].lines and grpo.axes[1].texts  # "no reward model"
