"""KV-cache generation: a static sampler config, a pytree sampler state, a jitted prefill and a jitted
decode loop (`lax.while_loop`), with prompt lengths and batch sizes padded to static buckets so that a
run compiles each function once per bucket.

Shapes: B batch rows, Tp prompt length (left-padded), N max_new_tokens, S = Tp + N cache slots, V vocab,
K key/value heads, H head dim.

Both jitted functions take the model split into (graphdef, state) and merge it inside, so they run
unchanged on a model whose parameters are sharded on a mesh (the Hybrid Engine's tensor-parallel
generation copy); rows may be sharded too (`batch_sharding`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl.errors import JaxrlError
from jaxrl.models.config import ModelConfig

MIN_PROMPT_BUCKET = 16  # shortest prompt bucket; longer ones are powers of two
MAX_POW2_ROWS = 64  # batch buckets: powers of two up to this, then multiples of it

@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How to pick tokens; static (hashable), so each distinct config compiles its own functions."""

    max_new_tokens: int  # N: tokens generated per row at most
    temperature: float = 0.0  # 0 = greedy (argmax); otherwise logits are divided by it before sampling
    top_k: int = 0  # keep only the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability is >= p; 1 = off
    eos_ids: tuple[int, ...] = ()  # a row stops after emitting any of these
    pad_id: int = 0  # emitted (with mask 0) after a row has stopped

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise JaxrlError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise JaxrlError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise JaxrlError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise JaxrlError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@struct.dataclass
class SamplerState:
    """Everything the decode loop carries; one row per sequence."""

    tokens: jax.Array  # (B, N) int32 generated tokens, pad after a row stops
    logprobs: jax.Array  # (B, N) fp32 log pi(token) under the raw logits, 0 where mask is 0
    mask: jax.Array  # (B, N) int32 1 for generated tokens up to and including EOS
    cache: dict[str, jax.Array]  # {'k', 'v'}: (L, B, S, K, H), stacked per layer
    kv_mask: jax.Array  # (B, S) int32 1 for cache slots holding real tokens
    last: jax.Array  # (B,) int32 the token sampled last, fed to the next step
    positions: jax.Array  # (B,) int32 position id of `last` (counted over real tokens)
    done: jax.Array  # (B,) bool the row has emitted EOS
    step: jax.Array  # () int32 tokens generated so far
    rng: jax.Array  # () PRNG key, split once per step


# ------------------------------------------------------------------------------------------ sampling
def sample_tokens(logits, rng, cfg: SamplerConfig):
    """Picks one token per row from (B, V) fp32 logits -> (B,) int32.

    Greedy when temperature is 0; otherwise temperature, then top-k, then top-p filtering (HF's order),
    then a categorical draw from what is left.
    """
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1:
        logits = _nucleus(logits, cfg.top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _nucleus(logits, p: float):
    """Masks all but the smallest most-likely set with probability >= p (the top token always stays)."""
    ranked = -jnp.sort(-logits, axis=-1)  # (B, V) descending
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
    keep = mass_before < p
    cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)  # (B, 1)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def token_logprobs(logits, tokens):
    """log softmax(logits)[token]: (B, V) fp32, (B,) -> (B,) fp32.

    Taken from the raw logits (temperature 1, no top-k/top-p): this is log pi(token) of the policy,
    the quantity PPO's ratio and KL penalty need, not the log-probability under the filtered
    distribution the token was drawn from.
    """
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def _is_eos(tokens, eos_ids: tuple[int, ...]):
    """(B,) -> (B,) bool."""
    out = jnp.zeros(tokens.shape, bool)
    for e in eos_ids:
        out |= tokens == e
    return out


def _put_column(buf, col, index):
    """buf[:, index] = col for a traced index: (B, L), (B,) -> (B, L)."""
    return jax.lax.dynamic_update_slice_in_dim(buf, col[:, None].astype(buf.dtype), index, axis=1)


def _shard_rows(state: SamplerState, batch_sharding: NamedSharding | None) -> SamplerState:
    """Pins the row axis of every per-row array (axis 1 of the layer-stacked cache, axis 0 elsewhere) to
    the batch sharding; other axes are left to XLA (so a tensor-parallel model keeps its cache sharded by
    heads)."""
    if batch_sharding is None:
        return state
    rows = batch_sharding.spec[0] if len(batch_sharding.spec) else None

    def pin(x, row_axis=0):
        if x.ndim == 0:  # step, rng
            return x
        spec = [P.UNCONSTRAINED] * x.ndim
        spec[:row_axis + 1] = [None] * row_axis + [rows]
        return jax.lax.with_sharding_constraint(x, NamedSharding(batch_sharding.mesh, P(*spec)))

    cache = jax.tree.map(lambda x: pin(x, row_axis=1), state.cache)
    return jax.tree.map(pin, state.replace(cache=None)).replace(cache=cache)


