"""The tied embedding's gradient: the chunk holding the token embedding and the chunk holding
the LM head each keep a copy of `wte`, and both must receive the sum of the two gradients so that
the copies stay bit-identical.

Both ends compute the same sum in the same order (the embedding's gradient first), from the same
wire values: with a bfloat16 wire both ends round *both* gradients to bfloat16 and add them in
float32; with an int8 wire (absmax per embedding row, `jaxpipe.comm.quant`) each end sends its
gradient plus the residue of its earlier roundings (error feedback: what int8 dropped last step is
sent next step, so no rounding bias accumulates in `wte`) and both ends add the two decoded wires.
The residue is per end (and per replica), kept on the device and saved in checkpoints.

Where the transport is NCCL on GPUs the sum runs on the devices (`NcclPairSum`: with two ranks
a + b = b + a exactly; an int8 wire is all-gathered as bytes and decoded on both); otherwise the
gradients cross through the host, encoded on the device so that only the wire's bytes move. With
link emulation on, the exchange pays the emulated link like any message.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe.comm import quant
from jaxpipe.comm.netem import NetworkEmulator
from jaxpipe.comm.quant import ErrorFeedback
from jaxpipe.comm.traffic import tied_traffic
from jaxpipe.comm.transport.device import wait_stream

_TAG = 77


WIRE_DTYPES = ("float32", "bfloat16", "int8")  # parallel.tied_grad_dtype


def wire_bytes_per_end(vocab: int, d_model: int, wire_dtype: str) -> int:
    """Bytes one end sends per step for a [vocab, d_model] gradient in `wire_dtype`, as the tied
    exchange's traffic description (jaxpipe.comm.traffic.tied_traffic) states them: the trainer's
    counters, the first log line, the cost model and the layout search read that one description.
    Zero traffic where both ends share a rank (`gpipe_ring`, one stage) is the caller's to know."""
    return tied_traffic(vocab, d_model, wire_dtype).egress(0)


