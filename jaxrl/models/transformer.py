"""The decoder-only transformer (Flax NNX) behind every model role: actor, reference, critic, reward.

Shapes: B batch, T query length, S key length (T without a cache, the cache length with one), D model
width, E embedding width, V vocab, N query heads, K key/value heads, H head dim, F MLP width.

Parameters are created with `out_sharding` from a `ModelShardings`, so a model built under
`jax.set_mesh(mesh)` has parameters born sharded. Weights are kept in `param_dtype` (fp32 master) and
cast to the compute `dtype` where they are used; norms and softmax run in fp32.

The blocks are one stacked `Block` (`Transformer.layers`): every block parameter has a leading layer
axis L (never sharded: its PartitionSpec starts with None), and `forward` runs `jax.lax.scan` over it,
so compile time does not grow with depth and a ZeRO-3 gather can fetch one layer at a time
(`set_gathers`). The KV cache is stacked the same way: {'k', 'v'} of (L, B, S, K, H).

The vocabulary-sized tables (the embedding, the LM head) are never needed whole under ZeRO-3 either:
`Gathers.lookup` embeds the tokens from a device's shard, and `vocab_logits` gathers one slice of the
head at a time (`sft.head_stats` with `vocab_chunk`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from jaxrl.errors import JaxrlError
from jaxrl.models.attention import attention, softcapped_attention
from jaxrl.models.config import ModelConfig
from jaxrl.parallel.sharding import ModelShardings, current_mesh, fit_spec

INIT_STD = 0.02


def _param(rngs, shape, spec: P, *, init="normal", layers=0, dtype=jnp.float32) -> nnx.Param:
    """A parameter of `shape`, sharded by `spec` when a mesh is set (axes that do not divide drop out).

    `layers` > 0 stacks it: shape (layers, *shape), spec (None, *spec), the layer axis unsharded.
    """
    mesh = current_mesh()
    if layers:
        shape, spec = (layers, *shape), P(None, *spec)
    if init == "normal":
        value = INIT_STD * jax.random.normal(rngs.params(), shape, dtype)
    else:
        value = (jnp.ones if init == "ones" else jnp.zeros)(shape, dtype)
    if mesh is None:
        return nnx.Param(value)
    return nnx.Param(value, out_sharding=fit_spec(spec, shape, mesh))


def matmul(x, w, *, rows: bool = False):
    """(..., I) @ (I, O) -> (..., O) (with `rows`, w is (O, I): x @ w.T), as one 2-D dot over the
    flattened leading axes.

    Written as `'...i,io->...o'` on a (B, T, I) input, the weight's gradient contracts two axes (B, T),
    and XLA:CPU then transposes the output gradient in a slow elementwise loop before the dot; the flat
    (B T, I) form does not (a gated MLP's forward + backward at 8 x 256 x 512 -> 1408: 264 -> 176 ms).
    """
    y = jnp.einsum("MI,OI->MO" if rows else "MI,IO->MO", x.reshape(-1, x.shape[-1]), w)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class Dense(nnx.Module):
    """y = x @ kernel (+ bias), kernel [in, out]; an optional LoRA branch adds (alpha/r) * x @ A @ B."""

    def __init__(self, din, dout, *, bias, kernel_spec, bias_spec, dtype, rngs, layers=0):
        self.kernel = _param(rngs, (din, dout), kernel_spec, layers=layers)
        self.bias = _param(rngs, (dout,), bias_spec, init="zeros", layers=layers) if bias else None
        self.lora = nnx.data(None)  # a LoRA branch, set by jaxrl.models.lora.add_lora
        self.lora_scale = 0.0
        self.dtype = dtype

    def __call__(self, x):  # x (..., in) -> (..., out)
        y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora_scale * self.lora(x.astype(self.dtype)).astype(self.dtype)
        return y


class Norm(nnx.Module):
    """RMSNorm (Llama family) or LayerNorm (OPT, GPT-2), computed in fp32.

    With `offset` (Gemma: 1) the RMSNorm multiplies by (offset + scale): the parameter holds what the
    checkpoint holds, zero-centred, so it starts at zeros and weight decay pulls it towards the identity.
    """

    def __init__(self, dim, *, kind, eps, spec, dtype, rngs, layers=0, offset=0.0):
        self.scale = _param(rngs, (dim,), spec, init="zeros" if offset else "ones", layers=layers)
        self.bias = _param(rngs, (dim,), spec, init="zeros", layers=layers) if kind == "layer" else None
        self.eps = eps
        self.offset = offset
        self.dtype = dtype

    def __call__(self, x):  # (..., D)
        x = x.astype(jnp.float32)
        if self.bias is None:
            y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
            y = y * (self.offset + self.scale[...].astype(jnp.float32))
        else:
            mean = jnp.mean(x, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
            y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(self.dtype)


class Embed(nnx.Module):
    def __init__(self, num, dim, *, spec, rngs):
        self.embedding = _param(rngs, (num, dim), spec)

    def __call__(self, ids):  # (B, T) -> (B, T, dim)
        return jnp.take(self.embedding[...], ids, axis=0)


def rope_inv_freq(cfg: ModelConfig, *, local: bool = False, long: bool = False) -> np.ndarray:
    """Rotary inverse frequencies [R/2] (R = cfg.rope_dim), with HF's 'linear', 'llama3' and 'longrope'
    scalings; `local`: those of the sliding-window layers (Gemma 3 gives them their own base and
    scaling); `long` picks longrope's long factors (see `rope_frequencies`)."""
    h = cfg.rope_dim
    theta, scaling = cfg.rope_theta, cfg.rope_scaling
    if local and cfg.rope_local_theta:
        theta, scaling = cfg.rope_local_theta, cfg.rope_local_scaling
    inv = 1.0 / (theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
    scaling = dict(scaling or ())
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = np.where(medium, smoothed, scaled)
    elif kind == "longrope":
        inv = inv / np.asarray(scaling["long_factor" if long else "short_factor"], np.float64)
    return inv.astype(np.float32)


def rope_frequencies(cfg: ModelConfig, positions):
    """Inverse frequencies [R/2] for a forward over `positions`, where they depend on them.

    LongRoPE (Phi-3) as transformers applies it: the long factors when the call's largest position
    reaches past `original_max_position_embeddings`, else the short ones (one choice for the whole call).
    """
    original = dict(cfg.rope_scaling)["original_max_position_embeddings"]
    is_long = jnp.max(positions) + 1 > original
    return jnp.where(is_long, rope_inv_freq(cfg, long=True), rope_inv_freq(cfg))


def rope_scale(cfg: ModelConfig) -> float:
    """The factor cos and sin are scaled by: LongRoPE's `attention_factor` (default sqrt(1 + ln(s) /
    ln(original)), s = the context extension factor, when s > 1); 1 for every other RoPE."""
    scaling = dict(cfg.rope_scaling or ())
    if scaling.get("rope_type") != "longrope":
        return 1.0
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or cfg.max_position_embeddings / original
    scale = scaling.get("attention_factor")
    if scale is None:
        scale = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
    return float(scale)


def apply_rope(x, positions, inv_freq, scale=1.0):
    """Rotates the first R = 2 * len(inv_freq) features of x [B, T, N, H] by angle positions * inv_freq
    (HF's rotate-half convention; cos and sin times `scale`); the other H - R features pass unchanged."""
    r = 2 * inv_freq.shape[-1]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, R/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # (B, T, 1, R)
    x_rot, x_pass = x[..., :r].astype(jnp.float32), x[..., r:]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = (x_rot * (jnp.cos(angles) * scale) + rotated * (jnp.sin(angles) * scale)).astype(x.dtype)
    return jnp.concatenate([out, x_pass], axis=-1) if r < x.shape[-1] else out


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, sh: ModelShardings, dtype, rngs, layers=0):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        col = dict(kernel_spec=sh.in_dx, bias_spec=sh.bias_x, dtype=dtype, rngs=rngs, layers=layers)
        self.q = Dense(d, n * h, bias=cfg.qkv_bias, **col)
        self.k = Dense(d, k * h, bias=cfg.qkv_bias, **col)
        self.v = Dense(d, k * h, bias=cfg.qkv_bias, **col)
        self.o = Dense(n * h, d, bias=cfg.out_bias, kernel_spec=sh.out_xd, bias_spec=sh.vec_d,
                       dtype=dtype, rngs=rngs, layers=layers)
        norm = dict(kind="rms", eps=cfg.norm_eps, spec=sh.vec_d, dtype=dtype, rngs=rngs, layers=layers,
                    offset=cfg.norm_offset)
        self.q_norm = Norm(h, **norm) if cfg.qk_norm else None  # over H, shared by every head (Qwen3, Gemma 3)
        self.k_norm = Norm(h, **norm) if cfg.qk_norm else None
        self.shape = (n, k, h)
        self.scale = (cfg.query_pre_attn_scalar or h) ** -0.5
        self.softcap = cfg.attn_softcap
        self.rope_scale = rope_scale(cfg) if cfg.position == "rope" else 1.0

    def __call__(self, x, positions, mask, cache=None, cache_index=None, layer=None, inv_freq=None):
        """x (B, T, D); mask (B, 1, T, S) bool; cache {'k','v'}: the stacked (L, B, S, K, H) cache, this
        block's keys and values written into layer `layer` at slots [cache_index, cache_index + T);
        inv_freq (R/2,): this layer's RoPE frequencies (None: no rotary positions)."""
        n, k, h = self.shape
        b, t, d = x.shape
        x = x.reshape(b * t, d)  # once for all three projections: the backward then saves one copy of x
        q = self.q(x).reshape(b, t, n, h)
        key = self.k(x).reshape(b, t, k, h)
        value = self.v(x).reshape(b, t, k, h)
        if self.q_norm is not None:
            q, key = self.q_norm(q), self.k_norm(key)
        if inv_freq is not None:
            q = apply_rope(q, positions, inv_freq, self.rope_scale)
            key = apply_rope(key, positions, inv_freq, self.rope_scale)
        if cache is not None:
            # Written in place into the carried stack (no per-layer copy of the cache), then this
            # layer's (B, S, K, H) slice is read back for attention.
            if jnp.ndim(cache_index) == 0:
                start = (layer, 0, cache_index, 0, 0)
                cache = {name: jax.lax.dynamic_update_slice(cache[name], new[None].astype(cache[name].dtype), start)
                         for name, new in (("k", key), ("v", value))}
            else:  # per-row offsets (the slot engine): row b writes slots [cache_index[b], cache_index[b] + T)
                rows, cols = jnp.arange(b)[:, None], cache_index[:, None] + jnp.arange(t)  # (B, 1), (B, T)
                cache = {name: cache[name].at[layer, rows, cols].set(new.astype(cache[name].dtype), mode="drop")
                         for name, new in (("k", key), ("v", value))}
            key, value = cache["k"][layer], cache["v"][layer]
        dtype = q.dtype
        if dtype == jnp.float16 and jax.default_backend() == "cpu":
            dtype = jnp.float32  # XLA:CPU has no fp16 x fp16 -> fp32 dot, which attention's scores use
        q, key, value = q.astype(dtype), key.astype(dtype), value.astype(dtype)
        if cache is None and not self.softcap:  # training and scoring; names its output "attention" itself
            out = attention(q, key, value, mask, self.scale)
        else:
            if self.softcap:
                out = softcapped_attention(q, key, value, mask, scale=self.scale, cap=self.softcap)
            else:  # generation: XLA's own layout for a query block against the whole cache
                out = jax.nn.dot_product_attention(q, key, value, mask=mask, scale=self.scale)
            out = checkpoint_name(out, "attention")  # kept for the backward pass (SAVE_PRODUCTS)
        return self.o(out.astype(q.dtype).reshape(b, t, n * h)), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, sh: ModelShardings, dtype, rngs, layers=0):
        d, f = cfg.hidden_size, cfg.intermediate_size
        col = dict(kernel_spec=sh.in_dx, bias_spec=sh.bias_x, dtype=dtype, rngs=rngs, layers=layers)
        self.gate = Dense(d, f, bias=cfg.mlp_bias, **col) if cfg.gated_mlp else None
        self.up = Dense(d, f, bias=cfg.mlp_bias, **col)
        self.down = Dense(f, d, bias=cfg.mlp_bias, kernel_spec=sh.out_xd, bias_spec=sh.vec_d,
                          dtype=dtype, rngs=rngs, layers=layers)
        self.act = _ACTIVATIONS[cfg.activation]

    def __call__(self, x):  # (B, T, D)
        b, t, d = x.shape
        x = x.reshape(b * t, d)  # once for both projections: the backward then saves one copy of x
        if self.gate is not None:
            y = self.act(self.gate(x)) * self.up(x)  # recomputed from gate and up in the backward pass
        else:
            y = self.act(self.up(x))
        return self.down(y).reshape(b, t, d)


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class Block(nnx.Module):
    """One transformer block; built with `layers=L` it holds all L blocks' parameters stacked on a leading
    axis, and is called on one layer's slice (inside `Transformer.forward`'s scan)."""

    def __init__(self, cfg: ModelConfig, sh: ModelShardings, dtype, rngs, layers=0):
        norm = dict(kind=cfg.norm, eps=cfg.norm_eps, spec=sh.vec_d, dtype=dtype, rngs=rngs, layers=layers,
                    offset=cfg.norm_offset)
        self.attn_norm = Norm(cfg.hidden_size, **norm)
        self.attn = Attention(cfg, sh, dtype, rngs, layers)
        self.mlp_norm = Norm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg, sh, dtype, rngs, layers)
        # Gemma: the sub-layers' outputs are normed too, before each residual add
        self.attn_post_norm = Norm(cfg.hidden_size, **norm) if cfg.post_norms else None
        self.mlp_post_norm = Norm(cfg.hidden_size, **norm) if cfg.post_norms else None
        self.pre_norm = cfg.pre_norm

    def __call__(self, x, positions, mask, cache=None, cache_index=None, layer=None, inv_freq=None):
        if self.pre_norm:
            h, cache = self.attn(self.attn_norm(x), positions, mask, cache, cache_index, layer, inv_freq)
            if self.attn_post_norm is not None:
                h = self.attn_post_norm(h)
            x = x + h
            h = self.mlp(self.mlp_norm(x))
            if self.mlp_post_norm is not None:
                h = self.mlp_post_norm(h)
            return x + h, cache
        # OPT-350m: post-LN blocks
        h, cache = self.attn(x, positions, mask, cache, cache_index, layer, inv_freq)
        x = self.attn_norm(x + h)
        return self.mlp_norm(x + self.mlp(x)), cache