def _group_heads(arrays, group: int, batch_sharding: NamedSharding | None):
    """The first row of each group of `group` consecutive rows: (B, ...) -> (B/G, ...). The heads keep the
    batch's row sharding when they split over its shards; otherwise they are replicated (each device then
    prefills every distinct prompt, still G times fewer than the whole batch)."""
    if group == 1:
        return arrays
    if arrays[0].shape[0] % group:
        raise JaxrlError(f"{arrays[0].shape[0]} rows are not a whole number of groups of {group}")
    heads = tuple(x[::group] for x in arrays)
    if batch_sharding is None:
        return heads
    rows = batch_sharding.spec[0] if heads[0].shape[0] % _row_shards(batch_sharding) == 0 else None
    return tuple(jax.lax.with_sharding_constraint(x, NamedSharding(batch_sharding.mesh, P(rows))) for x in heads)


# ----------------------------------------------------------------------------------- jitted functions
@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "batch_sharding", "group"))
def prefill(graphdef, params, prompt_ids, prompt_mask, rng, *, cfg: SamplerConfig,
             batch_sharding=None, group: int = 1) -> SamplerState:
    """Runs left-padded prompts through the model into a fresh cache and samples the first token.

    With `group` G > 1 the rows come in groups of G consecutive copies of one prompt (GRPO's samples):
    only the first row of each group goes through the model, and its cache and last logits are
    repeated G times, so a group costs one prompt's prefill. The rows then sample as in the unshared
    path (one key per step over the whole batch, an independent draw per row).

    Args:
      graphdef, params: the model as `nnx.split(model)` gives it (graphdef is static: one compilation
        per architecture).
      prompt_ids, prompt_mask: (B, Tp) int32, left-padded.
      rng: PRNG key.
      cfg: the sampler config (static).
      batch_sharding: optional row sharding of the state (static).
      group: G, rows per shared prompt (static); B must be a multiple of it.
    Returns:
      The SamplerState after one generated token (step 1).
    """
    model = nnx.merge(graphdef, params)
    b, tp = prompt_ids.shape
    n = cfg.max_new_tokens
    kv_mask = jnp.concatenate([prompt_mask, jnp.zeros((b, n), prompt_mask.dtype)], axis=1)  # (B, S)
    ids, mask = _group_heads((prompt_ids, prompt_mask), group, batch_sharding)  # (B/G, Tp)
    hidden, cache = model.forward(ids, mask, cache=model.init_cache(b // group, tp + n), cache_index=0,
                                  kv_mask=kv_mask[::group])
    logits = model.logits(hidden[:, -1:])[:, 0]  # (B/G, V): left padding puts every row's end last
    if group > 1:  # (L, B/G, S, K, H) -> (L, B, S, K, H); (B/G, V) -> (B, V)
        cache = jax.tree.map(lambda x: jnp.repeat(x, group, axis=1), cache)
        logits = jnp.repeat(logits, group, axis=0)
    rng, key = jax.random.split(rng)
    token = sample_tokens(logits, key, cfg)
    state = SamplerState(
        tokens=jnp.full((b, n), cfg.pad_id, jnp.int32).at[:, 0].set(token),
        logprobs=jnp.zeros((b, n), jnp.float32).at[:, 0].set(token_logprobs(logits, token)),
        mask=jnp.zeros((b, n), jnp.int32).at[:, 0].set(1),
        cache=cache,
        kv_mask=kv_mask,
        last=token,
        positions=jnp.sum(prompt_mask, axis=1).astype(jnp.int32),
        done=_is_eos(token, cfg.eos_ids),
        step=jnp.array(1, jnp.int32),
        rng=rng,
    )
    return _shard_rows(state, batch_sharding)


def _decode_one(model, s: SamplerState, cfg: SamplerConfig, batch_sharding) -> SamplerState:
    """Feeds `s.last` through the cache and samples the next token (one decode step)."""
    tp = s.kv_mask.shape[1] - cfg.max_new_tokens
    slot = tp + s.step - 1  # cache slot of `last`
    kv_mask = _put_column(s.kv_mask, jnp.ones_like(s.last), slot)
    hidden, cache = model.forward(s.last[:, None], jnp.ones_like(s.last)[:, None],
                                  positions=s.positions[:, None], cache=s.cache, cache_index=slot,
                                  kv_mask=kv_mask)
    logits = model.logits(hidden)[:, 0]  # (B, V)
    rng, key = jax.random.split(s.rng)
    token = sample_tokens(logits, key, cfg)
    token = jnp.where(s.done, cfg.pad_id, token)
    logprob = jnp.where(s.done, 0.0, token_logprobs(logits, token))
    new = s.replace(
        tokens=_put_column(s.tokens, token, s.step),
        logprobs=_put_column(s.logprobs, logprob, s.step),
        mask=_put_column(s.mask, ~s.done, s.step),
        cache=cache,
        kv_mask=kv_mask,
        last=token,
        positions=s.positions + 1,
        done=s.done | _is_eos(token, cfg.eos_ids),
        step=s.step + 1,
        rng=rng,
    )
    return _shard_rows(new, batch_sharding)


# The state (above all its KV cache, L x B x S x K x H x 2, the largest buffer of generation) is
# donated: XLA then runs the loop in the caller's buffers instead of holding a second copy of the cache.
@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "batch_sharding"), donate_argnames=("state",))
def decode(graphdef, params, state: SamplerState, *, cfg: SamplerConfig, batch_sharding=None) -> SamplerState:
    """Feeds one token per step until every row is done or N tokens are out; returns the final state
    (same arguments as `prefill`; `state` is donated and must not be used afterwards)."""
    model = nnx.merge(graphdef, params)

    def running(s: SamplerState):
        return (s.step < cfg.max_new_tokens) & ~jnp.all(s.done)

    return jax.lax.while_loop(running, lambda s: _decode_one(model, s, cfg, batch_sharding), state)


