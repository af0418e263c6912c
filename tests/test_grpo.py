"""The GRPO family end to end on a tiny random model: one GRPO step on 8 devices (ZeRO-3 over fsdp=8, the
Hybrid Engine generating on data=4 x tensor=2, two accumulated mini-batches, through `jaxrl grpo`) against
1 device and one mini-batch, with token-mean aggregation; reward functions that raise or return NaN inside
the run; `jaxrl plan --step grpo`; the config's errors; dapo, gspo, rloo and reinforce_pp each through the
step, showing what sets it apart; a stopped run resuming to the same metrics; and the fp32 sampler's
log-probs against the training forward's at several batch shapes and paddings."""

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl import cli
from jaxrl.config import load_config
from jaxrl.data import synthetic
from jaxrl.errors import JaxrlError
from jaxrl.models.hf import load_pretrained, save_pretrained
from jaxrl.models.transformer import Transformer
from jaxrl.parallel.mesh import make_mesh, to_host
from jaxrl.rewards.runner import RewardRunner
from jaxrl.steps import grpo, ppo
from jaxrl.train import build

ROWS, GROUP = 16, 4  # four prompts x four samples


def overrides(root):
    return [
        f"model.path={root}/sft", "data.max_prompt_len=8", "data.max_len=16", "generation.max_new_tokens=4",
        "generation.temperature=1.0", "algorithm=grpo", f"grpo.group_size={GROUP}", "grpo.loss_agg=token_mean",
        "grpo.kl_coef=0.1", "grpo.tis_cap=2.0", f"ppo.rollout_batch_size={ROWS}", "ppo.eval_prompts=0",
        # varied rewards (completion lengths), one NaN row and a function that always raises
        "reward.functions=[reward_fixtures:length, reward_fixtures:nan_first, reward_fixtures:raises]",
        "reward.weights=[1.0, 0.5, 1.0]", "reward.on_error=-1.0", "reward.workers=1",
        "optim.lr=1e-3", "optim.eps=1e-4", "optim.warmup_steps=0", "train.steps=1", "train.log_every=1", "seed=0",
    ]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    tok = synthetic.build_tokenizer()
    model = Transformer(build.model_arch("tiny", tok), rngs=nnx.Rngs(1))
    # A random model almost never samples EOS (1 of 64 logits); a scaled EOS column makes it likely in some
    # contexts, so responses end at different lengths and the rows' token counts differ.
    kernel = model.lm_head.kernel
    kernel.value = kernel.value.at[:, tok.eos_token_id].multiply(60.0)
    save_pretrained(model, str(root / "sft"), tokenizer=tok)
    for run in ("one", "eight"):
        synthetic.write_dataset_files(str(root / run / "data"), sizes={"sft": 8, "preference": 8, "prompt": 32,
                                                                      "eval": 8}, seed=0)
    return root


def one_device_step(root, name, extra=()):
    """One GRPO step on one device, driving `GRPO` directly: (metrics, final actor params)."""
    cfg = load_config(None, overrides(root) + [f"output={root}/{name}", "mesh.data=1", "generation.mesh.data=1",
                                               "generation.mesh.tensor=1", *extra])
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    roles = grpo.load_roles(cfg, mesh)
    prompts, eval_prompts, _ = ppo.load_prompts(cfg, roles.tokenizer)
    with RewardRunner(cfg.reward) as rewards:
        trainer = grpo.GRPO(cfg, mesh, roles, prompts, eval_prompts, rewards)
        state, metrics = trainer.update(trainer.init_state(), 1)
    return metrics, jax.device_get(state["actor"].params)


@pytest.fixture(scope="module")
def one(root):
    return one_device_step(root, "one")


def _close_tree(got, want, rtol):
    for path, x in jax.tree_util.tree_leaves_with_path(want):
        y = got
        for key in path:
            y = y[getattr(key, "key", getattr(key, "idx", None))]
        x, y = np.asarray(x), np.asarray(y)
        assert float(np.abs(x - y).max()) <= rtol * float(np.abs(x).max()), jax.tree_util.keystr(path)


def _compared(metrics):
    return sorted(k for k in metrics if not k.startswith("time/") and not k.endswith("/time_s"))


