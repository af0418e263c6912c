"""Step 1, supervised fine-tuning: one trained role (the actor) with the causal-LM loss."""

from __future__ import annotations

import jax.numpy as jnp

from jaxrl.algorithms.sft import sft_loss
from jaxrl.config import RunConfig
from jaxrl.data.tokenize import tokenize_sft
from jaxrl.steps import supervised
from jaxrl.steps.role import Role, lora_only, spec_from
from jaxrl.train import build


def roles(cfg: RunConfig, mesh, tokenizer=None) -> list[Role]:
    """The actor, trained on (micro-batch rows, data.max_len) token rows."""
    shape = (build.micro_batch_rows(cfg, mesh), cfg.data.max_len)
    keys = ("input_ids", "attention_mask", "loss_mask") + (("segment_ids", "positions") if cfg.data.packing else ())
    batch = {k: (shape, jnp.int32) for k in keys}
    return [Role("actor", spec_from(cfg), build.model_arch(cfg.model.path, tokenizer), batch, loss=sft_loss,
                 lora_only=lora_only(cfg))]


def run(cfg: RunConfig) -> dict:
    """Step 1: writes OUTPUT/hf (a causal LM) and returns the final eval metrics."""
    tok = build.load_tokenizer(cfg.model.path)
    train, evals = build.load_split(cfg, "sft", tok)
    enc = build.encoder(tok)
    sizes = dict(max_len=cfg.data.max_len, max_prompt_len=cfg.data.max_prompt_len,
                 loss_on_prompt=cfg.sft.loss_on_prompt)
    train = tokenize_sft(train, enc, **sizes, pack=cfg.data.packing).arrays
    evals = tokenize_sft(evals, enc, **sizes).arrays if evals else None
    mesh = build.training_mesh(cfg)
    (actor,) = roles(cfg, mesh, tok)
    return supervised.run(cfg, "sft", actor, mesh, train, evals, tok)
