"""Step 1, supervised fine-tuning: the causal-LM loss on response tokens.

Every loss here returns `(loss, metrics)` with `metrics["weight"]` = the local denominator it averaged
over, so the shared data-parallel step can combine devices as sum(loss * weight) / sum(weight) and get
exactly the one-device loss.

The LM head and its log-softmax run through `head_stats`, a chunk of positions and/or of the
vocabulary at a time, so no (B, T, V) fp32 logits tensor exists for the whole batch (a 128k
vocabulary costs one chunk), and under ZeRO-3 no device gathers the whole LM head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _picked_logprobs(logits, targets):
    """(..., V) logits, (...) targets -> (...) log softmax(logits)[target], in fp32."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    # logsumexp rather than a full log_softmax: no (..., V) temporary beyond the logits themselves
    return picked - jax.nn.logsumexp(logits, axis=-1)


def token_logprobs(logits, tokens):
    """Log-probability of each next token under the model.

        out[b, t] = log softmax(logits[b, t])[tokens[b, t + 1]]      for t in [0, T - 1)

    Args:
      logits: (B, T, V) the model's output at every position (any float dtype; computed in fp32).
      tokens: (B, T) the token ids the logits were computed on.
    Returns:
      (B, T - 1) fp32: log p(tokens[:, t + 1] | tokens[:, :t + 1]).
    """
    return _picked_logprobs(logits[:, :-1], tokens[:, 1:])


def token_entropy(logits):
    """(..., V) -> (...) fp32 entropy of each distribution: H = logsumexp(z) - sum_v softmax(z)_v z_v."""
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(probs * logits, axis=-1)


