"""The Hybrid Engine: the actor trains on the training mesh and generates on the generation mesh.

DeepSpeed-Chat gathers ZeRO-3 shards, swaps in inference kernels with tensor parallelism, generates,
and goes back. Here that is one jitted function: from the training layout (any ZeRO stage, fp32 master,
possibly with LoRA branches) to the generation layout on the same devices, arranged as
`generation.mesh.data` x `generation.mesh.tensor` (heads and MLP width over 'tensor', replicated over
'data'), cast to the inference dtype, with LoRA folded into the kernels. XLA moves the bytes device to
device (all-gather / all-to-all), never through the host. The copy is dropped after the rollout, so its
memory is free again for training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl.models.lora import merge_lora, without_lora
from jaxrl.models.transformer import Transformer, pack_layers, store_params, to_bits
from jaxrl.parallel.mesh import make_mesh, settle
from jaxrl.parallel.sharding import DATA_AXES, model_shardings, spec_tree, subtree


def generation_mesh(data: int, tensor: int, devices=None):
    """The generation mesh over the same devices: ('data', 'fsdp'=1, 'tensor')."""
    return make_mesh(data, 1, tensor, devices=devices, what="generation.mesh")


class HybridEngine:
    """Reshards a trainer's actor into a generation copy.

    Args:
      graphdef: the actor's NNX graph (as split by the Trainer: trainable params, then the rest).
      build: `build(shardings) -> model` for the architecture in the inference dtype, without LoRA (used
        abstractly: it fixes the generation copy's layout and compute dtype).
      gen_mesh: the generation mesh; dtype: the inference dtype.
    """

    def __init__(self, graphdef, build, gen_mesh, dtype=jnp.bfloat16):
        self.mesh = gen_mesh
        self.dtype = dtype
        self.graphdef = graphdef
        tensor = gen_mesh.shape["tensor"] > 1
        with jax.set_mesh(gen_mesh):
            abstract = nnx.eval_shape(lambda: build(model_shardings(shard_params=False, tensor=tensor)))
        abstract = pack_layers(store_params(abstract, dtype))  # the copy's weights: inference dtype, layers as bits
        self.gen_graphdef, abstract_state = nnx.split(abstract)
        self._abstract = nnx.to_pure_dict(abstract_state)
        self.specs = spec_tree(abstract_state)
        self.shardings = jax.tree.map(lambda s: NamedSharding(gen_mesh, s), self.specs,
                                      is_leaf=lambda x: isinstance(x, P))
        self._reshard = jax.jit(self._to_generation, out_shardings=self.shardings)
        self.batch_sharding = NamedSharding(gen_mesh, P(DATA_AXES))

    def _to_generation(self, params, frozen):
        model = nnx.merge(self.graphdef, params, frozen)
        stacks = {}
        for path, module in [(tuple(p), m) for p, m in nnx.iter_graph(model) if isinstance(m, Transformer)]:
            stacks[path] = self._layers_to_generation(module.layers, path)
            without_lora(module.layers)  # its layers are done; what is left of the model is small
        state = jax.tree.map(self._cast, nnx.to_pure_dict(nnx.state(merge_lora(model))), self._abstract)
        for path, stack in stacks.items():
            subtree(state, path)["layers"] = stack
        return state

    def _layers_to_generation(self, layers: nnx.Module, path: tuple):
        """One Transformer's stacked layers in the copy's layout, one layer at a time (a scan whose output
        stack is written layer by layer): LoRA folded in, cast, and moved onto the generation mesh, so the
        step holds the copy plus one layer in flight, never a second whole stack in the training layout's
        shape or dtype."""
        graphdef, stacked = nnx.split(layers)
        like = subtree(self._abstract, path)["layers"]
        shardings = jax.tree.map(lambda s: NamedSharding(self.mesh, P(*s.spec[1:])),
                                 subtree(self.shardings, path)["layers"])

        def one(_, layer):
            block = merge_lora(nnx.merge(graphdef, layer))
            out = jax.tree.map(self._cast, nnx.to_pure_dict(nnx.state(block)), like)
            return None, jax.lax.with_sharding_constraint(out, shardings)

        return jax.lax.scan(one, None, nnx.to_pure_dict(stacked))[1]

    def _cast(self, x, like):
        """A training-layout leaf as the copy holds it (`like`): the inference dtype, or its bits."""
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        x = x.astype(self.dtype)
        return to_bits(x) if like.dtype == jnp.uint16 else x

    def generation_copy(self, params: dict, frozen: dict) -> nnx.Module:
        """The actor on the generation mesh in the inference dtype (one jitted resharding step).

        Drop it (let it go out of scope) after the rollout.
        """
        state = settle(self._reshard(params, frozen))
        return nnx.merge(self.gen_graphdef, state)

    def lower(self, params: dict, frozen: dict):
        """The resharding step lowered for (possibly abstract) training-layout `params` and `frozen`, under
        the generation mesh as `generation_copy` runs it (for `jaxrl plan`)."""
        return self._reshard.lower(params, frozen)

    def abstract_copy(self):
        """(graphdef, state) of the generation copy, its state as `jax.ShapeDtypeStruct`s in the inference
        dtype with their shardings: what `generation_copy` makes, for ahead-of-time lowering (`jaxrl plan`)."""
        def leaf(x, sharding):
            dtype = self.dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype  # uint16: bits
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=sharding)

        return self.gen_graphdef, jax.tree.map(leaf, self._abstract, self.shardings)
