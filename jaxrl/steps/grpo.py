"""Step 3 for the GRPO family (grpo, dr_grpo, dapo, gspo, rloo, reinforce_pp): PPO's machinery, no critic.

One step = `ppo.generation_batches` rollout batches of `ppo.rollout_batch_size` rows each: the batch's
rows / G prompts, each repeated G = `grpo.group_size` times in consecutive rows, sampled on the Hybrid
Engine's generation mesh (`ppo.rollout`), rewarded by `reward.functions` in worker processes (and a
learned reward model at model.reward_path, weighted by `reward.model_weight`), then `ppo.epochs` passes
in `ppo.mini_batches` mini-batches of the actor's Trainer step with the loss `algorithms.grpo.actor_loss`.
The loop, checkpoints, exports and roles are the shared ones; the math is `jaxrl.algorithms.grpo`.

Token-mean aggregation divides by the optimizer step's global token count: `train` counts the loss
tokens of each accumulation window on the host and passes that count in every mini-batch
(`global_count`), so device count and `optim.grad_accum` leave the update unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxrl.algorithms import grpo
from jaxrl.algorithms.ppo import ended_rows, response_logprobs
from jaxrl.config import GrpoSection, RunConfig
from jaxrl.data import synthetic
from jaxrl.data.tokenize import FIELD, batch_rows
from jaxrl.models.hf import save_pretrained
from jaxrl.models.transformer import shard_activations
from jaxrl.parallel.mesh import gather_rows, settle, to_host
from jaxrl.parallel.sharding import DATA_AXES, data_parallel_size
from jaxrl.rewards.runner import RewardRunner, combine
from jaxrl.steps import ppo
from jaxrl.steps import role as role_lib
from jaxrl.steps.hybrid import HybridEngine
from jaxrl.steps.role import Role, frozen_spec, lora_only, spec_from
from jaxrl.train import build
from jaxrl.train.rng import rng_stream

FAMILY = ("grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp")


def settings(cfg: RunConfig) -> GrpoSection:
    """`cfg.grpo` with the algorithm's defaults filled in (`jaxrl.config.GRPO_DEFAULTS`)."""
    return cfg.grpo.resolve(cfg.algorithm, cfg.generation.max_new_tokens)


def roles(cfg: RunConfig, mesh, tokenizer=None) -> dict[str, Role]:
    """The actor (trained), the reference (frozen; only with a KL coefficient > 0) and, with
    model.reward_path, a learned reward model (frozen). No critic."""
    g = settings(cfg)
    plen, length = cfg.data.max_prompt_len, cfg.data.max_prompt_len + cfg.generation.max_new_tokens
    resp_len = length - plen
    mb = ppo.mini_batch_rows(cfg, mesh)
    seq, resp = ((mb, length), jnp.int32), ((mb, resp_len), jnp.float32)  # (B, P + R), (B, R)
    actor_batch = {"seq": seq, "attention_mask": seq, "loss_mask": resp, "old_logprobs": resp,
                   "advantages": resp, "global_count": ((mb,), jnp.float32)}
    if g.tis_cap > 0:
        actor_batch["is_weights"] = resp
    if _kl_in_loss(g):
        actor_batch["ref_logprobs"] = resp
    loss = functools.partial(
        grpo.actor_loss, prompt_len=plen, policy="gspo" if cfg.algorithm == "gspo" else "clip",
        clip_low=g.clip_low, clip_high=g.clip_high, clip_ratio_c=g.clip_ratio_c or None, agg=g.loss_agg,
        max_len=resp_len, shards=data_parallel_size(mesh) * cfg.optim.grad_accum,
        kl_coef=g.kl_coef if _kl_in_loss(g) else 0.0, kl_estimator=g.kl_estimator)
    rollout = {k: ((cfg.ppo.rollout_batch_size, length), jnp.int32) for k in ("seq", "attention_mask")}
    arch = build.model_arch(cfg.model.path, tokenizer)
    declared = {"actor": Role("actor", spec_from(cfg), arch, actor_batch, loss=loss,
                              total_steps=ppo.total_updates(cfg), lora_only=lora_only(cfg))}
    if g.kl_coef > 0:
        declared["reference"] = Role("reference", frozen_spec(cfg), arch, rollout,
                                     forward=lambda m, b: response_logprobs(m, b["seq"], b["attention_mask"], plen)[0])
    if cfg.model.reward_path:
        path = cfg.model.reward_path
        declared["reward"] = Role("reward", frozen_spec(cfg, path, kind="score"), build.model_arch(path, tokenizer),
                                  rollout, forward=lambda m, b: m.sequence_score(b["seq"], b["attention_mask"]))
    return declared


