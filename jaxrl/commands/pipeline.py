"""`jaxrl pipeline`: SFT -> reward model -> PPO, each step's output feeding the next (DeepSpeed-Chat's
e2e_rlhf.py), resumable at any point; writes OUTPUT/summary.json and, beside it, the one-page
OUTPUT/summary.png (`jaxrl.train.summary_plot`). With `algorithm=dpo`, SFT -> DPO on the preference
pairs (no reward model: step 2 is not run).

Layout: OUTPUT/step1_sft, OUTPUT/step2_reward, OUTPUT/step3_<algorithm> (each a normal run directory with
its hf/ export), OUTPUT/data (the synthetic dataset, when used). A finished step leaves `done.json` and is
skipped on a rerun; an interrupted one resumes from its checkpoints.

With `algorithm=` one of the GRPO family (grpo, dapo, rloo, ...), step 3 runs that algorithm in
OUTPUT/step3_<algorithm> with `reward.functions` as its reward (the embedded default: the synthetic
task's checker) and `pipeline.grpo` as its overrides; there is no step 2, and summary.json's step-3
section is named after the algorithm, with the keys of "ppo".
"""

from __future__ import annotations

import json
import math
import os

STEP_DIRS = {1: "step1_sft", 2: "step2_reward", 3: "step3_{algorithm}"}


def add_arguments(parser) -> None:
    from jaxrl.commands.train import add_arguments as common

    common(parser)
    parser.add_argument("--steps", default="1,2,3", help="which steps to run, e.g. 2,3 (default: 1,2,3; algorithm=dpo has no step 2)")


def run(args) -> int:
    from jaxrl.commands.train import load_run_config

    steps = parse_steps(args.steps)  # every argument is checked before anything is written
    if args.config is None:  # the embedded default: tiny model, synthetic task, CPU
        args.config = default_config()
    cfg = load_run_config(args)
    from jaxrl.train.metrics import strict_json

    summary = run_pipeline(cfg, steps)
    print(strict_json(summary, indent=2))
    return 0


def default_config() -> str:
    """configs/tiny.yaml: shipped inside the package as jaxrl.configs, or read from the source tree when
    the package runs from it (an editable install maps no `jaxrl.configs`)."""
    from importlib import resources

    try:
        return str(resources.files("jaxrl.configs").joinpath("tiny.yaml"))
    except ModuleNotFoundError:
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return os.path.join(repo, "configs", "tiny.yaml")


def parse_steps(text: str) -> tuple[int, ...]:
    from jaxrl.errors import JaxrlError

    try:
        steps = tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    except ValueError:
        steps = ()
    if not steps or not set(steps) <= {1, 2, 3}:
        raise JaxrlError(f"--steps {text!r}: give a comma-separated subset of 1,2,3 (e.g. --steps 2,3)")
    return steps


def run_pipeline(cfg, steps=(1, 2, 3)) -> dict:
    """Runs the chosen steps; a later step reads the earlier steps' exports, which must exist."""
    import jax

    from jaxrl.config import apply_overrides, save_yaml
    from jaxrl.steps import reward, sft

    out = cfg.output
    trains_reward_model = cfg.algorithm == "ppo"  # DPO and the GRPO family have no step 2
    if not trains_reward_model:
        steps = _without_reward_step(steps, cfg.algorithm)
    dirs = {i: os.path.join(out, d.format(algorithm=cfg.algorithm)) for i, d in STEP_DIRS.items()}
    shared = [f"data.cache_dir={cfg.data.cache_dir or os.path.join(out, 'data')}"]
    sft_hf, reward_hf = os.path.join(dirs[1], "hf"), os.path.join(dirs[2], "hf")
    p = cfg.pipeline
    # A step this run does not make must already be there, checked before anything is written.
    if 1 not in steps and {2, 3} & set(steps):
        _require(sft_hf, "step 1 (SFT)")
    if 2 not in steps and 3 in steps and trains_reward_model:
        _require(reward_hf, "step 2 (reward model)")
    summary = _read(os.path.join(out, "summary.json"))
    if jax.process_index() == 0:
        save_yaml(cfg, os.path.join(out, "config.yaml"))

    if 1 in steps:
        c1 = apply_overrides(cfg, shared + list(p.sft) + [f"output={dirs[1]}"])
        result = _step(dirs[1], lambda: sft.run(c1))
        summary["sft"] = {"eval_loss": result.get("loss"), **_task_accuracy(c1, sft_hf, "task_accuracy")}
        _write(out, summary)
    if 2 in steps:
        _require(sft_hf, "step 1 (SFT)")
        c2 = apply_overrides(cfg, shared + [f"model.path={sft_hf}"] + list(p.reward) + [f"output={dirs[2]}"])
        result = _step(dirs[2], lambda: reward.run(c2))
        summary["reward"] = {"pairwise_accuracy": result.get("accuracy"), "margin": result.get("margin")}
        _write(out, summary)
    if 3 in steps:
        _require(sft_hf, "step 1 (SFT)")
        summary[cfg.algorithm] = _step3(cfg, shared + [f"model.path={sft_hf}"], dirs[3], sft_hf, reward_hf)
        _write(out, summary)
    _plot(out, summary, dirs, cfg.algorithm)
    return summary


