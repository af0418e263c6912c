"""16-bit stacked layers carried into the scan as uint16 bits (`pack_layers`, `_as_bits`): the same numbers,
no fp32 copy of the model in the compiled program, and no silent zero gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl.errors import JaxrlError
from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import Transformer, pack_layers, store_params
from jaxrl.steps.plan import compile_for_memory

# Layers much larger than the activations of a (1, 8) batch, so a copy of the stack shows in the temporaries.
WIDE = ModelConfig(family="llama", vocab_size=64, hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=2,
                   head_dim=64, intermediate_size=1024, max_position_embeddings=64)


def _bf16_model():
    return store_params(Transformer(WIDE, rngs=nnx.Rngs(0), dtype=jnp.bfloat16), jnp.bfloat16)


def _stack_bytes(model, itemsize):
    return sum(x.size * itemsize for x in jax.tree.leaves(nnx.state(model.layers)))


def _logits(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 8)), jnp.int32)


def test_packed_layers_give_the_same_logits_bit_for_bit():
    plain = nnx.split(_bf16_model())
    packed = nnx.split(pack_layers(_bf16_model()))
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(nnx.merge(*packed).layers))}
    assert dtypes == {jnp.dtype(jnp.uint16)}
    a = jax.jit(_logits, static_argnums=0)(*plain, IDS)
    b = jax.jit(_logits, static_argnums=0)(*packed, IDS)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and both equal the model computed from the same bf16 weights held in fp32 storage only to the
    # rounding of bf16 compute (a check that the bits were read back as the right dtype, not as ints)
    wide = Transformer(WIDE, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    ref = jax.jit(_logits, static_argnums=0)(*nnx.split(wide), IDS)
    assert float(jnp.max(jnp.abs(a - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


def test_a_bf16_forward_holds_no_fp32_copy_of_the_stack():
    """XLA:CPU converts a bf16 array a loop carries to fp32 before the loop; carried as bits, the program's
    temporaries stay below the layers' own bf16 bytes (before: above their fp32 bytes)."""
    model = pack_layers(_bf16_model())
    graphdef, state = nnx.split(model)
    compiled = compile_for_memory(jax.jit(_logits, static_argnums=0).lower(graphdef, state, IDS))
    temps = compiled.memory_analysis().temp_size_in_bytes
    assert temps < _stack_bytes(model, 2) / 2, (temps, _stack_bytes(model, 2))


def test_differentiating_a_bf16_stacked_parameter_is_refused():
    graphdef, params, rest = nnx.split(_bf16_model(), nnx.Param, ...)

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(IDS).astype(jnp.float32))

    with pytest.raises(JaxrlError, match="differentiated; trained parameters must be fp32"):
        jax.grad(loss)(params)
