"""What a data-parallel algorithm is to the trainer: one class that sees each step.

The trainer calls, on every rank of a stage's DP group together:

- `sync_gradients(step, grads)` after the pipeline (and the tied-embedding sum), before the
  gradient norm and the optimizer: exact algorithms return the replicas' average here; an
  algorithm that lets replicas drift (DiLoCo) returns the local gradients;
- `after_update(step, params, opt_state)` after the optimizer step: an outer-step algorithm
  synchronises parameters here (every H steps) and may replace the parameters;
- `state()` / `load_state(...)` around checkpoints: whatever the algorithm keeps across steps
  (error-feedback residues, outer parameters and momentum) as named float32 host arrays, saved
  with the checkpoint and restored on resume, so a resume is exact;
- `wire_bytes()`: the bytes this rank put on DP links during the last step, for the metrics;
- `syncs_every_step`: whether replicas hold equal gradients after `sync_gradients` (the trainer
  relies on it for the world-wide non-finite verdict).

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

    @property
    def size(self) -> int:
        return int(self.comm.Get_size())

    @property
    def rank(self) -> int:
        return int(self.comm.Get_rank())


class DataParallel(ABC):  # noqa: B024 - every hook has a do-nothing default
    name: ClassVar[str] = "?"
    syncs_every_step: ClassVar[bool] = True

    def __init__(self, ctx: DPContext):
        self.ctx = ctx
        self._wire_bytes = 0

    def sync_gradients(self, step: int, grads: Trees) -> Trees:
        return grads

    def after_update(self, step: int, params: Trees, opt_state: Any) -> tuple[Trees, Any]:
        return params, opt_state

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:  # noqa: B027 - optional hook
        """Restores what `state` returned (from a checkpoint)."""

    def wire_bytes(self) -> int:
        return self._wire_bytes

    def describe(self) -> str:
        return self.name
