"""The DeepSpeed-style engine (`jaxrl.initialize`) and the DeepSpeed config keys it understands."""

import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from compiles import compiles
import jaxrl
from jaxrl.deepspeed import config as dsc
from jaxrl.config import RunConfig, apply_overrides
from jaxrl.errors import JaxrlError
from jaxrl.optim import LossScaleConfig
from jaxrl.parallel.mesh import make_mesh
from jaxrl.parallel.sharding import DATA_AXES, generic_zero_layout
from jaxrl.precision import loss_scale_of

DOC_CONFIG = {"train_batch_size": 32, "gradient_accumulation_steps": 4, "fp16": {"enabled": True}}


# ------------------------------------------------------------------------------------------ fixtures
def regression_data(n=512, seed=0):
    """y = 3x + 2 + noise, the DeepSpeed document's linear-regression task."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1)).astype(np.float32)
    return x, (3 * x + 2 + 0.1 * rng.normal(size=x.shape)).astype(np.float32)


def micro_batches(x, y, rows):
    return [{"x": x[i:i + rows], "y": y[i:i + rows]} for i in range(0, len(x), rows)]


def mse(model, batch):
    pred = model(batch["x"]).astype(jnp.float32)
    return jnp.mean((pred - batch["y"].astype(jnp.float32)) ** 2)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(16, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


def classification_batches(n_batches, rows=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, 16)).astype(np.float32)
    out = []
    for _ in range(n_batches):
        labels = rng.integers(0, 8, size=rows)
        out.append({"x": centers[labels] + 0.5 * rng.normal(size=(rows, 16)).astype(np.float32),
                    "label": labels.astype(np.int32)})
    return out


def cross_entropy(model, batch):
    logits = model(batch["x"]).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


def one_device():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def per_device_bytes(tree):
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------ the engine
def test_document_config_trains_linear_regression_with_fp16_and_accumulation():
    engine = jaxrl.initialize(model=nnx.Linear(1, 1, rngs=nnx.Rngs(0)), optimizer=optax.adam(0.05),
                              config=DOC_CONFIG)
    assert (engine.micro_batch_size, engine.gradient_accumulation_steps, engine.config.dp_size) == (8, 4, 8)
    x, y = regression_data()
    history = []
    with compiles() as counts:
        for _ in range(4):
            for batch in micro_batches(x, y, engine.micro_batch_size):
                before = np.asarray(engine.model.kernel[...]).copy()
                m = engine.step(mse, batch)
                changed = not np.array_equal(before, np.asarray(engine.model.kernel[...]))
                history.append((bool(m["applied"]), changed, float(m["loss"]), float(m["loss_scale"]),
                                int(m["skipped_steps"])))
    applied, changed, losses, scales, skipped = map(list, zip(*history))

    assert counts["step"] == 1  # one jitted step for this loss_fn, reused on every call
    assert applied == changed  # `applied` says exactly when the parameters moved
    assert not any(applied[i] for i in range(len(applied)) if (i + 1) % 4)  # only every 4th call
    assert all(applied[i] for i in range(len(applied) // 2, len(applied)) if (i + 1) % 4 == 0)
    # fp16: DeepSpeed's scaler starts at 2^16, whose loss gradient overflows fp16; it backs off and settles.
    assert scales[0] == 2.0**16 and scales[-1] < 2.0**16 and skipped[-1] >= 1
    assert sum(1 for i, a in enumerate(applied) if (i + 1) % 4 == 0 and not a) == skipped[-1]
    assert np.mean(losses[-16:]) < 0.05 < losses[0]
    assert engine.model.kernel[...].dtype == jnp.float32  # fp32 master weights
    np.testing.assert_allclose([float(engine.model.kernel[0, 0]), float(engine.model.bias[0])], [3, 2], atol=0.1)


EQUIVALENCE = {  # name -> (model, batches, loss_fn, config, stage)
    "linear-stage0": (lambda: nnx.Linear(1, 1, rngs=nnx.Rngs(0)), lambda: micro_batches(*regression_data(192), 8),
                      mse, {"train_batch_size": 32, "gradient_accumulation_steps": 4}),
    "mlp-stage3": (lambda: MLP(nnx.Rngs(0)), lambda: classification_batches(24), cross_entropy,
                   {"train_batch_size": 32, "gradient_accumulation_steps": 4, "zero_optimization": {"stage": 3},
                    "gradient_clipping": 1.0,
                    "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "weight_decay": 0.01}},
                    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 2, "warmup_type": "linear"}}}),
}


@pytest.mark.parametrize("name", list(EQUIVALENCE))
def test_eight_devices_match_one_device(name):
    build, batches, loss_fn, config = EQUIVALENCE[name]
    optimizer = optax.adam(0.3) if "optimizer" not in config else None
    runs = {}
    for mesh in (one_device(), make_mesh()):
        engine = jaxrl.initialize(model=build(), optimizer=optimizer, config=config, mesh=mesh)
        losses = [float(engine.step(loss_fn, b)["loss"]) for b in batches()]
        runs[mesh.size] = losses, jax.device_get(nnx.to_pure_dict(nnx.state(engine.model))), engine
    (l1, p1, _), (l8, p8, e8) = runs[1], runs[8]
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p8, p1)
    assert np.mean(l8[-4:]) < np.mean(l8[:4])
    if config.get("zero_optimization", {}).get("stage") == 3:  # parameters really are split 8 ways
        total = sum(x.nbytes for x in jax.tree.leaves(e8.state.params))
        assert per_device_bytes(e8.state.params) < total / 7


def test_bf16_casts_model_and_inputs_for_compute_and_keeps_fp32_masters():
    seen = []

    def loss_fn(model, batch):
        seen.append((model.kernel[...].dtype, batch["x"].dtype))
        return mse(model, batch)

    config = {"train_batch_size": 8, "bf16": {"enabled": True}}
    engine = jaxrl.initialize(model=nnx.Linear(1, 1, rngs=nnx.Rngs(0)), optimizer=optax.adam(0.1), config=config)
    losses = [float(engine.step(loss_fn, b)["loss"]) for b in micro_batches(*regression_data(400), 8)]
    assert seen == [(jnp.bfloat16, jnp.bfloat16)]
    assert engine.model.kernel[...].dtype == jnp.float32
    assert np.mean(losses[-5:]) < 0.1 * losses[0]


def test_save_then_load_into_a_fresh_engine_continues_identically(tmp_path):
    # fp16 with a small initial scale, saved in the middle of an accumulation window: the loss scale,
    # its counters and the half-filled accumulator must all come back.
    config = {"train_batch_size": 16, "gradient_accumulation_steps": 2,
              "fp16": {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 3}}

    def fresh():
        return jaxrl.initialize(model=nnx.Linear(1, 1, rngs=nnx.Rngs(0)), optimizer=optax.adam(0.05), config=config)

    batches = micro_batches(*regression_data(8 * 15), 8)
    a = fresh()
    for b in batches[:7]:
        a.step(mse, b)
    assert a.save(tmp_path / "ckpt", client_state={"epoch": 1}) == 7
    continued = [float(a.step(mse, b)["loss"]) for b in batches[7:]]
    scale_a = float(a.step(mse, batches[0])["loss_scale"])

    b_engine = fresh()
    assert b_engine.load(tmp_path / "ckpt") == {"epoch": 1}
    assert (b_engine.micro_steps, b_engine.global_steps) == (7, 3)
    resumed = [float(b_engine.step(mse, b)["loss"]) for b in batches[7:]]
    assert resumed == continued
    assert float(b_engine.step(mse, batches[0])["loss_scale"]) == scale_a


def test_step_rejects_a_batch_of_the_wrong_size():
    engine = jaxrl.initialize(model=nnx.Linear(1, 1, rngs=nnx.Rngs(0)), optimizer=optax.sgd(0.1), config=DOC_CONFIG)
    x, y = regression_data(32)
    with pytest.raises(JaxrlError, match=r"8 rows.*train_batch_size 32 / gradient_accumulation_steps 4"):
        engine.step(mse, {"x": x, "y": y})


# ------------------------------------------------------------------------------ config keys -> behaviour
@pytest.mark.parametrize("keys,dp,expected", [
    ({"train_batch_size": 32, "gradient_accumulation_steps": 4}, 8, (32, 1, 4)),
    ({"train_batch_size": 32, "gradient_accumulation_steps": 4}, 1, (32, 8, 4)),
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 2}, 8, (32, 2, 2)),
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, 4, (24, 2, 3)),
    ({"train_batch_size": 16}, 8, (16, 2, 1)),
    ({"train_micro_batch_size_per_gpu": 4}, 2, (8, 4, 1)),
    ({"train_batch_size": 48, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, 8, (48, 2, 3)),
])
def test_batch_size_keys(keys, dp, expected):
    ds = dsc.parse(keys, dp)
    assert (ds.train_batch_size, ds.micro_batch_per_device, ds.grad_accum) == expected
    assert ds.micro_batch == expected[0] // expected[2]


@pytest.mark.parametrize("keys,dp,match", [
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}, 8,
     r"train_batch_size \(32\) must equal train_micro_batch_size_per_gpu \(2\) x gradient_accumulation_steps "
     r"\(4\) x 8 data-parallel devices = 64"),
    ({"train_batch_size": 30, "gradient_accumulation_steps": 4}, 8, r"train_batch_size \(30\) is not divisible"),
    ({"train_batch_size": 12, "train_micro_batch_size_per_gpu": 5}, 1, r"gradient_accumulation_steps cannot be"),
    ({"gradient_accumulation_steps": 4}, 8, r"needs train_batch_size or train_micro_batch_size_per_gpu"),
    ({"train_batch_size": 0}, 8, r"'train_batch_size' must be a positive integer"),
    ({"train_batch_size": "auto"}, 8, r"'auto'"),
])
def test_batch_size_rule_errors_name_the_keys(keys, dp, match):
    with pytest.raises(JaxrlError, match=match):
        dsc.parse(keys, dp)


def _update(tx, grads, params, steps=1):
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
    return updates


def test_gradient_clipping_is_in_the_chain():
    params, grads = {"w": jnp.zeros(2)}, {"w": jnp.array([6.0, 8.0])}  # norm 10
    sgd = {"type": "SGD", "params": {"lr": 1.0}}
    for clip, norm in ((0.5, 0.5), (0.0, 10.0), (20.0, 10.0)):
        ds = dsc.parse({"train_batch_size": 8, "gradient_clipping": clip, "optimizer": sgd}, 1)
        assert float(optax.tree.norm(_update(dsc.make_optimizer(ds), grads, params))) == pytest.approx(norm)
    # a caller's optax optimizer gets the same clipping
    ds = dsc.parse({"train_batch_size": 8, "gradient_clipping": 0.5}, 1)
    assert float(optax.tree.norm(_update(dsc.make_optimizer(ds, optax.sgd(1.0)), grads, params))) == pytest.approx(0.5)


def _lr_at(config, counts):
    sched = dsc.make_schedule(dsc.parse(config, 1))
    return {c: float(sched(c)) for c in counts}


LOG3 = math.log(3) / math.log(10)
SCHEDULES = {  # name -> (optimizer lr, scheduler section, {optax update count: lr}); count t is DeepSpeed's i = t - 1
    "WarmupLR-linear": (1.0, {"type": "WarmupLR", "params": {"warmup_max_lr": 1.0, "warmup_num_steps": 4,
                                                           "warmup_type": "linear"}},
                        {0: 0.0, 1: 0.0, 2: 0.25, 4: 0.75, 5: 1.0, 100: 1.0}),
    "WarmupLR-log-default-max": (0.5, {"type": "WarmupLR", "params": {"warmup_min_lr": 0.1, "warmup_num_steps": 10}},
                                 {0: 0.1, 3: 0.1 + 0.4 * LOG3, 11: 0.5, 50: 0.5}),
    "WarmupDecayLR": (1.0, {"type": "WarmupDecayLR", "params": {"warmup_max_lr": 1.0, "warmup_num_steps": 2,
                                                               "total_num_steps": 10, "warmup_type": "linear"}},
                      {1: 0.0, 2: 0.5, 3: 1.0, 7: 0.5, 11: 0.0, 30: 0.0}),
    "WarmupCosineLR": (2.0, {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 2, "total_num_steps": 10,
                                                                 "warmup_min_ratio": 0.5, "cos_min_ratio": 0.1,
                                                                 "warmup_type": "linear"}},
                       {0: 0.0, 1: 1.0, 2: 1.5, 3: 2 * (0.1 + 0.45 * (1 + math.cos(math.pi / 8))), 11: 0.2, 40: 0.2}),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_scheduler_learning_rates(name):
    lr, scheduler, expected = SCHEDULES[name]
    config = {"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"lr": lr}}, "scheduler": scheduler}
    got = _lr_at(config, list(expected))
    assert got == pytest.approx(expected, abs=1e-6)


def test_scheduler_drives_the_optimizer_updates():
    # SGD with lr from WarmupLR (linear, 0 -> 1 over 4 steps): updates are -lr(t) * g.
    config = {"train_batch_size": 8, "optimizer": {"type": "SGD", "params": {"lr": 1.0}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1.0, "warmup_num_steps": 4,
                                                           "warmup_type": "linear"}}}
    tx, params = dsc.make_optimizer(dsc.parse(config, 1)), {"w": jnp.zeros(1)}
    state, got = tx.init(params), []
    for _ in range(4):
        updates, state = tx.update({"w": jnp.ones(1)}, state, params)
        got.append(float(-updates["w"][0]))
    assert got == pytest.approx([0.0, 0.0, 0.25, 0.5])


@pytest.mark.parametrize("stage,param,grad,opt", [
    (0, False, False, False), (1, False, False, True), (2, False, True, True), (3, True, True, True),
])
def test_zero_stage_picks_the_layout(stage, param, grad, opt):
    ds = dsc.parse({"train_batch_size": 8, "zero_optimization": {"stage": stage}}, 8)
    layout = generic_zero_layout(nnx.state(MLP(nnx.Rngs(0))), make_mesh(), ds.zero_stage)
    # the largest dimension 8 divides; l2.bias (8,) divides too; nothing else is split
    split = {"l1": {"kernel": P(None, DATA_AXES), "bias": P(DATA_AXES)},
             "l2": {"kernel": P(DATA_AXES), "bias": P(DATA_AXES)}}
    whole = jax.tree.map(lambda _: P(), split, is_leaf=lambda x: isinstance(x, P))
    assert layout.stage == stage
    assert layout.param == (split if param else whole)
    assert layout.grad == (split if grad else whole)
    assert layout.opt == (split if opt else whole)


def test_generic_layout_replicates_what_the_data_axes_do_not_divide():
    state = {"odd": jax.ShapeDtypeStruct((10, 3), jnp.float32), "scalar": jax.ShapeDtypeStruct((), jnp.float32),
             "tie": jax.ShapeDtypeStruct((16, 16), jnp.float32)}
    layout = generic_zero_layout(state, make_mesh(), 3)
    assert layout.param == {"odd": P(), "scalar": P(), "tie": P(DATA_AXES)}
    assert generic_zero_layout(state, one_device(), 3).param["tie"] == P()


@pytest.mark.parametrize("fp16,expected", [
    ({"enabled": True}, LossScaleConfig(enabled=True)),
    ({"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 500, "hysteresis": 4,
      "min_loss_scale": 0.5, "consecutive_hysteresis": True},
     LossScaleConfig(enabled=True, initial_scale_power=12, loss_scale_window=500, hysteresis=4, min_loss_scale=0.5,
                     consecutive_hysteresis=True)),
    ({"enabled": True, "loss_scale": 128}, LossScaleConfig(enabled=True, static_scale=128.0)),
    ({"enabled": False, "initial_scale_power": 8}, LossScaleConfig(enabled=False, initial_scale_power=8)),
])
def test_fp16_fields_map_to_loss_scale_config(fp16, expected):
    ds = dsc.parse({"train_batch_size": 8, "fp16": fp16}, 1)
    assert ds.loss_scale == expected
    assert ds.compute == ("fp16" if fp16["enabled"] else "fp32")
    state = dsc.make_optimizer(ds, optax.sgd(0.1)).init({"w": jnp.zeros(1)})
    if not expected.enabled:
        start = 1.0
    else:
        start = expected.static_scale or 2.0**expected.initial_scale_power
    assert float(loss_scale_of(state)) == start


def _scaler_behaviour(tx) -> tuple:
    """What the fp16 fields decide, observed on an optimizer rather than read from its config:
    (first scale, overflows absorbed before the scale first moves, scale after 40 overflows,
    finite steps until the first doubling (None: never in 1100), scale after "overflow, finite, overflow").
    """
    params = {"w": jnp.zeros((1,), jnp.float32)}

    def scales(pattern):
        def body(state, o):
            _, state = tx.update({"w": jnp.where(o, jnp.inf, 1.0) * jnp.ones((1,))}, state, params)
            return state, loss_scale_of(state)

        return np.asarray(jax.jit(lambda s: jax.lax.scan(body, s, jnp.asarray(pattern))[1])(tx.init(params)))

    first = float(loss_scale_of(tx.init(params)))
    over, finite = scales(np.ones(40, bool)), scales(np.zeros(1100, bool))
    moved, grew = np.flatnonzero(over != first), np.flatnonzero(finite > first)
    return (first, int(moved[0]) if moved.size else 40, float(over[-1]),
            int(grew[0]) + 1 if grew.size else None, float(scales(np.array([True, False, True]))[-1]))


# Expected behaviour, worked out by hand from DeepSpeed >= 0.17.1 (checked in 0.19.8). A field the fp16
# section leaves out takes the DeepSpeedFP16Config default (deepspeed/runtime/precision_config.py; the
# same values as FP16_*_DEFAULT in deepspeed/runtime/constants.py): initial_scale_power 16,
# loss_scale_window 1000, hysteresis 2, consecutive_hysteresis false, min_loss_scale 1, loss_scale 0.
# dynamic_loss_scale_args() returns them whether the section names some fields or none, and the ZeRO
# optimizers (engine.py, _configure_zero_optimizer) hand them to DynamicLossScaler; loss_scale > 0 is
# a static LossScaler (loss_scaler.py, CreateLossScaler). DeepSpeed <= 0.17.0 differed for the bare
# section only: get_dynamic_loss_scale_args (config.py) returned None and DynamicLossScaler kept its
# constructor defaults (2**32, delayed_shift 1, hence (2**32, 0, 1.0, 1000, 2**30) on the first row).
# The window column is window + 1: DynamicLossScaler.update_scale doubles at stable_interval = window.
FP16_BEHAVIOUR = [
    ({"enabled": True}, (2.0**16, 1, 1.0, 1001, 2.0**15)),
    ({"enabled": True, "loss_scale_window": 3}, (2.0**16, 1, 1.0, 4, 2.0**15)),
    ({"enabled": True, "initial_scale_power": 8}, (2.0**8, 1, 1.0, 1001, 2.0**7)),
    ({"enabled": True, "hysteresis": 1, "min_loss_scale": 8}, (2.0**16, 0, 8.0, 1001, 2.0**14)),
    ({"enabled": True, "consecutive_hysteresis": True}, (2.0**16, 1, 1.0, 1001, 2.0**16)),
    ({"enabled": True, "loss_scale": 0}, (2.0**16, 1, 1.0, 1001, 2.0**15)),
    ({"enabled": True, "loss_scale": 128, "initial_scale_power": 4}, (128.0, 40, 128.0, None, 128.0)),
]


@pytest.mark.parametrize("fp16,expected", FP16_BEHAVIOUR)
def test_initialize_reads_fp16_with_deepspeed_defaults(fp16, expected):
    engine = jaxrl.initialize(model=nnx.Linear(1, 1, rngs=nnx.Rngs(0)), optimizer=optax.sgd(0.1),
                              config={"train_batch_size": 8, "fp16": fp16})
    assert engine.config.compute == "fp16"
    assert _scaler_behaviour(engine.optimizer) == expected


@pytest.mark.parametrize("fp16,expected", FP16_BEHAVIOUR)
def test_deepspeed_flag_reads_fp16_with_deepspeed_defaults(fp16, expected):
    from jaxrl.steps.role import make_trainer

    cfg = apply_overrides(RunConfig(), dsc.to_run_config_overrides({"train_batch_size": 8, "fp16": fp16}, 1))
    assert cfg.precision.compute == "fp16"
    model = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
    mesh = make_mesh()
    trainer = make_trainer(cfg, mesh, model, generic_zero_layout(nnx.state(model), mesh, 0), mse)
    assert _scaler_behaviour(trainer.optimizer) == expected


P0, G = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5])
OPTIMIZERS = {  # name -> (optimizer section, expected first update for params P0 and gradient G)
    "SGD": ({"type": "SGD", "params": {"lr": 0.1, "weight_decay": 0.1, "momentum": 0.9}}, -0.1 * (G + 0.1 * P0)),
    "Adam (AdamW by default)": ({"type": "Adam", "params": {"lr": 0.1, "weight_decay": 0.1}},
                                -0.1 * jnp.sign(G) - 0.1 * 0.1 * P0),
    "AdamW": ({"type": "adamw", "params": {"lr": 0.1, "weight_decay": 0.1}}, -0.1 * jnp.sign(G) - 0.1 * 0.1 * P0),
    "Adam, adam_w_mode false (L2)": ({"type": "Adam", "params": {"lr": 0.1, "weight_decay": 1.0,
                                                                 "adam_w_mode": False}}, -0.1 * jnp.sign(G + P0)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_type_gives_its_update(name):
    section, expected = OPTIMIZERS[name]
    tx = dsc.make_optimizer(dsc.parse({"train_batch_size": 8, "optimizer": section}, 1))
    np.testing.assert_allclose(_update(tx, {"w": G}, {"w": P0})["w"], expected, rtol=1e-5)


def test_accumulation_recovers_after_an_overflowing_window():
    # optax.MultiSteps alone clears its accumulator with 0 * acc, which turns one inf into NaN for good.
    ds = dsc.parse({"train_batch_size": 2, "gradient_accumulation_steps": 2, "fp16": {"enabled": True,
                                                                                     "hysteresis": 1}}, 1)
    tx, params = dsc.make_optimizer(ds, optax.sgd(1.0)), {"w": jnp.zeros(1)}
    state = tx.init(params)
    for g in (jnp.inf, 1.0, 1.0, 1.0):
        updates, state = tx.update({"w": jnp.array([g])}, state, params)
    assert float(updates["w"][0]) == pytest.approx(-1.0 / 2.0**15)  # the second window applies (scale halved)


def test_run_config_overrides_from_a_deepspeed_file(tmp_path):
    config = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 3, "offload_param": {"device": "none"}},
              "fp16": {"enabled": True, "loss_scale_window": 100},
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}},
              "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 200, "warmup_num_steps": 10,
                                                                 "warmup_type": "linear"}},
              "steps_per_print": 5}
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    with warnings.catch_warnings(record=True):
        overrides = dsc.to_run_config_overrides(path, world_size=8)
    cfg = apply_overrides(RunConfig(), overrides)
    assert (cfg.train.batch_size, cfg.optim.grad_accum, cfg.zero_stage, cfg.precision.compute) == (32, 2, 3, "fp16")
    assert (cfg.optim.lr, cfg.optim.b2, cfg.optim.weight_decay, cfg.optim.clip_norm) == (3e-4, 0.95, 0.1, 1.0)
    assert (cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio, cfg.train.steps) == (
        "cosine", 10, 1e-4, 200)
    assert cfg.precision.loss_scale.enabled and cfg.precision.loss_scale.loss_scale_window == 100
    assert cfg.train.log_every == 5
    with pytest.raises(JaxrlError, match="AdamW"):
        dsc.to_run_config_overrides({"train_batch_size": 8, "optimizer": {"type": "SGD", "params": {"lr": 1}}}, 1)


def _step3_ds_config(stage, *, hybrid_engine=False, tp=1, max_out_tokens=512, **extra):
    """The ds_config DeepSpeed-Chat's step 3 hands each trained model (dschat/utils/ds_utils.py,
    get_train_ds_config, at --dtype fp16 without offload): the actor's with its hybrid_engine block enabled."""
    return {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10,
            "zero_optimization": {"stage": stage, "overlap_comm": True, "offload_param": {"device": "none"},
                                  "offload_optimizer": {"device": "none"}, "stage3_param_persistence_threshold": 1e4,
                                  "stage3_max_live_parameters": 3e7, "stage3_prefetch_bucket_size": 3e7,
                                  "memory_efficient_linear": False},
            "fp16": {"enabled": True, "loss_scale_window": 100}, "gradient_clipping": 1.0,
            "prescale_gradients": False, "wall_clock_breakdown": False,
            "hybrid_engine": {"enabled": hybrid_engine, "max_out_tokens": max_out_tokens, "inference_tp_size": tp,
                              "release_inference_cache": False, "pin_parameters": True,
                              "tp_gather_partition_size": 8},
            "tensorboard": {"enabled": False, "output_path": "step3_tensorboard/ds_tensorboard_logs/",
                            "job_name": "step3_actor_tensorboard"}, **extra}


