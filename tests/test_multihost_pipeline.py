"""Multi-host `jaxrl pipeline`: 2 processes x 4 CPU devices run all three steps to the end (its own file so
that a second test worker can run it beside tests/test_multihost.py)."""

import json
import os

from test_multihost import _launch, _wait


def test_two_processes_run_the_pipeline_to_the_end(tmp_path):
    """Issue 'Run at scale': the 2-process path runs `jaxrl pipeline` at reduced size to the end."""
    from test_pipeline import REDUCED

    reports = tmp_path / "reports"
    reports.mkdir()
    args = ["pipeline", *REDUCED, "pipeline.eval_prompts=16",
            "pipeline.sft=[train.steps=6, optim.lr=3e-3]", "pipeline.reward=[train.steps=4]",
            "pipeline.ppo=[train.steps=2, ppo.rollout_batch_size=16, ppo.eval_prompts=16]"]
    _wait(_launch(tmp_path / "run", reports, args=args), reports)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary) == {"sft", "reward", "ppo"}
    assert 0.0 <= summary["ppo"]["task_accuracy_after"] <= 1.0
    assert os.path.exists(tmp_path / "run" / "step3_ppo" / "hf" / "model.safetensors")
