"""PPO (step 3) end to end on tiny random models: 8 devices (ZeRO-3 + the Hybrid Engine on a
data=2 x tensor=4 generation mesh, through `jaxrl ppo`) against 1 device, with several generation batches,
epochs and mini-batches, EMA, the ptx loss and the adaptive KL controller all on; and the HF exports."""

import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from compiles import compiles
from jaxrl import cli, generation
from jaxrl.config import load_config
from jaxrl.data import synthetic
from jaxrl.errors import JaxrlError
from jaxrl.models.hf import load_pretrained, save_pretrained
from jaxrl.models.transformer import ScoreModel, Transformer
from jaxrl.parallel.mesh import make_mesh
from jaxrl.steps import ppo as ppo_trainer
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
        with compiles() as counts:
            state, m = trainer.update(state, step)
        metrics.append(m)
        traces.append(dict(counts))
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
    first, second = one_device["traces"][:2]
    assert not second, second
    roles = one_device["roles"]
    assert first["step"] == 2  # the actor's and the critic's train steps, each compiled once
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
    assert batch.ptx is not None and {"input_ids", "loss_mask", "ratio"} <= set(vars(batch.ptx))

    def step(batch):
        s = jax.device_put(state, actor.state_shardings)
        with jax.set_mesh(one_device["mesh"]):
            new, m = actor.step(s, jax.device_put(batch, actor.batch_sharding))
        return jax.device_get(new.params), jax.device_get(m)

    with_ptx, m = step(batch)
    for x, y in zip(jax.tree.leaves(with_ptx), jax.tree.leaves(one_device["record"]["params"][0])):
        np.testing.assert_array_equal(x, y)  # the recorded first update, replayed
    # No ptx target tokens: the ptx term is exactly 0, as with ppo.ptx_coef=0 (and no recompilation).
    without, m0 = step(batch.replace(ptx=batch.ptx.replace(loss_mask=np.zeros_like(batch.ptx.loss_mask))))
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


def test_grad_accum_schedule_counts_optimizer_updates(root):
    """optim.grad_accum=2 over epochs x mini-batches = 4 mini-batch steps: 2 optimizer updates per PPO step,
    and the LR schedule is exactly that long (the schedule's end value is reached at the run's last update)."""
    base = [*overrides(root), "mesh.data=1", "generation.mesh.data=1", "generation.mesh.tensor=1",
            "train.steps=1", "ppo.generation_batches=1", "ppo.epochs=2", "ppo.mini_batches=2", "ppo.ema=0",
            "ppo.ptx_coef=0", "optim.grad_accum=2", "ppo.eval_prompts=0"]
    cfg = load_config(None, base)
    assert ppo_trainer.total_updates(cfg) == 2
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    roles = ppo_trainer.load_roles(cfg, mesh)
    prompts, _, _ = ppo_trainer.load_prompts(cfg, roles.tokenizer)
    trainer = ppo_trainer.PPO(cfg, mesh, roles, prompts, None, None)
    state, _ = trainer.update(trainer.init_state(), 1)
    for role in ("actor", "critic"):
        opt_state = jax.device_get(state[role].opt_state)
        assert int(state[role].step) == 4 and int(opt_state.gradient_step) == 2  # micro-steps, updates
        counts = {int(c) for _, c in optax.tree_utils.tree_get_all_with_path(opt_state.inner_opt_state, "count")}
        assert counts == {ppo_trainer.total_updates(cfg)}  # the schedule's length: its last update ends it

    with pytest.raises(JaxrlError, match=r"ppo.epochs x ppo.mini_batches = 2 .* multiple of optim.grad_accum=4"):
        ppo_trainer.total_updates(load_config(None, [*base, "ppo.epochs=1", "optim.grad_accum=4"]))


def test_eval_uses_every_held_out_prompt(root, one_device):
    """13 held-out prompts with ppo.rollout_batch_size=16 (was: "the dataset has 13 examples, fewer than
    train.batch_size=16"): greedy eval metrics equal those of one unpadded batch of exactly those prompts."""
    from jaxrl.data.formats import PromptRecord
    from jaxrl.data.tokenize import Encoder, tokenize_prompts

    roles, mesh = one_device["roles"], one_device["mesh"]
    rows13 = synthetic.make_task_rows(13, seed=5, kind="prompt", held_out=True)
    evals = tokenize_prompts([PromptRecord(r["prompt"], None, str(i)) for i, r in enumerate(rows13)],
                             Encoder.from_tokenizer(roles.tokenizer), max_prompt_len=8).arrays
    got = {}
    for rows in (16, 13):
        cfg = load_config(None, [*overrides(root), "mesh.data=1", "generation.mesh.data=1", "generation.mesh.tensor=1",
                                 f"ppo.rollout_batch_size={rows}", "ppo.mini_batches=1", "ppo.eval_prompts=64"])
        prompts, _, _ = ppo_trainer.load_prompts(cfg, roles.tokenizer)
        trainer = ppo_trainer.PPO(cfg, mesh, roles, prompts, evals, None)
        got[rows] = trainer.evaluate(one_device["state"], temperature=0.0)
    assert set(got[16]) == {"score", "task_accuracy"}
    assert got[16]["task_accuracy"] == got[13]["task_accuracy"]
    assert got[16]["score"] == pytest.approx(got[13]["score"], rel=1e-5)


