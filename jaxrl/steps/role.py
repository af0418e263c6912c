"""A `Role`: one model of a step, declared once, built concretely for a run or abstractly for a plan.

A step module (`sft`, `reward`, `ppo`) lists its roles: what to build (`ModelSpec`), whether it trains
(a loss) or only runs (a forward), the shapes of one call's batch, its learning rate. `trainer(role)`
and `frozen(role)` build them: for a run with their weights, for `jaxrl plan` with `abstract=True` from
`nnx.eval_shape` (nothing read or allocated), laid out identically, so the plan lowers what the run runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl.config import RunConfig
from jaxrl.models import config as model_config
from jaxrl.models.hf import load_pretrained
from jaxrl.models.lora import add_lora
from jaxrl.models.transformer import ScoreModel, Transformer, pack_layers, shard_activations, store_params
from jaxrl.optim import make_optimizer
from jaxrl.parallel.sharding import DATA_AXES, Layout, spec_tree, zero_layout
from jaxrl.precision import dtype_of
from jaxrl.train.step import LossFn, Trainer

# name -> (global shape, dtype) of one call's batch entry, or a nested BatchShapes: the fields of a sub-struct
BatchShapes = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one model role (actor, critic, reference, reward)."""

    path: str  # HF directory or preset name
    kind: str = "causal_lm"  # or 'score'
    dtype: str = "fp32"  # compute dtype
    param_dtype: str = "fp32"  # storage dtype: fp32 for a model that trains (master copy)
    zero_stage: int = 0  # its layout (`zero_layout`): each role has its own, as in DeepSpeed-Chat
    remat: str = "none"
    logits_chunk: int = 0  # causal LM: positions per LM-head chunk in the losses
    vocab_chunk: int = 0  # causal LM: vocabulary entries per LM-head chunk in the losses
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "v")
    seed: int = 0


def spec_from(cfg: RunConfig, path: str | None = None, kind: str = "causal_lm", *, zero_stage: int | None = None,
              dtype: str | None = None) -> ModelSpec:
    """The run's model settings (precision, ZeRO stage, remat, LoRA, seed) for the model at `path` (default
    model.path); `zero_stage` and `dtype` replace the run's (`zero_stage`, `precision.compute`) unless None."""
    lora = cfg.model.lora
    m = cfg.model
    return ModelSpec(path=path or m.path, kind=kind, dtype=dtype or cfg.precision.compute,
                     zero_stage=cfg.zero_stage if zero_stage is None else zero_stage, remat=m.remat,
                     logits_chunk=m.logits_chunk, vocab_chunk=m.vocab_chunk, lora_rank=lora.rank,
                     lora_alpha=lora.alpha, lora_targets=tuple(lora.targets), seed=cfg.seed)


def frozen_spec(cfg: RunConfig, path: str | None = None, kind: str = "causal_lm", *, zero_stage: int | None = None,
                dtype: str | None = None) -> ModelSpec:
    """A model that only runs forward (PPO's reference and reward model): no LoRA, no remat, and its
    weights stored in its compute dtype (no fp32 master copy: nothing updates them) unless
    `ppo.frozen_dtype` is fp32."""
    spec = spec_from(cfg, path, kind, zero_stage=zero_stage, dtype=dtype)
    stored = spec.dtype if cfg.ppo.frozen_dtype == "compute" else "fp32"
    return dataclasses.replace(spec, lora_rank=0, remat="none", param_dtype=stored)


def lora_only(cfg: RunConfig) -> bool:
    """Whether the run's LoRA roles train only their LoRA branches (the base weights frozen)."""
    return cfg.model.lora.rank > 0 and cfg.model.lora.train_only_lora


