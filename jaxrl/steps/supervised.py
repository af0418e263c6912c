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
        tokenizer) -> dict:
    """Trains `role` on `train_arrays` for train.steps; writes OUTPUT/hf. Returns the last eval metrics."""
    trainer = roles_lib.trainer(role, cfg, mesh)
    rows = role.batch[next(iter(role.batch))][0][0]
    batches = build.iterator(train_arrays, rows, cfg.seed)
    final = {}

    def update(state, step):
        micro = []
        with jax.set_mesh(mesh):
            for _ in range(cfg.optim.grad_accum):
                batch = roles_lib.feed(role, build.to_device(next(batches), trainer.batch_sharding))
                state, metrics = trainer.step(state, batch)
                micro.append(metrics)
        return state, build.window_metrics(jax.device_get(micro))

    def evaluate(state):
        metrics = evaluate_rows(trainer, state, eval_arrays, rows, limit=cfg.train.eval_batches * rows)
        if name == "sft":
            metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
        final.clear()
        final.update(metrics)
        return metrics

    def export(state, directory):
        with jax.set_mesh(mesh):
            save_pretrained(trainer.model(state), directory, tokenizer=tokenizer)

    spec = loop.Loop(
        name=name, steps=cfg.train.steps, state=trainer.init_state(), update=update,
        evaluate=evaluate if eval_arrays is not None else None,
        export=export, data_state=batches.state, restore_data=batches.restore,
        show=("loss", "accuracy"), allow_nonfinite=cfg.precision.compute == "fp16", config=cfg,
    )
    loop.run(spec, build.schedule(cfg), cfg.output)
    return final


def evaluate_rows(trainer, state, arrays: dict, rows: int, *, limit: int | None = None) -> dict:
    """The loss function's metrics over the first `limit` rows of `arrays` (all by default), in batches
    of `rows` (the last one padded, its padding rows weighted 0): the metrics of one batch of exactly
    those rows."""
    out = []
    with jax.set_mesh(trainer.mesh):
        for batch in build.eval_iterator(arrays, rows, limit):
            out.append(jax.device_get(trainer.evaluate(state, build.to_device(batch, trainer.batch_sharding))))
    return build.weighted_mean(out)
