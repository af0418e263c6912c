"""Steps 1 and 2 end to end through the CLI: SFT learns, the reward model ranks, its HF export scores
like jaxrl, `jaxrl eval-reward` reports, killed and stopped runs resume exactly, bad inputs fail clearly.

Every run uses the same tiny shapes (`SHAPES`) and runs in-process through `jaxrl.cli.main`, except the
one that must die by SIGKILL.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from device_env import device_env
from jaxrl import cli
from jaxrl.data import synthetic
from jaxrl.data.formats import PreferenceRecord, PromptRecord
from jaxrl.data.tokenize import Encoder, tokenize_pairs, tokenize_sft
from jaxrl.models.hf import load_pretrained
from jaxrl.models.transformer import last_token_index
from jaxrl.train import loop as loop_module
from jaxrl.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
# Task sequences are <= 11 tokens ("37+45=82" + EOS): one small model and one short shape for every run
# of this file, whatever the embedded default grows into.
SHAPES = ["model.path=tiny", "data.max_len=16", "data.max_prompt_len=8", "train.batch_size=16"]
SFT = [*SHAPES, "train.steps=40", "train.eval_every=10", "train.log_every=10", "optim.lr=3e-3"]
REWARD = [*SHAPES, "train.steps=60", "train.eval_every=0", "train.log_every=20", "optim.lr=3e-3"]


def jaxrl(*argv) -> int:
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One SFT run and the reward model trained from its export, shared by the tests below."""
    root = tmp_path_factory.mktemp("runs")
    sft, reward = root / "sft", root / "reward"
    assert jaxrl("sft", "--config", TINY, "--output", sft, *SFT) == 0
    assert jaxrl("reward", "--config", TINY, "--output", reward, *REWARD, f"model.path={sft / 'hf'}") == 0
    return {"sft": sft, "reward": reward}


@pytest.fixture(scope="module")
def held_out_pairs(tmp_path_factory):
    """Preference pairs on problems no training file holds (the task's held-out split)."""
    rows = synthetic.make_task_rows(512, seed=1, kind="preference", held_out=True)
    path = tmp_path_factory.mktemp("held_out") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


