"""The cluster file: what the network between the ranks of a job looks like, and how fast each host is.

One YAML file per cluster (`jaxpipe probe-network` writes it; `jaxpipe plan --cluster` and
`network.matrix` read it). Ranks are world ranks; matrices are directional, row = sender, column =
receiver, because measured links are not symmetric (a host's uplink is often slower than its
downlink, and routes differ per direction). The diagonal is ignored.

    ranks: 4
    hosts: [a, a, b, b]            # optional: host name per rank (default rank0, rank1, ...)
    regions: [eu, eu, us, us]      # optional: a label per rank, for printing layouts
    delay_ms:                      # one-way delay, milliseconds, >= 0
      - [0, 1, 50, 50]
      - ...
    bandwidth_gbit:                # Gbit/s, > 0 off the diagonal
      - [0, 10, 0.5, 0.5]
      - ...
    speed: [1, 1, 2, 2]            # optional: relative compute speed per rank (1 = nominal)
    memory_gb: [80, 80, 80, 80]    # optional: device memory per rank
    source: probe-network ...      # optional: where the numbers come from

It lives in `comm` because link emulation (`network.matrix`) reads it; planning builds on it
(`jaxpipe.plan.cluster`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jaxpipe.config import read_yaml
from jaxpipe.errors import ConfigError

Matrix = tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class Cluster:
    hosts: tuple[str, ...]
    delay_ms: Matrix
    bandwidth_gbit: Matrix
    speed: tuple[float, ...] | None = None
    memory_gb: tuple[float, ...] | None = None
    regions: tuple[str, ...] | None = None
    source: str = ""

    @property
    def n(self) -> int:
        return len(self.hosts)

    def delay_s(self, src: int, dst: int) -> float:
        return self.delay_ms[src][dst] / 1e3

    def rate_bps(self, src: int, dst: int) -> float:
        return self.bandwidth_gbit[src][dst] * 1e9

    def speed_of(self, rank: int) -> float:
        return self.speed[rank] if self.speed is not None else 1.0

    def label(self, rank: int) -> str:
        return self.regions[rank] if self.regions is not None else self.hosts[rank]

    def permuted(self, order: Sequence[int]) -> Cluster:
        """The same machines with rank k being this cluster's rank `order[k]` (a subset when `order`
        is shorter): what a launcher that hands out ranks in another order, or the survivors of a
        failure, look like."""
        order = list(order)
        if len(set(order)) != len(order) or not all(0 <= r < self.n for r in order):
            raise ConfigError(f"a rank order must list distinct ranks of 0..{self.n - 1}, got {order}")

        def pick(v: Sequence[Any] | None) -> tuple[Any, ...] | None:
            return None if v is None else tuple(v[r] for r in order)

        return Cluster(tuple(self.hosts[r] for r in order),
                       tuple(tuple(self.delay_ms[a][b] for b in order) for a in order),
                       tuple(tuple(self.bandwidth_gbit[a][b] for b in order) for a in order),
                       pick(self.speed), pick(self.memory_gb), pick(self.regions), self.source)

    def shuffled(self, seed: int) -> Cluster:
        """Ranks in a random order (fixed by `seed`: rank k is this cluster's rank
        `numpy.random.default_rng(seed).permutation(n)[k]`): a cluster as a real launcher hands it out."""
        return self.permuted([int(r) for r in np.random.default_rng(seed).permutation(self.n)])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ranks": self.n, "hosts": list(self.hosts)}
        if self.regions is not None:
            out["regions"] = list(self.regions)
        out["delay_ms"] = [[_num(v) for v in row] for row in self.delay_ms]
        out["bandwidth_gbit"] = [[_num(v) for v in row] for row in self.bandwidth_gbit]
        if self.speed is not None:
            out["speed"] = [_num(v) for v in self.speed]
        if self.memory_gb is not None:
            out["memory_gb"] = [_num(v) for v in self.memory_gb]
        if self.source:
            out["source"] = self.source
        return out

    def save(self, path: str | Path) -> None:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100000)
        Path(path).write_text("# jaxpipe cluster file: row = sending rank, column = receiving rank\n" + text)


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else round(float(v), 6)


KEYS = ("ranks", "hosts", "regions", "delay_ms", "bandwidth_gbit", "speed", "memory_gb", "source")


def cluster_from_dict(tree: Any, where: str = "the cluster file") -> Cluster:
    """Checks every entry; each message says which entry is wrong and what it must be."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping with ranks, delay_ms and bandwidth_gbit")
    unknown = sorted(set(tree) - set(KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(KEYS)})")
    for key in ("delay_ms", "bandwidth_gbit"):
        if key not in tree:
            raise ConfigError(f"{where}: '{key}' is missing: give an N x N matrix (row = sender, column = receiver)")
    n = tree.get("ranks", len(tree["delay_ms"]) if isinstance(tree["delay_ms"], list) else None)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"{where}: 'ranks' must be a positive integer, got {n!r}")

    def vector(key: str, kind: type, positive: bool = False) -> tuple[Any, ...] | None:
        v = tree.get(key)
        if v is None:
            return None
        if not isinstance(v, list) or len(v) != n:
            raise ConfigError(f"{where}: '{key}' must list one entry per rank ({n}), got "
                              f"{len(v) if isinstance(v, list) else repr(v)}")
        out: list[Any] = []
        for i, x in enumerate(v):
            if kind is str:
                out.append(str(x))
                continue
            if not _is_number(x) or (positive and not x > 0):
                raise ConfigError(f"{where}: {key}[{i}] = {x!r}: must be a number{' > 0' if positive else ''}")
            out.append(float(x))
        return tuple(out)

    def matrix(key: str, check: Any, what: str) -> Matrix:
        rows = tree[key]
        if not isinstance(rows, list) or len(rows) != n:
            got = f"{len(rows)} rows" if isinstance(rows, list) else repr(rows)
            raise ConfigError(f"{where}: '{key}' has {got}, but the cluster has {n} ranks: give an {n} x {n} "
                              f"matrix (row = sender, column = receiver)")
        out = []
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != n:
                got = f"{len(row)} entries" if isinstance(row, list) else repr(row)
                raise ConfigError(f"{where}: {key}[{i}] has {got}, need {n} (one per receiving rank)")
            vals = []
            for j, x in enumerate(row):
                if i == j:
                    vals.append(float(x) if _is_number(x) else 0.0)
                    continue
                if x is None:
                    raise ConfigError(f"{where}: {key}[{i}][{j}] is missing: every ordered pair of ranks needs "
                                      f"{what} (rank {i} -> rank {j})")
                if not _is_number(x) or not check(float(x)):
                    raise ConfigError(f"{where}: {key}[{i}][{j}] = {x!r} (rank {i} -> rank {j}): {what} must be "
                                      f"{'> 0 Gbit/s' if key == 'bandwidth_gbit' else '>= 0 ms'}")
                vals.append(float(x))
            out.append(tuple(vals))
        return tuple(out)

    hosts = vector("hosts", str) or tuple(f"rank{i}" for i in range(n))
    delay = matrix("delay_ms", lambda x: x >= 0 and math.isfinite(x), "a delay")
    bandwidth = matrix("bandwidth_gbit", lambda x: x > 0 and math.isfinite(x), "a bandwidth")
    source = tree.get("source", "")
    return Cluster(hosts, delay, bandwidth, vector("speed", float, positive=True),
                   vector("memory_gb", float, positive=True), vector("regions", str), str(source or ""))


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def load_cluster(path: str | Path, where: str | None = None) -> Cluster:
    where = where or f"cluster file {path}"
    tree = read_yaml(path, where)
    return cluster_from_dict(tree, where)


