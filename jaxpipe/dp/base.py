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
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from jaxpipe.comm.netem import NetworkEmulator
from jaxpipe.comm.traffic import NONE, Traffic
from jaxpipe.config import Config, ParallelConfig
from jaxpipe.errors import ConfigError

Trees = dict[int, Any]


def make_collectives(transport: str, comm: Any, net: NetworkEmulator | None, world_rank_of: Any) -> Any:
    """The backend for a DP group: NCCL on the GPUs with `parallel.transport=nccl` (then link
    emulation only paces it), else the emulated algorithms when links are emulated, else MPI's."""
    import jax

    from jaxpipe.dp.collectives import Emulated, HostMPI

    if transport == "nccl" and jax.default_backend() == "gpu":
        from jaxpipe.dp.nccl import NcclCollectives

        return NcclCollectives(comm, net, world_rank_of)
    if net is not None:
        return Emulated(comm, net, world_rank_of)
    return HostMPI(comm)


@dataclass
class DPContext:
    """What an algorithm needs to know about where it runs."""

    comm: Any  # the stage's DP communicator (replica order)
    net: NetworkEmulator | None  # emulated links, or None
    world_rank_of: Callable[[int], int]  # DP rank -> world rank (for the emulated links)
    parallel: ParallelConfig
    place: Callable[[Any], Any]  # puts a host tree back on this rank's device(s), committed
    # The backend that moves the bytes (default: make_collectives).
    collectives: Callable[[], Any] | None = None
    stage: int = 0  # this rank's pipeline rank
    n_stages: int = 1
    steps: int = 0  # train.steps: the run's last step
    last_chunk: int = 0  # the chunk holding the LM head (with its copy of the tied `wte`)
    tied: Any = None  # the 2-rank communicator with the other end of the tied embedding, if any
    tied_first: bool = True  # this end holds the embedding (chunk 0)
    tied_peer: int = 0  # the other end's world rank (for the emulated link)
    chunk_layers: dict[int, range] = field(default_factory=dict)  # this rank's chunks' layers (model-wide)

    def build_collectives(self) -> Any:
        if self.collectives is not None:
            return self.collectives()
        return make_collectives(self.parallel.transport, self.comm, self.net, self.world_rank_of)

    @property
    def size(self) -> int:
        return int(self.comm.Get_size())

    @property
    def rank(self) -> int:
        return int(self.comm.Get_rank())


class DataParallel(ABC):  # noqa: B024 - every hook has a do-nothing default
    """A DP algorithm: registered by name in `jaxpipe.registry.DP_ALGORITHMS` (`parallel.dp_mode`); it
    checks its own keys (`validate_config`) and describes its own exchange (`traffic`)."""

    name: ClassVar[str] = "?"
    syncs_every_step: ClassVar[bool] = True
    per_replica_params: ClassVar[bool] = False
    lossy: ClassVar[bool] = False  # replicas drift between exchanges (the loss may differ from exact DP)

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Rules every algorithm shares; a subclass adds its own keys' (with parallel.dp=auto: once resolved)."""
        p = cfg.parallel
        if not isinstance(p.dp, int):
            return
        if p.grad_codec != "none" and p.dp < 2:
            raise ConfigError(f"parallel.grad_codec={p.grad_codec} compresses the data-parallel exchange, and with "
                              f"parallel.dp=1 there is none: set parallel.grad_codec=none or parallel.dp >= 2")
        if p.diloco_stagger and not cls.name.endswith("diloco"):
            raise ConfigError(f"parallel.diloco_stagger staggers DiLoCo's outer steps, but parallel.dp_mode is "
                              f"{p.dp_mode}: set parallel.dp_mode=diloco or parallel.diloco_stagger=false")
        if not p.diloco_outer_lr > 0 or not 0 <= p.diloco_outer_momentum < 1:
            raise ConfigError(f"need parallel.diloco_outer_lr > 0 and 0 <= parallel.diloco_outer_momentum < 1 "
                              f"(got {p.diloco_outer_lr} and {p.diloco_outer_momentum})")

    @classmethod
    def traffic(cls, p: ParallelConfig, n_elements: int, dp: int, wte_elements: int = 0,
                wte_offset: int = 0) -> Traffic:
        """What one rank whose DP buffer holds `n_elements` float32 puts on its DP links (`wte_elements`:
        the tied embedding's share of it on the first stage, where an algorithm sends more for it, starting
        at element `wte_offset` of the buffer)."""
        return NONE

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
