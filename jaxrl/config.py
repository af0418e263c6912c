"""The run's configuration schema: `RunConfig` and its typed, frozen sections, each field with its
default and a comment, each section validating its ranges in `__post_init__`.

One `RunConfig` serves every command (`sft`, `reward`, `ppo`, `pipeline`); each reads the sections it
needs. A YAML file holds only what differs from the defaults below:

    train: {steps: 200, batch_size: 32}
    precision: {compute: bf16}

`jaxrl.config_loader` reads files and `key=value` overrides into it: every value is checked against its
field's annotation, so a bad file fails before anything runs, with a message naming the dotted key.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import Literal

from jaxrl.config_loader import apply_overrides, config_keys, from_dict, load, save_yaml, to_dict
from jaxrl.config_loader import check as _check
from jaxrl.config_loader import check_positive as _check_positive
from jaxrl.config_loader import section as _section
from jaxrl.config_loader import sub as _sub
from jaxrl.errors import ConfigValueError
from jaxrl.rewards.config import RewardFunctionsConfig

__all__ = ["RunConfig", "load_config", "apply_overrides", "save_yaml", "from_dict", "to_dict", "config_keys"]


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads the YAML file at `path` (None: the defaults), applies `overrides`, validates.

    Raises:
      JaxrlError: a missing or unreadable file, YAML that is not a mapping, or any bad key or value.
    """
    return load(RunConfig, path, overrides)


# Defaults are the tiny CPU run; configs/*.yaml override them.

Dtype = Literal["fp32", "bf16", "fp16"]
SCHEDULES = ("constant", "linear", "cosine")  # optim.schedule: the learning-rate decay after warmup


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_mesh(obj: object) -> None:
    names = [f.name for f in dataclasses.fields(obj)]
    for name in names:
        size = getattr(obj, name)
        _check(size == -1 or size >= 1, name, f"must be an axis size >= 1 or -1, got {size}")
    wild = [n for n in names if getattr(obj, n) == -1]
    if len(wild) > 1:
        raise ConfigValueError(wild[1], f"is -1 and so is '{wild[0]}': at most one axis can be -1 (the rest)")


def _check_split(split: str) -> None:
    # Only validation; jaxrl.data.split turns the weights into portions of the data.
    try:
        weights = [float(w) for w in split.split(",")]
    except ValueError:
        weights = []
    _check(len(weights) == 3, "split", f"must be three comma-separated numbers like '2,4,4', got {split!r}")
    _check(all(0 <= w < float("inf") for w in weights) and sum(weights) > 0, "split",
           f"must be non-negative numbers with a positive sum, got {split!r}")


@_section
class LoraSection:
    """Low-rank adapters (`nnx.LoRA`) on the named projections."""

    # Adapter rank; 0 turns LoRA off.
    rank: int = 0
    # Scale numerator: the adapter's output is multiplied by alpha / rank.
    alpha: float = 16.0
    # Projections that get adapters, by short name (q, k, v, o, gate, up, down).
    targets: tuple[str, ...] = ("q", "v")
    # Train only the adapters (the base weights stay frozen).
    train_only_lora: bool = True

    def __post_init__(self):
        _check_positive(self, "rank", minimum=0)
        _check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        _check(self.rank == 0 or len(self.targets) > 0, "targets", "must name at least one projection")


@_section
class ModelSection:
    """Which model to start from, and how to train it."""

    # An HF model directory, or the name of a preset for a fresh model ('tiny').
    path: str = "tiny"
    # Rematerialization: none, full (recompute each block), dots (save only matmul outputs). Under
    # zero_stage 3, none saves what dots saves: keeping everything would keep every gathered layer.
    remat: Literal["none", "full", "dots"] = "none"
    # Sequence positions the LM head and its log-softmax handle at once in the losses and log-probs
    # (SFT, PPO, ptx), each chunk rematerialised in the backward pass: the (rows, positions, vocab) fp32
    # logits never exist for a whole sequence. 0: all positions in one pass. Off by default: on the
    # Llama-3-8B SFT plan (16 devices, 4 x 512 tokens per device) chunks of 128 raised the step's
    # temporaries from 12.62 to 17.99 GiB (per-chunk LM-head gradient buffers outweigh the logits saved).
    logits_chunk: int = 0
    # Vocabulary entries the LM head handles at once in the losses and log-probs, each slice
    # rematerialised in the backward pass: the logits exist for one slice, and under zero_stage 3 a
    # device gathers one slice of the LM head at a time, never the whole (width x vocab) head and its
    # gradient. 0: the whole vocabulary at once (the fastest for small vocabularies).
    vocab_chunk: int = 0
    # Low-rank adapters.
    lora: LoraSection = _sub(LoraSection)
    # PPO critic's starting point (an HF directory); empty: the reward model of the previous step.
    critic_path: str = ""
    # PPO reward model (an HF directory); empty: the output of the previous (reward) step.
    reward_path: str = ""
    # DPO's frozen reference model (an HF directory or preset); empty: model.path (the starting weights;
    # under LoRA-only training the policy with its adapters off, no second copy). Unused by dpo.loss=simpo.
    ref_path: str = ""

    def __post_init__(self):
        _check(bool(self.path), "path", "must name an HF directory or a preset such as 'tiny'")
        _check_positive(self, "logits_chunk", minimum=0)
        _check_positive(self, "vocab_chunk", minimum=0)


