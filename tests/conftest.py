"""Test set-up: 8 simulated CPU devices, forced before jax is imported anywhere; the jaxrl under test is
this checkout's, whatever the working directory."""
import os
import pathlib
import sys

# Run from another directory (`cd /tmp && python -m pytest /path/to/jaxrl/tests`), an installed jaxrl
# (an editable install of another checkout) would otherwise be imported; subprocesses inherit the path.
REPO = str(pathlib.Path(__file__).resolve().parents[1])
sys.path.insert(0, REPO)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402  (must come after XLA_FLAGS)

assert jax.device_count() == 8, "tests expect 8 simulated CPU devices"


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4; every worker holds 8 simulated devices, jax and torch."""
    return max(1, min(os.cpu_count() or 1, 4))


# The longest files first: pytest-xdist hands each worker whole files in collection order (with
# --no-loadscope-reorder, see pyproject.toml), and a long file started last leaves the other worker idle at
# the end (longest-processing-time-first scheduling).
_LONGEST_FIRST = ("test_pipeline.py", "test_multihost_pipeline.py", "test_multihost.py", "test_training_core.py",
                  "test_ppo.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
