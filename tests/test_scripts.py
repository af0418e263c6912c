"""The launch scripts (tpu_scripts/, slurm/): exact commands under --dry-run, errors, and shellcheck.

Nothing here touches the cloud: `gcloud`, `ssh`, `srun`, `curl` and `jaxrl` are replaced by small
stubs on PATH that record how they were called.
"""
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu_scripts"
TPU_SCRIPTS = ["create.sh", "install.sh", "launch.sh", "fetch.sh", "teardown.sh"]
SHELL_FILES = [TPU / "common.sh", *(TPU / s for s in TPU_SCRIPTS), ROOT / "slurm" / "launch_env.sh",
               ROOT / "slurm" / "jaxrl.sbatch"]
# Settings the scripts read from the environment; cleared so the host's values cannot leak in.
SETTINGS = ["TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "QUEUED_RESOURCE",
            "JAXRL_SOURCE", "JAX_SPEC", "PYTHON", "JAXRL_VENV", "OUTPUT"]
LOC = "--zone=us-central2-b"
METADATA = ("http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
            "agent-worker-number")

# A stub that appends its arguments (one JSON list per call) to $CALLS, then prints the next line of
# $STUB_OUTPUT (if any) and exits with the status in $STUB_STATUS (default 0).
STUB = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
out = os.environ.get("STUB_OUTPUT")
if out and os.path.exists(out):
    lines = open(out).read().splitlines()
    if lines:
        print(lines[0])
        open(out, "w").write("".join(l + "\\n" for l in lines[1:]))
sys.exit(int(os.environ.get("STUB_STATUS", "0")))
"""


def _write_exe(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def stubs(tmp_path):
    """A bin directory of recording stubs; returns (env, calls) where calls() lists the calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ["gcloud", "ssh", "srun"]:
        _write_exe(bin_dir / name, STUB)
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env["CALLS"] = str(tmp_path / "calls.jsonl")

    def calls():
        path = tmp_path / "calls.jsonl"
        return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []

    return env, calls


