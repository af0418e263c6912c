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
        with jax.set_mesh(mesh):
            for _ in range(cfg.optim.grad_accum):
                batch = roles_lib.feed(role, build.to_device(next(batches), trainer.batch_sharding))
                state, metrics = trainer.step(state, batch)
        return state, metrics

    def evaluate(state):
        it = build.iterator(eval_arrays, rows, cfg.seed, shuffle=False, num_epochs=1)
        out = []
        with jax.set_mesh(mesh):
            for _, batch in zip(range(cfg.train.eval_batches), it):
                out.append(jax.device_get(trainer.evaluate(state, build.to_device(batch, trainer.batch_sharding))))
        metrics = build.weighted_mean(out)
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
        evaluate=evaluate if eval_arrays is not None and len(next(iter(eval_arrays.values()))) >= rows else None,
        export=export, data_state=batches.state, restore_data=batches.restore,
        show=("loss", "accuracy"), allow_nonfinite=cfg.precision.compute == "fp16",
    )
    loop.run(spec, build.schedule(cfg), cfg.output)
    return final
