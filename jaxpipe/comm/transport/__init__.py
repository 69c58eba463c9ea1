"""Point-to-point activation and gradient exchange between pipeline ranks.

All transports share one shape (`ThreadedTransport`): the executor posts receives ahead
(`expect`) and hands outputs to `send`, which returns at once. Per neighbour, a sender thread
waits for each device result and puts it on the wire, and a receiver thread completes posted
receives in order and has the array on the device before the task that needs it runs. Every payload is preceded
by a small header carrying (step, micro-batch, kind, bytes, dtype), checked on arrival: a message
never silently lands in the wrong slot, and a shape or dtype disagreement names both ranks.

- `HostStagedMpi` (`parallel.transport=mpi`, MPI not CUDA-aware, and every CPU run): device→host
  copy started asynchronously at `send`, mpi4py Isend/Irecv on host buffers, host→device copy in
  the receiver thread.
- `CudaAwareMpi` (`mpi` where the MPI library reports CUDA support): mpi4py on device buffers.
- `Nccl` (`parallel.transport=nccl`): NCCL send/recv through CuPy directly on the JAX buffers
  (DLPack, no copy), one 2-rank communicator per neighbour pair and direction, with the unique id
  sent over MPI.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jaxpipe.comm.codec import Codec
from jaxpipe.comm.message import ArraySpec, Kind, MsgKey
from jaxpipe.comm.netem import NetworkEmulator
from jaxpipe.comm.transport.base import ThreadedTransport, Transport
from jaxpipe.errors import ConfigError

__all__ = ["ArraySpec", "Kind", "MsgKey", "ThreadedTransport", "Transport", "make_transport"]


def make_transport(name: str, comm: Any, stage: int, world_rank_of: Callable[[int], int],
                   to_device: Callable[[np.ndarray], jax.Array] | None = None,
                   single_device: bool = True, net: NetworkEmulator | None = None,
                   codecs: Mapping[Kind, Codec] | None = None,
                   links: Iterable[tuple[int, int]] | None = None) -> ThreadedTransport:
    """The transport `name` (parallel.transport) for this process's devices."""
    on_gpu = jax.default_backend() == "gpu"
    if name == "nccl":
        if not on_gpu:
            raise ConfigError("parallel.transport=nccl needs GPUs; on CPU use parallel.transport=mpi")
        if not single_device:
            raise ConfigError("parallel.transport=nccl supports one GPU per process; with "
                              "runtime.devices_per_process > 1 use parallel.transport=mpi")
        from jaxpipe.comm.transport.nccl import Nccl

        return Nccl(comm, stage, world_rank_of, net, codecs, links)
    from jaxpipe.comm.transport.mpi import CudaAwareMpi, HostStagedMpi, mpi_is_cuda_aware

    if on_gpu and single_device and mpi_is_cuda_aware():
        return CudaAwareMpi(comm, stage, world_rank_of, net, codecs)
    return HostStagedMpi(comm, stage, world_rank_of, to_device, net, codecs)
