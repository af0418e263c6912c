"""Rollout throughput on long-tailed response lengths: the slot engine (`jaxrl/rollout_engine.py`) against
the static sampler (`jaxrl/generation.py`) and HF transformers' PyTorch `generate`, same weights and
prompts, in one run.

How the lengths are forced, the same for all three systems: the model itself counts down. Its weights are
set (random blocks, then embedding and LM head overwritten) so that greedy decoding after token c(k) = k + 2
emits c(k - 1), and after c(1) emits EOS (id 2): a prompt ending in c(L) gets a completion of exactly L
tokens (EOS included). The embedding is scaled up so it dominates the residual stream and the LM head's row
v is the embedding of v + 1; every system runs the full, unmodified forward pass and its own greedy
argmax, with no logits processor and no per-system hook. The run checks that each system's completion
lengths equal the drawn ones.

Workloads (--prompts prompts, random prompt lengths 4..32 of random ids, then the countdown token):
  long-tailed  L ~ geometric with mean --mean-len, capped at --max-new-tokens
  equal        every L = --mean-len (max_new_tokens still --max-new-tokens)
  equal-cap    every L = --mean-len = max_new_tokens: no row ends early and no cache is left unread, so
               the engine can only lose here (its refill bookkeeping and chunked loop)
Reported: useful tokens/s = sum of completion lengths (EOS included) / wall time of the best of --repeats runs
(after a warm-up run that compiles; the systems take turns); the static sampler and HF decode in batches of --slots prompts (the same rows in
flight as the engine's slots).

Usage: python benchmarks/rollout.py --prompts 512 --slots 64 [--hf-prompts 128]

--ppo instead times `jaxrl ppo` iterations of the embedded default (configs/tiny.yaml with
benchmarks/train.py's PPO_OVERRIDES: 128 rollouts of at most 6 tokens) with each generation.engine, the
engines taking turns over --rounds runs: the PPO time split (`time/*` of metrics.jsonl, median of the
iterations after the first, which compiles), and the first iteration's generation time (compiles).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

EOS, PAD = 2, 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--slots", type=int, default=64, help="engine slots = static/HF batch size")
    p.add_argument("--mean-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--chunk-steps", type=int, default=16)
    p.add_argument("--refill-at", type=int, default=0)
    p.add_argument("--length-block", type=int, default=64)
    p.add_argument("--hf-prompts", type=int, default=-1, help="HF runs on the first this many prompts (-1: all, 0: skip)")
    p.add_argument("--workloads", nargs="+", default=["long-tailed", "equal", "equal-cap"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch-threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppo", action="store_true", help="time PPO iterations of the embedded default per engine")
    p.add_argument("--ppo-steps", type=int, default=5, help="--ppo: iterations per run (the first compiles)")
    p.add_argument("--rounds", type=int, default=3, help="--ppo: runs per engine, alternated")
    p.add_argument("--engines", nargs="+", default=["static", "slots"], help="--ppo: generation.engine values")
    return p.parse_args(argv)


def build_models(args, directory: str):
    """A random HF Llama whose greedy decoding counts down (see the module docstring), saved and loaded
    into jaxrl. Returns (torch model, jaxrl model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxrl.models.config import ModelConfig
    from jaxrl.models.hf import config_to_hf, load_pretrained

    heads = max(2, args.hidden // 32)
    cfg = ModelConfig(family="llama", vocab_size=1024, hidden_size=args.hidden, num_layers=args.layers,
                      num_heads=heads, num_kv_heads=max(1, heads // 2), head_dim=args.hidden // heads,
                      intermediate_size=2 * args.hidden, max_position_embeddings=1024, norm_eps=1e-5,
                      pad_token_id=PAD, eos_token_id=EOS)
    torch.manual_seed(args.seed)
    hf = LlamaForCausalLM(LlamaConfig.from_dict(config_to_hf(cfg))).eval()
    with torch.no_grad():
        emb = torch.randn(cfg.vocab_size, cfg.hidden_size)  # rows ~ unit RMS, >> the blocks' 0.02-scale output
        head = 0.02 * torch.randn(cfg.vocab_size, cfg.hidden_size)
        top = args.max_new_tokens + 2  # countdown tokens c(1..max) = 3..max+2; EOS is 2 = "c(0)"
        head[EOS:top] = 10.0 * emb[EOS + 1:top + 1]  # logit v ~ <h, emb[v + 1]>: the input token minus one
        hf.model.embed_tokens.weight.copy_(emb)
        hf.lm_head.weight.copy_(head)
    hf.save_pretrained(directory, safe_serialization=True)
    return hf, load_pretrained(directory)


def workload(args, kind: str, rng) -> tuple[list[list[int]], np.ndarray]:
    if kind in ("equal", "equal-cap"):
        lengths = np.full(args.prompts, args.mean_len)
    else:
        lengths = np.minimum(rng.geometric(1.0 / args.mean_len, size=args.prompts), args.max_new_tokens)
    prompts = []
    for L in lengths:
        body = rng.integers(args.max_new_tokens + 3, 1024, size=rng.integers(4, 33)).tolist()
        prompts.append(body + [int(L) + 2])
    return prompts, lengths


def run_static(model, prompts, args):
    from jaxrl import generation as gen

    out = gen.generate(model, prompts, max_new_tokens=args.max_new_tokens, eos_ids=(EOS,), batch_size=args.slots)
    return [len(o) for o in out], {}


def run_engine(model, prompts, args):
    from jaxrl import generation as gen
    from jaxrl import rollout_engine as engine

    cfg = gen.sampler_config(model, max_new_tokens=args.max_new_tokens, eos_ids=(EOS,), pad_id=PAD)
    ecfg = engine.EngineConfig(slots=args.slots, chunk_steps=args.chunk_steps, refill_at=args.refill_at,
                               length_block=args.length_block)
    stats = {}
    out = engine.generate_slots(model, prompts, cfg, jax.random.key(0), engine=ecfg, stats=stats)
    return np.asarray(out["mask"]).sum(1).tolist(), stats


def run_hf(hf, prompts, args):
    import torch

    lengths = []
    for start in range(0, len(prompts), args.slots):
        chunk = prompts[start:start + args.slots]
        width = max(map(len, chunk))
        ids = torch.tensor([[PAD] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.max_new_tokens,
                              eos_token_id=EOS, pad_token_id=PAD)[:, width:]
        for row in out.tolist():
            lengths.append(row.index(EOS) + 1 if EOS in row else len(row))
    return lengths, {}


def timed(systems, repeats: int) -> dict:
    """name -> (best seconds, lengths, stats): each system once to warm up (compilation, allocator), then
    `repeats` rounds that run every system in turn, so load from other jobs on a shared machine falls on
    all of them alike; the best round counts (contention only ever adds time)."""
    best = {}
    for name, fn, *a in systems:
        fn(*a)
    for _ in range(repeats):
        for name, fn, *a in systems:
            t0 = time.perf_counter()
            lengths, stats = fn(*a)
            seconds = time.perf_counter() - t0
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, lengths, stats)
    return best


def ppo_split(args) -> None:
    """--ppo: the embedded default's PPO time split per generation.engine (see the module docstring)."""
    from train import PPO_OVERRIDES, load

    from jaxrl.train.metrics import read_metrics

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    keys = ("time/generation", "time/experience", "time/train")
    runs = {e: [] for e in args.engines}
    print(f"PPO iterations of the embedded default, {args.ppo_steps - 1} timed per run; load {load()}")
    print("round | engine | generation s | scoring s | updates s | step 1 generation s (compiles) | load")
    for r in range(args.rounds):
        for engine in args.engines if r % 2 == 0 else args.engines[::-1]:
            started = load()
            with tempfile.TemporaryDirectory() as out:
                cmd = [sys.executable, "-m", "jaxrl.cli", "ppo", "--config", os.path.join(here, "configs", "tiny.yaml"),
                       *PPO_OVERRIDES, f"generation.engine={engine}", f"train.steps={args.ppo_steps}",
                       f"seed={args.seed}", "--output", out]
                subprocess.run(cmd, check=True, capture_output=True, cwd=here)
                rows = [row for row in read_metrics(out) if "time/train" in row]
            t = [statistics.median(row[k] for row in rows[1:]) for k in keys] + [rows[0]["time/generation"]]
            runs[engine].append(t)
            print(f"{r} | {engine} | " + " | ".join(f"{x:.4f}" for x in t) + f" | {started}", flush=True)
    for engine, ts in runs.items():
        med = [statistics.median(x[i] for x in ts) for i in range(4)]
        print(f"median {engine}: generation {med[0]:.4f} s, scoring {med[1]:.4f} s, updates {med[2]:.4f} s, "
              f"step 1 generation {med[3]:.2f} s", flush=True)
    print(f"load at the end {load()}")


def main(argv=None):
    args = parse_args(argv)
    if args.ppo:
        return ppo_split(args)
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as directory:
        hf, model = build_models(args, directory)
    print(f"jax={jax.default_backend()} hidden={args.hidden} layers={args.layers} vocab=1024 prompts={args.prompts} "
          f"slots={args.slots} chunk_steps={args.chunk_steps} length_block={args.length_block} "
          f"max_new_tokens={args.max_new_tokens} torch_threads={torch.get_num_threads()}", flush=True)
    print("workload | system | prompts | useful tokens | seconds | useful tok/s | lengths exact | notes")
    for kind in args.workloads:
        prompts, want = workload(args, kind, rng)
        run_args = argparse.Namespace(**{**vars(args), "max_new_tokens": args.mean_len if kind == "equal-cap"
                                         else args.max_new_tokens})
        systems = [("static", run_static, model, prompts, run_args), ("slots", run_engine, model, prompts, run_args)]
        n_hf = len(prompts) if args.hf_prompts < 0 else args.hf_prompts
        if n_hf:
            systems.append(("hf", run_hf, hf, prompts[:n_hf], run_args))
        rates = {}
        for name, (seconds, lengths, stats) in timed(systems, args.repeats).items():
            target = want[:len(lengths)]
            useful = int(np.sum(lengths))
            rates[name] = useful / seconds
            exact = float(np.mean(np.asarray(lengths) == target))
            print(f"{kind} | {name} | {len(lengths)} | {useful} | {seconds:.2f} | {rates[name]:.1f} | {exact:.3f} | "
                  f"{stats or ''}", flush=True)
        print(f"{kind}: slots / static = {rates['slots'] / rates['static']:.2f}"
              + (f", slots / hf = {rates['slots'] / rates['hf']:.2f}" if "hf" in rates else "")
              + f"; mean length {want.mean():.1f}, max {want.max()}, max_new_tokens {run_args.max_new_tokens}",
              flush=True)


if __name__ == "__main__":
    main()
