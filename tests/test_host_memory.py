"""The `jaxrl` command's huge-page re-exec for CPU runs (jaxrl/host_memory.py)."""

import os
import subprocess
import sys
import textwrap

import pytest

from jaxrl import host_memory


@pytest.fixture
def linux_with_thp(monkeypatch):
    monkeypatch.setattr(host_memory.sys, "platform", "linux")
    monkeypatch.setattr(host_memory, "glibc_supports_hugetlb", lambda: True)
    monkeypatch.setattr(host_memory, "thp_madvise_allowed", lambda path=host_memory.THP_MODE: True)
    monkeypatch.setattr(host_memory, "accelerator_installed", lambda env: env.get("JAX_PLATFORMS", "cpu") != "cpu")


def test_env_sets_the_tunable_once_and_respects_the_user(linux_with_thp):
    env = host_memory.huge_pages_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert host_memory.huge_pages_env(env) is None  # the re-executed process does not loop
    kept = host_memory.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert host_memory.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # user's choice
    assert host_memory.huge_pages_env({"JAXRL_HUGE_PAGES": "0"}) is None
    assert host_memory.huge_pages_env({"JAX_PLATFORMS": "tpu"}) is None


def test_env_is_left_alone_without_glibc_thp_or_on_an_accelerator(monkeypatch, tmp_path):
    never, madvise = tmp_path / "never", tmp_path / "madvise"
    never.write_text("always madvise [never]\n")
    madvise.write_text("always [madvise] never\n")
    assert not host_memory.thp_madvise_allowed(str(never))
    assert host_memory.thp_madvise_allowed(str(madvise))
    assert not host_memory.thp_madvise_allowed(str(tmp_path / "absent"))
    assert host_memory.accelerator_installed({"JAX_PLATFORMS": "cuda,cpu"})
    assert not host_memory.accelerator_installed({"JAX_PLATFORMS": "cpu"})
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.31"))
    assert not host_memory.glibc_supports_hugetlb()
    assert host_memory.huge_pages_env({"JAX_PLATFORMS": "cpu"}) is None
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))  # musl
    assert not host_memory.glibc_supports_hugetlb()


# A fresh 64 MiB XLA:CPU output per call: the page faults it takes with and without the tunable.
FAULTS = textwrap.dedent("""
    import os, resource, sys
    from jaxrl.host_memory import reexec_with_huge_pages
    reexec_with_huge_pages()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.exp(x))
    x = jnp.ones(16 * 2**20)
    f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        f(x).block_until_ready()
    print(os.environ.get("GLIBC_TUNABLES"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(host_memory.huge_pages_env({"JAX_PLATFORMS": "cpu"}) is None,
                    reason="needs Linux glibc >= 2.35 with transparent huge pages not 'never'")
def test_reexec_cuts_xla_page_faults(tmp_path):
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    runs = {}
    for flag in ("0", "1"):
        out = subprocess.run([sys.executable, str(script)], env=dict(env, JAXRL_HUGE_PAGES=flag),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        tunables, faults = out.stdout.split()
        runs[flag] = (tunables, int(faults))
    assert runs["0"][0] == "None" and runs["1"][0] == "glibc.malloc.hugetlb=1"
    # 4 x 64 MiB in 4 KiB pages is 65,536 faults; with huge pages a few hundred at most.
    assert runs["0"][1] > 30_000, runs
    assert runs["1"][1] < runs["0"][1] / 10, runs
