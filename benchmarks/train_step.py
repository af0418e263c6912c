"""Train-step time: jaxrl's jitted SFT step against HF transformers' PyTorch forward + backward + AdamW,
same weights and batch, in one run.

One device (the first), fp32, full rows of --seq-len random ids, no padding. jaxrl: `Trainer.step`
(`jaxrl/train/step.py`) with `sft_loss` and the run's optimizer chain (AdamW, clipping at 1.0) at ZeRO
stage 0; HF: `model(ids, labels=ids).loss.backward()`, `clip_grad_norm_(1.0)`, `torch.optim.AdamW.step()`.
Reported: ms per step, median over --repeats timed steps after --warmup untimed ones (compilation is
excluded), and the loss of the first step on both sides (same weights and batch: they should agree).

Usage: python benchmarks/train_step.py --preset small --batch 8 --seq-len 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "tinyllama-1.1b"], help="jaxrl.models.config preset")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def timed(step, warmup: int, repeats: int) -> tuple[float, list[float]]:
    """(median seconds per step, losses of every step) for `step() -> loss` (which must block)."""
    losses, times = [], []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        losses.append(step())
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), losses


def jaxrl_step(directory: str, batch: dict, remat: str):
    from jaxrl.algorithms.sft import sft_loss
    from flax import nnx

    from jaxrl.models.hf import load_pretrained
    from jaxrl.models.transformer import Transformer
    from jaxrl.optim import OptimConfig, make_optimizer
    from jaxrl.parallel.mesh import make_mesh
    from jaxrl.parallel.sharding import model_shardings, zero_layout
    from jaxrl.train.step import Trainer

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    sh = model_shardings(shard_params=False, tensor=False)
    with jax.set_mesh(mesh):
        model = load_pretrained(directory, shardings=sh, remat=remat)
    layout = zero_layout(lambda s: Transformer(model.config, rngs=nnx.Rngs(0), shardings=s, remat=remat), mesh, 0)
    optim = make_optimizer(OptimConfig(lr=1e-4, weight_decay=0.0, warmup_steps=0, clip_norm=1.0), 100)
    trainer = Trainer(model, optim, sft_loss, mesh=mesh, layout=layout)
    holder = {"state": trainer.init_state()}

    def step():
        with jax.set_mesh(mesh):
            holder["state"], metrics = trainer.step(holder["state"], batch)
        return float(metrics["loss"])

    return step


def hf_step(model, batch: dict):
    import torch

    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    return step


def main(argv=None):
    args = parse_args(argv)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxrl.models.config import preset as make_preset
    from jaxrl.models.hf import config_to_hf

    torch.manual_seed(args.seed)
    cfg = make_preset(args.preset, pad_token_id=0)
    hf = LlamaForCausalLM(LlamaConfig.from_dict(config_to_hf(cfg))).train()
    ids = np.random.default_rng(args.seed).integers(3, cfg.vocab_size, size=(args.batch, args.seq_len)).astype(np.int32)
    ones = np.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory, safe_serialization=True)
        j_step = jaxrl_step(directory, {k: jnp.asarray(v) for k, v in batch.items()}, args.remat)
    h_step = hf_step(hf, batch)
    print(f"preset={args.preset} batch={args.batch} seq={args.seq_len} remat={args.remat} fp32 "
          f"jax={jax.default_backend()} ({jax.devices()[0].device_kind}) torch_threads={torch.get_num_threads()}")
    j_time, j_losses = timed(j_step, args.warmup, args.repeats)
    h_time, h_losses = timed(h_step, args.warmup, args.repeats)
    print("jaxrl ms/step | HF ms/step | HF/jaxrl | first loss jaxrl | first loss HF")
    print(f"{1e3 * j_time:.1f} | {1e3 * h_time:.1f} | {h_time / j_time:.2f} | {j_losses[0]:.4f} | {h_losses[0]:.4f}",
          flush=True)


if __name__ == "__main__":
    main()