@_section
class DataSection:
    """The dataset and how it becomes token batches."""

    # Dataset file(s) or directory(ies), or a built-in dataset name ('synthetic': the verifiable task).
    path: tuple[str, ...] | str = "synthetic"
    # The rows' format; 'auto' infers it from the file extension and the row keys.
    format: str = "auto"
    # DeepSpeed-Chat split: the data's relative shares for the SFT, reward and PPO steps.
    split: str = "2,4,4"
    # Maximum tokens per sequence (prompt + response), after truncation.
    max_len: int = 64
    # Maximum prompt tokens (prompts are truncated from the left); must be < max_len.
    max_prompt_len: int = 32
    # Skip malformed rows with a warning instead of failing.
    skip_bad_rows: bool = False
    # Evaluation file(s); empty: hold out eval_fraction of each step's share of `path`.
    eval_path: tuple[str, ...] | str = ""
    # Fraction held out for evaluation when eval_path is empty.
    eval_fraction: float = 0.05
    # Pack several short sequences into one row (SFT).
    packing: bool = False
    # Where the built-in 'synthetic' dataset is written; empty: OUTPUT/data.
    cache_dir: str = ""
    # Pre-training data mixed into PPO (the ptx loss, weighted by ppo.ptx_coef); empty: none.
    ptx_path: str = ""

    @property
    def paths(self) -> tuple[str, ...]:
        """`path` as a tuple of paths."""
        return (self.path,) if isinstance(self.path, str) else self.path

    def __post_init__(self):
        _check(all(self.paths), "path", f"must name a dataset file or a built-in dataset, got {self.path!r}")
        _check_split(self.split)
        _check_positive(self, "max_len", "max_prompt_len")
        _check(self.max_prompt_len < self.max_len, "max_prompt_len",
               f"({self.max_prompt_len}) must be < data.max_len ({self.max_len}) to leave room for a response")
        _check(0 <= self.eval_fraction < 1, "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")


@_section
class MeshSection:
    """Training mesh axis sizes; -1 takes the devices the other axes leave."""

    # Data-parallel axis (ZeRO stages shard over it).
    data: int = -1
    # Fully-sharded axis for parameters (ZeRO-3 style).
    fsdp: int = 1
    # Tensor-parallel axis.
    tensor: int = 1

    def __post_init__(self):
        _check_mesh(self)


@_section
class GenMeshSection:
    """The Hybrid Engine's generation mesh; -1 takes the remaining devices."""

    # Generation data-parallel groups (each holds a full tensor-parallel copy of the actor).
    data: int = -1
    # Tensor-parallel axis for generation.
    tensor: int = 1

    def __post_init__(self):
        _check_mesh(self)


