"""`jaxrl chat` (piped multi-turn chat on a tiny saved model) and `jaxrl plan` (AOT per-device memory)."""

import io
import json
import sys
from pathlib import Path

import pytest
from flax import nnx

from jaxrl import cli
from jaxrl.config import load_config
from jaxrl.data.synthetic import build_tokenizer
from jaxrl.models.config import preset
from jaxrl.models.hf import save_pretrained
from jaxrl.models.transformer import Transformer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # not the working directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A fresh tiny model over the synthetic task's character tokenizer (which has a chat template)."""
    tok = build_tokenizer()
    cfg = preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = str(tmp_path_factory.mktemp("chat") / "model")
    save_pretrained(Transformer(cfg, rngs=nnx.Rngs(0)), path, tokenizer=tok)
    return path


def run_cli(argv, monkeypatch, capsys, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def prompts_of(err: str) -> list[str]:
    """The rendered prompts `--show-prompt` printed, in order."""
    return [block.split("\n--- end ---")[0] for block in err.split("--- prompt ---\n")[1:]]


def test_chat_two_turns_keep_history_then_reset_and_exit(model_dir, monkeypatch, capsys):
    stdin = "1+2=\n3+4=\n/reset\n5+6=\n/exit\n7+8=\n"
    rc, out, err = run_cli(["chat", "--model", model_dir, "--max-new-tokens", "6", "--show-prompt"],
                           monkeypatch, capsys, stdin)
    assert rc == 0
    assert out.count("Assistant: ") == 3  # 1+2=, 3+4= and, after /reset, 5+6=; nothing after /exit
    first, second, after_reset = prompts_of(err)
    assert first == "1+2="
    # The second turn's prompt is the whole conversation: turn one, its reply and EOS, then turn two.
    assert second.startswith("1+2=") and second.endswith("<eos>3+4=")
    reply = second[len("1+2="):-len("<eos>3+4=")]
    assert reply and f"Assistant: {reply}" in out  # streamed to stdout, kept in the history
    assert after_reset == "5+6=" and "(conversation cleared)" in out


def test_chat_fallback_format_system_and_eof(model_dir, tmp_path, monkeypatch, capsys):
    """Without a chat template: DeepSpeed-Chat's `Human: ...\\n\\nAssistant:` text; end of input quits."""
    from transformers import AutoTokenizer

    from jaxrl.commands.chat import Chat
    from jaxrl.models.hf import load_pretrained

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = None
    session = Chat(load_pretrained(model_dir), tok, system="sys", max_new_tokens=3)
    pieces = []
    reply = session.say("1+1=", stream=pieces.append)
    assert "".join(pieces).strip() == reply
    assert session.render(session.history + [{"role": "user", "content": "2"}]) == (
        f"sys\n\nHuman: 1+1=\n\nAssistant: {reply}\n\nHuman: 2\n\nAssistant:")
    rc, out, _ = run_cli(["chat", "--model", model_dir, "--max-new-tokens", "2"], monkeypatch, capsys, "1=\n")
    assert rc == 0 and out.count("Assistant: ") == 1


def plan_json(argv, monkeypatch, capsys):
    rc, out, err = run_cli(["plan", "--config", str(CONFIGS / "tiny.yaml"), "--devices", "8", "--json", *argv],
                           monkeypatch, capsys)
    return rc, json.loads(out), err


def test_plan_bytes_fall_with_zero_stage_and_refuses_what_does_not_fit(monkeypatch, capsys):
    args = {}
    for stage in (0, 1, 2):
        rc, report, _ = plan_json([f"zero_stage={stage}"], monkeypatch, capsys)
        assert rc == 0 and [r["role"] for r in report["roles"]] == ["actor train step"]
        args[stage] = report["roles"][0]["arguments"]
    # Stage 3 at 1 KiB: the numbers are printed, then a refusal that names the role, the bytes and the fix.
    rc, report, err = plan_json(["zero_stage=3", "--device-memory", "1KiB"], monkeypatch, capsys)
    args[3] = report["roles"][0]["arguments"]
    print("per-device argument bytes by ZeRO stage:", args)
    # Parameters + optimizer state: stage 1 shards the AdamW moments, stage 2 only the (temporary)
    # gradients, stage 3 the parameters as well.
    assert args[0] > args[1] >= args[2] > args[3]
    # Parameters P and AdamW's two moments over 8 devices: 3P -> P + 2P/8 (stage 1) -> 3P/8 (stage 3).
    assert args[1] < 0.45 * args[0] and args[3] < 0.15 * args[0]
    assert rc == 1 and report["device_memory"] == 1024 and report["roles"][0]["fits"] is False
    needed = report["roles"][0]["needed"]
    assert "does not fit in 1.00 KiB (1,024 bytes) per device" in err
    assert "actor train step needs" in err and f"({needed:,} bytes)" in err
    assert "mesh.fsdp" in err and "train.batch_size" in err and "model.remat=full" in err


@pytest.mark.parametrize("size, expected", [("16GiB", 16 << 30), ("512MiB", 512 << 20), ("8GB", 8 * 10**9),
                                            ("1KiB", 1024), ("1.5 kb", 1500), ("100", 100)])
def test_device_memory_sizes(size, expected):
    from jaxrl.commands.plan import parse_bytes

    assert parse_bytes(size) == expected


def test_bad_device_memory_is_a_clear_error(monkeypatch, capsys):
    rc, _, err = run_cli(["plan", "--device-memory", "lots"], monkeypatch, capsys)
    assert rc == 1 and "--device-memory 'lots' is not a size" in err


@pytest.mark.parametrize("name", ["opt-1.3b", "llama3_8b_tpu", "llama3_70b_tpu"])
def test_new_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.precision.compute == "bf16" and cfg.model.reward_path
    assert cfg.data.max_prompt_len + cfg.generation.max_new_tokens <= cfg.data.max_len
    if name == "llama3_8b_tpu":
        assert cfg.mesh.fsdp == -1 and cfg.zero_stage == 3 and cfg.generation.mesh.tensor == 4
        assert cfg.model.remat == "full" and cfg.model.vocab_chunk == 16032
    elif name == "llama3_70b_tpu":
        assert cfg.mesh.fsdp == -1 and cfg.zero_stage == 3 and cfg.model.remat == "full"
        assert cfg.model.vocab_chunk == 16032
    else:
        assert cfg.mesh.data == 8 and cfg.zero_stage == 2


def test_plan_ppo_without_kl_has_no_reference_and_frozen_roles_in_bf16(monkeypatch, capsys):
    """ppo.kl_coef=0: no reference row (the model is not loaded). bf16: the frozen reward model's resident
    bytes are 2 per parameter, against the critic's 12 (fp32 master + AdamW's two fp32 moments, stage 0)."""
    argv = ["--step", "ppo", "model.reward_path=tiny", "ppo.kl_coef=0", "precision.compute=bf16"]
    rc, report, _ = plan_json(argv, monkeypatch, capsys)
    roles = {r["role"]: r for r in report["roles"]}
    assert rc == 0 and list(roles) == ["actor train step", "critic train step", "reward forward",
                                       "generation reshard", "generation prefill", "generation decode"]
    critic, reward = roles["critic train step"]["resident"], roles["reward forward"]["resident"]
    print(f"resident per device: critic {critic}, reward (bf16, frozen) {reward}")
    assert 6 * reward <= critic < 6 * reward + 64  # + the optimizer's scalar counters
