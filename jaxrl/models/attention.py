"""Attention cores: q (B, T, N, H), key/value (B, S, K, H), mask (B, 1, T, S) bool -> (B, T, N, H).

Query head n = k * G + g reads key/value head k (G = N / K), as HF's repeat_kv does. Masked scores get
the most negative finite value, not -inf, so a query with no visible key (a left-pad row) averages every
value uniformly and stays finite instead of turning later layers' values into NaN.

`attention` is the one the model trains and scores with. Its products are all plain batched matrix
products over (B, K), with the G query heads of a key head folded into the rows, and its backward pass is
written out (`jax.custom_vjp`) so that neither the probabilities nor their gradient, the (G T, S)-sized
tensors, is ever transposed or the transposed left operand of a product: the key and value gradients are
computed transposed, as (H, S) = (H, G T) @ (G T, S). Autodiff of the same forward (or of
`jax.nn.dot_product_attention`, which vmaps over G) leaves XLA to pick those layouts, and on XLA:CPU it
transposed the (T, S) tensors and contracted them over their rows at half the batched-GEMM speed
(benchmarks/RESULTS.md, issue 19).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

_MASKED = float(jnp.finfo(jnp.float32).min)


def _heads(x, kv_heads: int):
    """(B, T, N, H) -> (B, K, G T, H): the G query heads of each key head stacked as rows."""
    b, t, n, h = x.shape
    return x.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, -1, h)


def _tokens(x, t: int):
    """(B, K, G T, H) -> (B, T, N, H), the inverse of `_heads`."""
    b, k, _, h = x.shape
    return x.reshape(b, k, -1, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, -1, h)


def _visible(mask, rows: int):
    """mask (B, 1, T, S) -> (B, 1, G T, S), the same for each of the G query heads folded into the rows."""
    b, _, t, s = mask.shape
    return jnp.broadcast_to(mask[:, :, None], (b, 1, rows // t, t, s)).reshape(b, 1, rows, s)


def _scores(qh, key_t, mask, scale: float):
    """Masked fp32 scores (B, K, G T, S) from qh (B, K, G T, H) and key_t (B, K, H, S)."""
    scores = jnp.einsum("bkmh,bkhs->bkms", qh, key_t, preferred_element_type=jnp.float32) * scale
    return jnp.where(_visible(mask, qh.shape[2]), scores, _MASKED)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q, key, value, mask, scale: float):
    """Softmax attention (see the module docstring); the same values as
    `jax.nn.dot_product_attention(q, key, value, mask=mask, scale=scale)`."""
    return _forward(q, key, value, mask, scale)[0]


def _forward(q, key, value, mask, scale):
    with jax.named_scope("attention"):  # profiles (benchmarks/train.py) find its ops by this name
        k = key.shape[2]
        probs = jax.nn.softmax(_scores(_heads(q, k), key.transpose(0, 2, 3, 1), mask, scale), axis=-1)
        probs = probs.astype(value.dtype)
        out = _tokens(jnp.einsum("bkms,bkhs->bkmh", probs, value.transpose(0, 2, 3, 1)), q.shape[1])
        # Named so that a block's checkpoint policy (SAVE_PRODUCTS) can keep it; the probabilities are left to
        # the policy to recompute (under SAVE_PRODUCTS the scores product and the softmax, not the output's).
        out = checkpoint_name(out, "attention")
        return out, (q, key, value, mask, out, probs)


def _backward(scale, residuals, d_out):
    with jax.named_scope("attention"):  # profiles (benchmarks/train.py) find its ops by this name
        q, key, value, mask, out, probs = residuals
        k, t = key.shape[2], q.shape[1]
        d_oh = _heads(d_out, k)
        d_probs = jnp.einsum("bkmh,bkhs->bkms", d_oh, value.transpose(0, 2, 3, 1), preferred_element_type=jnp.float32)
        # softmax backward: dS = P (dP - rowsum(dP P)), with rowsum(dP P) = rowsum(dO O), summed in the tokens'
        # layout (B, T, N) and only then moved to the rows' (B, K, G T, 1)
        d_dot_o = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
        d_dot_o = _heads(d_dot_o, k)
        d_scores = probs.astype(jnp.float32) * (d_probs - d_dot_o) * scale
        # zero where masked, as the forward's `where` makes it: only a row with no visible key has P > 0 there
        d_scores = jnp.where(_visible(mask, d_scores.shape[2]), d_scores, 0.0).astype(q.dtype)
        d_q = jnp.einsum("bkms,bkhs->bkmh", d_scores, key.transpose(0, 2, 3, 1), preferred_element_type=jnp.float32)
        d_key_t = jnp.einsum("bkmh,bkms->bkhs", _heads(q, k), d_scores, preferred_element_type=jnp.float32)
        d_value_t = jnp.einsum("bkmh,bkms->bkhs", d_oh, probs, preferred_element_type=jnp.float32)
        return (_tokens(d_q, t).astype(q.dtype), d_key_t.transpose(0, 3, 1, 2).astype(key.dtype),
                d_value_t.transpose(0, 3, 1, 2).astype(value.dtype), None)


attention.defvjp(_forward, _backward)


def softcapped_attention(q, key, value, mask, *, scale: float, cap: float):
    """Attention whose scores are soft-capped, cap * tanh(scores / cap), before the mask (Gemma 2), which
    `jax.nn.dot_product_attention` cannot do."""
    b, t, n, h = q.shape
    k = key.shape[2]
    q = q.reshape(b, t, k, n // k, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, key, preferred_element_type=jnp.float32) * scale
    scores = cap * jnp.tanh(scores / cap)
    scores = jnp.where(mask[:, :, None], scores, _MASKED)  # mask (B, 1, 1, T, S)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, value)
    return out.reshape(b, t, n, h)
