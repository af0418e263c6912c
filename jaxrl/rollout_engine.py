"""The slot engine: continuous batching for rollouts, so generation costs what the generated tokens cost.

The static sampler (`jaxrl.generation`) prefills a batch together and decodes until its longest row ends,
every step attending over the whole cache. With long-tailed response lengths (RL rollouts) most of that
work is spent on rows that are already done. Here a fixed number of slots decode together instead:

- **Slot refill.** Each slot holds one item (a prompt's sample) at its own point: its own cache offset
  (`cursor`), position and step. A compiled decode chunk runs at most `chunk_steps` steps, or until
  `refill_at` slots are free; the host then prefills queued prompts into the free slots (one compiled
  prefill per rows x prompt-length bucket) and decodes on. The batch stays full until the queue is empty.
- **Attention over what is filled.** A decode chunk runs on the cache sliced to a length bucket (a
  multiple of `length_block`) covering every running slot's last position during the chunk, so a step
  reads the filled part of the cache, not S = prompt + max_new_tokens (one decode program per bucket).
- **Shared prefixes.** Identical prompts in one refill (the G samples of a GRPO group) are prefilled once
  and the prompt's cache rows copied into each of their slots.

Same outputs as the static sampler: each item's token t is drawn with key fold_in(fold_in(rng, item), t),
so a sampled rollout does not depend on which slot an item lands in or when; greedy completions are token
for token the static sampler's (same model, same sampling functions, fp32 rounding aside); `tokens`,
`logprobs` and `mask` mean what `generation.generate_batch` returns.

Multi-process runs: every process runs the same host loop on the same values (the global prompt list,
each chunk's progress gathered to every process by `parallel.mesh.to_host`), so they all make the same
refill and bucket decisions and dispatch the same programs in the same order.

Shapes: B slots, I items (output rows), U distinct prompts in one refill, R refilled rows, Tp prompt
bucket, N max_new_tokens, S cache length (longest prompt bucket + N), C cache length of one decode chunk.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl.errors import JaxrlError
from jaxrl.generation import (SamplerConfig, _check_prompts, _is_eos, _row_shards, batch_bucket, prompt_bucket,
                              sample_tokens, sampler_config, token_logprobs)
from jaxrl.parallel.mesh import to_host


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the slot engine schedules; static (hashable)."""

    slots: int = 64  # B: rows decoding together (the cache holds B x S positions)
    chunk_steps: int = 16  # decode steps between host-side refills at most
    refill_at: int = 0  # end a chunk early once this many slots are free; 0 = slots // 4 (at least 1)
    length_block: int = 64  # decode chunks attend over a multiple of this many cache positions

    def __post_init__(self):
        for name in ("slots", "chunk_steps", "length_block"):
            if getattr(self, name) < 1:
                raise JaxrlError(f"slot engine: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.refill_at <= self.slots:
            raise JaxrlError(f"slot engine: refill_at must be in [0, slots={self.slots}], got {self.refill_at}")

    @property
    def refill_threshold(self) -> int:
        return self.refill_at or max(1, self.slots // 4)


@struct.dataclass
class SlotState:
    """What the decode chunks carry: per-slot progress, the slots' cache, and the outputs by item."""

    cache: dict[str, jax.Array]  # {'k', 'v'}: (L, B, S, K, H)
    kv_mask: jax.Array  # (B, S) int32 1 for cache positions holding the slot's real tokens
    last: jax.Array  # (B,) int32 the token sampled last, fed next
    positions: jax.Array  # (B,) int32 position id of `last`
    cursor: jax.Array  # (B,) int32 cache position `last` is written to
    step: jax.Array  # (B,) int32 tokens generated for the slot's item so far
    done: jax.Array  # (B,) bool the slot is free (its item finished, or it never had one)
    item: jax.Array  # (B,) int32 the output row of the slot's item; I = none
    keys: jax.Array  # (B,) PRNG keys, fold_in(rng, item)
    tokens: jax.Array  # (I, N) int32 generated tokens, pad after EOS
    logprobs: jax.Array  # (I, N) fp32 log pi(token) under the raw logits, 0 where mask is 0
    mask: jax.Array  # (I, N) int32 1 for generated tokens up to and including EOS


def _sample_rows(logits, keys, step, cfg: SamplerConfig):
    """One token per row, row b drawn with key fold_in(keys[b], step[b]): (B, V), (B,), (B,) -> (B,)."""
    if cfg.greedy:
        return sample_tokens(logits, None, cfg)
    keys = jax.vmap(jax.random.fold_in)(keys, step)
    return jax.vmap(lambda row, key: sample_tokens(row[None], key, cfg)[0])(logits, keys)


def _pin_slots(state: SlotState, batch_sharding: NamedSharding | None) -> SlotState:
    """Pins the slot axis of the per-slot arrays (axis 1 of the cache) to the batch sharding; the outputs
    and the cache's other axes are left to XLA."""
    if batch_sharding is None:
        return state
    rows = batch_sharding.spec[0] if len(batch_sharding.spec) else None

    def pin(x, axis=0):
        spec = [P.UNCONSTRAINED] * x.ndim
        spec[:axis + 1] = [None] * axis + [rows]
        return jax.lax.with_sharding_constraint(x, NamedSharding(batch_sharding.mesh, P(*spec)))

    per_slot = ("kv_mask", "last", "positions", "cursor", "step", "done", "item", "keys")
    return state.replace(cache=jax.tree.map(lambda x: pin(x, 1), state.cache),
                         **{k: pin(getattr(state, k)) for k in per_slot})


# ----------------------------------------------------------------------------------- jitted functions
@functools.partial(jax.jit, static_argnames=("graphdef", "slots", "length", "items", "cfg", "batch_sharding"))
def init_state(graphdef, params, rng, *, slots: int, length: int, items: int, cfg: SamplerConfig,
               batch_sharding=None) -> SlotState:
    """Every slot free, outputs all padding."""
    model = nnx.merge(graphdef, params)
    n, zeros = cfg.max_new_tokens, jnp.zeros((slots,), jnp.int32)
    state = SlotState(
        cache=model.init_cache(slots, length), kv_mask=jnp.zeros((slots, length), jnp.int32), last=zeros,
        positions=zeros, cursor=zeros, step=zeros, done=jnp.ones((slots,), bool),
        item=jnp.full((slots,), items, jnp.int32), keys=jax.random.split(rng, slots),
        tokens=jnp.full((items, n), cfg.pad_id, jnp.int32), logprobs=jnp.zeros((items, n), jnp.float32),
        mask=jnp.zeros((items, n), jnp.int32))
    return _pin_slots(state, batch_sharding)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "batch_sharding"), donate_argnames=("state",))
