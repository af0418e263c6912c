"""`jaxrl dpo` end to end on the tiny preset: 8 devices (ZeRO-3 over fsdp=8, gradient accumulation, the
reference precomputed) equal 1 device (per-batch reference); the LoRA reference is the base model; the
plan's rows are the run's compiled steps; the pairs' log-probs are the unbatched ones; bad inputs fail."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl import cli
from jaxrl.algorithms.dpo import pair_logprobs, reference_logprobs
from jaxrl.config import load_config
from jaxrl.data import synthetic
from jaxrl.data.formats import PreferenceRecord
from jaxrl.data.tokenize import Encoder, tokenize_pairs
from jaxrl.models.hf import load_pretrained
from jaxrl.models.transformer import Transformer
from jaxrl.parallel.mesh import make_mesh
from jaxrl.steps import dpo
from jaxrl.steps import role as role_lib
from jaxrl.steps.role import Role, frozen_spec
from jaxrl.steps.plan import compile_for_memory, plan
from jaxrl.train import build

STEPS = 2


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """72 synthetic preference pairs; the model is the `tiny` preset, born from the seed (policy and
    reference alike)."""
    root = tmp_path_factory.mktemp("dpo")
    synthetic.write_dataset_files(str(root / "data"), sizes={"sft": 8, "preference": 72, "prompt": 8, "eval": 8},
                                  seed=0)
    return root


def overrides(root, *extra):
    return ["model.path=tiny", f"data.cache_dir={root}/data", "data.max_len=16", "data.max_prompt_len=8",
            "data.eval_fraction=0.1", "train.batch_size=16", "optim.grad_accum=2", f"train.steps={STEPS}",
            "train.log_every=1", "train.eval_every=0", "train.eval_batches=1", "optim.lr=1e-3", "optim.eps=1e-4",
            "dpo.beta=0.5", "seed=0", *extra]


def _metrics(directory):
    with open(directory / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _params(path):
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(load_pretrained(str(path)), nnx.Param)))


def _one_device():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def one(root):
    """The reference run: one device, the reference's log-probs computed per batch; its final eval metrics."""
    return dpo.run(load_config(None, overrides(root, "mesh.data=1", f"output={root}/one")), mesh=_one_device())


def test_eight_devices_zero3_precomputed_equal_one_device_per_batch(root, one):
    final = one
    out = root / "eight"
    assert cli.main(["dpo", "--output", str(out), *overrides(root), "mesh.data=1", "mesh.fsdp=8", "zero_stage=3",
                     "dpo.precompute_ref=true"]) == 0
    one, eight = _metrics(root / "one"), _metrics(out)
    # Not rewards/accuracy: it counts pairs whose margin is > 0, and at step 1 every margin is 0 up to float noise.
    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen", "logps/rejected",
            "grad_norm"]
    assert [m["step"] for m in one] == [m["step"] for m in eight] == [1, 2, 2]  # two steps, then the eval
    for want, got in zip(one[:STEPS], eight[:STEPS]):
        np.testing.assert_allclose([got[k] for k in keys], [want[k] for k in keys], rtol=1e-5, atol=1e-6)
    # Step 1: policy = reference, so every implicit reward is 0 and the loss is log 2.
    assert abs(one[0]["rewards/margin"]) < 1e-6 and abs(one[0]["loss"] - np.log(2)) < 1e-6
    assert one[1]["loss"] != one[0]["loss"]
    evals = [f"eval/{k}" for k in keys[:-1]]
    assert set(evals) | {"eval/rewards/accuracy"} <= set(one[-1]) and 0 <= one[-1]["eval/rewards/accuracy"] <= 1
    np.testing.assert_allclose([eight[-1][k] for k in evals], [one[-1][k] for k in evals], rtol=1e-5, atol=1e-6)
    assert final["loss"] == one[-1]["eval/loss"]
    for x, y in zip(_params(out / "hf"), _params(root / "one" / "hf")):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_lora_reference_is_the_base_model_and_the_plan_is_the_runs_compiled_steps(root):
    cfg = load_config(None, overrides(root, "model.lora.rank=4", "zero_stage=3", "mesh.data=1", "mesh.fsdp=8"))
    mesh = build.training_mesh(cfg)
    tok = build.load_tokenizer(cfg.model.path)
    declared = dpo.roles(cfg, mesh, tok)
    policy, ref = declared["policy"], declared["reference"]
    assert ref.shares == "policy"
    trainer = role_lib.trainer(policy, cfg, mesh)
    state = trainer.init_state()
    # Adapters that change the model (B starts at 0): the reference must still be the base.
    params = jax.device_put(jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape, x.dtype),
                                         state.params), trainer.state_shardings.params)
    records = [PreferenceRecord("12+30=", "42", "43", "a"), PreferenceRecord("7+8=", "15", "51", "b")]
    arrays = tokenize_pairs(records * 4, Encoder.from_tokenizer(tok), max_len=16, loss_mask=True).arrays
    forward = role_lib.jit_forward(ref, trainer.graphdef)
    # The independent reference: the model the policy started from, built on its own without LoRA.
    base = Role("base", frozen_spec(cfg), policy.arch, ref.batch, forward=reference_logprobs)
    base_graphdef, base_state = role_lib.frozen(base, cfg, mesh)
    with jax.set_mesh(mesh):
        batch = role_lib.feed(ref, build.to_device(arrays, trainer.batch_sharding))
        want = jax.device_get(role_lib.jit_forward(base, base_graphdef)(base_state, batch))
        with_adapters = jax.device_get(jax.jit(lambda p, b: pair_logprobs(
            nnx.merge(trainer.graphdef, p, state.frozen), b)[:2])(params, batch))
        planned = {r.role: r for r in plan(cfg, "dpo")}
        zeros = {k: jax.device_put(jnp.zeros(s, d), trainer.batch_sharding) for k, (s, d) in policy.batch.items()}
        step = compile_for_memory(trainer.lower(state, role_lib.feed(policy, zeros)))
        ref_step = compile_for_memory(forward.lower((state.params, state.frozen), batch))
        got = jax.device_get(ref_step((params, state.frozen), batch))  # the run's forward, compiled once here
    np.testing.assert_allclose(np.stack(got), np.stack(want), rtol=1e-5, atol=1e-5)
    assert np.abs(np.stack(with_adapters) - np.stack(want)).max() > 1e-2  # the adapters do matter
    assert list(planned) == ["policy train step", "reference forward"]
    for name, compiled in (("policy train step", step), ("reference forward", ref_step)):
        m, r = compiled.memory_analysis(), planned[name]
        assert (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes) == \
            (r.arguments, r.outputs, r.aliased, r.temporaries), name
    assert planned["reference forward"].resident == 0  # no second copy of the weights


