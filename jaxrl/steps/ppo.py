"""Step 3 wiring: four model roles, the Hybrid Engine rollout, and PPO epochs, in the shared loop.

One PPO step = `ppo.generation_batches` rollouts (generated on the generation mesh, scored on the
training mesh) followed by `ppo.epochs` passes over them in `ppo.mini_batches` mini-batches, each an
optimizer step of the actor and of the critic.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxrl.algorithms import ppo
from jaxrl.config import RunConfig
from jaxrl.data import synthetic
from jaxrl.data.dataset import load_records
from jaxrl.data.tokenize import tokenize_prompts, tokenize_sft
from jaxrl.errors import JaxrlError
from jaxrl.generation import SamplerConfig, generate_batch
from jaxrl.rollout_engine import EngineConfig, generate_padded
from jaxrl.models.hf import save_pretrained
from jaxrl.models.transformer import Transformer, shard_activations
from jaxrl.parallel.mesh import settle, to_host
from jaxrl.parallel.sharding import DATA_AXES, data_parallel_size
from jaxrl.precision import dtype_of
from jaxrl.steps import role as role_lib
from jaxrl.steps.hybrid import HybridEngine, generation_mesh
from jaxrl.steps.role import Role, frozen_spec, lora_only, spec_from
from jaxrl.train import build, loop
from jaxrl.train.rng import numpy_seed, rng_stream

log = logging.getLogger(__name__)


def roles(cfg: RunConfig, mesh, tokenizer=None) -> dict[str, Role]:
    """The four models: actor and reference from the SFT model (model.path), critic and reward from the
    reward model; actor and critic train on PPO mini-batches, reference and reward score rollouts. Each
    is laid out in its own ZeRO stage (`ppo.<role>.zero_stage`, default the run's `zero_stage`)."""
    reward_path = cfg.model.reward_path
    if not reward_path:
        raise JaxrlError("ppo needs model.reward_path: the HF directory written by `jaxrl reward` (its hf/)")
    critic_path = cfg.model.critic_path or reward_path
    p = cfg.ppo
    plen, length = cfg.data.max_prompt_len, cfg.data.max_prompt_len + cfg.generation.max_new_tokens
    mb = mini_batch_rows(cfg, mesh)
    seq = ((mb, length), jnp.int32)  # (B, P + R)
    resp_i, resp_f = ((mb, length - plen), jnp.int32), ((mb, length - plen), jnp.float32)  # (B, R)
    actor_batch = {"seq": seq, "attention_mask": seq, "response_mask": resp_i, "old_logprobs": resp_f,
                   "advantages": resp_f}
    if p.ptx_coef > 0:  # the pre-training rows beside each mini-batch (`ppo.Ptx`, see PPO._ptx_batch)
        actor_batch["ptx"] = {"input_ids": seq, "attention_mask": seq, "loss_mask": seq, "ratio": ((mb,), jnp.float32)}
    critic_batch = {"seq": seq, "attention_mask": seq, "response_mask": resp_i, "old_values": resp_f,
                    "returns": resp_f}
    rollout = {k: ((p.rollout_batch_size, length), jnp.int32) for k in ("seq", "attention_mask")}
    actor_loss = functools.partial(ppo.actor_loss, prompt_len=plen, clip_ratio=p.clip_ratio,
                                   entropy_coef=p.entropy_coef, ptx_coef=p.ptx_coef)
    critic_loss = functools.partial(ppo.critic_loss, prompt_len=plen, value_clip=p.value_clip, vf_coef=p.vf_coef)
    arch = build.model_arch(cfg.model.path, tokenizer)
    declared = {
        "actor": Role("actor", spec_from(cfg, zero_stage=p.actor.zero_stage), arch, actor_batch, loss=actor_loss,
                      total_steps=total_updates(cfg), lora_only=lora_only(cfg), make_batch=ppo.Rollout.of),
        "critic": Role("critic", dataclasses.replace(spec_from(cfg, critic_path, kind="score",
                                                               zero_stage=p.critic.zero_stage), lora_rank=0),
                       build.model_arch(critic_path, tokenizer), critic_batch, loss=critic_loss, lr=p.critic_lr,
                       total_steps=total_updates(cfg), make_batch=ppo.Rollout.of),
        "reference": Role("reference", frozen_spec(cfg, zero_stage=p.reference.zero_stage,
                                                      dtype=p.reference.precision), arch, rollout,
                          forward=lambda m, b: ppo.response_logprobs(m, b.seq, b.attention_mask, plen)[0],
                          make_batch=ppo.Rollout.of),
        "reward": Role("reward", frozen_spec(cfg, reward_path, kind="score", zero_stage=p.reward.zero_stage,
                                               dtype=p.reward.precision),
                       build.model_arch(reward_path, tokenizer), rollout,
                       forward=lambda m, b: m.sequence_score(b.seq, b.attention_mask), make_batch=ppo.Rollout.of),
    }
    if not needs_reference(cfg):
        del declared["reference"]
    return declared


def mini_batch_rows(cfg: RunConfig, mesh) -> int:
    """Rows of one PPO mini-batch: the step's rollouts split into ppo.mini_batches, over the data axes."""
    p = cfg.ppo
    shards = data_parallel_size(mesh)
    mb = p.rollout_batch_size * p.generation_batches // p.mini_batches
    if mb % shards:
        raise JaxrlError(f"ppo.rollout_batch_size={p.rollout_batch_size} must split, per mini-batch ({mb} rows = "
                         f"ppo.rollout_batch_size x ppo.generation_batches / ppo.mini_batches), over the {shards} "
                         "training data-parallel devices")
    return mb


def hybrid_engine(cfg: RunConfig, arch, actor_graphdef, mesh) -> HybridEngine:
    """The Hybrid Engine for the actor: generation mesh over the training mesh's devices, inference dtype."""
    g = cfg.generation
    gen_dtype = dtype_of(g.dtype)
    hybrid = HybridEngine(
        actor_graphdef,
        lambda sh: Transformer(arch, rngs=nnx.Rngs(0), dtype=gen_dtype, shardings=sh),
        generation_mesh(g.mesh.data, g.mesh.tensor, devices=mesh.devices.flatten()),
        gen_dtype,
    )
    if cfg.ppo.rollout_batch_size % hybrid.mesh.shape["data"]:
        raise JaxrlError(f"ppo.rollout_batch_size={cfg.ppo.rollout_batch_size} must split over generation.mesh.data "
                         f"({hybrid.mesh.shape['data']} groups)")
    return hybrid


@dataclasses.dataclass
class Roles:
    """The models: two trained (actor, critic: Trainers) and two frozen (reference, reward), the frozen
    ones stored in the compute dtype (`role.frozen_spec`); no reference when ppo.kl_coef is 0."""

    actor: object
    critic: object
    ref: tuple | None  # (graphdef, state); None when ppo.kl_coef is 0 (see needs_reference)
    reward: tuple
    hybrid: HybridEngine
    arch: object
    tokenizer: object
    declared: dict  # name -> Role, as `roles` declared them


def load_roles(cfg: RunConfig, mesh) -> Roles:
    """The roles of `roles(cfg)` built with their weights on `mesh`, and the actor's Hybrid Engine."""
    total_updates(cfg)  # checks the accumulation fits before anything is built
    tok = build.load_tokenizer(cfg.model.path)
    declared = roles(cfg, mesh, tok)
    actor = role_lib.trainer(declared["actor"], cfg, mesh)
    critic = role_lib.trainer(declared["critic"], cfg, mesh)
    ref = role_lib.frozen(declared["reference"], cfg, mesh) if "reference" in declared else None
    reward = role_lib.frozen(declared["reward"], cfg, mesh)
    arch = declared["actor"].arch
    return Roles(actor, critic, ref, reward, hybrid_engine(cfg, arch, actor.graphdef, mesh), arch, tok, declared)


def needs_reference(cfg: RunConfig) -> bool:
    """Whether PPO loads the reference model: only its KL penalty reads it, so not when ppo.kl_coef is 0.
    The adaptive controller cannot move a 0 coefficient (it multiplies it), and the config refuses
    adaptive_kl with kl_coef 0, so a run that starts without the reference never needs it."""
    return cfg.ppo.kl_coef != 0


def total_updates(cfg: RunConfig) -> int:
    """Optimizer updates of the actor (and of the critic) over the run, the length of their LR schedule.

    Each PPO step runs `epochs * mini_batches` micro-batch steps and `optim.grad_accum` of them make one
    optimizer update, so that count must divide evenly: a window never spans two PPO steps (it would mix
    gradients of two rollouts and leave a partial window at the end of the run).
    """
    p = cfg.ppo
    micro = p.epochs * p.mini_batches
    if micro % cfg.optim.grad_accum:
        raise JaxrlError(f"ppo.epochs x ppo.mini_batches = {micro} mini-batch steps per PPO step must be a multiple "
                         f"of optim.grad_accum={cfg.optim.grad_accum} (each optimizer update accumulates that many "
                         "mini-batches): change one of them")
    return cfg.train.steps * micro // cfg.optim.grad_accum


def sampler(cfg: RunConfig, arch, tokenizer=None, *, temperature=None) -> SamplerConfig:
    """The rollout's sampler; without a tokenizer (planning) EOS comes from the architecture, pad is 0."""
    g = cfg.generation
    pad_id = getattr(tokenizer, "pad_token_id", None)
    eos = arch.eos_ids or ((tokenizer.eos_token_id,) if tokenizer is not None else (0,))
    pad = pad_id if pad_id is not None else eos[0]
    return SamplerConfig(max_new_tokens=g.max_new_tokens, temperature=g.temperature if temperature is None
                         else temperature, top_k=g.top_k, top_p=g.top_p, eos_ids=tuple(eos), pad_id=pad)


def controller(kl_coef: float, score_moments) -> ppo.Controller:
    """A `ppo.Controller` of host fp32 scalars (from the config, or a checkpoint). PPO keeps it on the host
    between batches: each call then gets fresh arguments of one sharding, and nothing recompiles."""
    return ppo.Controller(kl_coef=np.float32(kl_coef), score_moments=tuple(np.float32(x) for x in score_moments))


def slot_engine(cfg: RunConfig, rows: int) -> EngineConfig | None:
    """The slot engine's config when `generation.engine` is 'slots' (`generation.slots`, 0: all `rows` of a
    rollout batch); None for the static sampler."""
    g = cfg.generation
    if g.engine != "slots":
        return None
    return EngineConfig(slots=g.slots or rows)


def rollout(hybrid: HybridEngine, actor_state, prompts: dict, rng, sampler: SamplerConfig, train_sharding,
            engine: EngineConfig | None = None, *, group: int = 1) -> dict:
    """One rollout batch: generated on the generation mesh from a fresh generation copy of the actor (then
    dropped), moved device to device onto the training mesh; by the slot engine when `engine` is given
    (`slot_engine`), else by the static sampler. `group` G > 1: the rows are groups of G consecutive
    copies of a prompt, each group sharing one prefill (the static sampler's `generation.prefill`; the
    slot engine shares the prefill of identical prompts it refills together by itself).

    Returns `seq`, `attention_mask` (B, P + R) int32 (prompt + response), `response_mask` (B, R) int32 and
    `sampler_logprobs` (B, R) fp32 (the sampler's log pi of each generated token under the raw logits,
    0 off the mask).
    """
    with jax.set_mesh(hybrid.mesh):
        gen = build.to_device({k: prompts[k] for k in ("input_ids", "attention_mask")}, hybrid.batch_sharding)
        model = hybrid.generation_copy(actor_state.params, actor_state.frozen)
        if engine is None:
            out = generate_batch(model, gen["input_ids"], gen["attention_mask"], sampler, rng,
                                 batch_sharding=hybrid.batch_sharding, group=group)
        else:
            # Every process runs the engine's host loop on the whole batch's prompts (gathered).
            out = generate_padded(model, gen["input_ids"], gen["attention_mask"], sampler, rng,
                                  engine=engine, batch_sharding=hybrid.batch_sharding)
        del model  # the generation copy's memory goes back to training
    batch = {
        "seq": jnp.concatenate([gen["input_ids"], out["tokens"]], axis=1),
        "attention_mask": jnp.concatenate([gen["attention_mask"], out["mask"]], axis=1),
        "response_mask": out["mask"],
        "sampler_logprobs": out["logprobs"],
    }
    return settle(jax.device_put(batch, train_sharding))  # device to device onto the training mesh


class PPO:
    """Rollouts and updates for the shared loop; state = {'actor', 'critic', 'ema'}, and beside it the
    controller state (`ppo.Controller`, checkpointed with the data positions, `data_state`)."""

    def __init__(self, cfg: RunConfig, mesh, roles: Roles, prompts: dict, eval_prompts: dict | None,
                 ptx: dict | None):
        self.cfg, self.mesh, self.roles = cfg, mesh, roles
        p = cfg.ppo
        self.rows = p.rollout_batch_size
        self.mini_rows = mb = mini_batch_rows(cfg, mesh)
        self.prompts = build.iterator(prompts, self.rows, cfg.seed)
        self.eval_prompts = eval_prompts
        self.ptx = build.iterator(ptx, mb, numpy_seed(cfg.seed, "ptx")) if ptx is not None else None
        self.control = controller(p.kl_coef, (0.0, 0.0, 0.0))
        self.sampler = sampler(cfg, roles.arch, roles.tokenizer)
        self.engine = slot_engine(cfg, self.rows)
        self.train_sharding = roles.actor.batch_sharding
        self._experience = jax.jit(self._experience_fn)
        self._take = jax.jit(lambda batch, idx: jax.tree.map(lambda x: x[idx], batch),
                             out_shardings=self.train_sharding)
        self._ema = jax.jit(functools.partial(ppo.ema_update, decay=p.ema), donate_argnums=0)

    # -------------------------------------------------------------------------------------------- state
    def init_state(self) -> dict:
        actor = self.roles.actor.init_state()
        ema = jax.tree.map(jnp.copy, actor.params) if self.cfg.ppo.ema > 0 else {}
        return {"actor": actor, "critic": self.roles.critic.init_state(), "ema": ema}

    def data_state(self) -> dict:
        """The data positions and the controller state, as JSON (fp32 values, so exact in a float)."""
        c = self.control
        return {"prompts": self.prompts.state(), "kl_coef": float(c.kl_coef),
                "score_stats": [float(x) for x in c.score_moments], "ptx": self.ptx.state() if self.ptx else {}}

    def restore_data(self, d: dict) -> None:
        self.prompts.restore(d["prompts"])
        kl_coef = float(d["kl_coef"])
        if self.roles.ref is None and kl_coef != 0:
            raise JaxrlError(f"the checkpoint's KL coefficient is {kl_coef}, but ppo.kl_coef=0 loaded no "
                             f"reference model; resume with the ppo.kl_coef the run started with")
        self.control = controller(kl_coef, d.get("score_stats", (0.0, 0.0, 0.0)))
        if self.ptx and d.get("ptx"):
            self.ptx.restore(d["ptx"])

    # --------------------------------------------------------------------------------------------- step
    def update(self, state: dict, step: int):
        """One PPO step: rollouts, then epochs x mini-batches of actor and critic updates."""
        p = self.cfg.ppo
        times = {"time/generation": 0.0, "time/experience": 0.0}
        rollouts, exp_metrics = [], []
        for g in range(p.generation_batches):
            t0 = time.perf_counter()
            batch = self.rollout(state["actor"], next(self.prompts), rng_stream(self.cfg.seed, "rollout", step, g))
            # Waited for here (dispatch is asynchronous), or the scoring time would include the generation's.
            jax.block_until_ready(batch)
            t1 = time.perf_counter()
            exp, control, m = self.score(state, batch, self.control)
            self.control, m = jax.device_get((control, m))  # the next batch reads this controller
            times["time/generation"] += t1 - t0
            times["time/experience"] += time.perf_counter() - t1
            rollouts.append(exp)
            exp_metrics.append(m)
        experience = jax.tree.map(lambda *xs: jnp.concatenate(xs), *rollouts) if len(rollouts) > 1 else rollouts[0]
        t2 = time.perf_counter()
        state, train_metrics = self.train(state, experience, step)
        jax.block_until_ready(state)
        times["time/train"] = time.perf_counter() - t2
        metrics = build.weighted_mean(exp_metrics)
        kl_coef = float(self.control.kl_coef)
        if p.adaptive_kl:
            kl_coef = float(ppo.kl_coef_update(kl_coef, metrics["kl"], self.rows * p.generation_batches,
                                               target=p.kl_target, horizon=p.kl_horizon))
            self.control = self.control.replace(kl_coef=np.float32(kl_coef))
        metrics.update(train_metrics, kl_coef=kl_coef, **times)
        return state, metrics

    def rollout(self, actor_state, prompts: dict, rng, *, sampler: SamplerConfig | None = None) -> ppo.Rollout:
        """Generates on the generation mesh from a fresh generation copy of the actor, then drops it."""
        batch = rollout(self.roles.hybrid, actor_state, prompts, rng, sampler or self.sampler, self.train_sharding,
                        self.engine)
        # PPO's old log-probs come from the training forward, not from the sampler's.
        return ppo.Rollout(seq=batch["seq"], attention_mask=batch["attention_mask"],
                           response_mask=batch["response_mask"])

    def score(self, state, batch: ppo.Rollout, control: ppo.Controller):
        """`ppo.experience` of one sampled batch: (the filled Rollout, the next Controller, metrics)."""
        a, c = state["actor"], state["critic"]
        with jax.set_mesh(self.mesh):
            ref = None if self.roles.ref is None else self.roles.ref[1]
            return settle(self._experience(a.params, a.frozen, ref, c.params, c.frozen, self.roles.reward[1], batch,
                                           control))

    def _experience_fn(self, actor_params, actor_frozen, ref_state, critic_params, critic_frozen, reward_state,
                       batch, control):
        p = self.cfg.ppo
        r = self.roles
        rows = P(DATA_AXES)
        return ppo.experience(
            shard_activations(nnx.merge(r.actor.graphdef, actor_params, actor_frozen), rows),
            None if ref_state is None else shard_activations(nnx.merge(r.ref[0], ref_state), rows),
            shard_activations(nnx.merge(r.critic.graphdef, critic_params, critic_frozen), rows),
            shard_activations(nnx.merge(r.reward[0], reward_state), rows),
            batch, control, prompt_len=self.cfg.data.max_prompt_len, kl_estimator=p.kl_estimator,
            clip_reward=p.clip_reward, gamma=p.gamma, lam=p.lam, whiten_advantages=p.whiten_advantages,
            eos_ids=self.sampler.eos_ids, normalize_reward=p.normalize_reward)

    def train(self, state, experience, step):
        p = self.cfg.ppo
        n = experience.seq.shape[0]
        shuffle = np.random.RandomState([self.cfg.seed, step])
        actor_m, critic_m = [], []
        with jax.set_mesh(self.mesh):
            for _ in range(p.epochs):
                order = shuffle.permutation(n)
                for i in range(p.mini_batches):
                    idx = jnp.asarray(order[i * self.mini_rows:(i + 1) * self.mini_rows])
                    mb = settle(self._take(experience, idx))
                    actor_mb = mb.replace(ptx=self._ptx_batch(mb)) if self.ptx else mb
                    actor_mb = role_lib.feed(self.roles.declared["actor"], actor_mb)
                    critic_mb = role_lib.feed(self.roles.declared["critic"], mb)
                    state["actor"], am = self.roles.actor.step(state["actor"], actor_mb)
                    state["critic"], cm = self.roles.critic.step(state["critic"], critic_mb)
                    if p.ema > 0:
                        state["ema"] = self._ema(state["ema"], state["actor"].params)
                    actor_m.append(am)
                    critic_m.append(cm)
        actor_m, critic_m = self._per_update(actor_m), self._per_update(critic_m)
        keep = ("policy_loss", "clipfrac", "approx_kl", "entropy", "ptx_loss", "grad_norm")
        out = {k: actor_m[k] for k in keep if k in actor_m}
        out.update(value_loss=critic_m["value_loss"], vf_clipfrac=critic_m["vf_clipfrac"],
                   loss=actor_m["loss"] + critic_m["loss"])
        return state, out

    def _per_update(self, micro: list[dict]) -> dict:
        """Mini-batch metrics -> one set per optimizer update (`optim.grad_accum` mini-batches each,
        `build.window_metrics`) -> their weighted mean over the PPO step."""
        micro, k = jax.device_get(micro), self.cfg.optim.grad_accum
        return build.weighted_mean([build.window_metrics(micro[i:i + k]) for i in range(0, len(micro), k)])

    def _ptx_batch(self, mb: ppo.Rollout) -> ppo.Ptx:
        b = build.to_device(next(self.ptx), self.train_sharding)
        return ppo.Ptx(input_ids=b["input_ids"], attention_mask=b["attention_mask"], loss_mask=b["loss_mask"],
                       ratio=self._ptx_ratio(mb.response_mask, b["loss_mask"]))  # see ppo.actor_loss

    @functools.cached_property
    def _ptx_ratio(self):
        """(global response tokens / global ptx target tokens), one copy per ptx row."""
        def ratio(response_mask, loss_mask):
            r = response_mask.sum() / jnp.maximum(loss_mask[:, 1:].sum(), 1)
            return jnp.full(loss_mask.shape[:1], r, jnp.float32)
        return jax.jit(ratio, out_shardings=self.train_sharding)

    # ------------------------------------------------------------------------------------------- evaluate
    def evaluate(self, state, *, temperature=None) -> dict:
        """Mean reward-model score of sampled responses to the held-out prompts (and, on the synthetic
        task, the checker's task accuracy)."""
        if self.eval_prompts is None or self.cfg.ppo.eval_prompts == 0:
            return {}
        cfg_s = dataclasses.replace(self.sampler, temperature=self.sampler.temperature
                                    if temperature is None else temperature)
        # The first ppo.eval_prompts held-out prompts, every one of them: the last batch is padded and its
        # padding rows are generated but left out of the metrics.
        it = build.eval_iterator(self.eval_prompts, self.rows, self.cfg.ppo.eval_prompts)
        scores, prompts, responses = [], [], []
        p_len = self.cfg.data.max_prompt_len
        for i, batch in enumerate(it):
            valid = build.to_device({"valid": batch.pop("valid")}, self.train_sharding)["valid"]
            rolled = self.rollout(state["actor"], batch, rng_stream(self.cfg.seed, "eval", i), sampler=cfg_s)
            with jax.set_mesh(self.mesh):
                score = self._score_only(self.roles.reward[1], rolled)
            real = to_host(valid) > 0  # every process decodes all rows
            seq, attn, resp = (to_host(x)[real] for x in (rolled.seq, rolled.attention_mask, rolled.response_mask))
            scores.append(to_host(score)[real])
            prompts += self.decode(seq[:, :p_len], attn[:, :p_len])
            responses += self.decode(seq[:, p_len:], resp)
        out = {"score": float(np.mean(np.concatenate(scores)))} if scores else {}
        if scores and self.cfg.data.paths == ("synthetic",):
            out["task_accuracy"] = synthetic.task_accuracy(prompts, responses)
        return out

    @functools.cached_property
    def _score_only(self):
        return role_lib.jit_forward(self.roles.declared["reward"], self.roles.reward[0])

    def decode(self, ids, mask) -> list[str]:
        ids, mask = np.asarray(ids), np.asarray(mask)
        return [self.roles.tokenizer.decode(row[m.astype(bool)].tolist(), skip_special_tokens=True)
                for row, m in zip(ids, mask)]


def load_prompts(cfg: RunConfig, tokenizer):
    """Training and held-out prompt arrays (left-padded to data.max_prompt_len), and the ptx rows."""
    enc = build.encoder(tokenizer)
    if cfg.data.paths == ("synthetic",):
        train, _ = build.load_split(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_fraction=0.0)),
                                    "prompt", tokenizer)
        paths, _ = build.dataset_paths(cfg, "eval")
        evals = load_records(paths, need="prompt", seed=cfg.seed).records
    else:
        train, evals = build.load_split(cfg, "prompt", tokenizer)
    train_arrays = tokenize_prompts(train, enc, max_prompt_len=cfg.data.max_prompt_len).arrays
    eval_arrays = tokenize_prompts(evals, enc, max_prompt_len=cfg.data.max_prompt_len).arrays if evals else None
    ptx = None
    if cfg.ppo.ptx_coef > 0:
        recs = load_records(cfg.data.ptx_path, need="sft", seed=cfg.seed, tokenizer=tokenizer).records
        ptx = tokenize_sft(recs, enc, max_len=cfg.data.max_prompt_len + cfg.generation.max_new_tokens,
                           max_prompt_len=cfg.data.max_prompt_len, loss_on_prompt=True).arrays
    return train_arrays, eval_arrays, ptx


