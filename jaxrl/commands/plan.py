"""`jaxrl plan`: the per-device memory of a config's compiled steps, before any run.

The numbers come from `jaxrl.steps.plan`, which builds the step's roles (the ones `run` builds)
abstractly and compiles them ahead of time; this command parses its arguments, prints the table or
JSON, and refuses a config that does not fit, naming the role, the bytes and the fixes.
"""

from __future__ import annotations

import dataclasses
import json
import re

from jaxrl.errors import JaxrlError

STEPS = ("sft", "reward", "ppo", "grpo", "dpo")  # jaxrl.steps.plan.STEPS, here so --help imports nothing
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({p: 1024 ** (i + 1) for i, u in enumerate("kmgt") for p in (u, f"{u}i", f"{u}ib")})


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML file overriding config fields (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--step", choices=STEPS,
                        help="which step to plan (default: grpo when algorithm is of the GRPO family, ppo when "
                             "model.reward_path is set, else sft)")
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


# ------------------------------------------------------------------------------------------------ command
def run(args) -> int:
    limit = parse_bytes(args.device_memory) if args.device_memory else None
    _use_devices(args.devices)
    import jax

    from jaxrl.config import load_config
    from jaxrl.steps.plan import plan
    from jaxrl.train.build import training_mesh

    cfg = load_config(args.config, args.overrides)
    alg = cfg.algorithm
    step = args.step or (alg if alg == "dpo" else "grpo" if alg != "ppo" else "ppo" if cfg.model.reward_path else "sft")
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
              "resident at the same time; the generation reshard's needed counts its arguments, the actor's "
              "weights, once)" if step == "ppo" else "(outputs: beyond those written into donated arguments)")
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


def _row(r, limit: int | None) -> dict:
    row = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}
    return dict(row, total=r.total, needed=r.needed, fits=None if limit is None else r.needed <= limit)


def table(roles) -> str:
    cols = ("arguments", "outputs", "temporaries", "total", "others", "needed")
    width = max(len(r.role) for r in roles) + 2
    lines = ["per device".ljust(width) + "ZeRO" + "".join(c.rjust(13) for c in cols)]
    for r in roles:
        values = (r.arguments, r.outputs - r.aliased, r.temporaries, r.total, r.others, r.needed)
        stage = "-" if r.zero_stage is None else str(r.zero_stage)  # each model in its own stage
        lines.append(r.role.ljust(width) + stage.rjust(4) + "".join(human(v).rjust(13) for v in values))
    return "\n".join(lines)


def _stage_key(r, step: str) -> str:
    """The config key of a row's ZeRO stage: `ppo.<role>.zero_stage` for PPO's models, else `zero_stage`."""
    return f"ppo.{r.role.split()[0]}.zero_stage" if step == "ppo" else "zero_stage"


def _advice(too_big, limit: int, source: str, cfg, step: str) -> str:
    needs = "; ".join(f"{r.role} needs {human(r.needed)} ({r.needed:,} bytes)" for r in too_big)
    fixes = []
    stages = {_stage_key(r, step): r.zero_stage for r in too_big if r.zero_stage is not None and r.zero_stage < 3}
    if stages:
        fixes.append("raise " + ", ".join(f"{key} (now {stage})" for key, stage in stages.items())
                     + " (3 also shards the parameters)")
    fixes.append("shard over more devices with mesh.fsdp or mesh.tensor")
    kinds = {r.kind for r in too_big}
    if "generation" in kinds:
        fixes.append(f"raise generation.mesh.tensor (now {cfg.generation.mesh.tensor})")
    if step in ("ppo", "grpo"):
        fixes.append("lower ppo.rollout_batch_size (or raise ppo.mini_batches) or generation.max_new_tokens")
    else:
        fixes.append("lower train.batch_size (or raise optim.grad_accum) or data.max_len")
    if "train" in kinds and cfg.model.remat == "none":
        fixes.append("set model.remat=full (recompute activations in the backward pass)")
    return (f"does not fit in {human(limit)} ({limit:,} bytes) per device ({source}): {needs}. "
            f"To fit: {'; '.join(fixes)}.")
