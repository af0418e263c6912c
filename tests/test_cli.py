"""The command line: routing, help, and a DeepSpeed config file mapped onto a training run."""

import json

import pytest
import yaml

from jaxrl import cli


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_sft_reads_a_deepspeed_config(tmp_path):
    ds = tmp_path / "ds_config.json"
    ds.write_text(json.dumps({
        "train_batch_size": 16, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 2, "overlap_comm": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 0.01}},
    }))
    out = tmp_path / "run"
    args = ["sft", "--deepspeed", str(ds), "--output", str(out), "model.path=tiny", "data.max_len=16",
            "data.max_prompt_len=8", "train.steps=2", "train.log_every=1", "train.eval_every=0",
            "optim.weight_decay=0.05"]  # the command line wins over the DeepSpeed file
    with pytest.warns(UserWarning, match="overlap_comm"):
        assert cli.main(args) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["batch_size"] == 16 and cfg["optim"]["grad_accum"] == 2
    assert cfg["zero_stage"] == 2 and cfg["optim"]["clip_norm"] == 0.5 and cfg["optim"]["lr"] == 2e-3
    assert cfg["optim"]["weight_decay"] == 0.05
    assert (out / "hf" / "model.safetensors").exists()