def _single_update_cfg(root, *extra):
    """One small PPO step: one generation batch, one epoch, one mini-batch, no EMA, no ptx, a fixed KL."""
    return load_config(None, overrides(root) + ["mesh.data=1", "generation.mesh.data=1", "generation.mesh.tensor=1",
                                                "ppo.generation_batches=1", "ppo.epochs=1", "ppo.mini_batches=1",
                                                "ppo.ema=0", "ppo.ptx_coef=0", "ppo.adaptive_kl=false", *extra])


def _per_device_bytes(tree):
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def _abstract_bytes(tree):
    """Per-device bytes of a tree of sharded ShapeDtypeStructs."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_frozen_roles_are_stored_in_the_compute_dtype(root):
    """bf16 compute under ZeRO-3 over 8 devices: the reference and reward models hold bf16 weights (half the
    per-device bytes of the fp32 actor and critic masters, same architectures; their stacked layers as the
    bf16 values' uint16 bits); ppo.frozen_dtype=fp32 keeps fp32."""
    mesh = make_mesh(1, 8, 1)
    common = ["precision.compute=bf16", "mesh.fsdp=8", "zero_stage=3", "generation.mesh.data=-1"]
    for frozen_dtype, want in (("compute", np.dtype("bfloat16")), ("fp32", np.dtype("float32"))):
        roles = ppo_trainer.load_roles(_single_update_cfg(root, *common, f"ppo.frozen_dtype={frozen_dtype}"), mesh)
        actor, critic = roles.actor.abstract_state().params, roles.critic.abstract_state().params
        assert {x.dtype for x in jax.tree.leaves(actor) + jax.tree.leaves(critic)} == {np.dtype("float32")}
        ref, reward = roles.ref[1], roles.reward[1]
        # bf16: the stacked layers as their uint16 bits (`pack_layers`: what the scan carries), the rest bf16
        stored = {want, np.dtype("uint16")} if want.itemsize == 2 else {want}
        assert {x.dtype for x in jax.tree.leaves(ref) + jax.tree.leaves(reward)} == stored
        assert {x.dtype for x in jax.tree.leaves(ref["layers"])} == ({np.dtype("uint16")} if want.itemsize == 2
                                                                      else {want})
        ratio = want.itemsize / 4
        sizes = {name: _per_device_bytes(tree) for name, tree in (("reference", ref), ("reward", reward))}
        print(f"ppo.frozen_dtype={frozen_dtype}: per-device bytes {sizes}")
        assert sizes["reference"] == ratio * _abstract_bytes(actor)
        assert sizes["reward"] == ratio * _abstract_bytes(critic)


def test_kl_coef_zero_loads_no_reference_and_trains_as_with_one(root):
    """ppo.kl_coef=0: no reference model; one PPO step gives the actor and critic that a run with a
    reference (here a different random model, so its KL is not 0) gives at coefficient 0."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    cfg = _single_update_cfg(root, "ppo.kl_coef=0")
    results = {}
    for with_ref in (False, True):
        roles = ppo_trainer.load_roles(cfg, mesh)
        assert roles.ref is None
        if with_ref:  # what the code did before: a reference loaded and scored at coefficient 0
            with jax.set_mesh(mesh):
                roles.ref = nnx.split(Transformer(roles.arch, rngs=nnx.Rngs(9)))
        prompts, eval_prompts, _ = ppo_trainer.load_prompts(cfg, roles.tokenizer)
        trainer = ppo_trainer.PPO(cfg, mesh, roles, prompts, eval_prompts, None)
        state, metrics = trainer.update(trainer.init_state(), 1)
        results[with_ref] = (jax.device_get(state), metrics, trainer)
    (without, m0, trainer), (with_ref, m1, _) = results[False], results[True]
    assert m0["kl"] == 0.0 and m1["kl"] != 0.0  # the reference was scored, and differed from the actor
    for k in m0:
        if k not in ("kl",) and not k.startswith("time/"):
            assert m0[k] == m1[k], k
    for role in ("actor", "critic"):
        for x, y in zip(jax.tree.leaves(without[role].params), jax.tree.leaves(with_ref[role].params)):
            np.testing.assert_array_equal(x, y)
    # Resuming such a run from a checkpoint whose coefficient is not 0 would need the missing reference.
    with pytest.raises(JaxrlError, match="loaded no reference model"):
        trainer.restore_data(dict(trainer.data_state(), kl_coef=0.1))



def test_each_role_trains_in_its_own_zero_stage(root, one_device):
    """8 devices (fsdp=8): actor and reference in ZeRO-3, critic and reward model in ZeRO-0. Each role's
    parameters lie in its own layout, and the first PPO step (4 actor updates) gives the one-device run's
    metrics and actor; `ppo.<role>.zero_stage` set to the run's stage declares exactly the run without them."""
    stages = ["mesh.data=1", "mesh.fsdp=8", "zero_stage=3", "ppo.critic.zero_stage=0", "ppo.reward.zero_stage=0"]
    cfg = load_config(None, overrides(root) + stages + ["generation.mesh.data=2", "generation.mesh.tensor=4"])
    mesh = build.training_mesh(cfg)
    roles = ppo_trainer.load_roles(cfg, mesh)
    assert {k: r.spec.zero_stage for k, r in roles.declared.items()} == {"actor": 3, "critic": 0, "reference": 3,
                                                                         "reward": 0}
    prompts, eval_prompts, ptx = ppo_trainer.load_prompts(cfg, roles.tokenizer)
    trainer = ppo_trainer.PPO(cfg, mesh, roles, prompts, eval_prompts, ptx)
    state, metrics = trainer.update(trainer.init_state(), 1)
    whole = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    # ZeRO-3 splits the actor's and the reference's parameters over the 8 devices; ZeRO-0 keeps a whole
    # critic (and its AdamW moments) and a whole reward model on each.
    assert _per_device_bytes(state["actor"].params) < whole(state["actor"].params) / 4
    assert _per_device_bytes(roles.ref[1]) < whole(roles.ref[1]) / 4
    assert _per_device_bytes(state["critic"]) == whole(state["critic"])
    assert _per_device_bytes(roles.reward[1]) == whole(roles.reward[1])
    want = one_device["metrics"][0]
    keys = sorted(k for k in want if not k.startswith("time/"))
    np.testing.assert_allclose([metrics[k] for k in keys], [want[k] for k in keys], rtol=1e-5, atol=1e-7)
    _assert_close_tree(jax.device_get(state["actor"].params), one_device["record"]["params"][EPOCHS * MINI_BATCHES - 1],
                       1e-5)
    # The keys at the run's own stage change nothing: the same declared models, so the same run.
    plain = load_config(None, overrides(root) + stages[:3])
    explicit = load_config(None, overrides(root) + stages[:3] + [f"ppo.{r}.zero_stage=3" for r in roles.declared])
    specs = [{k: r.spec for k, r in ppo_trainer.roles(c, mesh, roles.tokenizer).items()} for c in (plain, explicit)]
    assert specs[0] == specs[1] and {s.zero_stage for s in specs[0].values()} == {3}


def test_controller_state_resumes_exactly(root):
    """The controller state (adaptive KL coefficient, running score moments under ppo.normalize_reward)
    comes back from experience, not the metrics, and resumes from the checkpoint's JSON data state: a
    PPO restored after step 1 takes step 2 exactly as the one that ran step 1."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    cfg = _single_update_cfg(root, "ppo.normalize_reward=true", "ppo.adaptive_kl=true", "ppo.eval_prompts=0")
    roles = ppo_trainer.load_roles(cfg, mesh)
    prompts, _, _ = ppo_trainer.load_prompts(cfg, roles.tokenizer)
    ran = ppo_trainer.PPO(cfg, mesh, roles, prompts, None, None)
    state, first = ran.update(ran.init_state(), 1)
    assert not {"score_count", "score_mean", "score_m2"} & set(first)
    saved = json.loads(json.dumps(ran.data_state()))
    assert saved["score_stats"][0] == ROWS and saved["kl_coef"] == first["kl_coef"] != KL_COEF
    resumed = ppo_trainer.PPO(cfg, mesh, roles, prompts, None, None)
    resumed.restore_data(saved)
    assert resumed.data_state() == saved
    copy = jax.tree.map(jax.numpy.copy, state)
    _, want = ran.update(state, 2)
    _, got = resumed.update(copy, 2)
    assert {k: v for k, v in got.items() if not k.startswith("time/")} == \
        {k: v for k, v in want.items() if not k.startswith("time/")}
