"""The collective operations the data-parallel exchanges are written in, over one stage's DP group,
with three ways to move the bytes:

- `HostMPI`: MPI's own collectives on host copies (what jaxpipe did before link emulation);
- `Emulated`: point-to-point algorithms whose every send leaves when the emulated link allows
  (`network.*`, see jaxpipe.comm.netem): a chain for reduce and broadcast (what NCCL's reduce and
  broadcast do), a ring for reduce-scatter and allreduce, direct sends for gather, all-gather and
  all-to-all. Chunks go out as views of the buffer: in each phase a chunk is sent after its last
  write, and a phase ends with a wait for every send;
- `DeviceCollectives` (jaxpipe.dp.nccl): the same operations on the GPU buffers, no host copy.

`jaxpipe.dp.base.make_collectives` picks one (this module never imports jaxpipe.dp.nccl, which builds
on it).

Arrays go in and come out as JAX arrays on this rank's device. Every operation counts the bytes
this rank puts on DP links (`sent`), by the pattern the emulated version uses, whichever backend
moves them, so the metrics and the cost model agree on what a mode sends.

Only `reduce_sum` to root 0, `bcast` from root 0, and the other operations over the whole group
are needed; the root is always DP rank 0, the stage's parameter server.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import jax
import numpy as np
from mpi4py import MPI

from jaxpipe.comm import traffic
from jaxpipe.comm.netem import NetworkEmulator, transfer_chunks


def n_chunks(charged_bytes: float, elements: int) -> int:
    """How many pieces a chain cuts a buffer into (from the bytes the links are charged)."""
    return max(1, min(elements, transfer_chunks(charged_bytes)))


class Collectives(ABC):
    """One stage's DP group (rank order = replica order)."""

    name: str = "?"

    def __init__(self, comm: Any):
        self.comm = comm.Dup()  # Never mixed up with anything else on the DP communicator.
        self.size, self.rank = int(self.comm.Get_size()), int(self.comm.Get_rank())
        self.sent = 0

    # ---- byte accounting (the emulated patterns: jaxpipe.comm.traffic) -----------------------------
    def egress(self, op: str, nbytes: int) -> int:
        """The bytes this member sends in `op` on a buffer of `nbytes`."""
        return traffic.egress(op, nbytes, self.size, self.rank)

    def hops(self, op: str) -> int:
        return traffic.hops(op, self.size)

    def _count(self, op: str, nbytes: int) -> None:
        self.sent += self.egress(op, nbytes)

    def reduce_sum(self, x: jax.Array) -> jax.Array | None:
        """The element-wise sum over the group at root 0 (None elsewhere)."""
        self._count("reduce", x.nbytes)
        return self._reduce_sum(x)

    def bcast(self, x: jax.Array) -> jax.Array:
        """Root 0's `x` on every member (the others pass any array of that shape and dtype)."""
        self._count("bcast", x.nbytes)
        return self._bcast(x)

    def reduce_scatter_sum(self, x: jax.Array) -> jax.Array:
        """Member r gets the sum of block r of `x` (leading axis cut into `size` blocks)."""
        self._count("reduce_scatter", x.nbytes)
        return self._reduce_scatter_sum(x)

    def allreduce_sum(self, x: jax.Array) -> jax.Array:
        self._count("allreduce", x.nbytes)
        return self._allreduce_sum(x)

    def gather(self, x: jax.Array) -> jax.Array | None:
        """[size, *x.shape] at root 0 (row r from member r), None elsewhere."""
        self._count("gather", x.nbytes)
        return self._gather(x)

    def allgather(self, x: jax.Array) -> jax.Array:
        """[size, *x.shape] on every member."""
        self._count("allgather", x.nbytes)
        return self._allgather(x)

    def alltoall(self, x: jax.Array) -> jax.Array:
        """`x` is [size, ...]: row j goes to member j; row i of the result came from member i."""
        self._count("alltoall", x.nbytes)
        return self._alltoall(x)

    @abstractmethod
    def _reduce_sum(self, x: jax.Array) -> jax.Array | None: ...

    @abstractmethod
    def _bcast(self, x: jax.Array) -> jax.Array: ...

    @abstractmethod
    def _reduce_scatter_sum(self, x: jax.Array) -> jax.Array: ...

    @abstractmethod
    def _allreduce_sum(self, x: jax.Array) -> jax.Array: ...

    @abstractmethod
    def _gather(self, x: jax.Array) -> jax.Array | None: ...

    @abstractmethod
    def _allgather(self, x: jax.Array) -> jax.Array: ...

    @abstractmethod
    def _alltoall(self, x: jax.Array) -> jax.Array: ...

    def close(self) -> None:
        self.comm.Free()


