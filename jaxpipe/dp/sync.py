"""Gradient averaging across the D pipeline replicas of one stage (`Topology.dp_comm`).

All modes run after the pipeline flush on one flat float32 buffer per stage (one message, not one
per tensor: over slow links latency per message matters) and return the *average* gradient on
every replica, after which each replica runs the same optimizer step and parameters stay equal.

- `central_ps`: the original's central parameter server: DP rank 0 of the stage receives the sum
  of all replicas' gradients (MPI Reduce to root 0), averages it, and sends it back (Bcast).
  All traffic crosses rank 0's link: 2·(D-1)·|g| bytes through one NIC.
- `sharded_ps`: every replica serves 1/D of the buffer (Reduce_scatter + Allgather), the
  original's sharded PS: 2·(D-1)/D·|g| per NIC.
- `allreduce`: MPI Allreduce (the MPI library picks the algorithm).

With link emulation on (`network.*`), the same averages travel as point-to-point chunks through
the emulated links: the central PS as a pipelined chain reduce to DP rank 0 and chain broadcast
back, the other two as a ring reduce-scatter + all-gather.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from mpi4py import MPI

from jaxpipe.comm.netem import NetworkEmulator, transfer_chunks
from jaxpipe.dp.base import DataParallel, DPContext, Trees


class GradSync(DataParallel):
    """The exact algorithms: every step, every replica gets the replicas' average gradient."""

    def __init__(self, ctx: DPContext):
        super().__init__(ctx)
        self.comm, self.size, self.net = ctx.comm, ctx.size, ctx.net
        self._world_rank_of = ctx.world_rank_of
        self._unravel: Any = None
        self._ravel = jax.jit(lambda g: ravel_pytree(g)[0])

    def sync_gradients(self, step: int, grads: Trees) -> Trees:
        if self.size == 1:
            return grads
        if self._unravel is None:
            self._unravel = jax.jit(ravel_pytree(grads)[1])
        flat = np.array(self._ravel(grads), dtype=np.float32)  # Host copy we may write into.
        averaged = self.average(flat) if self.net is None else self.average_emulated(flat)
        self._wire_bytes = self.traffic_bytes(flat.nbytes)
        return self.ctx.place(self._unravel(jnp.asarray(averaged)))

    def traffic_bytes(self, nbytes: int) -> int:
        """What this rank sends per sync of `nbytes` (ring: 2·(D-1)/D of the buffer)."""
        return int(2 * (self.size - 1) * nbytes / self.size)

    @abstractmethod
    def average(self, flat: np.ndarray) -> np.ndarray:
        """The element-wise mean of `flat` over the DP group, on every member."""

    def average_emulated(self, flat: np.ndarray) -> np.ndarray:
        """The same mean, moved as point-to-point chunks over the emulated links (see jaxpipe.comm.netem),
        with the algorithm the real system would use; subclasses pick it."""
        assert self.net is not None
        return _ring_allreduce_mean(flat, _EmulatedP2P(self.comm, self.net, self._world_rank_of))


class CentralPS(GradSync):
    name = "central_ps"

    def traffic_bytes(self, nbytes: int) -> int:
        """The chain reduce + broadcast: every member but the ends sends the buffer once each way."""
        me, n = self.comm.Get_rank(), self.size
        return nbytes * ((me > 0) + (me < n - 1))

    def average(self, flat: np.ndarray) -> np.ndarray:
        total = np.empty_like(flat) if self.comm.Get_rank() == 0 else None
        self.comm.Reduce(flat, total, op=MPI.SUM, root=0)
        if self.comm.Get_rank() == 0:
            assert total is not None
            total /= np.float32(self.size)
            flat = total
        self.comm.Bcast(flat, root=0)
        return flat

    def average_emulated(self, flat: np.ndarray) -> np.ndarray:
        """Chain reduce to the server, then chain broadcast from it, in pipelined chunks: what NCCL's
        reduce + broadcast did in the original (each costs about |g|/R plus one delay per hop)."""
        assert self.net is not None
        p2p = _EmulatedP2P(self.comm, self.net, self._world_rank_of)
        me, n = self.comm.Get_rank(), self.size
        chunks = np.array_split(np.arange(flat.size), transfer_chunks(flat.nbytes))
        # Reduce along n-1 -> ... -> 1 -> 0.
        for c, idx in enumerate(chunks):
            part = flat[idx[0]: idx[-1] + 1] if idx.size else flat[:0]
            if me < n - 1:
                incoming = np.empty_like(part)
                p2p.recv(incoming, me + 1, tag=c)
                part += incoming
            if me > 0:
                p2p.send(part, me - 1, tag=c)
        p2p.wait()
        if me == 0:
            flat /= np.float32(n)
        # Broadcast along 0 -> 1 -> ... -> n-1.
        for c, idx in enumerate(chunks):
            part = flat[idx[0]: idx[-1] + 1] if idx.size else flat[:0]
            if me > 0:
                p2p.recv(part, me - 1, tag=10000 + c)
            if me < n - 1:
                p2p.send(part, me + 1, tag=10000 + c)
        p2p.wait()
        return flat


