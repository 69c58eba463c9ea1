"""DT-FM's own cost model of a layout, computed from its description (DS3Lab/DT-FM,
scheduler/heuristic_evolutionary_solver/scheduler.py; ../shared/reference/ANCHORS.md):

- data-parallel cost: for every DP group (a stage's replicas) and every member, the sum over the
  other members of 2·(delay + gradient bytes / (bandwidth · group size)); the worst member of the
  worst group;
- pipeline cost: between two neighbouring stages, the slowest pair of a bottleneck matching of their
  members on delay + activation bytes / bandwidth; summed along the stage order, which DT-FM picks
  by an open-loop travelling-salesman tour over the groups;
- total = DP + 2 × pipeline (forward and backward).

For a fixed layout (pipelines decided) the matching and the order are the layout's own, so
`layout_cost` sums each stage boundary's slowest replica. `partition_cost` is DT-FM's evaluation of
a partition into DP groups alone: it finds the best order and matchings itself.

The model counts every message once per iteration (one task's whole activation, no micro-batches),
so it sees latency and the sum of the path's links, not which link paces a pipeline of many
micro-batches, nor compute; jaxpipe's model (`jaxpipe.pipeline.costmodel`) simulates that.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jaxpipe.comm.cluster import Cluster
from jaxpipe.config import Config
from jaxpipe.model.layout import layer_param_count
from jaxpipe.plan.grid import Grid


@dataclass(frozen=True)
class DtfmSizes:
    """What DT-FM's model charges per link: one task's activation and one stage's gradient, bytes."""

    activation_bytes: float
    gradient_bytes: float

    @classmethod
    def of_workload(cls, cfg: Config, pp: int, dp: int) -> DtfmSizes:
        """From a jaxpipe config, as DT-FM's workload describes a task: the replica's share of the
        batch as one fp16 activation message, a stage's layers' fp32 gradients."""
        m = cfg.model
        seqs = cfg.train.global_batch_size // dp
        return cls(seqs * m.seq_len * m.d_model * 2.0, 4.0 * layer_param_count(m) * m.n_layer / pp)


# The sizes DT-FM's published anchors imply (its scheduler's costs on its five scenarios): solved from
# three of them, they reproduce all ten; tools/dtfm_original.py holds the anchors and says how.
ANCHOR_SIZES = DtfmSizes(activation_bytes=0.47125e9, gradient_bytes=0.65e9)


@dataclass(frozen=True)
class DtfmCost:
    total: float
    dp: float
    pipeline: float  # one direction: the total counts it twice


def activation_s(cluster: Cluster, a: int, b: int, sizes: DtfmSizes) -> float:
    return cluster.delay_s(a, b) + sizes.activation_bytes * 8 / cluster.rate_bps(a, b)


def group_dp_cost(cluster: Cluster, group: Sequence[int], sizes: DtfmSizes) -> float:
    n = len(group)
    if n <= 1:
        return 0.0
    g = sizes.gradient_bytes * 8 / n
    return max(sum(2 * (cluster.delay_s(i, j) + g / cluster.rate_bps(i, j)) for j in group if j != i) for i in group)


def dp_cost(cluster: Cluster, groups: Sequence[Sequence[int]], sizes: DtfmSizes) -> float:
    return max(group_dp_cost(cluster, g, sizes) for g in groups)


def layout_cost(cluster: Cluster, grid: Grid, sizes: DtfmSizes) -> DtfmCost:
    """DT-FM's cost of this layout as it runs: its DP groups, its pipelines, its stage order."""
    P, D = len(grid), len(grid[0])
    dp = dp_cost(cluster, grid, sizes)
    pipe = sum(max(activation_s(cluster, grid[s][r], grid[s + 1][r], sizes) for r in range(D)) for s in range(P - 1))
    return DtfmCost(dp + 2 * pipe, dp, pipe)


