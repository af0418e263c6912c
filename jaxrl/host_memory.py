"""Huge pages for host memory on CPU runs: the `jaxrl` command re-executes itself once with them on.

XLA:CPU allocates a step's temporaries with malloc on every call. glibc serves blocks over 32 MiB by a
fresh mmap and returns them on free, so each step touches hundreds of MB of new 4 KiB pages: the 32M
Llama SFT step of `benchmarks/train.py` takes about 163,000 page faults per step, measured at 0.25-0.3 s
of its ~3 s. glibc's `glibc.malloc.hugetlb=1` tunable (glibc >= 2.35) asks the kernel for transparent
huge pages for those blocks (the kernel's `madvise` mode, the common default), which cuts the faults to
a few hundred and the step by ~7%. Tunables are read only when a process starts, hence the re-exec; it
happens before anything else is imported, in the console entry point only (never inside a library call
or a test that calls `cli.main`).

Only when the run will be on the CPU: with a GPU or TPU plugin installed, the temporaries live in device
memory and the host's malloc is left alone. `JAXRL_HUGE_PAGES=0` turns it off.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "JAXRL_HUGE_PAGES"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def accelerator_installed(env: Mapping[str, str]) -> bool:
    """Whether jax will pick a non-CPU backend: `JAX_PLATFORMS`' first entry, else an installed plugin."""
    platforms = env.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return True
    spec = importlib.util.find_spec("jax_plugins")  # namespace package of the CUDA/ROCm/... plugins
    return spec is not None and any(True for _ in pkgutil.iter_modules(spec.submodule_search_locations))


def glibc_supports_hugetlb() -> bool:
    name, version = platform.libc_ver()
    if name != "glibc":
        return False
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def thp_madvise_allowed(path: str = THP_MODE) -> bool:
    """The kernel grants huge pages to madvised memory unless THP is `[never]` (or the file is absent)."""
    try:
        with open(path) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def huge_pages_env(env: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None when nothing should change.

    None when: opted out, already set (by us or the user: never overridden), not Linux glibc >= 2.35,
    THP off in the kernel, or an accelerator will run the program.
    """
    tunables = env.get("GLIBC_TUNABLES", "")
    if env.get(OPT_OUT, "1") == "0" or TUNABLE in tunables:
        return None
    if not sys.platform.startswith("linux") or not glibc_supports_hugetlb() or not thp_madvise_allowed():
        return None
    if accelerator_installed(env):
        return None
    return dict(env, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1")


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command with the tunable set (same pid, stdin and stdout)."""
    env = huge_pages_env(os.environ)
    if env is None:
        return
    argv = [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:  # cannot exec (sandbox, missing interpreter): run on without huge pages
        return
