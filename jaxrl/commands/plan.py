"""`jaxrl plan`: the per-device memory of a config's compiled steps, before any run.

Each step is lowered and compiled ahead of time for the configured meshes and ZeRO stage from abstract
values only: models come from `nnx.eval_shape` (no weights are read or allocated), train states and
batches are `jax.ShapeDtypeStruct`s carrying their shardings. `Compiled.memory_analysis()` then gives
XLA's own per-device bytes: arguments, outputs (less those aliased to donated arguments) and
temporaries.

Roles per step: `sft` the actor train step; `reward` the reward-model train step; `ppo` the actor and
critic train steps, the reference (none when ppo.kl_coef is 0) and reward forwards, and the Hybrid
Engine's generation prefill and decode on the generation mesh. In PPO all the models stay on the
devices for the whole run, so a role needs its own total plus the other models' resident state
("others").
"""

from __future__ import annotations

import dataclasses
import json
import re

from jaxrl.errors import JaxrlError

STEPS = ("sft", "reward", "ppo")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({p: 1024 ** (i + 1) for i, u in enumerate("kmgt") for p in (u, f"{u}i", f"{u}ib")})


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML file overriding config fields (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--step", choices=STEPS,
                        help="which step to plan (default: ppo when model.reward_path is set, else sft)")
    parser.add_argument("--device-memory", metavar="SIZE",
                        help="memory of one device, e.g. 16GiB, 512MiB, 8GB (default: what the devices report)")
    parser.add_argument("--devices", type=int, metavar="N",
                        help="plan for N devices simulated on the host CPU (a machine you do not have)")
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object")


def parse_bytes(text: str) -> int:
    """'16GiB' -> 17179869184: KiB/MiB/GiB/TiB (and K/M/G/T) are powers of 1024, KB/MB/GB/TB of 1000."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", text, re.IGNORECASE)
    if not m or m.group(2).lower() not in _UNITS:
        raise JaxrlError(f"--device-memory {text!r} is not a size; write e.g. 16GiB, 512MiB or 8GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


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

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @property
    def needed(self) -> int:
        return self.total + self.others


# ------------------------------------------------------------------------------------------------ command
def run(args) -> int:
    limit = parse_bytes(args.device_memory) if args.device_memory else None
    _use_devices(args.devices)
    import jax

    from jaxrl.config import load_config
    from jaxrl.train.build import training_mesh

    cfg = load_config(args.config, args.overrides)
    step = args.step or ("ppo" if cfg.model.reward_path else "sft")
    roles = plan(cfg, step)
    source = "--device-memory"
    if limit is None:
        limit, source = _device_limit(), "the device's memory"
    platform, n = jax.devices()[0].platform, jax.device_count()
    if args.json:
        print(json.dumps({"step": step, "zero_stage": cfg.zero_stage, "platform": platform, "devices": n,
                          "device_memory": limit, "roles": [_row(r, limit) for r in roles]}, indent=2))
    else:
        mesh = " ".join(f"{k}={v}" for k, v in training_mesh(cfg).shape.items())
        print(f"jaxrl plan: {step} step, zero_stage {cfg.zero_stage}, {n} {platform} devices, mesh {mesh}, "
              f"compute {cfg.precision.compute}")
        print(table(roles))
        print("(outputs: beyond those written into donated arguments; others: the other models' state, "
              "resident at the same time)")
        if platform == "cpu":
            print("(compiled for CPU: arguments and outputs are exact; temporaries are the CPU compiler's)")
    if limit is None:
        if not args.json:
            print("no --device-memory given and the devices report none: fit not checked")
        return 0
    too_big = [r for r in roles if r.needed > limit]
    if too_big:
        raise JaxrlError(_advice(too_big, limit, source, cfg, step))
    if not args.json:
        print(f"fits: the largest role needs {human(max(r.needed for r in roles))} of {human(limit)} per device")
    return 0


def _use_devices(n: int | None) -> None:
    """--devices N: simulate N CPU devices when JAX has not started yet; if it has, it must have N."""
    if n is None:
        return
    if n < 1:
        raise JaxrlError(f"--devices must be >= 1, got {n}")
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError:  # the backends are up (e.g. inside a test): use them if the count matches
        if jax.device_count() != n:
            raise JaxrlError(f"--devices {n}: JAX has already started with {jax.device_count()} devices; "
                             f"run `jaxrl plan` in a fresh process") from None


def _device_limit() -> int | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001  backends without memory statistics (CPU) raise or return None
        stats = {}
    return stats.get("bytes_limit")


def _row(r: RoleMemory, limit: int | None) -> dict:
    row = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}
    return dict(row, total=r.total, needed=r.needed, fits=None if limit is None else r.needed <= limit)


def table(roles: list[RoleMemory]) -> str:
    cols = ("arguments", "outputs", "temporaries", "total", "others", "needed")
    width = max(len(r.role) for r in roles) + 2
    lines = ["per device".ljust(width) + "".join(c.rjust(13) for c in cols)]
    for r in roles:
        values = (r.arguments, r.outputs - r.aliased, r.temporaries, r.total, r.others, r.needed)
        lines.append(r.role.ljust(width) + "".join(human(v).rjust(13) for v in values))
    return "\n".join(lines)


def _advice(too_big: list[RoleMemory], limit: int, source: str, cfg, step: str) -> str:
    needs = "; ".join(f"{r.role} needs {human(r.needed)} ({r.needed:,} bytes)" for r in too_big)
    fixes = []
    if cfg.zero_stage < 3:
        fixes.append(f"raise zero_stage (now {cfg.zero_stage}; 3 also shards the parameters)")
    fixes.append("shard over more devices with mesh.fsdp or mesh.tensor")
    kinds = {r.kind for r in too_big}
    if "generation" in kinds:
        fixes.append(f"raise generation.mesh.tensor (now {cfg.generation.mesh.tensor})")
    if step == "ppo":
        fixes.append("lower ppo.rollout_batch_size (or raise ppo.mini_batches) or generation.max_new_tokens")
    else:
        fixes.append("lower train.batch_size (or raise optim.grad_accum) or data.max_len")
    if "train" in kinds and cfg.model.remat == "none":
        fixes.append("set model.remat=full (recompute activations in the backward pass)")
    return (f"does not fit in {human(limit)} ({limit:,} bytes) per device ({source}): {needs}. "
            f"To fit: {'; '.join(fixes)}.")


# --------------------------------------------------------------------------------------------- planning
def plan(cfg, step: str) -> list[RoleMemory]:
    """Compiles `step`'s functions for `cfg` from abstract values; returns their per-device memory."""
    from jaxrl.train import build

    if step not in STEPS:
        raise JaxrlError(f"unknown step {step!r}; use one of {', '.join(STEPS)}")
    mesh = build.training_mesh(cfg)
    arch = architecture(cfg.model.path)
    if step == "sft":
        return [_sft(cfg, mesh, arch)]
    if step == "reward":
        return [_reward(cfg, mesh, arch)]
    roles = _ppo(cfg, mesh, arch)
    total = sum(r.resident for r in roles)
    return [dataclasses.replace(r, others=total - r.resident) for r in roles]


