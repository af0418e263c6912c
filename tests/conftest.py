"""Test set-up: 8 simulated CPU devices, forced before jax is imported anywhere."""
import os

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
