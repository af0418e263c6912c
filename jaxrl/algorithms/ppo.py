"""Step 3, PPO (InstructGPT / DeepSpeed-Chat step 3): the math as small pure functions.

Layout the step code follows. A rollout row is a left-padded prompt (P columns) followed by the
generated response (R columns, right-padded after its EOS). Position t's logits score token t + 1, so
the response's per-token quantities come from positions `[P - 1, P + R - 1)`, shape (B, R): log-probs
of actor, old actor and reference; critic values `critic(seq)[:, P - 1:-1]` (the value of the state
just before each response token); and `mask = response attention mask` (1 on every generated token
up to and including EOS, 0 after). Every function below takes such (B, R) arrays and a 0/1 `mask`;
masked positions are ignored.

Every loss returns `(loss, metrics)` with `metrics["weight"]` = the number of tokens it averaged over,
so the data-parallel step's sum(loss * weight) / sum(weight) equals the one-device loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxrl.algorithms.sft import head_stats, sft_loss, token_entropy

# ---------------------------------------------------------------------------------------------------
# Masked statistics


def masked_sum(x, mask, axis=None):
    """sum(x * mask) over `axis` (all axes by default)."""
    return jnp.sum(x * mask, axis=axis)


def masked_mean(x, mask, axis=None):
    """sum(x * mask) / sum(mask) over `axis`; 0 where the mask is empty (not NaN)."""
    mask = mask.astype(jnp.float32)
    count = jnp.sum(mask, axis=axis)
    return masked_sum(x.astype(jnp.float32), mask, axis) / jnp.where(count > 0, count, 1.0)


def masked_var(x, mask, unbiased=False):
    """Variance of the masked entries: mean((x - mean)^2) over them; with `unbiased`, times n / (n - 1)."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        n = jnp.sum(mask.astype(jnp.float32))
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    return var


def whiten(x, mask, shift_mean=True, eps=1e-8):
    """Masked whitening over all masked entries of the batch (not per row).

        y = (x - mean) / sqrt(var + eps)        (+ mean back when not shift_mean)

    mean and var are taken over the entries where mask = 1; masked entries of y are 0. Inside a
    data-parallel shard_map these are local statistics: whiten in the rollout phase, under plain jit,
    so that GSPMD computes them over the global batch.
    """
    x = x.astype(jnp.float32)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return jnp.where(mask.astype(bool), y, 0.0)


# ---------------------------------------------------------------------------------------------------
# Rewards and advantages


def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence").

        k1 = log pi - log pi_ref                      (unbiased, can be negative)
        k3 = (r - 1) - log r,  r = pi_ref / pi = exp(log pi_ref - log pi)   (unbiased, always >= 0)

    Args:
      logprobs, ref_logprobs: (B, T) log-probabilities of the sampled tokens under pi and pi_ref.
      estimator: 'k1' or 'k3'.
    Returns:
      (B, T) fp32, not masked.
    """
    log_ratio = ref_logprobs.astype(jnp.float32) - logprobs.astype(jnp.float32)  # log r
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return jnp.expm1(log_ratio) - log_ratio
    raise ValueError(f"ppo KL estimator must be 'k1' or 'k3'; got {estimator!r}")


def last_valid_onehot(mask):
    """(B, T) 1.0 at each row's last position with mask = 1; an all-zero row stays all zero."""
    mask = mask.astype(jnp.float32)
    t = mask.shape[1]
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # (B,)
    return jax.nn.one_hot(last, t, dtype=jnp.float32) * mask