# ---------------------------------------------------------------------------------------------- step 1
def test_sft_lowers_eval_loss(runs):
    evals = [r for r in read_metrics(runs["sft"]) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    first, last = evals[0]["eval/loss"], evals[-1]["eval/loss"]
    print(f"SFT eval/loss: step 10 {first:.3f} -> step 40 {last:.3f}")
    assert last < first - 0.2
    assert os.path.exists(runs["sft"] / "hf" / "model.safetensors")


def test_prompt_tokens_are_masked_unless_asked():
    enc = Encoder.from_tokenizer(synthetic.build_tokenizer())
    records = [PromptRecord("12+30=", "42", "a"), PromptRecord("7+8=", "15", "b")]
    masked = tokenize_sft(records, enc, max_len=16, loss_on_prompt=False).arrays
    full = tokenize_sft(records, enc, max_len=16, loss_on_prompt=True).arrays
    np.testing.assert_array_equal(masked["input_ids"], full["input_ids"])
    for row, (p, r) in enumerate([("12+30=", "42"), ("7+8=", "15")]):
        n_prompt, n_real = len(p), len(p) + len(r) + 1  # + EOS
        expected = np.zeros(16, np.int32)
        expected[n_prompt:n_real] = 1  # the response and its EOS only
        np.testing.assert_array_equal(masked["loss_mask"][row], expected)
        # With the prompt in the loss every real token after the first is a target (position 0 has no
        # earlier token to be predicted from, so the shifted loss never reads it).
        np.testing.assert_array_equal(full["loss_mask"][row, 1:], full["attention_mask"][row, 1:])
        assert full["attention_mask"][row].sum() == n_real


# ---------------------------------------------------------------------------------------------- step 2
def test_reward_model_ranks_held_out_pairs(runs, held_out_pairs, tmp_path, capsys):
    final = read_metrics(runs["reward"])[-1]
    assert final["step"] == 60 and "eval/accuracy" in final
    path, rows = held_out_pairs
    report_file = tmp_path / "report.json"
    capsys.readouterr()
    assert jaxrl("eval-reward", "--model", runs["reward"] / "hf", "--data", path, "--max-len", 16,
                 "--batch-size", 64, "--output", report_file) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads(report_file.read_text())
    assert printed == report and report["pairs"] == len(rows) and report["dropped"] == 0
    for key in ("accuracy", "chosen_mean", "rejected_mean", "margin_mean", "margin_std"):
        assert np.isfinite(report[key])
    assert report["margin_mean"] == pytest.approx(report["chosen_mean"] - report["rejected_mean"], abs=1e-9)
    q = report["quantiles"]["margin"]
    assert q["p0"] <= q["p25"] <= q["p50"] <= q["p75"] <= q["p100"]

    # eval-reward's accuracy is the share of pairs the exported model ranks right, scored independently.
    chosen, rejected = _hf_pair_scores(runs["reward"] / "hf", rows)
    right = chosen > rejected
    assert report["accuracy"] == pytest.approx(np.mean(right), abs=1.5 / len(rows))
    assert report["chosen_mean"] == pytest.approx(np.mean(chosen), rel=1e-4, abs=1e-5)

    # In 60 steps the tiny model learns what a wrong answer looks like, not addition itself: it ranks
    # pairs whose rejected answer has the wrong number of digits or an impossible leading digit (sums
    # stay below 200), and is near chance on the rest, which only arithmetic tells apart.
    cue = np.array([_visibly_wrong(r) for r in rows])
    with capsys.disabled():
        print(f"\nreward model on {len(rows)} pairs of unseen problems: pairwise accuracy {report['accuracy']:.3f} "
              f"(visibly wrong rejected answers: {right[cue].mean():.3f} of {cue.sum()}; the rest: "
              f"{right[~cue].mean():.3f}); eval/accuracy {final['eval/accuracy']:.3f} on its held-out rows")
    assert cue.sum() >= 50 and right[cue].mean() > 0.75
    assert np.mean(chosen[cue] - rejected[cue]) > 0


def _visibly_wrong(row) -> bool:
    chosen, rejected = row["chosen"], row["rejected"]
    return len(rejected) != len(chosen) or (len(rejected) == 3 and rejected[0] != "1")


def _pairs(rows):
    return [PreferenceRecord(r["prompt"], r["chosen"], r["rejected"], str(i)) for i, r in enumerate(rows)]


def _hf_pair_scores(model_dir, rows):
    """transformers' scores (N,), (N,) for right-padded pairs (it reads the last non-pad token)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    a = tokenize_pairs(_pairs(rows), Encoder.from_tokenizer(AutoTokenizer.from_pretrained(model_dir)),
                       max_len=16).arrays
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            ids, mask = (torch.tensor(a[f"{side}_{k}"], dtype=torch.long) for k in ("input_ids", "attention_mask"))
            out.append(model(input_ids=ids, attention_mask=mask).logits[:, 0].numpy())
    return out


@pytest.fixture(scope="module")
def scorer(runs):
    """jaxrl's reward model from the export: a jitted (ids, mask) -> (sequence scores (B,), values (B, T))."""
    from flax import nnx

    graphdef, state = nnx.split(load_pretrained(str(runs["reward"] / "hf"), kind="score"))

    @jax.jit
    def score(ids, mask):
        model = nnx.merge(graphdef, state)
        return model.sequence_score(ids, mask), model(ids, mask)

    return lambda ids, mask: tuple(np.asarray(x) for x in score(jnp.asarray(ids), jnp.asarray(mask)))


def test_hf_export_scores_equal_jaxrl(runs, held_out_pairs, scorer):
    model_dir = runs["reward"] / "hf"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification") and len(config["id2label"]) == 1
    rows = held_out_pairs[1][:32]
    a = tokenize_pairs(_pairs(rows), Encoder.from_tokenizer(synthetic.build_tokenizer()), max_len=16).arrays
    hf_chosen, hf_rejected = _hf_pair_scores(model_dir, rows)
    for side, hf in (("chosen", hf_chosen), ("rejected", hf_rejected)):
        ours, _ = scorer(a[f"{side}_input_ids"], a[f"{side}_attention_mask"])  # right-padded (32, 16)
        assert np.ptp(ours) > 1e-3  # a trained head: scores differ between rows
        np.testing.assert_allclose(ours, hf, rtol=1e-4, atol=1e-4 * np.abs(hf).max())


def test_score_is_read_at_the_last_real_token_for_either_padding(held_out_pairs, scorer):
    enc = Encoder.from_tokenizer(synthetic.build_tokenizer())
    right = tokenize_pairs(_pairs(held_out_pairs[1][:32]), enc, max_len=16).arrays
    ids_r, mask_r = right["chosen_input_ids"], right["chosen_attention_mask"]  # (32, 16)
    lengths = mask_r.sum(1)
    assert len(set(lengths)) > 1  # rows of different lengths
    ids_l, mask_l = np.full_like(ids_r, enc.pad_id), np.zeros_like(mask_r)
    for i, n in enumerate(lengths):
        ids_l[i, 16 - n:], mask_l[i, 16 - n:] = ids_r[i, :n], 1
    rows = np.arange(32)
    np.testing.assert_array_equal(last_token_index(jnp.asarray(mask_r)), lengths - 1)
    np.testing.assert_array_equal(last_token_index(jnp.asarray(mask_l)), np.full(32, 15))
    assert (ids_r[rows, lengths - 1] == enc.eos_id).all()  # the last real token is the EOS

    score_r, values_r = scorer(ids_r, mask_r)  # (32,), (32, 16) per-token values
    score_l, values_l = scorer(ids_l, mask_l)
    np.testing.assert_array_equal(score_r, values_r[rows, lengths - 1])
    np.testing.assert_array_equal(score_l, values_l[:, 15])
    # Left padding shifts the tokens but not their positions: the same values, the same score.
    np.testing.assert_allclose(score_l, score_r, rtol=1e-5, atol=1e-6)
    assert not np.allclose(values_r[rows, lengths - 2], score_r)  # the position matters


# ------------------------------------------------------------------------------------------------ resume
# The SFT run of `runs` is the uninterrupted reference; checkpoints change nothing in what is trained.
RESUME = [*SFT, "train.save_every=4"]


def _sigkill_after_checkpoint(output, step: int, log_path) -> None:
    """Starts `jaxrl sft` in a subprocess and SIGKILLs it once checkpoint `step` is finalised."""
    cmd = [sys.executable, "-m", "jaxrl.cli", "sft", "--config", TINY, "--output", str(output), *RESUME]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=device_env(8), cwd=REPO)
    # Orbax writes a step into a temporary directory and renames it to `<step>` once complete.
    target, deadline = output / "checkpoints" / str(step), time.monotonic() + 120
    try:
        while not target.is_dir():
            assert proc.poll() is None, f"the run ended before checkpoint {step}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"no checkpoint {step} after 120 s:\n{log_path.read_text()}"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _final_state(output):
    from safetensors.numpy import load_file

    return read_metrics(output), load_file(str(output / "hf" / "model.safetensors"))


