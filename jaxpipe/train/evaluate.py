"""Validation loss through the training pipeline, forward only.

Each replica's pipeline evaluates its share of `n_batches` validation batches, laid out exactly as
training batches (replica r, micro-batch m of batch b reads the samples a training step b would),
so DP replicas read disjoint samples and together read every sample once. The first and middle
stages run a jitted forward that keeps no residuals (the training forward keeps them for the
backward); the last stage computes the loss. Messages use the transport's ordinary calls with
negative step numbers (`eval_msg_step`), a key space no training step uses, so an evaluation can
never be mistaken for a step's traffic. The result is the mean token loss over all evaluated
samples, the same number one process computes on the same batch.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from mpi4py import MPI

from jaxpipe.comm.message import Kind, MsgKey
from jaxpipe.comm.topology import Topology
from jaxpipe.comm.transport import Transport
from jaxpipe.config import Config
from jaxpipe.data.source import TokenSource, replica_sample_indices
from jaxpipe.model.gpt import Params
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

    def __init__(self, cfg: Config, topo: Topology, program: StageProgram, transport: Transport,
                 source: TokenSource | None, n_batches: int):
        self.cfg, self.topo, self.program, self.transport = cfg, topo, program, transport
        self.source = source if (topo.is_first or topo.is_last) else None
        self.n_batches = n_batches
        module = program.module
        self._forward = jax.jit(lambda params, x: module.apply({"params": params}, x))
        # Tokens and targets go where the stage's training inputs go (split over its devices, if several).
        self._place = getattr(program, "place_input", jax.device_put)

    def local_losses(self, params: Params, step: int) -> list[float]:
        """Runs this stage's part; the last stage returns the loss of each of its micro-batches."""
        cfg, spec, transport = self.cfg, self.program.spec, self.transport
        msg_step = eval_msg_step(step)
        losses: list[Any] = []
        n_micro = cfg.num_microbatches
        for b in range(self.n_batches):
            samples = None
            if self.source is not None:
                idx = replica_sample_indices(cfg, b, self.topo.replica).reshape(-1)
                samples = self.source.samples(idx).reshape(n_micro, cfg.train.micro_batch_size, -1)
            for m in range(n_micro):
                key = MsgKey(msg_step, b * n_micro + m, Kind.ACT)
                if spec.first:
                    x = self._place(np.ascontiguousarray(samples[m, :, :-1]))
                else:
                    x = transport.recv(key, spec.index - 1, self.program.act_spec)
                if spec.last:
                    targets = self._place(np.ascontiguousarray(samples[m, :, 1:]))
                    losses.append(self.program.eval_loss(params, x, targets))
                else:
                    transport.send(key, spec.index + 1, self._forward(params, x))
        with ACTIVITY.waiting("completing the evaluation's sends"):
            transport.flush()
        return [float(v) for v in losses]

    def __call__(self, params: Params, step: int) -> float:
        """Mean validation loss over every replica's samples, on every rank."""
        losses = self.local_losses(params, step)
        with ACTIVITY.waiting("the evaluation's loss allreduce"):
            total = self.topo.world.allreduce(float(np.sum(losses, dtype=np.float64)), op=MPI.SUM)
        return total / (self.cfg.parallel.dp * self.n_batches * self.cfg.num_microbatches)
