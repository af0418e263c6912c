"""Training core: ZeRO stages 0-3 as shardings on 8 CPU devices give the 1-device result, with the
collectives and per-device bytes each stage promises; accumulation; fp16 loss scaling; bf16; remat."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl.models.config import preset
from jaxrl.models.transformer import Transformer
from jaxrl.optim import LossScaleConfig, OptimConfig, make_optimizer
from jaxrl.parallel.mesh import make_mesh
from jaxrl.parallel.sharding import model_shardings, zero_layout
from jaxrl.train.step import Trainer

CFG = preset("tiny")
STEPS = 5


def lm_loss(model, batch):
    """Token-mean next-token cross-entropy over real tokens."""
    logits = model(batch["input_ids"], batch["attention_mask"])[:, :-1]
    targets = batch["input_ids"][:, 1:]
    mask = batch["attention_mask"][:, 1:].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    weight = mask.sum()
    return (nll * mask).sum() / weight, {"weight": weight}


def make_batches(n, rows=16, t=12, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, CFG.vocab_size, size=(rows, t)).astype(np.int32)
        lengths = rng.integers(4, t + 1, size=rows)
        mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def build_trainer(mesh, stage, *, optim=None, loss_scale=None, dtype=jnp.float32, remat="none", loss=lm_loss):
    layout = zero_layout(lambda sh: Transformer(CFG, rngs=nnx.Rngs(0), shardings=sh, dtype=dtype, remat=remat),
                         mesh, stage)
    tensor = mesh.shape["tensor"] > 1
    with jax.set_mesh(mesh):
        model = Transformer(CFG, rngs=nnx.Rngs(0), dtype=dtype, remat=remat,
                            shardings=model_shardings(shard_params=stage == 3, tensor=tensor))
    opt = make_optimizer(optim or OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=2), 10, loss_scale=loss_scale)
    return Trainer(model, opt, loss, mesh=mesh, layout=layout)


def run(mesh, stage, batches, **kw):
    trainer = build_trainer(mesh, stage, **kw)
    state = trainer.init_state()
    losses = []
    with jax.set_mesh(mesh):
        for b in batches:
            state, metrics = trainer.step(state, b)
            losses.append(float(metrics["loss"]))
    return trainer, state, losses


BATCHES = make_batches(2) * 2 + make_batches(1)  # repeats, so the loss must fall

MESHES = {  # name -> (data, fsdp, tensor, stage)
    "data8-stage0": (8, 1, 1, 0),
    "data8-stage1": (8, 1, 1, 1),
    "data8-stage2": (8, 1, 1, 2),
    "fsdp8-stage3": (1, 8, 1, 3),
    "data2-fsdp4-stage3": (2, 4, 1, 3),
    "fsdp4-tensor2-stage3": (1, 4, 2, 3),
}


@pytest.fixture(scope="module")
def reference():
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, state, losses = run(mesh, 0, BATCHES)
    return jax.device_get(state.params), losses


def _max_rel(a, b):
    return max(float(np.abs(x - y).max() / (np.abs(y).max() + 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_training_matches_one_device(reference, name):
    ref_params, ref_losses = reference
    data, fsdp, tensor, stage = MESHES[name]
    _, state, losses = run(make_mesh(data, fsdp, tensor), stage, BATCHES)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    assert _max_rel(jax.device_get(state.params), ref_params) < 1e-5


def _collectives(hlo):
    return {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo)) for op in ("all-reduce", "reduce-scatter", "all-gather")}


def _per_device_bytes(tree):
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def test_each_stage_has_its_collectives_and_memory():
    batch = make_batches(1)[0]
    report = {}
    for stage in range(4):
        mesh = make_mesh(8, 1, 1)
        trainer = build_trainer(mesh, stage)
        state = trainer.init_state()
        with jax.set_mesh(mesh):
            hlo = trainer.lower(state, batch).compile().as_text()
        report[stage] = (_collectives(hlo), _per_device_bytes(state.params), _per_device_bytes(state.opt_state))
    total_params = sum(x.size * 4 for x in jax.tree.leaves(state.params))
    print("\nstage: collectives, per-device param bytes, per-device optimizer bytes (of", total_params, "param bytes)")
    for stage, row in report.items():
        print(stage, row)
    c = {s: r[0] for s, r in report.items()}
    assert c[0]["all-reduce"] > 0 and c[0]["reduce-scatter"] == 0
    assert c[1]["all-reduce"] > 0 and c[1]["reduce-scatter"] == 0
    assert c[2]["reduce-scatter"] > 0
    assert c[3]["reduce-scatter"] > 0 and c[3]["all-gather"] > 0
    params = {s: r[1] for s, r in report.items()}
    opt = {s: r[2] for s, r in report.items()}
    assert params[0] == params[1] == params[2] == total_params
    assert params[3] < total_params / 7  # about 1/8, plus the small replicated norm vectors
    assert opt[1] < opt[0] / 7 and opt[3] < opt[0] / 7


def test_grad_accum_equals_one_big_batch():
    mesh = make_mesh(8, 1, 1)
    big = make_batches(1, rows=32)[0]
    halves = [{k: v[:16] for k, v in big.items()}, {k: v[16:] for k, v in big.items()}]
    # MultiSteps averages micro-batch gradients, so compare with a loss that averages over rows (the halves'
    # token counts differ). A large Adam eps keeps the first update linear in the gradient: with eps=1e-8
    # Adam's first step is lr * sign(g), which float noise flips on near-zero gradients.
    def row_loss(model, batch):
        logits = model(batch["input_ids"], batch["attention_mask"])[:, :-1]
        mask = batch["attention_mask"][:, 1:].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
        return jnp.mean((nll * mask).sum(1) / mask.sum(1)), {}  # weight defaults to the rows

    opt = dict(lr=1e-2, clip_norm=0.0, eps=1e-2)
    _, s_big, _ = run(mesh, 2, [big], optim=OptimConfig(**opt), loss=row_loss)
    _, s_acc, _ = run(mesh, 2, halves, optim=OptimConfig(**opt, grad_accum=2), loss=row_loss)
    assert int(s_acc.step) == 2
    assert _max_rel(jax.device_get(s_acc.params), jax.device_get(s_big.params)) < 1e-6
