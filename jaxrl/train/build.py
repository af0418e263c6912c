"""From a RunConfig to the pieces a command trains: mesh, tokenizer, model (born sharded), trainer, data."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from jaxrl.config import RunConfig
from jaxrl.data import synthetic
from jaxrl.data.dataset import load_records
from jaxrl.data.iterator import BatchIterator
from jaxrl.data.tokenize import Encoder
from jaxrl.errors import JaxrlError
from jaxrl.models import config as model_config
from jaxrl.models.hf import check_tokenizer_files, load_pretrained, read_config
from jaxrl.models.lora import add_lora
from jaxrl.models.transformer import ScoreModel, Transformer, store_params
from jaxrl.optim import make_optimizer
from jaxrl.parallel.mesh import make_mesh
from jaxrl.parallel.sharding import DATA_AXES, model_shardings, zero_layout
from jaxrl.precision import dtype_of
from jaxrl.train.step import Trainer


def training_mesh(cfg: RunConfig):
    return make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)


# ---------------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(model_path: str):
    """The tokenizer of an HF directory; presets use the synthetic task's character tokenizer."""
    if model_path in model_config.PRESETS:
        return synthetic.build_tokenizer()
    from transformers import AutoTokenizer

    if not os.path.isdir(model_path):
        raise JaxrlError(f"model.path {model_path!r} is neither an HF directory nor a preset "
                         f"({', '.join(sorted(model_config.PRESETS))})")
    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        check_tokenizer_files(model_path)
        raise JaxrlError(f"{model_path} has no usable tokenizer files ({e}); save the tokenizer there") from e


