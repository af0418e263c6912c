"""The per-device memory of a step's compiled functions, before any run, from the roles the run builds.

Each role of the step (`sft.roles`, `reward.roles`, `ppo.roles`, `dpo.roles`: the very declarations `run`
builds) is built with `abstract=True`: models from `nnx.eval_shape` (no weights read or allocated), train states and
batches as `jax.ShapeDtypeStruct`s carrying their shardings. Its function is lowered and compiled ahead
of time for the configured meshes and each role's own ZeRO stage, and `Compiled.memory_analysis()` gives XLA's own
per-device bytes: arguments, outputs (less those aliased to donated arguments) and temporaries.

A trained role lowers its `Trainer` step, a frozen one its forward; PPO adds the Hybrid Engine's
reshard into its generation copy, and the generation prefill and decode on the generation mesh (no
reference when ppo.kl_coef is 0). In PPO all
the models stay on the devices for the whole run, so a role needs its own total plus the other models'
resident state ("others").
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl.config import GRPO_FAMILY, RunConfig
from jaxrl.errors import JaxrlError
from jaxrl.generation import decode, prefill
from jaxrl.parallel.sharding import DATA_AXES
from jaxrl.steps import dpo, grpo, ppo, reward, sft
from jaxrl.steps import role as role_lib
from jaxrl.steps.role import Role
from jaxrl.train import build

STEPS = ("sft", "reward", "ppo", "grpo", "dpo")  # grpo: the config's algorithm of the GRPO family


@dataclasses.dataclass(frozen=True)
class RoleMemory:
    """Per-device bytes of one compiled function (from `memory_analysis()`)."""

    role: str  # e.g. 'actor train step'
    kind: str  # 'train', 'forward' or 'generation': which fixes apply
    arguments: int
    outputs: int
    aliased: int  # outputs written into donated arguments (counted once)
    temporaries: int
    resident: int  # this role's model state, kept on the devices between calls (0: dropped after use)
    others: int = 0  # the other models' resident state, on the devices at the same time (PPO)
    zero_stage: int | None = None  # the model's own ZeRO stage (None: the generation copy, tensor-parallel)
    shared: int = 0  # of its arguments, the bytes that are another role's resident state (in `others`)

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @property
    def needed(self) -> int:
        return self.total + self.others - self.shared


def plan(cfg: RunConfig, step: str) -> list[RoleMemory]:
    """Compiles `step`'s functions for `cfg` from abstract values; returns their per-device memory."""
    if step not in STEPS:
        raise JaxrlError(f"unknown step {step!r}; use one of {', '.join(STEPS)}")
    mesh = build.training_mesh(cfg)
    if step in ("sft", "reward"):
        (only,) = (sft if step == "sft" else reward).roles(cfg, mesh)
        return [train_memory(only, cfg, mesh)[0]]
    if step == "dpo":
        return dpo_memory(cfg, mesh)
    if step == "grpo":
        return _grpo(cfg, mesh)
    declared = ppo.roles(cfg, mesh)
    actor, actor_trainer = train_memory(declared["actor"], cfg, mesh)
    if cfg.ppo.ema > 0:  # the EMA copy of the actor's parameters lives beside them
        actor = dataclasses.replace(actor, resident=actor.resident + per_device(actor_trainer.abstract_state().params))
    critic, _ = train_memory(declared["critic"], cfg, mesh)
    frozen = [forward_memory(declared[name], cfg, mesh) for name in ("reference", "reward") if name in declared]
    rows = [actor, critic, *frozen, *generation_memory(cfg, declared["actor"], actor_trainer, mesh)]
    total = sum(r.resident for r in rows)
    return [dataclasses.replace(r, others=total - r.resident) for r in rows]


def dpo_memory(cfg: RunConfig, mesh) -> list[RoleMemory]:
    """The policy's train step and the reference's forward (none for simpo). A reference of its own is
    resident beside the policy, unless dpo.precompute_ref runs it (and frees it) before the policy is
    built; one that shares the policy's weights (LoRA) holds nothing more, and runs beside the policy's
    optimizer state."""
    declared = dpo.roles(cfg, mesh)
    policy, trainer = train_memory(declared["policy"], cfg, mesh)
    ref = declared.get("reference")
    if ref is None:
        return [policy]
    if ref.shares:
        state = trainer.abstract_state()
        weights = (state.params, state.frozen)
        row = forward_memory(ref, cfg, mesh, model=(trainer.graphdef, weights), resident=0)
        return [policy, dataclasses.replace(row, others=policy.resident - per_device(weights))]
    row = forward_memory(ref, cfg, mesh)
    if cfg.dpo.precompute_ref:
        return [policy, row]
    return [dataclasses.replace(policy, others=row.resident), dataclasses.replace(row, others=policy.resident)]
