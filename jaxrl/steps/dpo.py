"""Offline preference training (`jaxrl dpo`): the policy trained on chosen/rejected pairs with `dpo.loss`
(DPO, cDPO, IPO, hinge, SimPO) against a frozen reference, as one trained role in the shared loop.

The reference is
- none for dpo.loss=simpo (reference-free);
- the policy's own weights with its LoRA adapters off, when LoRA trains only the adapters and the
  reference is the starting model (model.ref_path empty or model.path): the base weights never move,
  so no second copy is kept;
- otherwise a frozen model read from model.ref_path (default model.path), stored in the compute dtype.
Its summed response log-probs reach the loss as batch inputs (`REF_KEYS`): computed by its jitted forward
for every batch, or, with dpo.precompute_ref, once for every row before training, after which its
weights are freed. A frozen model's log-probs are the same in every epoch, so that one pass serves them
all; the columns travel with their rows through the shuffles.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl.algorithms.dpo import PAIR_KEYS, REF_KEYS, preference_loss, reference_logprobs
from jaxrl.config import RunConfig
from jaxrl.data.tokenize import tokenize_pairs
from jaxrl.errors import JaxrlError
from jaxrl.models import config as model_config
from jaxrl.models.lora import without_lora
from jaxrl.parallel.mesh import to_host
from jaxrl.parallel.sharding import DATA_AXES
from jaxrl.steps import role as role_lib
from jaxrl.steps import supervised
from jaxrl.steps.role import Role, frozen_spec, lora_only, spec_from
from jaxrl.train import build


def reference_kind(cfg: RunConfig) -> str | None:
    """None (simpo), 'policy' (the policy with its adapters off) or 'model' (a frozen model of its own)."""
    if cfg.dpo.loss == "simpo":
        return None
    if lora_only(cfg) and cfg.model.ref_path in ("", cfg.model.path):
        return "policy"
    return "model"


def roles(cfg: RunConfig, mesh, tokenizer=None) -> dict[str, Role]:
    """The policy, trained on micro-batches of (rows, data.max_len) pairs with the reference's log-probs
    beside them, and the reference (unless simpo), which scores the same pairs."""
    _check_reference(cfg)
    rows = build.micro_batch_rows(cfg, mesh)
    pairs = {k: ((rows, cfg.data.max_len), jnp.int32) for k in PAIR_KEYS}
    kind = reference_kind(cfg)
    d = cfg.dpo
    loss = functools.partial(preference_loss, loss_type=d.loss, beta=d.beta, label_smoothing=d.label_smoothing,
                             simpo_gamma=d.simpo_gamma)
    arch = build.model_arch(cfg.model.path, tokenizer)
    batch = dict(pairs, **({k: ((rows,), jnp.float32) for k in REF_KEYS} if kind else {}))
    policy = Role("policy", spec_from(cfg), arch, batch, loss=loss, lora_only=lora_only(cfg))
    declared = {"policy": policy}
    if kind == "policy":
        declared["reference"] = Role("reference", policy.spec, arch, pairs, shares="policy",
                                     forward=lambda m, b: reference_logprobs(without_lora(m), b))
    elif kind == "model":
        path = cfg.model.ref_path or cfg.model.path
        ref_arch = build.model_arch(path, tokenizer)
        if ref_arch.vocab_size != arch.vocab_size:
            raise JaxrlError(f"model.ref_path {path} has a vocabulary of {ref_arch.vocab_size} tokens but model.path "
                             f"{cfg.model.path} has {arch.vocab_size}: the reference must share the policy's "
                             "tokenizer (give the SFT model the policy starts from)")
        declared["reference"] = Role("reference", frozen_spec(cfg, path), ref_arch, pairs, forward=reference_logprobs)
    return declared


def _check_reference(cfg: RunConfig) -> None:
    ref = cfg.model.ref_path
    if not ref:
        return
    if cfg.dpo.loss == "simpo":
        raise JaxrlError(f"model.ref_path={ref!r} is set but dpo.loss=simpo uses no reference model; "
                         "leave model.ref_path empty or choose another dpo.loss")
    if ref not in model_config.PRESETS and not os.path.isfile(os.path.join(ref, "config.json")):
        raise JaxrlError(f"model.ref_path {ref!r} is not an HF model directory (no config.json there) nor a "
                         f"preset ({', '.join(sorted(model_config.PRESETS))}): give the directory of the "
                         "reference model (e.g. the SFT step's hf/), or leave it empty to use model.path")


def load_pairs(cfg: RunConfig, tokenizer) -> tuple[dict, dict | None]:
    """Training and held-out pair arrays (`PAIR_KEYS`), from the reward step's data and formats."""
    train, evals = build.load_split(cfg, "reward", tokenizer)
    enc = build.encoder(tokenizer)
    sizes = dict(max_len=cfg.data.max_len, max_prompt_len=cfg.data.max_prompt_len, loss_mask=True)
    return (tokenize_pairs(train, enc, **sizes).arrays,
            tokenize_pairs(evals, enc, **sizes).arrays if evals else None)