@dataclasses.dataclass(frozen=True)
class Role:
    """One model of a step and how the step calls it.

    A trained role has a `loss` and becomes a `Trainer`; a frozen one has a `forward` and becomes
    (graphdef, state). `batch` is one call's global batch: a micro-batch for a trained role, a rollout
    batch for a frozen one; `make_batch` turns its entries into what the loss or forward reads.
    """

    name: str  # 'actor', 'critic', 'reference', 'reward'
    spec: ModelSpec
    arch: model_config.ModelConfig
    batch: BatchShapes
    loss: LossFn | None = None  # trained: (model, batch) -> (loss, metrics)
    forward: Callable[[nnx.Module, dict], Any] | None = None  # frozen: (model, batch) -> outputs
    lr: float | None = None  # None: optim.lr
    total_steps: int | None = None  # optimizer steps the schedule spans; None: train.steps
    lora_only: bool = False  # train only the LoRA branches (model.lora.train_only_lora)
    # Frozen: runs on this trained role's weights instead of a model of its own (DPO's reference under
    # LoRA: the policy with its adapters off); `spec` is then that role's, and nothing more is resident.
    shares: str | None = None
    # The declared entries (a dict, nested dicts for sub-structs) -> the batch the loss or forward takes:
    # the dict itself, or a typed struct (PPO's `Rollout.of`).
    make_batch: Callable[[dict], Any] = dict

    @property
    def trainable(self) -> bool:
        return self.loss is not None

    @property
    def dtype(self):
        return dtype_of(self.spec.dtype)

    def __post_init__(self):
        if (self.loss is None) == (self.forward is None):
            raise ValueError(f"role {self.name!r} needs exactly one of a loss (trained) or a forward (frozen)")
        if self.shares is not None and self.forward is None:
            raise ValueError(f"role {self.name!r} shares {self.shares!r}'s weights, so it must be frozen (a forward)")


# ------------------------------------------------------------------------------------------------ model
def born(spec: ModelSpec, arch: model_config.ModelConfig, mesh, *, abstract: bool = False):
    """The model on `mesh` with its parameters born in its ZeRO stage's layout; returns (model, layout).

    `spec.zero_stage` is read once, into the `Layout`; the model is built with `layout.shardings`. `abstract`:
    an `nnx.eval_shape`'d model (shapes, dtypes and shardings only; no weights read or allocated).
    """
    dtype, param_dtype = dtype_of(spec.dtype), dtype_of(spec.param_dtype)

    def fresh(sh):
        return _lora(new_model(spec, arch, sh), spec)

    layout = zero_layout(fresh, mesh, spec.zero_stage)
    with jax.set_mesh(mesh):
        if abstract:
            model = store_params(nnx.eval_shape(lambda: fresh(layout.shardings)), param_dtype)
        elif spec.path in model_config.PRESETS:
            model = store_params(fresh(layout.shardings), param_dtype)
        else:
            model = _lora(load_pretrained(spec.path, dtype=dtype, kind=spec.kind, shardings=layout.shardings,
                                          remat=spec.remat, seed=spec.seed, param_dtype=param_dtype,
                                          logits_chunk=spec.logits_chunk, vocab_chunk=spec.vocab_chunk), spec)
    return model, layout


def new_model(spec: ModelSpec, arch: model_config.ModelConfig, shardings):
    """A freshly initialised `Transformer` or `ScoreModel` as `spec` says (parameters in fp32, no LoRA)."""
    kw = dict(rngs=nnx.Rngs(spec.seed), dtype=dtype_of(spec.dtype), shardings=shardings, remat=spec.remat)
    if spec.kind == "score":
        return ScoreModel(arch, **kw)
    return Transformer(arch, logits_chunk=spec.logits_chunk, vocab_chunk=spec.vocab_chunk, **kw)


def _lora(model, spec: ModelSpec):
    if spec.lora_rank <= 0:
        return model
    return add_lora(model, rank=spec.lora_rank, alpha=spec.lora_alpha, targets=spec.lora_targets, seed=spec.seed)


