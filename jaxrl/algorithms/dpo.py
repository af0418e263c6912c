"""Offline preference training: DPO and its common variants as small pure functions.

A preference batch holds B chosen and B rejected rows (prompt + response, left- or right-padded).
`sequence_logprobs` reduces each row to the summed log-probability of its response tokens and their
count; `dpo_loss` turns the four (B,) vectors (policy and reference, chosen and rejected) into the
loss. Every loss returns `(loss, metrics)` with `metrics["weight"]` = the number of pairs it averaged
over, so the data-parallel step's sum(loss * weight) / sum(weight) equals the one-device loss.

Losses, with h = (log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r)) and eps the label
smoothing:

    sigmoid   -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)      DPO (Rafailov et al. 2023, eq. 7);
                                                                        eps > 0: conservative DPO (cDPO,
                                                                        Mitchell 2023, eq. 3)
    ipo       (h - 1 / (2 beta))^2                                      IPO (Azar et al. 2023, eq. 17)
    hinge     max(0, 1 - beta h)                                        SLiC hinge (Zhao et al. 2023)
    simpo     -log sigma(beta (a_c - a_r) - gamma),  a = log pi(y) / |y|  SimPO (Meng et al. 2024, eq. 6),
                                                                        no reference model

IPO uses length-normalised log-probs (each sum divided by its token count, for the policy and the
reference), as TRL's `DPOTrainer` does (`concatenated_forward` divides `all_logps` by the response
length when `loss_type == "ipo"`), so a run moved from TRL keeps its beta; the IPO paper's eq. 17 is
written for whole-sequence log-probs, which `loss_type="ipo"` gives when every length is 1.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from jaxrl.algorithms.sft import head_stats

LossType = Literal["sigmoid", "ipo", "hinge", "simpo"]
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")


def sequence_logprobs(model, input_ids, attention_mask, loss_mask):
    """Summed log-probability of each row's response tokens, and their number.

        w[b, t]      = loss_mask[b, t + 1]                       (token t + 1 is a response token)
        logp[b]      = sum_t w[b, t] log p(x[b, t + 1] | x[b, :t + 1])
        n_tokens[b]  = sum_t w[b, t]

    Chosen and rejected rows go through together when the caller concatenates them to (2B, T): one
    forward, one compiled program. The LM head runs through the shared `sft.head_stats`, a chunk of
    positions at a time, so no (B, T, V) fp32 logits exist.

    Args:
      model: a `Transformer` with an LM head (`model.features`, `model.logits`).
      input_ids, attention_mask, loss_mask: (B, T); loss_mask is 1 on response tokens only.
    Returns:
      logp (B,) fp32 and n_tokens (B,) fp32.
    """
    hidden = model.features(input_ids, attention_mask)  # (B, T, E)
    weights = loss_mask[:, 1:].astype(jnp.float32)  # (B, T-1)
    logp = head_stats(model, hidden[:, :-1], input_ids[:, 1:])["logp"]  # (B, T-1)
    return (logp * weights).sum(axis=-1), weights.sum(axis=-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, chosen_tokens, rejected_tokens,
             loss_type: LossType = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
             simpo_gamma: float = 0.5, valid=None):
    """Preference loss of one batch of pairs (formulas in the module docstring).

    Args:
      policy_chosen, policy_rejected: (B,) summed response log-probs under the policy (gradients flow).
      ref_chosen, ref_rejected: (B,) the same under the frozen reference (treated as constants; not
        read by `simpo`, which may be given zeros).
      chosen_tokens, rejected_tokens: (B,) response token counts (for `ipo` and `simpo`).
      loss_type: 'sigmoid', 'ipo', 'hinge' or 'simpo'.
      beta: the inverse temperature beta (IPO's tau).
      label_smoothing: eps of conservative DPO, the probability that a label is flipped (`sigmoid`).
      simpo_gamma: SimPO's target reward margin gamma.
      valid: optional (B,) row weights, 0 on the padding rows of an evaluation batch: every mean is then
        sum_b valid_b x_b / sum_b valid_b.
    Returns:
      loss (scalar fp32, mean over pairs) and metrics `loss`, `rewards/chosen`, `rewards/rejected`
      (beta (log pi - log pi_ref) of the log-probs the loss used; for `simpo` beta a, reference-free),
      `rewards/accuracy` (share of pairs with chosen reward > rejected), `rewards/margin`,
      `logps/chosen`, `logps/rejected` (summed policy log-probs), all means over pairs, and `weight`
      (the number of pairs; of real pairs with `valid`).
    """
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    pc, pr = f32(policy_chosen), f32(policy_rejected)
    rc, rr = jax.lax.stop_gradient(f32(ref_chosen)), jax.lax.stop_gradient(f32(ref_rejected))
    # An empty response (0 tokens) divides by 1: its sum is 0, so its average is 0, not NaN.
    nc, nr = jnp.maximum(f32(chosen_tokens), 1.0), jnp.maximum(f32(rejected_tokens), 1.0)
    if loss_type == "simpo":
        chosen_reward, rejected_reward = beta * pc / nc, beta * pr / nr
        losses = -jax.nn.log_sigmoid(chosen_reward - rejected_reward - simpo_gamma)
    elif loss_type in ("sigmoid", "ipo", "hinge"):
        if loss_type == "ipo":  # length-normalised, as TRL (module docstring)
            pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
        chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)
        h = (pc - rc) - (pr - rr)  # (B,)
        if loss_type == "sigmoid":
            losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                      - label_smoothing * jax.nn.log_sigmoid(-beta * h))
        elif loss_type == "ipo":
            losses = jnp.square(h - 1.0 / (2.0 * beta))
        else:
            losses = jax.nn.relu(1.0 - beta * h)
    else:
        raise ValueError(f"dpo loss must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    if valid is None:
        mean, weight = jnp.mean, jnp.asarray(losses.shape[0], jnp.float32)
    else:
        valid = f32(valid)
        weight = valid.sum()
        mean = lambda x: (x * valid).sum() / jnp.maximum(weight, 1.0)  # noqa: E731
    loss = mean(losses)
    chosen_reward, rejected_reward = jax.lax.stop_gradient((chosen_reward, rejected_reward))
    metrics = {
        "loss": loss,
        "rewards/chosen": mean(chosen_reward),
        "rewards/rejected": mean(rejected_reward),
        "rewards/accuracy": mean((chosen_reward > rejected_reward).astype(jnp.float32)),
        "rewards/margin": mean(chosen_reward - rejected_reward),
        "logps/chosen": mean(jax.lax.stop_gradient(f32(policy_chosen))),
        "logps/rejected": mean(jax.lax.stop_gradient(f32(policy_rejected))),
        "weight": weight,
    }
    return loss, metrics


PAIR_KEYS = tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "loss_mask"))
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def pair_logprobs(model, batch):
    """Summed response log-probs and token counts of a batch of pairs, in one concatenated forward.

    The B chosen and B rejected rows (same padded length T) go through `sequence_logprobs` as one (2B, T)
    batch: one program for both halves, as TRL's `concatenated_forward`.

    Args:
      model: a causal-LM `Transformer`.
      batch: `PAIR_KEYS`, each (B, T): `{chosen,rejected}_{input_ids,attention_mask,loss_mask}`.
    Returns:
      (chosen logp, rejected logp, chosen tokens, rejected tokens), each (B,) fp32.
    """
    b = batch["chosen_input_ids"].shape[0]
    both = [jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
            for k in ("input_ids", "attention_mask", "loss_mask")]
    logp, n = sequence_logprobs(model, *both)  # (2B,), (2B,)
    return logp[:b], logp[b:], n[:b], n[b:]


def reference_logprobs(model, batch):
    """The frozen reference's (chosen, rejected) summed response log-probs, each (B,) fp32."""
    chosen, rejected, _, _ = pair_logprobs(model, batch)
    return chosen, rejected


def preference_loss(model, batch, *, loss_type: LossType = "sigmoid", beta: float = 0.1,
                    label_smoothing: float = 0.0, simpo_gamma: float = 0.5):
    """The policy's loss on a batch of pairs: `pair_logprobs` under `model`, then `dpo_loss`.

    Args:
      model: the policy (`Transformer`); gradients flow through its log-probs.
      batch: `PAIR_KEYS` (B, T); `REF_KEYS` (B,) fp32, the reference's summed log-probs computed outside
        the step (not read by `simpo`, which may omit them); optional `valid` (B,).
      loss_type, beta, label_smoothing, simpo_gamma: as `dpo_loss`.
    Returns:
      `dpo_loss`'s (loss, metrics).
    """
    chosen, rejected, n_chosen, n_rejected = pair_logprobs(model, batch)
    if loss_type == "simpo":
        ref_chosen = ref_rejected = jnp.zeros_like(chosen)
    else:
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens=n_chosen, rejected_tokens=n_rejected,
                    loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
                    valid=batch.get("valid"))