def test_eight_devices_zero3_generation_tp_and_grad_accum_match_one_device(root, one):
    """8 devices with two accumulated mini-batches of 8 rows (their token counts differ) make the update
    of 1 device on one batch of 16: token-mean divides by the step's global token count. Also: the failing
    functions gave their rows on_error, were counted, and the run finished."""
    want, want_params = one
    out = root / "eight"
    assert cli.main(["grpo", "--output", str(out), *overrides(root), "mesh.data=1", "mesh.fsdp=8",
                     "zero_stage=3", "generation.mesh.data=4", "generation.mesh.tensor=2", "ppo.mini_batches=2",
                     "optim.grad_accum=2"]) == 0
    with open(out / "metrics.jsonl") as f:
        (got,) = [row for row in map(json.loads, f) if "policy_loss" in row]  # the step's row (not the eval's)
    keys = _compared(want)
    assert {"kl", "clipfrac", "kl_loss", "mismatch/max_abs", "reward/length/mean", "time/generation",
            "time/reward", "time/train"} <= set(want)
    np.testing.assert_allclose([got[k] for k in keys], [want[k] for k in keys], rtol=1e-5, atol=1e-6,
                               err_msg=str(keys))
    _close_tree(nnx.to_pure_dict(nnx.state(load_pretrained(str(out / "hf")), nnx.Param)), want_params, 1e-5)
    assert want["reward/raises/errors"] == ROWS and want["reward/nan_first/errors"] == 1
    assert want["reward/raises/mean"] == -1.0
    assert want["mismatch/max_abs"] < 1e-5  # fp32 sampler and trainer agree on the same tokens
    assert np.isfinite(want["loss"]) and want["grad_norm"] > 0
    assert want["response_length"] < 4  # some responses ended early: the rows' token counts differ


def test_slot_engine_rollouts_agree_with_the_trainer(root):
    """generation.engine=slots with 8 slots for the 16 rows (refills; a group's samples share prefills): the
    engine's log-probs of its own tokens are the training forward's, and the step trains."""
    metrics, _ = one_device_step(root, "slots", ["generation.engine=slots", "generation.slots=8"])
    assert metrics["mismatch/max_abs"] < 1e-5
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert metrics["response_length"] < 4  # rows ended at different lengths


@pytest.mark.parametrize("bad, message", [
    (["grpo.group_size=3"], "ppo.rollout_batch_size (16) must be a whole number of groups of grpo.group_size=3"),
    (["grpo.group_size=1"], "grpo.group_size must be >= 2"),
    (["reward.functions=[]", "reward.weights=[]"], "reward.functions is empty and model.reward_path is not set"),
    (["grpo.reuse_sampler_logprobs=true", "generation.dtype=bf16"], "grpo.reuse_sampler_logprobs needs"),
])
def test_config_errors_name_the_key(root, bad, message):
    with pytest.raises(JaxrlError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides(root) + bad)


