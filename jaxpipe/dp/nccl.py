"""The DP collectives on the GPU buffers, over NCCL (CuPy, imported lazily): no device->host copy.

`parallel.transport=nccl` on GPU: reduce + broadcast for the central PS, reduce-scatter +
all-gather for the sharded PS, allreduce, and with a codec the gather / all-to-all / all-gather of
the quantised rows as grouped NCCL sends and receives. Encoding, decoding and the float32 sums run
on the device (jaxpipe.comm.quant), so only the wire's bytes ever move, GPU to GPU.

`DeviceCollectives` is the protocol: which buffers are allocated, which collective runs with which
counts, and the pacing under link emulation (each operation first waits until this member's
bytes would have crossed its emulated link, then runs at the real link's speed, as the NCCL
tied-embedding sum does); subclasses supply blocking transfers on device buffers. `NcclCollectives`
is NCCL's; tests/handshake_transport.py plays the same semantics with MPI on CPU.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from typing import Any

import jax

from jaxpipe.comm import nccl as nccl_setup
from jaxpipe.comm.netem import NetworkEmulator
from jaxpipe.comm.transport.device import wait_stream
from jaxpipe.dp.collectives import Collectives


class DeviceCollectives(Collectives):
    def __init__(self, comm: Any, net: NetworkEmulator | None = None, world_rank_of: Any = None):
        super().__init__(comm)
        self.net, self.world_rank_of = net, world_rank_of

    # ---- what a subclass provides: buffers and blocking transfers on them ----------------------------
    @abstractmethod
    def _buf(self, x: jax.Array) -> Any:
        """A view of a computed JAX array's device memory (no copy)."""

    @abstractmethod
    def _empty(self, shape: tuple[int, ...], dtype: Any) -> Any: ...

    @abstractmethod
    def _array(self, buf: Any) -> jax.Array:
        """The buffer as a JAX array, once every transfer into it has completed (no copy)."""

    @abstractmethod
    def _copy(self, src: Any, dst: Any) -> None: ...

    @abstractmethod
    def _raw_reduce(self, src: Any, dst: Any | None) -> None: ...

    @abstractmethod
    def _raw_broadcast(self, src: Any | None, dst: Any) -> None: ...

    @abstractmethod
    def _raw_reduce_scatter(self, src: Any, dst: Any) -> None: ...

    @abstractmethod
    def _raw_all_gather(self, src: Any, dst: Any) -> None: ...

    @abstractmethod
    def _raw_all_reduce(self, src: Any, dst: Any) -> None: ...

    @abstractmethod
    def _raw_group(self, sends: list[tuple[int, Any]], recvs: list[tuple[int, Any]]) -> None:
        """Sends and receives posted together (an NCCL group), returning once all completed."""

    # ---- the protocol ---------------------------------------------------------------------------------
    def _pace(self, op: str, nbytes: int) -> None:
        """With emulated links: wait until this member's bytes of `op` would have crossed its link."""
        net = self.net
        if net is None or self.size < 2:
            return
        peer = self.world_rank_of((self.rank + 1) % self.size)
        due = net.reserve(peer, self.egress(op, nbytes)) + (self.hops(op) - 1) * net.link(peer).delay_s
        time.sleep(max(0.0, due - net.clock()))

    def _reduce_sum(self, x: jax.Array) -> jax.Array | None:
        self._pace("reduce", x.nbytes)
        src = self._buf(x)
        dst = self._empty(x.shape, x.dtype) if self.rank == 0 else None
        self._raw_reduce(src, dst)
        return self._array(dst) if dst is not None else None

    def _bcast(self, x: jax.Array) -> jax.Array:
        self._pace("bcast", x.nbytes)
        dst = self._empty(x.shape, x.dtype)
        self._raw_broadcast(self._buf(x) if self.rank == 0 else None, dst)
        return self._array(dst)

    def _reduce_scatter_sum(self, x: jax.Array) -> jax.Array:
        self._pace("reduce_scatter", x.nbytes)
        dst = self._empty((x.shape[0] // self.size, *x.shape[1:]), x.dtype)
        self._raw_reduce_scatter(self._buf(x), dst)
        return self._array(dst)

    def _allreduce_sum(self, x: jax.Array) -> jax.Array:
        self._pace("allreduce", x.nbytes)
        dst = self._empty(x.shape, x.dtype)
        self._raw_all_reduce(self._buf(x), dst)
        return self._array(dst)

    def _allgather(self, x: jax.Array) -> jax.Array:
        self._pace("allgather", x.nbytes)
        dst = self._empty((self.size, *x.shape), x.dtype)
        self._raw_all_gather(self._buf(x), dst)
        return self._array(dst)

    def _gather(self, x: jax.Array) -> jax.Array | None:
        self._pace("gather", x.nbytes)
        src = self._buf(x)
        if self.rank > 0:
            self._raw_group([(0, src)], [])
            return None
        dst = self._empty((self.size, *x.shape), x.dtype)
        self._copy(src, dst[0])
        self._raw_group([], [(r, dst[r]) for r in range(1, self.size)])
        return self._array(dst)

    def _alltoall(self, x: jax.Array) -> jax.Array:
        self._pace("alltoall", x.nbytes)
        src, me = self._buf(x), self.rank
        dst = self._empty(x.shape, x.dtype)
        self._copy(src[me], dst[me])
        others = [r for r in range(self.size) if r != me]
        self._raw_group([(r, src[r]) for r in others], [(r, dst[r]) for r in others])
        return self._array(dst)


class NcclCollectives(DeviceCollectives):
    """NCCL on the stage's DP group: one communicator, one non-blocking CuPy stream (work on CUDA's
    legacy default stream would wait for all of JAX's queued compute)."""

    name = "nccl"

    def __init__(self, comm: Any, net: NetworkEmulator | None = None, world_rank_of: Any = None):
        self._cp, self._nccl = nccl_setup.load()
        super().__init__(comm, net, world_rank_of)
        self._comm, self._stream = nccl_setup.group_communicator(self.comm)

    def _type(self, buf: Any) -> int:
        return nccl_setup.nccl_type(buf)

    def _buf(self, x: jax.Array) -> Any:
        self._cp.cuda.Device(0).use()
        x.block_until_ready()  # The program that produced `x` ran on JAX's stream.
        return self._cp.from_dlpack(x)

    def _empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        with self._stream:
            return self._cp.empty(shape, dtype=jax.numpy.dtype(dtype).name)

    def _array(self, buf: Any) -> jax.Array:
        wait_stream(self._stream)
        return jax.dlpack.from_dlpack(buf)

    def _copy(self, src: Any, dst: Any) -> None:
        with self._stream:
            dst[...] = src

    def _raw_reduce(self, src: Any, dst: Any | None) -> None:
        out = dst if dst is not None else src  # ignored off the root
        self._comm.reduce(src.data.ptr, out.data.ptr, src.size, self._type(src), self._nccl.NCCL_SUM, 0,
                          self._stream.ptr)

    def _raw_broadcast(self, src: Any | None, dst: Any) -> None:
        send = src if src is not None else dst
        self._comm.broadcast(send.data.ptr, dst.data.ptr, dst.size, self._type(dst), 0, self._stream.ptr)

    def _raw_reduce_scatter(self, src: Any, dst: Any) -> None:
        self._comm.reduceScatter(src.data.ptr, dst.data.ptr, dst.size, self._type(src), self._nccl.NCCL_SUM,
                                 self._stream.ptr)

    def _raw_all_gather(self, src: Any, dst: Any) -> None:
        self._comm.allGather(src.data.ptr, dst.data.ptr, src.size, self._type(src), self._stream.ptr)

    def _raw_all_reduce(self, src: Any, dst: Any) -> None:
        self._comm.allReduce(src.data.ptr, dst.data.ptr, src.size, self._type(src), self._nccl.NCCL_SUM,
                             self._stream.ptr)

    def _raw_group(self, sends: list[tuple[int, Any]], recvs: list[tuple[int, Any]]) -> None:
        self._nccl.groupStart()
        for peer, buf in sends:
            self._comm.send(buf.data.ptr, buf.size, self._type(buf), peer, self._stream.ptr)
        for peer, buf in recvs:
            self._comm.recv(buf.data.ptr, buf.size, self._type(buf), peer, self._stream.ptr)
        self._nccl.groupEnd()
        wait_stream(self._stream)

    def close(self) -> None:
        self._comm.destroy()
        super().close()
