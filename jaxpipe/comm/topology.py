"""Rank layout: which pipeline rank (stage) and data-parallel replica each MPI rank runs.

By default world rank r runs stage r % PP of replica r // PP (the original's layout): pipelines
are contiguous blocks of ranks, so with one process per GPU and hosts filled in rank order,
neighbouring stages share a host whenever they can. A `layout` (one (stage, replica) per world
rank, from `parallel.placement`: `read_placement`) puts them anywhere else; everything that talks
to another rank asks `world_rank_of`, so the transports, the tied pair, the DP groups and the
emulated links follow it. Sub-communicators:
- `pipe`: the P pipeline ranks of this rank's replica, ordered by stage (activations and gradients),
- `dp_comm`: the D replicas of this rank's stage, ordered by replica (gradient averaging),
- `tied`: the two pipeline ranks of this replica that hold the tied token embedding (the first and
  the last chunk), when they are different ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mpi4py import MPI

from jaxpipe.config import read_yaml
from jaxpipe.errors import ConfigError


@dataclass
class Topology:
    world: Any
    pp: int
    dp: int
    pipe: Any
    dp_comm: Any
    tied: Any | None
    layout: tuple[tuple[int, int], ...]  # world rank -> (stage, replica)
    tied_stages: tuple[int, int] = (0, 0)  # pipeline ranks of the first and the last chunk

    @property
    def rank(self) -> int:
        return self.world.Get_rank()

    @property
    def stage(self) -> int:
        return self.layout[self.rank][0]

    @property
    def replica(self) -> int:
        return self.layout[self.rank][1]

    def world_rank_of(self, stage: int, replica: int | None = None) -> int:
        return self._inverse[(stage, self.replica if replica is None else replica)]

    def __post_init__(self) -> None:
        self._inverse = {sr: r for r, sr in enumerate(self.layout)}

    @staticmethod
    def launch_order(pp: int, dp: int) -> list[tuple[int, int]]:
        return [(r % pp, r // pp) for r in range(pp * dp)]

    @classmethod
    def create(cls, world: Any, pp: int, dp: int, tied_stages: tuple[int, int] | None = None,
               layout: Sequence[Sequence[int]] | None = None) -> Topology:
        """Collective over `world`; every rank checks the size first, so a wrong `-n` fails everywhere.
        `tied_stages`: the pipeline ranks holding the first and the last chunk (default 0 and PP-1)."""
        size = world.Get_size()
        if size != pp * dp:
            raise ConfigError(
                f"mpiexec started {size} ranks but parallel.pp × parallel.dp = {pp} × {dp} = {pp * dp}: "
                f"launch with -n {pp * dp} or change parallel.pp/parallel.dp"
            )
        lay = tuple((int(s), int(r)) for s, r in layout) if layout is not None else tuple(cls.launch_order(pp, dp))
        check_layout(lay, pp, dp)
        rank = world.Get_rank()
        stage, replica = lay[rank]
        pipe = world.Split(color=replica, key=stage)
        dp_comm = world.Split(color=stage, key=replica)
        ends = tied_stages if tied_stages is not None else (0, pp - 1)
        in_tied = ends[0] != ends[1] and stage in ends
        tied = world.Split(color=replica if in_tied else MPI.UNDEFINED, key=0 if stage == ends[0] else 1)
        if tied == MPI.COMM_NULL:
            tied = None
        return cls(world=world, pp=pp, dp=dp, pipe=pipe, dp_comm=dp_comm, tied=tied, layout=lay, tied_stages=ends)

    def free(self) -> None:
        for comm in (self.pipe, self.dp_comm, self.tied):
            if comm is not None:
                comm.Free()


def check_layout(layout: Sequence[tuple[int, int]], pp: int, dp: int) -> None:
    """Every (stage, replica) exactly once, in range; the message says which is missing or repeated."""
    if len(layout) != pp * dp:
        raise ConfigError(f"the placement lists {len(layout)} ranks, but parallel.pp × parallel.dp = {pp * dp}")
    seen: dict[tuple[int, int], int] = {}
    for r, (s, d) in enumerate(layout):
        if not (0 <= s < pp and 0 <= d < dp):
            raise ConfigError(f"the placement puts rank {r} at stage {s}, replica {d}: stages are 0..{pp - 1}, "
                              f"replicas 0..{dp - 1}")
        if (s, d) in seen:
            raise ConfigError(f"the placement gives stage {s}, replica {d} to ranks {seen[(s, d)]} and {r}: "
                              f"each (stage, replica) needs exactly one rank")
        seen[(s, d)] = r


# ---- Placement files (`parallel.placement`; written by `jaxpipe plan --placement-out`) ---------------

PLACEMENT_KEYS = ("pp", "dp", "layout", "hosts", "settings", "predicted_s", "launch_order_s", "source")


def read_placement(path: str | Path, pp: int, dp: int) -> tuple[tuple[int, int], ...]:
    """The (stage, replica) of every world rank, checked against the configured PP × DP."""
    where = f"parallel.placement {path}"
    tree = read_yaml(path, where)
    if not isinstance(tree, dict) or "layout" not in tree:
        raise ConfigError(f"{where}: expected a mapping with 'layout': one [stage, replica] per world rank")
    unknown = sorted(set(tree) - set(PLACEMENT_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(PLACEMENT_KEYS)})")
    if (tree.get("pp", pp), tree.get("dp", dp)) != (pp, dp):
        raise ConfigError(f"{where} is for PP {tree.get('pp')} x DP {tree.get('dp')}, but parallel.pp x parallel.dp "
                          f"= {pp} x {dp}: set them to the placement's, or plan again for this shape")
    rows = tree["layout"]
    if not isinstance(rows, list):
        raise ConfigError(f"{where}: 'layout' must be a list of [stage, replica], one per world rank")
    layout = []
    for r, row in enumerate(rows):
        if (not isinstance(row, list | tuple) or len(row) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in row)):
            raise ConfigError(f"{where}: layout[{r}] = {row!r}: expected [stage, replica] (two integers)")
        layout.append((int(row[0]), int(row[1])))
    try:
        check_layout(layout, pp, dp)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return tuple(layout)


def write_placement(path: str | Path, layout: Sequence[Sequence[int]], pp: int, dp: int,
                    hosts: Sequence[str] | None = None, **info: Any) -> None:
    """A placement file that `read_placement` accepts; `info` (settings, predictions) is kept for
    the reader and ignored by training."""
    check_layout([(int(s), int(r)) for s, r in layout], pp, dp)
    tree: dict[str, Any] = {"pp": pp, "dp": dp, "layout": [[int(s), int(r)] for s, r in layout]}
    if hosts is not None:
        tree["hosts"] = list(hosts)
    tree.update({k: v for k, v in info.items() if k in PLACEMENT_KEYS})
    header = "# jaxpipe placement: world rank -> [stage, replica] (run with parallel.placement=THIS_FILE)\n"
    Path(path).write_text(header + yaml.safe_dump(tree, sort_keys=False, default_flow_style=None, width=100000))
