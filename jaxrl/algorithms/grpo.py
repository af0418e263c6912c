"""Step 3, the GRPO family (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++): the math as small pure functions.

Layout and conventions are PPO's (`jaxrl.algorithms.ppo`): per-token quantities are (B, R) response arrays
with a 0/1 `mask`; sequence quantities (scores, advantages of outcome rewards) are (B,). A group is the G
samples of one prompt, stored in consecutive rows: rows [g * G, (g + 1) * G) are group g, so B = groups * G.

Every loss returns `(loss, metrics)` with `metrics["weight"]` the denominator, and the data-parallel step
(`jaxrl.train.step`) combines devices as sum_d(loss_d * weight_d) / sum_d(weight_d) and `optax.MultiSteps`
averages its `grad_accum` micro-batches with equal weights. `aggregate` below is built on that rule so that
each aggregation mode gives exactly the one-batch value on any number of devices and micro-batches when the
caller passes the step's global count (see `aggregate`).

Advantage estimators take outcome scores (B,) and return advantages; policy losses take per-token
log-probs. Advantages, old/ref/sampler log-probs are constants of the update (`stop_gradient`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl.algorithms.ppo import gae, kl_penalty, last_valid_onehot, masked_mean, response_logprobs, whiten

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")

# ---------------------------------------------------------------------------------------------------
# Group advantage estimators (outcome rewards: one score per sequence)


def _groups(scores, group_size: int):
    """(B,) -> (B / G, G) fp32, with clear errors for a bad group size."""
    if group_size < 2:
        raise ValueError(f"group advantages need at least 2 samples per prompt; got group_size={group_size}")
    if scores.shape[0] % group_size:
        raise ValueError(f"batch of {scores.shape[0]} scores is not a whole number of groups of {group_size}")
    return scores.astype(jnp.float32).reshape(-1, group_size)


def grpo_advantages(scores, group_size: int, *, eps: float = 1e-6, scale_by_std: bool = True):
    """GRPO (Shao et al. 2024, DeepSeekMath eq. 3 with outcome supervision): rewards normalised in the group.

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)          scale_by_std (grpo)
        A_i =  r_i - mean_g(r)                              not scale_by_std (dr_grpo, Liu et al. 2025)

    std_g is the *unbiased* (Bessel, n - 1) standard deviation of the group's G scores: what TRL's
    `GRPOTrainer` (`rewards.view(-1, G).std(dim=1)`) and veRL's `compute_grpo_outcome_advantage`
    (`torch.std`) both compute (torch's default is unbiased). eps: veRL's 1e-6 (TRL uses 1e-4). A group
    whose rewards are all equal gets A = 0 for every row.

    Args:
      scores: (B,) one scalar reward per sequence, groups in consecutive rows.
      group_size: G >= 2.
    Returns:
      (B,) fp32 advantages (broadcast to tokens with `token_advantages`).
    """
    r = _groups(scores, group_size)  # (N, G)
    centred = r - jnp.mean(r, axis=1, keepdims=True)
    if scale_by_std:
        std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / (group_size - 1))
        centred = centred / (std + eps)
    return centred.reshape(-1)


def rloo_advantages(scores, group_size: int):
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): the baseline is the mean of the *other* samples.

        A_i = r_i - 1/(G - 1) * sum_{j != i} r_j  =  G / (G - 1) * (r_i - mean_g(r))

    Args:
      scores: (B,) groups in consecutive rows; group_size: G >= 2.
    Returns:
      (B,) fp32 advantages.
    """
    r = _groups(scores, group_size)
    loo = (jnp.sum(r, axis=1, keepdims=True) - r) / (group_size - 1)
    return (r - loo).reshape(-1)


def token_advantages(advantages, mask):
    """(B,) sequence advantages -> (B, R), the same value on every response token, 0 off the mask."""
    return advantages.astype(jnp.float32)[:, None] * mask.astype(jnp.float32)


def reinforce_pp_advantages(scores, kl, mask, *, kl_coef, gamma: float = 1.0):
    """REINFORCE++ (Hu 2025): KL in the per-token reward, discounted return-to-go, whitened over the batch.

        r_t = -kl_coef * kl_t + [t = last] * score              (the row's last response token)
        G_t = sum_{s >= t} gamma^(s - t) r_s                    (over the row's response tokens)
        A_t = (G_t - mean(G)) / sqrt(var(G) + 1e-8)              (mean, biased var over all masked tokens)

    No critic and no group baseline: the batch whitening is the baseline. The statistics are over every
    masked token of the arrays given, so call this under plain `jit` on the whole rollout batch (the
    global batch), not inside a data-parallel `shard_map` where they would be per-device.

    Args:
      scores: (B,) outcome rewards; kl: (B, R) per-token KL estimate (`kl_estimate`); mask: (B, R).
      kl_coef: KL weight in the reward; gamma: discount.
    Returns:
      advantages, returns: (B, R) fp32, 0 off the mask.
    """
    maskf = mask.astype(jnp.float32)
    rewards = -kl_coef * kl.astype(jnp.float32) * maskf + last_valid_onehot(maskf) * scores.astype(jnp.float32)[:, None]
    # GAE with V = 0 and lambda = 1 is the discounted return-to-go over the masked steps.
    returns, _ = gae(rewards, jnp.zeros_like(rewards), maskf, gamma=gamma, lam=1.0)
    return whiten(returns, maskf), returns


# ---------------------------------------------------------------------------------------------------
# DAPO: overlong reward shaping and the dynamic-sampling filter


def overlong_penalty(lengths, *, max_len: int, buffer: int, factor: float = 1.0):
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the outcome reward.

        L_max = max_len, L_cache = buffer, |y| = response length
        R(y) =  0                                   |y| <= L_max - L_cache
                ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
               -1                                   |y| > L_max
    times `factor` (veRL's `overlong_penalty_factor`).

    Args:
      lengths: (B,) response lengths in tokens (e.g. `mask.sum(1)`).
      max_len: L_max, the generation length limit; buffer: L_cache, 0 < buffer <= max_len.
    Returns:
      (B,) fp32 penalties in [-factor, 0].
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer must be in (0, max_len={max_len}]; got {buffer}")
    lengths = lengths.astype(jnp.float32)
    expected = max_len - buffer
    soft = (expected - lengths) / buffer
    penalty = jnp.where(lengths <= expected, 0.0, jnp.where(lengths <= max_len, soft, -1.0))
    return factor * penalty


def dynamic_sampling_keep(scores, group_size: int):
    """DAPO's dynamic-sampling filter: keep the groups whose rewards are not all equal.

        keep_g = max_g(r) > min_g(r)

    A group with all-equal rewards has zero group-relative advantage and contributes no gradient; DAPO
    drops it and samples more prompts until the batch is full.

    Args:
      scores: (B,) groups in consecutive rows; group_size: G.
    Returns:
      (B,) bool, the same value on every row of a group (select rows with it; count dropped groups as
      `groups - keep.reshape(-1, G)[:, 0].sum()`).
    """
    if scores.shape[0] % group_size:
        raise ValueError(f"batch of {scores.shape[0]} scores is not a whole number of groups of {group_size}")
    r = scores.reshape(-1, group_size)
    keep = jnp.max(r, axis=1) > jnp.min(r, axis=1)  # (N,)
    return jnp.repeat(keep, group_size)


# ---------------------------------------------------------------------------------------------------
# Loss aggregation


def aggregation_count(mask, mode: str):
    """What `mode` averages over, in these rows: response tokens (token_mean) or non-empty sequences.

    Sum it over the whole optimizer step (every device and every accumulation micro-batch, e.g. under
    plain `jit` on the rollout batch before it is split) to get `aggregate`'s `global_count`.
    """
    _check_mode(mode)
    maskf = mask.astype(jnp.float32)
    if mode == "token_mean":
        return jnp.sum(maskf)
    return jnp.sum((jnp.sum(maskf, axis=1) > 0).astype(jnp.float32))


def aggregate(token_loss, mask, mode: str, *, max_len: int | None = None, global_count=None, shards: int = 1):
    """Reduces a (B, R) per-token loss to a scalar as veRL's `agg_loss` modes do, and its step weight.

        token_mean:               sum_{b,t} L m / sum_{b,t} m                  (DAPO: every token counts alike)
        seq_mean_token_mean:      1/N sum_b [ sum_t L m / sum_t m ]           (GRPO: every sequence alike)
        seq_mean_token_sum_norm:  1/N sum_b [ sum_t L m / max_len ]            (Dr. GRPO: a constant length)

    N = sequences with at least one response token. Dr. GRPO's normaliser is a constant (the generation
    length limit) so that no sequence's tokens weigh more for being short; here it is averaged over the
    sequences (older veRL divides the batch's sum by the width with no 1/N: the same up to a constant).

    Exact over devices and accumulation. Write S for the numerator above (a sum over this shard's rows)
    and C = `aggregation_count` for its count. Without `global_count`: returns (S / C, C), which the step
    combines exactly over devices (sum_d S_d / sum_d C_d) but not over `grad_accum` micro-batches with
    different counts (MultiSteps gives each micro-batch's mean the same weight). With `global_count` = the
    count over the whole optimizer step (all devices and micro-batches) and `shards` = data-parallel
    devices * grad_accum, it returns (S / w, w) with w = global_count / shards, the same on every shard:
    the step gives sum_d S_d / (D w) per micro-batch, and MultiSteps' mean over the K micro-batches is
    sum(S) / global_count exactly, whatever the device count, accumulation and per-shard counts.

    Args:
      token_loss: (B, R) per-token loss; mask: (B, R) 0/1.
      mode: one of AGGREGATIONS; max_len: the constant for seq_mean_token_sum_norm.
      global_count: the optimizer step's total `aggregation_count` (may be traced); None: local count.
      shards: data-parallel devices times accumulation micro-batches (static), with `global_count`.
    Returns:
      loss (scalar fp32) and weight (scalar fp32, for `metrics["weight"]`).
    """
    _check_mode(mode)
    maskf = mask.astype(jnp.float32)
    per_token = token_loss.astype(jnp.float32) * maskf
    if mode == "token_mean":
        numerator = jnp.sum(per_token)
    elif mode == "seq_mean_token_mean":
        lengths = jnp.sum(maskf, axis=1)
        numerator = jnp.sum(jnp.sum(per_token, axis=1) / jnp.maximum(lengths, 1.0))
    else:
        if max_len is None or max_len <= 0:
            raise ValueError(f"seq_mean_token_sum_norm needs max_len > 0 (the generation limit); got {max_len}")
        numerator = jnp.sum(per_token) / max_len
    if global_count is None:
        weight = aggregation_count(maskf, mode)
    else:
        weight = jnp.asarray(global_count, jnp.float32) / shards
    loss = numerator / jnp.where(weight > 0, weight, 1.0)
    return loss, jax.lax.stop_gradient(weight)


def _check_mode(mode: str) -> None:
    if mode not in AGGREGATIONS:
        raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}; got {mode!r}")


# ---------------------------------------------------------------------------------------------------
# Importance weights and policy losses


def tis_weights(trainer_logprobs, sampler_logprobs, cap: float):
    """Truncated importance sampling (Yao et al. 2025) for the sampler / trainer log-prob mismatch.

        w_t = min(pi_trainer(y_t) / pi_sampler(y_t), cap) = min(exp(log pi_trainer - log pi_sampler), cap)

    The rollout engine samples with its own kernels and dtype, so its probabilities differ from the
    training forward's; weighting each token's loss by w_t corrects the gradient for it. A constant
    (no gradient).

    Args:
      trainer_logprobs: (B, R) old log-probs from the training forward; sampler_logprobs: (B, R) from
        the sampler, on the same tokens; cap: C >= 1.
    Returns:
      (B, R) fp32.
    """
    log_w = trainer_logprobs.astype(jnp.float32) - sampler_logprobs.astype(jnp.float32)
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_w), cap))