def prefill_slots(graphdef, params, state: SlotState, prompt_ids, prompt_mask, src, slot, item, rng, *,
                  cfg: SamplerConfig, batch_sharding=None) -> SlotState:
    """Prefills U distinct left-padded prompts and starts R items on them in the given slots.

    Args:
      prompt_ids, prompt_mask: (U, Tp) int32, left-padded (dummy rows: one real pad token).
      src: (R,) int32 the prompt row each item starts from (rows sharing a prompt share its prefill).
      slot: (R,) int32 the slot each item goes to; B (out of range) for a dummy row, whose writes drop.
      item: (R,) int32 each item's output row; I for a dummy row.
      rng: the run's PRNG key; item i samples with fold_in(rng, i).
    Returns:
      The state with those slots holding their item's first token (step 1). `state` is donated.
    """
    model = nnx.merge(graphdef, params)
    u, tp = prompt_ids.shape
    cache = model.init_cache(u, tp)
    hidden, cache = model.forward(prompt_ids, prompt_mask, cache=cache, cache_index=0, kv_mask=prompt_mask)
    logits = model.logits(hidden[:, -1:])[:, 0][src]  # (R, V): left padding puts every prompt's end last
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, item)  # (R,)
    token = _sample_rows(logits, keys, jnp.zeros_like(item), cfg)
    mask = prompt_mask[src]  # (R, Tp)
    s = state
    kv_row = jnp.zeros((len(src), s.kv_mask.shape[1]), jnp.int32).at[:, :tp].set(mask)

    def put(x, value):
        return x.at[slot].set(value, mode="drop")

    state = s.replace(
        # The prompt's cache rows, copied into every slot that starts from it (positions >= Tp hold the
        # slot's previous item, masked out by kv_mask until overwritten).
        cache={k: s.cache[k].at[:, slot, :tp].set(cache[k][:, src].astype(s.cache[k].dtype), mode="drop")
               for k in ("k", "v")},
        kv_mask=put(s.kv_mask, kv_row),
        last=put(s.last, token),
        positions=put(s.positions, jnp.sum(mask, axis=1).astype(jnp.int32)),
        cursor=put(s.cursor, jnp.full_like(slot, tp)),
        step=put(s.step, jnp.ones_like(slot)),
        done=put(s.done, _is_eos(token, cfg.eos_ids) | (cfg.max_new_tokens == 1)),
        item=put(s.item, item),
        keys=put(s.keys, keys),
        tokens=s.tokens.at[item, 0].set(token, mode="drop"),
        logprobs=s.logprobs.at[item, 0].set(token_logprobs(logits, token), mode="drop"),
        mask=s.mask.at[item, 0].set(1, mode="drop"),
    )
    return _pin_slots(state, batch_sharding)