def _kl_in_loss(g: GrpoSection) -> bool:
    return g.kl_coef > 0 and g.kl_in == "loss"


@dataclasses.dataclass
class Roles:
    """The built models: the actor's Trainer, the frozen reference and reward model as (graphdef, state)
    or None when the config leaves them out, and the actor's Hybrid Engine."""

    actor: object
    ref: tuple | None
    reward: tuple | None
    hybrid: HybridEngine
    arch: object
    tokenizer: object
    declared: dict  # name -> Role, as `roles` declared them


def load_roles(cfg: RunConfig, mesh, tok=None) -> Roles:
    """The roles of `roles(cfg)` built with their weights on `mesh`, and the actor's Hybrid Engine
    (`tok`: the model's tokenizer, loaded from model.path when None)."""
    tok = tok if tok is not None else build.load_tokenizer(cfg.model.path)
    declared = roles(cfg, mesh, tok)
    actor = role_lib.trainer(declared["actor"], cfg, mesh)
    ref = role_lib.frozen(declared["reference"], cfg, mesh) if "reference" in declared else None
    reward = role_lib.frozen(declared["reward"], cfg, mesh) if "reward" in declared else None
    arch = declared["actor"].arch
    return Roles(actor, ref, reward, ppo.hybrid_engine(cfg, arch, actor.graphdef, mesh), arch, tok, declared)