def _plot(out: str, summary: dict, dirs: dict[int, str], algorithm: str) -> None:
    """OUTPUT/summary.png from summary.json and the metrics of the steps whose directories hold them."""
    import jax

    from jaxrl.train.metrics import METRICS_FILE, read_metrics
    from jaxrl.train.summary_plot import write_summary_png

    if jax.process_index() != 0:
        return
    names = {1: "sft", 2: "reward", 3: algorithm}
    runs = {names[i]: read_metrics(d) for i, d in dirs.items() if os.path.exists(os.path.join(d, METRICS_FILE))}
    write_summary_png(os.path.join(out, "summary.png"), summary, runs, algorithm)


def _step3(cfg, shared: list[str], directory: str, sft_hf: str, reward_hf: str) -> dict:
    """Step 3 by `cfg.algorithm`, from the SFT model, with its `pipeline.<ppo|dpo|grpo>` overrides; returns
    its section of summary.json."""
    from jaxrl.config import apply_overrides
    from jaxrl.steps import dpo, grpo, ppo

    p, out = cfg.pipeline, [f"output={directory}"]
    if cfg.algorithm == "dpo":
        c3 = apply_overrides(cfg, shared + list(p.dpo) + out)
        return _dpo_summary(c3, sft_hf, directory, _step(directory, lambda: dpo.run(c3)))
    if cfg.algorithm == "ppo":
        _require(reward_hf, "step 2 (reward model)")
        c3 = apply_overrides(cfg, shared + [f"model.reward_path={reward_hf}"] + list(p.ppo) + out)
        _step(directory, lambda: ppo.run(c3))
        return _rl_summary(c3, directory, sft_hf, reward_hf)
    c3 = apply_overrides(cfg, shared + list(p.grpo) + out)  # the GRPO family: rewards by code
    _step(directory, lambda: grpo.run(c3))
    return _rl_summary(c3, directory, sft_hf)


def _rl_summary(cfg, directory: str, sft_hf: str, reward_hf: str | None = None) -> dict:
    """Step 3's section of summary.json for PPO and the GRPO family: task accuracy and reward before (the
    SFT model) and after, and `ppo_figures` of the run. The reward is the reward model's score (PPO) or
    the reward functions' total (the GRPO family)."""
    from jaxrl.train.metrics import read_metrics

    return {
        **_task_accuracy(cfg, sft_hf, "task_accuracy_before", reward_hf, "reward_before"),
        **_task_accuracy(cfg, os.path.join(directory, "hf"), "task_accuracy_after", reward_hf, "reward_after"),
        **ppo_figures(read_metrics(directory)),
    }


