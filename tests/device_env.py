"""The environment of a test's subprocess: this checkout's jaxrl on `devices` simulated CPU devices."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_env(devices: int, **extra: str) -> dict:
    """os.environ with jax on the CPU, `devices` simulated devices (replacing the tests' 8), this checkout
    first on PYTHONPATH, and `extra` variables."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env
