"""Rank layout: world = PP × DP, pipeline rank = rank % PP, DP rank = rank // PP (the original's layout).

Pipelines are contiguous blocks of ranks, so with one process per GPU and hosts filled in rank
order, neighbouring stages share a host whenever they can. Sub-communicators:
- `pipe`: the P stages of this rank's pipeline (point-to-point activations and gradients),
- `dp`: the D replicas of this rank's stage (gradient averaging),
- `tied`: first and last stage of this pipeline, which both hold the tied token embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mpi4py import MPI

from jaxpipe.errors import ConfigError


@dataclass
class Topology:
    world: Any
    pp: int
    dp: int
    pipe: Any
    dp_comm: Any
    tied: Any | None

    @property
    def rank(self) -> int:
        return self.world.Get_rank()

    @property
    def stage(self) -> int:
        return self.rank % self.pp

    @property
    def replica(self) -> int:
        return self.rank // self.pp

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.pp - 1

    def world_rank_of(self, stage: int, replica: int | None = None) -> int:
        return (self.replica if replica is None else replica) * self.pp + stage

    @classmethod
    def create(cls, world: Any, pp: int, dp: int) -> Topology:
        """Collective over `world`; every rank checks the size first, so a wrong `-n` fails everywhere."""
        size = world.Get_size()
        if size != pp * dp:
            raise ConfigError(
                f"mpiexec started {size} ranks but parallel.pp × parallel.dp = {pp} × {dp} = {pp * dp}: "
                f"launch with -n {pp * dp} or change parallel.pp/parallel.dp"
            )
        rank = world.Get_rank()
        stage, replica = rank % pp, rank // pp
        pipe = world.Split(color=replica, key=stage)
        dp_comm = world.Split(color=stage, key=replica)
        in_tied = pp > 1 and stage in (0, pp - 1)
        tied = world.Split(color=replica if in_tied else MPI.UNDEFINED, key=stage)
        if tied == MPI.COMM_NULL:
            tied = None
        return cls(world=world, pp=pp, dp=dp, pipe=pipe, dp_comm=dp_comm, tied=tied)

    def free(self) -> None:
        for comm in (self.pipe, self.dp_comm, self.tied):
            if comm is not None:
                comm.Free()