def ppo_figures(records: list[dict]) -> dict:
    """The PPO run's summary figures from its metrics.jsonl rows: the mean KL over the last fifth of its
    logged steps (where PPO ended up), and the first and last logged reward score.

    A value written as null (non-finite: strict JSON) or left out is missing, not zero: the mean is over
    the steps that have one, and a figure with none at all is None.
    """
    def values(name, rows):
        return [r[name] for r in rows if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]

    logged = [r for r in records if "kl" in r]  # PPO steps (eval rows carry no kl)
    tail = logged[-max(1, len(logged) // 5):]
    kl, scores = values("kl", tail), values("reward/score", logged)
    return {"kl": sum(kl) / len(kl) if kl else None,
            "reward_score_first": scores[0] if scores else None, "reward_score_last": scores[-1] if scores else None}


def _without_reward_step(steps: tuple[int, ...], algorithm: str) -> tuple[int, ...]:
    """DPO trains on the preference pairs directly and the GRPO family scores with reward functions: no
    reward model, so no step 2."""
    from jaxrl.errors import JaxrlError

    if steps == (2,):
        raise JaxrlError(f"--steps 2: algorithm={algorithm} trains no reward model; run --steps 1,3 (SFT, then "
                         f"{algorithm.upper()})")
    return tuple(s for s in steps if s != 2)


def _dpo_summary(cfg, sft_hf: str, directory: str, result: dict) -> dict:
    """Task accuracy of the SFT and the DPO model (the keys of "ppo"), and DPO's held-out pair metrics:
    its loss, implicit-reward accuracy and margin at the end, and the training margin first and last."""
    from jaxrl.train.metrics import read_metrics

    logged = [m for m in read_metrics(directory) if "rewards/margin" in m]
    tail = logged[-max(1, len(logged) // 5):]  # the last fifth of the run
    return {
        **_task_accuracy(cfg, sft_hf, "task_accuracy_before"),
        **_task_accuracy(cfg, os.path.join(directory, "hf"), "task_accuracy_after"),
        "eval_loss": result.get("loss"), "eval_reward_accuracy": result.get("rewards/accuracy"),
        "eval_reward_margin": result.get("rewards/margin"),
        "reward_margin_first": logged[0]["rewards/margin"],
        "reward_margin_last": sum(m["rewards/margin"] for m in tail) / len(tail),
    }


def _step(directory: str, fn) -> dict:
    """Runs a step unless its done.json says it finished; returns its final eval metrics."""
    done = os.path.join(directory, "done.json")
    if os.path.exists(done):
        return _read(done)
    result = fn() or {}
    _write_json(done, result)
    return result


def _task_accuracy(cfg, model_dir: str, key: str, reward_dir: str | None = None, reward_key: str = "") -> dict:
    """Checker accuracy of sampled answers to held-out prompts (synthetic task only) under `key` and, with
    `reward_dir`, the reward model's mean score of the same prompt + response sequences under `reward_key`
    (without one, and with `reward_key` and reward.functions: the functions' mean total reward)."""
    if cfg.data.paths != ("synthetic",):
        return {}
    import jax
    from jaxrl.data import synthetic
    from jaxrl.generation import generate
    from jaxrl.models.hf import load_pretrained
    from jaxrl.train.build import dataset_paths, load_tokenizer
    from jaxrl.train.rng import rng_stream

    (path,), _ = dataset_paths(cfg, "eval")
    with open(path) as f:
        prompts = [json.loads(line)["prompt"] for line in f][: cfg.pipeline.eval_prompts]
    tok = load_tokenizer(model_dir)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    with jax.default_device(jax.local_devices()[0]):  # each process on its own device, no collectives
        model = load_pretrained(model_dir)
        out = generate(model, ids, max_new_tokens=cfg.generation.max_new_tokens,
                       temperature=cfg.generation.temperature, top_p=cfg.generation.top_p,
                       top_k=cfg.generation.top_k, rng=rng_stream(cfg.seed, "summary"), batch_size=64)
        texts = [tok.decode(o, skip_special_tokens=True) for o in out]
        result = {key: synthetic.task_accuracy(prompts, texts)}
        if reward_dir is not None:
            result[reward_key] = _mean_score(reward_dir, [p + o for p, o in zip(ids, out)], tok.pad_token_id or 0)
        elif reward_key and cfg.reward.functions:  # the GRPO family's reward: the functions' total
            from jaxrl.rewards.runner import RewardRunner

            with RewardRunner(cfg.reward) as rewards:
                scores, _ = rewards(prompts, texts)
            result[reward_key] = float(scores.mean())
    return result


def _mean_score(reward_dir: str, sequences: list[list[int]], pad_id: int) -> float:
    """The reward model's mean score of token sequences (prompt + response, its EOS included), each read
    at its last real token as in PPO's experience (right-padded here: the score ignores the padding side)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxrl.models.hf import load_pretrained

    length = max(len(s) for s in sequences)
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for i, s in enumerate(sequences):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    reward = load_pretrained(reward_dir, kind="score")
    return float(np.mean(np.asarray(reward.sequence_score(jnp.asarray(ids), jnp.asarray(mask)))))


def _require(path: str, step: str) -> None:
    from jaxrl.errors import JaxrlError

    if not os.path.exists(os.path.join(path, "config.json")):
        raise JaxrlError(f"{path} does not exist: run {step} first (e.g. --steps 1,2,3)")


def _read(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    from jaxrl.io import read_json

    return read_json(path, what="pipeline record", fix=f"delete {path} (the step it records then runs again)")


def _write(out: str, summary: dict) -> None:
    _write_json(os.path.join(out, "summary.json"), summary)


def _write_json(path: str, data: dict) -> None:
    import jax

    from jaxrl.train.metrics import strict_json

    if jax.process_index() != 0:
        return
    from jaxrl.io import atomic_write

    with atomic_write(path) as f:
        f.write(strict_json(data, indent=2))
