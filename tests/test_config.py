"""Typed config: defaults, YAML + key=value overrides, errors that name the key, YAML round trip."""
import dataclasses
import pathlib

import pytest

from jaxrl.config import (
    RunConfig,
    TrainSection,
    apply_overrides,
    config_keys,
    from_dict,
    load_config,
    save_yaml,
    to_dict,
)
from jaxrl.errors import JaxrlError

REPO = pathlib.Path(__file__).resolve().parents[1]

# The keys DESIGN.md promises mean the same thing in every command.
DESIGN_KEYS = [
    "model.path", "data.path", "data.format", "data.split", "mesh.data", "mesh.fsdp", "mesh.tensor",
    "zero_stage", "precision.compute", "optim.lr", "optim.grad_accum", "train.steps",
    "train.batch_size", "train.log_every", "train.eval_every", "train.save_every", "seed", "output",
    "generation.mesh.data", "generation.mesh.tensor",
]


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_build_and_hold_the_design_keys():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert (cfg.model.path, cfg.mesh.data, cfg.zero_stage, cfg.precision.compute) == ("tiny", -1, 0, "fp32")
    assert set(DESIGN_KEYS) <= set(config_keys(RunConfig))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1


def test_yaml_and_overrides_apply_with_types(tmp_path):
    path = write(tmp_path, "optim: {lr: 1e-4}\ntrain: {steps: 5, batch_size: 8}\nppo: {kl_coef: 1}\n")
    cfg = load_config(path, [
        "train.steps=10", "mesh.data=-1", "mesh.fsdp=2", "precision.compute=bf16",
        "data.path=[a.jsonl, b.jsonl]", "model.critic_path=", "data.split=10,0,0", "generation.top_p=0.9",
        "sft.loss_on_prompt=true", "output=2024",
    ])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-4 as a string
    assert cfg.ppo.kl_coef == 1.0 and isinstance(cfg.ppo.kl_coef, float)
    assert (cfg.train.steps, cfg.train.batch_size) == (10, 8)  # the override beats the file
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.precision.compute) == (-1, 2, "bf16")
    assert cfg.data.path == ("a.jsonl", "b.jsonl") and cfg.data.paths == ("a.jsonl", "b.jsonl")
    assert cfg.model.critic_path == "" and cfg.data.split == "10,0,0"
    assert cfg.output == "2024"  # text fields keep what was typed
    assert cfg.generation.top_p == 0.9 and cfg.sft.loss_on_prompt is True


def test_overrides_are_validated_together():
    # 12 % 1 and 16 % 3 would each fail a one-at-a-time check only in the other order.
    cfg = apply_overrides(RunConfig(), ["optim.grad_accum=3", "train.batch_size=12"])
    assert (cfg.optim.grad_accum, cfg.train.batch_size) == (3, 12)
    assert apply_overrides(cfg, []) is cfg


@pytest.mark.parametrize("source, key, suggestion", [
    ("yaml", "train: {stpes: 3}", "train.steps"),
    ("override", "optim.lrr=1", "optim.lr"),
    ("override", "steps=3", "train.steps"),  # the right key at the wrong level
])
def test_unknown_key_names_it_and_suggests_the_close_match(tmp_path, source, key, suggestion):
    args = (write(tmp_path, key), []) if source == "yaml" else (None, [key])
    with pytest.raises(JaxrlError, match=f"did you mean '{suggestion}'") as e:
        load_config(*args)
    bad = key.split("=")[0] if source == "override" else "train.stpes"
    assert f"unknown config key '{bad}'" in str(e.value)
    assert "Valid keys" in str(e.value)


def test_unknown_key_lists_the_valid_keys_at_its_level():
    with pytest.raises(JaxrlError) as e:
        from_dict(RunConfig, {"train": {"zzz": 1}})
    assert "under 'train'" in str(e.value) and "batch_size, log_every" in str(e.value)


@pytest.mark.parametrize("overrides, words", [
    (["train.steps=ten"], ["train.steps", "int", "'ten'"]),
    (["train.steps=true"], ["train.steps", "int", "True"]),  # bool is no int here
    (["optim.lr=fast"], ["optim.lr", "float", "'fast'"]),
    (["precision.compute=fp8"], ["precision.compute", "'fp32'", "'fp8'"]),
    (["model.lora.targets=[q, 3]"], ["model.lora.targets[1]", "str", "3"]),
    (["train=5"], ["train", "mapping", "5"]),
])
def test_wrong_type_names_key_expected_type_and_value(overrides, words):
    with pytest.raises(JaxrlError) as e:
        load_config(None, overrides)
    for word in words:
        assert word in str(e.value)


