"""LoRA on the transformer's projections (`flax.nnx.LoRA`), and merging it back for export.

A LoRA branch adds (alpha / r) * x @ A @ B to a projection x @ W, with A [in, r], B [r, out]; B starts
at zero so the model is unchanged at first. Train only the branches with `wrt=nnx.LoRAParam`.
On the stacked blocks (kernel [L, in, out]) the branch is stacked too: A [L, in, r], B [L, r, out],
each layer initialised independently, the layer axis unsharded like the kernel's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxrl.errors import JaxrlError
from jaxrl.models.transformer import Dense
from jaxrl.parallel.sharding import current_mesh, fit_spec

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def add_lora(model: nnx.Module, *, rank: int, alpha: float, targets=("q", "v"), seed: int = 0) -> nnx.Module:
    """Gives every `Dense` named in `targets` a LoRA branch; sharded like its kernel under a mesh."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise JaxrlError(f"model.lora.targets has unknown module(s) {sorted(unknown)}; choose from {TARGETS}")
    if rank <= 0:
        raise JaxrlError(f"model.lora.rank must be > 0 to add LoRA, got {rank}")
    rngs = nnx.Rngs(seed)
    mesh = current_mesh()
    for path, module in nnx.iter_graph(model):
        if not (isinstance(module, Dense) and path and path[-1] in targets):
            continue
        *lead, din, dout = module.kernel.shape  # lead: (L,) on the stacked blocks, () elsewhere
        meta_a, meta_b = {}, {}
        if mesh is not None:
            spec = tuple(module.kernel.get_metadata().get("out_sharding") or ())
            spec = spec + (None,) * (len(lead) + 2 - len(spec))
            lead_spec, (d_in, d_out) = spec[:len(lead)], spec[len(lead):]
            meta_a = {"out_sharding": fit_spec(P(*lead_spec, d_in, None), (*lead, din, rank), mesh)}
            meta_b = {"out_sharding": fit_spec(P(*lead_spec, None, d_out), (*lead, rank, dout), mesh)}
        module.lora = nnx.LoRA(din, rank, dout, dtype=module.dtype, rngs=rngs, a_metadata=meta_a, b_metadata=meta_b,
                               a_initializer=_stacked(nnx.nn.lora.default_a_initializer, lead),
                               b_initializer=_stacked(nnx.nn.lora.default_b_initializer, lead))
        module.lora_scale = alpha / rank
    return model


def _stacked(init, lead: list[int]):
    """`init` for one layer's matrix, made to return `lead` independently drawn ones stacked in front."""
    if not lead:
        return init
    return lambda key, shape, dtype: jax.vmap(lambda k: init(k, shape, dtype))(
        jax.random.split(key, lead[0]))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every LoRA branch into its kernel (W += (alpha/r) A B) and removes it, in place."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Dense) and module.lora is not None:
            a, b = module.lora.lora_a[...], module.lora.lora_b[...]
            delta = module.lora_scale * jnp.einsum("...ir,...ro->...io", a, b)
            module.kernel[...] = module.kernel[...] + delta.astype(module.kernel.dtype)
            module.lora = nnx.data(None)
            module.lora_scale = 0.0
    return model


def has_lora(model: nnx.Module) -> bool:
    return any(isinstance(m, Dense) and m.lora is not None for _, m in nnx.iter_graph(model))


def without_lora(model: nnx.Module) -> nnx.Module:
    """The base model: every LoRA branch of `model` skipped, in place; returns `model`.

    For a model merged from its state inside a jitted function (DPO's reference under LoRA: the policy
    without its adapters, no second copy of the weights): only the module objects lose their branches,
    the state they were merged from keeps its LoRA parameters.
    """
    for dense in [m for _, m in nnx.iter_graph(model) if isinstance(m, Dense) and m.lora is not None]:
        dense.lora = nnx.data(None)
        dense.lora_scale = 0.0
    return model
