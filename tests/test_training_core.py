"""Training core: ZeRO stages 0-3 as shardings on 8 CPU devices give the 1-device result, with the
collectives and per-device bytes each stage promises; accumulation; fp16 loss scaling; bf16; remat."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl.algorithms.sft import sft_loss
from jaxrl.models.config import preset
from jaxrl.models.transformer import Transformer, shard_activations
from jaxrl.optim import LossScaleConfig, OptimConfig, make_optimizer
from jaxrl.parallel.mesh import make_mesh
from jaxrl.parallel.sharding import DATA_AXES, model_shardings, spec_tree, zero_layout
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


def build_trainer(mesh, stage, *, optim=None, loss_scale=None, dtype=jnp.float32, remat="none", loss=lm_loss,
                  vocab_chunk=0):
    kw = dict(dtype=dtype, remat=remat, vocab_chunk=vocab_chunk)
    layout = zero_layout(lambda sh: Transformer(CFG, rngs=nnx.Rngs(0), shardings=sh, **kw), mesh, stage)
    tensor = mesh.shape["tensor"] > 1
    with jax.set_mesh(mesh):
        model = Transformer(CFG, rngs=nnx.Rngs(0), shardings=model_shardings(shard_params=stage == 3, tensor=tensor),
                            **kw)
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


def test_stage3_vocabulary_slices_match_one_device():
    """ZeRO-3 over 8 devices with the SFT loss's LM head in 24-entry vocabulary slices (each gathered
    on its own, the embedding looked up in the shards) trains exactly as one device over the whole
    vocabulary."""
    batches = [dict(b, loss_mask=b["attention_mask"]) for b in BATCHES[:2]]
    _, want, want_losses = run(make_mesh(1, 1, 1, devices=jax.devices()[:1]), 0, batches, loss=sft_loss)
    _, got, losses = run(make_mesh(1, 8, 1), 3, batches, loss=sft_loss, vocab_chunk=24)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert _max_rel(jax.device_get(got.params), jax.device_get(want.params)) < 1e-5


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


def _while_bodies(hlo):
    """{computation name: its text} for every computation some while loop runs as its body."""
    names = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    comps = re.split(r"\n(?=\S[^\n]*\{\s*$)", hlo, flags=re.M)
    return {m.group(1): c for c in comps if (m := re.match(r"%?([\w.\-]+)", c)) and m.group(1) in names}


def test_stage3_gathers_one_layer_at_a_time():
    """ZeRO-3 all-gathers inside the layer scan, so temporaries grow with the activations, not with the
    full parameters, as layers are added (gathering the whole model first grew them by ~1.25x the
    added parameter bytes). The vocabulary tables (V = 96, E = 64) are never gathered whole: the SFT
    loss's LM head gathers 24-entry slices inside its vocabulary loop (reduce-scattering their
    gradients there), and the embedding is looked up in each device's shard through an all-to-all."""
    ids = jax.ShapeDtypeStruct((8, 8), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": ids, "loss_mask": ids}
    mesh = make_mesh(1, 8, 1)
    temp, param_bytes = {}, {}
    for layers in (2, 8):
        cfg = CFG.replace(num_layers=layers, vocab_size=96)
        build = lambda sh: Transformer(cfg, rngs=nnx.Rngs(0), shardings=sh, vocab_chunk=24)  # noqa: E731
        with jax.set_mesh(mesh):
            model = nnx.eval_shape(lambda: build(model_shardings(shard_params=True, tensor=False)))
        trainer = Trainer(model, make_optimizer(OptimConfig(lr=1e-2), 10), sft_loss, mesh=mesh,
                          layout=zero_layout(build, mesh, 3))
        state = trainer.abstract_state()
        with jax.set_mesh(mesh):
            compiled = trainer.lower(state, batch).compile()
        temp[layers] = compiled.memory_analysis().temp_size_in_bytes
        param_bytes[layers] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    hlo = compiled.as_text()
    bodies = "\n".join(_while_bodies(hlo).values())
    gathers_in_loops = len(re.findall(r"\ball-gather(?:-start)?\(", bodies))
    scatters_in_loops = len(re.findall(r"\breduce-scatter(?:-start)?\(", bodies))
    projections = 7  # q, k, v, o, gate, up, down: gathered in the forward scan and again in the backward scan
    assert gathers_in_loops >= 2 * projections, gathers_in_loops
    assert scatters_in_loops >= projections, scatters_in_loops  # each layer's gradient, in the backward scan
    assert temp[8] - temp[2] < 0.5 * (param_bytes[8] - param_bytes[2]), (temp, param_bytes)
    gathered = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo)
    assert "64,96" not in gathered and "96,64" not in gathered, gathered  # no whole LM head or embedding
    assert len(re.findall(r"= \w+\[64,24\]\S* all-gather(?:-start)?\(", bodies)) >= 2  # head slices, fwd + bwd
    assert re.search(r"\ball-to-all(?:-start)?\(", hlo)  # the embedding lookup