def architecture(path: str):
    """The ModelConfig of an HF directory (only its config.json is read) or of a preset."""
    from jaxrl.models.config import PRESETS
    from jaxrl.models.hf import read_config
    from jaxrl.train import build

    if path in PRESETS:  # a preset's vocabulary follows its tokenizer
        return build.model_arch(path, build.load_tokenizer(path))
    return read_config(path)


def _sft(cfg, mesh, arch) -> RoleMemory:
    import jax.numpy as jnp

    from jaxrl.algorithms.sft import sft_loss
    from jaxrl.train import build

    shape = (build.micro_batch_rows(cfg, mesh), cfg.data.max_len)
    batch = {k: (shape, jnp.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    return _train_role("actor train step", cfg, mesh, build.spec_from(cfg), arch, sft_loss, batch)


def _reward(cfg, mesh, arch) -> RoleMemory:
    import functools

    import jax.numpy as jnp

    from jaxrl.algorithms.reward import reward_loss
    from jaxrl.train import build

    shape = (build.micro_batch_rows(cfg, mesh), cfg.data.max_len)
    batch = {f"{side}_{k}": (shape, jnp.int32) for side in ("chosen", "rejected")
             for k in ("input_ids", "attention_mask")}
    loss = functools.partial(reward_loss, required_margin=cfg.reward.margin)
    return _train_role("reward model train step", cfg, mesh, build.spec_from(cfg, kind="score"), arch, loss,
                       batch)


def _ppo(cfg, mesh, arch) -> list[RoleMemory]:
    """The six PPO roles, laid out as `jaxrl.algorithms.ppo_trainer.load_roles` lays them out."""
    import functools

    import jax.numpy as jnp

    from jaxrl.algorithms import ppo
    from jaxrl.algorithms.ppo_trainer import needs_reference, total_updates
    from jaxrl.train import build

    p, stage = cfg.ppo, cfg.zero_stage
    reward_path = cfg.model.reward_path
    if not reward_path:
        raise JaxrlError("the ppo step needs model.reward_path (an HF directory or, for a fresh model, a preset)")
    critic_path = cfg.model.critic_path or reward_path
    plen, length = cfg.data.max_prompt_len, cfg.data.max_prompt_len + cfg.generation.max_new_tokens
    shards = int(mesh.shape["data"] * mesh.shape["fsdp"])
    mb = p.rollout_batch_size * p.generation_batches // p.mini_batches
    if mb % shards:
        raise JaxrlError(f"a PPO mini-batch of {mb} rows (ppo.rollout_batch_size x ppo.generation_batches / "
                         f"ppo.mini_batches) does not split over the {shards} data-parallel devices")
    seq = ((mb, length), jnp.int32)
    resp_i, resp_f = ((mb, length - plen), jnp.int32), ((mb, length - plen), jnp.float32)
    actor_batch = {"seq": seq, "attention_mask": seq, "response_mask": resp_i, "old_logprobs": resp_f,
                   "advantages": resp_f}
    if p.ptx_coef > 0:
        actor_batch.update({f"ptx_{k}": seq for k in ("input_ids", "attention_mask", "loss_mask")})
    critic_batch = {"seq": seq, "attention_mask": seq, "response_mask": resp_i, "old_values": resp_f,
                    "returns": resp_f}
    actor_loss = functools.partial(ppo.actor_loss, prompt_len=plen, clip_ratio=p.clip_ratio,
                                   entropy_coef=p.entropy_coef, ptx_coef=p.ptx_coef)
    critic_loss = functools.partial(ppo.critic_loss, prompt_len=plen, value_clip=p.value_clip, vf_coef=p.vf_coef)
    actor, actor_trainer = _train_role("actor train step", cfg, mesh, build.spec_from(cfg), arch, actor_loss,
                                       actor_batch, total_steps=total_updates(cfg), keep_trainer=True)
    if p.ema > 0:  # the EMA copy of the actor's parameters lives beside them
        actor = dataclasses.replace(actor, resident=actor.resident + _per_device(actor_trainer.abstract_state().params))
    critic_spec = dataclasses.replace(build.spec_from(cfg, critic_path, kind="score"), lora_rank=0)
    critic = _train_role("critic train step", cfg, mesh, critic_spec, architecture(critic_path),
                         critic_loss, critic_batch, lr=p.critic_lr, total_steps=total_updates(cfg), lora=False)
    rollout = {"seq": ((p.rollout_batch_size, length), jnp.int32),
               "attention_mask": ((p.rollout_batch_size, length), jnp.int32)}
    ref = []
    if needs_reference(cfg):
        ref = [_forward_role("reference forward", mesh, stage, build.frozen_spec(cfg), arch, rollout,
                             lambda m, b: ppo.response_logprobs(m, b["seq"], b["attention_mask"], plen)[0])]
    reward = _forward_role("reward forward", mesh, stage, build.frozen_spec(cfg, reward_path, kind="score"),
                           architecture(reward_path), rollout,
                           lambda m, b: m.sequence_score(b["seq"], b["attention_mask"]))
    return [actor, critic, *ref, reward, *_generation_roles(cfg, arch, actor_trainer)]


# ------------------------------------------------------------------------------------ abstract building
def _compile(lowered):
    import jax

    # The memory numbers come from buffer assignment, which runs before code generation; on CPU a low
    # backend optimization level only makes the (never executed) code compile faster.
    if jax.devices()[0].platform == "cpu":
        return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    return lowered.compile()


def _role(name: str, kind: str, compiled, resident: int) -> RoleMemory:
    m = compiled.memory_analysis()
    if m is None:
        raise JaxrlError("this backend reports no memory analysis; plan on the host CPU with --devices N")
    return RoleMemory(role=name, kind=kind, arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                      aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes, resident=resident)


def _per_device(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard counts)."""
    import math

    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _batch(spec: dict, sharding) -> dict:
    import jax

    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in spec.items()}


def abstract_model(spec, arch, mesh, stage: int):
    """`build.build_model` without weights: an `nnx.eval_shape`'d model born in the ZeRO `stage` layout
    (nothing is read or allocated), and that layout."""
    import jax
    from flax import nnx

    from jaxrl.models.lora import add_lora
    from jaxrl.models.transformer import store_params
    from jaxrl.parallel.sharding import model_shardings, zero_layout
    from jaxrl.precision import dtype_of
    from jaxrl.train.build import new_model

    def fresh(sh):
        model = new_model(spec, arch, sh)
        if spec.lora_rank > 0:
            model = add_lora(model, rank=spec.lora_rank, alpha=spec.lora_alpha, targets=spec.lora_targets,
                             seed=spec.seed)
        return model

    layout = zero_layout(fresh, mesh, stage)
    shardings = model_shardings(shard_params=stage == 3, tensor=mesh.shape["tensor"] > 1)
    with jax.set_mesh(mesh):
        return store_params(nnx.eval_shape(lambda: fresh(shardings)), dtype_of(spec.param_dtype)), layout


def _abstract_state(model, mesh, cast=None):
    """(graphdef, pure-dict state of ShapeDtypeStructs on `mesh`) of an abstract model; `cast` maps dtypes."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    from jaxrl.parallel.sharding import spec_tree

    graphdef, state = nnx.split(model)
    specs = spec_tree(state)
    return graphdef, jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, cast(x.dtype) if cast else x.dtype,
                                          sharding=NamedSharding(mesh, s)),
        nnx.to_pure_dict(state), specs, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def _train_role(name, cfg, mesh, spec, arch, loss_fn, batch, *, keep_trainer=False, **trainer_kw):
    """A Trainer over an abstract model, its step lowered on an abstract TrainState and batch."""
    import jax

    from jaxrl.train import build

    model, layout = abstract_model(spec, arch, mesh, cfg.zero_stage)
    trainer = build.make_trainer(cfg, mesh, model, layout, loss_fn, **trainer_kw)
    state = trainer.abstract_state()
    with jax.set_mesh(mesh):
        compiled = _compile(trainer.lower(state, _batch(batch, trainer.batch_sharding)))
    role = _role(name, "train", compiled, _per_device(state))
    return (role, trainer) if keep_trainer else role


def _forward_role(name, mesh, stage, spec, arch, batch, fn) -> RoleMemory:
    """A frozen model's jitted forward `fn(model, batch)` (reference log-probs, reward scores)."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxrl.models.transformer import shard_activations
    from jaxrl.parallel.sharding import DATA_AXES

    model, _ = abstract_model(spec, arch, mesh, stage)
    graphdef, state = _abstract_state(model, mesh)
    forward = jax.jit(lambda st, b: fn(shard_activations(nnx.merge(graphdef, st), P(DATA_AXES)), b))
    with jax.set_mesh(mesh):
        compiled = _compile(forward.lower(state, _batch(batch, NamedSharding(mesh, P(DATA_AXES)))))
    return _role(name, "forward", compiled, _per_device(state))


def _generation_roles(cfg, arch, actor_trainer) -> list[RoleMemory]:
    """Prefill and decode of the Hybrid Engine's generation copy (dropped after each rollout)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxrl.generation import SamplerConfig, decode, prefill
    from jaxrl.models.transformer import Transformer
    from jaxrl.parallel.hybrid import HybridEngine, generation_mesh
    from jaxrl.parallel.sharding import model_shardings
    from jaxrl.precision import dtype_of

    g, rows = cfg.generation, cfg.ppo.rollout_batch_size
    dtype = dtype_of(g.dtype)
    build = lambda sh: Transformer(arch, rngs=nnx.Rngs(0), dtype=dtype, shardings=sh)  # noqa: E731
    hybrid = HybridEngine(actor_trainer.graphdef, build, generation_mesh(g.mesh.data, g.mesh.tensor), dtype)
    mesh = hybrid.mesh
    if rows % mesh.shape["data"]:
        raise JaxrlError(f"ppo.rollout_batch_size={rows} must split over generation.mesh.data "
                         f"({mesh.shape['data']} groups)")
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: build(model_shardings(shard_params=False, tensor=mesh.shape["tensor"] > 1)))
    graphdef, params = _abstract_state(abstract, mesh,
                                       cast=lambda d: dtype if jnp.issubdtype(d, jnp.floating) else d)
    sampler = SamplerConfig(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                            top_p=g.top_p, eos_ids=arch.eos_ids or (0,), pad_id=0)
    prompts = jax.ShapeDtypeStruct((rows, cfg.data.max_prompt_len), jnp.int32, sharding=hybrid.batch_sharding)
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=NamedSharding(mesh, P()))
    static = dict(cfg=sampler, batch_sharding=hybrid.batch_sharding)
    with jax.set_mesh(mesh):
        lowered = prefill.lower(graphdef, params, prompts, prompts, rng, **static)
        first = _compile(lowered)
        state = jax.tree.map(lambda info, s: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=s),
                             lowered.out_info, first.output_shardings)
        second = _compile(decode.lower(graphdef, params, state, **static))
    return [_role("generation prefill", "generation", first, 0), _role("generation decode", "generation", second, 0)]