def run(script, *args, env, cwd=None):
    return subprocess.run(["bash", str(ROOT / script), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def ssh_all(remote, name="jaxrl-v4"):
    return f"+ gcloud compute tpus tpu-vm ssh {name} {LOC} --worker=all --command='{remote}'"


LAUNCH_REMOTE = (
    'set -o pipefail; export PATH="$HOME"/.local/bin:"$PATH"; export XLA_FLAGS="--a=1 --b"; '
    'mkdir -p "$HOME"/jaxrl-work && cd "$HOME"/jaxrl-work && mkdir -p logs || exit 1; '
    f"w=$(curl -sf -H Metadata-Flavor:Google {METADATA} || hostname); log=logs/r1.worker-$w.log; "
    'echo "worker $w: logging to $PWD/$log"; '
    'if [ "$w" = 0 ]; then jaxrl pipeline --config "my config.yaml" 2>&1 | tee "$log"; '
    'else jaxrl pipeline --config "my config.yaml" >"$log" 2>&1; fi')

DRY_RUNS = {
    "create": (
        ["tpu_scripts/create.sh", "--name", "jaxrl-v4", "--zone", "us-central2-b", "--project", "p1",
         "--accelerator-type", "v4-32", "--spot"],
        ["+ gcloud compute tpus tpu-vm create jaxrl-v4 --zone=us-central2-b --project=p1 "
         "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"]),
    "create-queued": (
        ["tpu_scripts/create.sh", "--name=jaxrl-v5e", "--zone=us-west4-a", "--queued",
         "--accelerator-type=v5litepod-16", "--valid-until", "6h", "--runtime-version", "v2-alpha-x"],
        ["+ gcloud compute tpus queued-resources create jaxrl-v5e --node-id=jaxrl-v5e --zone=us-west4-a "
         "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-x --valid-until-duration=6h",
         "+ gcloud compute tpus queued-resources describe jaxrl-v5e --zone=us-west4-a "
         "--format='value(state.state)'"]),
    "install-git": (
        ["tpu_scripts/install.sh", "--name", "jaxrl-v4", "--zone", "us-central2-b",
         "--source", "https://github.com/org/jaxrl.git@v1"],
        [ssh_all('python3 -m pip install --upgrade "jax[tpu]" git+https://github.com/org/jaxrl.git@v1 '
                 "&& python3 -m pip install --no-deps --force-reinstall "
                 "git+https://github.com/org/jaxrl.git@v1 "
                 '&& python3 -c "import jax, jaxrl; print(jax.__version__)"')]),
    "install-wheel": (
        ["tpu_scripts/install.sh", "--name", "jaxrl-v4", "--zone", "us-central2-b",
         "--source", "dist/jaxrl-0.1.0-py3-none-any.whl", "--venv", "venv", "--jax", "jax[tpu]==0.6.2"],
        [f"+ gcloud compute tpus tpu-vm scp dist/jaxrl-0.1.0-py3-none-any.whl jaxrl-v4:/tmp/ "
         f"--worker=all {LOC}",
         ssh_all('python3 -m venv "$HOME"/venv && "$HOME"/venv/bin/python -m pip install --upgrade '
                 '"jax[tpu]==0.6.2" /tmp/jaxrl-0.1.0-py3-none-any.whl && "$HOME"/venv/bin/python -m pip '
                 "install --no-deps --force-reinstall /tmp/jaxrl-0.1.0-py3-none-any.whl && "
                 '"$HOME"/venv/bin/python -c "import jax, jaxrl; print(jax.__version__)"')]),
    "launch": (
        ["tpu_scripts/launch.sh", "--name", "jaxrl-v4", "--zone", "us-central2-b", "--copy", "configs",
         "--env", "XLA_FLAGS=--a=1 --b", "--run-name", "r1", "--",
         "jaxrl", "pipeline", "--config", "my config.yaml"],
        [ssh_all('mkdir -p "$HOME"/jaxrl-work'),
         f"+ gcloud compute tpus tpu-vm scp configs jaxrl-v4:jaxrl-work/ --worker=all {LOC} --recurse",
         ssh_all(LAUNCH_REMOTE)]),
    "launch-detach": (
        ["tpu_scripts/launch.sh", "--name", "jaxrl-v4", "--zone", "us-central2-b", "--detach",
         "--venv", "/opt/venv", "--workdir", "/data/w", "--run-name", "r2", "--", "jaxrl", "sft"],
        [ssh_all('set -o pipefail; export PATH=/opt/venv/bin:"$HOME"/.local/bin:"$PATH"; '
                 "mkdir -p /data/w && cd /data/w && mkdir -p logs || exit 1; "
                 f"w=$(curl -sf -H Metadata-Flavor:Google {METADATA} || hostname); "
                 'log=logs/r2.worker-$w.log; nohup jaxrl sft >"$log" 2>&1 </dev/null & '
                 'echo "worker $w: started pid $! logging to $PWD/$log"')]),
    "fetch": (
        ["tpu_scripts/fetch.sh", "--name", "jaxrl-v4", "--zone", "us-central2-b",
         "--from", "jaxrl-work/runs/x"],
        ["+ mkdir -p results",
         f"+ gcloud compute tpus tpu-vm scp jaxrl-v4:jaxrl-work/runs/x results --worker=0 {LOC} --recurse"]),
    "fetch-gcs": (
        ["tpu_scripts/fetch.sh", "--from", "gs://bucket/runs/x", "--to", "out"],
        ["+ mkdir -p out", "+ gcloud storage cp -r gs://bucket/runs/x out"]),
    "teardown": (
        ["tpu_scripts/teardown.sh", "--name", "jaxrl-v4", "--zone", "us-central2-b"],
        [f"+ gcloud compute tpus tpu-vm delete jaxrl-v4 {LOC} --quiet"]),
    "teardown-queued": (
        ["tpu_scripts/teardown.sh", "--name", "jaxrl-v4", "--zone", "us-central2-b", "--queued",
         "--queued-resource", "qr1", "--async"],
        [f"+ gcloud compute tpus queued-resources delete qr1 {LOC} --force --quiet --async"]),
    "launch-env": (
        ["slurm/launch_env.sh", "--hosts", "gpu-a,gpu-b", "--port", "4321", "--workdir", "/w",
         "--env", "NCCL_DEBUG=INFO", "--", "jaxrl", "ppo", "--config", "c.yaml"],
        ["+ ssh gpu-a 'cd /w && NCCL_DEBUG=INFO JAXRL_COORDINATOR=gpu-a:4321 JAXRL_NUM_PROCESSES=2 "
         "JAXRL_PROCESS_ID=0 jaxrl ppo --config c.yaml'",
         "+ ssh gpu-b 'cd /w && NCCL_DEBUG=INFO JAXRL_COORDINATOR=gpu-a:4321 JAXRL_NUM_PROCESSES=2 "
         "JAXRL_PROCESS_ID=1 jaxrl ppo --config c.yaml'"]),
}


@pytest.fixture
def workdir(tmp_path):
    """A directory holding the local files the sample commands refer to."""
    (tmp_path / "work" / "configs").mkdir(parents=True)
    (tmp_path / "work" / "dist").mkdir()
    (tmp_path / "work" / "dist" / "jaxrl-0.1.0-py3-none-any.whl").write_bytes(b"")
    return tmp_path / "work"


@pytest.mark.parametrize("case", sorted(DRY_RUNS))
def test_dry_run_prints_exact_commands_and_runs_nothing(case, stubs, workdir):
    env, calls = stubs
    args, expected = DRY_RUNS[case]
    result = run(args[0], "--dry-run", *args[1:], env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected
    assert calls() == []
    assert not (workdir / "results").exists() and not (workdir / "out").exists()


def test_settings_come_from_the_environment(stubs):
    env, _ = stubs
    env.update(TPU_NAME="t1", ZONE="europe-west4-a", PROJECT="p2", ACCELERATOR_TYPE="v6e-8")
    result = run("tpu_scripts/create.sh", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("+ gcloud compute tpus tpu-vm create t1 --zone=europe-west4-a --project=p2 "
                             "--accelerator-type=v6e-8 --version=v2-alpha-tpuv6e\n")
    result = run("tpu_scripts/create.sh", "--dry-run", "--name", "t2", env=env)
    assert result.stdout.startswith("+ gcloud compute tpus tpu-vm create t2 ")


@pytest.mark.parametrize("script", [*(f"tpu_scripts/{s}" for s in TPU_SCRIPTS), "slurm/launch_env.sh"])
def test_help_exits_zero(script, stubs):
    env, calls = stubs
    result = run(script, "--help", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: ")
    assert "--dry-run" in result.stdout
    assert calls() == []


# (command line, message on stderr); every one must exit with status 2 and run nothing.
MISSING = [
    ("tpu_scripts/create.sh --zone z --accelerator-type v4-8",
     "missing TPU name: pass --name or set TPU_NAME"),
    ("tpu_scripts/create.sh --name t --accelerator-type v4-8",
     "missing zone: pass --zone or set ZONE"),
    ("tpu_scripts/create.sh --name t --zone z",
     "missing accelerator type: pass --accelerator-type or set ACCELERATOR_TYPE"),
    ("tpu_scripts/create.sh --name t --zone z --accelerator-type v9-8",
     "missing runtime version (no default for v9-8): pass --runtime-version or set RUNTIME_VERSION"),
    ("tpu_scripts/create.sh --name t --zone z --accelerator-type", "--accelerator-type needs a value"),
    ("tpu_scripts/install.sh --name t --zone z",
     "missing package source: pass --source or set JAXRL_SOURCE"),
    ("tpu_scripts/install.sh --name t --zone z --source nowhere.whl",
     "package file not found: nowhere.whl"),
    ("tpu_scripts/launch.sh --name t --zone z", "missing command: give it after --"),
    ("tpu_scripts/launch.sh --zone z -- jaxrl sft", "missing TPU name: pass --name"),
    ("tpu_scripts/launch.sh --name t --zone z --env 1X=2 -- jaxrl", "--env needs KEY=VALUE"),
    ("tpu_scripts/fetch.sh --name t --zone z", "missing source path: pass --from"),
    ("tpu_scripts/fetch.sh --zone z --from runs/x", "missing TPU name: pass --name"),
    ("tpu_scripts/teardown.sh --name t", "missing zone: pass --zone or set ZONE"),
    ("tpu_scripts/teardown.sh --name t --zone z --bogus", "unknown option: --bogus"),
    ("slurm/launch_env.sh -- jaxrl sft", "missing hosts: pass --hosts"),
]


@pytest.mark.parametrize("line,message", MISSING, ids=[line for line, _ in MISSING])
def test_missing_or_bad_value_exits_nonzero_naming_it(line, message, stubs, tmp_path):
    env, calls = stubs
    script, *args = line.split()
    result = run(script, "--dry-run", *args, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == "" and calls() == []


def test_real_run_needs_gcloud(tmp_path):
    bin_dir = tmp_path / "bin"  # the tools the script uses, but no gcloud
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env["PATH"] = str(bin_dir)
    result = subprocess.run([shutil.which("bash"), str(TPU / "teardown.sh"), "--name", "t", "--zone", "z"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "gcloud not found" in result.stderr


def test_queued_create_waits_until_active(stubs, tmp_path):
    env, calls = stubs
    states = tmp_path / "states"
    states.write_text("\nWAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE\n")
    env["STUB_OUTPUT"] = str(states)
    result = run("tpu_scripts/create.sh", "--name", "t", "--zone", "z", "--accelerator-type", "v4-8",
                 "--queued", "--poll-interval", "0", env=env)
    assert result.returncode == 0, result.stderr
    describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", "t", "--zone=z",
                "--format=value(state.state)"]
    assert calls() == [["gcloud", "compute", "tpus", "queued-resources", "create", "t", "--node-id=t",
                        "--zone=z", "--accelerator-type=v4-8", "--runtime-version=tpu-ubuntu2204-base"],
                       describe, describe, describe]
    assert "is ACTIVE" in result.stderr


def test_queued_create_stops_on_failed_state(stubs, tmp_path):
    env, calls = stubs
    states = tmp_path / "states"
    states.write_text("\nFAILED\n")
    env["STUB_OUTPUT"] = str(states)
    result = run("tpu_scripts/create.sh", "--name", "t", "--zone", "z", "--accelerator-type", "v4-8",
                 "--queued", "--poll-interval", "0", env=env)
    assert result.returncode == 1
    assert "queued resource t is FAILED" in result.stderr
    assert len(calls()) == 2


def test_first_failing_command_stops_the_script(stubs, workdir):
    env, calls = stubs
    env["STUB_STATUS"] = "3"
    result = run("tpu_scripts/install.sh", "--name", "t", "--zone", "z", "--source",
                 "dist/jaxrl-0.1.0-py3-none-any.whl", env=env, cwd=workdir)
    assert result.returncode == 3
    assert [c[4] for c in calls()] == ["scp"]  # the ssh that would install never ran


def _dry_run(args, stubs, workdir):
    """The lines a script prints under --dry-run."""
    result = run(args[0], "--dry-run", *args[1:], env=stubs[0], cwd=workdir)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def _remote_command(stdout_line):
    """The --command=... string of a printed gcloud ssh line, unquoted as the shell would."""
    words = shlex.split(stdout_line[2:])
    return next(w for w in words if w.startswith("--command="))[len("--command="):]


@pytest.fixture
def worker(tmp_path):
    """A fake TPU worker: a home directory and PATH with `curl` (the metadata server) and `jaxrl`."""
    home, bin_dir = tmp_path / "home", tmp_path / "wbin"
    home.mkdir()
    bin_dir.mkdir()
    _write_exe(bin_dir / "curl", '#!/bin/sh\necho "$FAKE_WORKER"\n')
    _write_exe(bin_dir / "jaxrl", '#!/bin/sh\necho "jaxrl $* XLA_FLAGS=$XLA_FLAGS"\nexit "$JAXRL_STATUS"\n')
    _write_exe(bin_dir / "python3", '#!/bin/sh\necho "$*" >> "$HOME/python3.calls"\n')

    def run_remote(remote, worker_id, status=0):
        env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_WORKER": str(worker_id),
               "JAXRL_STATUS": str(status)}
        return subprocess.run(["bash", "-c", remote], env=env, cwd=home, capture_output=True, text=True)

    return home, run_remote


@pytest.mark.parametrize("worker_id,status", [(0, 0), (1, 0), (0, 3), (1, 3)])
def test_launch_remote_script_logs_per_worker_and_streams_worker_0(worker_id, status, worker, stubs,
                                                                   workdir):
    home, run_remote = worker
    remote = _remote_command(_dry_run(DRY_RUNS["launch"][0], stubs, workdir)[-1])
    result = run_remote(remote, worker_id, status)
    assert result.returncode == status
    log = home / "jaxrl-work" / "logs" / f"r1.worker-{worker_id}.log"
    line = "jaxrl pipeline --config my config.yaml XLA_FLAGS=--a=1 --b\n"
    assert log.read_text() == line
    assert (line in result.stdout) == (worker_id == 0)
    assert f"worker {worker_id}: logging to {home}/jaxrl-work/logs/r1.worker-{worker_id}.log" in result.stdout


def test_install_remote_script_runs_pip_then_checks_import(worker, stubs, workdir):
    home, run_remote = worker
    remote = _remote_command(_dry_run(DRY_RUNS["install-git"][0], stubs, workdir)[0])
    assert run_remote(remote, 0).returncode == 0
    spec = "git+https://github.com/org/jaxrl.git@v1"
    assert (home / "python3.calls").read_text().splitlines() == [
        f"-m pip install --upgrade jax[tpu] {spec}",
        f"-m pip install --no-deps --force-reinstall {spec}",
        "-c import jax, jaxrl; print(jax.__version__)"]


@pytest.mark.parametrize("failing", [None, 1])
def test_launch_env_starts_every_process_and_reports_failure(failing, tmp_path):
    """slurm/launch_env.sh with an `ssh` that runs the command here, and a `jaxrl` that echoes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "ssh", '#!/bin/sh\nexec bash -c "$2"\n')
    _write_exe(bin_dir / "jaxrl", '#!/bin/sh\necho "$JAXRL_PROCESS_ID/$JAXRL_NUM_PROCESSES '
               '$JAXRL_COORDINATOR $*"\n[ "$JAXRL_PROCESS_ID" != "$FAIL_ID" ]\n')
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAIL_ID=str(failing))
    result = run("slurm/launch_env.sh", "--hosts", "h0,h1,h2", "--workdir", str(tmp_path),
                 "--run-name", "r", "--", "jaxrl", "sft", env=env, cwd=tmp_path)
    assert result.returncode == (0 if failing is None else 1), result.stderr
    for i in range(3):
        log = (tmp_path / "logs" / f"r.process-{i}.log").read_text()
        assert f"{i}/3 h0:1234 sft" in log
    assert "0/3 h0:1234 sft" in result.stdout and "1/3" not in result.stdout
    if failing is not None:
        assert "at least one process failed" in result.stderr


def test_sbatch_runs_srun_jaxrl_pipeline(stubs, tmp_path):
    env, calls = stubs
    text = (ROOT / "slurm" / "jaxrl.sbatch").read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, flags=re.M))
    assert directives["nodes"] == "2" and directives["gpus-per-node"] == "8"
    assert directives["ntasks-per-node"] == "8"
    env.update(SLURM_JOB_ID="42", SLURM_JOB_NAME="jaxrl", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="16")
    result = run("slurm/jaxrl.sbatch", "configs/c.yaml", "train.steps=5", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert calls() == [["srun", "--label", "--kill-on-bad-exit=1", "jaxrl", "pipeline", "--config",
                        "configs/c.yaml", "--output", "runs/jaxrl-42", "train.steps=5"]]
    assert run("slurm/jaxrl.sbatch", env=env, cwd=tmp_path).returncode == 2


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_bash_syntax(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install -y shellcheck)")
def test_shellcheck_is_clean():
    result = subprocess.run(["shellcheck", "-x", *map(str, SHELL_FILES)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _doc_commands():
    """(exported settings, script words) for each script call in the README's "Scaling out" code blocks."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Scaling out")
    end = readme.find("\n## ", start + 1)
    text = readme[start:end if end > 0 else None]
    env, commands = {}, []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["export"]:
                env.update(w.split("=", 1) for w in words[1:])
            elif words and words[0].startswith(("tpu_scripts/", "slurm/launch_env.sh")):
                commands.append((dict(env), words))
    return commands


def test_doc_commands_run_under_dry_run(stubs, workdir):
    env, calls = stubs
    commands = _doc_commands()
    assert [w[0] for _, w in commands] == [
        "tpu_scripts/create.sh", "tpu_scripts/install.sh", "tpu_scripts/launch.sh",
        "tpu_scripts/fetch.sh", "tpu_scripts/fetch.sh", "tpu_scripts/teardown.sh",
        "slurm/launch_env.sh"]
    for settings, words in commands:
        result = run(words[0], "--dry-run", *words[1:], env={**env, **settings}, cwd=workdir)
        assert result.returncode == 0, (words, result.stderr)
        assert result.stdout.startswith("+ ")
    assert calls() == []