def test_killed_and_stopped_runs_resume_to_the_same_result(runs, tmp_path, monkeypatch, capsys, caplog):
    start = time.perf_counter()
    caplog.set_level(logging.INFO, logger="jaxrl.train.loop")
    resumed = tmp_path / "resumed"

    # 1. SIGKILL right after the checkpoint at step 4: no later checkpoint is finalised, no export.
    _sigkill_after_checkpoint(resumed, 4, tmp_path / "killed.log")
    assert not (resumed / "hf").exists()
    killed_at = max(int(d) for d in os.listdir(resumed / "checkpoints") if d.isdigit())
    assert 4 <= killed_at < 14

    # 2. Rerun the same command; SIGTERM it at step 14: it saves a checkpoint there and exits 1.
    class SigtermAt14(loop_module.Progress):
        def update(self, step, metrics):
            super().update(step, metrics)
            if step == 14:
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop_module, "Progress", SigtermAt14)
    capsys.readouterr()
    assert jaxrl("sft", "--config", TINY, "--output", resumed, *RESUME) == 1
    err = capsys.readouterr().err
    assert "jaxrl sft: error: sft: SIGTERM received; checkpoint saved at step 14" in err
    assert "run the same command again to resume" in err
    assert f"resumed from the checkpoint at step {killed_at}" in caplog.text
    assert (resumed / "checkpoints" / "14").is_dir() and not (resumed / "hf").exists()
    monkeypatch.undo()

    # 3. Rerun to the end: the reference's metrics, line for line, and bit-identical parameters.
    caplog.clear()
    assert jaxrl("sft", "--config", TINY, "--output", resumed, *RESUME) == 0
    assert "resumed from the checkpoint at step 14" in caplog.text
    (metrics_a, params_a), (metrics_b, params_b) = _final_state(runs["sft"]), _final_state(resumed)
    assert [r["step"] for r in metrics_b] == [10, 10, 20, 20, 30, 30, 40, 40]  # train and eval lines
    assert metrics_b[-1] == metrics_a[-1] and metrics_b == metrics_a
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        np.testing.assert_array_equal(params_b[name], params_a[name], err_msg=name)
    with capsys.disabled():
        print(f"\nresume test (SIGKILLed run + SIGTERMed rerun + rerun to the end): "
              f"{time.perf_counter() - start:.1f} s")