def _surrogate(ratio, advantages, clip_low, clip_high, clip_ratio_c):
    """Per-token clipped surrogate -A * rho (PPO / DAPO / dual-clip) and whether it was clipped."""
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if clip_ratio_c is not None:
        # Dual clip (Ye et al. 2020, veRL's clip_ratio_c): for A < 0 the loss is bounded by -A * c.
        bound = -advantages * clip_ratio_c
        dual = (advantages < 0) & (loss > bound)
        loss = jnp.where(dual, bound, loss)
        was_clipped = was_clipped | dual
    return loss, was_clipped


def _check_clip(clip_low, clip_high, clip_ratio_c):
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"clip_low must be in [0, 1) and clip_high >= 0; got {clip_low}, {clip_high}")
    if clip_ratio_c is not None and clip_ratio_c <= 1:
        raise ValueError(f"dual-clip clip_ratio_c must be > 1 (veRL's default is 3.0); got {clip_ratio_c}")


def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low: float, clip_high: float,
                        clip_ratio_c: float | None = None, is_weights=None, agg: str = "token_mean",
                        max_len: int | None = None, global_count=None, shards: int = 1):
    """PPO-style clipped surrogate with DAPO's asymmetric clip and optional dual clip, aggregated by `agg`.

        rho_t = exp(log pi(y_t) - log pi_old(y_t))
        l_t   = max(-A_t rho_t, -A_t clip(rho_t, 1 - clip_low, 1 + clip_high))
        l_t   = min(l_t, -A_t c)   where A_t < 0              (dual clip, c = clip_ratio_c > 1)
        l_t   = w_t * l_t                                     (w = is_weights, e.g. `tis_weights`)
        loss  = aggregate(l, mask, agg)

    clip_low = clip_high is PPO's symmetric clip; DAPO's clip-higher uses 0.2 / 0.28.

    Args:
      logprobs: (B, R) under the current policy (gradients flow through these).
      old_logprobs, advantages: (B, R) (constants); mask: (B, R).
      is_weights: (B, R) per-token importance weights or None.
      agg, max_len, global_count, shards: see `aggregate`.
    Returns:
      loss and metrics `policy_loss`, `clipfrac`, `approx_kl` (k3 of pi_old vs pi), `weight`; the metrics
      are aggregated like the loss, so the step's weighting averages them the same way.
    """
    _check_clip(clip_low, clip_high, clip_ratio_c)
    old_logprobs = jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    log_ratio = logprobs.astype(jnp.float32) - old_logprobs
    token_loss, was_clipped = _surrogate(jnp.exp(log_ratio), advantages, clip_low, clip_high, clip_ratio_c)
    if is_weights is not None:
        token_loss = token_loss * jax.lax.stop_gradient(is_weights.astype(jnp.float32))
    kw = dict(max_len=max_len, global_count=global_count, shards=shards)
    loss, weight = aggregate(token_loss, mask, agg, **kw)
    metrics = {
        "policy_loss": loss,
        "clipfrac": _agg_metric(was_clipped.astype(jnp.float32), mask, agg, **kw),
        "approx_kl": _agg_metric(jnp.expm1(log_ratio) - log_ratio, mask, agg, **kw),
        "weight": weight,
    }
    return loss, metrics


