"""The tied embedding's gradient: the chunk holding the token embedding and the chunk holding
the LM head each keep a copy of `wte`, and both must receive the sum of the two gradients so that
the copies stay bit-identical.

Both ends compute the same sum in the same order (the embedding's gradient first), from the same
wire values: with a bfloat16 wire both ends round *both* gradients to bfloat16 and add them in
float32. Where the transport is NCCL on GPUs the sum runs on the devices (`NcclPairSum`: with two
ranks a + b = b + a exactly); otherwise the gradients cross through the host, encoded on the
device so that only the wire's bytes move. With link emulation on, the exchange pays the emulated
link like any message.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from mpi4py import MPI

from jaxpipe.comm.netem import NetworkEmulator
from jaxpipe.comm.transport.device import wait_stream

_TAG = 77


class TiedExchange:
    """Collective over the 2-rank communicator `comm` (`first`: this end holds the embedding)."""

    def __init__(self, comm: Any, first: bool, peer_world_rank: int, net: NetworkEmulator | None = None,
                 wire_dtype: str = "float32", device_sum: Any = None):
        self.comm, self.first, self.peer, self.net = comm, first, peer_world_rank, net
        self.wire_dtype, self.device_sum = wire_dtype, device_sum

    def wire_bytes(self, g: jax.Array) -> int:
        return int(g.size) * (2 if self.wire_dtype == "bfloat16" else 4)

    def __call__(self, g: jax.Array) -> jax.Array:
        """The sum of this end's `g` and the other end's, identical bits on both ends."""
        bf16 = self.wire_dtype == "bfloat16"
        if self.device_sum is not None:
            if bf16:
                g = _round_to_bf16(g)
            if self.net is not None:  # The bytes still cross the emulated link: wait until they would have.
                time.sleep(max(0.0, self.net.reserve(self.peer, self.wire_bytes(g)) - self.net.clock()))
            return self.device_sum(g)
        me = self.comm.Get_rank()
        mine = _bf16_bits(g) if bf16 else g  # Rounded and encoded on the device.
        send_buf = np.asarray(mine)
        mpi_type = MPI.UINT16_T if bf16 else MPI.FLOAT
        theirs_buf = np.empty_like(send_buf)
        if self.net is None:
            self.comm.Sendrecv([send_buf, mpi_type], dest=1 - me, sendtag=_TAG,
                               recvbuf=[theirs_buf, mpi_type], source=1 - me, recvtag=_TAG)
        else:  # An exchange over the emulated (full-duplex) link.
            recv = self.comm.Irecv([theirs_buf, mpi_type], source=1 - me, tag=_TAG)
            sends: list[Any] = []
            self.net.send(self.peer, send_buf.nbytes,
                          lambda: sends.append(self.comm.Isend([send_buf, mpi_type], dest=1 - me, tag=_TAG)))
            recv.Wait()
            self.net.drain()
            MPI.Request.Waitall(sends)
        theirs = jax.device_put(theirs_buf, g.sharding)
        first, second = (mine, theirs) if self.first else (theirs, mine)
        return _ordered_sum(first, second)

    def close(self) -> None:
        if self.device_sum is not None:
            self.device_sum.close()


def local_tied_sum(g_embed: jax.Array, g_head: jax.Array, wire_dtype: str = "float32") -> jax.Array:
    """Both ends on one rank (a V-shaped schedule, or one stage): the same sum without a wire."""
    if wire_dtype == "bfloat16":
        return _ordered_sum(_bf16_bits(g_embed), _bf16_bits(g_head))
    return _ordered_sum(g_embed, g_head)


def _decode(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16).astype(jnp.float32) if x.dtype == jnp.uint16 else x


@jax.jit
def _bf16_bits(g: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(g.astype(jnp.bfloat16), jnp.uint16)


@jax.jit
def _ordered_sum(first: jax.Array, second: jax.Array) -> jax.Array:
    """The embedding end's gradient plus the head end's, in that order on both ends."""
    return _decode(first) + _decode(second)


@jax.jit
def _round_to_bf16(g: jax.Array) -> jax.Array:
    return _decode(_bf16_bits(g))


class NcclPairSum:
    """Sum of one array over a 2-rank MPI communicator, on the GPUs (NCCL through CuPy): the tied
    embedding's gradient between the first and last stage, which through the host costs a
    device→host copy, an MPI exchange and a host→device copy of 412 MB (GPT-3 XL, float32).
    With two ranks a + b = b + a exactly, so both ends get identical bits."""

    def __init__(self, comm: Any):
        import cupy
        from cupy.cuda import nccl

        self._cupy, self._nccl = cupy, nccl
        rank = comm.Get_rank()
        uid = nccl.get_unique_id() if rank == 0 else None
        uid = comm.bcast(uid, root=0)
        cupy.cuda.Device(0).use()
        self._comm = nccl.NcclCommunicator(2, uid, rank)
        self._stream = cupy.cuda.Stream(non_blocking=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        cp = self._cupy
        cp.cuda.Device(0).use()
        x.block_until_ready()
        with self._stream:
            src = cp.from_dlpack(x)
            out = cp.empty_like(src)
        self._comm.allReduce(src.data.ptr, out.data.ptr, src.size, self._nccl.NCCL_FLOAT32, self._nccl.NCCL_SUM,
                             self._stream.ptr)
        wait_stream(self._stream)
        return jax.dlpack.from_dlpack(out)

    def close(self) -> None:
        self._comm.destroy()




def make_tied_exchange(transport: str, comm: Any, first: bool, peer_world_rank: int,
                       net: NetworkEmulator | None = None, wire_dtype: str = "float32",
                       device_sum: Any = None) -> TiedExchange:
    """The exchange that goes with pipeline transport `transport`: on the GPUs for NCCL.
    `device_sum` replaces that choice (tests stand in for NCCL on CPU)."""
    if device_sum is None and transport == "nccl" and jax.default_backend() == "gpu":
        device_sum = NcclPairSum(comm)
    return TiedExchange(comm, first, peer_world_rank, net, wire_dtype, device_sum)
