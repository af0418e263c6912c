"""Multi-host slot engine: a GRPO run with generation.engine=slots on 2 processes x 4 CPU devices makes the
rollouts, metrics and weights of 1 process x 8 devices (its own file so that a second test worker can run
it beside tests/test_multihost.py)."""

import jax
import numpy as np
from flax import nnx

from jaxrl import cli
from jaxrl.data import synthetic
from jaxrl.models.hf import load_pretrained, save_pretrained
from jaxrl.models.transformer import Transformer
from jaxrl.train import build
from jaxrl.train.metrics import read_metrics
from test_multihost import _launch, _wait


def _grpo_args(root):
    """Two GRPO steps of 16 rollouts (4 prompts x 4 samples) in 8 slots, so slots are refilled, and a
    group's samples share prefills; generation on data=4 x tensor=2 (each process holds half the slots)."""
    return ["grpo", f"model.path={root}/sft", "data.max_prompt_len=8", "data.max_len=16", "generation.max_new_tokens=6",
            "generation.temperature=1.0", "generation.engine=slots", "generation.slots=8", "generation.mesh.data=4",
            "generation.mesh.tensor=2", "algorithm=grpo", "grpo.group_size=4", "ppo.rollout_batch_size=16",
            "ppo.eval_prompts=0", "reward.functions=[reward_fixtures:length]", "reward.weights=[1.0]",
            "reward.workers=1", "optim.lr=1e-3", "optim.warmup_steps=0", "train.steps=2", "train.log_every=1",
            "seed=0"]


def test_two_processes_run_the_slot_engine_like_one(tmp_path):
    tok = synthetic.build_tokenizer()
    model = Transformer(build.model_arch("tiny", tok), rngs=nnx.Rngs(1))
    # A random model almost never samples EOS; a scaled EOS column makes responses end at different
    # lengths, so slots free up at different steps and are refilled.
    kernel = model.lm_head.kernel
    kernel[...] = kernel[...].at[:, tok.eos_token_id].multiply(60.0)
    save_pretrained(model, str(tmp_path / "sft"), tokenizer=tok)
    multi, single, reports = tmp_path / "multi", tmp_path / "single", tmp_path / "reports"
    reports.mkdir()
    for out in (multi, single):
        synthetic.write_dataset_files(str(out / "data"), sizes={"sft": 8, "preference": 8, "prompt": 32, "eval": 8},
                                      seed=0)
    args = _grpo_args(tmp_path)
    procs = _launch(multi, reports, args=args)  # the workers start up while this process runs the reference
    try:
        assert cli.main([*args, "--output", str(single)]) == 0
    finally:
        _wait(procs, reports)

    one, two = read_metrics(single), read_metrics(multi)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    assert [r["step"] for r in two if "loss" in r] == [1, 2]
    assert 0 < one[0]["response_length"] < 5  # rows ended at different lengths: slots were refilled
    for a, b in zip(one, two):
        assert sorted(a) == sorted(b)
        for key in a:
            if key.startswith("time/") or key.endswith("/time_s"):
                continue
            # The same samples (each item's keys do not depend on its slot or process); only the order of
            # cross-process sums may differ.
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=f"step {a['step']} {key}")
    want = nnx.to_pure_dict(nnx.state(load_pretrained(str(single / "hf")), nnx.Param))
    got = nnx.to_pure_dict(nnx.state(load_pretrained(str(multi / "hf")), nnx.Param))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(want)]
    assert paths == [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(got)]
    for path, x, y in zip(paths, jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=path)