def gspo_loss(logprobs, old_logprobs, advantages, mask, *, clip_low: float, clip_high: float,
              agg: str = "seq_mean_token_mean", max_len: int | None = None, global_count=None, shards: int = 1):
    """GSPO (Zheng et al. 2025): a sequence-level importance ratio, clipped per sequence.

        s_i   = exp( 1/|y_i| sum_t (log pi(y_it) - log pi_old(y_it)) )        (geometric mean of token ratios)
        s_it  = sg[s_i] * pi(y_it) / sg[pi(y_it)]                           (GSPO-token: value s_i)
        l_it  = max(-A_it s_it, -A_it clip(s_it, 1 - clip_low, 1 + clip_high))
        loss  = aggregate(l, mask, agg)

    s_it equals s_i in value; its gradient is s_i * grad log pi(y_it), so with the default
    seq_mean_token_mean aggregation and a sequence-constant advantage the gradient is exactly the
    sequence-level objective's, 1/N sum_i -A_i grad s_i (the token form also allows per-token
    advantages). The paper's clip range is small (3e-4 / 4e-4) because s_i is a per-token average.

    Args:
      logprobs: (B, R) current policy; old_logprobs, advantages: (B, R) constants; mask: (B, R).
      clip_low, clip_high: the sequence ratio's clip; agg, max_len, global_count, shards: see `aggregate`.
    Returns:
      loss and metrics `policy_loss`, `clipfrac` (of sequences, aggregated like the loss),
      `seq_ratio` (mean s_i), `weight`.
    """
    _check_clip(clip_low, clip_high, None)
    maskf = mask.astype(jnp.float32)
    old_logprobs = jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    logprobs = logprobs.astype(jnp.float32)
    lengths = jnp.maximum(jnp.sum(maskf, axis=1, keepdims=True), 1.0)
    log_seq = jnp.sum((logprobs - old_logprobs) * maskf, axis=1, keepdims=True) / lengths  # (B, 1)
    log_token = jax.lax.stop_gradient(log_seq) + logprobs - jax.lax.stop_gradient(logprobs)  # (B, R)
    token_loss, was_clipped = _surrogate(jnp.exp(log_token), advantages, clip_low, clip_high, None)
    kw = dict(max_len=max_len, global_count=global_count, shards=shards)
    loss, weight = aggregate(token_loss, mask, agg, **kw)
    metrics = {
        "policy_loss": loss,
        "clipfrac": _agg_metric(was_clipped.astype(jnp.float32), mask, agg, **kw),
        "seq_ratio": _agg_metric(jnp.broadcast_to(jnp.exp(log_seq), maskf.shape), mask, agg, **kw),
        "weight": weight,
    }
    return loss, metrics


