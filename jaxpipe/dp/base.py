"""What a data-parallel algorithm is to the trainer: one class that sees each step.

The trainer calls, on every rank of a stage's DP group together:

- `sync_gradients(step, grads)` after the pipeline (and the tied-embedding sum), before the
  gradient norm and the optimizer: exact algorithms return the replicas' average here; an
  algorithm that lets replicas drift (DiLoCo) returns the local gradients;
- `after_update(step, params, opt_state, applied)` after the optimizer step (`applied`: whether
  this pipeline's update happened, or was skipped as non-finite): an outer-step algorithm
  synchronises parameters here (every H steps) and may replace the parameters; error feedback
  keeps the residues of an applied step only;
- `setup(params)` once, after set-up and resume, before the first step (what the algorithm keeps is
  shaped like the parameters);
- `state()` / `load_state(...)` around checkpoints: whatever the algorithm keeps across steps
  (error-feedback residues, outer parameters and momentum) as named float32 host arrays, saved
  with the checkpoint and restored on resume, so a resume is exact;
- `wire_bytes()`: the bytes this rank put on DP links during the last step, for the metrics;
- `syncs_every_step`: whether replicas hold equal gradients after `sync_gradients` (then the
  non-finite verdict, taken per pipeline, is the same on every pipeline); `per_replica_params`:
  whether replicas' parameters and optimizer states differ, so that a checkpoint keeps each one.

Gradients and parameters arrive as the rank's chunk trees ({chunk: tree}); algorithms typically
work on one flat float32 buffer per rank (one message, not one per tensor: over slow links the
latency per message matters).
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from jaxpipe.comm.netem import NetworkEmulator
from jaxpipe.config import ParallelConfig

Trees = dict[int, Any]


@dataclass
class DPContext:
    """What an algorithm needs to know about where it runs."""

    comm: Any  # the stage's DP communicator (replica order)
    net: NetworkEmulator | None  # emulated links, or None
    world_rank_of: Callable[[int], int]  # DP rank -> world rank (for the emulated links)
    parallel: ParallelConfig
    place: Callable[[Any], Any]  # puts a host tree back on this rank's device(s), committed
    # The backend that moves the bytes (default: jaxpipe.dp.collectives.make_collectives).
    collectives: Callable[[], Any] | None = None
    stage: int = 0  # this rank's pipeline rank
    n_stages: int = 1
    steps: int = 0  # train.steps: the run's last step
    last_chunk: int = 0  # the chunk holding the LM head (with its copy of the tied `wte`)
    tied: Any = None  # the 2-rank communicator with the other end of the tied embedding, if any
    tied_first: bool = True  # this end holds the embedding (chunk 0)
    tied_peer: int = 0  # the other end's world rank (for the emulated link)

    def build_collectives(self) -> Any:
        if self.collectives is not None:
            return self.collectives()
        from jaxpipe.dp.collectives import make_collectives

        return make_collectives(self.parallel.transport, self.comm, self.net, self.world_rank_of)

    @property
    def size(self) -> int:
        return int(self.comm.Get_size())

    @property
    def rank(self) -> int:
        return int(self.comm.Get_rank())


class DataParallel(ABC):  # noqa: B024 - every hook has a do-nothing default
    name: ClassVar[str] = "?"
    syncs_every_step: ClassVar[bool] = True
    per_replica_params: ClassVar[bool] = False

    def __init__(self, ctx: DPContext):
        self.ctx = ctx
        self._wire_bytes = 0

    def sync_gradients(self, step: int, grads: Trees) -> Trees:
        return grads

    def setup(self, params: Trees) -> None:  # noqa: B027 - optional hook
        """Called once before the first step with the (initial or resumed) parameters."""

    def after_update(self, step: int, params: Trees, opt_state: Any, applied: bool = True) -> tuple[Trees, Any]:
        return params, opt_state

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:  # noqa: B027 - optional hook
        """Restores what `state` returned (from a checkpoint)."""

    def wire_bytes(self) -> int:
        return self._wire_bytes

    def signature(self) -> dict[str, Any]:
        """What `state()` depends on beyond this rank's layers (known before `setup`): a resume whose
        signature differs cannot use the saved state."""
        return {"dp_mode": self.name}

    def describe(self) -> str:
        return self.name

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases what the algorithm holds (communicators, threads)."""