# ------------------------------------------------------------------------------------------------ model
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one model role (actor, critic, reference, reward)."""

    path: str  # HF directory or preset name
    kind: str = "causal_lm"  # or 'score'
    dtype: str = "fp32"  # compute dtype
    param_dtype: str = "fp32"  # storage dtype: fp32 for a model that trains (master copy)
    remat: str = "none"
    logits_chunk: int = 0  # causal LM: positions per LM-head chunk in the losses
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "v")
    seed: int = 0


def spec_from(cfg: RunConfig, path: str | None = None, kind: str = "causal_lm") -> ModelSpec:
    lora = cfg.model.lora
    return ModelSpec(path=path or cfg.model.path, kind=kind, dtype=cfg.precision.compute, remat=cfg.model.remat,
                     logits_chunk=cfg.model.logits_chunk, lora_rank=lora.rank, lora_alpha=lora.alpha,
                     lora_targets=tuple(lora.targets), seed=cfg.seed)


def frozen_spec(cfg: RunConfig, path: str | None = None, kind: str = "causal_lm") -> ModelSpec:
    """A model that only runs forward (PPO's reference and reward model): no LoRA, no remat, and its
    weights stored in the compute dtype (no fp32 master copy: nothing updates them) unless
    `ppo.frozen_dtype` is fp32."""
    stored = cfg.precision.compute if cfg.ppo.frozen_dtype == "compute" else "fp32"
    return dataclasses.replace(spec_from(cfg, path, kind), lora_rank=0, remat="none", param_dtype=stored)


def model_arch(path: str, tokenizer) -> model_config.ModelConfig:
    """The architecture: read from config.json, or a preset sized to the tokenizer."""
    if path in model_config.PRESETS:
        vocab = -(-len(tokenizer) // 64) * 64  # round up so every mesh axis divides it
        return model_config.preset(path, vocab_size=vocab, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    return read_config(path)


def build_model(spec: ModelSpec, arch: model_config.ModelConfig, mesh, stage: int):
    """The model on `mesh`, parameters born in the ZeRO `stage` layout; returns (model, layout)."""
    dtype, param_dtype = dtype_of(spec.dtype), dtype_of(spec.param_dtype)

    def fresh(sh):
        return _lora(new_model(spec, arch, sh), spec)

    layout = zero_layout(fresh, mesh, stage)
    shardings = model_shardings(shard_params=stage == 3, tensor=mesh.shape["tensor"] > 1)
    with jax.set_mesh(mesh):
        if spec.path in model_config.PRESETS:
            model = store_params(fresh(shardings), param_dtype)
        else:
            model = _lora(load_pretrained(spec.path, dtype=dtype, kind=spec.kind, shardings=shardings,
                                          remat=spec.remat, seed=spec.seed, param_dtype=param_dtype,
                                          logits_chunk=spec.logits_chunk), spec)
    return model, layout


def new_model(spec: ModelSpec, arch: model_config.ModelConfig, shardings):
    """A freshly initialised `Transformer` or `ScoreModel` as `spec` says (parameters in fp32, no LoRA)."""
    kw = dict(rngs=nnx.Rngs(spec.seed), dtype=dtype_of(spec.dtype), shardings=shardings, remat=spec.remat)
    if spec.kind == "score":
        return ScoreModel(arch, **kw)
    return Transformer(arch, logits_chunk=spec.logits_chunk, **kw)


def _lora(model, spec: ModelSpec):
    if spec.lora_rank <= 0:
        return model
    return add_lora(model, rank=spec.lora_rank, alpha=spec.lora_alpha, targets=spec.lora_targets, seed=spec.seed)


def make_trainer(cfg: RunConfig, mesh, model, layout, loss_fn, *, lr: float | None = None,
                 total_steps: int | None = None, lora: bool = True) -> Trainer:
    """A Trainer with the run's optimizer (fp16 turns on loss scaling); `lora=False` trains every weight."""
    optim = cfg.optim if lr is None else dataclasses.replace(cfg.optim, lr=lr)
    loss_scale = None
    if cfg.precision.compute == "fp16":
        loss_scale = dataclasses.replace(cfg.precision.loss_scale, enabled=True)
    optimizer = make_optimizer(optim, total_steps or cfg.train.steps, loss_scale=loss_scale)
    only_lora = lora and cfg.model.lora.rank > 0 and cfg.model.lora.train_only_lora
    return Trainer(model, optimizer, loss_fn, mesh=mesh, layout=layout, wrt=nnx.LoRAParam if only_lora else nnx.Param)


# ------------------------------------------------------------------------------------------------- data
def dataset_paths(cfg: RunConfig, kind: str) -> tuple[tuple[str, ...], bool]:
    """The files a step reads and whether `data.split` applies. The built-in 'synthetic' dataset has a
    file per step (written under OUTPUT/data on first use), so no split."""
    if cfg.data.paths != ("synthetic",):
        return cfg.data.paths, True
    directory = cfg.data.cache_dir or os.path.join(cfg.output, "data")
    files = {key: os.path.join(directory, name) for key, name in synthetic.DATASET_FILES.items()}
    if not all(os.path.exists(f) for f in files.values()) and jax.process_index() == 0:
        synthetic.write_dataset_files(directory, seed=cfg.seed)
    _sync("synthetic-data")
    return (files[kind],), False


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


STEP_OF = {"sft": 1, "reward": 2, "prompt": 3}
SYNTHETIC_FILE = {"sft": "sft", "reward": "preference", "prompt": "prompt"}


def load_split(cfg: RunConfig, need: str, tokenizer):
    """(train records, eval records) for a step: eval from data.eval_path, else a held-out fraction."""
    paths, use_split = dataset_paths(cfg, SYNTHETIC_FILE[need])
    common = dict(need=need, fmt=cfg.data.format, seed=cfg.seed, tokenizer=tokenizer,
                  skip_bad_rows=cfg.data.skip_bad_rows)
    split = dict(split=cfg.data.split, step=STEP_OF[need]) if use_split else {}
    records = load_records(paths, **common, **split).records
    if cfg.data.eval_path:
        evals = load_records(cfg.data.eval_path, **common).records
        return records, evals
    n_eval = int(round(len(records) * cfg.data.eval_fraction))
    order = np.random.RandomState(cfg.seed).permutation(len(records))
    held = set(order[:n_eval].tolist())
    train = [r for i, r in enumerate(records) if i not in held]
    evals = [r for i, r in enumerate(records) if i in held]
    if not train:
        raise JaxrlError(f"data.eval_fraction={cfg.data.eval_fraction} leaves no training rows")
    return train, evals


def encoder(tokenizer) -> Encoder:
    return Encoder.from_tokenizer(tokenizer)


def micro_batch_rows(cfg: RunConfig, mesh) -> int:
    """Rows of one micro-batch over all processes; it must split evenly over the data axes."""
    rows = cfg.train.batch_size // cfg.optim.grad_accum
    shards = int(np.prod([mesh.shape[a] for a in DATA_AXES]))
    if rows % shards:
        raise JaxrlError(f"train.batch_size / optim.grad_accum = {rows} rows must be a multiple of the "
                         f"{shards} data-parallel devices (mesh.data x mesh.fsdp)")
    return rows


def iterator(arrays: dict, rows: int, seed: int, *, shuffle=True, num_epochs=None) -> BatchIterator:
    """A batch iterator reading this process's share of every global batch."""
    return BatchIterator(arrays, rows, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                         process_index=jax.process_index(), process_count=jax.process_count())


def eval_iterator(arrays: dict, rows: int, limit: int | None = None) -> BatchIterator:
    """One in-order pass over the first `limit` rows (all by default) in batches of `rows`, the last one
    padded and every batch carrying the `valid` row mask (`BatchIterator.pad_last`): every held-out row
    is evaluated once, whatever their number."""
    if limit is not None:
        arrays = {k: v[:limit] for k, v in arrays.items()}
    return BatchIterator(arrays, rows, shuffle=False, num_epochs=1, pad_last=True,
                         process_index=jax.process_index(), process_count=jax.process_count())


def to_device(batch: dict, sharding) -> dict:
    """This process's rows -> global arrays sharded over the data axes (no host gather)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def weighted_mean(metrics: list[dict]) -> dict:
    """Combines per-batch metrics by their 'weight' (what each averaged over)."""
    if not metrics:
        return {}
    w = np.array([float(m.get("weight", 1.0)) for m in metrics])
    keys = [k for k in metrics[0] if k != "weight"]
    return {k: float(np.sum(w * np.array([float(m[k]) for m in metrics])) / max(w.sum(), 1e-9)) for k in keys}


# Metrics of the optimizer, not of the loss: after a window of micro-batches they describe its one update.
OPTIMIZER_METRICS = ("grad_norm", "loss_scale", "skipped_steps")


def window_metrics(micro: list[dict]) -> dict:
    """One optimizer step's metrics from those of its `optim.grad_accum` micro-batches (host values).

    The loss function's metrics are their weighted mean, sum_i w_i m_i / sum_i w_i (all micro-batches of
    a window see the same parameters, so this is what one step on the window's rows together reports);
    the optimizer's (`OPTIMIZER_METRICS`: the norm of the applied window gradient, the loss scale, the
    skipped-step count) are the last micro-batch's; `weight` is sum_i w_i.
    """
    if len(micro) == 1:
        return micro[0]
    out = weighted_mean(micro)
    out.update({k: micro[-1][k] for k in OPTIMIZER_METRICS if k in micro[-1]})
    if "weight" in micro[-1]:
        out["weight"] = float(sum(float(m["weight"]) for m in micro))
    return out
