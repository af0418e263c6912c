"""`summary.png`: one page beside `jaxrl pipeline`'s summary.json that a person reads at a glance.

Panels: each step's training loss; the reward model's pairwise accuracy (PPO's step 2); step 3's reward,
KL and held-out task accuracy over its steps; and where step 3's time went (generation, reward scoring,
experience, training). The page is drawn from the steps' metrics.jsonl rows and summary.json alone, so it
can be redrawn for any finished (or partly finished) pipeline directory.
"""

from __future__ import annotations

import math
import os

# step 3's timers (`time/<name>` in its metrics), in the order a step runs them
TIME_PARTS = (("generation", "generation"), ("reward", "reward scoring"), ("experience", "experience"),
              ("train", "training"))


def _series(rows: list[dict], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of metric `name` in the rows that hold it as a finite number."""
    pairs = [(r["step"], float(r[name])) for r in rows
             if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _curve(ax, rows: list[dict], names: tuple[str, ...], title: str) -> None:
    """One line per metric of `names` present in `rows`; a note when none is."""
    drawn = False
    for name in names:
        steps, values = _series(rows, name)
        if steps:
            ax.plot(steps, values, marker="." if len(steps) < 40 else None, label=name)
            drawn = True
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    if drawn and len(names) > 1:
        ax.legend(fontsize=7)
    if not drawn:
        _note(ax, "not logged")


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4")


def time_split(rows: list[dict]) -> dict[str, float]:
    """Seconds per part of step 3 (`TIME_PARTS`) summed over the logged steps (a step's timers are logged
    with its row, so this is the split of the logged steps, a sample of the run)."""
    out = {}
    for key, label in TIME_PARTS:
        values = _series(rows, f"time/{key}")[1]
        if values:
            out[label] = sum(values)
    return out


def _task_accuracy(ax, rows: list[dict], section: dict) -> None:
    """Held-out task accuracy over step 3: the SFT model's at step 0, the run's evaluations, the final model's
    (summary.json's figures are measured on pipeline.eval_prompts prompts; the evaluations on ppo.eval_prompts)."""
    steps, values = _series(rows, "eval/task_accuracy")
    if steps:
        ax.plot(steps, values, marker="o", label="step 3 evaluations")
    last = max((r["step"] for r in rows), default=1)
    before, after = section.get("task_accuracy_before"), section.get("task_accuracy_after")
    if before is not None and after is not None:
        ax.plot([0, last], [before, after], "s--", color="C3", label="summary: before -> after")
        ax.annotate(f"{before:.3f}", (0, before), fontsize=7, xytext=(3, -10), textcoords="offset points")
        ax.annotate(f"{after:.3f}", (last, after), fontsize=7, xytext=(-25, 5), textcoords="offset points")
    ax.set_title("held-out task accuracy", fontsize=10)
    ax.set_xlabel("step 3 step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    if steps or before is not None:
        ax.legend(fontsize=7)
    else:
        _note(ax, "not measured (not the synthetic task)")


def _time_bar(ax, rows: list[dict]) -> None:
    split = time_split(rows)
    total = sum(split.values())
    ax.set_title("step 3 time split (logged steps)", fontsize=10)
    if not total:
        _note(ax, "not logged")
        ax.set_axis_off()
        return
    left = 0.0
    for i, (label, seconds) in enumerate(split.items()):
        share = seconds / total
        ax.barh([0], [share], left=left, color=f"C{i}", label=f"{label} {100 * share:.0f}%")
        left += share
    ax.set_xlim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel(f"share of {total:.1f} s", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=2)


def _text(ax, summary: dict) -> None:
    lines = []
    for section, figures in summary.items():
        if not isinstance(figures, dict):
            continue
        lines.append(section)
        for key, value in figures.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"  {key}: {shown}")
    ax.set_axis_off()
    ax.text(0.0, 1.0, "\n".join(lines) or "summary.json is empty", va="top", ha="left", family="monospace",
            fontsize=7, transform=ax.transAxes)
    ax.set_title("summary.json", fontsize=10)


def summary_figure(summary: dict, runs: dict[str, list[dict]], algorithm: str):
    """The page as a matplotlib Figure.

    Args:
      summary: summary.json's contents (sections `sft`, `reward`, and one named `algorithm`).
      runs: the metrics.jsonl rows of each step that ran, under `sft`, `reward` and `algorithm` (missing
        steps are left empty on the page).
      algorithm: step 3's algorithm (ppo, dpo, grpo, ...).
    """
    # Figure + Agg canvas directly, not pyplot: no global backend switch, no figure registry to leak.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sft, reward, rl = runs.get("sft", []), runs.get("reward", []), runs.get(algorithm, [])
    fig = Figure(figsize=(13, 10), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 3)
    _curve(axes[0, 0], sft, ("loss",), "step 1 SFT: loss")
    if algorithm == "ppo":
        _curve(axes[0, 1], reward, ("loss",), "step 2 reward model: loss")
        _curve(axes[1, 0], reward, ("accuracy", "eval/accuracy"), "step 2 reward model: pairwise accuracy")
    else:
        for ax in (axes[0, 1], axes[1, 0]):
            ax.set_axis_off()
            _note(ax, f"no reward model (algorithm={algorithm})")
    _curve(axes[0, 2], rl, ("loss",), f"step 3 {algorithm}: loss")
    if algorithm == "dpo":  # DPO's step 3 has no rollouts: its pair metrics stand in for reward and KL
        _curve(axes[1, 1], rl, ("rewards/margin", "eval/rewards/margin"), "step 3 dpo: implicit reward margin")
        _curve(axes[1, 2], rl, ("rewards/accuracy", "eval/rewards/accuracy"), "step 3 dpo: implicit reward accuracy")
    else:
        _curve(axes[1, 1], rl, ("reward/score",), f"step 3 {algorithm}: reward (rollouts)")
        _curve(axes[1, 2], rl, ("kl",), f"step 3 {algorithm}: KL to the reference")
    _task_accuracy(axes[2, 0], rl, summary.get(algorithm, {}))
    _time_bar(axes[2, 1], rl)
    _text(axes[2, 2], {k: v for k, v in summary.items() if k in ("sft", "reward", algorithm)})
    fig.suptitle(f"jaxrl pipeline, algorithm={algorithm}", fontsize=12)
    fig.tight_layout()
    return fig


def write_summary_png(path: str, summary: dict, runs: dict[str, list[dict]], algorithm: str) -> str:
    """Draws `summary_figure` into `path` (written whole or not at all); returns `path`."""
    tmp = f"{path}.tmp"
    summary_figure(summary, runs, algorithm).savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