def shaped_rewards(score, kl, mask, *, kl_coef, clip_reward, ended=None, truncated_penalty=None):
    """Per-token PPO rewards: a KL penalty on every response token plus the sequence score at the end.

        s_b      = truncated_penalty  if truncated_penalty is not None and not ended[b]  else score[b]
        r[b, t]  = -kl_coef * kl[b, t] * mask[b, t]  +  [t = last_b] * clip(s_b, -clip_reward, clip_reward)

    where last_b is row b's last position with mask = 1 (its EOS, or its last token when the response
    was cut at the maximum length). Truncated rows (no EOS, `ended = False`) keep their score at their
    last token by default, as in DeepSpeed-Chat; `truncated_penalty` replaces their score by a fixed
    value (clipped like a score, so |score part| <= clip_reward always holds). A row with an empty
    mask gets no reward at all.

    Args:
      score: (B,) reward-model score of each full sequence.
      kl: (B, T) per-token KL estimate (see `kl_penalty`).
      mask: (B, T) 1 on response tokens.
      kl_coef: scalar KL coefficient (may be a traced value from the adaptive controller).
      clip_reward: the score is clipped to [-clip_reward, clip_reward].
      ended: (B,) bool, whether the row's response ended with EOS; needed with `truncated_penalty`.
      truncated_penalty: score given to rows that did not end; None keeps their score.
    Returns:
      (B, T) fp32 rewards, 0 where mask = 0.
    """
    score = score.astype(jnp.float32)
    if truncated_penalty is not None:
        if ended is None:
            raise ValueError("shaped_rewards: truncated_penalty needs `ended` (which rows emitted EOS)")
        score = jnp.where(ended, score, jnp.float32(truncated_penalty))
    score = jnp.clip(score, -clip_reward, clip_reward)
    mask = mask.astype(jnp.float32)
    return -kl_coef * kl.astype(jnp.float32) * mask + last_valid_onehot(mask) * score[:, None]


def gae(rewards, values, mask, *, gamma, lam):
    """Generalized advantage estimation (Schulman et al. 2016), a reverse `lax.scan` over time.

    Over the valid steps t (mask = 1) of a row, with t' the next valid step after t:

        delta_t = r_t + gamma * V_t' - V_t
        A_t     = delta_t + gamma * lam * A_t'
        R_t     = A_t + V_t                      (the critic's target)

    and V_t' = A_t' = 0 past the row's last valid step: the episode ends there, both at EOS and when
    the response was cut at the maximum length (no bootstrap from a state that was never generated).
    Masked positions are skipped (for the usual contiguous response mask this is the textbook
    recursion) and get A = R = 0. Rewards and values at masked positions are ignored.

    Args:
      rewards, values, mask: (B, T).
      gamma: discount; lam: GAE lambda.
    Returns:
      advantages, returns: (B, T) fp32.
    """
    rewards, values = rewards.astype(jnp.float32), values.astype(jnp.float32)
    valid = mask.astype(bool)

    def step(carry, xs):  # carry: (next_value, next_adv) (B,), from the next valid step
        next_value, next_adv = carry
        r, v, m = xs
        adv = r + gamma * next_value - v + gamma * lam * next_adv
        adv = jnp.where(m, adv, 0.0)
        carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
        return carry, adv

    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    _, adv = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, valid.T), reverse=True)
    advantages = adv.T  # (B, T)
    returns = jnp.where(valid, advantages + values, 0.0)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------
# Losses


def policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_ratio):
    """PPO clipped surrogate, masked token mean.

        rho   = exp(log pi - log pi_old)
        loss  = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))
        clipfrac  = mean_t [clipped term > unclipped term]
        approx_kl = mean_t (rho_t - 1) - log rho_t                       (k3 of pi_old vs pi)

    Args:
      logprobs: (B, T) under the current policy (gradients flow through these).
      old_logprobs, advantages: (B, T) from the rollout (treated as constants).
      mask: (B, T) 1 on response tokens.
      clip_ratio: eps.
    Returns:
      loss and metrics `policy_loss`, `clipfrac`, `approx_kl`, `weight` (token count).
    """
    old_logprobs = jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    log_ratio = logprobs.astype(jnp.float32) - old_logprobs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {
        "policy_loss": loss,
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(jax.lax.stop_gradient(jnp.expm1(log_ratio) - log_ratio), mask),
        "weight": jnp.sum(mask.astype(jnp.float32)),
    }
    return loss, metrics


