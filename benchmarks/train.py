"""Train-step time: jaxrl's jitted SFT step against HF transformers' PyTorch eager step, each framework in
its own process, alternated, with an estimate of how much of each step is matrix multiplication.

The step (both sides, same weights and batch, one device, full rows of random ids, no padding):
  jaxrl: `Trainer.step` (`jaxrl/train/step.py`) with `sft_loss` and the run's optimizer chain (AdamW,
         clipping at 1.0, non-finite skip) at ZeRO stage 0; `--remat` as `model.remat` (default none);
  HF:    `model(ids, labels=ids).loss.backward()`, `clip_grad_norm_(1.0)`, `torch.optim.AdamW.step()`;
         bf16 through `torch.autocast` over fp32 weights (jaxrl's bf16 keeps fp32 masters too).
Neither recomputes anything with `--remat none`: that is the fair comparison with an eager step.

GEMM estimate: the step's matrix products (per layer q, k, v, o, gate, up, down; the LM head; the two
attention products per (row, head); each forward product (M, K) @ (K, N) has two backward products,
(M, N) @ (N, K) and (K, M) @ (M, N)) are timed alone, in the same process, in that framework, in the
compute dtype; their sum is what the step would cost if it did nothing else. share outside GEMMs =
1 - GEMM estimate / step.

Usage:
  python benchmarks/train.py                                # 32m fp32, 3 alternated rounds
  python benchmarks/train.py --shapes tiny small 32m --dtypes fp32 bf16 --rounds 2
  python benchmarks/train.py --profile --shapes 32m         # jaxrl step under jax.profiler: top ops
Each run prints one line per process (with the load average when it started) and a summary per
configuration: medians over the rounds and the HF/jaxrl ratio of each round (the machine may be shared:
compare the ratios of alternated runs, not absolute times across sessions).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

# measure the jaxrl of the tree this script is in (or of $JAXRL_BENCH_TREE: `--baseline`), not whichever
# one is installed
sys.path.insert(0, os.environ.get("JAXRL_BENCH_TREE") or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    # the issue-19 shape: a 32M-parameter Llama (27.8M of it in matrix products)
    "32m": ("small", dict(vocab_size=8192, num_layers=8)),
    "tiny": ("tiny", {}),
    "small": ("small", {}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["32m"], choices=sorted(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    p.add_argument("--rounds", type=int, default=3, help="alternated (jaxrl, HF) process pairs per configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-gemm", action="store_true", help="skip the GEMM estimate")
    p.add_argument("--profile", action="store_true", help="profile the jaxrl step instead (in this process)")
    p.add_argument("--ppo", action="store_true",
                   help="time PPO iterations of the embedded default instead (`jaxrl ppo`, configs/tiny.yaml "
                        "with the pipeline's PPO overrides): generation, scoring, actor/critic updates")
    p.add_argument("--ppo-steps", type=int, default=4, help="--ppo: iterations per run (the first compiles)")
    p.add_argument("--top", type=int, default=25, help="--profile: ops listed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--huge-pages", default="jaxrl", choices=["jaxrl", "none", "both"],
                   help="who runs with glibc's huge-page tunable: jaxrl's processes (as the `jaxrl` command "
                        "runs them on CPU, jaxrl/host_memory.py), neither, or HF's too")
    p.add_argument("--baseline", metavar="TREE",
                   help="also run the jaxrl step of another checkout (e.g. `git worktree add` of the commit "
                        "before a change) in each round, as 'base'")
    # one process's measurement (what the driver runs)
    p.add_argument("--worker", choices=["jaxrl", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_config(shape: str):
    from jaxrl.models.config import preset

    name, overrides = SHAPES[shape]
    return preset(name, pad_token_id=0, **overrides)


def make_batch(vocab: int, batch: int, seq: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, seq)).astype(np.int32)


def load() -> str:
    return "%.2f %.2f %.2f" % os.getloadavg()


def timed(step, warmup: int, repeats: int) -> tuple[float, float, int]:
    """(median seconds per step, first step's loss, page faults per timed step) for `step() -> loss`
    (which must block)."""
    import resource

    times, first, faults = [], None, 0
    for i in range(warmup + repeats):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        loss = step()
        first = loss if first is None else first
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return statistics.median(times), first, faults // repeats


# ------------------------------------------------------------------------------------------------ GEMMs
def gemm_shapes(cfg, batch: int, seq: int) -> list[tuple[int, int, int, int, int]]:
    """(count, batch dims, M, K, N) of every matrix product in one forward + backward step."""
    m, d, f = batch * seq, cfg.hidden_size, cfg.intermediate_size
    n, k, h, L, v = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers, cfg.vocab_size
    forward = [(L, m, d, n * h), (2 * L, m, d, k * h), (L, m, n * h, d), (2 * L, m, d, f), (L, m, f, d),
               (1, m, d, v)]
    out = []
    for count, mm, kk, nn in forward:  # forward, input gradient, weight gradient
        out += [(count, 1, mm, kk, nn), (count, 1, mm, nn, kk), (count, 1, kk, mm, nn)]
    # attention per (row, head): scores (T, H) @ (H, S), output (T, S) @ (S, H); the backward has one
    # product of the first kind (dP) and three of the second (dV, dQ, dK)
    out += [(3 * L, batch * n, seq, h, seq), (4 * L, batch * n, seq, seq, h)]
    return out


def gemm_seconds(matmul, shapes, repeats: int = 3) -> tuple[float, float]:
    """(seconds, GFLOP) of all `shapes`, each timed alone: `matmul(count, batch, M, K, N) -> fn` gives a
    zero-argument blocking call of that product."""
    total, flop = 0.0, 0.0
    for count, b, m, k, n in shapes:
        fn = matmul(b, m, k, n)
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        total += count * statistics.median(times)
        flop += count * 2.0 * b * m * k * n
    return total, flop / 1e9


def jax_matmul(dtype):
    import jax
    import jax.numpy as jnp

    def make(b, m, k, n):
        key1, key2 = jax.random.split(jax.random.key(0))
        shape = (b,) if b > 1 else ()
        x = jax.random.normal(key1, (*shape, m, k), dtype)
        w = jax.random.normal(key2, (*shape, k, n), dtype)
        f = jax.jit(jnp.matmul)
        return lambda: f(x, w).block_until_ready()

    return make


def torch_matmul(dtype):
    import torch

    def make(b, m, k, n):
        shape = (b,) if b > 1 else ()
        x, w = torch.randn(*shape, m, k, dtype=dtype), torch.randn(*shape, k, n, dtype=dtype)

        def run():
            with torch.no_grad():
                torch.matmul(x, w)

        return run

    return make


# ---------------------------------------------------------------------------------------------- workers
def jaxrl_trainer(directory: str, dtype_name: str, remat: str):
    """(trainer, mesh) for the SFT step of the model in `directory`, one device, ZeRO stage 0."""
    import jax
    from flax import nnx

    from jaxrl.algorithms.sft import sft_loss
    from jaxrl.models.hf import load_pretrained
    from jaxrl.models.transformer import Transformer
    from jaxrl.optim import OptimConfig, make_optimizer
    from jaxrl.parallel.mesh import make_mesh
    from jaxrl.parallel.sharding import model_shardings, zero_layout
    from jaxrl.precision import dtype_of
    from jaxrl.train.step import Trainer

    dtype = dtype_of(dtype_name)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    sh = model_shardings(shard_params=False, tensor=False)
    with jax.set_mesh(mesh):
        model = load_pretrained(directory, dtype, shardings=sh, remat=remat)
    layout = zero_layout(lambda s: Transformer(model.config, rngs=nnx.Rngs(0), dtype=dtype, shardings=s,
                                               remat=remat), mesh, 0)
    optim = make_optimizer(OptimConfig(lr=1e-4, weight_decay=0.0, warmup_steps=0, clip_norm=1.0), 100)
    return Trainer(model, optim, sft_loss, mesh=mesh, layout=layout), mesh


def jaxrl_worker(args, cfg, ids) -> dict:
    import jax
    import jax.numpy as jnp

    trainer, mesh = jaxrl_trainer(args.model_dir, args.dtypes[0], args.remat)
    ones = jnp.ones(ids.shape, jnp.int32)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": ones, "loss_mask": ones}
    holder = {"state": trainer.init_state()}

    def step():
        with jax.set_mesh(mesh):
            holder["state"], metrics = trainer.step(holder["state"], batch)
        return float(metrics["loss"])

    seconds, loss, faults = timed(step, args.warmup, args.repeats)
    out = {"step_s": seconds, "loss": loss, "faults": faults}
    if not args.no_gemm:
        dtype = jnp.float32 if args.dtypes[0] == "fp32" else jnp.bfloat16
        out["gemm_s"], out["gflop"] = gemm_seconds(jax_matmul(dtype), gemm_shapes(cfg, *ids.shape))
    return out


def hf_worker(args, cfg, ids) -> dict:
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).train()
    ids_t = torch.tensor(ids, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    bf16 = args.dtypes[0] == "bf16"

    def step():
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            loss = model(ids_t, labels=ids_t).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    seconds, loss, faults = timed(step, args.warmup, args.repeats)
    out = {"step_s": seconds, "loss": loss, "faults": faults, "torch_threads": torch.get_num_threads()}
    if not args.no_gemm:
        dtype = torch.bfloat16 if bf16 else torch.float32
        out["gemm_s"], out["gflop"] = gemm_seconds(torch_matmul(dtype), gemm_shapes(cfg, *ids.shape))
    return out


def worker(args) -> None:
    cfg = model_config(args.shapes[0])
    ids = make_batch(cfg.vocab_size, args.batch, args.seq_len, args.seed)
    started = load()
    out = (jaxrl_worker if args.worker == "jaxrl" else hf_worker)(args, cfg, ids)
    print("RESULT " + json.dumps(dict(out, load=started)), flush=True)


# ---------------------------------------------------------------------------------------------- driver
def save_hf_model(cfg, directory: str, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxrl.models.hf import config_to_hf

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig.from_dict(config_to_hf(cfg))).save_pretrained(directory, safe_serialization=True)


def worker_env(args, framework: str) -> dict:
    """The worker's environment: huge pages as `--huge-pages` says, the tree to import for `base`."""
    from jaxrl.host_memory import huge_pages_env

    env = dict(os.environ)
    if args.huge_pages == "both" or (args.huge_pages == "jaxrl" and framework != "hf"):
        env = huge_pages_env(env) or env
    else:
        env["JAXRL_HUGE_PAGES"] = "0"  # also keeps `python -m jaxrl.cli` (--ppo) from re-executing with them
    if framework == "base":
        env["JAXRL_BENCH_TREE"] = os.path.abspath(args.baseline)
    return env


def run_worker(args, framework: str, shape: str, dtype: str, directory: str) -> dict:
    env = worker_env(args, framework)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "jaxrl" if framework == "base" else framework,
           "--model-dir", directory,
           "--shapes", shape, "--dtypes", dtype, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
           "--remat", args.remat, "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--seed", str(args.seed)] + (["--no-gemm"] if args.no_gemm else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{framework} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def describe(r: dict, tokens: int) -> str:
    text = (f"{1e3 * r['step_s']:8.0f} ms  {tokens / r['step_s']:8.0f} tok/s  loss {r['loss']:.4f}"
            f"  {r.get('faults', 0):7d} faults")
    if "gemm_s" in r:
        text += (f"  GEMMs {1e3 * r['gemm_s']:7.0f} ms ({r['gflop'] / r['gemm_s']:5.1f} GFLOP/s)"
                 f"  outside {100 * (1 - r['gemm_s'] / r['step_s']):3.0f}%")
    return text + f"  [load {r['load']}]"


def compare(args, shape: str, dtype: str) -> None:
    cfg = model_config(shape)
    tokens = args.batch * args.seq_len
    print(f"\n== {shape} ({args.batch} x {args.seq_len}, {dtype}, remat {args.remat}) ==", flush=True)
    order = ["jaxrl", "hf"] + (["base"] if args.baseline else [])
    results = {fw: [] for fw in order}
    with tempfile.TemporaryDirectory() as directory:
        save_hf_model(cfg, directory, args.seed)
        for r in range(args.rounds):
            for framework in (order if r % 2 == 0 else order[::-1]):
                res = run_worker(args, framework, shape, dtype, directory)
                results[framework].append(res)
                print(f"  round {r} {framework:5s} {describe(res, tokens)}", flush=True)
    med = {fw: {k: statistics.median(x[k] for x in rs) for k in ("step_s", "gemm_s", "gflop") if k in rs[0]}
           for fw, rs in results.items()}
    print("  median " + ", ".join(f"{fw} {1e3 * m['step_s']:.0f} ms ({tokens / m['step_s']:.0f} tok/s)"
                                  for fw, m in med.items()))
    for fw in order[1:]:
        ratios = [o["step_s"] / j["step_s"] for j, o in zip(results["jaxrl"], results[fw])]
        print(f"  {fw}/jaxrl step time per round {' '.join(f'{x:.2f}' for x in ratios)} "
              f"(median {statistics.median(ratios):.2f})")
    for fw in order:
        if "gemm_s" in med[fw]:
            m = med[fw]
            print(f"  {fw}: GEMM estimate {1e3 * m['gemm_s']:.0f} ms of {m['gflop']:.0f} GFLOP, "
                  f"share outside GEMMs {100 * (1 - m['gemm_s'] / m['step_s']):.0f}%")


# ------------------------------------------------------------------------------------------------- PPO
PPO_OVERRIDES = [  # configs/tiny.yaml's `pipeline.ppo` (the embedded default's step 3), a fresh reward model
    "model.reward_path=tiny", "optim.lr=3e-5", "optim.warmup_steps=1", "ppo.critic_lr=5e-4", "ppo.kl_coef=0.1",
    "ppo.epochs=4", "ppo.mini_batches=4", "ppo.rollout_batch_size=128", "ppo.normalize_reward=true",
    "train.eval_every=0", "train.save_every=0", "train.log_every=1",
]


def ppo_run(args, tree: str) -> list[dict]:
    """`jaxrl ppo` of `tree` for --ppo-steps iterations; its metrics.jsonl rows after the first."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "jaxrl.cli", "ppo", "--config", os.path.join(tree, "configs", "tiny.yaml"),
               *PPO_OVERRIDES, f"train.steps={args.ppo_steps}", f"seed={args.seed}", "--output", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, env=worker_env(args, "jaxrl"))
        if proc.returncode:
            raise RuntimeError(f"jaxrl ppo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "time/train" in r][1:]


def ppo(args) -> None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"jaxrl": here, **({"base": os.path.abspath(args.baseline)} if args.baseline else {})}
    keys = ("time/generation", "time/experience", "time/train")
    print(f"PPO iterations of the embedded default, {args.ppo_steps - 1} timed per run; load {load()}")
    print("round | tree | generation s | scoring s | actor+critic updates s | total s | load")
    totals = collections.defaultdict(list)
    for r in range(args.rounds):
        for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
            started = load()
            rows = ppo_run(args, trees[name])
            t = [statistics.median(row[k] for row in rows) for k in keys]
            totals[name].append(t)
            print(f"{r} | {name} | {t[0]:.3f} | {t[1]:.3f} | {t[2]:.3f} | {sum(t):.3f} | {started}", flush=True)
    for name, ts in totals.items():
        med = [statistics.median(x[i] for x in ts) for i in range(3)]
        share = " / ".join(f"{100 * m / sum(med):.0f}%" for m in med)
        print(f"median {name}: generation {med[0]:.3f} s, scoring {med[1]:.3f} s, updates {med[2]:.3f} s "
              f"(split {share})")


# --------------------------------------------------------------------------------------------- profile
def profile(args) -> None:
    """Runs the jaxrl step under `jax.profiler`, then sums each XLA op's time over the trace and joins
    it with the compiled HLO (is it a matrix product; which jax operation it came from)."""
    import jax
    import jax.numpy as jnp

    shape, dtype = args.shapes[0], args.dtypes[0]
    cfg = model_config(shape)
    ids = make_batch(cfg.vocab_size, args.batch, args.seq_len, args.seed)
    with tempfile.TemporaryDirectory() as directory:
        save_hf_model(cfg, directory, args.seed)
        trainer, mesh = jaxrl_trainer(directory, dtype, args.remat)
    ones = jnp.ones(ids.shape, jnp.int32)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": ones, "loss_mask": ones}
    state = trainer.init_state()
    with jax.set_mesh(mesh), tempfile.TemporaryDirectory() as trace_dir:
        hlo = trainer.lower(state, batch).compile().as_text()
        for _ in range(max(args.warmup, 1)):
            state, metrics = trainer.step(state, batch)
            float(metrics["loss"])
        t0 = time.perf_counter()
        jax.profiler.start_trace(trace_dir)
        for _ in range(args.repeats):
            state, metrics = trainer.step(state, batch)
            float(metrics["loss"])
        jax.profiler.stop_trace()
        wall = (time.perf_counter() - t0) / args.repeats
        data = jax.profiler.ProfileData.from_file(sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1])
        durations, counts = collections.Counter(), collections.Counter()
        ops = hlo_ops(hlo)
        for plane in data.planes:
            for line in plane.lines:
                for event in line.events:
                    if event.name in ops:
                        durations[event.name] += event.duration_ns / args.repeats
                        counts[event.name] += 1
    total = sum(durations.values())
    by_category = collections.Counter()
    for name, ns in durations.items():
        by_category[category(*ops[name])] += ns
    print(f"{shape} {args.batch} x {args.seq_len} {dtype} remat {args.remat}: step {1e3 * wall:.0f} ms "
          f"(under the profiler), op time {total / 1e6:.0f} ms, load {load()}")
    print("category | ms | share of op time")
    for name, ns in by_category.most_common():
        print(f"{name} | {ns / 1e6:.0f} | {100 * ns / total:.1f}%")
    print(f"\ntop {args.top} ops | ms/step | calls/step | GEMM | shape | from")
    for name, ns in durations.most_common(args.top):
        shape_text, is_gemm, op_name = ops[name]
        print(f"{name} | {ns / 1e6:.1f} | {counts[name] // args.repeats} | {'yes' if is_gemm else ''} | "
              f"{shape_text.split('{')[0]} | {op_name[-80:]}")


def hlo_ops(hlo: str) -> dict:
    """{instruction name: (result shape, is a matrix product (a dot, or a fusion around one), op_name)}."""
    calls_dot, current = set(), None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) ", line)
        if head and line.rstrip().endswith("{"):
            current = head.group(1)
        elif current and re.search(r"= \S+ (dot|convolution)\(", line):
            calls_dot.add(current)
    ops = {}
    for line in hlo.splitlines():
        m = re.match(r"^\s*(?:ROOT )?%(\S+) = (\S+) (\S+?)\(", line)
        if not m:
            continue
        name, shape, kind = m.groups()
        calls = re.search(r"calls=%([^,\s]+)", line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        gemm = kind in ("dot", "convolution") or bool(calls and calls.group(1) in calls_dot)
        ops[name] = (shape, gemm, op_name.group(1) if op_name else "")
    return ops


_CATEGORIES = [  # (category, pattern on the jax op_name), first match wins
    ("scan: stacked residuals and layer slices", r"dynamic_update_slice|dynamic_slice|^$|broadcast_in_dim$"),
    ("attention (softmax, mask, head layout)", r"/attention/|vmap|_where|BNTS|BTNH"),
    ("MLP activation", r"silu"),
    ("rotary", r"concatenate|cos|sin|neg$"),
    ("norms", r"rsqrt|integer_pow|reduce_sum|mean|square"),
    ("logits, log-softmax, accuracy", r"^jit\(step\)/(transpose\()?jvp\((?!.*while)"),
    ("optimizer, clipping, grad norm", r"^jit\(step\)/(?!.*jvp)"),
]


def category(shape: str, gemm: bool, op_name: str) -> str:
    if gemm:
        return "GEMM"
    for name, pattern in _CATEGORIES:
        if re.search(pattern, op_name):
            return name
    return "other elementwise / copies"


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.profile:
        if args.huge_pages != "none":  # as the `jaxrl` command would run it
            from jaxrl.host_memory import reexec_with_huge_pages

            reexec_with_huge_pages()
        return profile(args)
    if args.ppo:
        return ppo(args)
    print(f"{os.cpu_count()} CPUs; load {load()}; "
          f"{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    for shape in args.shapes:
        for dtype in args.dtypes:
            compare(args, shape, dtype)


if __name__ == "__main__":
    main()