# What a block keeps for its backward pass with `remat='none'`: the projections' outputs and the attention's
# output, so no matrix product is computed twice; the elementwise work between them (norms, rotary
# embeddings, the gated activation, the softmax) is recomputed in the backward pass instead. Saving it too
# would add about as many bytes per layer again, each written into a stacked buffer of the scan and read
# back (32M Llama, 8 x 256: the step's temporaries 973 -> 480 MB).
SAVE_PRODUCTS = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    jax.checkpoint_policies.save_only_these_names("attention"))

REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nnx.Module):
    """Decoder-only transformer: `model(input_ids, attention_mask=None) -> logits (B, T, V)` in fp32.

    `forward` is the general entry point (explicit positions, KV cache); `features` gives the final
    hidden states (B, T, E) that value and reward heads read.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 shardings: ModelShardings | None = None, lm_head: bool = True, remat: str = "none",
                 logits_chunk: int = 0, vocab_chunk: int = 0):
        sh = shardings or ModelShardings()
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        self.logits_chunk = logits_chunk  # positions per LM-head chunk in the losses (sft.head_stats); 0: all
        self.vocab_chunk = vocab_chunk  # vocabulary entries per LM-head chunk in the losses; 0: all
        e, d = cfg.embed_width, cfg.hidden_size
        self.embed = Embed(cfg.vocab_size, e, spec=sh.embed_ve, rngs=rngs)
        self.pos_embed = (
            Embed(cfg.max_position_embeddings + cfg.position_offset, d, spec=sh.pos_pd, rngs=rngs)
            if cfg.position == "learned" else None
        )
        proj = e != d
        self.project_in = Dense(e, d, bias=False, kernel_spec=sh.proj_ed, bias_spec=P(), dtype=dtype,
                                rngs=rngs) if proj else None
        self.project_out = Dense(d, e, bias=False, kernel_spec=sh.proj_de, bias_spec=P(), dtype=dtype,
                                 rngs=rngs) if proj else None
        self.layers = Block(cfg, sh, dtype, rngs, layers=cfg.num_layers)  # stacked: (L, ...) per parameter
        self.final_norm = (
            Norm(d, kind=cfg.norm, eps=cfg.norm_eps, spec=sh.vec_d, dtype=dtype, rngs=rngs, offset=cfg.norm_offset)
            if cfg.final_norm else None
        )
        self.lm_head = (
            Dense(e, cfg.vocab_size, bias=False, kernel_spec=sh.head_ev, bias_spec=P(), dtype=dtype,
                  rngs=rngs)
            if lm_head and not cfg.tie_embeddings else None
        )
        self.has_lm_head = lm_head
        self.act_spec = None  # PartitionSpec of (B, T, D) activations under GSPMD; see shard_activations
        self.gathers = Gathers()  # how ZeRO-3-sharded parameters are fetched where used; see set_gathers

    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None):
        hidden, _ = self.forward(input_ids, attention_mask, positions=positions, segment_ids=segment_ids)
        return self.logits(hidden)

    def features(self, input_ids, attention_mask=None):
        """Final hidden states (B, T, E)."""
        return self.forward(input_ids, attention_mask)[0]

    def forward(self, input_ids, attention_mask=None, *, positions=None, cache=None, cache_index=0,
                kv_mask=None, segment_ids=None):
        """Runs the blocks.

        Args:
          input_ids: (B, T) token ids.
          attention_mask: (B, T) 1 for real tokens, 0 for padding (left or right); None = all real.
          positions: (B, T) position ids; default: counted over real tokens (cumsum of the mask - 1),
            so left-padded rows start at position 0.
          cache: {'k', 'v'} stacked per layer, (L, B, S, K, H); this call writes slots
            [cache_index, cache_index + T) and attends to every slot <= its own.
          cache_index: a scalar (every row at the same offset), or (B,) int32 per-row offsets (the slot
            engine, whose slots are at different points of their sequences).
          kv_mask: (B, S) which cache slots hold real tokens (including those written now).
          segment_ids: (B, T) packed rows: tokens attend only within their own segment (no cache).
        Returns:
          hidden (B, T, E) and the updated cache (None without one).
        """
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        per_row = jnp.ndim(cache_index) == 1
        q_slot = (cache_index[:, None] if per_row else cache_index) + jnp.arange(t)  # (B, T) or (T,)
        if cache is None:
            kv_mask, k_slot = attention_mask, jnp.arange(t)
        else:
            k_slot = jnp.arange(cache["k"].shape[2])
        causal = k_slot <= q_slot[..., None]  # (T, S) or (B, T, S): causal by slot
        rows = (lambda m: m[:, None]) if per_row else (lambda m: m[None, None])  # -> (B or 1, 1, T, S)
        mask = rows(causal) & kv_mask.astype(bool)[:, None, None, :]  # (B, 1, T, S)
        if segment_ids is not None:
            mask &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        # Slots of a row's real tokens are consecutive (left padding, then the generated tokens), so a
        # distance in slots is a distance in positions.
        window = self.config.sliding_window
        local = mask & rows(q_slot[..., None] - k_slot < window) if window else None

        x = self._embed_tokens(input_ids).astype(self.dtype)
        if self.config.scale_embeddings:  # HF rounds sqrt(D) to the compute dtype first (55.4 -> 55.5 in bf16)
            x = x * jnp.asarray(math.sqrt(self.config.hidden_size), self.dtype)
        if self.project_in is not None:
            x = self.project_in(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions + self.config.position_offset).astype(self.dtype)

        x, new_cache = self._scan_blocks(x, positions, (mask, local), cache, cache_index)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x, new_cache

    def _layer_inputs(self, positions) -> dict:
        """What differs between layers, as arrays over the layer axis (scanned with the parameters):
        `sliding` (L,) bool, `inv_freq` (L, R/2) fp32 RoPE frequencies (absent without RoPE; under
        LongRoPE chosen by `positions`, the same for every layer)."""
        cfg = self.config
        sliding = np.array(cfg.sliding_layers)
        out = {"sliding": sliding}
        if cfg.position == "rope" and dict(cfg.rope_scaling or ()).get("rope_type") == "longrope":
            out["inv_freq"] = jnp.broadcast_to(rope_frequencies(cfg, positions), (cfg.num_layers, cfg.rope_dim // 2))
        elif cfg.position == "rope":
            out["inv_freq"] = np.stack([rope_inv_freq(cfg, local=bool(s)) for s in sliding])
        return out

    def _scan_blocks(self, x, positions, masks, cache, cache_index):
        """x (B, T, D) through the L stacked blocks with `jax.lax.scan`; the cache rides in the carry.

        `masks` is (full, sliding-window) (B, 1, T, S), the second None without a window; each layer
        picks its own by the scanned `sliding` flag (one traced body serves every layer).
        The body merges one layer's slice of the stacked parameters into a Block (after `gathers.layer`,
        e.g. ZeRO-3's all-gather of that layer) and is rematerialised by `self.remat`. With a gather, the
        gathered layer is never saved for the backward pass (it is gathered again there; remat 'none' then
        saves what 'dots' saves), so ZeRO-3 holds about two layers of full parameters at a time.
        """
        graphdef, stacked = nnx.split(self.layers)
        stacked = nnx.to_pure_dict(stacked)
        # Each leaf's float dtype: its own, or for layers stored as bits (`pack_layers`) the compute dtype.
        dtypes = jax.tree.map(lambda x: self.dtype if x.dtype == jnp.uint16 else x.dtype, stacked)
        gather, act_spec = self.gathers.layer, self.act_spec
        per_layer = self._layer_inputs(positions)
        full, local = masks
        if local is not None and per_layer["sliding"].all():  # Mistral: every layer slides
            full, local = local, None
        elif not per_layer["sliding"].any():
            local = None

        def body(carry, xs):
            h, layer_cache = carry
            params, layer, this = xs
            if gather is not None:
                params = gather(params, layer)  # as bits where 16-bit: XLA:CPU has no bf16 all-gather either
            params = jax.tree.map(_from_bits, params, dtypes)
            mask = full if local is None else jnp.where(this["sliding"], local, full)
            h, layer_cache = nnx.merge(graphdef, params)(h, positions, mask, layer_cache, cache_index, layer,
                                                         this.get("inv_freq"))
            if act_spec is not None:
                h = jax.lax.with_sharding_constraint(h, act_spec)
            return (h, layer_cache), None

        if self.remat in REMAT_POLICIES:
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        elif self.remat != "none":
            raise ValueError(f"model.remat must be one of none, {', '.join(REMAT_POLICIES)}; got {self.remat!r}")
        elif gather is not None:
            # Saving everything would keep every gathered layer (and values derived from it) until the
            # backward pass, i.e. the whole model. Save the projections' outputs only (as remat='dots'
            # does; not the attention output as well: at Qwen3-0.6B's N H = 2 D that is 8.5% more memory)
            # and gather the layer again in the backward scan instead.
            body = jax.checkpoint(body, policy=REMAT_POLICIES["dots"], prevent_cse=False)
        else:
            body = jax.checkpoint(body, policy=SAVE_PRODUCTS, prevent_cse=False)
        layers = jnp.arange(self.config.num_layers)
        (x, cache), _ = jax.lax.scan(body, (x, cache), (jax.tree.map(_as_bits, stacked), layers, per_layer))
        return x, cache

    def _embed_tokens(self, ids):  # (B, T) -> (B, T, E) in the table's dtype
        table = self.embed.embedding[...]
        if self.gathers.lookup is not None:
            return self.gathers.lookup(table, ids)
        return jnp.take(table, ids, axis=0)

    def logits(self, hidden):
        """(B, T, E) -> (B, T, V) fp32."""
        return self.vocab_logits(hidden, 0, self.config.vocab_size)

    def vocab_logits(self, hidden, start, size: int):
        """(..., E) -> (..., size) fp32: the logits of vocabulary entries [start, start + size).

        `start` may be traced; as in `lax.dynamic_slice` it is clamped to V - size. Only that slice of the
        LM head (or of the tied embedding) is used, and under ZeRO-3 only it is gathered (`Gathers.table`).
        With `final_softcap` (Gemma 2) the logits are cap * tanh(logits / cap), elementwise, so a chunk
        is capped exactly as the whole would be.
        """
        if self.lm_head is not None:
            w = jax.lax.dynamic_slice_in_dim(self.lm_head.kernel[...], start, size, axis=1)  # (E, size)
            w = self._gathered("lm_head", w)
            logits = matmul(hidden.astype(self.dtype), w.astype(self.dtype))
        else:
            w = jax.lax.dynamic_slice_in_dim(self.embed.embedding[...], start, size, axis=0)  # (size, E)
            w = self._gathered("embed", w)
            logits = matmul(hidden.astype(self.dtype), w.astype(self.dtype), rows=True)
        logits = logits.astype(jnp.float32)
        cap = self.config.final_softcap
        return cap * jnp.tanh(logits / cap) if cap else logits

    def _gathered(self, name, table_slice):
        if self.gathers.table is None:
            return table_slice
        return self.gathers.table(name, table_slice)

    def init_cache(self, batch: int, length: int, dtype=None) -> dict:
        """An empty KV cache, stacked per layer: {'k', 'v'} of (L, B, S, K, H)."""
        c = self.config
        shape = (c.num_layers, batch, length, c.num_kv_heads, c.head_dim)
        dtype = dtype or self.dtype
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


@jax.custom_jvp
def _as_bits(x):
    """A 16-bit float array as uint16 holding the same bits (other arrays unchanged); `_from_bits` undoes it.

    The scan carries 16-bit stacked weights (frozen models, the generation copy) as integers: XLA:CPU has
    no bf16/fp16 loops, and converts every 16-bit array a while loop carries to fp32 before the loop: a
    second, fp32 copy of all the model's layers (device memory a TPU or GPU run never needs). As bits,
    only the layer in use is converted, inside the body. Free on every backend (a bitcast). Trained
    weights are fp32 (the master copy), so none is differentiated through here.
    """
    if x.dtype.itemsize != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    return to_bits(x)


@_as_bits.defjvp
def _as_bits_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    if x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating):
        raise JaxrlError(f"a {x.dtype} stacked layer parameter was differentiated; trained parameters must "
                         "be fp32 (a master copy), and only frozen weights in the compute dtype")
    return x, t


def _from_bits(x, dtype):
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 and dtype != jnp.uint16 else x


def pack_layers(model: nnx.Module) -> nnx.Module:
    """Stores each Transformer's stacked layer weights that are in its 16-bit compute dtype as uint16 bits
    (in place; concrete or `nnx.eval_shape`'d); returns `model`. For models that are only run, never
    trained (frozen roles, the generation copy): `_scan_blocks` then carries them into its loop as they
    are, where a bf16 array would be copied to bits there, once per call (see `_as_bits`)."""
    for _, module in nnx.iter_graph(model):
        if not isinstance(module, Transformer) or jnp.dtype(module.dtype).itemsize != 2:
            continue
        for _, var in nnx.iter_graph(module.layers):
            if isinstance(var, nnx.Param) and var.get_value().dtype == module.dtype:
                var.set_value(to_bits(var.get_value()))
    return model


def to_bits(x):
    """A 16-bit float array (or its `jax.ShapeDtypeStruct`) as uint16 bits, keeping its sharding."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, jnp.uint16, sharding=x.sharding)
    return jax.lax.bitcast_convert_type(x, jnp.uint16)


def shard_activations(model: nnx.Module, spec: P | None) -> nnx.Module:
    """Pins every block's (B, T, D) output to `spec` (e.g. rows over the data axes) in a GSPMD jit.

    With ZeRO-3 parameters sharded over the same axes as the batch, the partitioner otherwise may gather
    the activations instead of the weights (seen: 9x the temporaries of stage 0 in the PPO scoring
    forwards). Leave it off inside the train step's shard_map, where the data axes are manual.
    """
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Transformer):
            module.act_spec = spec
    return model