def make_trainer(cfg: RunConfig, mesh, model, layout: Layout, loss_fn, *, lr: float | None = None,
                 total_steps: int | None = None, lora_only: bool = False) -> Trainer:
    """A Trainer with the run's optimizer (fp16 turns on loss scaling); `lora_only` trains only LoRA."""
    optim = cfg.optim if lr is None else dataclasses.replace(cfg.optim, lr=lr)
    loss_scale = None
    if cfg.precision.compute == "fp16":
        loss_scale = dataclasses.replace(cfg.precision.loss_scale, enabled=True)
    optimizer = make_optimizer(optim, total_steps or cfg.train.steps, loss_scale=loss_scale)
    return Trainer(model, optimizer, loss_fn, mesh=mesh, layout=layout, wrt=nnx.LoRAParam if lora_only else nnx.Param)


def trainer(role: Role, cfg: RunConfig, mesh, *, abstract: bool = False) -> Trainer:
    """A trained role's Trainer (its model born in its own layout); with `abstract`, for lowering only."""
    model, layout = born(role.spec, role.arch, mesh, abstract=abstract)
    return make_trainer(cfg, mesh, model, layout, role.loss, lr=role.lr, total_steps=role.total_steps,
                        lora_only=role.lora_only)


def frozen(role: Role, cfg: RunConfig, mesh, *, abstract: bool = False) -> tuple[Any, dict]:
    """A frozen role as (graphdef, state): its pure-dict state on `mesh` (with `abstract`: as
    `jax.ShapeDtypeStruct`s carrying their shardings)."""
    model, _ = born(role.spec, role.arch, mesh, abstract=abstract)
    graphdef, state = nnx.split(pack_layers(model))
    if not abstract:
        return graphdef, state
    specs = spec_tree(state)
    return graphdef, jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
        nnx.to_pure_dict(state), specs, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def jit_forward(role: Role, graphdef):
    """The frozen role's `forward` as one jitted function of (state, batch), activations over the data axes.
    `state` is the role's own state, or, for a role that `shares` a trained role's weights, the tuple
    (params, frozen) of that role's TrainState, merged with its Trainer's `graphdef`."""
    def forward(state, batch):
        states = state if isinstance(state, tuple) else (state,)
        return role.forward(shard_activations(nnx.merge(graphdef, *states), P(DATA_AXES)), batch)

    return jax.jit(forward)


def abstract_batch(shapes: BatchShapes, sharding) -> dict:
    """`jax.ShapeDtypeStruct`s of one call's batch entries (nested as declared), laid out by `sharding`."""
    return {k: abstract_batch(v, sharding) if isinstance(v, dict) else jax.ShapeDtypeStruct(*v, sharding=sharding)
            for k, v in shapes.items()}


def feed(role: Role, batch) -> Any:
    """The entries of `batch` (a dict, or a struct such as PPO's `Rollout`) that `role.batch` declares,
    checked against its shapes and dtypes, as the role's batch (`role.make_batch`): what the plan lowers is
    then what the run feeds. A mismatch is a wiring bug in the step module, not a user error."""
    have, declared = _entries(batch), _entries(role.batch)
    missing = sorted(set(declared) - set(have))
    got = {k: (tuple(have[k].shape), jnp.dtype(have[k].dtype)) for k in declared if k in have}
    want = {k: (tuple(shape), jnp.dtype(dtype)) for k, (shape, dtype) in declared.items()}
    if missing or got != want:
        raise RuntimeError(f"the {role.name} role was fed {got} (missing {missing}) but declares {want}: "
                           "the step's roles() and its run disagree")
    nested: dict = {}
    for name in declared:  # 'ptx.input_ids' -> nested['ptx']['input_ids']
        *outer, last = name.split(".")
        node = nested
        for key in outer:
            node = node.setdefault(key, {})
        node[last] = have[name]
    return role.make_batch(nested)


def _entries(tree, prefix: str = "") -> dict:
    """A batch or a declaration as {name: leaf}, a sub-struct's names dotted ('ptx.input_ids'): dicts and
    dataclasses open up (fields that are None skipped), anything else is a leaf."""
    if dataclasses.is_dataclass(tree):
        tree = {f.name: getattr(tree, f.name) for f in dataclasses.fields(tree)}
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or dataclasses.is_dataclass(v):
            out.update(_entries(v, f"{prefix}{k}."))
        elif v is not None:
            out[f"{prefix}{k}"] = v
    return out