# -------------------------------------------------------------------------------------------- bad inputs
def _data(tmp_path, text):
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    return f"data.path={path}"


SPLIT = {"sft": "data.split=1,0,0", "reward": "data.split=0,1,0"}  # every row to the step under test


@pytest.mark.parametrize("command, make_args, message", [
    ("sft", lambda p: [_data(p, '{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2=", "resp\n')],
     "data.jsonl line 2: invalid JSON"),
    ("sft", lambda p: [_data(p, '{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2="}\n')],
     "data.jsonl line 2: no response"),
    ("reward", lambda p: [_data(p, '{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n'
                                   '{"prompt": "", "chosen": "4", "rejected": "5"}\n')],
     "data.jsonl line 2: column 'prompt' is empty"),
    ("sft", lambda p: ["train.stepz=3"], "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    ("sft", lambda p: ["train.steps=many"], "config key 'train.steps' expects int, got 'many'"),
    ("sft", lambda p: ["mesh.data=16"], "needs 16 devices but 8 are available"),
    ("reward", lambda p: [f"model.path={p / 'no-such-model'}"],
     "no-such-model' is neither an HF directory nor a preset"),
], ids=["malformed-json", "missing-column", "empty-prompt", "unknown-key", "wrong-type", "mesh-too-large",
        "missing-model"])
def test_bad_inputs_fail_with_a_clear_error(tmp_path, capsys, command, make_args, message):
    output = tmp_path / "out"
    args = make_args(tmp_path)
    assert jaxrl(command, "--config", TINY, "--output", output, *SHAPES, "train.steps=2", SPLIT[command],
                 *args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"jaxrl {command}: error: ") and message in err, err
    assert "Traceback" not in err and not (output / "hf").exists() and not (output / "checkpoints").exists()


def test_eval_reward_missing_inputs(runs, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n')
    assert jaxrl("eval-reward", "--model", tmp_path / "nope", "--data", pairs) == 1
    assert "jaxrl eval-reward: error: model directory" in capsys.readouterr().err
    assert jaxrl("eval-reward", "--model", runs["reward"] / "hf", "--data", tmp_path / "nope.jsonl") == 1
    assert "data file" in capsys.readouterr().err
    assert jaxrl("eval-reward", "--model", runs["sft"] / "hf", "--data", pairs) == 1  # a causal LM
    assert "no score head" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("command", ["sft", "reward"])
def test_accumulated_step_logs_the_metrics_of_one_big_batch(command, tmp_path):
    """optim.grad_accum=2 over two micro-batches of 8 rows logs what one step on those 16 rows logs."""
    logged = {}
    for accum in (1, 2):
        out = tmp_path / f"accum{accum}"
        assert jaxrl(command, "--config", TINY, "--output", out, *SHAPES, "train.steps=1", "train.log_every=1",
                     "train.eval_every=0", f"optim.grad_accum={accum}", "seed=3") == 0
        logged[accum] = next(r for r in read_metrics(out) if "loss" in r)
    one, acc = logged[1], logged[2]
    keys = {"loss", "accuracy"} | ({"chosen_score", "rejected_score", "margin"} if command == "reward" else set())
    assert keys <= set(acc)
    for key in sorted(keys):
        assert acc[key] == pytest.approx(one[key], abs=1e-6), key
    if command == "reward":  # equal weights (rows), so the window's mean gradient is the big batch's
        assert acc["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)


# ------------------------------------------------------------------------------------------ evaluation
@pytest.mark.parametrize("command", ["sft", "reward"])
@pytest.mark.parametrize("n, rows", [(13, 16), (21, 8)])
def test_eval_uses_every_held_out_row_at_any_size(command, n, rows):
    """Eval metrics over n held-out rows in padded batches of `rows` on 8 devices equal the loss function's
    metrics on one unpadded batch of exactly those n rows."""
    import functools

    from jaxrl.algorithms.reward import reward_loss
    from jaxrl.algorithms.sft import sft_loss
    from jaxrl.steps import role as role_lib
    from jaxrl.steps.supervised import evaluate_rows
    from jaxrl.config import load_config
    from jaxrl.parallel.mesh import make_mesh
    from jaxrl.train import build

    cfg = load_config(TINY, SHAPES)
    tok = synthetic.build_tokenizer()
    enc = Encoder.from_tokenizer(tok)
    if command == "sft":
        data = synthetic.make_task_rows(n, seed=4, kind="sft", held_out=True)
        records = [PromptRecord(r["prompt"], r["response"], str(i)) for i, r in enumerate(data)]
        arrays, kind, loss = tokenize_sft(records, enc, max_len=16, max_prompt_len=8).arrays, "causal_lm", sft_loss
    else:
        data = synthetic.make_task_rows(n, seed=4, kind="preference", held_out=True)
        arrays, kind = tokenize_pairs(_pairs(data), enc, max_len=16, max_prompt_len=8).arrays, "score"
        loss = functools.partial(reward_loss, required_margin=0.0)
    assert len(next(iter(arrays.values()))) == n
    mesh = make_mesh(8, 1, 1)
    model, layout = role_lib.born(role_lib.spec_from(cfg, kind=kind, zero_stage=0), build.model_arch("tiny", tok), mesh)
    trainer = role_lib.make_trainer(cfg, mesh, model, layout, loss)
    state = trainer.init_state()
    got = evaluate_rows(trainer, state, arrays, rows)
    _, want = jax.jit(loss)(trainer.model(jax.device_get(state)), arrays)  # one batch of the n rows, one device
    assert set(got) == set(want) - {"weight"}
    for key in sorted(got):
        assert got[key] == pytest.approx(float(want[key]), rel=1e-5, abs=1e-6), key