class GRPO:
    """Rollouts and actor updates of the GRPO family for the shared loop; state = {'actor'}."""

    def __init__(self, cfg: RunConfig, mesh, roles: Roles, prompts: dict, eval_prompts: dict | None,
                 rewards: RewardRunner | None):
        self.cfg, self.mesh, self.roles, self.rewards = cfg, mesh, roles, rewards
        self.g = settings(cfg)
        self.group = self.g.group_size
        self.rows = cfg.ppo.rollout_batch_size
        self.mini_rows = ppo.mini_batch_rows(cfg, mesh)
        self.prompts = build.iterator(prompts, self.rows // self.group, cfg.seed)
        self.eval_prompts = eval_prompts
        self.sampler = ppo.sampler(cfg, roles.arch, roles.tokenizer)
        self.train_sharding = roles.actor.batch_sharding
        self._experience = jax.jit(self._experience_fn)
        self._take = jax.jit(lambda batch, idx: jax.tree.map(lambda x: x[idx], batch),
                             out_shardings=self.train_sharding)
        if roles.reward is not None:
            self._model_score = role_lib.jit_forward(roles.declared["reward"], roles.reward[0])

    # -------------------------------------------------------------------------------------------- state
    def init_state(self) -> dict:
        return {"actor": self.roles.actor.init_state()}

    def data_state(self) -> dict:
        return {"prompts": self.prompts.state()}

    def restore_data(self, d: dict) -> None:
        self.prompts.restore(d["prompts"])

    # --------------------------------------------------------------------------------------------- step
    def update(self, state: dict, step: int):
        """One step: `ppo.generation_batches` rollout batches (with dynamic sampling's extra rounds),
        then epochs x mini-batches of actor updates."""
        times = {"time/generation": 0.0, "time/reward": 0.0, "time/experience": 0.0}
        batches, exp_metrics, reward_metrics = [], [], []
        for b in range(self.cfg.ppo.generation_batches):
            batch, scores, rm = self.collect(state["actor"], step, b, times)
            t0 = time.perf_counter()
            exp, m = self.score(state, batch, scores)
            exp_metrics.append(jax.device_get(m))
            times["time/experience"] += time.perf_counter() - t0
            batches.append(exp)
            reward_metrics += rm
        experience = jax.tree.map(lambda *xs: jnp.concatenate(xs), *batches) if len(batches) > 1 else batches[0]
        t1 = time.perf_counter()
        state, train_metrics = self.train(state, experience, step)
        jax.block_until_ready(state)
        times["time/train"] = time.perf_counter() - t1
        metrics = build.weighted_mean(exp_metrics)
        metrics.update(merge_reward_metrics(reward_metrics), **train_metrics, **times)
        return state, metrics

    def collect(self, actor_state, step: int, batch_index: int, times: dict):
        """One rollout batch of whole groups with their scores; under dynamic sampling, groups whose rewards
        are all equal are dropped and more are sampled (at most grpo.max_extra_rounds more rounds); if the
        batch is still short, dropped groups fill it (they have zero advantage, so shapes stay static).
        Returns (batch on the training mesh, (B,) scores, list of reward metrics per round)."""
        rounds = 1 + (self.g.max_extra_rounds if self.g.dynamic_sampling else 0)
        parts, metrics = [], []
        kept = dropped = 0
        needed = self.rows // self.group
        for r in range(rounds):
            batch, scores, m = self.sample(actor_state, next(self.prompts), rng_stream(
                self.cfg.seed, "rollout", step, batch_index, r), times)
            metrics.append(m)
            if not self.g.dynamic_sampling:
                return batch, scores, metrics
            keep = np.asarray(grpo.dynamic_sampling_keep(jnp.asarray(scores), self.group)).reshape(-1, self.group)[:, 0]
            parts.append((batch, scores, keep))
            kept += int(keep.sum())
            dropped += int((~keep).sum())
            if kept >= needed:
                break
        groups = [(i, g) for i, (_, _, keep) in enumerate(parts) for g in np.flatnonzero(keep)]
        filled = [(i, g) for i, (_, _, keep) in enumerate(parts) for g in np.flatnonzero(~keep)]
        chosen = (groups + filled)[:needed]
        rows = np.concatenate([(i * self.rows + g * self.group) + np.arange(self.group) for i, g in chosen])
        with jax.set_mesh(self.mesh):
            joined = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[b for b, _, _ in parts])
            batch = settle(self._take(joined, jnp.asarray(rows)))
        scores = np.concatenate([s for _, s, _ in parts])[rows]
        metrics[-1] = dict(metrics[-1], **{"dynamic/dropped_groups": float(dropped),
                                           "dynamic/extra_rounds": float(len(parts) - 1),
                                           "dynamic/filled_groups": float(max(0, needed - kept))})
        return batch, scores, metrics

    def sample(self, actor_state, prompts: dict, rng, times: dict, *, group: int | None = None,
               sampler=None):
        """Generates `group` (default G) samples per prompt in consecutive rows and rewards them, each sample
        with its prompt's row fields: (batch on the training mesh, (B,) fp32 scores, reward metrics)."""
        group = self.group if group is None else group
        repeated = {k: np.repeat(np.asarray(prompts[k]), group, axis=0) for k in ("input_ids", "attention_mask")}
        # The rollout's rows are every process's rows in process order, so are the fields.
        rows = [row for row in gather_rows(batch_rows(prompts)) for _ in range(group)]
        t0 = time.perf_counter()
        # generation.slots=0: a slot per row of the whole batch (every process's); a group's rows share a prefill.
        engine = ppo.slot_engine(self.cfg, len(repeated["input_ids"]) * jax.process_count())
        batch = ppo.rollout(self.roles.hybrid, actor_state, repeated, rng, sampler or self.sampler,
                            self.train_sharding, engine, group=group)
        t1 = time.perf_counter()
        scores, metrics = self.reward(batch, rows)
        times["time/generation"] = times.get("time/generation", 0.0) + t1 - t0
        times["time/reward"] = times.get("time/reward", 0.0) + time.perf_counter() - t1
        return batch, scores, metrics

    def reward(self, batch: dict, rows: list[dict]):
        """(B,) total rewards of a rollout batch: weighted reward functions (in the workers, given the B rows'
        fields, [] for none) plus the learned reward model's weighted score, plus DAPO's overlong penalty;
        and their metrics."""
        plen = self.cfg.data.max_prompt_len
        seq, attn, mask = (to_host(batch[k]) for k in ("seq", "attention_mask", "response_mask"))
        terms = []
        if self.roles.reward is not None:
            with jax.set_mesh(self.mesh):
                score = to_host(self._model_score(self.roles.reward[1], role_lib.feed(
                    self.roles.declared["reward"], batch)))
            terms.append(("reward_model", score, self.cfg.reward.model_weight))
        if self.rewards is not None:
            prompts = self.decode(seq[:, :plen], attn[:, :plen])
            completions = self.decode(seq[:, plen:], mask)
            scores, metrics = self.rewards(prompts, completions, rows, extra_terms=terms)
        else:
            scores, metrics = combine(terms)
            metrics["reward/total"] = float(scores.mean())
        scores = np.asarray(scores, np.float32)
        if self.g.overlong_buffer > 0:
            penalty = np.asarray(grpo.overlong_penalty(jnp.asarray(mask.sum(1)), max_len=self.cfg.generation.max_new_tokens,
                                                       buffer=self.g.overlong_buffer, factor=self.g.overlong_factor))
            scores = scores + penalty
            metrics["reward/overlong"] = float(penalty.mean())
        return scores, metrics

    def score(self, state, batch: dict, scores: np.ndarray):
        """The experience of one rollout batch (old/ref log-probs, advantages; no gradients) and its metrics."""
        a = state["actor"]
        ref = None if self.roles.ref is None else self.roles.ref[1]
        with jax.set_mesh(self.mesh):
            # Every process holds all B scores (rewarded from the gathered rollout), not its own rows.
            scores = jax.device_put(np.asarray(scores, np.float32), self.train_sharding)
            return settle(self._experience(a.params, a.frozen, ref, batch, scores))

    def _experience_fn(self, actor_params, actor_frozen, ref_state, batch, scores):
        g, plen = self.g, self.cfg.data.max_prompt_len
        rows = P(DATA_AXES)
        seq, attn, mask = batch["seq"], batch["attention_mask"], batch["response_mask"]
        sampled = batch["sampler_logprobs"]
        if g.reuse_sampler_logprobs:  # the config checked that sampler and trainer dtypes agree
            old = sampled
        else:
            actor = shard_activations(nnx.merge(self.roles.actor.graphdef, actor_params, actor_frozen), rows)
            old = response_logprobs(actor, seq, attn, plen)[0]
        ref_lp = None
        if ref_state is not None:
            ref_lp = response_logprobs(shard_activations(nnx.merge(self.roles.ref[0], ref_state), rows), seq, attn, plen)[0]
        advantages, kl = grpo.rollout_advantages(self.cfg.algorithm, scores, old, ref_lp, mask, group_size=self.group,
                                                 eps=g.eps, kl_coef=g.kl_coef, kl_in=g.kl_in,
                                                 kl_estimator=g.kl_estimator)
        maskf = mask.astype(jnp.float32)
        ended = ended_rows(seq, mask, plen, self.sampler.eos_ids)
        loss_mask = maskf * ended[:, None] if g.filter_truncated else maskf
        out = {"seq": seq, "attention_mask": attn, "loss_mask": loss_mask, "old_logprobs": old,
               "advantages": advantages}
        if g.tis_cap > 0:
            out["is_weights"] = grpo.tis_weights(old, sampled, g.tis_cap)
        if _kl_in_loss(g):
            out["ref_logprobs"] = ref_lp
        metrics = {
            "reward/score": jnp.mean(scores),
            "kl": jnp.mean(kl.sum(1)),
            "response_length": jnp.mean(maskf.sum(1)),
            "truncated": jnp.mean(1.0 - ended.astype(jnp.float32)),
            "advantages/abs_mean": jnp.sum(jnp.abs(advantages)) / jnp.maximum(maskf.sum(), 1.0),
        }
        if not g.reuse_sampler_logprobs:
            metrics.update(grpo.logprob_mismatch(sampled, old, mask))
        return out, metrics

    def train(self, state, experience: dict, step: int):
        """epochs x mini-batches of actor steps; every mini-batch carries its accumulation window's global
        aggregation count (`algorithms.grpo.aggregate`)."""
        p, accum = self.cfg.ppo, self.cfg.optim.grad_accum
        n = jax.tree.leaves(experience)[0].shape[0]
        shuffle = np.random.RandomState([self.cfg.seed, step])
        order = [shuffle.permutation(n) for _ in range(p.epochs)]
        minis = [o[i * self.mini_rows:(i + 1) * self.mini_rows] for o in order for i in range(p.mini_batches)]
        per_row = row_counts(to_host(experience["loss_mask"]), self.g.loss_agg)
        counts = [per_row[idx].sum() for idx in minis]
        window = [max(sum(counts[j - j % accum:j - j % accum + accum]), 1.0) for j in range(len(minis))]
        micro = []
        with jax.set_mesh(self.mesh):
            for idx, count in zip(minis, window):
                mb = dict(settle(self._take(experience, jnp.asarray(idx))))
                mb["global_count"] = build.to_device(
                    {"c": np.full(self._local_rows(), count, np.float32)}, self.train_sharding)["c"]
                state["actor"], m = self.roles.actor.step(state["actor"],
                                                          role_lib.feed(self.roles.declared["actor"], mb))
                micro.append(m)
        micro = jax.device_get(micro)
        metrics = build.weighted_mean([build.window_metrics(micro[i:i + accum]) for i in range(0, len(micro), accum)])
        keep = ("loss", "policy_loss", "clipfrac", "approx_kl", "kl_loss", "seq_ratio", "grad_norm")
        return state, {k: metrics[k] for k in keep if k in metrics}

    def _local_rows(self) -> int:
        return self.mini_rows // jax.process_count()

    # ------------------------------------------------------------------------------------------- evaluate
    def evaluate(self, state) -> dict:
        """Mean reward of one sampled response to each of the first ppo.eval_prompts held-out prompts (and,
        on the synthetic task, the checker's task accuracy)."""
        if self.eval_prompts is None or self.cfg.ppo.eval_prompts == 0:
            return {}
        it = build.eval_iterator(self.eval_prompts, self.rows, self.cfg.ppo.eval_prompts)
        plen, scores, prompts, responses = self.cfg.data.max_prompt_len, [], [], []
        for i, batch in enumerate(it):
            real = np.asarray(batch.pop("valid")) > 0
            rolled, s, _ = self.sample(state["actor"], batch, rng_stream(self.cfg.seed, "eval", i), {}, group=1)
            seq, attn, mask = (to_host(rolled[k])[real] for k in ("seq", "attention_mask", "response_mask"))
            scores.append(s[real])
            prompts += self.decode(seq[:, :plen], attn[:, :plen])
            responses += self.decode(seq[:, plen:], mask)
        out = {"reward": float(np.mean(np.concatenate(scores)))} if scores else {}
        if scores and self.cfg.data.paths == ("synthetic",):
            out["task_accuracy"] = synthetic.task_accuracy(prompts, responses)
        return out

    def decode(self, ids, mask) -> list[str]:
        ids, mask = np.asarray(ids), np.asarray(mask)
        return [self.roles.tokenizer.decode(row[m.astype(bool)].tolist(), skip_special_tokens=True)
                for row, m in zip(ids, mask)]


