"""Overhead of running reward functions in jaxrl.rewards' worker pool instead of in the trainer.

For each batch size, the same built-in reward function is timed called directly and through a warm
`RewardRunner` (one forkserver worker): the difference is what the pool costs per batch (pickling the
batch, two pipe messages, the parent's validation). Also: the pool's start-up (first worker and the
forkserver behind it) and a later pool's start-up. Median and 90th percentile of --repeats calls.

Usage: python benchmarks/reward_pool.py --batch 64 512 --repeats 200
"""

from __future__ import annotations

import argparse
import statistics
import time


def _time(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    out.sort()
    return statistics.median(out), out[int(0.9 * (len(out) - 1))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--function", default="synthetic_task", choices=["synthetic_task", "math_answer"])
    args = parser.parse_args()

    from jaxrl.rewards import RewardFunctionsConfig, RewardRunner, load_function

    cfg = RewardFunctionsConfig(functions=(args.function,), workers=1)  # (imports jaxrl.config, i.e. JAX)
    fn = load_function(args.function)
    for label in ("first pool", "later pool"):
        t = time.perf_counter()
        runner = RewardRunner(cfg)
        print(f"{label} start-up: {time.perf_counter() - t:.3f} s")
        if label == "first pool":
            runner.close()
    print("| batch | direct median ms | pool median ms | pool p90 ms | overhead median ms |")
    print("| --- | --- | --- | --- | --- |")
    with runner:
        for b in args.batch:
            prompts = [f"{i % 90}+{i % 7}=" for i in range(b)]
            completions = [str(i % 90 + i % 7) for i in range(b)]
            rows = [{"prompt": p, "answer": c} for p, c in zip(prompts, completions)]
            answers = [r["answer"] for r in rows]
            for _ in range(5):
                runner(prompts, completions, rows)
            direct, _ = _time(lambda: fn(prompts, completions, answer=answers), args.repeats)
            pool, p90 = _time(lambda: runner(prompts, completions, rows), args.repeats)
            print(f"| {b} | {direct * 1e3:.3f} | {pool * 1e3:.3f} | {p90 * 1e3:.3f} | {(pool - direct) * 1e3:.3f} |")


if __name__ == "__main__":  # the workers start from a forkserver, which imports this module as __mp_main__
    main()
