"""`jaxrl plan --step sft|reward|ppo` on the tiny model, through the roles a run builds: PPO's rows equal
the memory of the run's own compiled steps (its Trainers over real parameters, its Hybrid Engine's real
generation copy), and a run that feeds a role another batch than it declares is refused."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl import cli
from jaxrl.config import load_config
from jaxrl.generation import decode, prefill
from jaxrl.steps import ppo, sft
from jaxrl.steps import role as role_lib
from jaxrl.steps.plan import compile_for_memory, plan
from jaxrl.train import build

TINY = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")
# Small PPO shapes on the 8 devices: ZeRO-3 over fsdp=8 but the critic and reward model in ZeRO-0 (each
# role in its own stage), generation on data=2 x tensor=4.
PPO = ["model.reward_path=tiny", "mesh.data=1", "mesh.fsdp=8", "zero_stage=3", "ppo.critic.zero_stage=0",
       "ppo.reward.zero_stage=0", "generation.mesh.data=2", "generation.mesh.tensor=4", "ppo.rollout_batch_size=8",
       "ppo.mini_batches=1", "ppo.ema=0.9"]
STAGES = {"sft": [3], "reward": [3], "ppo": [3, 0, 3, 0, None, None, None]}  # each row's ZeRO stage
ROLES = {"sft": ["actor train step"], "reward": ["reward model train step"],
         "ppo": ["actor train step", "critic train step", "reference forward", "reward forward",
                 "generation reshard", "generation prefill", "generation decode"]}


@pytest.mark.parametrize("step", ["sft", "reward", "ppo"])
def test_plan_every_step(step, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # the config's path does not depend on the working directory
    rc = cli.main(["plan", "--config", TINY, "--devices", "8", "--json", "--step", step, *PPO])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and [r["role"] for r in report["roles"]] == ROLES[step]
    assert [r["zero_stage"] for r in report["roles"]] == STAGES[step]
    for r in report["roles"]:
        assert r["arguments"] > 0 and r["total"] >= r["arguments"] and r["fits"] is None


def _memory(compiled) -> tuple:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes)


def _row(r) -> tuple:
    return (r.arguments, r.outputs, r.aliased, r.temporaries)


def test_ppo_plan_equals_the_runs_compiled_steps():
    cfg = load_config(TINY, PPO)
    planned = {r.role: r for r in plan(cfg, "ppo")}
    mesh = build.training_mesh(cfg)
    roles = ppo.load_roles(cfg, mesh)  # what `jaxrl ppo` builds: real parameters, born in the layout
    states = {"actor": roles.actor.init_state(), "critic": roles.critic.init_state()}
    for name, trainer in (("actor", roles.actor), ("critic", roles.critic)):
        state = states[name]
        declared = roles.declared[name]
        batch = {k: jax.device_put(jnp.zeros(shape, dtype), trainer.batch_sharding)
                 for k, (shape, dtype) in declared.batch.items()}
        with jax.set_mesh(mesh):
            run = _memory(compile_for_memory(trainer.lower(state, role_lib.feed(declared, batch))))
        assert run == _row(planned[f"{name} train step"]), name
        if name == "actor":
            # What plan counts as resident: the run's parameters, optimizer state and step, plus the EMA copy.
            held = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
            params = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state.params))
            assert planned["actor train step"].resident == held + params
    actor = states["actor"]
    graphdef, params = nnx.split(roles.hybrid.generation_copy(actor.params, actor.frozen))  # as generate_batch does
    hybrid, sampler = roles.hybrid, ppo.sampler(cfg, roles.arch, roles.tokenizer)
    rows, plen = cfg.ppo.rollout_batch_size, cfg.data.max_prompt_len
    prompts = jax.device_put(np.ones((rows, plen), np.int32), hybrid.batch_sharding)
    static = dict(cfg=sampler, batch_sharding=hybrid.batch_sharding)
    with jax.set_mesh(hybrid.mesh):
        reshard = compile_for_memory(hybrid.lower(actor.params, actor.frozen))
        first = compile_for_memory(prefill.lower(graphdef, params, prompts, prompts, jax.random.key(0), **static))
        state = prefill(graphdef, params, prompts, prompts, jax.random.key(0), **static)
        second = compile_for_memory(decode.lower(graphdef, params, state, **static))
    assert _memory(reshard) == _row(planned["generation reshard"])
    assert _memory(first) == _row(planned["generation prefill"])
    assert _memory(second) == _row(planned["generation decode"])


def test_a_batch_other_than_the_declared_one_is_refused():
    cfg = load_config(TINY, ["data.packing=true"])
    (actor,) = sft.roles(cfg, build.training_mesh(cfg))
    rows, length = actor.batch["input_ids"][0]
    batch = {k: np.zeros((rows, length), np.int32) for k in actor.batch}
    assert set(role_lib.feed(actor, dict(batch, extra=np.zeros(3)))) == set(actor.batch)  # extras dropped
    with pytest.raises(RuntimeError, match="actor role was fed"):
        role_lib.feed(actor, dict(batch, loss_mask=np.zeros((rows, length + 1), np.int32)))
    with pytest.raises(RuntimeError, match=r"missing \['positions'\]"):
        role_lib.feed(actor, {k: v for k, v in batch.items() if k != "positions"})
