"""DeepSpeed JSON configs, read into jaxrl: batch sizes, precision, ZeRO stage, optimizer and scheduler.

A DeepSpeed config is validated key by key. Keys whose behaviour jaxrl reproduces are "understood";
keys that only tune PyTorch/CUDA machinery (offloading, bucket sizes, communication overlap, timers,
activation checkpointing) are accepted and named in one warning, because JAX/XLA decides those things
itself; anything else is an error that names the key and suggests the closest understood one.

The pieces:
- :func:`parse` -> :class:`DeepSpeedConfig` (batch sizes resolved by DeepSpeed's rule for a
  data-parallel world size),
- :func:`make_schedule` (WarmupLR, WarmupDecayLR, WarmupCosineLR as optax schedules),
- :func:`make_optimizer` (the config's Adam/AdamW/SGD, or a given optax optimizer, wrapped in clipping,
  loss scaling and accumulation),
- :func:`to_run_config_overrides` (the same file as `key=value` overrides of jaxrl's RunConfig) and
  :func:`critic_overrides` (DeepSpeed-Chat's step-3 critic file, onto the critic's keys),
- :func:`check_hybrid_engine` (a `hybrid_engine.max_out_tokens` shorter than the rollouts is an error).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrl.errors import JaxrlError
from jaxrl.io import read_json
from jaxrl.optim import LossScaleConfig, wrap_optimizer

# --------------------------------------------------------------------------------------------- schema
# Understood keys per section ("" is the top level). "mesh" is ours: the ('data', 'fsdp', 'tensor')
# axis sizes of the engine's mesh (default: every device on 'data').
_UNDERSTOOD = {
    "": ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "fp16", "bf16",
         "bfloat16", "zero_optimization", "gradient_clipping", "optimizer", "scheduler", "steps_per_print", "mesh",
         "hybrid_engine"),
    "fp16": ("enabled", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
             "consecutive_hysteresis", "min_loss_scale"),
    "bf16": ("enabled",),
    "zero_optimization": ("stage",),
    "optimizer": ("type", "params"),
    "scheduler": ("type", "params"),
    "mesh": ("data", "fsdp", "tensor"),
    # DeepSpeed-Chat's step-3 actor: its generation tensor-parallel size and the tokens one generation holds.
    "hybrid_engine": ("enabled", "inference_tp_size", "max_out_tokens"),
}

# Accepted and ignored: they tune PyTorch/CUDA memory, communication or tooling, which XLA owns here.
_PYTORCH_ONLY = {
    "": ("wall_clock_breakdown", "zero_allow_untested_optimizer", "amp", "activation_checkpointing",
         "flops_profiler", "comms_logger", "memory_breakdown", "dump_state", "prescale_gradients",
         "gradient_predivide_factor", "communication_data_type", "sparse_gradients", "zero_force_ds_cpu_optimizer",
         "checkpoint", "aio", "tensorboard", "wandb", "csv_monitor", "comet", "timers",
         "dataloader_drop_last", "torch_autocast", "graph_harvesting", "use_data_before_expert_parallel_"),
    "fp16": ("auto_cast", "fp16_master_weights_and_grads"),
    "bf16": ("immediate_grad_update", "check_grad_overflow", "bf16_master_weights_and_grads",
             "bf16_optimizer_states"),
    "zero_optimization": ("offload_optimizer", "offload_param", "allgather_partitions", "allgather_bucket_size",
                          "reduce_scatter", "reduce_bucket_size", "overlap_comm", "contiguous_gradients",
                          "sub_group_size", "round_robin_gradients", "elastic_checkpoint", "load_from_fp32_weights",
                          "cpu_offload", "cpu_offload_params", "cpu_offload_use_pin_memory", "memory_efficient_linear",
                          "ignore_unused_parameters", "legacy_stage1", "zero_hpz_partition_size",
                          "zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_quantized_gradients",
                          "mics_shard_size", "mics_hierarchical_params_gather", "use_multi_rank_bucket_allreduce",
                          "pipeline_loading_checkpoint", "override_module_apply", "log_trace_cache_warnings"),
    "optimizer.params": ("torch_adam", "fused"),
    # Which CUDA buffers DeepSpeed's Hybrid Engine keeps between generations and how it gathers ZeRO-3
    # shards for its kernels; jaxrl's Hybrid Engine reshards in one jitted step and drops the copy.
    "hybrid_engine": ("release_inference_cache", "pin_parameters", "tp_gather_partition_size"),
}
_PYTORCH_ONLY_PREFIX = {"zero_optimization": "stage3_"}  # stage3_prefetch_bucket_size, stage3_max_live_parameters...

# DeepSpeed features that change the training maths and that this engine does not reproduce.
_UNSUPPORTED = ("curriculum_learning", "data_efficiency", "elasticity", "progressive_layer_drop", "pipeline",
                "compression_training", "quantize_training", "sparse_attention", "eigenvalue", "autotuning",
                "moe", "sequence_parallel_size", "tensor_parallel")

OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}  # DeepSpeed matches optimizer types case-blind
_OPTIMIZER_PARAMS = {
    "adam": ("lr", "betas", "eps", "weight_decay", "adam_w_mode", "bias_correction", "amsgrad"),
    "adamw": ("lr", "betas", "eps", "weight_decay", "adam_w_mode", "bias_correction", "amsgrad"),
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
}
_WARMUP = ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type")
SCHEDULERS = {
    "WarmupLR": _WARMUP,
    "WarmupDecayLR": ("total_num_steps",) + _WARMUP,
    "WarmupCosineLR": ("total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type"),
}


def _unknown(key: str, path: str, known) -> JaxrlError:
    full = f"{path}.{key}" if path else key
    if not path and key in _UNSUPPORTED:
        return JaxrlError(f"DeepSpeed key '{key}' is not supported by jaxrl's engine (it changes the training "
                          f"itself and jaxrl does not reproduce it); remove it from the config")
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    where = f"under '{path}'" if path else "at the top level"
    return JaxrlError(f"unknown DeepSpeed config key '{full}'{hint} Understood keys {where}: {', '.join(known)}")


def _check_keys(section: Mapping, path: str, known, ignored: list[str]) -> None:
    """Raises on keys neither understood nor PyTorch-only; appends the PyTorch-only ones to `ignored`."""
    skip = _PYTORCH_ONLY.get(path, ())
    prefix = _PYTORCH_ONLY_PREFIX.get(path)
    for key in section:
        if key in known:
            continue
        if key in skip or (prefix and str(key).startswith(prefix)):
            ignored.append(f"{path}.{key}" if path else key)
            continue
        raise _unknown(str(key), path, known)


def _section(raw: Mapping, key: str) -> dict:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise JaxrlError(f"DeepSpeed config key '{key}' must be an object of keys, got {value!r}")
    return dict(value)


def _value(section: Mapping, key: str, path: str, kind: str, default: Any = None) -> Any:
    """`section[key]` checked to be `kind` (int, pos_int, float, bool, str); `default` when absent."""
    if key not in section or section[key] is None:
        return default
    value, name = section[key], f"{path}.{key}" if path else key
    if value == "auto":
        raise JaxrlError(f"DeepSpeed config key '{name}' is 'auto', which only the HF Trainer integration fills "
                         f"in; give a number")
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = {
        "int": is_int,
        "pos_int": is_int and value >= 1,
        "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        wanted = {"int": "an integer", "pos_int": "a positive integer", "float": "a number", "bool": "true or false",
                  "str": "a string"}[kind]
        raise JaxrlError(f"DeepSpeed config key '{name}' must be {wanted}, got {value!r}")
    return float(value) if kind == "float" else value


# ------------------------------------------------------------------------------------------- the config
@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """The config's `optimizer` section: a canonical type name and its params with DeepSpeed's defaults."""

    type: str  # Adam | AdamW | SGD
    params: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class SchedulerSpec:
    """The config's `scheduler` section: a type and its params with DeepSpeed's defaults filled in."""

    type: str  # WarmupLR | WarmupDecayLR | WarmupCosineLR
    params: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class HybridEngineSpec:
    """An enabled `hybrid_engine` section (DeepSpeed's defaults for what it leaves out)."""

    inference_tp_size: int  # tensor-parallel size of generation: jaxrl's generation.mesh.tensor
    max_out_tokens: int  # tokens (prompt + generated) one sequence of a generation may hold


@dataclasses.dataclass(frozen=True)
class DeepSpeedConfig:
    """A validated DeepSpeed config, batch sizes resolved for `dp_size` data-parallel devices."""

    train_batch_size: int  # samples per optimizer step, all data-parallel devices together
    micro_batch_per_device: int  # train_micro_batch_size_per_gpu: samples per device per micro-step
    grad_accum: int  # gradient_accumulation_steps: micro-steps per optimizer step
    dp_size: int  # data-parallel devices the batch sizes were resolved for
    compute: str  # fp32 | bf16 | fp16: the dtype the forward and backward run in
    loss_scale: LossScaleConfig  # the fp16 section (enabled iff fp16.enabled)
    zero_stage: int  # zero_optimization.stage, 0-3
    gradient_clipping: float  # global-norm clip; 0 turns it off (DeepSpeed's default)
    optimizer: OptimizerSpec | None  # None: the caller passes an optax optimizer
    scheduler: SchedulerSpec | None  # None: a constant learning rate (or the optax optimizer's own)
    steps_per_print: int  # log every this many optimizer steps
    mesh: Mapping[str, int]  # our "mesh" key: {"data", "fsdp", "tensor"} axis sizes (-1: the rest)
    hybrid_engine: HybridEngineSpec | None = None  # None: no hybrid_engine section, or one not enabled
    ignored: tuple[str, ...] = ()  # PyTorch/CUDA-only keys that were accepted and ignored
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # the config as given

    @property
    def micro_batch(self) -> int:
        """Rows of one `engine.step` call: the global micro-batch, `train_batch_size / grad_accum`."""
        return self.micro_batch_per_device * self.dp_size


def load(config: Mapping | str | os.PathLike) -> dict:
    """The config as a dict: `config` itself, or the JSON object in the file it names."""
    if isinstance(config, Mapping):
        return dict(config)
    if not isinstance(config, (str, os.PathLike)):
        raise JaxrlError(f"config must be a dict or the path of a DeepSpeed JSON file, got {type(config).__name__}")
    if not os.path.isfile(config):
        raise JaxrlError(f"DeepSpeed config file '{config}' not found")
    return read_json(config, what="DeepSpeed config file", fix="repair it or give another --deepspeed file")


def resolve_batch_sizes(train_batch_size: int | None, micro: int | None, accum: int | None,
                        dp_size: int) -> tuple[int, int, int]:
    """DeepSpeed's rule `train_batch_size = micro * accum * dp_size`: any two give the third.

    With only `train_batch_size`, accumulation is 1; with only the micro-batch, accumulation is 1 too.
    Returns `(train_batch_size, micro, accum)`; an inconsistent or indivisible set raises, naming the keys.
    """
    tbs, mbs, gas, n = train_batch_size, micro, accum, dp_size
    names = "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"
    if tbs is None and mbs is None:
        raise JaxrlError(f"the DeepSpeed config needs train_batch_size or train_micro_batch_size_per_gpu "
                         f"(DeepSpeed's rule: {names[0]} = {names[1]} x {names[2]} x data-parallel devices)")
    if tbs is not None and mbs is not None and gas is not None:
        if tbs != mbs * gas * n:
            raise JaxrlError(
                f"inconsistent batch sizes: {names[0]} ({tbs}) must equal {names[1]} ({mbs}) x {names[2]} ({gas}) "
                f"x {n} data-parallel devices = {mbs * gas * n}; fix one of them or leave one out to infer it")
        return tbs, mbs, gas
    if tbs is None:
        gas = gas or 1
        return mbs * gas * n, mbs, gas
    if mbs is None:
        gas = gas or 1
        if tbs % (gas * n):
            raise JaxrlError(
                f"{names[0]} ({tbs}) is not divisible by {names[2]} ({gas}) x {n} data-parallel devices = "
                f"{gas * n}, so {names[1]} cannot be inferred; choose a multiple of {gas * n}")
        return tbs, tbs // (gas * n), gas
    # train_batch_size and micro-batch given: accumulation is inferred.
    if tbs % (mbs * n):
        raise JaxrlError(
            f"{names[0]} ({tbs}) is not divisible by {names[1]} ({mbs}) x {n} data-parallel devices = {mbs * n}, "
            f"so {names[2]} cannot be inferred; choose a multiple of {mbs * n}")
    return tbs, mbs, tbs // (mbs * n)


def _loss_scale(fp16: Mapping, enabled: bool) -> LossScaleConfig:
    """`fp16.*` -> LossScaleConfig (`loss_scale` 0: dynamic, > 0: that fixed scale).

    A field left out takes DeepSpeed's default whether the section names some fields or none
    (DeepSpeed >= 0.17.1, `DeepSpeedFP16Config.dynamic_loss_scale_args` in
    deepspeed/runtime/precision_config.py): 2**16, window 1000, hysteresis 2, minimum 1, not consecutive.
    """
    p = "fp16"
    kw = {
        "static_scale": _value(fp16, "loss_scale", p, "float", 0.0),
        "initial_scale_power": _value(fp16, "initial_scale_power", p, "int", 16),
        "loss_scale_window": _value(fp16, "loss_scale_window", p, "int", 1000),
        "hysteresis": _value(fp16, "hysteresis", p, "int", 2),
        "min_loss_scale": _value(fp16, "min_loss_scale", p, "float", 1.0),
        "consecutive_hysteresis": _value(fp16, "consecutive_hysteresis", p, "bool", False),
    }
    try:
        return LossScaleConfig(enabled=enabled, **kw)
    except JaxrlError as e:  # its messages name our field names; name DeepSpeed's instead
        msg = str(e).replace("loss_scale.static_scale", "fp16.loss_scale").replace("loss_scale.", "fp16.")
        raise JaxrlError(msg) from None


def _optimizer(raw: Mapping, ignored: list[str]) -> OptimizerSpec | None:
    if "optimizer" not in raw:
        return None
    section = _section(raw, "optimizer")
    _check_keys(section, "optimizer", _UNDERSTOOD["optimizer"], ignored)
    kind = _value(section, "type", "optimizer", "str")
    if kind is None:
        raise JaxrlError("DeepSpeed config key 'optimizer.type' is missing; use one of Adam, AdamW, SGD")
    key = kind.lower()
    if key not in OPTIMIZERS:
        close = difflib.get_close_matches(key, list(OPTIMIZERS), n=1)
        hint = f"; did you mean '{OPTIMIZERS[close[0]]}'?" if close else ""
        raise JaxrlError(f"optimizer.type '{kind}' is not supported{hint} Supported: Adam, AdamW, SGD; for others "
                         f"pass an optax optimizer as initialize(optimizer=...) and drop the 'optimizer' section")
    params = _section(section, "params")
    p = "optimizer.params"
    _check_keys(params, p, _OPTIMIZER_PARAMS[key], ignored)
    if key == "sgd":
        out = {
            "lr": _value(params, "lr", p, "float"),
            "momentum": _value(params, "momentum", p, "float", 0.0),
            "dampening": _value(params, "dampening", p, "float", 0.0),
            "weight_decay": _value(params, "weight_decay", p, "float", 0.0),
            "nesterov": _value(params, "nesterov", p, "bool", False),
        }
        if out["lr"] is None:
            raise JaxrlError("optimizer.params.lr is required for SGD")
        if out["dampening"] != 0:
            raise JaxrlError(f"optimizer.params.dampening {out['dampening']} is not supported; only 0")
        if out["nesterov"] and out["momentum"] <= 0:
            raise JaxrlError("optimizer.params.nesterov needs optimizer.params.momentum > 0")
    else:
        betas = params.get("betas", [0.9, 0.999])
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise JaxrlError(f"optimizer.params.betas must be two numbers in [0, 1), got {betas!r}")
        out = {
            "lr": _value(params, "lr", p, "float", 1e-3),
            "betas": (float(betas[0]), float(betas[1])),
            "eps": _value(params, "eps", p, "float", 1e-8),
            "weight_decay": _value(params, "weight_decay", p, "float", 0.0),
            # DeepSpeed's Adam decouples weight decay (AdamW) unless adam_w_mode is false.
            "adam_w_mode": True if key == "adamw" else _value(params, "adam_w_mode", p, "bool", True),
        }
        if not _value(params, "bias_correction", p, "bool", True):
            raise JaxrlError("optimizer.params.bias_correction false is not supported (optax Adam always corrects)")
        if _value(params, "amsgrad", p, "bool", False):
            raise JaxrlError("optimizer.params.amsgrad is not supported; pass optimizer=optax.amsgrad(...) instead")
        if out["eps"] <= 0:
            raise JaxrlError(f"optimizer.params.eps must be > 0, got {out['eps']}")
    if out["lr"] <= 0:
        raise JaxrlError(f"optimizer.params.lr must be > 0, got {out['lr']}")
    if out["weight_decay"] < 0:
        raise JaxrlError(f"optimizer.params.weight_decay must be >= 0, got {out['weight_decay']}")
    return OptimizerSpec(OPTIMIZERS[key], out)


def _scheduler(raw: Mapping, optimizer: OptimizerSpec | None, ignored: list[str]) -> SchedulerSpec | None:
    if "scheduler" not in raw:
        return None
    section = _section(raw, "scheduler")
    _check_keys(section, "scheduler", _UNDERSTOOD["scheduler"], ignored)
    kind = _value(section, "type", "scheduler", "str")
    if kind not in SCHEDULERS:
        close = difflib.get_close_matches(str(kind), list(SCHEDULERS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise JaxrlError(f"scheduler.type {kind!r} is not supported{hint} Supported: {', '.join(SCHEDULERS)}")
    params = _section(section, "params")
    p = "scheduler.params"
    _check_keys(params, p, SCHEDULERS[kind], ignored)
    out = {
        "warmup_num_steps": _value(params, "warmup_num_steps", p, "pos_int", 1000),
        "warmup_type": _value(params, "warmup_type", p, "str", "log"),
    }
    if out["warmup_type"] not in ("log", "linear"):
        raise JaxrlError(f"scheduler.params.warmup_type must be 'log' or 'linear', got {out['warmup_type']!r}")
    if kind in ("WarmupDecayLR", "WarmupCosineLR"):
        out["total_num_steps"] = _value(params, "total_num_steps", p, "pos_int")
        if out["total_num_steps"] is None:
            raise JaxrlError(f"scheduler.params.total_num_steps is required for {kind}")
    if kind == "WarmupCosineLR":
        out["warmup_min_ratio"] = _value(params, "warmup_min_ratio", p, "float", 0.0)
        out["cos_min_ratio"] = _value(params, "cos_min_ratio", p, "float", 1e-4)
        out["lr"] = optimizer.params["lr"] if optimizer else None  # the ratios scale the optimizer's lr
    else:
        out["warmup_min_lr"] = _value(params, "warmup_min_lr", p, "float", 0.0)
        # DeepSpeed: WarmupLR peaks at the optimizer's lr when warmup_max_lr is absent, WarmupDecayLR at 0.001.
        fallback = optimizer.params["lr"] if (optimizer and kind == "WarmupLR") else 1e-3
        out["warmup_max_lr"] = _value(params, "warmup_max_lr", p, "float", fallback)
        if out["warmup_max_lr"] <= 0:
            raise JaxrlError(f"scheduler.params.warmup_max_lr must be > 0, got {out['warmup_max_lr']}")
        if out["warmup_max_lr"] < out["warmup_min_lr"]:
            raise JaxrlError(f"scheduler.params.warmup_max_lr ({out['warmup_max_lr']}) must be >= "
                             f"scheduler.params.warmup_min_lr ({out['warmup_min_lr']})")
    return SchedulerSpec(kind, out)


def mesh_sizes(config: Mapping | str | os.PathLike) -> dict[str, int]:
    """Our "mesh" key: {"data", "fsdp", "tensor"} axis sizes (default: every device on 'data')."""
    section = _section(load(config), "mesh")
    _check_keys(section, "mesh", _UNDERSTOOD["mesh"], [])
    return {axis: _value(section, axis, "mesh", "int", default)
            for axis, default in (("data", -1), ("fsdp", 1), ("tensor", 1))}


def parse(config: Mapping | str | os.PathLike, dp_size: int, *, warn: bool = True) -> DeepSpeedConfig:
    """Validates a DeepSpeed config and resolves it for `dp_size` data-parallel devices.

    Args:
      config: a dict or the path of a DeepSpeed JSON file.
      dp_size: data-parallel devices (the mesh's 'data' x 'fsdp'), DeepSpeed's world size.
      warn: emit the one warning naming the PyTorch/CUDA-only keys that are ignored.
    Raises:
      JaxrlError: an unknown key (with a close match), a value of the wrong type or out of range, or
        batch sizes that break DeepSpeed's rule.
    """
    raw = load(config)
    ignored: list[str] = []
    _check_keys(raw, "", _UNDERSTOOD[""], ignored)
    if "bf16" in raw and "bfloat16" in raw:
        raise JaxrlError("the DeepSpeed config has both 'bf16' and its alias 'bfloat16'; keep one")
    sections = {name: _section(raw, name) for name in ("fp16", "zero_optimization", "hybrid_engine")}
    sections["bf16"] = _section(raw, "bfloat16" if "bfloat16" in raw else "bf16")
    for name, section in sections.items():
        _check_keys(section, name, _UNDERSTOOD[name], ignored)

    tbs, mbs, gas = resolve_batch_sizes(
        _value(raw, "train_batch_size", "", "pos_int"), _value(raw, "train_micro_batch_size_per_gpu", "", "pos_int"),
        _value(raw, "gradient_accumulation_steps", "", "pos_int"), dp_size)

    fp16 = _value(sections["fp16"], "enabled", "fp16", "bool", False)
    bf16 = _value(sections["bf16"], "enabled", "bf16", "bool", False)
    if fp16 and bf16:
        raise JaxrlError("fp16.enabled and bf16.enabled are both true; enable at most one")
    stage = _value(sections["zero_optimization"], "stage", "zero_optimization", "int", 0)
    if stage not in (0, 1, 2, 3):
        raise JaxrlError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    clip = _value(raw, "gradient_clipping", "", "float", 0.0)
    if clip < 0:
        raise JaxrlError(f"gradient_clipping must be >= 0 (0 turns it off), got {clip}")
    mesh = mesh_sizes(raw)
    optimizer = _optimizer(raw, ignored)
    scheduler = _scheduler(raw, optimizer, ignored)
    if ignored and warn:
        warnings.warn(
            f"DeepSpeed config keys ignored by jaxrl (PyTorch/CUDA tuning that XLA decides itself): "
            f"{', '.join(ignored)}", UserWarning, stacklevel=2)
    return DeepSpeedConfig(
        train_batch_size=tbs, micro_batch_per_device=mbs, grad_accum=gas, dp_size=dp_size,
        compute="fp16" if fp16 else "bf16" if bf16 else "fp32",
        loss_scale=_loss_scale(sections["fp16"], fp16), zero_stage=stage, gradient_clipping=clip,
        optimizer=optimizer, scheduler=scheduler,
        steps_per_print=_value(raw, "steps_per_print", "", "pos_int", 10),
        mesh=mesh, hybrid_engine=_hybrid_engine(sections["hybrid_engine"]), ignored=tuple(ignored), raw=raw,
    )


def _hybrid_engine(section: Mapping) -> HybridEngineSpec | None:
    """`hybrid_engine` -> its spec when enabled (DeepSpeed's defaults: tensor-parallel 1, 512 tokens)."""
    p = "hybrid_engine"
    if not _value(section, "enabled", p, "bool", False):
        return None
    return HybridEngineSpec(inference_tp_size=_value(section, "inference_tp_size", p, "pos_int", 1),
                            max_out_tokens=_value(section, "max_out_tokens", p, "pos_int", 512))


def check_hybrid_engine(ds: DeepSpeedConfig, max_prompt_len: int, max_new_tokens: int) -> None:
    """A DeepSpeed Hybrid Engine sized for fewer tokens than a rollout holds is an error, not a surprise:
    DeepSpeed-Chat sets `max_out_tokens` to its prompt plus answer lengths, so a run asking for longer
    sequences does not match the file it came from."""
    he = ds.hybrid_engine
    if he is None or he.max_out_tokens >= max_prompt_len + max_new_tokens:
        return
    raise JaxrlError(f"hybrid_engine.max_out_tokens ({he.max_out_tokens}) is less than data.max_prompt_len "
                     f"({max_prompt_len}) + generation.max_new_tokens ({max_new_tokens}) = "
                     f"{max_prompt_len + max_new_tokens}, the tokens of one rollout sequence: raise max_out_tokens "
                     f"in the DeepSpeed config, or lower data.max_prompt_len or generation.max_new_tokens")


# ------------------------------------------------------------------------------------ schedule, optimizer
def _warmup_fraction(it, n: int, kind: str):
    """DeepSpeed's warmup gamma at iteration `it` of `n`: log(it + 1) / log(n), or it / n."""
    return jnp.log(it + 1.0) / math.log(n) if kind == "log" else it / n


def make_schedule(ds: DeepSpeedConfig, lr: float | None = None) -> optax.Schedule | None:
    """The config's scheduler as an optax schedule over applied optimizer updates; None without one.

    With `n = max(2, warmup_num_steps)`, `T = total_num_steps` and `i` DeepSpeed's `last_batch_iteration`::

        warm(i)         = log(i + 1) / log(n)   (warmup_type log)   or   i / n   (linear)
        WarmupLR:       lr(i) = min_lr + (max_lr - min_lr) * (warm(i) if i < n else 1)
        WarmupDecayLR:  lr(i) = min_lr + (max_lr - min_lr) * (warm(i) if i < n else max(0, (T - i) / max(1, T - n)))
        WarmupCosineLR: lr(i) = lr * (min_ratio + (1 - min_ratio) * warm(i)                        if i < n
                                      max(0, cos_min + (1 - cos_min) * (1 + cos(pi * min(1, u))) / 2)  else)
                        with u = (i - n + 1) / max(1, T - n)

    DeepSpeed steps its scheduler after each applied update, starting from `i = -1` (the warmup start,
    lr 0 for WarmupCosineLR), so optax's update count `t` maps to `i = t - 1`. Skipped (overflowing)
    fp16 steps do not advance it, in DeepSpeed as here (the skipped update leaves the count unchanged).

    Args:
      ds: the parsed config.
      lr: the optimizer's peak lr, for WarmupCosineLR without an optimizer section.
    """
    sched = ds.scheduler
    if sched is None:
        return None
    q = sched.params
    n, kind = max(2, q["warmup_num_steps"]), q["warmup_type"]

    if sched.type == "WarmupCosineLR":
        base = q["lr"] if q["lr"] is not None else lr
        if base is None:
            raise JaxrlError("scheduler WarmupCosineLR scales the optimizer's lr: add optimizer.params.lr")
        lo, end, total = q["warmup_min_ratio"], q["cos_min_ratio"], q["total_num_steps"]

        def ratio(i):
            warm = lo + (1.0 - lo) * _warmup_fraction(jnp.maximum(i, 0.0), n, kind)
            u = jnp.minimum(1.0, (i - n + 1.0) / max(1, total - n))
            decay = jnp.maximum(0.0, end + (1.0 - end) * (1.0 + jnp.cos(jnp.pi * u)) / 2.0)
            return jnp.where(i < 0, 0.0, jnp.where(i < n, warm, decay))

        return lambda count: base * ratio(jnp.asarray(count, jnp.float32) - 1.0)

    lo, hi = q["warmup_min_lr"], q["warmup_max_lr"]
    total = q.get("total_num_steps")

    def gamma(i):
        after = 1.0 if total is None else jnp.maximum(0.0, (total - i) / max(1, total - n))
        return jnp.where(i < 0, 0.0, jnp.where(i < n, _warmup_fraction(jnp.maximum(i, 0.0), n, kind), after))

    return lambda count: lo + (hi - lo) * gamma(jnp.asarray(count, jnp.float32) - 1.0)


def _decayed(wd: float, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """PyTorch's coupled (L2) weight decay: `g + wd * p` before the optimizer sees it."""
    return optax.chain(optax.add_decayed_weights(wd), tx) if wd > 0 else tx


def base_optimizer(ds: DeepSpeedConfig) -> optax.GradientTransformation:
    """The `optimizer` section as optax, learning rate from the `scheduler` section when there is one.

    Adam/AdamW: DeepSpeed's Adam is AdamW (decoupled decay on every parameter) unless
    `adam_w_mode` is false, then decay is PyTorch's L2 term. SGD: PyTorch SGD (L2 decay, heavy-ball or
    Nesterov momentum, first momentum buffer = the gradient).
    """
    spec = ds.optimizer
    if spec is None:
        raise JaxrlError("the DeepSpeed config has no 'optimizer' section: add one or pass an optax optimizer")
    q = spec.params
    lr = make_schedule(ds) or q["lr"]
    if spec.type == "SGD":
        return _decayed(q["weight_decay"], optax.sgd(lr, momentum=q["momentum"] or None, nesterov=q["nesterov"]))
    b1, b2 = q["betas"]
    if q["adam_w_mode"]:
        return optax.adamw(lr, b1=b1, b2=b2, eps=q["eps"], weight_decay=q["weight_decay"])
    return _decayed(q["weight_decay"], optax.adam(lr, b1=b1, b2=b2, eps=q["eps"]))


def make_optimizer(ds: DeepSpeedConfig,
                   optimizer: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """`MultiSteps(scale_or_skip(chain(clip, optimizer)), gradient_accumulation_steps)`: jaxrl's own
    wrapping (`jaxrl.optim.wrap_optimizer`, which the runs' AdamW goes through too) around the optimizer.

    Args:
      ds: the parsed config.
      optimizer: an optax optimizer of the caller's; None builds the config's `optimizer`/`scheduler`.
        An optax optimizer carries its own learning rate, so it cannot be combined with either section.
    Returns:
      the transformation the train step uses: clipping to `gradient_clipping` (unscaled gradients),
      fp16 loss scaling (else skipping of non-finite steps), and accumulation over micro-steps.
    """
    if optimizer is not None:
        both = [k for k in ("optimizer", "scheduler") if k in ds.raw]
        if both:
            raise JaxrlError(f"an optax optimizer was passed and the DeepSpeed config has {' and '.join(both)}: "
                             f"keep one (drop the section(s), or pass optimizer=None)")
        tx = optimizer
    else:
        tx = base_optimizer(ds)
    return wrap_optimizer(tx, clip_norm=ds.gradient_clipping, loss_scale=ds.loss_scale, grad_accum=ds.grad_accum)


# ----------------------------------------------------------------------------------- RunConfig overrides
def to_run_config_overrides(config: Mapping | str | os.PathLike | DeepSpeedConfig,
                            world_size: int | None = None) -> list[str]:
    """The DeepSpeed config as `key=value` overrides of jaxrl's RunConfig (for `jaxrl sft --deepspeed`).

    Only what the file states is mapped (absent keys keep jaxrl's defaults): `train.batch_size`,
    `optim.grad_accum`, `optim.lr/b1/b2/eps/weight_decay/clip_norm`, `zero_stage`, `precision.compute`,
    `precision.loss_scale.*`, `optim.schedule/warmup_steps/min_lr_ratio` and `train.steps` (from the
    scheduler), `train.log_every`, `mesh.*`, and from an enabled `hybrid_engine` (DeepSpeed-Chat's step-3
    actor) `generation.mesh.tensor` = `inference_tp_size`.

    Args:
      config: a dict, a JSON path, or a parsed config.
      world_size: data-parallel devices for the batch-size rule; default the config's mesh
        ('data' x 'fsdp' when both are fixed) or every device.
    Raises:
      JaxrlError: what `parse` rejects, and what RunConfig cannot express (SGD, Adam with L2 decay).
    """
    return _as_overrides(_mapped(_parsed(config, world_size)))


def _parsed(config, world_size: int | None) -> DeepSpeedConfig:
    if isinstance(config, DeepSpeedConfig):
        return config
    raw = load(config)
    return parse(raw, world_size or _dp_size_of(raw))


def _as_overrides(out: Mapping[str, Any]) -> list[str]:
    # JSON scalars are YAML scalars (true, 0.001, 16); strings such as 'bf16' go in bare.
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in out.items()]


def _mapped(ds: DeepSpeedConfig) -> dict[str, Any]:
    """RunConfig key -> value for what the parsed file states (see `to_run_config_overrides`)."""
    raw, out = ds.raw, {}  # a later entry wins (the scheduler's lr)
    if {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"} & set(raw):
        out.update({"train.batch_size": ds.train_batch_size, "optim.grad_accum": ds.grad_accum})
    if "gradient_clipping" in raw:
        out["optim.clip_norm"] = ds.gradient_clipping
    if "zero_optimization" in raw:
        out["zero_stage"] = ds.zero_stage
    if {"fp16", "bf16", "bfloat16"} & set(raw):
        out["precision.compute"] = ds.compute
    if "fp16" in raw:
        for name in ("enabled", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale",
                     "static_scale", "consecutive_hysteresis"):
            out[f"precision.loss_scale.{name}"] = getattr(ds.loss_scale, name)
    if ds.optimizer is not None:
        q = ds.optimizer.params
        if ds.optimizer.type == "SGD" or (not q["adam_w_mode"] and q["weight_decay"] > 0):
            what = "SGD" if ds.optimizer.type == "SGD" else f"{ds.optimizer.type} with adam_w_mode false"
            raise JaxrlError(f"jaxrl's runs train with AdamW; optimizer.type {what} cannot be mapped onto it: "
                             f"use AdamW (or Adam) in the DeepSpeed config")
        out.update({"optim.lr": q["lr"], "optim.b1": q["betas"][0], "optim.b2": q["betas"][1], "optim.eps": q["eps"],
                    "optim.weight_decay": q["weight_decay"]})
    if ds.scheduler is not None:
        out.update(_schedule_overrides(ds))
    if "steps_per_print" in raw:
        out["train.log_every"] = ds.steps_per_print
    mesh = raw.get("mesh", {})
    out.update({f"mesh.{axis}": mesh[axis] for axis in ("data", "fsdp", "tensor") if axis in mesh})
    if ds.hybrid_engine is not None:
        out["generation.mesh.tensor"] = ds.hybrid_engine.inference_tp_size
    return out


# The critic's file sets the critic's own keys; the rest it shares with the actor (the run). PPO batches
# come from ppo.* (not train.batch_size) and the run logs once (not per model).
_CRITIC_OWN = {"zero_stage": "ppo.critic.zero_stage", "optim.lr": "ppo.critic_lr"}
_CRITIC_UNUSED = ("train.batch_size", "train.log_every")


def critic_overrides(config: Mapping | str | os.PathLike | DeepSpeedConfig, run, world_size: int | None = None,
                     ) -> list[str]:
    """DeepSpeed-Chat's step-3 critic config (`--critic_zero_stage`, its own DeepSpeed engine) as overrides
    of the critic's RunConfig keys: its ZeRO stage -> `ppo.critic.zero_stage`, and the reward model's
    stage as DeepSpeed-Chat derives it (ZeRO-3 with a ZeRO-3 critic, else 0) -> `ppo.reward.zero_stage`;
    an optimizer or scheduler lr -> `ppo.critic_lr`.

    Everything else the file states (precision, loss scaling, clipping, accumulation, Adam's betas, the
    schedule, the mesh) jaxrl's critic shares with the actor, so it must equal `run`'s (the config with
    the actor's file applied); a difference is an error naming the key.

    Args:
      config: the critic's DeepSpeed config (dict, JSON path or parsed).
      run: the RunConfig it joins. world_size: as for `to_run_config_overrides`.
    """
    ds = _parsed(config, world_size)
    out = {}
    for key, value in _mapped(ds).items():
        if key in _CRITIC_OWN:
            out[_CRITIC_OWN[key]] = value
        elif key not in _CRITIC_UNUSED and _lookup(run, key) != value:
            raise JaxrlError(f"the critic's DeepSpeed config gives {key}={value} but the actor's run has "
                             f"{_lookup(run, key)}: jaxrl trains the critic with the actor's settings except its "
                             f"ZeRO stage and learning rate (ppo.critic.zero_stage, ppo.critic_lr); make the two "
                             f"files agree on it")
    if "ppo.critic.zero_stage" in out:
        out["ppo.reward.zero_stage"] = 3 if out["ppo.critic.zero_stage"] == 3 else 0
    return _as_overrides(out)


def _lookup(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _schedule_overrides(ds: DeepSpeedConfig) -> dict[str, Any]:
    """RunConfig's schedule (linear warmup from 0, then constant/linear/cosine) nearest the DeepSpeed one."""
    sched, q = ds.scheduler.type, ds.scheduler.params
    out: dict[str, Any] = {"optim.warmup_steps": q["warmup_num_steps"]}
    if sched == "WarmupCosineLR":
        out.update({"optim.schedule": "cosine", "optim.min_lr_ratio": q["cos_min_ratio"]})
        start = q["warmup_min_ratio"]
    else:
        out["optim.lr"] = q["warmup_max_lr"]
        if sched == "WarmupLR":
            out["optim.schedule"] = "constant"
        else:
            out.update({"optim.schedule": "linear", "optim.min_lr_ratio": q["warmup_min_lr"] / q["warmup_max_lr"]})
        start = q["warmup_min_lr"]
    if "total_num_steps" in q:
        out["train.steps"] = q["total_num_steps"]
    if q["warmup_type"] == "log" or start > 0:
        warnings.warn(f"scheduler {sched}: jaxrl runs warm up linearly from 0, DeepSpeed's warmup here is "
                      f"{q['warmup_type']} from {start}; the mapped run's first {q['warmup_num_steps']} steps differ",
                      UserWarning, stacklevel=3)
    return out


def _dp_size_of(raw: Mapping) -> int:
    """Data-parallel devices a config's mesh implies: 'data' x 'fsdp' when fixed, else every device
    not on 'tensor' (with '-1' on a data axis)."""
    mesh = raw.get("mesh", {}) if isinstance(raw.get("mesh", {}), Mapping) else {}
    data, fsdp, tensor = mesh.get("data", -1), mesh.get("fsdp", 1), mesh.get("tensor", 1)
    if -1 not in (data, fsdp):
        return data * fsdp
    return max(1, jax.device_count() // max(1, tensor))