def uniform_cluster(n: int, delay_ms: float, bandwidth_gbit: float, hosts: Sequence[str] | None = None) -> Cluster:
    row = lambda i, v: tuple(0.0 if i == j else v for j in range(n))  # noqa: E731
    return Cluster(tuple(hosts or [f"rank{i}" for i in range(n)]), tuple(row(i, delay_ms) for i in range(n)),
                   tuple(row(i, bandwidth_gbit) for i in range(n)))


def region_cluster(regions: Sequence[str], inside: tuple[float, float],
                   between: dict[tuple[str, str], tuple[float, float]] | tuple[float, float],
                   hosts: Sequence[str] | None = None, source: str = "") -> Cluster:
    """Ranks labelled by region; `inside` is (delay_ms, Gbit/s) within a region, `between` the same
    for every pair of regions (symmetric, either order), or one value for all of them."""
    n = len(regions)

    def link(a: str, b: str) -> tuple[float, float]:
        if a == b:
            return inside
        if isinstance(between, tuple):
            return between
        if (a, b) in between:
            return between[(a, b)]
        if (b, a) in between:
            return between[(b, a)]
        raise ConfigError(f"no link given between regions {a} and {b}")

    links = [[link(regions[i], regions[j]) for j in range(n)] for i in range(n)]
    delay = tuple(tuple(0.0 if i == j else links[i][j][0] for j in range(n)) for i in range(n))
    bw = tuple(tuple(0.0 if i == j else links[i][j][1] for j in range(n)) for i in range(n))
    hosts = tuple(hosts) if hosts is not None else tuple(f"{r.lower()}-{i}" for i, r in enumerate(regions))
    return Cluster(hosts, delay, bw, regions=tuple(regions), source=source)
