"""User files that are cut short or damaged: each gives one `jaxrl.errors` error that names the file, says
it is corrupt, incomplete or missing, and says what to do; the CLI prints it without a traceback and
exits 1. Also: a rejected argument or config leaves nothing on disk."""

import glob
import json
import os
import re
import shutil

import pytest

import hf_fixtures as fx
from jaxrl import cli
from jaxrl.errors import JaxrlError
from jaxrl.models.hf import load_pretrained
from jaxrl.train.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
SHAPES = ["model.path=tiny", "data.max_len=16", "data.max_prompt_len=8", "train.batch_size=16"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    fx.make_hf_model("llama", str(d))
    return d


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _cut(path, keep):
    """Truncates `path` to its first `keep` bytes (negative: drops the last -keep)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _sharded(llama_dir, tmp_path):
    """The llama model saved as shards with a model.safetensors.index.json."""
    import torch  # noqa: F401  (transformers' save needs it)
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(llama_dir)).save_pretrained(out, max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").exists()
    return out


# name -> (breaks the copied directory d, the file the message must name, words it must contain)
BREAKS = {
    "safetensors-header-cut": (lambda d: _cut(d / "model.safetensors", 100), "model.safetensors",
                               "corrupt or incomplete"),
    "safetensors-data-cut": (lambda d: _cut(d / "model.safetensors", -1000), "model.safetensors",
                             "truncated"),
    "safetensors-empty": (lambda d: _cut(d / "model.safetensors", 0), "model.safetensors", "truncated"),
    "config-json-cut": (lambda d: _cut(d / "config.json", 50), "config.json", "cut short (truncated)"),
    "config-json-incomplete": (lambda d: (d / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((d / "config.json").read_text()).items() if k != "hidden_size"})),
        "config.json", "lacks 'hidden_size'"),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_load_pretrained_names_the_broken_file(llama_dir, tmp_path, name):
    brk, filename, words = BREAKS[name]
    d = _copy(llama_dir, tmp_path / "m")
    brk(d)
    with pytest.raises(JaxrlError) as e:
        load_pretrained(str(d))
    msg = str(e.value)
    assert str(d / filename) in msg and words in msg, msg
    assert "download the model directory again" in msg  # the fix


def test_sharded_index_malformed_or_naming_a_missing_shard(llama_dir, tmp_path):
    d = _sharded(llama_dir, tmp_path)
    index = d / "model.safetensors.index.json"
    text = index.read_text()
    index.write_text(text[: len(text) // 2])
    with pytest.raises(JaxrlError, match="model.safetensors.index.json: the safetensors index is corrupt or "
                                         r"incomplete .*cut short \(truncated\)"):
        load_pretrained(str(d))
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(JaxrlError, match=r"index.json: the safetensors index is malformed \(no 'weight_map'"):
        load_pretrained(str(d))
    index.write_text(text)
    shard = sorted(glob.glob(str(d / "model-*.safetensors")))[-1]
    _cut(type(d)(shard), -500)
    with pytest.raises(JaxrlError, match=re.escape(shard) + " is corrupt or incomplete: tensor .*(truncated)"):
        load_pretrained(str(d))
    os.remove(shard)
    with pytest.raises(JaxrlError, match=f"names {os.path.basename(shard)}, which is missing .*incomplete"):
        load_pretrained(str(d))


def _fails(capsys, argv, command, *needles):
    """Runs the CLI, which must exit 1 with one error line that holds every needle and no traceback."""
    assert cli.main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"jaxrl {command}: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert str(needle) in err, err
    return err


@pytest.mark.parametrize("broken", ["model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                    "generation_config.json"])
def test_generate_names_a_cut_short_model_file(llama_dir, tmp_path, capsys, broken):
    d = _copy(llama_dir, tmp_path / "m")
    if broken == "generation_config.json":
        (d / broken).write_text('{"eos_token_id": [3, ')
    else:
        _cut(d / broken, 60)
    out = tmp_path / "out" / "gen.jsonl"
    _fails(capsys, ["generate", "--model", d, "--prompt", "the fox", "--max-new-tokens", "2", "--output", out],
           "generate", d / broken, "corrupt or incomplete")
    assert not out.parent.exists()


def test_run_yaml_and_ds_config_cut_short(tmp_path, capsys):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text('train:\n  steps: 2\nmodel: {path: "ti')
    output = tmp_path / "out"
    _fails(capsys, ["sft", "--config", yaml_file, "--output", output], "sft", yaml_file,
           "config file is corrupt or incomplete (not valid YAML", "cut short")
    ds = tmp_path / "ds_config.json"
    ds.write_text('{"train_batch_size": 16, "zero_optimization": {"stage": 2')
    _fails(capsys, ["sft", "--config", TINY, "--deepspeed", ds, "--output", output, *SHAPES], "sft", ds,
           "DeepSpeed config file is corrupt or incomplete", "cut short")
    assert not output.exists()


def test_a_damaged_checkpoint_names_its_step_and_how_to_resume(tmp_path, capsys):
    out = tmp_path / "run"
    run = ["sft", "--config", TINY, "--output", out, *SHAPES, "train.eval_every=0", "train.save_every=1",
           "train.log_every=1"]
    assert cli.main([str(a) for a in run + ["train.steps=2"]]) == 0
    capsys.readouterr()
    step2 = out / "checkpoints" / "2"
    for path in glob.glob(str(step2 / "state" / "d" / "*")):  # the arrays' data files, cut short
        _cut(type(out)(path), 10)
    _fails(capsys, run + ["train.steps=3"], "sft", f"checkpoint step 2 in {step2} is corrupt or incomplete",
           f"delete {step2} to resume from step 1")
    shutil.rmtree(step2)  # what the message says to do: step 1 is then the one a rerun resumes from
    with Checkpointer(out / "checkpoints") as ckpt:
        assert ckpt.latest_step() == 1
        _, extra = ckpt.restore()
    assert extra["step"] == 1


# ------------------------------------------------------------------ reward model export without a pad token
def _no_pad_tokenizer(unk: bool):
    """The fixture tokenizer with no pad token (like Llama's); `unk=False` also drops <unk> (Llama 3)."""
    from transformers import PreTrainedTokenizerFast

    base = fx.make_tokenizer().backend_tokenizer
    extra = dict(unk_token="<unk>") if unk else {}
    return PreTrainedTokenizerFast(tokenizer_object=base, bos_token="<bos>", eos_token="<eos>", **extra)


def _batch(tok, side: str):
    """4 texts of unequal lengths + EOS, padded on `side` with the tokenizer's pad: (ids, mask, positions)."""
    import numpy as np

    texts = ["the quick brown fox", "jax", "reinforcement learning from human feedback", "1+2=3 hello"]
    seqs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    t = max(map(len, seqs))
    ids = np.full((4, t), tok.pad_token_id, np.int64)
    mask = np.zeros((4, t), np.int64)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
        ids[i, cols], mask[i, cols] = s, 1
    assert len(set(map(len, seqs))) == 4
    return ids, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


@pytest.mark.parametrize("unk", [True, False], ids=["llama2-like-unk", "llama3-like-bos"])
def test_reward_export_without_pad_token_scores_batches_in_transformers(tmp_path, unk):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from jaxrl.models.hf import save_pretrained

    src = tmp_path / "llama"
    fx.make_hf_model("llama", str(src), pad_token_id=None)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            os.remove(src / name)
    _no_pad_tokenizer(unk).save_pretrained(src)
    assert json.loads((src / "config.json").read_text()).get("pad_token_id") is None
    assert AutoTokenizer.from_pretrained(src).pad_token_id is None

    model = load_pretrained(str(src), kind="score")  # a reward model started from a causal LM
    kernel = model.score.kernel
    kernel[...] = jax.random.normal(jax.random.key(0), kernel.shape, kernel.dtype)  # a non-trivial head
    out = tmp_path / "rm"
    save_pretrained(model, str(out))

    want = 1 if unk else 2  # <unk>, else <bos>: never the last token of a scored sequence (EOS is)
    tok = AutoTokenizer.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == want == tok.pad_token_id
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    for side in ("right", "left"):
        ids, mask, pos = _batch(tok, side)
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits[:, 0].numpy()
        ours = np.asarray(model.sequence_score(jnp.asarray(ids), jnp.asarray(mask)))
        assert np.ptp(ours) > 1e-3, ours  # rows differ: the comparison can see a wrong position
        np.testing.assert_allclose(ref, ours, rtol=1e-4, atol=1e-4, err_msg=side)


# ------------------------------------------------------------------------ nothing written before validation
def _jsonl(tmp_path, text):
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    return f"data.path={path}"


@pytest.mark.parametrize("command, extra, message", [
    ("pipeline", lambda p: ["--steps", "4"], "--steps '4': give a comma-separated subset of 1,2,3"),
    ("pipeline", lambda p: ["--steps", "2,3"], "run step 1 (SFT) first"),
    ("pipeline", lambda p: ["train.stepz=3"], "unknown config key 'train.stepz'"),
    ("sft", lambda p: ["train.stepz=3"], "unknown config key 'train.stepz'"),
    ("sft", lambda p: ["mesh.data=16"], "needs 16 devices but 8 are available"),
    ("sft", lambda p: [_jsonl(p, '{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2=", "resp\n'),
                       "data.split=1,0,0"], "data.jsonl line 2: invalid JSON"),
    ("reward", lambda p: ["zero_stage=5"], "zero_stage"),
    ("reward", lambda p: [f"model.path={p / 'no-such-model'}"], "is neither an HF directory nor a preset"),
    ("ppo", lambda p: ["precision.compute=fp8"], "precision.compute"),
    ("ppo", lambda p: [], "ppo needs model.reward_path"),
], ids=["pipeline-steps-4", "pipeline-missing-step1", "pipeline-bad-key", "sft-bad-key", "sft-mesh",
        "sft-bad-row", "reward-bad-value", "reward-missing-model", "ppo-bad-value", "ppo-no-reward-model"])
def test_a_rejected_run_writes_nothing(tmp_path, capsys, monkeypatch, command, extra, message):
    monkeypatch.chdir(tmp_path)  # the embedded default's output is the relative outputs/tiny
    output = tmp_path / "out"
    argv = [command, "--config", TINY, *SHAPES, *extra(tmp_path)]
    _fails(capsys, argv, command, message)
    assert not (tmp_path / "outputs").exists()
    _fails(capsys, argv + ["--output", output], command, message)
    assert not output.exists()


def test_generate_and_eval_reward_reject_flags_before_writing(llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    _fails(capsys, ["generate", "--model", llama_dir, "--prompt", "x", "--greedy", "--temperature", "0.7",
                    "--output", out / "gen.jsonl"], "generate", "--greedy cannot be combined")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n')
    _fails(capsys, ["eval-reward", "--model", llama_dir, "--data", pairs, "--batch-size", "0",
                    "--output", out / "report.json"], "eval-reward", "--batch-size must be >= 1")
    assert not out.exists()