def row_counts(loss_mask: np.ndarray, agg: str) -> np.ndarray:
    """(B,) each row's share of `grpo.aggregation_count`: its loss tokens (token_mean) or 1 if it has any."""
    tokens = loss_mask.astype(np.float64).sum(1)
    return tokens if agg == "token_mean" else (tokens > 0).astype(np.float64)


def merge_reward_metrics(per_round: list[dict]) -> dict:
    """Reward metrics of a step's rounds: error and group counts summed, everything else averaged."""
    out = {}
    for key in dict.fromkeys(k for m in per_round for k in m):
        values = [m[key] for m in per_round if key in m]
        summed = key.endswith("/errors") or key.startswith("dynamic/")
        out[key] = float(np.sum(values) if summed else np.mean(values))
    return out


def check_row_fields(cfg: RunConfig, rewards: RewardRunner, prompts: dict, eval_prompts: dict | None) -> None:
    """Before training: every field a reward function needs (e.g. math_answer's `answer`) is a column of
    the training rows and of the evaluated held-out rows, else a JaxrlError naming function, field, file."""
    def names(arrays):
        return [k[len(FIELD):] for k in arrays if k.startswith(FIELD)]

    rewards.check_fields(names(prompts), "data.path=" + ",".join(cfg.data.paths))
    if eval_prompts is not None and cfg.ppo.eval_prompts != 0:
        source = f"data.eval_path={cfg.data.eval_path}" if cfg.data.eval_path else "the held-out rows of data.path"
        rewards.check_fields(names(eval_prompts), source)


def run(cfg: RunConfig, mesh=None) -> dict:
    """`jaxrl rl` with a GRPO-family algorithm: trains the actor; writes OUTPUT/hf and returns the last
    eval metrics. `mesh`: the training mesh (default: from mesh.*)."""
    mesh = mesh or build.training_mesh(cfg)
    tok = build.load_tokenizer(cfg.model.path)
    prompts, eval_prompts, _ = ppo.load_prompts(cfg, tok)
    rewards = RewardRunner(cfg.reward) if cfg.reward.functions else None
    try:
        if rewards is not None:  # data and reward functions that do not fit fail before the models load
            check_row_fields(cfg, rewards, prompts, eval_prompts)
        roles = load_roles(cfg, mesh, tok)
        trainer = GRPO(cfg, mesh, roles, prompts, eval_prompts, rewards)

        def export(state, directory):
            with jax.set_mesh(mesh):
                save_pretrained(roles.actor.model(state["actor"]), directory, tokenizer=roles.tokenizer)

        result = ppo.run_loop(cfg, trainer, export, name=cfg.algorithm)
    finally:
        if rewards is not None:
            rewards.close()
    return result
