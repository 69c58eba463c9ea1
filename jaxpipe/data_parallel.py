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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from mpi4py import MPI

from jaxpipe.model import Params


class GradSync(ABC):
    def __init__(self, comm: Any):
        self.comm = comm
        self.size = comm.Get_size()
        self._unravel: Any = None
        self._ravel = jax.jit(lambda g: ravel_pytree(g)[0])

    def __call__(self, grads: Params) -> Params:
        if self.size == 1:
            return grads
        if self._unravel is None:
            self._unravel = jax.jit(ravel_pytree(grads)[1])
        flat = np.array(self._ravel(grads), dtype=np.float32)  # Host copy we may write into.
        averaged = self.average(flat)
        return self._unravel(jnp.asarray(averaged))

    @abstractmethod
    def average(self, flat: np.ndarray) -> np.ndarray:
        """The element-wise mean of `flat` over the DP group, on every member."""


class CentralPS(GradSync):
    def average(self, flat: np.ndarray) -> np.ndarray:
        total = np.empty_like(flat) if self.comm.Get_rank() == 0 else None
        self.comm.Reduce(flat, total, op=MPI.SUM, root=0)
        if self.comm.Get_rank() == 0:
            assert total is not None
            total /= np.float32(self.size)
            flat = total
        self.comm.Bcast(flat, root=0)
        return flat


class ShardedPS(GradSync):
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
    def average(self, flat: np.ndarray) -> np.ndarray:
        out = np.empty_like(flat)
        self.comm.Allreduce(flat, out, op=MPI.SUM)
        out /= np.float32(self.size)
        return out


DP_MODES: dict[str, type[GradSync]] = {"central_ps": CentralPS, "sharded_ps": ShardedPS, "allreduce": Allreduce}


def make_grad_sync(mode: str, comm: Any) -> GradSync:
    return DP_MODES[mode](comm)
