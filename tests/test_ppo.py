"""PPO (step 3) end to end on tiny random models: 8 devices (ZeRO-3 + the Hybrid Engine on a
data=2 x tensor=4 generation mesh, through `jaxrl ppo`) against 1 device, with several generation batches,
epochs and mini-batches, EMA, the ptx loss and the adaptive KL controller all on; and the HF exports."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrl import cli, generation
from jaxrl.algorithms import ppo_trainer
from jaxrl.config import load_config
from jaxrl.data import synthetic
from jaxrl.models.hf import load_pretrained, save_pretrained
from jaxrl.models.transformer import ScoreModel, Transformer
from jaxrl.parallel.mesh import make_mesh
from jaxrl.train import build

STEPS = 2
ROWS, GEN_BATCHES, EPOCHS, MINI_BATCHES = 8, 2, 2, 2
UPDATES = STEPS * EPOCHS * MINI_BATCHES  # optimizer steps of the actor (and of the critic)
EMA, KL_COEF, KL_TARGET, KL_HORIZON = 0.9, 0.1, 0.01, 100


def overrides(root):
    return [
        f"model.path={root}/sft", f"model.reward_path={root}/reward", f"output={root}/one-device",
        f"data.ptx_path={root}/data/sft.jsonl", "data.max_prompt_len=8", "data.max_len=16",
        "generation.max_new_tokens=4", "generation.temperature=1.0",
        f"ppo.rollout_batch_size={ROWS}", f"ppo.generation_batches={GEN_BATCHES}", f"ppo.epochs={EPOCHS}",
        f"ppo.mini_batches={MINI_BATCHES}", f"ppo.ema={EMA}", "ppo.ptx_coef=0.5", "ppo.adaptive_kl=true",
        f"ppo.kl_coef={KL_COEF}", f"ppo.kl_target={KL_TARGET}", f"ppo.kl_horizon={KL_HORIZON}", "ppo.eval_prompts=8",
        # Adam's first steps are lr * g / (|g| + eps): with the default eps a gradient entry that is float
        # noise around zero moves by a full lr step whose sign the reduction order decides. A larger eps
        # keeps the 1-device / 8-device comparison about the math, not about that noise.
        "optim.lr=1e-3", "ppo.critic_lr=1e-3", "optim.eps=1e-4",
        f"train.steps={STEPS}", "train.log_every=1", "seed=0",
    ]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Random tiny SFT and reward HF directories (the character tokenizer) and a small synthetic task."""
    root = tmp_path_factory.mktemp("ppo")
    tok = synthetic.build_tokenizer()
    arch = build.model_arch("tiny", tok)
    save_pretrained(Transformer(arch, rngs=nnx.Rngs(1)), str(root / "sft"), tokenizer=tok)
    save_pretrained(ScoreModel(arch, rngs=nnx.Rngs(2)), str(root / "reward"), tokenizer=tok)
    sizes = {"sft": 64, "preference": 8, "prompt": 64, "eval": 8}
    for run in ("data", "one-device/data", "eight-devices/data"):
        synthetic.write_dataset_files(str(root / run), sizes=sizes, seed=0)
    return root


@pytest.fixture(scope="module")
def one_device(root):
    """Two PPO steps on one device, driving `PPO` directly and recording every actor update."""
    cfg = load_config(None, overrides(root) + ["mesh.data=1", "generation.mesh.data=1",
                                               "generation.mesh.tensor=1"])
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    roles = ppo_trainer.load_roles(cfg, mesh)
    prompts, eval_prompts, ptx = ppo_trainer.load_prompts(cfg, roles.tokenizer)
    trainer = ppo_trainer.PPO(cfg, mesh, roles, prompts, eval_prompts, ptx)
    actor_step = roles.actor.step
    record = {"params": [], "first": None}

    def recording_step(state, batch):
        if record["first"] is None:
            record["first"] = jax.device_get((state, batch))
        state, metrics = actor_step(state, batch)
        record["params"].append(jax.device_get(state.params))
        return state, metrics

    roles.actor.step = recording_step
    state = trainer.init_state()
    initial = jax.device_get(state["actor"].params)
    metrics, traces = [], []
    for step in range(1, STEPS + 1):
        state, m = trainer.update(state, step)
        metrics.append(m)
        traces.append(dict(generation.trace_counts))
    roles.actor.step = actor_step
    return dict(roles=roles, state=state, final=jax.device_get(state), initial=initial, metrics=metrics,
                record=record, mesh=mesh, traces=traces)


@pytest.fixture(scope="module")
def eight_devices(root):
    """The same run through `jaxrl ppo` on 8 devices: ZeRO-3 over fsdp=8, generation on data=2 x tensor=4."""
    out = root / "eight-devices"
    rc = cli.main(["ppo", "--output", str(out), *overrides(root), "mesh.data=1", "mesh.fsdp=8", "zero_stage=3",
                   "generation.mesh.data=2", "generation.mesh.tensor=4"])
    assert rc == 0
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return out, [r for r in rows if "eval/score" not in r]


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _assert_close_tree(got, want, rtol):
    for path, x in jax.tree_util.tree_leaves_with_path(want):
        y = got
        for key in path:
            y = y[getattr(key, "key", getattr(key, "idx", None))]
        x, y = np.asarray(x), np.asarray(y)
        assert float(np.abs(x - y).max()) <= rtol * float(np.abs(x).max()), jax.tree_util.keystr(path)