def with_reference(forward, weights, role: Role, arrays: dict, sharding) -> dict:
    """`arrays` plus the `REF_KEYS` columns: the reference's log-probs of every row, on every process.

    One in-order pass in batches of the role's rows (the last one padded); each global batch's outputs
    are gathered to every process, since any process may read any row in a later shuffle.
    """
    rows = role.batch[PAIR_KEYS[0]][0][0]
    n = len(arrays[PAIR_KEYS[0]])
    columns = {k: [] for k in REF_KEYS}
    for batch in build.eval_iterator(arrays, rows):
        out = forward(weights, role_lib.feed(role, build.to_device(batch, sharding)))
        for k, v in zip(REF_KEYS, out):
            columns[k].append(to_host(v))
    return dict(arrays, **{k: np.concatenate(v)[:n].astype(np.float32) for k, v in columns.items()})


def run(cfg: RunConfig, mesh=None) -> dict:
    """`jaxrl dpo`: trains the policy; writes OUTPUT/hf (a causal LM) and returns the final eval metrics.
    `mesh`: the training mesh (default: from mesh.*)."""
    mesh = mesh or build.training_mesh(cfg)
    tok = build.load_tokenizer(cfg.model.path)
    declared = roles(cfg, mesh, tok)
    train, evals = load_pairs(cfg, tok)
    policy, ref = declared["policy"], declared.get("reference")
    sharding = NamedSharding(mesh, P(DATA_AXES))
    prepare = None
    with jax.set_mesh(mesh):
        if ref is not None and ref.shares is None:
            graphdef, ref_state = role_lib.frozen(ref, cfg, mesh)
            forward = role_lib.jit_forward(ref, graphdef)
            if cfg.dpo.precompute_ref:
                train, evals = (with_reference(forward, ref_state, ref, a, sharding) if a is not None else None
                                for a in (train, evals))
                for x in jax.tree.leaves(ref_state):  # freed before the policy is built
                    x.delete()
            else:
                prepare = _per_batch(forward, lambda _: ref_state, ref, sharding)
        trainer = role_lib.trainer(policy, cfg, mesh)
        state = trainer.init_state()
        if ref is not None and ref.shares is not None:  # the policy's weights with its adapters off
            forward = role_lib.jit_forward(ref, trainer.graphdef)
            weights = lambda s: (s.params, s.frozen)  # noqa: E731
            if cfg.dpo.precompute_ref:
                train, evals = (with_reference(forward, weights(state), ref, a, sharding) if a is not None else None
                                for a in (train, evals))
            else:
                prepare = _per_batch(forward, weights, ref, sharding)
    return supervised.run(cfg, "dpo", policy, mesh, train, evals, tok, trainer=trainer, state=state,
                          prepare=prepare, show=("loss", "rewards/accuracy"))


def _per_batch(forward, weights, ref: Role, sharding):
    """`prepare(state, batch)` for `supervised.run`: the reference's log-probs of the batch, added to it."""
    def prepare(state, batch):
        out = forward(weights(state), role_lib.feed(ref, batch))
        return dict(batch, **{k: jax.device_put(v, sharding) for k, v in zip(REF_KEYS, out)})

    return prepare