@dataclasses.dataclass(frozen=True)
class Gathers:
    """How a Transformer fetches parameters a device holds only a shard of (ZeRO-3), where it uses them.

    The train step sets them (`set_gathers`) inside its shard_map, manual over the data axes; a None
    field means the parameter is used as it is (whole, or left to GSPMD).
    """

    # (one layer's parameters: the pure dict of `nnx.state(transformer.layers)` without the layer axis,
    # the layer's index) -> whole, applied inside the scan body: the forward gathers one layer at a time,
    # the backward gathers it again, and the gather's transpose reduce-scatters that layer's gradient there.
    layer: Callable[[dict, jax.Array], dict] | None = None
    # ('embed' | 'lm_head', a vocabulary slice of that table as the device holds it) -> the whole slice.
    table: Callable[[str, jax.Array], jax.Array] | None = None
    # (the device's shard of the embedding table, (B, T) ids) -> (B, T, E): the tokens' embeddings.
    lookup: Callable[[jax.Array, jax.Array], jax.Array] | None = None


def set_gathers(model: nnx.Module, gathers_for) -> nnx.Module:
    """Sets how each Transformer in `model` fetches its sharded parameters (`Gathers`).

    `gathers_for(path)` is called with each Transformer's path in `model` (() for the root, ('backbone',)
    in a ScoreModel) and returns its `Gathers`.
    """
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Transformer):
            module.gathers = gathers_for(tuple(path))
    return model