def run(cfg: RunConfig) -> dict:
    """`jaxrl ppo`: trains the actor and critic; writes OUTPUT/hf (actor), hf-critic, hf-ema."""
    mesh = build.training_mesh(cfg)
    roles = load_roles(cfg, mesh)
    prompts, eval_prompts, ptx = load_prompts(cfg, roles.tokenizer)
    trainer = PPO(cfg, mesh, roles, prompts, eval_prompts, ptx)

    def export(state, directory):
        with jax.set_mesh(mesh):
            save_pretrained(roles.actor.model(state["actor"]), directory, tokenizer=roles.tokenizer)
            if directory.endswith("hf"):
                save_pretrained(roles.critic.model(state["critic"]), directory + "-critic", tokenizer=roles.tokenizer)
                if cfg.ppo.ema > 0:
                    ema = nnx.merge(roles.actor.graphdef, state["ema"], state["actor"].frozen)
                    save_pretrained(ema, directory + "-ema", tokenizer=roles.tokenizer)

    return run_loop(cfg, trainer, export, name="ppo")


def run_loop(cfg: RunConfig, trainer, export, *, name: str) -> dict:
    """Runs an RL trainer (PPO, or one of the GRPO family) in the shared loop; returns its last eval metrics.

    `trainer` gives init_state, update, evaluate, data_state and restore_data; `export(state, directory)`
    writes its models."""
    result = {}

    def evaluate(state):
        result.update(trainer.evaluate(state))
        return dict(result)

    spec = loop.Loop(name=name, steps=cfg.train.steps, state=trainer.init_state(), update=trainer.update,
                     evaluate=evaluate, export=export, data_state=trainer.data_state,
                     restore_data=trainer.restore_data, show=("reward/score", "kl"),
                     allow_nonfinite=cfg.precision.compute == "fp16", config=cfg)
    loop.run(spec, build.schedule(cfg), cfg.output)
    return result
