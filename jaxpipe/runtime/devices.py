"""Which accelerators this process uses, decided from MPI alone (no launcher-specific variables).

Processes on one host find each other with an MPI shared-memory split; local rank r with
`runtime.devices_per_process = k` takes the k GPUs [r·k, (r+1)·k) of those visible to the host.
This must run before JAX initialises its backend, because CUDA reads CUDA_VISIBLE_DEVICES once;
afterwards each process sees exactly its own GPUs as devices 0..k-1 (and so does CuPy/NCCL).
With k > 1 the stage is sharded over its devices (`local_mesh`): the micro-batch is split across
them and the stage's gradients are reduced inside the process by XLA. Whether the host has the
GPUs this asks for, and whether every rank found its own, is checked by all ranks together once JAX
has started (`jaxpipe.runtime.hostcheck`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mpi4py import MPI

from jaxpipe.errors import ConfigError
from jaxpipe.runtime.hostcheck import host_gpu_count


@dataclass(frozen=True)
class Placement:
    local_rank: int
    local_size: int
    visible: str | None  # what this process set CUDA_VISIBLE_DEVICES to, if it set it
    listed: str | None = None  # CUDA_VISIBLE_DEVICES as the launcher gave it
    host_gpus: int = 0  # GPUs the host's driver exposes (jaxpipe.runtime.hostcheck.host_gpu_count)


def _backend_initialized() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge._backends)
    except Exception:  # pragma: no cover - private API moved; assume the safe answer
        return False


def assign_devices(world: Any, devices_per_process: int) -> Placement:
    """Restricts this process to its local GPUs; a no-op on a host without GPUs. Asking for more
    GPUs than the host has is not refused here but by `jaxpipe.runtime.hostcheck.check_hosts`,
    once every rank has stated what it found (one message naming the host, its ranks and GPUs)."""
    local = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    host_gpus = host_gpu_count()
    chosen = None
    if not _backend_initialized() and (listed or host_gpus):
        ids = listed.split(",") if listed else [str(i) for i in range(local_size * devices_per_process)]
        chosen = ",".join(ids[local_rank * devices_per_process : (local_rank + 1) * devices_per_process])
        os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    return Placement(local_rank, local_size, chosen, listed, host_gpus)


def local_devices(devices_per_process: int) -> list[Any]:
    import jax

    devices = jax.local_devices()
    if len(devices) < devices_per_process:
        hint = ("on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N"
                if devices and devices[0].platform == "cpu" else "check CUDA_VISIBLE_DEVICES")
        raise ConfigError(
            f"runtime.devices_per_process={devices_per_process} but this process sees {len(devices)} "
            f"{devices[0].platform if devices else ''} device(s): {hint}"
        )
    return devices[:devices_per_process]


def local_mesh(devices_per_process: int) -> Any:
    """A 1-D mesh over this process's devices; axis 'data' splits each micro-batch."""
    import numpy as np
    from jax.sharding import Mesh

    return Mesh(np.array(local_devices(devices_per_process)), ("data",))


def peak_memory_bytes(devices: list[Any]) -> int | None:
    """Largest peak allocation over the given devices, where the backend reports one (GPU)."""
    peaks = []
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None