class TiedExchange:
    """Collective over the 2-rank communicator `comm` (`first`: this end holds the embedding)."""

    def __init__(self, comm: Any, first: bool, peer_world_rank: int, net: NetworkEmulator | None = None,
                 wire_dtype: str = "float32", device_sum: Any = None, replica: int = 0):
        self.comm, self.first, self.peer, self.net = comm, first, peer_world_rank, net
        self.wire_dtype, self.device_sum = wire_dtype, device_sum
        self.feedback = ErrorFeedback(f"tied_ef.{'embed' if first else 'head'}.r{replica}") \
            if wire_dtype == "int8" else None
        self.bytes_sent = 0  # since the last `take_bytes`

    def wire_bytes(self, g: jax.Array) -> int:
        return wire_bytes_per_end(int(g.size // g.shape[-1]), int(g.shape[-1]), self.wire_dtype)

    def take_bytes(self) -> int:
        n, self.bytes_sent = self.bytes_sent, 0
        return n

    def __call__(self, g: jax.Array) -> jax.Array:
        """The sum of this end's `g` and the other end's, identical bits on both ends."""
        self.bytes_sent += self.wire_bytes(g)
        if self.wire_dtype == "int8":
            return self._int8(g)
        bf16 = self.wire_dtype == "bfloat16"
        if self.device_sum is not None:
            if bf16:
                g = _round_to_bf16(g)
            self._wait_link(self.wire_bytes(g))
            return self.device_sum(g)
        mine = _bf16_bits(g) if bf16 else g  # Rounded and encoded on the device.
        theirs = jax.device_put(self._host_exchange(np.asarray(mine)), g.sharding)
        first, second = (mine, theirs) if self.first else (theirs, mine)
        return _ordered_sum(first, second)

    def _int8(self, g: jax.Array) -> jax.Array:
        assert self.feedback is not None
        mine = self.feedback.encode(g)  # uint8 rows: values, then the scale
        if self.device_sum is not None:  # Only the int8 bytes cross, GPU to GPU.
            self._wait_link(int(mine.size))
            theirs = self.device_sum.exchange(mine)
        else:
            theirs = jax.device_put(self._host_exchange(np.asarray(mine)), mine.sharding)
        first, second = (mine, theirs) if self.first else (theirs, mine)
        return _int8_sum(first, second)

    def _wait_link(self, nbytes: int) -> None:
        if self.net is not None:  # The bytes still cross the emulated link: wait until they would have.
            time.sleep(max(0.0, self.net.reserve(self.peer, nbytes) - self.net.clock()))

    def _host_exchange(self, send_buf: np.ndarray) -> np.ndarray:
        from mpi4py import MPI  # here, so that the cost model can read this module's traffic without MPI

        me = self.comm.Get_rank()
        theirs_buf = np.empty_like(send_buf)
        raw, out = send_buf.reshape(-1).view(np.uint8), theirs_buf.reshape(-1).view(np.uint8)
        if self.net is None:
            self.comm.Sendrecv([raw, MPI.BYTE], dest=1 - me, sendtag=_TAG,
                               recvbuf=[out, MPI.BYTE], source=1 - me, recvtag=_TAG)
        else:  # An exchange over the emulated (full-duplex) link.
            recv = self.comm.Irecv([out, MPI.BYTE], source=1 - me, tag=_TAG)
            sends: list[Any] = []
            self.net.send(self.peer, raw.nbytes,
                          lambda: sends.append(self.comm.Isend([raw, MPI.BYTE], dest=1 - me, tag=_TAG)), owner=self)
            recv.Wait()
            self.net.drain(owner=self)
            MPI.Request.Waitall(sends)
        return theirs_buf

    def stateful(self) -> list[Any]:
        return [self.feedback] if self.feedback is not None else []

    def close(self) -> None:
        if self.device_sum is not None:
            self.device_sum.close()


class LocalTiedSum:
    """Both ends on one rank (a V-shaped schedule, or one stage): the same sum without a wire (the
    same rounding as across ranks, so results do not depend on where the ends live)."""

    def __init__(self, wire_dtype: str = "float32", replica: int = 0):
        self.wire_dtype = wire_dtype
        self.feedback = [ErrorFeedback(f"tied_ef.{end}.r{replica}") for end in ("embed", "head")] \
            if wire_dtype == "int8" else []

    def __call__(self, g_embed: jax.Array, g_head: jax.Array) -> jax.Array:
        if self.wire_dtype == "int8":
            return _int8_sum(self.feedback[0].encode(g_embed), self.feedback[1].encode(g_head))
        return local_tied_sum(g_embed, g_head, self.wire_dtype)

    def stateful(self) -> list[Any]:
        return list(self.feedback)


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


@jax.jit
def _int8_sum(first: jax.Array, second: jax.Array) -> jax.Array:
    """The embedding end's decoded wire plus the head end's, in that order on both ends."""
    return quant.decode_rows(first, "int8") + quant.decode_rows(second, "int8")


class NcclPairSum:
    """Sum of one array over a 2-rank MPI communicator, on the GPUs (NCCL through CuPy): the tied
    embedding's gradient between the first and last stage, which through the host costs a
    device→host copy, an MPI exchange and a host→device copy of 412 MB (GPT-3 XL, float32).
    With two ranks a + b = b + a exactly, so both ends get identical bits."""

    def __init__(self, comm: Any):
        from jaxpipe.comm import nccl as nccl_setup

        self._cupy, self._nccl = nccl_setup.load()
        self._rank = comm.Get_rank()
        self._comm, self._stream = nccl_setup.group_communicator(comm)

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

    def exchange(self, x: jax.Array) -> jax.Array:
        """The other end's uint8 array of `x`'s shape (an NCCL all-gather of the bytes)."""
        cp = self._cupy
        cp.cuda.Device(0).use()
        x.block_until_ready()
        with self._stream:
            src = cp.from_dlpack(x).ravel()
            out = cp.empty(2 * src.size, cp.uint8)
        self._comm.allGather(src.data.ptr, out.data.ptr, src.size, self._nccl.NCCL_UINT8, self._stream.ptr)
        wait_stream(self._stream)
        other = 1 - self._rank
        return jax.dlpack.from_dlpack(out[other * src.size:(other + 1) * src.size]).reshape(x.shape)

    def close(self) -> None:
        self._comm.destroy()




def make_tied_exchange(transport: str, comm: Any, first: bool, peer_world_rank: int,
                       net: NetworkEmulator | None = None, wire_dtype: str = "float32",
                       device_sum: Any = None, replica: int = 0) -> TiedExchange:
    """The exchange that goes with pipeline transport `transport`: on the GPUs for NCCL.
    `device_sum` replaces that choice (tests stand in for NCCL on CPU)."""
    if device_sum is None and transport == "nccl" and jax.default_backend() == "gpu":
        device_sum = NcclPairSum(comm)
    return TiedExchange(comm, first, peer_world_rank, net, wire_dtype, device_sum, replica)
