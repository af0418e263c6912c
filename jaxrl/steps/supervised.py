"""One trained role over a fixed dataset in the shared loop: what SFT (step 1) and the reward model
(step 2) share. A step supplies its role and its tokenized arrays; this builds mesh, trainer and loop."""

from __future__ import annotations

import math

import jax

from jaxrl.config import RunConfig
from jaxrl.models.hf import save_pretrained
from jaxrl.steps import role as roles_lib
from jaxrl.steps.role import Role
from jaxrl.train import build, loop


def run(cfg: RunConfig, name: str, role: Role, mesh, train_arrays: dict, eval_arrays: dict | None,
        tokenizer, *, trainer=None, state=None, prepare=None, show=("loss", "accuracy")) -> dict:
    """Trains `role` on `train_arrays` for train.steps; writes OUTPUT/hf. Returns the last eval metrics.

    `trainer`, `state`: the role's Trainer and its initial TrainState when the step built them already
    (default: built here). `prepare(state,
    batch) -> batch`: adds inputs computed on the devices to every training and evaluation batch (DPO's
    reference log-probs). `show`: the metrics on the progress bar.
    """
    trainer = trainer or roles_lib.trainer(role, cfg, mesh)
    prepare = prepare or (lambda state, batch: batch)
    rows = role.batch[next(iter(role.batch))][0][0]
    batches = build.iterator(train_arrays, rows, cfg.seed)
    final = {}

    def update(state, step):
        micro = []
        with jax.set_mesh(mesh):
            for _ in range(cfg.optim.grad_accum):
                batch = build.to_device(next(batches), trainer.batch_sharding)
                batch = roles_lib.feed(role, prepare(state, batch))
                state, metrics = trainer.step(state, batch)
                micro.append(metrics)
        return state, build.window_metrics(jax.device_get(micro))

    def evaluate(state):
        metrics = evaluate_rows(trainer, state, eval_arrays, rows, limit=cfg.train.eval_batches * rows,
                                prepare=prepare)
        if name == "sft":
            metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
        final.clear()
        final.update(metrics)
        return metrics

    def export(state, directory):
        with jax.set_mesh(mesh):
            save_pretrained(trainer.model(state), directory, tokenizer=tokenizer)

    spec = loop.Loop(
        name=name, steps=cfg.train.steps, state=trainer.init_state() if state is None else state, update=update,
        evaluate=evaluate if eval_arrays is not None else None,
        export=export, data_state=batches.state, restore_data=batches.restore,
        show=show, allow_nonfinite=cfg.precision.compute == "fp16", config=cfg,
    )
    loop.run(spec, build.schedule(cfg), cfg.output)
    return final


def evaluate_rows(trainer, state, arrays: dict, rows: int, *, limit: int | None = None, prepare=None) -> dict:
    """The loss function's metrics over the first `limit` rows of `arrays` (all by default), in batches
    of `rows` (the last one padded, its padding rows weighted 0): the metrics of one batch of exactly
    those rows. `prepare` as in `run`."""
    out = []
    with jax.set_mesh(trainer.mesh):
        for batch in build.eval_iterator(arrays, rows, limit):
            batch = build.to_device(batch, trainer.batch_sharding)
            if prepare is not None:
                batch = prepare(state, batch)
            out.append(jax.device_get(trainer.evaluate(state, batch)))
    return build.weighted_mean(out)
