"""`jaxrl eval-reward`: score a preference dataset with a reward model (DeepSpeed-Chat's `rw_eval.py`).

Every pair is scored, chosen and rejected alike, at the last real token of `prompt + response + EOS`
(the token the reward model was trained to score). The report is one JSON object:

    pairs, accuracy (share of pairs with score(chosen) > score(rejected)), chosen_mean, rejected_mean,
    margin_mean, margin_std (margin = chosen - rejected), quantiles of each, dropped (pairs too long)
"""

from __future__ import annotations

import os

import numpy as np

from jaxrl.errors import JaxrlError

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="reward model: an HF sequence-classification directory (e.g. OUTPUT/hf of `jaxrl reward`)")
    parser.add_argument("--data", required=True, metavar="FILE", help="preference dataset (JSONL, JSON, parquet...)")
    parser.add_argument("--format", default="auto", help="the data's format (as data.format); auto detects it")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B", help="sequences per forward pass")
    parser.add_argument("--max-len", type=int, default=64, metavar="N",
                        help="tokens per sequence; longer prompts lose tokens from the left")
    parser.add_argument("--output", metavar="FILE.json", help="also write the report here")


def run(args) -> int:
    if args.batch_size < 1:
        raise JaxrlError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_model_dir(args.model)
    if not os.path.exists(args.data):
        raise JaxrlError(f"data file {args.data} does not exist")

    from jaxrl.data.dataset import load_records
    from jaxrl.data.tokenize import Encoder, tokenize_pairs
    from jaxrl.train.build import load_tokenizer
    from jaxrl.train.metrics import strict_json

    tokenizer = load_tokenizer(args.model, what="--model")
    records = load_records(args.data, need="reward", fmt=args.format, tokenizer=tokenizer).records
    pairs = tokenize_pairs(records, Encoder.from_tokenizer(tokenizer), max_len=args.max_len)
    a = pairs.arrays
    chosen, rejected = score_pairs(args.model, a["chosen_input_ids"], a["chosen_attention_mask"],
                                   a["rejected_input_ids"], a["rejected_attention_mask"],
                                   batch_size=args.batch_size)
    report = summarize(chosen, rejected)
    report["dropped"] = pairs.dropped
    text = strict_json(report, indent=2)  # a NaN score (a diverged model) is null, not invalid JSON
    print(text)
    if args.output:
        _write(args.output, text + "\n")
    return 0


def _check_model_dir(path: str) -> None:
    """A clear error before any loading: the directory, its config and its score head must exist."""
    if not os.path.isdir(path):
        raise JaxrlError(f"model directory {path} does not exist (give the HF directory a `jaxrl reward` run "
                         "wrote, e.g. OUTPUT/hf)")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise JaxrlError(f"{path} has no config.json: not an HF model directory")
    from jaxrl.models.safetensors_io import TensorStore

    if "score.weight" not in TensorStore(path).keys():
        raise JaxrlError(f"{path} has no score head (tensor score.weight): it is not a reward model; give the "
                         "output of `jaxrl reward`")



def score_pairs(model_dir: str, chosen_ids, chosen_mask, rejected_ids, rejected_mask, *, batch_size: int):
    """Scores (N,), (N,) of the chosen and rejected sequences (N, T), data-parallel over every device.

    All batches have the same shape (the last is padded with copies of a real row, dropped after), so
    the score function compiles once.
    """
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxrl.models.hf import load_pretrained
    from jaxrl.parallel.mesh import make_mesh
    from jaxrl.parallel.sharding import DATA_AXES, model_shardings

    mesh = make_mesh(-1)
    shards = mesh.shape["data"]
    rows = -(-batch_size // shards) * shards  # a multiple of the data-parallel devices
    with jax.set_mesh(mesh):
        model = load_pretrained(model_dir, kind="score", shardings=model_shardings(shard_params=False, tensor=False))
    graphdef, state = nnx.split(model)
    batch_sharding = NamedSharding(mesh, P(DATA_AXES))

    @jax.jit
    def score(state, ids, mask):  # (B, T), (B, T) -> (B,)
        return nnx.merge(graphdef, state).sequence_score(ids, mask)

    ids = np.concatenate([chosen_ids, rejected_ids])  # (2N, T)
    mask = np.concatenate([chosen_mask, rejected_mask])
    n = len(ids)
    out = []
    with jax.set_mesh(mesh):
        for start in range(0, n, rows):
            take = np.arange(start, start + rows)
            take[take >= n] = n - 1  # pad rows: a real row, so the padded batch has no all-masked row
            batch = [jax.device_put(x[take], batch_sharding) for x in (ids, mask)]
            out.append(np.asarray(jax.device_get(score(state, *batch)))[: n - start])
    scores = np.concatenate(out).astype(np.float64)
    return scores[: n // 2], scores[n // 2:]


def summarize(chosen: np.ndarray, rejected: np.ndarray) -> dict:
    """The report (see the module docstring) from per-pair scores (N,), (N,)."""
    margin = chosen - rejected

    def quantiles(x):
        return {f"p{round(q * 100)}": float(v) for q, v in zip(QUANTILES, np.quantile(x, QUANTILES))}

    return {
        "pairs": int(len(chosen)),
        "accuracy": float(np.mean(margin > 0)),
        "chosen_mean": float(np.mean(chosen)),
        "rejected_mean": float(np.mean(rejected)),
        "margin_mean": float(np.mean(margin)),
        "margin_std": float(np.std(margin)),
        "quantiles": {"chosen": quantiles(chosen), "rejected": quantiles(rejected), "margin": quantiles(margin)},
    }


def _write(path: str, text: str) -> None:
    """Writes next to `path` and renames into place, so a failure leaves no half-written file."""
    from jaxrl.io import atomic_write

    with atomic_write(path) as f:
        f.write(text)
