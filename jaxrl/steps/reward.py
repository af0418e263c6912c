"""Step 2, the reward model: one trained role (a score model) with the pairwise ranking loss."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from jaxrl.algorithms.reward import reward_loss
from jaxrl.config import RunConfig
from jaxrl.data.tokenize import tokenize_pairs
from jaxrl.steps import supervised
from jaxrl.steps.role import Role, lora_only, spec_from
from jaxrl.train import build


def roles(cfg: RunConfig, mesh, tokenizer=None) -> list[Role]:
    """The reward model, trained on chosen/rejected pairs of (micro-batch rows, data.max_len) rows."""
    shape = (build.micro_batch_rows(cfg, mesh), cfg.data.max_len)
    batch = {f"{side}_{k}": (shape, jnp.int32) for side in ("chosen", "rejected")
             for k in ("input_ids", "attention_mask")}
    loss = functools.partial(reward_loss, required_margin=cfg.reward.margin)
    return [Role("reward model", spec_from(cfg, kind="score"), build.model_arch(cfg.model.path, tokenizer), batch,
                 loss=loss, lora_only=lora_only(cfg))]


def run(cfg: RunConfig) -> dict:
    """Step 2: writes OUTPUT/hf (a sequence classifier, one label) and returns the final eval metrics."""
    tok = build.load_tokenizer(cfg.model.path)
    train, evals = build.load_split(cfg, "reward", tok)
    enc = build.encoder(tok)
    sizes = dict(max_len=cfg.data.max_len, max_prompt_len=cfg.data.max_prompt_len)
    train = tokenize_pairs(train, enc, **sizes).arrays
    evals = tokenize_pairs(evals, enc, **sizes).arrays if evals else None
    mesh = build.training_mesh(cfg)
    (model,) = roles(cfg, mesh, tok)
    return supervised.run(cfg, "reward", model, mesh, train, evals, tok)
