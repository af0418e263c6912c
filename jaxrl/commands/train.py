"""`jaxrl sft`, `jaxrl reward`, `jaxrl ppo`, `jaxrl dpo`, `jaxrl rl`, `jaxrl grpo`: reads the config, then
runs the step (`jaxrl.steps.<name>.run`; step 3 by `algorithm`: `steps.ppo`, `steps.dpo`, or `steps.grpo` for
the GRPO family)."""

from __future__ import annotations

import logging

from jaxrl.errors import JaxrlError


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML file overriding config fields (default: the built-in defaults)")
    parser.add_argument("--output", help="output directory (overrides `output`)")
    parser.add_argument("--deepspeed", metavar="DS_CONFIG_JSON",
                        help="a DeepSpeed config file, mapped onto jaxrl's keys (batch, accumulation, ZeRO, fp16...)")
    parser.add_argument("--deepspeed-actor", metavar="DS_CONFIG_JSON",
                        help="ppo: DeepSpeed-Chat's step-3 actor config (the run's keys, its hybrid_engine block)")
    parser.add_argument("--deepspeed-critic", metavar="DS_CONFIG_JSON",
                        help="ppo: DeepSpeed-Chat's step-3 critic config (the critic's ZeRO stage and lr)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def run(args) -> int:
    cfg = load_run_config(args)  # first: it starts the distributed runtime before anything touches devices
    from jaxrl.errors import JaxrlError
    from jaxrl.steps import dpo, reward, sft

    if args.command in ("sft", "reward", "dpo"):
        {"sft": sft.run, "reward": reward.run, "dpo": dpo.run}[args.command](cfg)
        return 0
    if args.command == "ppo" and cfg.algorithm != "ppo":
        raise JaxrlError(f"`jaxrl ppo` runs PPO but the config says algorithm={cfg.algorithm}; "
                         "use `jaxrl rl` to run the config's algorithm")
    run_rl(cfg)
    return 0


def run_rl(cfg):
    """Step 3 by `cfg.algorithm`: PPO, DPO, or one of the GRPO family."""
    from jaxrl.steps import dpo, grpo, ppo

    return {"ppo": ppo.run, "dpo": dpo.run}.get(cfg.algorithm, grpo.run)(cfg)


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
    actor, critic = _deepspeed_files(args)
    if actor or critic:
        from jaxrl.deepspeed import config as ds_config

        # The DeepSpeed files override the YAML file; key=value arguments still win.
        world = data * fsdp
        actor_ds = ds_config.parse(ds_config.load(actor), world) if actor else None
        mapped = ds_config.to_run_config_overrides(actor_ds) if actor else []
        if critic:
            mapped += ds_config.critic_overrides(critic, load_config(args.config, mapped), world)
        cfg = load_config(args.config, mapped + overrides)
        if actor_ds is not None and args.command == "ppo":
            ds_config.check_hybrid_engine(actor_ds, cfg.data.max_prompt_len, cfg.generation.max_new_tokens)
        m = cfg.mesh
        resolve_axes({"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor}, jax.device_count())
    return cfg


def _deepspeed_files(args) -> tuple[str | None, str | None]:
    """(the run's/actor's DeepSpeed file, the critic's): --deepspeed, or ppo's --deepspeed-actor/-critic."""
    plain, actor, critic = (getattr(args, k, None) for k in ("deepspeed", "deepspeed_actor", "deepspeed_critic"))
    if (actor or critic) and args.command != "ppo":
        raise JaxrlError(f"--deepspeed-actor and --deepspeed-critic are for `jaxrl ppo` (DeepSpeed-Chat's step 3); "
                         f"`jaxrl {args.command}` reads one file: --deepspeed")
    if plain and actor:
        raise JaxrlError("--deepspeed and --deepspeed-actor both name the actor's DeepSpeed config; give one")
    return plain or actor, critic