@pytest.mark.parametrize("override", ["train.steps", "=3", " =3"])
def test_malformed_override(override):
    with pytest.raises(JaxrlError, match="malformed override"):
        apply_overrides(RunConfig(), [override])


def test_override_into_a_value_is_an_error():
    with pytest.raises(JaxrlError, match="'train.steps' is a value"):
        apply_overrides(RunConfig(), ["train.steps.x=1"])


def test_file_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(JaxrlError, match=f"config file '{missing}' not found"):
        load_config(missing)
    with pytest.raises(JaxrlError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(JaxrlError, match="not valid YAML"):
        load_config(write(tmp_path, "train: {steps: 3\n"))
    assert load_config(write(tmp_path, "# nothing\n")) == RunConfig()


@pytest.mark.parametrize("overrides, message", [
    (["zero_stage=4"], "zero_stage must be 0, 1, 2 or 3, got 4"),
    (["train.steps=0"], "train.steps must be >= 1, got 0"),
    (["generation.mesh.tensor=0"], "generation.mesh.tensor must be an axis size >= 1 or -1, got 0"),
    (["mesh.fsdp=-1"], "mesh.fsdp is -1 and so is 'data'"),
    (["data.split=2,4"], "data.split must be three comma-separated numbers"),
    (["data.split=0,0,0"], "data.split must be non-negative numbers with a positive sum"),
    (["data.split=1,nan,1"], "data.split must be non-negative numbers with a positive sum"),
    (["data.max_prompt_len=64"], "data.max_prompt_len (64) must be < data.max_len (64)"),
    (["generation.top_p=0"], "generation.top_p must be in (0, 1]"),
    (["generation.engine=paged"], "generation.engine must be one of static, slots; got 'paged'"),
    (["generation.slots=-1"], "generation.slots must be >= 0"),
    (["ppo.lam=1.5"], "ppo.lam must be in [0, 1], got 1.5"),
    (["ppo.mini_batches=3"], "ppo.rollout_batch_size (16) must be divisible by ppo.mini_batches (3)"),
    (["model.lora.rank=-1"], "model.lora.rank must be >= 0, got -1"),
    (["train.batch_size=10", "optim.grad_accum=4"],
     "train.batch_size (10) must be divisible by optim.grad_accum (4)"),
    (["optim.lr=0"], "optim.lr must be > 0"),  # a section defined in jaxrl.optim
    (["precision.loss_scale.hysteresis=0"], "precision.loss_scale.hysteresis must be"),
    (["ppo.ptx_coef=0.5"], "ppo.ptx_coef is 0.5 but data.ptx_path is empty"),
    (["distributed.num_processes=2", "distributed.process_id=2"], "distributed.process_id (2) must be <"),
    (["ppo.adaptive_kl=true", "ppo.kl_coef=0"], "ppo.adaptive_kl is on but ppo.kl_coef is 0"),
    (["model.logits_chunk=-1"], "model.logits_chunk must be >= 0, got -1"),
    (["ppo.frozen_dtype=bf16"], "config key 'ppo.frozen_dtype' expects one of 'compute', 'fp32'"),
])
def test_range_validation_names_the_field(overrides, message):
    with pytest.raises(JaxrlError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_direct_construction_validates_too():
    with pytest.raises(JaxrlError, match="steps must be >= 1"):
        TrainSection(steps=0)


def test_save_yaml_round_trips(tmp_path):
    cfg = load_config(None, [
        "data.path=[a.jsonl, b.jsonl]", "optim.lr=3e-5", "ppo.critic_lr=1e-6", "model.lora.rank=4",
        "model.lora.targets=[q, k, v]", "precision.compute=fp16", "output=out/x", "mesh.data=2",
        "mesh.tensor=-1",
    ])
    path = tmp_path / "out" / "config.yaml"
    save_yaml(cfg, path)
    assert load_config(path) == cfg
    assert to_dict(load_config(path)) == to_dict(cfg)
    assert not list(path.parent.glob("*.tmp"))


def test_tiny_yaml_loads():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.steps=2"])
    assert isinstance(cfg, RunConfig) and cfg.train.steps == 2
