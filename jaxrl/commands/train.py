"""`jaxrl sft`, `jaxrl reward`, `jaxrl ppo`, `jaxrl rl`, `jaxrl grpo`: reads the config, then runs the step
(`jaxrl.steps.<name>.run`; step 3 by `algorithm`: `steps.ppo` or `steps.grpo` for the GRPO family)."""

from __future__ import annotations

import logging


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML file overriding config fields (default: the built-in defaults)")
    parser.add_argument("--output", help="output directory (overrides `output`)")
    parser.add_argument("--deepspeed", metavar="DS_CONFIG_JSON",
                        help="a DeepSpeed config file, mapped onto jaxrl's keys (batch, accumulation, ZeRO, fp16...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def run(args) -> int:
    cfg = load_run_config(args)  # first: it starts the distributed runtime before anything touches devices
    from jaxrl.errors import JaxrlError
    from jaxrl.steps import reward, sft

    if args.command in ("sft", "reward"):
        {"sft": sft.run, "reward": reward.run}[args.command](cfg)
        return 0
    if args.command == "ppo" and cfg.algorithm != "ppo":
        raise JaxrlError(f"`jaxrl ppo` runs PPO but the config says algorithm={cfg.algorithm}; "
                         "use `jaxrl rl` to run the config's algorithm")
    run_rl(cfg)
    return 0


def run_rl(cfg):
    """Step 3 by `cfg.algorithm`: PPO, or one of the GRPO family."""
    from jaxrl.steps import grpo, ppo

    return (ppo.run if cfg.algorithm == "ppo" else grpo.run)(cfg)


def load_run_config(args):
    """Config file + DeepSpeed file + key=value overrides + --output, validated; starts multi-host.

    Writes nothing: the run echoes its config to OUTPUT/config.yaml only once its inputs are loaded and
    the loop starts (`jaxrl.train.loop.run`), so a rejected argument or config leaves no output behind.
    """
    import jax

    from jaxrl.config import load_config
    from jaxrl.parallel.mesh import initialize_distributed, resolve_axes

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("absl", "orbax", "jax"):  # their INFO lines drown the run's own
        logging.getLogger(noisy).setLevel(logging.WARNING)
    overrides = list(args.overrides) + ([f"output={args.output}"] if args.output else [])
    cfg = load_config(args.config, overrides)
    if getattr(args, "command", None) == "grpo" and cfg.algorithm == "ppo":  # `jaxrl grpo`: unless named
        overrides = ["algorithm=grpo"] + overrides
        cfg = load_config(args.config, overrides)
    d = cfg.distributed
    initialize_distributed(d.coordinator, d.num_processes, d.process_id)  # before anything touches devices
    m = cfg.mesh  # the training mesh must fit the devices before anything is built or written
    data, fsdp, _ = resolve_axes({"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor}, jax.device_count())
    if getattr(args, "deepspeed", None):
        from jaxrl.deepspeed_config import to_run_config_overrides

        # The DeepSpeed file overrides the YAML file; key=value arguments still win.
        cfg = load_config(args.config, to_run_config_overrides(args.deepspeed, world_size=data * fsdp) + overrides)
        m = cfg.mesh
        resolve_axes({"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor}, jax.device_count())
    return cfg