def _ppo_args(tmp_path, actor, critic, *overrides, command="ppo"):
    from jaxrl import cli

    paths = {}
    for name, config in (("actor", actor), ("critic", critic)):
        paths[name] = tmp_path / f"ds_{name}.json"
        paths[name].write_text(json.dumps(config))
    return cli.build_parser(command).parse_args([command, "--deepspeed-actor", str(paths["actor"]),
                                                 "--deepspeed-critic", str(paths["critic"]), *overrides])


def test_deepspeed_chat_step3_actor_and_critic_files(tmp_path):
    """`jaxrl ppo --deepspeed-actor A --deepspeed-critic C` with DeepSpeed-Chat's two files (actor ZeRO-3 with
    the Hybrid Engine at inference_tp_size 4, critic ZeRO-0): the run's keys from A, the critic's from C."""
    from jaxrl.commands.train import load_run_config

    actor = _step3_ds_config(3, hybrid_engine=True, tp=4, max_out_tokens=48)
    critic = _step3_ds_config(0, optimizer={"type": "Adam", "params": {"lr": 5e-6, "betas": [0.9, 0.95]}})
    tokens = ["data.max_prompt_len=32", "data.max_len=64", "generation.max_new_tokens=16"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_run_config(_ppo_args(tmp_path, actor, critic, *tokens))
    assert (cfg.zero_stage, cfg.ppo.actor.zero_stage, cfg.ppo.reference.zero_stage) == (3, None, None)
    assert (cfg.ppo.critic.zero_stage, cfg.ppo.reward.zero_stage, cfg.ppo.critic_lr) == (0, 0, 5e-6)
    assert cfg.generation.mesh.tensor == 4 and cfg.precision.compute == "fp16"
    assert cfg.precision.loss_scale.loss_scale_window == 100 and cfg.optim.clip_norm == 1.0
    # Only the truly irrelevant hybrid_engine keys are named as ignored; the mapped ones are not.
    ignored = [str(w.message) for w in caught if "ignored by jaxrl" in str(w.message)]
    assert ignored and all("hybrid_engine.release_inference_cache, hybrid_engine.pin_parameters, "
                           "hybrid_engine.tp_gather_partition_size" in m for m in ignored)
    assert not any(f"hybrid_engine.{k}" in m for m in ignored for k in ("inference_tp_size", "max_out_tokens"))
    # A ZeRO-3 critic puts the reward model in ZeRO-3 too, as DeepSpeed-Chat does.
    with warnings.catch_warnings(record=True):
        cfg = load_run_config(_ppo_args(tmp_path, actor, _step3_ds_config(3), *tokens))
        assert (cfg.ppo.critic.zero_stage, cfg.ppo.reward.zero_stage, cfg.ppo.critic_lr) == (3, 3, 5e-5)
        # A Hybrid Engine that holds fewer tokens than a rollout sequence, a critic that does not share the
        # actor's settings, the two files outside ppo: clear errors.
        with pytest.raises(JaxrlError, match=r"hybrid_engine.max_out_tokens \(40\) is less than .* = 48"):
            load_run_config(_ppo_args(tmp_path, dict(actor, hybrid_engine=dict(actor["hybrid_engine"],
                                                                               max_out_tokens=40)), critic, *tokens))
        with pytest.raises(JaxrlError, match="critic's DeepSpeed config gives optim.grad_accum=2 but the actor's run "
                                             "has 1"):
            load_run_config(_ppo_args(tmp_path, actor, _step3_ds_config(0, train_batch_size=32,
                                                                          gradient_accumulation_steps=2), *tokens))
        with pytest.raises(JaxrlError, match="are for `jaxrl ppo`"):
            load_run_config(_ppo_args(tmp_path, actor, critic, command="sft"))
    # Without `enabled` the block maps nothing (DeepSpeed-Chat's critic file carries it disabled).
    assert not any(o.startswith("generation.") for o in dsc.to_run_config_overrides(_step3_ds_config(0, tp=4), 8))


# ---------------------------------------------------------------------------------- errors and warnings
@pytest.mark.parametrize("config,match", [
    ({"train_batch_sise": 8}, r"unknown DeepSpeed config key 'train_batch_sise'; did you mean 'train_batch_size'"),
    ({"train_batch_size": 8, "zero_optimization": {"stag": 2}},
     r"'zero_optimization.stag'; did you mean 'stage'"),
    ({"train_batch_size": 8, "fp16": {"enabled": True, "loss_scale_windows": 10}}, r"did you mean 'loss_scale_window'"),
    ({"train_batch_size": 8, "optimizer": {"type": "Lamb"}}, r"optimizer.type 'Lamb' is not supported"),
    ({"train_batch_size": 8, "optimizer": {"type": "Adma"}}, r"did you mean 'Adam'"),
    ({"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"lr": 0.1, "beta": [0.9, 0.99]}}},
     r"optimizer.params.beta'; did you mean 'betas'"),
    ({"train_batch_size": 8, "scheduler": {"type": "WarmupLr"}}, r"did you mean 'WarmupLR'"),
    ({"train_batch_size": 8, "scheduler": {"type": "WarmupDecayLR", "params": {}}}, r"total_num_steps is required"),
    ({"train_batch_size": 8, "fp16": {"enabled": True}, "bf16": {"enabled": True}}, r"fp16.enabled and bf16.enabled"),
    ({"train_batch_size": 8, "zero_optimization": {"stage": 4}}, r"zero_optimization.stage must be 0, 1, 2 or 3"),
    ({"train_batch_size": 8, "fp16": {"enabled": True, "hysteresis": 0}}, r"fp16.hysteresis must be"),
    ({"train_batch_size": 8, "fp16": {"enabled": "yes"}}, r"'fp16.enabled' must be true or false"),
    ({"train_batch_size": 8, "gradient_clipping": -1}, r"gradient_clipping must be >= 0"),
    ({"train_batch_size": 8, "curriculum_learning": {}}, r"'curriculum_learning' is not supported"),
])
def test_bad_keys_and_values_are_named(config, match):
    with pytest.raises(JaxrlError, match=match):
        dsc.parse(config, 1)


def test_config_file_errors(tmp_path):
    with pytest.raises(JaxrlError, match="not found"):
        jaxrl.initialize(model=nnx.Linear(1, 1, rngs=nnx.Rngs(0)), config=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(JaxrlError, match="not valid JSON"):
        dsc.parse(bad, 1)
    with pytest.raises(JaxrlError, match="no 'optimizer' section"):
        jaxrl.initialize(model=nnx.Linear(1, 1, rngs=nnx.Rngs(0)), config={"train_batch_size": 8})
    both = {"train_batch_size": 8, "optimizer": {"type": "Adam"}}
    with pytest.raises(JaxrlError, match="keep one"):
        jaxrl.initialize(model=nnx.Linear(1, 1, rngs=nnx.Rngs(0)), optimizer=optax.adam(1e-3), config=both)


def test_pytorch_only_keys_are_accepted_with_one_warning():
    config = {"train_batch_size": 8, "wall_clock_breakdown": False, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}, "overlap_comm": True,
                                    "allgather_bucket_size": 5e8, "reduce_bucket_size": 5e8,
                                    "contiguous_gradients": True, "stage3_prefetch_bucket_size": 1e6},
              "activation_checkpointing": {"partition_activations": True}, "amp": {"enabled": False}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = dsc.parse(config, 1)
    assert len(caught) == 1
    message = str(caught[0].message)
    for key in ("wall_clock_breakdown", "zero_allow_untested_optimizer", "zero_optimization.offload_optimizer",
                "zero_optimization.overlap_comm", "zero_optimization.allgather_bucket_size",
                "zero_optimization.reduce_bucket_size", "zero_optimization.contiguous_gradients",
                "zero_optimization.stage3_prefetch_bucket_size", "activation_checkpointing", "amp"):
        assert key in message
    assert ds.zero_stage == 2 and len(ds.ignored) == 10
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dsc.parse({"train_batch_size": 8}, 1)
    assert not caught