def test_stage2_reduce_scatters_each_layer_in_the_backward_scan():
    """ZeRO-2 uses its replicated layers as they are and reduce-scatters each layer's gradient inside the
    backward scan, so no full-size gradient of the stack exists: temporaries grow by well under the added
    layers' fp32 gradient bytes. Scattering the whole gradient tree after the backward pass grew them by
    1.2x those bytes here (measured: 28.6 MB for 23.6 MB of added layers; per layer: 7.0 MB)."""
    ids = jax.ShapeDtypeStruct((64, 64), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": ids, "loss_mask": ids}
    mesh = make_mesh(8, 1, 1)
    temp, layer_bytes = {}, {}
    for layers in (2, 8):
        cfg = CFG.replace(num_layers=layers, hidden_size=256, intermediate_size=1024, head_dim=64, vocab_size=1024)
        build = lambda sh: Transformer(cfg, rngs=nnx.Rngs(0), shardings=sh, remat="full",  # noqa: E731
                                       dtype=jnp.bfloat16)
        with jax.set_mesh(mesh):
            model = nnx.eval_shape(lambda: build(model_shardings(shard_params=False, tensor=False)))
        trainer = Trainer(model, make_optimizer(OptimConfig(lr=1e-2), 10), sft_loss, mesh=mesh,
                          layout=zero_layout(build, mesh, 2))
        state = trainer.abstract_state()
        with jax.set_mesh(mesh):
            compiled = trainer.lower(state, batch).compile()
        temp[layers] = compiled.memory_analysis().temp_size_in_bytes
        layer_bytes[layers] = sum(x.size * 4 for x in jax.tree.leaves(state.params["layers"]))
    bodies = "\n".join(_while_bodies(compiled.as_text()).values())
    scatters_in_loops = len(re.findall(r"\breduce-scatter(?:-start)?\(", bodies))
    assert scatters_in_loops >= 7, scatters_in_loops  # q, k, v, o, gate, up, down, in the backward scan
    assert not re.findall(r"\ball-gather(?:-start)?\(", bodies)  # the forward reads the replicated layers
    assert temp[8] - temp[2] < 0.5 * (layer_bytes[8] - layer_bytes[2]), (temp, layer_bytes)


def test_stage3_frozen_forward_gathers_one_layer_at_a_time():
    """A frozen model's GSPMD forward on ZeRO-3 parameters (PPO's reference and reward scoring, eval)
    gathers inside the scan too: its temporaries do not grow with the layers' parameter bytes."""
    mesh = make_mesh(1, 8, 1)
    ids = jax.ShapeDtypeStruct((8, 8), jnp.int32, sharding=NamedSharding(mesh, P(DATA_AXES)))
    temp, param_bytes = {}, {}
    for layers in (2, 8):
        with jax.set_mesh(mesh):
            model = nnx.eval_shape(lambda: Transformer(CFG.replace(num_layers=layers), rngs=nnx.Rngs(0),
                                                       shardings=model_shardings(shard_params=True, tensor=False)))
        graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                             nnx.to_pure_dict(state), spec_tree(state))
        forward = jax.jit(lambda st, i: shard_activations(nnx.merge(graphdef, st), P(DATA_AXES))(i).sum())
        with jax.set_mesh(mesh):
            temp[layers] = forward.lower(state, ids).compile().memory_analysis().temp_size_in_bytes
        param_bytes[layers] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    assert temp[8] - temp[2] < 0.1 * (param_bytes[8] - param_bytes[2]), (temp, param_bytes)


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


# ----------------------------------------------------------------------------------- precision, remat, LoRA
def boosted_loss(model, batch):
    """lm_loss times batch['boost'] (1 normally; 1e35 forces an overflow once the loss is scaled)."""
    loss, metrics = lm_loss(model, batch)
    return loss * batch["boost"][0], metrics


