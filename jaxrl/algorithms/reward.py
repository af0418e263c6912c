"""Step 2, reward-model training: the pairwise (Bradley-Terry) ranking loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pair_scores(model, batch):
    """Scores (B,), (B,) of the chosen and rejected sequences, read at each one's last real token.

    When both sides have the same padded length they go through the model as one (2B, T) batch: one
    forward instead of two, and the same compiled program for both halves.
    """
    chosen_ids, chosen_mask = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    rejected_ids, rejected_mask = batch["rejected_input_ids"], batch["rejected_attention_mask"]
    if chosen_ids.shape == rejected_ids.shape:
        b = chosen_ids.shape[0]
        scores = model.sequence_score(
            jnp.concatenate([chosen_ids, rejected_ids], axis=0),
            jnp.concatenate([chosen_mask, rejected_mask], axis=0),
        )
        return scores[:b], scores[b:]
    return model.sequence_score(chosen_ids, chosen_mask), model.sequence_score(rejected_ids, rejected_mask)


def reward_loss(model, batch, *, required_margin: float = 0.0):
    """Pairwise ranking loss on sequence scores.

        r_c, r_r = score(chosen), score(rejected)           (value at the last real token, its EOS)
        loss     = mean_b -log sigmoid(r_c - r_r - m)       (m = required_margin, `reward.margin`)
        accuracy = mean_b [r_c > r_r]

    where mean_b is over the rows, or, when the batch has `valid` (B,) (an evaluation batch whose padding
    rows are 0), sum_b valid_b x_b / sum_b valid_b.

    Args:
      model: a `ScoreModel` (`model.sequence_score(ids, mask) -> (B,)`).
      batch: `chosen_input_ids`, `chosen_attention_mask`, `rejected_input_ids`, `rejected_attention_mask`;
        optional `valid` (B,).
    Returns:
      loss (scalar fp32) and metrics `loss`, `accuracy`, `chosen_score`, `rejected_score`, `margin`
      (means over rows) and `weight` (number of rows, real rows with `valid`).
    """
    chosen, rejected = pair_scores(model, batch)
    chosen, rejected = chosen.astype(jnp.float32), rejected.astype(jnp.float32)
    margin = chosen - rejected  # (B,)
    valid = batch.get("valid")
    if valid is None:
        mean, weight = jnp.mean, jnp.asarray(margin.shape[0], jnp.float32)
    else:
        weight = valid.sum()
        mean = lambda x: (x * valid).sum() / jnp.maximum(weight, 1.0)  # noqa: E731
    loss = -mean(jax.nn.log_sigmoid(margin - required_margin))
    metrics = {
        "loss": loss,
        "accuracy": mean((margin > 0).astype(jnp.float32)),
        "chosen_score": mean(chosen),
        "rejected_score": mean(rejected),
        "margin": mean(margin),
        "weight": weight,
    }
    return loss, metrics