def test_plan_step_grpo_builds_the_runs_roles(root, capsys):
    """`jaxrl plan --step grpo` lowers the roles `grpo.roles` declares: actor, reference (KL > 0), generation."""
    rc = cli.main(["plan", "--devices", "8", "--json", "--step", "grpo", *overrides(root), "mesh.data=1",
                   "mesh.fsdp=8", "zero_stage=3", "generation.mesh.data=4", "generation.mesh.tensor=2"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [r["role"] for r in report["roles"]] == ["actor train step", "reference forward", "generation reshard",
                                                    "generation prefill", "generation decode"]
    assert all(r["arguments"] > 0 for r in report["roles"])


RECORDER = '''
import json

def record(prompts, completions, answer, **_):
    """Checks each sample's answer belongs to its prompt; appends what it saw to {out!r}."""
    with open({out!r}, "a") as f:
        f.write(json.dumps({{"prompts": list(prompts), "answers": list(answer)}}) + "\\n")
    return [float(len(c)) for c in completions]
'''


def test_reward_functions_get_each_samples_row_fields(root, tmp_path, monkeypatch):
    """GSM8K-style rows {"prompt", "answer"} through `jaxrl grpo` with math_answer: a recording reward function
    receives, for the G samples of each prompt in training and for each evaluated prompt, that row's answer;
    a reward function needing a column the rows lack stops the run before training, naming both."""
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "id": i} for i, (a, b) in
            enumerate((a, b) for a in range(1, 9) for b in range(10, 14))]  # 32 rows, each prompt once
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = tmp_path / "seen.jsonl"
    (tmp_path / "recorder.py").write_text(RECORDER.format(out=str(seen)))
    monkeypatch.syspath_prepend(str(tmp_path))  # the workers import with the trainer's sys.path
    args = ["grpo", *overrides(root), f"data.path={data}", "data.split=0,0,1", "data.eval_fraction=0.25",
            "ppo.eval_prompts=8", "mesh.data=1", "mesh.fsdp=8", "generation.mesh.data=8",
            "reward.functions=[math_answer, recorder:record]", "reward.weights=[1.0, 0.0]", "train.steps=1"]
    assert cli.main([*args, "--output", str(tmp_path / "run")]) == 0
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    answer_of = {r["prompt"]: r["answer"] for r in rows}
    train, evals = calls[0], calls[1:]
    assert len(train["prompts"]) == ROWS and len(evals) == 1 and len(evals[0]["prompts"]) == ROWS
    assert [answer_of[p] for p in train["prompts"]] == train["answers"]  # each sample got its row's answer
    groups = np.array(train["prompts"]).reshape(-1, GROUP)
    assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == ROWS // GROUP  # G samples per prompt
    eval_prompts = evals[0]["prompts"]
    assert [answer_of[p] for p in eval_prompts] == evals[0]["answers"]
    assert len(set(eval_prompts[:8])) == 8 and set(eval_prompts[8:]) == {eval_prompts[0]}  # padding: row 0 again
    assert not set(eval_prompts) & set(train["prompts"])  # held-out rows only
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    assert any("reward/math_answer/mean" in m for m in metrics)

    (tmp_path / "no_answer.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    with pytest.raises(JaxrlError, match=r"reward function math_answer needs the row field 'answer'.*no_answer\.jsonl"):
        grpo.run(load_config(None, [*args[1:], f"data.path={tmp_path / 'no_answer.jsonl'}",
                                    f"output={tmp_path / 'bad'}"]))


# ------------------------------------------------------------------------ each algorithm through the step
LENGTH = ["reward.functions=[reward_fixtures:length]", "reward.weights=[1.0]"]


@contextlib.contextmanager
def family_trainer(root, name, extra):
    """A one-device `GRPO` trainer for `overrides(root) + extra` and its initial state."""
    cfg = load_config(None, overrides(root) + [f"output={root}/{name}", "mesh.data=1", "generation.mesh.data=1",
                                               "generation.mesh.tensor=1", *extra])
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    roles = grpo.load_roles(cfg, mesh)
    prompts, eval_prompts, _ = ppo.load_prompts(cfg, roles.tokenizer)
    with RewardRunner(cfg.reward) as rewards:
        trainer = grpo.GRPO(cfg, mesh, roles, prompts, eval_prompts, rewards)
        yield trainer, trainer.init_state()


def _experience(trainer, state, step):
    """One rollout batch of `trainer` at `step`: (host experience, (B,) scores, (B, R) response mask, metrics)."""
    batch, scores, reward_metrics = trainer.collect(state["actor"], step, 0, {})
    exp, metrics = trainer.score(state, batch, scores)
    host = {k: to_host(v) for k, v in exp.items()}
    return host, scores, to_host(batch["response_mask"]), dict(jax.device_get(metrics), **reward_metrics[-1])


def _finite_update(metrics):
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0


def test_rloo_uses_the_leave_one_out_baseline(root):
    """rloo: each sample's advantage is its reward minus the mean of the other G - 1 samples' (kl_coef 0: no
    reference is loaded, no KL in the reward), on every response token; then a step trains on it."""
    with family_trainer(root, "rloo", ["algorithm=rloo", "grpo.kl_coef=0", *LENGTH]) as (t, state):
        assert t.roles.ref is None
        exp, scores, mask, _ = _experience(t, state, 1)
        r = scores.reshape(-1, GROUP).astype(np.float64)
        loo = (r - (r.sum(1, keepdims=True) - r) / (GROUP - 1)).reshape(-1)
        assert np.abs(loo).max() > 0  # the lengths differ within groups
        np.testing.assert_allclose(exp["advantages"], loo[:, None] * mask, rtol=1e-6, atol=1e-6)
        _, metrics = t.update(state, 1)
        _finite_update(metrics)
        assert metrics["kl"] == 0


def test_reinforce_pp_whitens_kl_shaped_returns_over_the_batch(root):
    """reinforce_pp: advantages are the returns whitened over every response token of the batch. At step 1
    the actor is the reference (KL 0), so they are (score - mean) / std, token-weighted (by hand); after an
    update the per-token KL in the reward makes them vary along a row, still with mean 0 and variance 1."""
    with family_trainer(root, "rpp", ["algorithm=reinforce_pp", *LENGTH]) as (t, state):
        exp, scores, mask, metrics = _experience(t, state, 1)
        assert metrics["kl"] == 0
        returns = np.broadcast_to(scores[:, None].astype(np.float64), mask.shape)
        on = mask > 0
        want = (returns - returns[on].mean()) / np.sqrt(returns[on].var() + 1e-8) * mask
        np.testing.assert_allclose(exp["advantages"], want, rtol=1e-5, atol=1e-5)
        state, step1 = t.update(state, 1)
        _finite_update(step1)
        exp, _, mask, metrics = _experience(t, state, 2)
        adv, on = exp["advantages"], mask > 0
        assert metrics["kl"] != 0
        np.testing.assert_allclose([adv[on].mean(), adv[on].var()], [0.0, 1.0], atol=1e-4)
        varies = [np.ptp(adv[i][on[i]]) > 1e-6 for i in range(len(adv)) if on[i].sum() > 1]
        assert any(varies)  # per-token KL: the return-to-go differs along a row


def test_gspo_clips_whole_sequences(root):
    """gspo: one importance ratio per sequence (geometric mean of its token ratios), clipped per sequence:
    with seq_mean_token_mean each sequence is clipped entirely or not at all, so over two mini-batches of 8
    sequences clipfrac is a multiple of 1/16; the second mini-batch (after an update) leaves GSPO's narrow
    band [1 - 3e-4, 1 + 4e-4], the first (ratio exactly 1) does not."""
    extra = ["algorithm=gspo", "grpo.loss_agg=seq_mean_token_mean", "ppo.mini_batches=2", *LENGTH]
    with family_trainer(root, "gspo", extra) as (t, state):
        assert (t.g.clip_low, t.g.clip_high) == (3e-4, 4e-4)
        _, metrics = t.update(state, 1)
        _finite_update(metrics)
        k = metrics["clipfrac"] * 2 * ROWS // 2
        assert 0 < metrics["clipfrac"] <= 0.5 and abs(k - round(k)) < 1e-4, metrics["clipfrac"]
        assert metrics["seq_ratio"] != 1.0 and abs(metrics["seq_ratio"] - 1) < 0.5


def test_dapo_dynamic_sampling_and_overlong_shaping(root):
    """dapo: asymmetric clipping and token-mean by default; the overlong penalty -max(0, |y| - 2) / 2 (buffer 2
    of 4 tokens, by hand) is added to the constant reward 1; groups whose rewards are then all equal are
    dropped and more prompts sampled (at most 2 extra rounds), and groups left short are filled with dropped
    ones; the counts show in the metrics, the returned batch has the kept groups first (the filled ones have
    advantage 0)."""
    extra = ["algorithm=dapo", "grpo.overlong_buffer=2", "reward.functions=[reward_fixtures:constant]",
             "reward.weights=[1.0]"]
    with family_trainer(root, "dapo", extra) as (t, state):
        assert (t.g.clip_low, t.g.clip_high, t.g.loss_agg, t.g.dynamic_sampling) == (0.2, 0.28, "token_mean", True)
        exp, scores, mask, metrics = _experience(t, state, 1)
        lengths = mask.sum(1)
        np.testing.assert_allclose(scores, 1.0 - np.maximum(0, lengths - 2) / 2, rtol=0, atol=1e-6)
        varied = np.ptp(scores.reshape(-1, GROUP), axis=1) > 0
        filled, dropped = metrics["dynamic/filled_groups"], metrics["dynamic/dropped_groups"]
        assert dropped > 0  # with this seed some groups' lengths all fall on one side of the buffer
        assert filled == (~varied).sum() and dropped >= filled
        assert not varied[len(varied) - int(filled):].any() and varied[:len(varied) - int(filled)].all()
        assert metrics["dynamic/extra_rounds"] == (2 if filled else metrics["dynamic/extra_rounds"])
        assert metrics["dynamic/extra_rounds"] <= 2
        # the last round's mean penalty (its rows are not all in the batch): a mean of 16 values in {0, -1/2, -1}
        overlong = metrics["reward/overlong"] * 2 * ROWS
        assert -2 * ROWS <= overlong < 0 and abs(overlong - round(overlong)) < 1e-4
        np.testing.assert_allclose(exp["advantages"][~np.repeat(varied, GROUP)], 0.0, atol=1e-6)
        _, step = t.update(state, 1)
        _finite_update(step)
        assert {"dynamic/dropped_groups", "dynamic/extra_rounds", "reward/overlong"} <= set(step)


def test_a_stopped_grpo_run_resumes_to_the_same_metrics(root, monkeypatch, caplog):
    """SIGTERM after step 1 of 2 saves a checkpoint and stops; the rerun resumes there (prompt iterator and
    RNG streams from the checkpoint) and logs step 2 and ends with the weights of an uninterrupted run."""
    import os
    import signal

    from jaxrl.train import loop as loop_module

    class SigtermAtOne(loop_module.Progress):
        def update(self, step, metrics):
            super().update(step, metrics)
            if step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    def cfg(name):
        return load_config(None, overrides(root) + [f"output={root}/{name}", "mesh.data=1", "generation.mesh.data=1",
                                                    "generation.mesh.tensor=1", "train.steps=2", *LENGTH])

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    grpo.run(cfg("straight"), mesh=mesh)
    monkeypatch.setattr(loop_module, "Progress", SigtermAtOne)
    with pytest.raises(JaxrlError, match="checkpoint saved at step 1"):
        grpo.run(cfg("resumed"), mesh=mesh)
    assert not (root / "resumed" / "hf").exists()
    monkeypatch.undo()
    caplog.set_level("INFO", logger="jaxrl.train.loop")
    grpo.run(cfg("resumed"), mesh=mesh)
    assert "resumed from the checkpoint at step 1" in caplog.text

    def rows(name):
        with open(root / name / "metrics.jsonl") as f:
            return [row for row in map(json.loads, f) if "policy_loss" in row]  # the steps' rows

    straight, resumed = rows("straight"), rows("resumed")
    assert [m["step"] for m in resumed] == [m["step"] for m in straight] == [1, 2]
    for want, got in zip(straight, resumed):
        keys = _compared(want)
        assert keys == _compared(got) and "reward/score" in keys
        np.testing.assert_allclose([got[k] for k in keys], [want[k] for k in keys], rtol=1e-5, atol=1e-6,
                                   err_msg=str(keys))
    want_params = nnx.to_pure_dict(nnx.state(load_pretrained(str(root / "straight" / "hf")), nnx.Param))
    _close_tree(nnx.to_pure_dict(nnx.state(load_pretrained(str(root / "resumed" / "hf")), nnx.Param)),
                want_params, 1e-5)


def test_fp32_sampler_and_trainer_logprobs_agree_at_any_batch_shape_or_padding(root):
    """The mismatch metric's premise: in fp32 the sampler's log-probs of its tokens equal the training
    forward's (`response_logprobs`) within 1e-5, for batches of 4 or 8 rows (dummy rows added), prompts
    left-padded to 8 or 16, and a training batch laid out differently from the sampler's (4 more pad
    columns, rows reversed)."""
    from jaxrl.algorithms import grpo as grpo_math
    from jaxrl.algorithms.ppo import response_logprobs
    from jaxrl.generation import SamplerConfig, generate_batch, pad_prompts

    tok = synthetic.build_tokenizer()
    model = load_pretrained(str(root / "sft"))
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("3+4=", "12+30=", "7+", "45+45=")]
    cfg = SamplerConfig(max_new_tokens=6, temperature=1.0, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    logp = nnx.jit(lambda m, s, a, plen: response_logprobs(m, s, a, plen)[0], static_argnums=3)
    worst = []
    for rows, length in ((4, 8), (8, 16)):
        ids, mask = pad_prompts(prompts, length, rows, tok.pad_token_id)
        out = {k: np.asarray(v) for k, v in generate_batch(model, ids, mask, cfg, jax.random.key(rows)).items()}
        assert out["mask"][:4].sum() > 4
        for extra, order in ((0, slice(None)), (4, slice(None, None, -1))):
            pad = np.full((rows, extra), tok.pad_token_id, np.int32)
            seq = np.concatenate([pad, ids, out["tokens"]], 1)[order]
            attn = np.concatenate([np.zeros_like(pad), mask, out["mask"]], 1)[order]
            trainer = np.asarray(logp(model, jnp.asarray(seq), jnp.asarray(attn), length + extra))[order]
            m = grpo_math.logprob_mismatch(jnp.asarray(out["logprobs"][:4]), jnp.asarray(trainer[:4]),
                                           jnp.asarray(out["mask"][:4]))
            worst.append(float(m["mismatch/max_abs"]))
            assert float(m["mismatch/frac_outside"]) == 0.0
    assert max(worst) < 1e-5, worst
