"""Generation throughput: jaxrl's KV-cache sampler against HF transformers' PyTorch `generate`, same
weights and prompts, in one run.

Both decode greedily for exactly --new-tokens tokens (HF: min_new_tokens = max_new_tokens; jaxrl: no EOS
ids), on full-length prompts of --prompt-len random ids. Reported per batch size:
  tokens/s      B * new_tokens / (prefill + decode), median over --repeats timed runs after a warm-up
  ms/step       one decode step: jaxrl times prefill and the decode loop separately; HF has no such split,
                so it is (time(N tokens) - time(1 token)) / (N - 1)
  floor ms/step (GPU only) parameter bytes / measured device copy bandwidth: the time to read every weight
                once, which bounds a memory-bound decode step from below
  agree         fraction of generated tokens on which the two greedy outputs agree (a sanity check)

With --group G it instead measures GRPO's shared prefill: each of --batch prompts repeated G times in
consecutive rows, generated with `group=G` (one prefill per distinct prompt, its cache repeated) against
`group=1` (G separate prefills of the same prompt), same key; reported per prompt count:
  prefill ms    the jitted prefill alone, median over --repeats after a warm-up, shared and separate
  total ms      prefill + decode of --new-tokens tokens (no EOS), shared and separate
  same tokens   whether both paths produced identical tokens (they should)

Usage: python benchmarks/generate.py --preset small --batch 1 16 --prompt-len 32 --new-tokens 32
       python benchmarks/generate.py --preset small --batch 1 2 --prompt-len 256 --new-tokens 16 --group 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DTYPES = {"fp32": (jnp.float32, "float32"), "bf16": (jnp.bfloat16, "bfloat16")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "tinyllama-1.1b"], help="jaxrl.models.config preset")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--group", type=int, default=0,
                   help="G > 1: benchmark a shared prefill of --batch prompts x G samples against G prefills each")
    return p.parse_args(argv)


def build_models(preset: str, dtype: str, directory: str):
    """A random HF Llama with the preset's config, saved to `directory` and loaded into jaxrl."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxrl.models.config import preset as make_preset
    from jaxrl.models.hf import config_to_hf, load_pretrained

    torch.manual_seed(0)
    cfg = make_preset(preset, pad_token_id=0)
    hf = LlamaForCausalLM(LlamaConfig.from_dict(config_to_hf(cfg))).eval()
    hf.save_pretrained(directory, safe_serialization=True)
    jdtype, tdtype = DTYPES[dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = hf.to(device=device, dtype=getattr(torch, tdtype))
    return hf, load_pretrained(directory, dtype=jdtype), device


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: compilation (jaxrl) or allocator/kernels (torch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_jaxrl(model, ids, new_tokens: int, repeats: int):
    """(seconds for prefill + decode, seconds for prefill alone, tokens)."""
    from jaxrl import generation as gen

    cfg = gen.SamplerConfig(max_new_tokens=new_tokens, eos_ids=(), pad_id=0)
    graphdef, params = nnx.split(model)
    ids = jnp.asarray(ids, jnp.int32)
    mask = jnp.ones_like(ids)
    key = jax.random.key(0)

    def prefill():
        return jax.block_until_ready(gen.prefill(graphdef, params, ids, mask, key, cfg=cfg))

    def full():
        state = gen.decode(graphdef, params, gen.prefill(graphdef, params, ids, mask, key, cfg=cfg), cfg=cfg)
        return jax.block_until_ready(state.tokens)

    total = median_time(full, repeats)
    return total, median_time(prefill, repeats), np.asarray(full())


def time_shared_prefill(model, ids, group: int, new_tokens: int, repeats: int):
    """{'shared'|'separate': (prefill seconds, prefill + decode seconds, tokens)} for the prompts `ids`
    (P, Tp) each repeated `group` times in consecutive rows, with one shared prefill per prompt or not."""
    from jaxrl import generation as gen

    cfg = gen.SamplerConfig(max_new_tokens=new_tokens, temperature=1.0, eos_ids=(), pad_id=0)
    graphdef, params = nnx.split(model)
    rows = jnp.asarray(np.repeat(ids, group, axis=0), jnp.int32)  # (P * G, Tp)
    mask = jnp.ones_like(rows)
    key = jax.random.key(0)
    out = {}
    for name, g in (("shared", group), ("separate", 1)):
        def prefill(g=g):
            return jax.block_until_ready(gen.prefill(graphdef, params, rows, mask, key, cfg=cfg, group=g))

        def full(g=g):
            state = gen.prefill(graphdef, params, rows, mask, key, cfg=cfg, group=g)
            return jax.block_until_ready(gen.decode(graphdef, params, state, cfg=cfg).tokens)

        out[name] = (median_time(prefill, repeats), median_time(full, repeats), np.asarray(full()))
    return out


def main_shared_prefill(args, model):
    rng = np.random.default_rng(args.seed)
    print(" | ".join(("prompts", "rows", "shared prefill ms", "separate prefill ms", "prefill speed-up",
                      "shared total ms", "separate total ms", "total speed-up", "same tokens")))
    for b in args.batch:
        ids = rng.integers(3, model.config.vocab_size, size=(b, args.prompt_len))
        t = time_shared_prefill(model, ids, args.group, args.new_tokens, args.repeats)
        (sp, st, stok), (pp, pt, ptok) = t["shared"], t["separate"]
        row = (f"{b}", f"{b * args.group}", f"{1e3 * sp:.1f}", f"{1e3 * pp:.1f}", f"{pp / sp:.2f}",
               f"{1e3 * st:.1f}", f"{1e3 * pt:.1f}", f"{pt / st:.2f}", str(bool((stok == ptok).all())))
        print(" | ".join(row), flush=True)


def time_hf(model, ids, new_tokens: int, repeats: int, device: str):
    """(seconds for N tokens, seconds for 1 token, tokens)."""
    import torch

    ids = torch.tensor(ids, device=device)
    mask = torch.ones_like(ids)

    def run(n):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    total = median_time(lambda: run(new_tokens), repeats)
    one = median_time(lambda: run(1), repeats)
    return total, one, run(new_tokens)[:, ids.shape[1]:].cpu().numpy()


def weight_floor_ms(model) -> float | None:
    """Parameter bytes / device copy bandwidth, in ms; None off GPU (host memory bandwidth is not what a
    CPU decode step is bound by at these sizes)."""
    if jax.default_backend() != "gpu":
        return None
    params = nnx.state(model, nnx.Param)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(params))  # as stored (fp32 master weights)
    x = jnp.ones((256 * 2**20,), jnp.float32)  # 1 GiB
    copy = jax.jit(lambda a: a + 1)
    seconds = median_time(lambda: copy(x).block_until_ready(), 5)
    bandwidth = 2 * x.nbytes / seconds  # read + write
    return 1e3 * nbytes / bandwidth


def main(argv=None):
    args = parse_args(argv)
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as directory:
        hf, model, device = build_models(args.preset, args.dtype, directory)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    floor = weight_floor_ms(model)
    print(f"preset={args.preset} params={n_params / 1e6:.1f}M dtype={args.dtype} prompt={args.prompt_len} "
          f"new={args.new_tokens} jax={jax.default_backend()} ({jax.devices()[0].device_kind}) torch={device} "
          f"torch_threads={torch.get_num_threads()}")
    if args.group > 1:
        return main_shared_prefill(args, model)
    header = ("batch", "jaxrl tok/s", "HF tok/s", "jaxrl/HF", "jaxrl ms/step", "HF ms/step", "floor ms/step",
              "agree")
    print(" | ".join(header))
    n = args.new_tokens
    for b in args.batch:
        ids = rng.integers(3, model.config.vocab_size, size=(b, args.prompt_len))
        j_total, j_prefill, j_tokens = time_jaxrl(model, ids, n, args.repeats)
        h_total, h_one, h_tokens = time_hf(hf, ids, n, args.repeats, device)
        j_rate, h_rate = b * n / j_total, b * n / h_total
        j_step = 1e3 * (j_total - j_prefill) / max(n - 1, 1)
        h_step = 1e3 * (h_total - h_one) / max(n - 1, 1)
        agree = float((j_tokens == h_tokens).mean())
        row = (f"{b}", f"{j_rate:.1f}", f"{h_rate:.1f}", f"{j_rate / h_rate:.2f}", f"{j_step:.2f}",
               f"{h_step:.2f}", "-" if floor is None else f"{floor:.3f}", f"{agree:.2f}")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