def value_loss(values, old_values, returns, mask, *, value_clip):
    """Clipped value loss, masked token mean.

        V_clip = V_old + clip(V - V_old, -value_clip, value_clip)
        loss   = 0.5 * mean_t max((V_t - R_t)^2, (V_clip_t - R_t)^2)
        vf_clipfrac = mean_t [clipped term > unclipped term and |V_t - V_old_t| > value_clip]

    Args:
      values: (B, T) the critic's current values (gradients flow through these).
      old_values, returns: (B, T) from the rollout (treated as constants).
      mask: (B, T) 1 on response tokens.
      value_clip: the clip range.
    Returns:
      loss and metrics `value_loss`, `vf_clipfrac`, `weight` (token count).
    """
    values = values.astype(jnp.float32)
    old_values = jax.lax.stop_gradient(old_values.astype(jnp.float32))
    returns = jax.lax.stop_gradient(returns.astype(jnp.float32))
    clipped_values = old_values + jnp.clip(values - old_values, -value_clip, value_clip)
    unclipped = jnp.square(values - returns)
    clipped = jnp.square(clipped_values - returns)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {
        "value_loss": loss,
        # Inside the clip range V_old + (V - V_old) can round 1 ulp away from V: count only true clips.
        "vf_clipfrac": masked_mean(((clipped > unclipped) & (jnp.abs(values - old_values) > value_clip))
                                   .astype(jnp.float32), mask),
        "weight": jnp.sum(mask.astype(jnp.float32)),
    }
    return loss, metrics


def entropy_from_logits(logits, mask):
    """Masked mean entropy of the next-token distributions.

        H_t = -sum_v p_tv log p_tv = logsumexp(z_t) - sum_v softmax(z_t)_v z_tv

    Args:
      logits: (B, T, V); mask: (B, T).
    Returns:
      scalar fp32.
    """
    return masked_mean(token_entropy(logits), mask)


# ---------------------------------------------------------------------------------------------------
# KL coefficient control and EMA


def kl_coef_update(coef, current_kl, n_steps, *, target, horizon):
    """Adaptive KL controller (Ziegler et al. 2019): the state is the coefficient itself.

        e     = clip(current_kl / target - 1, -0.2, 0.2)
        coef' = coef * (1 + e * n_steps / horizon)

    `target=None` is the fixed controller: coef' = coef. Works on Python floats and traced values.

    Args:
      coef: current KL coefficient beta.
      current_kl: the measured KL (e.g. mean per-sequence KL of the last rollout).
      n_steps: how many samples (episodes) that measurement covers.
      target: the KL to steer towards; None for a fixed coefficient.
      horizon: how many samples it takes to correct a 20% error in full.
    """
    if target is None:
        return coef
    error = jnp.clip(current_kl / target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * n_steps / horizon)


def ema_update(ema_params, params, decay):
    """Exponential moving average, leaf by leaf: ema' = decay * ema + (1 - decay) * params."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema_params, params)


# ---------------------------------------------------------------------------------------------------
# Step functions (rollout, actor and critic updates) and the state they pass on. P is static: it is the
# prompts' padded width.


@struct.dataclass
class Ptx:
    """Pre-training rows mixed into the actor's loss (`ppo.ptx_coef`), one mini-batch's worth, as `sft_loss`
    reads them."""

    input_ids: jax.Array  # (B', P + R) int32
    attention_mask: jax.Array  # (B', P + R) int32
    loss_mask: jax.Array  # (B', P + R) int32 1 on tokens that are targets
    ratio: jax.Array  # (B',) fp32 global response tokens / global ptx target tokens, one copy per row


@struct.dataclass
class Rollout:
    """A batch of experience: B rows of prompt + response (the layout above).

    Sampling gives the first three fields and `experience` the next four. A role's mini-batch
    (`role.feed`) carries only the fields that role declares, the others None; the actor's adds `ptx`.
    """

    seq: jax.Array  # (B, P + R) int32 prompt + response ids
    attention_mask: jax.Array  # (B, P + R) int32 1 on real tokens
    response_mask: jax.Array | None = None  # (B, R) int32 1 on generated tokens up to and including EOS
    old_logprobs: jax.Array | None = None  # (B, R) fp32 log pi_old of the response tokens
    old_values: jax.Array | None = None  # (B, R) fp32 critic values V_old (state before each token)
    advantages: jax.Array | None = None  # (B, R) fp32 GAE advantages (whitened with whiten_advantages)
    returns: jax.Array | None = None  # (B, R) fp32 the critic's targets A + V_old
    ptx: Ptx | None = None  # the actor's pre-training rows beside this mini-batch (ptx_coef > 0)

    @classmethod
    def of(cls, fields: dict) -> Rollout:
        """A Rollout from a dict of its fields, `ptx` a dict of `Ptx`'s (how `role.feed` builds one)."""
        ptx = fields.get("ptx")
        return cls(**{**fields, "ptx": None if ptx is None else Ptx(**ptx)})