class ScoreModel(nnx.Module):
    """Backbone + scalar head (reward model, critic): per-token values (B, T), and the sequence score
    read at the last real token."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 shardings: ModelShardings | None = None, remat: str = "none"):
        sh = shardings or ModelShardings()
        self.backbone = Transformer(cfg, rngs=rngs, dtype=dtype, shardings=sh, lm_head=False, remat=remat)
        self.score = Dense(cfg.embed_width, 1, bias=False, kernel_spec=sh.score_e1, bias_spec=P(),
                           dtype=dtype, rngs=rngs)
        self.config = cfg

    def __call__(self, input_ids, attention_mask=None):
        """Per-token values (B, T) fp32."""
        return self.score(self.backbone.features(input_ids, attention_mask))[..., 0].astype(jnp.float32)

    def sequence_score(self, input_ids, attention_mask):
        """(B,) the value at each row's last real token (its EOS), for left or right padding."""
        values = self(input_ids, attention_mask)
        return values[jnp.arange(values.shape[0]), last_token_index(attention_mask)]


def last_token_index(attention_mask):
    """(B,) index of each row's last real token: the largest t with mask[b, t] = 1."""
    t = attention_mask.shape[1]
    return t - 1 - jnp.argmax(attention_mask[:, ::-1].astype(jnp.int32), axis=1)


def store_params(model: nnx.Module, dtype) -> nnx.Module:
    """Stores every floating-point `nnx.Param` of `model` in `dtype`, in place; returns `model`.

    For a frozen model (PPO's reference and reward): its forward casts each weight to the compute dtype
    where it is used, so storing the weights in that dtype halves their bytes (bf16 vs fp32); only norm
    scales, used in fp32, round to it. A concrete model is cast shard by shard where it lies; an
    `nnx.eval_shape` model gets the new dtype in its abstract values, so `load_pretrained` reads each
    device's slice of the checkpoint straight into it.
    """
    dtype = jnp.dtype(dtype)
    for _, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Param):
            continue
        value = var.get_value()
        if not jnp.issubdtype(value.dtype, jnp.floating) or value.dtype == dtype:
            continue
        if isinstance(value, jax.ShapeDtypeStruct):
            var.set_value(jax.ShapeDtypeStruct(value.shape, dtype, sharding=value.sharding))
        else:
            var.set_value(value.astype(dtype))
    return model