def bottleneck_matching(cost: np.ndarray) -> tuple[float, list[int]]:
    """The perfect matching of rows to columns whose largest cost is smallest: (that cost, column per
    row). Binary search over the distinct costs, with augmenting paths (Kuhn) at each threshold."""
    n = len(cost)
    c = cost.tolist()
    values = sorted({v for row in c for v in row})

    def match(limit: float) -> list[int] | None:
        owner = [-1] * n  # column -> row

        def augment(row: int, seen: list[bool]) -> bool:
            for col in range(n):
                if c[row][col] <= limit and not seen[col]:
                    seen[col] = True
                    if owner[col] < 0 or augment(owner[col], seen):
                        owner[col] = row
                        return True
            return False

        for row in range(n):
            if not augment(row, [False] * n):
                return None
        cols = [0] * n
        for col, row in enumerate(owner):
            cols[row] = col
        return cols

    lo, hi = 0, len(values) - 1
    best = match(values[hi])
    assert best is not None
    while lo < hi:
        mid = (lo + hi) // 2
        m = match(values[mid])
        if m is not None:
            best, hi = m, mid
        else:
            lo = mid + 1
    return float(values[lo]), best


def open_path(dist: np.ndarray) -> tuple[float, list[int]]:
    """The cheapest path visiting every node once (open loop, any start): Held-Karp up to 10 nodes,
    greedy + 2-opt beyond."""
    n = len(dist)
    if n == 1:
        return 0.0, [0]
    if n <= 10:
        full = 1 << n
        best = np.full((full, n), np.inf)
        parent = np.full((full, n), -1, dtype=np.int64)
        for i in range(n):
            best[1 << i, i] = 0.0
        for mask in range(1, full):
            row = best[mask]
            for last in range(n):
                c = row[last]
                if not np.isfinite(c):
                    continue
                for nxt in range(n):
                    if mask & (1 << nxt):
                        continue
                    m2 = mask | (1 << nxt)
                    v = c + dist[last, nxt]
                    if v < best[m2, nxt]:
                        best[m2, nxt] = v
                        parent[m2, nxt] = last
        last = int(np.argmin(best[full - 1]))
        total = float(best[full - 1, last])
        path, mask = [], full - 1
        while last >= 0:
            path.append(last)
            prev = int(parent[mask, last])
            mask &= ~(1 << last)
            last = prev
        return total, path[::-1]
    path = min((_greedy_path(dist, s) for s in range(n)), key=lambda p: _path_len(dist, p))
    improved = True
    while improved:
        improved = False
        for i, j in itertools.combinations(range(n), 2):
            cand = path[:i] + path[i:j + 1][::-1] + path[j + 1:]
            if _path_len(dist, cand) < _path_len(dist, path) - 1e-12:
                path, improved = cand, True
    return _path_len(dist, path), path


def _greedy_path(dist: np.ndarray, start: int) -> list[int]:
    path, left = [start], set(range(len(dist))) - {start}
    while left:
        nxt = min(left, key=lambda j: dist[path[-1], j])
        path.append(nxt)
        left.remove(nxt)
    return path


def _path_len(dist: np.ndarray, path: Sequence[int]) -> float:
    return float(sum(dist[a, b] for a, b in itertools.pairwise(path)))


def partition_cost(cluster: Cluster, groups: Sequence[Sequence[int]], sizes: DtfmSizes) -> tuple[DtfmCost, Grid]:
    """DT-FM's evaluation of a partition into DP groups: bottleneck matchings between every two
    groups, the open-loop tour over the groups for the stage order; returns the cost and the layout
    it implies (stage s = the tour's s-th group, replica r = the matched chain through the groups)."""
    P = len(groups)
    between = np.zeros((P, P))
    matches: dict[tuple[int, int], list[int]] = {}
    for a, b in itertools.permutations(range(P), 2):
        cost = np.array([[activation_s(cluster, i, j, sizes) for j in groups[b]] for i in groups[a]])
        between[a, b], matches[(a, b)] = bottleneck_matching(cost)
    sym = np.maximum(between, between.T)
    pipe, order = open_path(sym)
    pipe = float(sum(between[a, b] for a, b in itertools.pairwise(order)))
    D = len(groups[0])
    grid: Grid = [list(groups[order[0]])]
    for a, b in itertools.pairwise(order):
        prev = grid[-1]
        col = matches[(a, b)]
        pos = {h: i for i, h in enumerate(groups[a])}
        grid.append([groups[b][col[pos[h]]] for h in prev])
    assert all(len(row) == D for row in grid)
    dp = dp_cost(cluster, groups, sizes)
    return DtfmCost(dp + 2 * pipe, dp, pipe), grid
