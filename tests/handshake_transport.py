"""NCCL's transfer semantics on CPU, for testing the ready-handshake protocol of the NCCL transport
without GPUs: every transfer is a synchronous MPI send (it returns only once the receiver takes
part, as an NCCL send does), on a communicator of its own, after the same MPI header and "ready"
exchange the NCCL transport does. `MpiPlaysNccl` plays the NCCL data-parallel collectives the same way."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from mpi4py import MPI

from jaxpipe.comm.message import ArraySpec
from jaxpipe.comm.tied import TiedExchange
from jaxpipe.comm.transport.nccl import ReadyHandshake
from jaxpipe.dp.nccl import DeviceCollectives


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

    def _payload_bytes(self, x: jax.Array) -> tuple[Any, Any]:
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


class MpiPlaysNccl(DeviceCollectives):
    """The NCCL DP collectives (`jaxpipe.dp.nccl.NcclCollectives`) played on CPU: the same protocol
    (buffers, counts, roots, groups, pacing), each transfer a blocking MPI collective or a group of
    point-to-point transfers on the DP group's own communicator. The algorithms must hand it device
    arrays only (a host array here would be a device->host copy on the GPU)."""

    name = "nccl stand-in (MPI on CPU)"

    def _buf(self, x: Any) -> np.ndarray:
        assert isinstance(x, jax.Array), f"the DP algorithm handed the device collectives a {type(x)}"
        return np.asarray(x)

    def _empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.empty(shape, np.dtype(dtype))

    def _array(self, buf: np.ndarray) -> jax.Array:
        return jax.device_put(buf)

    def _copy(self, src: np.ndarray, dst: np.ndarray) -> None:
        dst[...] = src

    def _raw_reduce(self, src: np.ndarray, dst: np.ndarray | None) -> None:
        self.comm.Reduce(src, dst, op=MPI.SUM, root=0)

    def _raw_broadcast(self, src: np.ndarray | None, dst: np.ndarray) -> None:
        if src is not None:
            dst[...] = src
        self.comm.Bcast(dst, root=0)

    def _raw_reduce_scatter(self, src: np.ndarray, dst: np.ndarray) -> None:
        self.comm.Reduce_scatter_block(src, dst, op=MPI.SUM)

    def _raw_all_gather(self, src: np.ndarray, dst: np.ndarray) -> None:
        self.comm.Allgather(src, dst)

    def _raw_all_reduce(self, src: np.ndarray, dst: np.ndarray) -> None:
        self.comm.Allreduce(src, dst, op=MPI.SUM)

    def _raw_group(self, sends: list[tuple[int, Any]], recvs: list[tuple[int, Any]]) -> None:
        reqs = [self.comm.Irecv(buf, source=peer, tag=5) for peer, buf in recvs]
        reqs += [self.comm.Isend(np.ascontiguousarray(buf), dest=peer, tag=5) for peer, buf in sends]
        MPI.Request.Waitall(reqs)


def make_dp_collectives(transport: str, comm: Any, net: Any, world_rank_of: Any) -> MpiPlaysNccl:
    return MpiPlaysNccl(comm, net, world_rank_of)
