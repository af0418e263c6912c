"""`jaxrl sft` and `jaxrl reward` (steps 1 and 2): a loss plugged into the shared loop; `jaxrl ppo` (step 3)."""

from __future__ import annotations

import functools
import logging
import math


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML file overriding config fields (default: the built-in defaults)")
    parser.add_argument("--output", help="output directory (overrides `output`)")
    parser.add_argument("--deepspeed", metavar="DS_CONFIG_JSON",
                        help="a DeepSpeed config file, mapped onto jaxrl's keys (batch, accumulation, ZeRO, fp16...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def run(args) -> int:
    cfg = load_run_config(args)
    {"sft": run_sft, "reward": run_reward, "ppo": run_ppo}[args.command](cfg)
    return 0


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


# ------------------------------------------------------------------------------------------- steps 1, 2
def run_sft(cfg):
    """Step 1: supervised fine-tuning. Writes OUTPUT/hf (a causal LM) and returns the final eval metrics."""
    from jaxrl.algorithms.sft import sft_loss
    from jaxrl.data.tokenize import tokenize_sft
    from jaxrl.train import build

    tok = build.load_tokenizer(cfg.model.path)
    train, evals = build.load_split(cfg, "sft", tok)
    enc = build.encoder(tok)
    sizes = dict(max_len=cfg.data.max_len, max_prompt_len=cfg.data.max_prompt_len,
                 loss_on_prompt=cfg.sft.loss_on_prompt)
    train = tokenize_sft(train, enc, **sizes, pack=cfg.data.packing).arrays
    evals = tokenize_sft(evals, enc, **sizes).arrays if evals else None
    return _train(cfg, "sft", "causal_lm", sft_loss, train, evals, tok)


def run_reward(cfg):
    """Step 2: the reward model. Writes OUTPUT/hf (a sequence classifier, one label)."""
    from jaxrl.algorithms.reward import reward_loss
    from jaxrl.data.tokenize import tokenize_pairs
    from jaxrl.train import build

    tok = build.load_tokenizer(cfg.model.path)
    train, evals = build.load_split(cfg, "reward", tok)
    enc = build.encoder(tok)
    sizes = dict(max_len=cfg.data.max_len, max_prompt_len=cfg.data.max_prompt_len)
    train = tokenize_pairs(train, enc, **sizes).arrays
    evals = tokenize_pairs(evals, enc, **sizes).arrays if evals else None
    loss = functools.partial(reward_loss, required_margin=cfg.reward.margin)
    return _train(cfg, "reward", "score", loss, train, evals, tok)


def _train(cfg, name, kind, loss_fn, train_arrays, eval_arrays, tokenizer):
    """Builds mesh, model and trainer, and runs the shared loop. Returns the last eval metrics."""
    import jax

    from jaxrl.models.hf import save_pretrained
    from jaxrl.train import build, loop

    mesh = build.training_mesh(cfg)
    arch = build.model_arch(cfg.model.path, tokenizer)
    model, layout = build.build_model(build.spec_from(cfg, kind=kind), arch, mesh, cfg.zero_stage)
    trainer = build.make_trainer(cfg, mesh, model, layout, loss_fn)
    del model  # the train state owns the parameters
    rows = build.micro_batch_rows(cfg, mesh)
    batches = build.iterator(train_arrays, rows, cfg.seed)
    final = {}

    def update(state, step):
        micro = []
        with jax.set_mesh(mesh):
            for _ in range(cfg.optim.grad_accum):
                state, metrics = trainer.step(state, build.to_device(next(batches), trainer.batch_sharding))
                micro.append(metrics)
        return state, build.window_metrics(jax.device_get(micro))

    def evaluate(state):
        metrics = evaluate_rows(trainer, state, eval_arrays, rows, limit=cfg.train.eval_batches * rows)
        if name == "sft":
            metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
        final.clear()
        final.update(metrics)
        return metrics

    def export(state, directory):
        with jax.set_mesh(mesh):
            save_pretrained(trainer.model(state), directory, tokenizer=tokenizer)

    spec = loop.Loop(
        name=name, steps=cfg.train.steps, state=trainer.init_state(), update=update,
        evaluate=evaluate if eval_arrays is not None else None,
        export=export, data_state=batches.state, restore_data=batches.restore,
        show=("loss", "accuracy"), allow_nonfinite=cfg.precision.compute == "fp16", config=cfg,
    )
    loop.run(spec, schedule(cfg), cfg.output)
    return final


def evaluate_rows(trainer, state, arrays: dict, rows: int, *, limit: int | None = None) -> dict:
    """The loss function's metrics over the first `limit` rows of `arrays` (all by default), in batches
    of `rows` (the last one padded, its padding rows weighted 0): the metrics of one batch of exactly
    those rows."""
    import jax

    from jaxrl.train import build

    out = []
    with jax.set_mesh(trainer.mesh):
        for batch in build.eval_iterator(arrays, rows, limit):
            out.append(jax.device_get(trainer.evaluate(state, build.to_device(batch, trainer.batch_sharding))))
    return build.weighted_mean(out)


def schedule(cfg):
    from jaxrl.train.loop import Schedule

    t = cfg.train
    return Schedule(log_every=t.log_every, eval_every=t.eval_every, save_every=t.save_every,
                    export_every=t.export_every, keep=t.keep_checkpoints)


# ------------------------------------------------------------------------------------------------ step 3
def run_ppo(cfg):
    from jaxrl.algorithms.ppo_trainer import run_ppo as _run

    return _run(cfg)