def _decode_one(model, s: SlotState, cfg: SamplerConfig, batch_sharding) -> SlotState:
    """One decode step for every slot; free slots compute too (fixed shapes) but write nothing that
    counts: their outputs drop and their cache rows are masked until the next prefill."""
    rows = jnp.arange(s.last.shape[0])
    kv_mask = s.kv_mask.at[rows, s.cursor].set(1, mode="drop")
    hidden, cache = model.forward(s.last[:, None], jnp.ones_like(s.last)[:, None], positions=s.positions[:, None],
                                  cache=s.cache, cache_index=s.cursor, kv_mask=kv_mask)
    logits = model.logits(hidden)[:, 0]  # (B, V)
    token = jnp.where(s.done, cfg.pad_id, _sample_rows(logits, s.keys, s.step, cfg))
    logprob = token_logprobs(logits, token)
    out = jnp.where(s.done, s.tokens.shape[0], s.item)  # the row each slot writes; I = dropped
    live = ~s.done
    step = s.step + live
    new = s.replace(
        cache=cache,
        kv_mask=kv_mask,
        last=token,
        positions=s.positions + live,
        cursor=s.cursor + live,
        step=step,
        done=s.done | _is_eos(token, cfg.eos_ids) | (step >= cfg.max_new_tokens),
        tokens=s.tokens.at[out, s.step].set(token, mode="drop"),
        logprobs=s.logprobs.at[out, s.step].set(logprob, mode="drop"),
        mask=s.mask.at[out, s.step].set(1, mode="drop"),
    )
    return _pin_slots(new, batch_sharding)


# The state is donated (above all its L x B x S x K x H x 2 cache): the chunk runs in the caller's buffers.
@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "length", "chunk_steps", "batch_sharding"),
                   donate_argnames=("state",))
def decode_chunk(graphdef, params, state: SlotState, free_target, *, cfg: SamplerConfig, length: int,
                 chunk_steps: int, batch_sharding=None) -> tuple[SlotState, jax.Array]:
    """Decodes at most `chunk_steps` steps, stopping early once `free_target` (traced) or all slots are free.

    Attention reads cache positions [0, length) only: the caller picks `length` (static: one program per
    length bucket) to cover every running slot's cursor + chunk_steps - 1. `state` is donated.
    Returns the state and the slots' progress, (3, B) int32 rows done, cursor, step: what the host loop
    reads, in one transfer.
    """
    model = nnx.merge(graphdef, params)
    full = state.cache["k"].shape[2]
    sub = state.replace(cache={k: v[:, :, :length] for k, v in state.cache.items()},
                        kv_mask=state.kv_mask[:, :length]) if length < full else state

    def running(carry):
        s, i = carry
        free = jnp.sum(s.done)
        return (i < chunk_steps) & (free < free_target) & (free < s.done.shape[0])

    sub, _ = jax.lax.while_loop(running, lambda c: (_decode_one(model, c[0], cfg, batch_sharding), c[1] + 1),
                                (sub, jnp.array(0, jnp.int32)))
    progress = jnp.stack([sub.done.astype(jnp.int32), sub.cursor, sub.step])
    if length == full:
        return sub, progress
    put = lambda whole, part: jax.lax.dynamic_update_slice(whole, part, (0,) * whole.ndim)  # noqa: E731
    return sub.replace(cache={k: put(state.cache[k], sub.cache[k]) for k in ("k", "v")},
                       kv_mask=put(state.kv_mask, sub.kv_mask)), progress


