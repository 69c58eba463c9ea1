"""Validation loss through the training pipeline, forward only.

Each replica's pipeline evaluates its share of `n_batches` validation batches, laid out exactly as
training batches (replica r, micro-batch m of batch b reads the samples a training step b would),
so DP replicas read disjoint samples and together read every sample once. The evaluation is a
forward-only schedule (`jaxpipe.pipeline.schedule.ForwardOnly`: every chunk where training put
it, its programs keeping no residuals, the last chunk computing the loss) lowered and run by the
same executor as training, over the same transport and activation codec, with negative step
numbers (`eval_msg_step`) — a key space no training step uses, so an evaluation can never be
mistaken for a step's traffic. The result is the mean token loss over all evaluated samples, the
same number one process computes on the same batch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from mpi4py import MPI

from jaxpipe.comm.topology import Topology
from jaxpipe.comm.transport import Transport
from jaxpipe.config import Config
from jaxpipe.data.source import TokenSource, replica_sample_indices
from jaxpipe.model.gpt import Params
from jaxpipe.pipeline.executor import Executor, StepBatch
from jaxpipe.pipeline.schedule import ForwardOnly, Schedule, check
from jaxpipe.pipeline.stage import StageProgram
from jaxpipe.runtime.watchdog import ACTIVITY


def eval_msg_step(step: int) -> int:
    """The message step of the evaluation after training step `step` (1-based): always negative."""
    return -step - 1


def eval_batch_count(cfg: Config, source: TokenSource) -> int:
    """`train.eval_batches`, but no more than it takes to read every validation sample once."""
    n = getattr(source, "n_samples", None)
    if n is None:
        return cfg.train.eval_batches
    return max(1, min(cfg.train.eval_batches, math.ceil(n / cfg.train.global_batch_size)))


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


class Evaluator:
    """Collective over the world communicator: every rank calls `__call__` together."""

    def __init__(self, cfg: Config, topo: Topology, schedule: Schedule, programs: dict[int, StageProgram],
                 transport: Transport, source: TokenSource | None, n_batches: int):
        self.cfg, self.topo, self.programs = cfg, topo, programs
        self.n_batches = n_batches
        last = schedule.n_chunks - 1
        self.source = source if (0 in programs or last in programs) else None
        # All evaluation batches are one forward-only step of n_batches × M micro-batches.
        self.schedule = ForwardOnly.like(schedule, n_batches * cfg.num_microbatches, cfg.num_microbatches)
        lowered = self.schedule.lowered()
        check(lowered)
        self.executor = Executor(lowered, topo.stage, programs, transport, cfg.parallel.recv_lookahead)
        # Tokens and targets go where the chunk's training inputs go (split over its devices, if several).
        self._place = next(iter(programs.values())).place_input

    def _batch(self) -> StepBatch:
        cfg, n_micro = self.cfg, self.cfg.num_microbatches
        cache: dict[int, Any] = {}

        def samples(j: int) -> np.ndarray:
            b, m = divmod(j, n_micro)
            if b not in cache:  # One validation batch at a time, read when its first micro-batch runs.
                cache.clear()
                idx = replica_sample_indices(cfg, b, self.topo.replica).reshape(-1)
                cache[b] = self.source.samples(idx).reshape(n_micro, cfg.train.micro_batch_size, -1)  # type: ignore[union-attr]
            return cache[b][m]

        return StepBatch(lambda j: self._place(np.ascontiguousarray(samples(j)[:, :-1])),
                         lambda j: self._place(np.ascontiguousarray(samples(j)[:, 1:])))

    def local_losses(self, params: dict[int, Params], step: int) -> list[float]:
        """Runs this rank's part; the rank of the last chunk returns the loss of each micro-batch."""
        result = self.executor.run(eval_msg_step(step), params, {}, self._batch())
        return [float(v) for v in result.losses]

    def __call__(self, params: dict[int, Params], step: int) -> float:
        """Mean validation loss over every replica's samples, on every rank."""
        losses = self.local_losses(params, step)
        with ACTIVITY.waiting("the evaluation's loss allreduce"):
            total = self.topo.world.allreduce(float(np.sum(losses, dtype=np.float64)), op=MPI.SUM)
        return total / (self.cfg.parallel.dp * self.n_batches * self.cfg.num_microbatches)