class ShardedPS(GradSync):
    name = "sharded_ps"

    def average(self, flat: np.ndarray) -> np.ndarray:
        n = flat.size
        shard = -(-n // self.size)
        padded = np.zeros(shard * self.size, np.float32)
        padded[:n] = flat
        mine = np.empty(shard, np.float32)
        self.comm.Reduce_scatter_block(padded, mine, op=MPI.SUM)
        mine /= np.float32(self.size)
        self.comm.Allgather(mine, padded)
        return padded[:n]


class Allreduce(GradSync):
    name = "allreduce"

    def average(self, flat: np.ndarray) -> np.ndarray:
        out = np.empty_like(flat)
        self.comm.Allreduce(flat, out, op=MPI.SUM)
        out /= np.float32(self.size)
        return out


class _EmulatedP2P:
    """Sends that leave when the emulated link allows; receives are plain blocking MPI."""

    def __init__(self, comm: Any, net: NetworkEmulator, world_rank_of: Any):
        self.comm, self.net, self.world_rank_of = comm, net, world_rank_of
        self.reqs: list[Any] = []
        self.bufs: list[np.ndarray] = []

    def send(self, buf: np.ndarray, dst: int, tag: int) -> None:
        self.bufs.append(buf)
        self.net.send(self.world_rank_of(dst), buf.nbytes,
                      lambda: self.reqs.append(self.comm.Isend(buf, dest=dst, tag=tag)))

    def recv(self, buf: np.ndarray, src: int, tag: int) -> None:
        self.comm.Recv(buf, source=src, tag=tag)

    def wait(self) -> None:
        self.net.drain()
        MPI.Request.Waitall(self.reqs)
        self.reqs, self.bufs = [], []


def _ring_allreduce_mean(flat: np.ndarray, p2p: _EmulatedP2P) -> np.ndarray:
    """Ring reduce-scatter then ring all-gather: every rank sends 2·(n-1)/n of the buffer (the
    sharded PS's traffic), in 2·(n-1) steps of one delay each.

    Segments are sent as views of `flat`: in each phase a segment is sent after its last write of
    that phase (reduce-scatter sends segment `me - step` and adds into `me - step - 1`; all-gather
    receives each segment once, before forwarding it), and `wait` ends the phase."""
    comm = p2p.comm
    me, n = comm.Get_rank(), comm.Get_size()
    segs = np.array_split(np.arange(flat.size), n)
    right, left = (me + 1) % n, (me - 1) % n

    def seg(i: int) -> np.ndarray:
        idx = segs[i % n]
        return flat[idx[0]: idx[-1] + 1] if idx.size else flat[:0]

    for step in range(n - 1):  # After this, rank r holds the full sum of segment r + 1.
        p2p.send(seg(me - step), right, tag=20000 + step)
        incoming = np.empty_like(seg(me - step - 1))
        p2p.recv(incoming, left, tag=20000 + step)
        seg(me - step - 1)[:] += incoming
    p2p.wait()
    seg(me + 1)[:] /= np.float32(n)
    for step in range(n - 1):
        p2p.send(seg(me + 1 - step), right, tag=30000 + step)
        p2p.recv(seg(me - step), left, tag=30000 + step)
    p2p.wait()
    return flat


DP_MODES: dict[str, type[DataParallel]] = {"central_ps": CentralPS, "sharded_ps": ShardedPS, "allreduce": Allreduce}


def make_data_parallel(ctx: DPContext) -> DataParallel:
    """The algorithm `parallel.dp_mode` names."""
    return DP_MODES[ctx.parallel.dp_mode](ctx)