@struct.dataclass
class Controller:
    """What PPO carries from one rollout batch to the next (and checkpoints): the KL coefficient, which the
    adaptive controller moves after each step (`kl_coef_update`), and the running moments of the reward
    scores, which `experience` updates under `ppo.normalize_reward`."""

    kl_coef: jax.Array  # () fp32 beta of the KL penalty
    score_moments: tuple[jax.Array, jax.Array, jax.Array]  # () fp32 each: running (count, mean, M2) of scores


def response_logprobs(model, seq, attention_mask, prompt_len: int, *, entropy: bool = False):
    """(B, R) log-probs of the response tokens under a causal LM, and with `entropy` their (B, R)
    next-token entropies (else None).

    Only the R response positions go through the LM head, a chunk of them at a time
    (`sft.head_stats`): no (B, P + R, V) logits exist.
    """
    hidden = model.features(seq, attention_mask)  # (B, P + R, E)
    stats = head_stats(model, hidden[:, prompt_len - 1:-1], seq[:, prompt_len:], entropy=entropy)
    return stats["logp"], stats.get("entropy")


def response_values(critic, seq, attention_mask, prompt_len: int):
    """(B, R) critic values of the state before each response token."""
    return critic(seq, attention_mask)[:, prompt_len - 1:-1]


def update_moments(stats, x):
    """Running (count, mean, M2) merged with the samples x (Chan et al.'s parallel update)."""
    count, mean, m2 = stats
    n = jnp.float32(x.size)
    b_mean = jnp.mean(x)
    b_m2 = jnp.sum(jnp.square(x - b_mean))
    total = count + n
    delta = b_mean - mean
    return total, mean + delta * n / total, m2 + b_m2 + jnp.square(delta) * count * n / total


def ended_rows(seq, mask, prompt_len: int, eos_ids: tuple[int, ...]):
    """(B,) bool: whether each row's response ended with an EOS (False for responses cut at the length
    limit, and for empty ones). seq: (B, P + R); mask: (B, R)."""
    last = jnp.take_along_axis(seq[:, prompt_len:], jnp.maximum(mask.sum(1) - 1, 0)[:, None], axis=1)[:, 0]
    return jnp.isin(last, jnp.asarray(eos_ids)) & (mask.sum(1) > 0)


