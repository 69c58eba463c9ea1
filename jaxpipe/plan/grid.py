"""A layout as a grid: `grid[s][r]` is the cluster rank that runs pipeline rank (stage) s of replica r.

The placement file lists the other direction, one (stage, replica) per world rank; both say the same.
"""

from __future__ import annotations

from collections.abc import Sequence

Grid = list[list[int]]


def launch_grid(pp: int, dp: int) -> Grid:
    """jaxpipe's launch order: rank r runs stage r % pp of replica r // pp."""
    return [[r * pp + s for r in range(dp)] for s in range(pp)]


def grid_to_layout(grid: Sequence[Sequence[int]], ranks: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """(stage, replica) for each of `ranks` (default 0..n-1) in that order: world rank k is ranks[k]."""
    where = {h: (s, r) for s, row in enumerate(grid) for r, h in enumerate(row)}
    ranks = list(ranks) if ranks is not None else sorted(where)
    return [where[h] for h in ranks]


def layout_to_grid(layout: Sequence[Sequence[int]], pp: int, dp: int) -> Grid:
    grid = [[-1] * dp for _ in range(pp)]
    for rank, (s, r) in enumerate(layout):
        grid[s][r] = rank
    return grid