def _grpo(cfg: RunConfig, mesh) -> list[RoleMemory]:
    """The GRPO family's roles (`grpo.roles`): the actor, the reference and reward model when declared, and
    the Hybrid Engine's generation; all resident for the whole run, like PPO's."""
    if cfg.algorithm not in GRPO_FAMILY:
        raise JaxrlError("--step grpo plans the config's GRPO-family algorithm, but algorithm is ppo; "
                         "set algorithm=grpo (or dr_grpo, dapo, gspo, rloo, reinforce_pp) or plan --step ppo")
    declared = grpo.roles(cfg, mesh)
    actor, actor_trainer = train_memory(declared["actor"], cfg, mesh)
    frozen = [forward_memory(declared[name], cfg, mesh) for name in ("reference", "reward") if name in declared]
    rows = [actor, *frozen, *generation_memory(cfg, declared["actor"], actor_trainer, mesh)]
    total = sum(r.resident for r in rows)
    return [dataclasses.replace(r, others=total - r.resident) for r in rows]


def train_memory(role: Role, cfg: RunConfig, mesh):
    """A trained role's step lowered on its abstract TrainState and batch: (RoleMemory, the Trainer)."""
    trainer = role_lib.trainer(role, cfg, mesh, abstract=True)
    state = trainer.abstract_state()
    with jax.set_mesh(mesh):
        batch = role_lib.feed(role, role_lib.abstract_batch(role.batch, trainer.batch_sharding))  # as the run's
        compiled = compile_for_memory(trainer.lower(state, batch))
    row = memory(f"{role.name} train step", "train", compiled, per_device(state))
    return dataclasses.replace(row, zero_stage=role.spec.zero_stage), trainer


def forward_memory(role: Role, cfg: RunConfig, mesh, *, model=None, resident=None) -> RoleMemory:
    """A frozen role's jitted forward (reference log-probs, reward scores) on one batch. `model`: the
    abstract (graphdef, state) it runs on (default: its own, from `role_lib.frozen`); `resident`: the bytes
    it keeps on the devices (default: that state's)."""
    graphdef, state = model or role_lib.frozen(role, cfg, mesh, abstract=True)
    batch = role_lib.feed(role, role_lib.abstract_batch(role.batch, NamedSharding(mesh, P(DATA_AXES))))
    with jax.set_mesh(mesh):
        compiled = compile_for_memory(role_lib.jit_forward(role, graphdef).lower(state, batch))
    resident = per_device(state) if resident is None else resident
    return dataclasses.replace(memory(f"{role.name} forward", "forward", compiled, resident),
                               zero_stage=role.spec.zero_stage)


def generation_memory(cfg: RunConfig, actor: Role, actor_trainer, mesh) -> list[RoleMemory]:
    """The Hybrid Engine's reshard (training layout -> generation copy: its peak, the copy counted as its
    output), then prefill and decode of the copy (dropped after each rollout)."""
    hybrid = ppo.hybrid_engine(cfg, actor.arch, actor_trainer.graphdef, mesh)
    gen = hybrid.mesh
    trained = actor_trainer.abstract_state()
    with jax.set_mesh(gen):
        reshard = compile_for_memory(hybrid.lower(trained.params, trained.frozen))
    graphdef, params = hybrid.abstract_copy()
    sampler = ppo.sampler(cfg, actor.arch)
    prompts = jax.ShapeDtypeStruct((cfg.ppo.rollout_batch_size, cfg.data.max_prompt_len), jnp.int32,
                                   sharding=hybrid.batch_sharding)
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=NamedSharding(gen, P()))
    static = dict(cfg=sampler, batch_sharding=hybrid.batch_sharding)
    with jax.set_mesh(gen):
        # the GRPO family's rollout shares each group's prompt prefill (`generation.prefill`'s group)
        group = cfg.grpo.group_size if cfg.algorithm not in ("ppo", "dpo") else 1
        lowered = prefill.lower(graphdef, params, prompts, prompts, rng, group=group, **static)
        first = compile_for_memory(lowered)
        state = jax.tree.map(lambda info, s: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=s),
                             lowered.out_info, first.output_shardings)
        second = compile_for_memory(decode.lower(graphdef, params, state, **static))
    reshard = dataclasses.replace(memory("generation reshard", "generation", reshard, 0),
                                  shared=per_device((trained.params, trained.frozen)))  # the actor's own weights
    return [reshard, memory("generation prefill", "generation", first, 0),
            memory("generation decode", "generation", second, 0)]


# ------------------------------------------------------------------------------------------------ bytes
def compile_for_memory(lowered):
    """`lowered.compile()`; on CPU at a low backend optimization level. The memory numbers come from buffer
    assignment, which runs before code generation, so they are the same; the code (never executed) only
    compiles faster."""
    if jax.devices()[0].platform == "cpu":
        return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    return lowered.compile()


def memory(name: str, kind: str, compiled, resident: int) -> RoleMemory:
    m = compiled.memory_analysis()
    if m is None:
        raise JaxrlError("this backend reports no memory analysis; plan on the host CPU with --devices N")
    return RoleMemory(role=name, kind=kind, arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                      aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes, resident=resident)


def per_device(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard counts)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