def test_eight_devices_with_the_hybrid_engine_match_one_device(one_device, eight_devices):
    out, rows = eight_devices
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for want, got in zip(one_device["metrics"], rows):
        keys = sorted(k for k in want if not k.startswith("time/"))
        assert set(keys) <= set(got)
        np.testing.assert_allclose([got[k] for k in keys], [want[k] for k in keys], rtol=1e-5, atol=1e-7,
                                   err_msg=str(keys))
    final = one_device["final"]
    _assert_close_tree(_params(load_pretrained(str(out / "hf"))), final["actor"].params, 1e-5)
    _assert_close_tree(_params(load_pretrained(str(out / "hf-ema"))), final["ema"], 1e-5)
    _assert_close_tree(_params(load_pretrained(str(out / "hf-critic"), kind="score")), final["critic"].params, 1e-5)


def test_several_batches_epochs_and_mini_batches_train_and_stay_finite(one_device):
    final, metrics = one_device["final"], one_device["metrics"]
    assert int(final["actor"].step) == int(final["critic"].step) == UPDATES
    assert len(one_device["record"]["params"]) == UPDATES
    for m in metrics:
        assert all(np.isfinite(v) for v in m.values()), m
        assert m["response_length"] > 0 and m["entropy"] > 0
    # Rollouts, scoring and updates of the second step reuse the first step's compilations.
    assert one_device["traces"][0] == one_device["traces"][1]
    roles = one_device["roles"]
    assert roles.actor._step._cache_size() == roles.critic._step._cache_size() == 1
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(final["actor"].params),
                                                         jax.tree.leaves(one_device["initial"]))]
    assert min(moved) > 0


def test_ema_follows_the_actor_trajectory(one_device):
    ema = one_device["initial"]
    for k, params in enumerate(one_device["record"]["params"]):
        ema = jax.tree.map(lambda e, p: EMA * e + (1 - EMA) * p, ema, params)
        if k == 1:  # after 2 updates
            after_two = ema
    got = one_device["final"]["ema"]
    for x, y, p in zip(jax.tree.leaves(got), jax.tree.leaves(ema), jax.tree.leaves(one_device["final"]["actor"].params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
        assert np.abs(x - p).max() > 0  # the EMA lags the actor
    assert any(np.abs(x - y).max() > 0 for x, y in zip(jax.tree.leaves(after_two), jax.tree.leaves(ema)))


def test_ptx_loss_is_in_the_actor_update(one_device):
    for m in one_device["metrics"]:
        assert m["ptx_loss"] > 1.0  # token cross-entropy of a random model over a 40-odd-token vocabulary
    actor = one_device["roles"].actor
    state, batch = one_device["record"]["first"]
    assert {"ptx_input_ids", "ptx_loss_mask", "ptx_ratio"} <= set(batch)

    def step(batch):
        s = jax.device_put(state, actor.state_shardings)
        with jax.set_mesh(one_device["mesh"]):
            new, m = actor.step(s, jax.device_put(batch, actor.batch_sharding))
        return jax.device_get(new.params), jax.device_get(m)

    with_ptx, m = step(batch)
    for x, y in zip(jax.tree.leaves(with_ptx), jax.tree.leaves(one_device["record"]["params"][0])):
        np.testing.assert_array_equal(x, y)  # the recorded first update, replayed
    # No ptx target tokens: the ptx term is exactly 0, as with ppo.ptx_coef=0 (and no recompilation).
    without, m0 = step(dict(batch, ptx_loss_mask=np.zeros_like(batch["ptx_loss_mask"])))
    assert float(m0["ptx_loss"]) == 0.0 and float(m["ptx_loss"]) > 1.0
    diff = max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(with_ptx), jax.tree.leaves(without)))
    assert diff > 1e-6


def test_adaptive_kl_moves_towards_the_target(one_device):
    coef = KL_COEF
    n = ROWS * GEN_BATCHES
    for m in one_device["metrics"]:
        error = np.clip(m["kl"] / KL_TARGET - 1, -0.2, 0.2)
        np.testing.assert_allclose(m["kl_coef"], coef * (1 + error * n / KL_HORIZON), rtol=1e-6)
        assert np.sign(m["kl_coef"] - coef) == np.sign(m["kl"] - KL_TARGET)
        coef = m["kl_coef"]
    first, second = one_device["metrics"]
    assert first["kl"] == 0.0 and first["kl_coef"] < KL_COEF  # actor = reference: below the target, beta falls
    assert second["kl"] > KL_TARGET and second["kl_coef"] > first["kl_coef"]  # above it, beta rises


def test_ppo_exports_load_in_transformers(one_device, eight_devices):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out, _ = eight_devices
    ids = torch.tensor([[5, 6, 7, 8]])
    final = one_device["final"]
    for name, cls in (("hf", AutoModelForCausalLM), ("hf-ema", AutoModelForCausalLM),
                      ("hf-critic", AutoModelForSequenceClassification)):
        assert os.path.exists(out / name / "config.json"), name
        model = cls.from_pretrained(str(out / name))
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all(), name
    q = AutoModelForCausalLM.from_pretrained(str(out / "hf")).model.layers[0].self_attn.q_proj.weight.detach().numpy()
    want = final["actor"].params["layers"]["attn"]["q"]["kernel"][0].T
    np.testing.assert_allclose(q, want, rtol=1e-5, atol=1e-6)
