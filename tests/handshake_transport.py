"""NCCL's transfer semantics on CPU, for testing the ready-handshake protocol of the NCCL transport
without GPUs: every transfer is a synchronous MPI send (it returns only once the receiver takes
part, as an NCCL send does), on a communicator of its own, after the same MPI header and "ready"
exchange the NCCL transport does."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from mpi4py import MPI

from jaxpipe.comm.message import ArraySpec
from jaxpipe.comm.tied import TiedExchange
from jaxpipe.comm.transport.nccl import ReadyHandshake


class SynchronousTransfers(ReadyHandshake):
    name = "ready-handshake over synchronous MPI (CPU test of the NCCL protocol)"

    def __init__(self, comm: Any, stage: int, world_rank_of: Any, net: Any = None, codecs: Any = None):
        self.data = comm.Dup()
        super().__init__(comm, stage, world_rank_of, net, codecs)

    def _tag(self, link: tuple[int, int]) -> int:
        n = self.data.Get_size()  # one channel per ordered pair of ranks, like one NCCL comm each
        return 1 + link[0] * n + link[1]

    def _alloc(self, link: tuple[int, int], nbytes: int) -> Any:
        return np.empty(nbytes, np.uint8)

    def _device_bytes(self, x: jax.Array) -> tuple[Any, Any]:
        host = np.ascontiguousarray(np.asarray(x))
        return host.view(np.uint8).reshape(-1), host

    def _to_array(self, buf: Any, spec: ArraySpec) -> jax.Array:
        return jax.device_put(buf.view(jnp.dtype(spec.dtype)).reshape(spec.shape))

    def _transfer_send(self, link: tuple[int, int], buf: Any) -> None:
        self.data.Ssend([buf, MPI.BYTE], dest=link[1], tag=self._tag(link))

    def _transfer_recv(self, link: tuple[int, int], buf: Any) -> None:
        self.data.Recv([buf, MPI.BYTE], source=link[0], tag=self._tag(link))


def make_transport(name: str, comm: Any, stage: int, world_rank_of: Any, to_device: Any = None,
                   single_device: bool = True, net: Any = None, codecs: Any = None,
                   links: Any = None) -> SynchronousTransfers:
    return SynchronousTransfers(comm, stage, world_rank_of, net, codecs)


class HostPairSum:
    """The NCCL tied-embedding sum (`jaxpipe.comm.tied.NcclPairSum`) played on CPU by an MPI Allreduce."""

    def __init__(self, comm: Any):
        self.comm = comm

    def __call__(self, x: jax.Array) -> jax.Array:
        mine = np.asarray(x)
        total = np.empty_like(mine)
        self.comm.Allreduce(mine, total, op=MPI.SUM)
        return jax.device_put(total, x.sharding)

    def exchange(self, x: jax.Array) -> jax.Array:
        """NCCL's all-gather of the int8 wire bytes (`NcclPairSum.exchange`)."""
        mine = np.ascontiguousarray(np.asarray(x))
        both = np.empty((2, *mine.shape), mine.dtype)
        self.comm.Allgather(mine, both)
        return jax.device_put(both[1 - self.comm.Get_rank()], x.sharding)

    def close(self) -> None:
        pass


def make_tied_exchange(transport: str, comm: Any, first: bool, peer_world_rank: int, net: Any = None,
                       wire_dtype: str = "float32", device_sum: Any = None, replica: int = 0) -> TiedExchange:
    return TiedExchange(comm, first, peer_world_rank, net, wire_dtype, HostPairSum(comm), replica)
