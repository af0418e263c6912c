"""Multi-host training: 2 processes x 4 CPU devices on localhost (gloo collectives) train like 1 process
x 8 devices, and only process 0 writes the run's metrics and HF export."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from device_env import device_env
from jaxrl import cli
from jaxrl.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multihost_worker.py")
ARGS = ["sft", "--config", os.path.join(REPO, "configs", "tiny.yaml"), "model.path=tiny", "data.max_len=16",
        "data.max_prompt_len=8", "data.eval_fraction=0", "train.batch_size=16", "train.steps=4", "train.log_every=1",
        "optim.lr=3e-3"]
TIMEOUT_S = 600  # a hung collective or coordinator fails the test instead of blocking CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(output, reports, processes=2, devices=4, args=ARGS):
    """Starts the worker processes; returns them with their log files."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = []
    for i in range(processes):
        env = device_env(devices, JAXRL_COORDINATOR=coordinator, JAXRL_NUM_PROCESSES=str(processes),
                         JAXRL_PROCESS_ID=str(i))
        log = open(reports / f"process{i}.log", "w")
        cmd = [sys.executable, WORKER, str(reports / f"process{i}.json"), *args, "--output", str(output)]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO), log))
    return procs


def _wait(procs, reports):
    """Waits for every worker under one deadline; a failed worker ends the others (they would hang in
    their next collective) and fails the test with the logs."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(proc.poll() is None for proc, _ in procs):
            failed = [proc.returncode for proc, _ in procs if proc.returncode not in (None, 0)]
            if failed:
                pytest.fail(f"a worker exited with {failed[0]}:\n{_logs(reports)}")
            if time.monotonic() > deadline:
                pytest.fail(f"multi-process run did not finish in {TIMEOUT_S} s:\n{_logs(reports)}")
            time.sleep(0.2)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    codes = [proc.returncode for proc, _ in procs]
    assert codes == [0] * len(procs), f"exit codes {codes}:\n{_logs(reports)}"


def _logs(reports) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(reports.glob("process*.log")))


# `jaxrl dpo` on the same model and sizes: the policy under ZeRO-3 and a frozen reference, on preference pairs.
DPO_ARGS = ["dpo", *ARGS[1:], "zero_stage=3", "mesh.data=1", "mesh.fsdp=8", "dpo.beta=0.5"]


@pytest.mark.parametrize("args", [ARGS, DPO_ARGS], ids=["sft", "dpo"])
def test_two_processes_train_like_one(tmp_path, args):
    multi, single, reports = tmp_path / "multi", tmp_path / "single", tmp_path / "reports"
    reports.mkdir()
    procs = _launch(multi, reports, args=args)  # the workers start up while this process trains the reference
    try:
        assert cli.main([*args, "--output", str(single)]) == 0
    finally:
        _wait(procs, reports)

    info = [json.loads((reports / f"process{i}.json").read_text()) for i in range(2)]
    for i, r in enumerate(info):
        assert (r["process_index"], r["process_count"], r["local_devices"], r["devices"]) == (i, 2, 4, 8)
    # Only process 0 writes metrics and the export; process 1 still joins every collective.
    assert info[0]["metrics_lines"] == 4 and info[1]["metrics_lines"] == 0
    assert info[0]["safetensors_files"] == 1 and info[1]["safetensors_files"] == 0
    assert os.path.exists(multi / "hf" / "model.safetensors")

    one, two = read_metrics(single), read_metrics(multi)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert [sorted(r) for r in two] == [sorted(r) for r in one]
    for a, b in zip(one, two):
        for key in a:
            # The same global batches and mesh; only the order of cross-process sums may differ.
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=f"step {a['step']} {key}")
    print(f"\n{args[0]} losses, 1 x 8 devices:", [r.get("loss") for r in one],
          "\n            2 x 4 devices:", [r.get("loss") for r in two])