# One step per call, for streaming (`jaxrl chat` prints each token as it comes). The caller stops at
# EOS or after N tokens (`state.step == cfg.max_new_tokens`); the state is donated, as in `decode`.
@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "batch_sharding"), donate_argnames=("state",))
def decode_step(graphdef, params, state: SamplerState, *, cfg: SamplerConfig,
                batch_sharding=None) -> SamplerState:
    """Exactly one decode step of `decode` (same arguments); returns the state with one more token."""
    return _decode_one(nnx.merge(graphdef, params), state, cfg, batch_sharding)


# ------------------------------------------------------------------------------------------- batches
def generate_batch(model, prompt_ids, prompt_mask, cfg: SamplerConfig, rng, *,
                   batch_sharding: NamedSharding | None = None, group: int = 1) -> dict[str, jax.Array]:
    """Generates for one left-padded batch, at exactly the given shape (no bucketing: PPO's rollout
    batches already have a fixed shape).

    Args:
      model: a `Transformer` (parameters may be sharded on a mesh).
      prompt_ids: (B, Tp) int, left-padded; every row needs at least one real token.
      prompt_mask: (B, Tp) int, 1 for real tokens.
      cfg: the sampler config.
      rng: a PRNG key (`jax.random.key`).
      batch_sharding: where the rows live (e.g. NamedSharding(mesh, P('data'))); None = default device.
      group: G > 1 when the rows are groups of G consecutive copies of one prompt: each group shares one
        prefill (see `prefill`); the outputs are those of the unshared path.
    Returns:
      dict of device arrays: `tokens` (B, N) int32 (pad after EOS), `logprobs` (B, N) fp32
      (log-softmax of the raw logits at the sampled token, see `token_logprobs`; 0 where masked),
      `mask` (B, N) int32 (1 up to and including EOS).
    """
    graphdef, params = nnx.split(model)
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    if batch_sharding is not None:
        prompt_ids, prompt_mask = jax.device_put((prompt_ids, prompt_mask), batch_sharding)
    state = prefill(graphdef, params, prompt_ids, prompt_mask, rng, cfg=cfg, batch_sharding=batch_sharding,
                    group=group)
    state = decode(graphdef, params, state, cfg=cfg, batch_sharding=batch_sharding)
    return {"tokens": state.tokens, "logprobs": state.logprobs, "mask": state.mask}