# ------------------------------------------------------------------------------------------ host loop
def _pow2(n: int, cap: int) -> int:
    return min(cap, 1 << max(n - 1, 0).bit_length())


def _refill_batch(prompts, take, free, slots: int, items: int, pad_id: int, cap: int):
    """Host arrays for one `prefill_slots`: the distinct prompts among `take` (item indices) left-padded to
    their bucket, and per refilled row its prompt row, slot and item, padded to power-of-two rows."""
    rows = _pow2(len(take), slots)
    distinct: dict[tuple, int] = {}
    src = np.zeros(rows, np.int32)
    for r, i in enumerate(take):
        src[r] = distinct.setdefault(tuple(prompts[i]), len(distinct))
    tp = prompt_bucket(max(len(p) for p in distinct), cap)
    u = _pow2(len(distinct), rows)
    ids, mask = np.full((u, tp), pad_id, np.int32), np.zeros((u, tp), np.int32)
    mask[:, -1] = 1  # dummy prompts: one real pad token, so no row attends to nothing
    for p, r in distinct.items():
        ids[r, tp - len(p):] = p
        mask[r] = np.arange(tp) >= tp - len(p)
    slot = np.full(rows, slots, np.int32)
    item = np.full(rows, items, np.int32)
    slot[:len(take)], item[:len(take)] = free[:len(take)], take
    return ids, mask, src, slot, item


