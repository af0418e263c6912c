"""The device mesh ('data', 'fsdp', 'tensor') from config, and multi-host start-up."""

from __future__ import annotations

import logging
import math
import os
import pickle

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxrl.errors import JaxrlError

AXES = ("data", "fsdp", "tensor")
log = logging.getLogger(__name__)


def resolve_axes(sizes: dict[str, int], n_devices: int, *, what: str = "mesh") -> tuple[int, ...]:
    """Axis sizes with one `-1` replaced by the devices left; errors name the key and the fix."""
    names = list(sizes)
    free = [k for k in names if sizes[k] == -1]
    if len(free) > 1:
        raise JaxrlError(f"{what}: only one axis may be -1, got {', '.join(f'{what}.{k}' for k in free)}")
    for k in names:
        if sizes[k] == 0 or sizes[k] < -1:
            raise JaxrlError(f"{what}.{k} must be a positive size or -1, got {sizes[k]}")
    fixed = math.prod(sizes[k] for k in names if sizes[k] != -1)
    if free:
        if n_devices % fixed:
            raise JaxrlError(f"{what}: the fixed axes ({fixed} devices) do not divide the {n_devices} "
                             f"devices; choose sizes whose product divides {n_devices}")
        sizes = {**sizes, free[0]: n_devices // fixed}
    total = math.prod(sizes.values())
    if total != n_devices:
        shape = " x ".join(f"{what}.{k}={v}" for k, v in sizes.items())
        raise JaxrlError(f"{shape} needs {total} devices but {n_devices} are available; make the "
                         f"product equal {n_devices} (or set one axis to -1)")
    return tuple(sizes[k] for k in names)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices=None, what: str = "mesh") -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all), with GSPMD (Auto) axes.

    'tensor' is the fastest-varying axis, so tensor-parallel groups sit on neighbouring devices.
    """
    devices = jax.devices() if devices is None else devices
    shape = resolve_axes({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices), what=what)
    arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * 3)


def initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """Starts JAX's multi-process runtime when the run spans several processes; a no-op otherwise.

    Explicit settings come from config (`distributed.*`) or the environment (JAXRL_COORDINATOR,
    JAXRL_NUM_PROCESSES, JAXRL_PROCESS_ID). Without them, TPU pods and SLURM jobs are detected and
    `jax.distributed.initialize()` reads the cluster's own environment.
    Must run before anything touches the devices.
    """
    coordinator = coordinator or os.environ.get("JAXRL_COORDINATOR", "")
    num_processes = num_processes or int(os.environ.get("JAXRL_NUM_PROCESSES", "0") or 0)
    if process_id < 0:
        process_id = int(os.environ.get("JAXRL_PROCESS_ID", "-1") or -1)
    if jax.distributed.is_initialized():
        return
    if coordinator or num_processes > 1:
        if not (coordinator and num_processes > 0 and process_id >= 0):
            raise JaxrlError(
                "multi-process launch needs all of distributed.coordinator (host:port), "
                "distributed.num_processes and distributed.process_id (or JAXRL_COORDINATOR, "
                "JAXRL_NUM_PROCESSES, JAXRL_PROCESS_ID); got "
                f"coordinator={coordinator!r}, num_processes={num_processes}, process_id={process_id}"
            )
        if process_id >= num_processes:
            raise JaxrlError(f"distributed.process_id {process_id} must be < num_processes {num_processes}")
        # CPU processes exchange collectives through gloo; accelerators use their own transport.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif _in_cluster():
        jax.distributed.initialize()
    if jax.process_count() > 1:
        log.info("process %d of %d", jax.process_index(), jax.process_count())


def _in_cluster() -> bool:
    """A multi-host TPU slice or a SLURM job of several tasks, whose environment JAX reads itself."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def settle(tree):
    """Waits for `tree` on XLA:CPU with several devices; returns it. A no-op on accelerators.

    Simulated CPU devices run each program's collectives on a shared thread pool; two programs with
    collectives in flight at once (say the actor's and the critic's train steps, dispatched back to back)
    can each hold part of the pool while waiting for the rest, and deadlock (seen on 2 cores).
    """
    if jax.default_backend() == "cpu" and jax.device_count() > 1:
        jax.block_until_ready(tree)
    return tree


def to_host(x) -> np.ndarray:
    """A global array as numpy on every process (gathered across processes when it spans several)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def gather_rows(local: list) -> list:
    """Every process's `local` list (picklable items) concatenated in process order, on every process:
    the host-side companion of `to_host` for per-row Python values (e.g. reward functions' row fields)."""
    if jax.process_count() == 1:
        return list(local)
    from jax.experimental import multihost_utils

    blob = np.frombuffer(pickle.dumps(local), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(blob.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    blobs = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [row for blob, size in zip(blobs, sizes) for row in pickle.loads(blob[:size].tobytes())]