def test_pair_logprobs_equal_each_sequence_alone():
    tok = synthetic.build_tokenizer()
    enc = Encoder.from_tokenizer(tok)
    model = Transformer(build.model_arch("tiny", tok), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    logits_of = jax.jit(lambda ids: nnx.merge(graphdef, state)(ids))
    # Every sequence 9 tokens alone (one compilation), right-padded to 12 in the pair batch.
    records = [PreferenceRecord("12+30=", "42", "43", "a"), PreferenceRecord("17+25=", "42", "41", "b")]
    arrays = tokenize_pairs(records, enc, max_len=12, loss_mask=True).arrays
    pairs = jax.jit(lambda b: pair_logprobs(nnx.merge(graphdef, state), b))
    chosen, rejected, n_chosen, n_rejected = pairs({k: jnp.asarray(v) for k, v in arrays.items()})
    for side, logp, n in (("chosen", chosen, n_chosen), ("rejected", rejected, n_rejected)):
        for i, r in enumerate(records):
            prompt, response = enc.prompts([r.prompt])[0], enc.responses([getattr(r, side)])[0]
            ids = prompt + response
            logits = np.asarray(logits_of(jnp.asarray(ids)[None]), np.float64)[0]  # unpadded, alone
            logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            want = sum(logits[t - 1, ids[t]] - logz[t - 1] for t in range(len(prompt), len(ids)))
            np.testing.assert_allclose(logp[i], want, rtol=1e-5, atol=1e-5)
            assert n[i] == len(response)


def test_bad_reference_settings_are_clear_errors(root, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["dpo", "--output", str(out), *overrides(root), f"model.ref_path={tmp_path}/missing"]) == 1
    err = capsys.readouterr().err
    assert "model.ref_path" in err and "missing" in err and "no config.json" in err and "Traceback" not in err
    assert cli.main(["dpo", "--output", str(out), *overrides(root), "dpo.loss=simpo", "model.ref_path=tiny"]) == 1
    assert "dpo.loss=simpo uses no reference model" in capsys.readouterr().err
    assert not out.exists()  # nothing written


def test_a_stopped_run_resumes_to_the_same_result(root, one, monkeypatch, caplog):
    """SIGTERM after step 1 saves a checkpoint and stops; the rerun resumes there (recomputing the
    precomputed reference log-probs) and ends where the uninterrupted run ended."""
    import os
    import signal

    from jaxrl.errors import JaxrlError
    from jaxrl.train import loop as loop_module

    class SigtermAtOne(loop_module.Progress):
        def update(self, step, metrics):
            super().update(step, metrics)
            if step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    out = root / "resumed"
    cfg = load_config(None, overrides(root, "mesh.data=1", "dpo.precompute_ref=true", f"output={out}"))
    monkeypatch.setattr(loop_module, "Progress", SigtermAtOne)
    with pytest.raises(JaxrlError, match="checkpoint saved at step 1"):
        dpo.run(cfg, mesh=_one_device())
    assert not (out / "hf").exists()
    monkeypatch.undo()
    caplog.set_level("INFO", logger="jaxrl.train.loop")
    assert dpo.run(cfg, mesh=_one_device()) == pytest.approx(one, rel=1e-5, abs=1e-6)
    assert "resumed from the checkpoint at step 1" in caplog.text
    resumed, straight = _metrics(out), _metrics(root / "one")
    assert [m["step"] for m in resumed] == [1, 2, 2]  # step 1 logged before the stop, then step 2 and the eval
    for want, got in zip(straight, resumed):
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-5, atol=1e-6)
    for x, y in zip(_params(out / "hf"), _params(root / "one" / "hf")):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