def generate_slots(model, prompts: list[list[int]], cfg: SamplerConfig, rng, *, engine: EngineConfig = EngineConfig(),
                   batch_sharding: NamedSharding | None = None, stats: dict | None = None,
                   prompt_cap: int | None = None) -> dict[str, jax.Array]:
    """Generates one completion per prompt with the slot engine.

    Args:
      model: a `Transformer` (parameters may be sharded on a mesh).
      prompts: I token-id lists, any lengths (each non-empty, in the vocabulary); repeated prompts (a
        group's samples) next to each other share their prefill when they start in the same refill. In a
        multi-process run every process passes the same (global) list.
      cfg: the sampler config; rng: a PRNG key (item i samples with fold_in(rng, i)).
      engine: slots and scheduling.
      batch_sharding: where the slot rows live (e.g. NamedSharding(mesh, P('data'))); slots must divide.
      stats: if given, filled with counts (`decode_steps`, `chunks`, `prefills`, `prefill_rows`,
        `prefill_prompts`) for benchmarks and tests.
      prompt_cap: prompt buckets at most this long (and at least the longest prompt); default the
        model's max_position_embeddings.
    Returns:
      dict of device arrays in prompt order, as `generation.generate_batch` returns them: `tokens` (I, N)
      int32 (pad after EOS), `logprobs` (I, N) fp32, `mask` (I, N) int32 (1 up to and including EOS).
    """
    b, n = engine.slots, cfg.max_new_tokens
    cap = min(model.config.max_position_embeddings, prompt_cap or model.config.max_position_embeddings)
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or not all(prompts):
        raise JaxrlError("generate_slots needs at least one prompt, each with at least one token")
    shards = _row_shards(batch_sharding)
    if b % shards:
        raise JaxrlError(f"slot engine: slots={b} must be a multiple of the {shards} row shards of the generation "
                         "mesh (generation.mesh.data); change generation.slots")
    length = prompt_bucket(max(map(len, prompts)), cap) + n
    graphdef, params = nnx.split(model)
    state = init_state(graphdef, params, rng, slots=b, length=length, items=len(prompts), cfg=cfg,
                       batch_sharding=batch_sharding)
    counts = {"decode_steps": 0, "chunks": 0, "prefills": 0, "prefill_rows": 0, "prefill_prompts": 0}
    queue = deque(range(len(prompts)))
    done, cursor, step = np.ones(b, bool), np.zeros(b, np.int64), np.zeros(b, np.int64)
    while True:
        free = np.flatnonzero(done)
        if queue and len(free):
            take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
            ids, mask, src, slot, item = _refill_batch(prompts, take, free, b, len(prompts), cfg.pad_id, cap)
            state = prefill_slots(graphdef, params, state, ids, mask, src, slot, item, rng, cfg=cfg,
                                  batch_sharding=batch_sharding)
            counts["prefills"] += 1
            counts["prefill_rows"] += len(take)
            counts["prefill_prompts"] += len({tuple(prompts[i]) for i in take})
            # The refilled slots' progress as the prefill set it, kept on the host until the chunk's read
            # (an item that ended on its first token counts as running until then: the chunk skips it).
            filled = free[:len(take)]
            done[filled], cursor[filled], step[filled] = False, ids.shape[1], 1
        if done.all():
            break  # nothing running, nothing queued
        reach = int(cursor[~done].max()) + engine.chunk_steps  # positions the chunk may read, at most
        chunk_len = min(length, -(-reach // engine.length_block) * engine.length_block)
        target = engine.refill_threshold if queue else b
        before = step.copy()
        state, progress = decode_chunk(graphdef, params, state, np.int32(target), cfg=cfg, length=chunk_len,
                                       chunk_steps=engine.chunk_steps, batch_sharding=batch_sharding)
        # Gathered to every process (multi-process runs): every host loop takes the same next decision.
        done, cursor, step = to_host(progress).astype(np.int64)
        done = done.astype(bool)
        counts["chunks"] += 1
        counts["decode_steps"] += int((step - before).max())
    if stats is not None:
        stats.update(counts)
    out = {"tokens": state.tokens, "logprobs": state.logprobs, "mask": state.mask}
    if batch_sharding is not None and len(prompts) % shards == 0:
        out = jax.device_put(out, batch_sharding)  # rows where the caller's prompt rows are
    return out


def generate_padded(model, prompt_ids, prompt_mask, cfg: SamplerConfig, rng, *, engine: EngineConfig,
                    batch_sharding: NamedSharding | None = None) -> dict[str, jax.Array]:
    """`generation.generate_batch` through the slot engine: (B, Tp) left-padded prompts in (host arrays, or
    global arrays gathered to every process), the same (B, N) `tokens`, `logprobs`, `mask` out (PPO's
    rollouts; identical rows share a prefill)."""
    ids, mask = to_host(prompt_ids), to_host(prompt_mask).astype(bool)
    prompts = [row[m].tolist() for row, m in zip(ids, mask)]
    # Prompt buckets no wider than the batch's own padding, as the static sampler runs at exactly that width.
    return generate_slots(model, prompts, cfg, rng, engine=engine, batch_sharding=batch_sharding,
                          prompt_cap=ids.shape[1])


def generate(model, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, eos_ids=None, seed: int = 0, *, slots: int = 32,
             batch_sharding: NamedSharding | None = None, rng: jax.Array | None = None) -> list[list[int]]:
    """`generation.generate` through the slot engine (same arguments; `slots` instead of `batch_size`):
    one list of generated ids per prompt, ending with EOS when one was produced."""
    cfg = sampler_config(model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         top_k=top_k, eos_ids=eos_ids)
    _check_prompts(model.config, prompts, max_new_tokens)
    rng = jax.random.key(seed) if rng is None else rng
    slots = min(slots, batch_bucket(len(prompts), _row_shards(batch_sharding)))  # no more slots than prompts need
    out = generate_slots(model, prompts, cfg, rng, engine=EngineConfig(slots=slots), batch_sharding=batch_sharding)
    tokens, valid = to_host(out["tokens"]), to_host(out["mask"])
    return [tokens[r, :valid[r].sum()].tolist() for r in range(len(prompts))]
