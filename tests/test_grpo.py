"""The GRPO family end to end on a tiny random model: one GRPO step on 8 devices (ZeRO-3 over fsdp=8, the
Hybrid Engine generating on data=4 x tensor=2, two accumulated mini-batches, through `jaxrl grpo`) against
1 device and one mini-batch, with token-mean aggregation; reward functions that raise or return NaN inside
the run; `jaxrl plan --step grpo`; and the config's errors."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrl import cli
from jaxrl.config import load_config
from jaxrl.data import synthetic
from jaxrl.errors import JaxrlError
from jaxrl.models.hf import load_pretrained, save_pretrained
from jaxrl.models.transformer import Transformer
from jaxrl.parallel.mesh import make_mesh
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