@_section
class OptimConfig:
    """AdamW and its schedule (config key `optim`; `jaxrl.optim.make_optimizer` builds it)."""

    # Peak learning rate, reached at the end of warmup.
    lr: float = 1e-4
    # Decoupled (AdamW) decay, applied to rank >= 2 weights only.
    weight_decay: float = 0.0
    # Adam first-moment decay.
    b1: float = 0.9
    # Adam second-moment decay.
    b2: float = 0.95
    # Adam denominator epsilon.
    eps: float = 1e-8
    # Decay after warmup: constant | linear | cosine.
    schedule: str = "cosine"
    # Optimizer steps of linear warmup from 0 to lr.
    warmup_steps: int = 0
    # The decay ends at min_lr_ratio * lr.
    min_lr_ratio: float = 0.0
    # Clip gradients to this global L2 norm; 0 turns clipping off.
    clip_norm: float = 1.0
    # Micro-batches per optimizer step (optax.MultiSteps).
    grad_accum: int = 1

    def __post_init__(self):
        check = functools.partial(_check, section="optim")  # built directly, its errors say 'optim.<field>'
        check(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(0 <= self.b1 < 1, "b1", f"must be in [0, 1), got {self.b1}")
        check(0 <= self.b2 < 1, "b2", f"must be in [0, 1), got {self.b2}")
        check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        check(self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        check(_is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps",
              f"must be an integer >= 0, got {self.warmup_steps!r}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.clip_norm >= 0, "clip_norm", f"must be >= 0 (0 = off), got {self.clip_norm}")
        check(_is_int(self.grad_accum) and self.grad_accum >= 1, "grad_accum",
              f"must be >= 1, got {self.grad_accum!r}")


@_section
class LossScaleConfig:
    """fp16 loss scaling with DeepSpeed's `fp16` fields (config key `precision.loss_scale`).

    The defaults are DeepSpeed's for an `fp16` section that leaves a field out, bare `{"enabled": true}`
    included: the fields of `DeepSpeedFP16Config` (deepspeed/runtime/precision_config.py, equal to the
    `FP16_*_DEFAULT` constants in deepspeed/runtime/constants.py), which DeepSpeed 0.17.1 on hands to the
    scaler in every case. (Up to 0.17.0 a section naming none of the dynamic-scaling fields left
    `DynamicLossScaler` its own constructor defaults instead: 2**32, hysteresis 1.)
    """

    # Scale the loss (turned on by fp16 compute).
    enabled: bool = False
    # Dynamic scaling starts at 2**initial_scale_power.
    initial_scale_power: int = 16
    # Finite steps between scale doublings (the first on the window + 1-th).
    loss_scale_window: int = 1000
    # Overflows tolerated before the scale halves.
    hysteresis: int = 2
    # The scale never halves below this.
    min_loss_scale: float = 1.0
    # > 0: a fixed scale (DeepSpeed loss_scale); 0: dynamic.
    static_scale: float = 0.0
    # Refill hysteresis on every finite step, not only on growth.
    consecutive_hysteresis: bool = False

    def __post_init__(self):
        check = functools.partial(_check, section="loss_scale")  # built directly: 'loss_scale.<field>'
        check(_is_int(self.initial_scale_power) and 0 <= self.initial_scale_power <= 126, "initial_scale_power",
              f"must be an integer in [0, 126], got {self.initial_scale_power!r}")
        check(_is_int(self.loss_scale_window) and self.loss_scale_window >= 1, "loss_scale_window",
              f"must be an integer >= 1, got {self.loss_scale_window!r}")
        check(_is_int(self.hysteresis) and self.hysteresis >= 1, "hysteresis",
              f"must be an integer >= 1, got {self.hysteresis!r}")
        check(self.min_loss_scale > 0, "min_loss_scale", f"must be > 0, got {self.min_loss_scale}")
        check(math.isfinite(self.static_scale) and self.static_scale >= 0, "static_scale",
              f"must be >= 0 (0 = dynamic), got {self.static_scale}")


@_section
class PrecisionSection:
    """Compute dtype; parameters stay fp32 (master copy)."""

    # Compute dtype; fp16 turns on dynamic loss scaling.
    compute: Dtype = "fp32"
    # Dynamic loss scaling (DeepSpeed semantics), used with fp16.
    loss_scale: LossScaleConfig = _sub(LossScaleConfig)


@_section
class TrainSection:
    """The shared training loop."""

    # Optimizer steps.
    steps: int = 100
    # Global batch size in sequences (all devices, all micro-batches of one step).
    batch_size: int = 16
    # Log metrics every this many steps.
    log_every: int = 10
    # Evaluate every this many steps; 0: only at the end.
    eval_every: int = 50
    # Save a checkpoint every this many steps; 0: only at the end.
    save_every: int = 0
    # Checkpoints kept on disk (the oldest are deleted).
    keep_checkpoints: int = 2
    # Batches per evaluation.
    eval_batches: int = 4
    # Write an HF directory every this many steps; 0: only at the end.
    export_every: int = 0

    def __post_init__(self):
        _check_positive(self, "steps", "batch_size", "log_every", "keep_checkpoints", "eval_batches")
        _check_positive(self, "eval_every", "save_every", "export_every", minimum=0)


ENGINES = ("static", "slots")  # generation.engine


@_section
class GenerationSection:
    """Sampling, for PPO rollouts and `jaxrl generate`."""

    # The Hybrid Engine's generation mesh.
    mesh: GenMeshSection = _sub(GenMeshSection)
    # Tokens generated per prompt at most.
    max_new_tokens: int = 16
    # Sampling temperature; 0: greedy.
    temperature: float = 1.0
    # Nucleus sampling: keep the smallest set of tokens with this much probability; 1: off.
    top_p: float = 1.0
    # Keep only the k most likely tokens; 0: off.
    top_k: int = 0
    # Dtype of the generation copy of the actor (fp32 keeps CPU runs reproducible).
    dtype: Dtype = "fp32"
    # Rollout sampler: 'static' (a batch decodes together until its longest row ends, over the whole
    # cache) or 'slots' (jaxrl/rollout_engine.py: finished rows are refilled from the queue, decode reads
    # only the filled cache, a group's samples share one prefill; its cost follows the tokens generated).
    # benchmarks/RESULTS.md: 5x the static sampler's useful tokens/s on long-tailed lengths, even (0.93x)
    # when every row runs to max_new_tokens, and on the embedded default's 6-token answers (nothing to
    # refill) its PPO generation time is the static sampler's within 5%. Multi-process runs too (every
    # process runs the same host loop). Samples do not depend on the slot or the device layout.
    engine: str = "slots"
    # Slot engine: rows decoding together; 0: the whole rollout batch. Fewer slots than rows lets finished
    # slots take the next prompts (a multiple of generation.mesh.data).
    slots: int = 0

    def __post_init__(self):
        _check_positive(self, "max_new_tokens")
        _check_positive(self, "top_k", "slots", minimum=0)
        _check(self.engine in ENGINES, "engine", f"must be one of {', '.join(ENGINES)}; got {self.engine!r}")
        _check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")


@_section
class SftSection:
    """Step 1: supervised fine-tuning."""

    # Also train on the prompt tokens (by default only the response tokens count in the loss).
    loss_on_prompt: bool = False


@_section
class RewardSection(RewardFunctionsConfig):
    """Rewards. Step 2 reads `margin` (the reward model's pairwise loss -log sigmoid(r_chosen - r_rejected -
    margin)); step 3 of the GRPO family (`algorithm` other than ppo) reads the rule rewards: `functions`,
    `weights`, `timeout_s`, `on_error`, `workers` (`jaxrl.rewards.config.RewardFunctionsConfig`, run by
    `jaxrl.rewards.RewardRunner`), plus a learned reward model at model.reward_path weighted by `model_weight`."""

    # Margin required between the chosen and the rejected reward; 0: the plain pairwise loss.
    margin: float = 0.0
    # GRPO family: weight of the learned reward model's score (model.reward_path) in the total reward;
    # used only when model.reward_path is set.
    model_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _check(self.margin >= 0, "margin", f"must be >= 0, got {self.margin}")
        _check(self.model_weight == self.model_weight and abs(self.model_weight) < float("inf"), "model_weight",
               f"must be a finite number, got {self.model_weight}")


@_section
class DpoSection:
    """`jaxrl dpo`: offline preference training against a frozen reference (jaxrl.algorithms.dpo)."""

    # Loss: sigmoid (DPO; conservative DPO with label_smoothing), ipo, hinge, or simpo (reference-free,
    # length-normalised, with the margin simpo_gamma).
    loss: Literal["sigmoid", "ipo", "hinge", "simpo"] = "sigmoid"
    # Inverse temperature beta of the implicit reward beta * log(pi / pi_ref) (IPO's tau).
    beta: float = 0.1
    # Conservative DPO: the probability that a preference label is flipped; 0: plain DPO (sigmoid only).
    label_smoothing: float = 0.0
    # SimPO's target reward margin gamma (simpo only).
    simpo_gamma: float = 0.5
    # Compute the reference log-probs once per epoch (in the compute dtype), so the reference model is
    # not resident during training.
    precompute_ref: bool = False

    def __post_init__(self):
        _check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        _check(0 <= self.label_smoothing < 0.5, "label_smoothing",
               f"must be in [0, 0.5) (0.5 would make the labels noise), got {self.label_smoothing}")
        _check(self.label_smoothing == 0 or self.loss == "sigmoid", "label_smoothing",
               f"is {self.label_smoothing} but only dpo.loss=sigmoid uses it (dpo.loss is {self.loss!r}); set it to 0")
        _check(self.simpo_gamma >= 0, "simpo_gamma", f"must be >= 0, got {self.simpo_gamma}")


def _check_stage(obj: Any) -> None:
    _check(obj.zero_stage in (None, 0, 1, 2, 3), "zero_stage",
           f"must be 0, 1, 2, 3 or null (the run's zero_stage), got {obj.zero_stage}")


@_section
class TrainedRoleSection:
    """A PPO model that trains (actor, critic) laid out on its own, as DeepSpeed-Chat's
    --actor_zero_stage / --critic_zero_stage allow: e.g. a large actor in ZeRO-3 beside a small critic
    in ZeRO-0. Both train in precision.compute (DeepSpeed-Chat's one --dtype)."""

    # ZeRO stage of this model (0-3); null: the run's zero_stage.
    zero_stage: int | None = None

    def __post_init__(self):
        _check_stage(self)


@_section
class FrozenRoleSection:
    """A PPO model that only runs forward (reference, reward), as DeepSpeed-Chat's eval configs: its own
    ZeRO stage (3 shards its parameters over the data axes; below 3 they are replicated, there being no
    gradients or optimizer state) and compute dtype."""

    # ZeRO stage of this model (0-3); null: the run's zero_stage.
    zero_stage: int | None = None
    # Compute dtype (its storage dtype too, with ppo.frozen_dtype 'compute'); null: precision.compute.
    precision: Dtype | None = None

    def __post_init__(self):
        _check_stage(self)


@_section
class PpoSection:
    """Step 3: PPO with a KL penalty to the reference (SFT) model."""

    # PPO epochs over each batch of experience.
    epochs: int = 1
    # Generation batches collected per PPO step.
    generation_batches: int = 1
    # Mini-batches per epoch; optim.grad_accum consecutive mini-batches make one optimizer step.
    mini_batches: int = 1
    # Prompts per generation batch (global).
    rollout_batch_size: int = 16
    # Weight of the per-token KL penalty in the reward; 0: no penalty, and the reference model is not loaded.
    kl_coef: float = 0.1
    # KL estimator: k1 = log(p/q); k3 = (q/p - 1) - log(q/p), non-negative, lower variance.
    kl_estimator: Literal["k1", "k3"] = "k1"
    # Adapt kl_coef toward kl_target (Ziegler et al. 2019).
    adaptive_kl: bool = False
    # Target KL for the adaptive controller.
    kl_target: float = 6.0
    # Horizon (in samples) of the adaptive controller.
    kl_horizon: int = 10000
    # Policy ratio clip epsilon.
    clip_ratio: float = 0.2
    # Value clip around the old values.
    value_clip: float = 0.2
    # Rewards are clipped to [-clip_reward, clip_reward].
    clip_reward: float = 5.0
    # Discount factor.
    gamma: float = 1.0
    # GAE lambda.
    lam: float = 0.95
    # Whiten advantages over the batch.
    whiten_advantages: bool = True
    # Standardise reward-model scores by their running mean and standard deviation before clipping.
    normalize_reward: bool = False
    # Entropy bonus weight.
    entropy_coef: float = 0.0
    # Weight of the pre-training (ptx) loss on data.ptx_path; 0: off.
    ptx_coef: float = 0.0
    # Decay of an exponential moving average of the actor's weights; 0: off.
    ema: float = 0.0
    # Critic learning rate (the actor's is optim.lr).
    critic_lr: float = 5e-5
    # Value loss weight.
    vf_coef: float = 1.0
    # Prompts generated for evaluation at each eval.
    eval_prompts: int = 64
    # Storage dtype of the frozen models (reference, reward): 'compute' stores their weights in
    # precision.compute (half the bytes in bf16; nothing updates them, so no fp32 master copy); 'fp32'
    # keeps them in fp32.
    frozen_dtype: Literal["compute", "fp32"] = "compute"
    # Each model's own layout and precision (DeepSpeed-Chat's per-model DeepSpeed configs).
    actor: TrainedRoleSection = _sub(TrainedRoleSection)
    critic: TrainedRoleSection = _sub(TrainedRoleSection)
    reference: FrozenRoleSection = _sub(FrozenRoleSection)
    reward: FrozenRoleSection = _sub(FrozenRoleSection)

    def __post_init__(self):
        _check_positive(self, "epochs", "generation_batches", "mini_batches", "rollout_batch_size",
                        "kl_horizon")
        _check_positive(self, "eval_prompts", minimum=0)
        _check(self.rollout_batch_size % self.mini_batches == 0, "rollout_batch_size",
               f"({self.rollout_batch_size}) must be divisible by ppo.mini_batches ({self.mini_batches})")
        for name in ("kl_coef", "entropy_coef", "ptx_coef", "vf_coef"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("kl_target", "clip_ratio", "value_clip", "clip_reward", "critic_lr"):
            _check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            _check(0 <= getattr(self, name) <= 1, name, f"must be in [0, 1], got {getattr(self, name)}")
        _check(0 <= self.ema < 1, "ema", f"must be in [0, 1), got {self.ema}")
        # The controller multiplies the coefficient: from 0 it never moves (and no reference is loaded).
        _check(not (self.adaptive_kl and self.kl_coef == 0), "adaptive_kl",
               "is on but ppo.kl_coef is 0, which the adaptive controller can never move (it scales the "
               "coefficient); start from a ppo.kl_coef > 0 or turn adaptive_kl off")


# Step 3's algorithm: PPO with a critic and a learned reward, one of the GRPO family (no critic, G samples
# per prompt, rewards from `reward.functions` and/or model.reward_path), or DPO (offline, on preference pairs).
Algorithm = Literal["ppo", "grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "dpo"]
GRPO_FAMILY = ("grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp")
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]

# The GRPO family's defaults: what a `grpo.*` key left unset (null) means under each algorithm.
#   grpo          DeepSeekMath: group std normalisation, symmetric clip, per-sequence mean, k3 KL in the loss.
#   dr_grpo       Dr. GRPO: no std division, a constant length normaliser, no KL.
#   dapo          DAPO: clip-higher (0.2 / 0.28), token mean, dynamic sampling, overlong shaping, no KL.
#   gspo          GSPO: sequence-level ratio with the paper's small clip range (3e-4 / 4e-4), no KL.
#   rloo          RLOO: leave-one-out baseline, token mean, k1 KL in the reward.
#   reinforce_pp  REINFORCE++: k1 KL in the per-token reward, returns whitened over the batch, token mean.
# overlong_buffer: DAPO's L_cache, here a fifth of generation.max_new_tokens (-1 below: resolved then).
GRPO_DEFAULTS = {
    "grpo": dict(clip_low=0.2, clip_high=0.2, loss_agg="seq_mean_token_mean", kl_coef=0.04, kl_in="loss",
                 kl_estimator="k3", dynamic_sampling=False, overlong_buffer=0),
    "dr_grpo": dict(clip_low=0.2, clip_high=0.2, loss_agg="seq_mean_token_sum_norm", kl_coef=0.0, kl_in="loss",
                    kl_estimator="k3", dynamic_sampling=False, overlong_buffer=0),
    "dapo": dict(clip_low=0.2, clip_high=0.28, loss_agg="token_mean", kl_coef=0.0, kl_in="loss",
                 kl_estimator="k3", dynamic_sampling=True, overlong_buffer=-1),
    "gspo": dict(clip_low=3e-4, clip_high=4e-4, loss_agg="seq_mean_token_mean", kl_coef=0.0, kl_in="loss",
                 kl_estimator="k3", dynamic_sampling=False, overlong_buffer=0),
    "rloo": dict(clip_low=0.2, clip_high=0.2, loss_agg="token_mean", kl_coef=0.01, kl_in="reward",
                 kl_estimator="k1", dynamic_sampling=False, overlong_buffer=0),
    "reinforce_pp": dict(clip_low=0.2, clip_high=0.2, loss_agg="token_mean", kl_coef=0.01, kl_in="reward",
                         kl_estimator="k1", dynamic_sampling=False, overlong_buffer=0),
}


@_section
class GrpoSection:
    """Step 3 for the GRPO family (`algorithm` other than ppo). A key left null takes the algorithm's
    default (`GRPO_DEFAULTS`; `resolve`). The rollout and update shape is PPO's: ppo.rollout_batch_size
    rows per generation batch (= prompts x group_size), ppo.generation_batches, ppo.epochs,
    ppo.mini_batches, ppo.eval_prompts."""

    # Samples per prompt, G >= 2; a group's G rows are consecutive and share the prompt's baseline.
    group_size: int = 4
    # The importance ratio is clipped to [1 - clip_low, 1 + clip_high] (GSPO: the sequence ratio).
    clip_low: float | None = None
    clip_high: float | None = None
    # Dual clip c > 1: for negative advantages the per-token loss is at most -A * c; 0: off (not with gspo).
    clip_ratio_c: float = 0.0
    # How per-token losses become one number: token_mean (over the step's global response tokens),
    # seq_mean_token_mean (each sequence alike), seq_mean_token_sum_norm (sums over a constant length).
    loss_agg: Aggregation | None = None
    # KL(pi || pi_ref) weight; 0: no KL and no reference model loaded.
    kl_coef: float | None = None
    # Where the KL goes: 'loss' (GRPO: + kl_coef * KL estimate) or 'reward' (subtracted from each token's
    # reward before the advantages, as PPO does; the GRPO estimators then see score - kl_coef * sum_t kl_t).
    kl_in: Literal["loss", "reward"] | None = None
    # KL estimator: k1 = log(p/q), k2 = (log(p/q))^2 / 2, k3 = q/p - 1 - log(q/p); k2 only in the loss.
    kl_estimator: Literal["k1", "k2", "k3"] | None = None
    # DAPO dynamic sampling: drop groups whose rewards are all equal and sample more prompts until the batch
    # is full, at most max_extra_rounds more generation rounds (then all-equal groups fill the rest).
    dynamic_sampling: bool | None = None
    max_extra_rounds: int = 2
    # DAPO overlong shaping: a penalty rising from 0 to -overlong_factor over the last overlong_buffer
    # tokens of generation.max_new_tokens; 0: off.
    overlong_buffer: int | None = None
    overlong_factor: float = 1.0
    # Leave responses cut at generation.max_new_tokens (no EOS) out of the loss (DAPO's overlong filtering).
    filter_truncated: bool = False
    # Truncated importance sampling of the sampler / trainer mismatch: each token's loss times
    # min(pi_trainer / pi_sampler, tis_cap); 0: off.
    tis_cap: float = 0.0
    # Use the sampler's log-probs as the old log-probs (one actor forward less per step); only when the
    # generation and compute dtypes are equal (generation.dtype == precision.compute).
    reuse_sampler_logprobs: bool = False
    # Added to the group std (grpo, dapo, gspo) before dividing.
    eps: float = 1e-6

    def __post_init__(self):
        _check_positive(self, "group_size", minimum=2)
        _check_positive(self, "max_extra_rounds", minimum=0)
        for name in ("clip_low", "clip_high", "kl_coef", "overlong_buffer"):
            value = getattr(self, name)
            _check(value is None or value >= 0, name, f"must be >= 0, got {value}")
        _check(self.clip_low is None or self.clip_low < 1, "clip_low", f"must be < 1, got {self.clip_low}")
        _check(self.clip_ratio_c == 0 or self.clip_ratio_c > 1, "clip_ratio_c",
               f"must be 0 (off) or > 1, got {self.clip_ratio_c}")
        _check(self.tis_cap == 0 or self.tis_cap >= 1, "tis_cap", f"must be 0 (off) or >= 1, got {self.tis_cap}")
        _check(self.overlong_factor >= 0, "overlong_factor", f"must be >= 0, got {self.overlong_factor}")
        _check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _check(not (self.kl_estimator == "k2" and self.kl_in == "reward"), "kl_estimator",
               "is k2, which is a loss term only; use k1 or k3 with grpo.kl_in=reward")

    def resolve(self, algorithm: str, max_new_tokens: int) -> "GrpoSection":
        """This section with every null key set to `algorithm`'s default (`GRPO_DEFAULTS`)."""
        defaults = dict(GRPO_DEFAULTS[algorithm])
        if defaults["overlong_buffer"] < 0:
            defaults["overlong_buffer"] = max(1, max_new_tokens // 5)
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


@_section
class DistributedSection:
    """Multi-process start-up (`jax.distributed.initialize`); the defaults auto-detect or run alone."""

    # Coordinator address host:port; empty: auto-detect (TPU, SLURM) or a single process.
    coordinator: str = ""
    # Number of processes; 0: auto-detect.
    num_processes: int = 0
    # This process's index; -1: auto-detect.
    process_id: int = -1

    def __post_init__(self):
        _check_positive(self, "num_processes", minimum=0)
        _check_positive(self, "process_id", minimum=-1)
        _check(self.num_processes == 0 or self.process_id < self.num_processes, "process_id",
               f"({self.process_id}) must be < distributed.num_processes ({self.num_processes})")


@_section
class PipelineSection:
    """`jaxrl pipeline`: each step runs with the shared config plus its own key=value overrides."""

    # Overrides for step 1 (SFT) only, e.g. ["train.steps=200", "optim.lr=1e-3"].
    sft: tuple[str, ...] = ()
    # Overrides for step 2 (reward model); model.path here picks its base (default: the SFT model).
    reward: tuple[str, ...] = ()
    # Overrides for step 3 (PPO).
    ppo: tuple[str, ...] = ()
    # Overrides for step 3 when algorithm=dpo (DPO on the preference pairs, in place of steps 2 and 3).
    dpo: tuple[str, ...] = ()
    # Overrides for step 3 when `algorithm` is one of the GRPO family (grpo, dr_grpo, dapo, gspo, rloo,
    # reinforce_pp), instead of `ppo`.
    grpo: tuple[str, ...] = ()
    # Held-out prompts sampled for the task-accuracy and reward-score figures of summary.json (synthetic task).
    eval_prompts: int = 256

    def __post_init__(self):
        _check_positive(self, "eval_prompts")


@_section
class RunConfig:
    """Everything one run reads; each command uses the sections it needs."""

    model: ModelSection = _sub(ModelSection)
    data: DataSection = _sub(DataSection)
    # Training mesh.
    mesh: MeshSection = _sub(MeshSection)
    # ZeRO stage: 1 shards optimizer state over mesh.data, 2 also gradients, 3 also parameters.
    zero_stage: int = 0
    precision: PrecisionSection = _sub(PrecisionSection)
    # Optimizer (AdamW, schedule, clipping, accumulation); for PPO, the actor's.
    optim: OptimConfig = _sub(OptimConfig)
    train: TrainSection = _sub(TrainSection)
    generation: GenerationSection = _sub(GenerationSection)
    sft: SftSection = _sub(SftSection)
    reward: RewardSection = _sub(RewardSection)
    ppo: PpoSection = _sub(PpoSection)
    # Step 3's algorithm (`jaxrl rl` runs it; `jaxrl ppo`, `jaxrl grpo` and `jaxrl dpo` are shorthands); in
    # `jaxrl pipeline`, dpo replaces steps 2 and 3 and the GRPO family replaces step 2's reward model.
    algorithm: Algorithm = "ppo"
    grpo: GrpoSection = _sub(GrpoSection)
    dpo: DpoSection = _sub(DpoSection)
    distributed: DistributedSection = _sub(DistributedSection)
    pipeline: PipelineSection = _sub(PipelineSection)
    # The run's seed (parameters, data order, sampling).
    seed: int = 0
    # Output directory (also `--output`).
    output: str = "outputs/run"

    def __post_init__(self):
        _check(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _check(bool(self.output), "output", "must name a directory")
        accum = self.optim.grad_accum
        _check(self.train.batch_size % accum == 0, "train.batch_size",
               f"({self.train.batch_size}) must be divisible by optim.grad_accum ({accum})")
        _check(self.ppo.ptx_coef == 0 or bool(self.data.ptx_path), "ppo.ptx_coef",
               f"is {self.ppo.ptx_coef} but data.ptx_path is empty: name the pre-training data or set it to 0")
        if self.algorithm in GRPO_FAMILY:
            self._check_grpo()

    def _check_grpo(self) -> None:
        g, rows = self.grpo, self.ppo.rollout_batch_size
        _check(self.ppo.ptx_coef == 0, "ppo.ptx_coef",
               f"is {self.ppo.ptx_coef} but algorithm={self.algorithm} has no ptx loss; set it to 0")
        _check(rows % g.group_size == 0, "ppo.rollout_batch_size",
               f"({rows}) must be a whole number of groups of grpo.group_size={g.group_size} (it counts "
               f"sequences: prompts x group_size); make it a multiple of {g.group_size}")
        _check(not (g.reuse_sampler_logprobs and self.generation.dtype != self.precision.compute),
               "grpo.reuse_sampler_logprobs", f"needs generation.dtype ({self.generation.dtype}) equal to "
               f"precision.compute ({self.precision.compute}): the sampler's log-probs are then the trainer's")
        r = g.resolve(self.algorithm, self.generation.max_new_tokens)
        _check(not (self.algorithm == "gspo" and g.clip_ratio_c), "grpo.clip_ratio_c",
               "is set but gspo clips the sequence ratio, without a dual clip; set it to 0")
        _check(r.overlong_buffer <= self.generation.max_new_tokens, "grpo.overlong_buffer",
               f"({r.overlong_buffer}) must be <= generation.max_new_tokens ({self.generation.max_new_tokens})")
        _check(r.kl_in == "loss" or r.kl_estimator != "k2", "grpo.kl_estimator",
               "is k2, which is a loss term only; use k1 or k3 when the KL is in the reward")
        _check(bool(self.reward.functions) or bool(self.model.reward_path), "reward.functions",
               f"is empty and model.reward_path is not set: algorithm={self.algorithm} needs a reward, e.g. "
               "reward.functions=[math_answer] (or synthetic_task on the synthetic data)")