def experience(actor, ref, critic, reward, batch: Rollout, control: Controller, *, prompt_len: int,
               kl_estimator: str, clip_reward: float, gamma: float, lam: float, whiten_advantages: bool,
               eos_ids: tuple[int, ...], normalize_reward: bool = False):
    """Scores one sampled batch: old/ref log-probs, values, rewards, GAE (no gradients).

    The reward model reads each sequence at its last real token, the same position as in step 2: the
    response's EOS, or its last token when generation stopped at the length limit. Those truncated rows
    keep their score (as in DeepSpeed-Chat) and are counted in `truncated`. The KL penalty's coefficient
    is `control.kl_coef`.

    With `normalize_reward`, scores are standardised by the running (count, mean, M2) of the scores seen so
    far including this batch (`control.score_moments`, updated) before they are clipped to +-clip_reward,
    so the clip keeps its meaning whatever scale the reward model learned.

    `ref=None` (no reference model, when the KL coefficient is 0): the KL term and the `kl` metric are 0;
    every other output is what a reference would have given.

    Returns:
      the Rollout with old_logprobs, old_values, advantages and returns filled; the Controller the next
      batch uses (new score moments under `normalize_reward`, else `control`); the metrics.
    """
    seq, attn, mask = batch.seq, batch.attention_mask, batch.response_mask
    old, _ = response_logprobs(actor, seq, attn, prompt_len)
    values = response_values(critic, seq, attn, prompt_len)
    score = reward.sequence_score(seq, attn)
    ended = ended_rows(seq, mask, prompt_len, eos_ids)
    raw_score = score
    if normalize_reward:
        control = control.replace(score_moments=update_moments(control.score_moments, score.astype(jnp.float32)))
        count, mean, m2 = control.score_moments
        score = (score - mean) / jnp.sqrt(m2 / jnp.maximum(count - 1.0, 1.0) + 1e-8)
    if ref is None:
        kl = jnp.zeros_like(old)
    else:
        kl = kl_penalty(old, response_logprobs(ref, seq, attn, prompt_len)[0], kl_estimator)
    rewards = shaped_rewards(score, kl, mask, kl_coef=control.kl_coef, clip_reward=clip_reward, ended=ended)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    if whiten_advantages:
        advantages = whiten(advantages, mask)
    maskf = mask.astype(jnp.float32)
    out = batch.replace(old_logprobs=old, old_values=values, advantages=advantages, returns=returns)
    metrics = {
        "reward/score": jnp.mean(raw_score),
        "reward/mean": jnp.mean(rewards.sum(1)),
        "kl": jnp.mean((kl * maskf).sum(1)),
        "response_length": jnp.mean(maskf.sum(1)),
        "truncated": jnp.mean(1.0 - ended.astype(jnp.float32)),
        "values": masked_mean(values, maskf),
    }
    return out, control, metrics


def actor_loss(model, batch: Rollout, *, prompt_len: int, clip_ratio: float, entropy_coef: float, ptx_coef: float):
    """Clipped policy loss (+ entropy bonus, + ptx_coef * causal-LM loss on the `ptx` rows when present).

        loss = policy_loss - entropy_coef * entropy + ptx_coef * ptx_loss
    """
    mask = batch.response_mask
    logprobs, entropies = response_logprobs(model, batch.seq, batch.attention_mask, prompt_len, entropy=True)
    loss, metrics = policy_loss(logprobs, batch.old_logprobs, batch.advantages, mask, clip_ratio=clip_ratio)
    entropy = masked_mean(entropies, mask)
    loss = loss - entropy_coef * entropy
    metrics = dict(metrics, entropy=entropy)
    if ptx_coef > 0 and batch.ptx is not None:
        ptx = batch.ptx
        ptx_loss, ptx_m = sft_loss(model, {"input_ids": ptx.input_ids, "attention_mask": ptx.attention_mask,
                                           "loss_mask": ptx.loss_mask})
        # The data-parallel step weights each device's loss by its response tokens (`weight`); times
        # (ptx tokens / response tokens here) * ratio (= global response / global ptx tokens, per row),
        # the ptx term averages over the global ptx batch's tokens, as on one device.
        ptx_loss = ptx_loss * ptx_m["weight"] / jnp.maximum(metrics["weight"], 1.0) * ptx.ratio[0]
        loss = loss + ptx_coef * ptx_loss
        metrics["ptx_loss"] = ptx_loss
    return loss, metrics


def critic_loss(model, batch, *, prompt_len: int, value_clip: float, vf_coef: float):
    """vf_coef * clipped value loss on the response tokens."""
    values = response_values(model, batch.seq, batch.attention_mask, prompt_len)
    loss, metrics = value_loss(values, batch.old_values, batch.returns, batch.response_mask, value_clip=value_clip)
    return vf_coef * loss, metrics