def _host(x: jax.Array) -> np.ndarray:
    """A writable host copy (the only device->host copy of the host backends)."""
    return np.array(x)


def _dev(x: np.ndarray, like: jax.Array) -> jax.Array:
    return jax.device_put(x, getattr(like, "sharding", None))


def _mpi_type(a: np.ndarray) -> Any:
    return {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.uint8): MPI.BYTE}[a.dtype]


class HostMPI(Collectives):
    """MPI's collectives on host copies (the library picks each algorithm)."""

    name = "mpi"

    def _reduce_sum(self, x: jax.Array) -> jax.Array | None:
        a = _host(x)
        out = np.empty_like(a) if self.rank == 0 else None
        self.comm.Reduce(a, out, op=MPI.SUM, root=0)
        return _dev(out, x) if out is not None else None

    def _bcast(self, x: jax.Array) -> jax.Array:
        a = _host(x)
        self.comm.Bcast([a, _mpi_type(a)], root=0)
        return _dev(a, x)

    def _reduce_scatter_sum(self, x: jax.Array) -> jax.Array:
        a = _host(x)
        out = np.empty((a.shape[0] // self.size, *a.shape[1:]), a.dtype)
        self.comm.Reduce_scatter_block(a, out, op=MPI.SUM)
        return _dev(out, x)

    def _allreduce_sum(self, x: jax.Array) -> jax.Array:
        a = _host(x)
        out = np.empty_like(a)
        self.comm.Allreduce(a, out, op=MPI.SUM)
        return _dev(out, x)

    def _gather(self, x: jax.Array) -> jax.Array | None:
        a = _host(x)
        out = np.empty((self.size, *a.shape), a.dtype) if self.rank == 0 else None
        self.comm.Gather([a, _mpi_type(a)], [out, _mpi_type(a)] if out is not None else None, root=0)
        return _dev(out, x) if out is not None else None

    def _allgather(self, x: jax.Array) -> jax.Array:
        a = _host(x)
        out = np.empty((self.size, *a.shape), a.dtype)
        self.comm.Allgather([a, _mpi_type(a)], [out, _mpi_type(a)])
        return _dev(out, x)

    def _alltoall(self, x: jax.Array) -> jax.Array:
        a = _host(x)
        out = np.empty_like(a)
        self.comm.Alltoall([a, _mpi_type(a)], [out, _mpi_type(a)])
        return _dev(out, x)


class _P2P:
    """Sends that leave when the emulated link allows; receives are plain MPI."""

    # Open MPI moves a large message's data only inside the sender's MPI calls, so a sender waiting for
    # its scheduled sends keeps calling MPI; MPICH needs no such help (measured: the chain matches the model).
    POLL = "Open MPI" in MPI.Get_library_version()

    def __init__(self, comm: Any, net: NetworkEmulator, world_rank_of: Any):
        self.comm, self.net, self.world_rank_of = comm, net, world_rank_of
        self.reqs: list[Any] = []
        self.bufs: list[np.ndarray] = []

    def send(self, buf: np.ndarray, dst: int, tag: int) -> None:
        self.bufs.append(buf)
        self.net.send(self.world_rank_of(dst), buf.nbytes,
                      lambda: self.reqs.append(self.comm.Isend([buf, _mpi_type(buf)], dest=dst, tag=tag)), owner=self)

    def recv(self, buf: np.ndarray, src: int, tag: int) -> None:
        self.comm.Recv([buf, _mpi_type(buf)], source=src, tag=tag)

    def irecv(self, buf: np.ndarray, src: int, tag: int) -> Any:
        return self.comm.Irecv([buf, _mpi_type(buf)], source=src, tag=tag)

    def wait(self, recvs: list[Any] | None = None) -> None:
        if recvs:
            MPI.Request.Waitall(recvs)
        self.net.drain(poll=(lambda: MPI.Request.Testall(list(self.reqs))) if self.POLL else None, owner=self)
        MPI.Request.Waitall(self.reqs)
        self.reqs, self.bufs = [], []


class Emulated(Collectives):
    """Point-to-point algorithms over the emulated links (see the module doc)."""

    name = "emulated"

    def __init__(self, comm: Any, net: NetworkEmulator, world_rank_of: Any):
        super().__init__(comm)
        self.net = net
        self.p2p = _P2P(self.comm, net, world_rank_of)

    def _pieces(self, a: np.ndarray) -> list[np.ndarray]:
        flat = a.reshape(-1)
        k = n_chunks(flat.nbytes * self.net.size_scale, flat.size)
        return [flat[idx[0]: idx[-1] + 1] for idx in np.array_split(np.arange(flat.size), k) if idx.size]

    def _reduce_sum(self, x: jax.Array) -> jax.Array | None:
        a, p2p, me, n = _host(x), self.p2p, self.rank, self.size
        for c, part in enumerate(self._pieces(a)):  # n-1 -> ... -> 1 -> 0, pipelined by chunk
            if me < n - 1:
                incoming = np.empty_like(part)
                p2p.recv(incoming, me + 1, tag=c)
                part += incoming
            if me > 0:
                p2p.send(part, me - 1, tag=c)
        p2p.wait()
        return _dev(a, x) if me == 0 else None

    def _bcast(self, x: jax.Array) -> jax.Array:
        a, p2p, me, n = _host(x), self.p2p, self.rank, self.size
        for c, part in enumerate(self._pieces(a)):  # 0 -> 1 -> ... -> n-1
            if me > 0:
                p2p.recv(part, me - 1, tag=10000 + c)
            if me < n - 1:
                p2p.send(part, me + 1, tag=10000 + c)
        p2p.wait()
        return _dev(a, x)

    def _ring_reduce_scatter(self, a: np.ndarray) -> list[np.ndarray]:
        """After it, block `me` of `a` holds the group's sum (ring: n-1 steps of one block each). A
        block is sent after its last write of the phase (sent at step k: written at step k-1)."""
        p2p, me, n = self.p2p, self.rank, self.size
        blocks = np.split(a, n)
        right, left = (me + 1) % n, (me - 1) % n
        for step in range(n - 1):
            p2p.send(blocks[(me - step - 1) % n], right, tag=20000 + step)
            incoming = np.empty_like(blocks[0])
            p2p.recv(incoming, left, tag=20000 + step)
            blocks[(me - step - 2) % n] += incoming
        p2p.wait()
        return blocks

    def _reduce_scatter_sum(self, x: jax.Array) -> jax.Array:
        return _dev(self._ring_reduce_scatter(_host(x))[self.rank].copy(), x)

    def _allreduce_sum(self, x: jax.Array) -> jax.Array:
        a = _host(x)
        blocks = self._ring_reduce_scatter(a)
        p2p, me, n = self.p2p, self.rank, self.size
        right, left = (me + 1) % n, (me - 1) % n
        for step in range(n - 1):  # ring all-gather: each block received once, then forwarded
            p2p.send(blocks[(me - step) % n], right, tag=30000 + step)
            p2p.recv(blocks[(me - step - 1) % n], left, tag=30000 + step)
        p2p.wait()
        return _dev(a, x)

    def _gather(self, x: jax.Array) -> jax.Array | None:
        a, p2p, me, n = _host(x), self.p2p, self.rank, self.size
        if me > 0:
            p2p.send(a, 0, tag=40000)
            p2p.wait()
            return None
        out = np.empty((n, *a.shape), a.dtype)
        out[0] = a
        p2p.wait([p2p.irecv(out[r], r, tag=40000) for r in range(1, n)])
        return _dev(out, x)

    def _allgather(self, x: jax.Array) -> jax.Array:
        a, p2p, me, n = _host(x), self.p2p, self.rank, self.size
        out = np.empty((n, *a.shape), a.dtype)
        out[me] = a
        recvs = [p2p.irecv(out[r], r, tag=50000) for r in range(n) if r != me]
        for k in range(1, n):  # to me+1, me+2, ...: every member's first piece leaves at once
            p2p.send(a, (me + k) % n, tag=50000)
        p2p.wait(recvs)
        return _dev(out, x)

    def _alltoall(self, x: jax.Array) -> jax.Array:
        a, p2p, me, n = _host(x), self.p2p, self.rank, self.size
        out = np.empty_like(a)
        out[me] = a[me]
        recvs = [p2p.irecv(out[r], r, tag=60000) for r in range(n) if r != me]
        for k in range(1, n):
            p2p.send(a[(me + k) % n], (me + k) % n, tag=60000)
        p2p.wait(recvs)
        return _dev(out, x)
