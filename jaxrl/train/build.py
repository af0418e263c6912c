"""From a RunConfig to the pieces every step shares: mesh, tokenizer, architecture, data, the loop's schedule."""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxrl.config import RunConfig
from jaxrl.data import synthetic
from jaxrl.data.dataset import load_records
from jaxrl.data.iterator import BatchIterator
from jaxrl.data.tokenize import Encoder
from jaxrl.errors import JaxrlError
from jaxrl.models import config as model_config
from jaxrl.models.hf import check_tokenizer_files, read_config
from jaxrl.parallel.mesh import make_mesh
from jaxrl.parallel.sharding import data_parallel_size
from jaxrl.train.loop import Schedule


def training_mesh(cfg: RunConfig):
    return make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)


# ---------------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(model_path: str, *, what: str = "model.path"):
    """The tokenizer of an HF directory; presets use the synthetic task's character tokenizer. `what` names
    the setting the path came from, for the error."""
    if model_path in model_config.PRESETS:
        return synthetic.build_tokenizer()
    from transformers import AutoTokenizer  # heavy: only when a directory is read

    if not os.path.isdir(model_path):
        raise JaxrlError(f"{what} {model_path!r} is neither an HF directory nor a preset "
                         f"({', '.join(sorted(model_config.PRESETS))})")
    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        check_tokenizer_files(model_path)
        raise JaxrlError(f"{model_path} has no usable tokenizer files ({e}); save the tokenizer there") from e


# ------------------------------------------------------------------------------------------------ model
def model_arch(path: str, tokenizer=None) -> model_config.ModelConfig:
    """The architecture: read from config.json, or a preset sized to the tokenizer (None: the preset's own)."""
    if path in model_config.PRESETS:
        tokenizer = load_tokenizer(path) if tokenizer is None else tokenizer
        vocab = -(-len(tokenizer) // 64) * 64  # round up so every mesh axis divides it
        return model_config.preset(path, vocab_size=vocab, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    return read_config(path)


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
    shards = data_parallel_size(mesh)
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


def schedule(cfg: RunConfig) -> Schedule:
    """When the shared loop logs, evaluates, saves and exports (the `train.*_every` keys)."""
    t = cfg.train
    return Schedule(log_every=t.log_every, eval_every=t.eval_every, save_every=t.save_every,
                    export_every=t.export_every, keep=t.keep_checkpoints)


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