def _agg_metric(x, mask, agg, **kw):
    """A per-token metric aggregated like the loss (token/sequence-weighted), without its gradient."""
    if agg == "seq_mean_token_sum_norm":  # a metric is a mean, not a length-normalised sum
        agg = "seq_mean_token_mean"
    return aggregate(jax.lax.stop_gradient(x), mask, agg, **kw)[0]


# ---------------------------------------------------------------------------------------------------
# KL in the loss


def kl_estimate(logprobs, ref_logprobs, estimator: str = "k3"):
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating KL").

        k1 = log pi - log pi_ref                               (unbiased, can be negative)
        k2 = 1/2 (log pi - log pi_ref)^2                        (biased, >= 0; as a loss its gradient
                                                                 (log pi - log pi_ref) grad log pi is, on
                                                                 policy, unbiased for grad KL)
        k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1  (unbiased, >= 0; GRPO's choice)

    Args:
      logprobs, ref_logprobs: (B, R); estimator: 'k1', 'k2' or 'k3'.
    Returns:
      (B, R) fp32, not masked.
    """
    if estimator == "k2":
        return 0.5 * jnp.square(logprobs.astype(jnp.float32) - ref_logprobs.astype(jnp.float32))
    if estimator in ("k1", "k3"):
        return kl_penalty(logprobs, ref_logprobs, estimator)
    raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}; got {estimator!r}")


def kl_loss(logprobs, ref_logprobs, mask, *, estimator: str = "k3", agg: str = "token_mean",
            max_len: int | None = None, global_count=None, shards: int = 1):
    """KL to the reference as a loss term (GRPO: loss = policy loss + beta * this), aggregated by `agg`.

        loss = aggregate(kl_estimate(log pi, log pi_ref), mask, agg)

    Gradients flow through `logprobs`; the reference log-probs are constants.

    Returns:
      loss and metrics `kl_loss`, `weight`.
    """
    ref_logprobs = jax.lax.stop_gradient(ref_logprobs)
    loss, weight = aggregate(kl_estimate(logprobs, ref_logprobs, estimator), mask, agg, max_len=max_len,
                             global_count=global_count, shards=shards)
    return loss, {"kl_loss": loss, "weight": weight}


# ---------------------------------------------------------------------------------------------------
# Sampler / trainer log-prob mismatch


def logprob_mismatch(sampler_logprobs, trainer_logprobs, mask, *, band: float = 0.1):
    """How far the sampler's log-probs are from the training forward's on the same tokens.

        delta_t = log pi_trainer(y_t) - log pi_sampler(y_t)
        max |delta|, mean |delta| over masked tokens;  outside = mean [exp(delta_t) not in [1 - band, 1 + band]]

    Global statistics (a max does not combine through the step's weighted mean): call it under plain
    `jit` on the whole rollout batch.

    Args:
      sampler_logprobs, trainer_logprobs, mask: (B, R).
    Returns:
      dict `mismatch/max_abs`, `mismatch/mean_abs`, `mismatch/frac_outside` (scalars, fp32).
    """
    maskf = mask.astype(jnp.float32)
    delta = trainer_logprobs.astype(jnp.float32) - sampler_logprobs.astype(jnp.float32)
    abs_delta = jnp.abs(delta)
    ratio = jnp.exp(delta)
    outside = ((ratio < 1.0 - band) | (ratio > 1.0 + band)).astype(jnp.float32)
    return {
        "mismatch/max_abs": jnp.max(jnp.where(maskf > 0, abs_delta, 0.0)),
        "mismatch/mean_abs": masked_mean(abs_delta, maskf),
        "mismatch/frac_outside": masked_mean(outside, maskf),
    }


# ---------------------------------------------------------------------------------------------------
# The actor's loss and the advantages of one rollout batch (what the step functions call)


def actor_loss(model, batch, *, prompt_len: int, policy: str, clip_low: float, clip_high: float,
               clip_ratio_c: float | None, agg: str, max_len: int, shards: int, kl_coef: float = 0.0,
               kl_estimator: str = "k3"):
    """The GRPO family's actor loss on one micro-batch.

        loss = policy_loss(agg) + kl_coef * kl_loss(agg)           (the KL term only with the KL in the loss)

    policy 'clip': `clipped_policy_loss` (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++); 'gspo': `gspo_loss`.
    The batch carries `loss_mask` (B, R) (the response mask, less filtered rows), `old_logprobs` and
    `advantages` (B, R), `global_count` (B,) (every entry: the optimizer step's `aggregation_count`), and
    optionally `is_weights` (B, R) (`tis_weights`) and `ref_logprobs` (B, R) (KL in the loss).
    `shards` = data-parallel devices x accumulation micro-batches (see `aggregate`).
    """
    mask = batch["loss_mask"]
    logprobs, _ = response_logprobs(model, batch["seq"], batch["attention_mask"], prompt_len)
    kw = dict(agg=agg, max_len=max_len, global_count=batch["global_count"][0], shards=shards)
    if policy == "gspo":
        loss, metrics = gspo_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask,
                                  clip_low=clip_low, clip_high=clip_high, **kw)
    else:
        loss, metrics = clipped_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask,
                                            clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c,
                                            is_weights=batch.get("is_weights"), **kw)
    if kl_coef > 0:
        kl, kl_m = kl_loss(logprobs, batch["ref_logprobs"], mask, estimator=kl_estimator, **kw)
        loss = loss + kl_coef * kl
        metrics = dict(metrics, kl_loss=kl_m["kl_loss"])
    return loss, metrics


def sequence_advantages(algorithm: str, scores, group_size: int, *, eps: float):
    """(B,) advantages of outcome scores by `algorithm`'s estimator (all but reinforce_pp):
    rloo: leave-one-out; dr_grpo: group mean removed; grpo, dapo, gspo: group mean and std."""
    if algorithm == "rloo":
        return rloo_advantages(scores, group_size)
    return grpo_advantages(scores, group_size, eps=eps, scale_by_std=algorithm != "dr_grpo")


def rollout_advantages(algorithm: str, scores, logprobs, ref_logprobs, mask, *, group_size: int, eps: float,
                       kl_coef: float, kl_in: str, kl_estimator: str):
    """(B, R) advantages of one rollout batch and the (B, R) per-token KL estimate used (0 without a reference).

        kl_in = 'reward':  s_i = score_i - kl_coef * sum_t kl_it    (reinforce_pp: -kl_coef * kl_t per token)
        kl_in = 'loss':    s_i = score_i                            (the actor loss adds the KL term)
        A = sequence_advantages(s) on every response token, or REINFORCE++'s whitened returns.

    Call under plain `jit` on the whole rollout batch: groups and REINFORCE++'s whitening span all rows.
    """
    maskf = mask.astype(jnp.float32)
    if ref_logprobs is None:
        kl = jnp.zeros_like(maskf)
    else:
        kl = kl_estimate(logprobs, ref_logprobs, kl_estimator) * maskf
    in_reward = kl_coef if kl_in == "reward" and ref_logprobs is not None else 0.0
    if algorithm == "reinforce_pp":
        advantages, _ = reinforce_pp_advantages(scores, kl, mask, kl_coef=in_reward)
        return advantages, kl
    shaped = scores.astype(jnp.float32) - in_reward * jnp.sum(kl, axis=1)
    return token_advantages(sequence_advantages(algorithm, shaped, group_size, eps=eps), mask), kl
