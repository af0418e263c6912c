"""Step 1, supervised fine-tuning: the causal-LM loss on response tokens.

Every loss here returns `(loss, metrics)` with `metrics["weight"]` = the local denominator it averaged
over, so the shared data-parallel step can combine devices as sum(loss * weight) / sum(weight) and get
exactly the one-device loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits, tokens):
    """Log-probability of each next token under the model.

        out[b, t] = log softmax(logits[b, t])[tokens[b, t + 1]]      for t in [0, T - 1)

    Args:
      logits: (B, T, V) the model's output at every position (any float dtype; computed in fp32).
      tokens: (B, T) the token ids the logits were computed on.
    Returns:
      (B, T - 1) fp32: log p(tokens[:, t + 1] | tokens[:, :t + 1]).
    """
    logits = logits[:, :-1].astype(jnp.float32)  # (B, T-1, V)
    targets = tokens[:, 1:]  # (B, T-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    # logsumexp rather than a full log_softmax: no (B, T, V) temporary beyond the logits themselves
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sft_loss(model, batch):
    """Masked token-mean causal-LM cross-entropy.

        w[b, t]  = loss_mask[b, t + 1]                      (token t + 1 is a target)
        loss     = -sum_{b,t} w[b, t] log p(x[b, t + 1] | x[b, :t + 1]) / sum_{b,t} w[b, t]
        accuracy = sum_{b,t} w[b, t] [argmax logits[b, t] == x[b, t + 1]] / sum_{b,t} w[b, t]

    Args:
      model: a `Transformer`, `model(input_ids, attention_mask) -> logits (B, T, V)`.
      batch: `input_ids`, `attention_mask`, `loss_mask` (B, T); packing keys, if any, are not used;
        optional `valid` (B,): 0 marks a padding row of an evaluation batch, whose tokens then do not count.
    Returns:
      loss (scalar fp32) and metrics `loss`, `accuracy`, `weight` (number of target tokens).
    """
    ids = batch["input_ids"]
    segments = batch.get("segment_ids")  # packed rows: several examples, each attending to itself only
    logits = model(ids, batch["attention_mask"], positions=batch.get("positions"), segment_ids=segments)
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32)  # (B, T-1)
    if segments is not None:  # no target across an example boundary
        weights = weights * (segments[:, 1:] == segments[:, :-1])
    if "valid" in batch:
        weights = weights * batch["valid"][:, None]
    count = weights.sum()
    denom = jnp.maximum(count, 1.0)  # an all-masked local slice: loss 0 with weight 0, not NaN
    logp = token_logprobs(logits, ids)
    loss = -(logp * weights).sum() / denom
    correct = (jnp.argmax(logits[:, :-1], axis=-1) == ids[:, 1:]).astype(jnp.float32)
    metrics = {
        "loss": loss,
        "accuracy": (correct * weights).sum() / denom,
        "weight": count,
    }
    return loss, metrics
