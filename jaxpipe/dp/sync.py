"""Gradient averaging across the D pipeline replicas of one stage (`Topology.dp_comm`), every step.

All modes run after the pipeline flush on one flat float32 buffer per rank (one message, not one
per tensor: over slow links latency per message matters) and return the *average* gradient on
every replica, after which each replica runs the same optimizer step and parameters stay equal.

- `central_ps`: the original's central parameter server: DP rank 0 of the stage receives the sum
  of all replicas' gradients, averages it, and sends it back.
- `sharded_ps`: every replica serves 1/D of the buffer (reduce-scatter + all-gather), the
  original's sharded PS: 2·(D-1)/D·|g| per NIC.
- `allreduce`: an allreduce (over MPI the library picks the algorithm).

`parallel.grad_codec` (bfloat16, int8, int4) sends the buffer quantised, with error feedback; the
patterns, the backends (MPI, emulated links, NCCL on the GPUs) and the arithmetic are in
jaxpipe.dp.exchange, jaxpipe.dp.collectives and jaxpipe.comm.quant.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxpipe.comm.traffic import NONE, Traffic
from jaxpipe.config import ParallelConfig
from jaxpipe.dp.base import DataParallel, DPContext, Trees
from jaxpipe.dp.exchange import AllreducePattern, CentralPattern, Exchange, Pattern, ShardedPattern, padded_rows
from jaxpipe.registry import DP_ALGORITHMS


class GradSync(DataParallel):
    """The exact algorithms: every step, every replica gets the replicas' average gradient."""

    pattern: ClassVar[type[Pattern]]

    @classmethod
    def traffic(cls, p: ParallelConfig, n_elements: int, dp: int, wte_elements: int = 0,
                wte_offset: int = 0) -> Traffic:
        if dp < 2:
            return NONE
        rows = padded_rows(n_elements, dp)
        return Traffic(cls.name + (f" + {p.grad_codec}" if p.grad_codec != "none" else ""),
                       cls.pattern.transfers(rows, p.grad_codec, dp), size=dp)

    def __init__(self, ctx: DPContext):
        super().__init__(ctx)
        self.size = ctx.size
        self.codec = ctx.parallel.grad_codec
        self.coll = ctx.build_collectives() if self.size > 1 else None
        self.exchange: Exchange | None = None
        self._unravel: Any = None
        self._ravel = jax.jit(lambda g: ravel_pytree(g)[0])
        self._saved: dict[str, np.ndarray] | None = None

    def setup(self, params: Trees) -> None:
        if self.coll is None:
            return
        flat, unravel = ravel_pytree(params)
        self._unravel = jax.jit(unravel)
        self.exchange = Exchange(self.pattern(), self.codec, self.coll, int(flat.size))
        if self._saved is not None:
            self.exchange.load_state(self._saved)

    def sync_gradients(self, step: int, grads: Trees) -> Trees:
        if self.coll is None:
            return grads
        if self.exchange is None:
            self.setup(grads)
        assert self.exchange is not None
        before = self.coll.sent
        averaged = self.exchange.run(self._ravel(grads))
        self._wire_bytes = self.coll.sent - before
        return self.ctx.place(self._unravel(averaged))

    def after_update(self, step: int, params: Trees, opt_state: Any, applied: bool = True) -> tuple[Trees, Any]:
        if self.exchange is not None:
            self.exchange.commit(applied)
        return params, opt_state

    def state(self) -> dict[str, np.ndarray]:
        return self.exchange.state() if self.exchange is not None else {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self._saved = state
        if self.exchange is not None:
            self.exchange.load_state(state)

    def signature(self) -> dict[str, Any]:
        # Known before `setup` (a resume checks it first); the buffer's layout follows from the chunks'
        # layers, which the checkpoint adds.
        return {"dp_mode": self.name, "grad_codec": self.codec, "dp": self.size}

    def describe(self) -> str:
        return self.name + (f" + {self.codec} with error feedback" if self.codec != "none" else "") + (
            f" over {self.coll.name}" if self.coll is not None else "")

    def close(self) -> None:
        if self.coll is not None:
            self.coll.close()


@DP_ALGORITHMS.register
class CentralPS(GradSync):
    name = "central_ps"
    pattern = CentralPattern


@DP_ALGORITHMS.register
class ShardedPS(GradSync):
    name = "sharded_ps"
    pattern = ShardedPattern


@DP_ALGORITHMS.register
class Allreduce(GradSync):
    name = "allreduce"
    pattern = AllreducePattern


def algorithm(dp_mode: str) -> type[DataParallel]:
    """The class `parallel.dp_mode` names (its class attributes are known before set-up)."""
    return DP_ALGORITHMS.get(dp_mode)


def make_data_parallel(ctx: DPContext) -> DataParallel:
    """The algorithm `parallel.dp_mode` names."""
    return algorithm(ctx.parallel.dp_mode)(ctx)