def test_fp16_overflow_skips_the_step_and_rescales():
    mesh = make_mesh(8, 1, 1)
    ls = LossScaleConfig(enabled=True, initial_scale_power=8, loss_scale_window=2, hysteresis=1)
    trainer = build_trainer(mesh, 1, dtype=jnp.float16, loss_scale=ls, loss=boosted_loss)
    state = trainer.init_state()
    base = make_batches(1)[0]
    normal = dict(base, boost=np.ones((16,), np.float32))
    overflow = dict(base, boost=np.full((16,), 1e35, np.float32))
    scales, skipped, losses = [], [], []
    with jax.set_mesh(mesh):
        state, m = trainer.step(state, normal)
        before = jax.device_get((state.params, state.opt_state))
        state, m_over = trainer.step(state, overflow)
        after = jax.device_get((state.params, state.opt_state))
        for _ in range(5):
            state, m = trainer.step(state, normal)
            scales.append(float(m["loss_scale"]))
            skipped.append(int(m["skipped_steps"]))
            losses.append(float(m["loss"]))
    # Parameters and Adam moments bit-identical across the overflowing step.
    for x, y in zip(jax.tree.leaves(before[0]), jax.tree.leaves(after[0])):
        np.testing.assert_array_equal(x, y)
    moments_before = [x for x in jax.tree.leaves(before[1]) if np.ndim(x) > 0]
    moments_after = [x for x in jax.tree.leaves(after[1]) if np.ndim(x) > 0]
    for x, y in zip(moments_before, moments_after):
        np.testing.assert_array_equal(x, y)
    assert int(m_over["skipped_steps"]) == 1 and float(m_over["loss_scale"]) == 2.0 ** 7
    assert np.all(np.isfinite(losses)) and skipped == [1] * 5
    assert max(scales) > 2.0 ** 7  # the scale grows again after `loss_scale_window` finite steps
    assert losses[-1] < losses[0]


def test_bf16_training_lowers_the_loss():
    _, _, losses = run(make_mesh(8, 1, 1), 0, make_batches(1) * 5, dtype=jnp.bfloat16)
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_gradients(remat):
    batch = make_batches(1)[0]

    def grads(policy):
        model = Transformer(CFG, rngs=nnx.Rngs(0), remat=policy)
        return nnx.grad(lambda m: lm_loss(m, batch)[0])(model)

    ref, got = jax.tree.leaves(grads("none")), jax.tree.leaves(grads(remat))
    for x, y in zip(got, ref):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_lora_trains_only_lora_and_merges_for_export(tmp_path):
    from jaxrl.models.hf import load_pretrained, save_pretrained
    from jaxrl.models.lora import add_lora, merge_lora

    mesh = make_mesh(2, 2, 2)
    lora = dict(rank=4, alpha=8.0, targets=("q", "v", "down"))

    def build(sh):
        return add_lora(Transformer(CFG, rngs=nnx.Rngs(0), shardings=sh), **lora)

    layout = zero_layout(build, mesh, 3)
    with jax.set_mesh(mesh):
        model = build(model_shardings(shard_params=True))
    trainer = Trainer(model, make_optimizer(OptimConfig(lr=1e-2), 10), lm_loss, mesh=mesh, layout=layout,
                      wrt=nnx.LoRAParam)
    state = trainer.init_state()
    frozen_before = jax.device_get(state.frozen)
    batch = make_batches(1)[0]
    losses = []
    with jax.set_mesh(mesh):
        for _ in range(3):
            state, m = trainer.step(state, batch)
            losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    # A [L, in, r] and B [L, r, out] per target, stacked over the layers like their kernels
    assert {x.shape[0] for x in jax.tree.leaves(state.params)} == {CFG.num_layers}
    assert set(jax.tree.leaves(jax.tree.map(lambda x: x.ndim, state.params))) == {3}
    assert len(jax.tree.leaves(state.params)) == 2 * 3
    for x, y in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(jax.device_get(state.frozen))):
        np.testing.assert_array_equal(x, y)

    trained = trainer.model(state)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with jax.set_mesh(mesh):
        unmerged = np.asarray(trained(ids, mask))
        save_pretrained(trained, str(tmp_path / "merged"))
        merged = np.asarray(merge_lora(nnx.clone(trained))(ids, mask))
    exported = np.asarray(load_pretrained(str(tmp_path / "merged"))(ids, mask))
    assert np.abs(unmerged - np.asarray(Transformer(CFG, rngs=nnx.Rngs(0))(ids, mask))).max() > 1e-3
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(exported, unmerged, rtol=1e-5, atol=1e-5)


def test_mesh_that_does_not_fit_the_devices_is_a_clear_error():
    from jaxrl.errors import JaxrlError

    with pytest.raises(JaxrlError, match=r"mesh.data=3 x mesh.fsdp=1 x mesh.tensor=1 needs 3 devices but 8"):
        make_mesh(3, 1, 1)
    with pytest.raises(JaxrlError, match="only one axis may be -1"):
        make_mesh(-1, -1, 1)
    with pytest.raises(JaxrlError, match="do not divide the 8"):
        make_mesh(-1, 3, 1)