def prompt_bucket(length: int, cap: int) -> int:
    """Padded prompt length: the next power of two >= max(length, 16), at most `cap` (but >= length)."""
    bucket = max(MIN_PROMPT_BUCKET, 1 << max(length - 1, 0).bit_length())
    return max(length, min(bucket, cap))


def batch_bucket(rows: int, multiple: int = 1) -> int:
    """Padded batch size: powers of two up to 64, then multiples of 64; rounded up to `multiple` (the
    number of row shards)."""
    if rows <= MAX_POW2_ROWS:
        bucket = 1 << max(rows - 1, 0).bit_length()
    else:
        bucket = -(-rows // MAX_POW2_ROWS) * MAX_POW2_ROWS
    return -(-bucket // multiple) * multiple


def _row_shards(batch_sharding: NamedSharding | None) -> int:
    if batch_sharding is None or not len(batch_sharding.spec) or batch_sharding.spec[0] is None:
        return 1
    axes = batch_sharding.spec[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(batch_sharding.mesh.shape[a] for a in axes)


def pad_prompts(prompts: list[list[int]], length: int, rows: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists into (rows, length) ids and mask; rows past len(prompts) are dummies with one
    pad token marked real (so no row attends to nothing); their outputs are dropped."""
    ids = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for r, p in enumerate(prompts):
        ids[r, length - len(p):] = p
        mask[r, length - len(p):] = 1
    mask[len(prompts):, -1] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------ public API
def sampler_config(model, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                   top_k: int = 0, eos_ids=None, pad_id: int | None = None) -> SamplerConfig:
    """A SamplerConfig whose EOS and pad ids default to the model's (pad: pad_token_id, else the first
    EOS, else 0)."""
    mc = model.config
    eos = tuple(mc.eos_ids if eos_ids is None else ([eos_ids] if isinstance(eos_ids, int) else eos_ids))
    if pad_id is None:
        pad_id = mc.pad_token_id if mc.pad_token_id is not None else (eos[0] if eos else 0)
    return SamplerConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         eos_ids=eos, pad_id=pad_id)


def generate(model, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, eos_ids=None, seed: int = 0, *, batch_size: int = 32,
             batch_sharding: NamedSharding | None = None, rng: jax.Array | None = None) -> list[list[int]]:
    """Generates a continuation for each prompt.

    Args:
      model: a `Transformer`.
      prompts: token-id lists (any lengths, each non-empty).
      max_new_tokens: tokens per prompt at most.
      temperature: 0 = greedy; top_p / top_k: nucleus and top-k filtering (1 / 0 = off).
      eos_ids: an id or ids that end a completion; default: the model config's EOS ids.
      seed: the PRNG seed (same seed, same prompts -> same output).
      batch_size: prompts per generation batch (each padded up to a batch bucket).
      batch_sharding: optional row sharding of each batch.
      rng: a PRNG key to use instead of key(seed) (e.g. a named stream, `jaxrl.train.rng.rng_stream`).
    Returns:
      One list per prompt: the generated ids, ending with EOS when one was produced.
    """
    cfg = sampler_config(model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         top_k=top_k, eos_ids=eos_ids)
    _check_prompts(model.config, prompts, max_new_tokens)
    rng = jax.random.key(seed) if rng is None else rng
    out: list[list[int]] = []
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        length = prompt_bucket(max(len(p) for p in chunk), model.config.max_position_embeddings)
        rows = batch_bucket(len(chunk), _row_shards(batch_sharding))
        ids, mask = pad_prompts(chunk, length, rows, cfg.pad_id)
        result = generate_batch(model, ids, mask, cfg, jax.random.fold_in(rng, i), batch_sharding=batch_sharding)
        tokens, valid = np.asarray(result["tokens"]), np.asarray(result["mask"])
        out.extend(tokens[r, :valid[r].sum()].tolist() for r in range(len(chunk)))
    return out


def _check_prompts(mc: ModelConfig, prompts, max_new_tokens: int) -> None:
    if not len(prompts):
        raise JaxrlError("no prompts to generate from")
    for i, p in enumerate(prompts):
        if not len(p):
            raise JaxrlError(f"prompt {i} is empty; every prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < mc.vocab_size]
        if bad:
            raise JaxrlError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {mc.vocab_size})")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > mc.max_position_embeddings:
        raise JaxrlError(
            f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({mc.max_position_embeddings}); shorten the prompt or lower max_new_tokens"
        )