def head_stats(model, hidden, targets, *, entropy: bool = False, accuracy: bool = False,
               chunk: int | None = None, vocab_chunk: int | None = None) -> dict:
    """Per-position statistics of the next-token distributions, the LM head applied a chunk at a time.

        z[b, t]       = model.logits(hidden[b, t])                               (V,) fp32
        logp[b, t]    = z[b, t, targets[b, t]] - logsumexp(z[b, t])
        entropy[b, t] = logsumexp(z[b, t]) - sum_v softmax(z[b, t])_v z[b, t, v]   (with `entropy`)
        correct[b, t] = [argmax_v z[b, t, v] == targets[b, t]]                     (with `accuracy`)

    The T positions are cut into ceil(T / chunk) chunks (the last one padded, its padding dropped) that
    `lax.map` runs one after the other, each under `jax.checkpoint`: a chunk's (B, chunk, V) logits exist
    only while that chunk is computed, in the forward and again in the backward, so the peak is one
    chunk's logits and not (B, T, V). The vocabulary may be cut the same way (`vocab_stats`), so only a
    (B, chunk, vocab_chunk) block of logits, and one slice of the LM head, exists at a time. Each
    position's numbers are those of the unchunked computation (up to rounding in the combination).

    Args:
      model: a `Transformer` with an LM head (`model.logits`, `model.vocab_logits`).
      hidden: (B, T, E) its final hidden states at the positions to score.
      targets: (B, T) the token each position predicts.
      entropy, accuracy: also return `entropy` (fp32) and `correct` (fp32 0/1).
      chunk: positions per chunk; None: `model.logits_chunk`; 0 or >= T: one pass over all T (no map,
        no checkpoint: the fastest for small vocabularies).
      vocab_chunk: vocabulary entries per chunk; None: `model.vocab_chunk`; 0 or >= V: the whole
        vocabulary at once.
    Returns:
      {'logp': (B, T) fp32, and 'entropy', 'correct' (B, T) when asked for}.
    """
    chunk = model.logits_chunk if chunk is None else chunk
    vocab_chunk = model.vocab_chunk if vocab_chunk is None else vocab_chunk
    b, t, e = hidden.shape

    def stats(h, y):  # (B, c, E), (B, c) -> dict of (B, c)
        if 0 < vocab_chunk < model.config.vocab_size:
            return vocab_stats(model, h, y, vocab_chunk, entropy=entropy, accuracy=accuracy)
        logits = model.logits(h)  # (B, c, V) fp32
        out = {"logp": _picked_logprobs(logits, y)}
        if entropy:
            out["entropy"] = token_entropy(logits)
        if accuracy:
            out["correct"] = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
        return out

    if chunk <= 0 or chunk >= t:
        return stats(hidden, targets)
    n = -(-t // chunk)
    pad = n * chunk - t
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    h = hidden.reshape(b, n, chunk, e).swapaxes(0, 1)  # (n, B, c, E)
    y = targets.reshape(b, n, chunk).swapaxes(0, 1)  # (n, B, c)
    out = jax.lax.map(lambda xs: jax.checkpoint(stats)(*xs), (h, y))  # each (n, B, c)
    return {k: v.swapaxes(0, 1).reshape(b, n * chunk)[:, :t] for k, v in out.items()}


def vocab_stats(model, hidden, targets, size: int, *, entropy: bool = False, accuracy: bool = False) -> dict:
    """`head_stats`' numbers with the vocabulary cut into K = ceil(V / size) slices of `size` entries.

    Slice k covers entries [k size, (k + 1) size); the last one is read from V - size on, its entries
    below k size masked out (-inf), so any `size` works. `lax.map` runs the slices one after the other,
    each under `jax.checkpoint` (its (..., size) logits, and under ZeRO-3 its gathered slice of the LM
    head, exist only while it is computed, forward and backward), and each returns per position
        lse_k = logsumexp_{v in k} z_v,   s_k = sum_{v in k} softmax_k(z)_v z_v,   m_k = max_{v in k} z_v,
    its argmax a_k, and z at the target when the target is in slice k. They combine exactly:
        logsumexp z = logsumexp_k lse_k,   entropy = logsumexp z - sum_k exp(lse_k - logsumexp z) s_k,
        argmax z    = a_k at the first k with the largest m_k (the first maximum, as `jnp.argmax`).

    Args:
      model: a `Transformer` (`model.vocab_logits`); hidden: (..., E); targets: (...) int.
      size: entries per slice, 0 < size < V.
    Returns:
      {'logp', and 'entropy', 'correct' when asked for}, each (...) fp32.
    """
    vocab = model.config.vocab_size
    n = -(-vocab // size)

    def one(k):
        start = jnp.minimum(k * size, vocab - size)
        ids = start + jnp.arange(size)
        valid = ids >= k * size  # the overlap of a last slice read from V - size was counted before
        z = jnp.where(valid, model.vocab_logits(hidden, start, size), -jnp.inf)  # (..., size) fp32
        lse = jax.nn.logsumexp(z, axis=-1)
        inside = (targets >= k * size) & (targets < (k + 1) * size)
        at = jnp.clip(targets - start, 0, size - 1)
        out = {"lse": lse, "picked": jnp.where(inside, jnp.take_along_axis(z, at[..., None], axis=-1)[..., 0], 0.0)}
        if entropy:
            # masked entries: p = 0 times 0 rather than times -inf (whose gradient would be NaN)
            out["s"] = jnp.sum(jnp.exp(z - lse[..., None]) * jnp.where(valid, z, 0.0), axis=-1)
        if accuracy:
            out["max"] = jnp.max(z, axis=-1)
            out["arg"] = start + jnp.argmax(z, axis=-1)
        return out

    parts = jax.lax.map(jax.checkpoint(one), jnp.arange(n))  # each (K, ...)
    lse = jax.nn.logsumexp(parts["lse"], axis=0)
    out = {"logp": parts["picked"].sum(axis=0) - lse}
    if entropy:
        out["entropy"] = lse - jnp.sum(jnp.exp(parts["lse"] - lse) * parts["s"], axis=0)
    if accuracy:
        best = jnp.argmax(parts["max"], axis=0)  # first slice holding the maximum
        arg = jnp.take_along_axis(parts["arg"], best[None], axis=0)[0]
        out["correct"] = (arg == targets).astype(jnp.float32)
    return out


def sft_loss(model, batch):
    """Masked token-mean causal-LM cross-entropy.

        w[b, t]  = loss_mask[b, t + 1]                      (token t + 1 is a target)
        loss     = -sum_{b,t} w[b, t] log p(x[b, t + 1] | x[b, :t + 1]) / sum_{b,t} w[b, t]
        accuracy = sum_{b,t} w[b, t] [argmax logits[b, t] == x[b, t + 1]] / sum_{b,t} w[b, t]

    Args:
      model: a `Transformer` (its final hidden states and LM head; see `head_stats`).
      batch: `input_ids`, `attention_mask`, `loss_mask` (B, T); packing keys, if any, are not used;
        optional `valid` (B,): 0 marks a padding row of an evaluation batch, whose tokens then do not count.
    Returns:
      loss (scalar fp32) and metrics `loss`, `accuracy`, `weight` (number of target tokens).
    """
    ids = batch["input_ids"]
    segments = batch.get("segment_ids")  # packed rows: several examples, each attending to itself only
    hidden, _ = model.forward(ids, batch["attention_mask"], positions=batch.get("positions"), segment_ids=segments)
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32)  # (B, T-1)
    if segments is not None:  # no target across an example boundary
        weights = weights * (segments[:, 1:] == segments[:, :-1])
    if "valid" in batch:
        weights = weights * batch["valid"][:, None]
    count = weights.sum()
    denom = jnp.maximum(count, 1.0)  # an all-masked local slice: loss 0 with weight 0, not NaN
    stats = head_stats(model, hidden[:, :-1], ids[:, 1:], accuracy=True)
    loss = -(stats["logp"] * weights).sum() / denom
    metrics = {
        "loss": loss,
        "accuracy": (stats["correct"] * weights).sum() / denom,
        "weight": count,
    }
    return loss, metrics
