"""Which rank runs which (stage, replica), and with which settings: jaxpipe's placement search.

The search has two levels, because the two things it must do differ by four orders of magnitude
in cost:

1. **Layouts, by a bound** (`BoundObjective`): for each PP × DP shape and micro-batch size, simulated
   annealing over swaps of two cells of the layout grid, scored by a closed-form estimate of the
   iteration that follows jaxpipe's cost model term by term: each replica's pipeline from its own
   hosts' speeds and links (fill and drain plus M-1 times the slowest computation or link, for GPipe's
   two phases and for 1F1B's overlapped one), the tied pair's exchange, each stage's DP average over
   its members' links (the central PS's pipelined chain and the ring, in closed form), and the
   gradient-norm allreduce. A swap changes two replicas and two stages, so a move costs O(P + D)
   and the search scores ~10^4-10^5 layouts a second. It starts from the launch order, from
   "pipelines inside well-connected sets" and from "DP groups inside well-connected sets" (balanced
   clustering, then DT-FM's ordering of the groups: bottleneck matchings and an open-loop tour), and
   from random layouts, and keeps the best few distinct layouts.
2. **Settings, by simulation** (`jaxpipe.pipeline.costmodel.predict_layout`): every kept layout (and
   the launch order) is simulated event by event, every replica on its own links, for every schedule,
   DP mode and tied-gradient dtype; the best prediction wins.

Why not DT-FM's genetic algorithm: its fitness is a sum along the pipeline of each stage boundary's
slowest link (one message per task), which ranks layouts by their worst *sum*; jaxpipe pipelines
many micro-batches, where the slowest link and the DP ring decide, and one evaluation of DT-FM's
fitness (28 bottleneck matchings and a tour over subsets) costs as much as thousands of swap moves
here. Annealing on incremental scores is the standard tool for this kind of assignment problem and,
run on DT-FM's own objective (`DtfmObjective`, `--objective dtfm`), beats DT-FM's GA at it
(BENCHMARKS.md).

`plan_layout(cluster, cfg, ranks=...)` is the entry point for other code (elastic restarts re-plan
the survivors of a failure with it).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from jaxpipe.comm import quant
from jaxpipe.comm.cluster import Cluster
from jaxpipe.comm.codec import wire_nbytes
from jaxpipe.comm.message import Kind
from jaxpipe.comm.netem import transfer_chunks
from jaxpipe.comm.traffic import tied_traffic
from jaxpipe.config import Config
from jaxpipe.errors import ConfigError
from jaxpipe.model.layout import stage_param_counts
from jaxpipe.pipeline.costmodel import (
    LayoutPrediction,
    Link,
    StageTime,
    act_spec,
    compute_dtype_name,
    predict_layout,
)
from jaxpipe.pipeline.partition import Partition, StageCosts, balanced, resolve_partition, stage_cost
from jaxpipe.pipeline.schedule import Lowered, make_schedule
from jaxpipe.plan import dtfm
from jaxpipe.plan.grid import Grid, grid_to_layout, launch_grid
from jaxpipe.plan.quality import QualityTable, Row

# ---- What may be searched ---------------------------------------------------------------------------

SEARCHABLE = ("shape", "micro_batch", "schedule", "dp_mode", "grad_codec", "act_codec", "tied_dtype", "placement")


@dataclass(frozen=True)
class ScheduleChoice:
    name: str
    extra_warmup: int = 0
    virtual_stages: int = 1

    def describe(self) -> str:
        s = self.name + (f" +{self.extra_warmup} warm-up" if self.extra_warmup else "")
        return s + (f" x{self.virtual_stages} chunks" if self.virtual_stages > 1 else "")


ALL_SCHEDULES = (ScheduleChoice("gpipe"), ScheduleChoice("1f1b"), ScheduleChoice("1f1b", 2), ScheduleChoice("1f1b", 4),
                 ScheduleChoice("zb_h1"), ScheduleChoice("interleaved_1f1b", 0, 2))


@dataclass(frozen=True)
class AlgoChoice:
    """The DP algorithm and the codecs: what may cost loss. `rows`: the quality-table rows relied on."""

    dp_mode: str = "central_ps"
    grad_codec: str = "none"
    act_codec: str = "none"
    inner_steps: int = 0  # DiLoCo's H
    outer_lr: float = 0.0
    outer_momentum: float = 0.0
    exchange: str = "central_ps"  # DiLoCo's exchange pattern
    rows: tuple[Row, ...] = ()
    act_grad_codec: str | None = None  # None: act_codec's (a user-set one is kept)
    fragments: int = 1  # Streaming DiLoCo's F and tau
    overlap_steps: int = 0

    @property
    def diloco(self) -> bool:
        return self.dp_mode in ("diloco", "streaming_diloco")

    @property
    def every(self) -> int:
        """Steps per exchange of one rank (Streaming DiLoCo: one fragment each H / F steps)."""
        return max(1, self.inner_steps // max(1, self.fragments)) if self.diloco else 1

    @property
    def dp_fraction(self) -> float:
        """The share of the rank's parameters one exchange moves."""
        return 1.0 / max(1, self.fragments)

    @property
    def loss_pct(self) -> float:
        """What the budget is charged: the rows' increases, a measured decrease counting as none."""
        return sum(max(0.0, r.loss_pct) for r in self.rows)

    @property
    def pattern(self) -> str:
        """The exchange pattern the layout model times (allreduce runs as the sharded PS's ring)."""
        mode = self.exchange if self.diloco else self.dp_mode
        return "central_ps" if mode == "central_ps" else "sharded_ps"

    def overrides(self) -> list[str]:
        out = [f"parallel.dp_mode={self.dp_mode}", f"parallel.grad_codec={self.grad_codec}",
               f"parallel.act_codec={self.act_codec}",
               f"parallel.act_grad_codec={self.act_grad_codec or self.act_codec}"]
        if self.diloco:
            out += [f"parallel.diloco_inner_steps={self.inner_steps}", f"parallel.diloco_outer_lr={self.outer_lr:g}",
                    f"parallel.diloco_outer_momentum={self.outer_momentum:g}",
                    f"parallel.diloco_exchange={self.exchange}"]
        if self.dp_mode == "streaming_diloco":
            out += [f"parallel.diloco_fragments={self.fragments}",
                    f"parallel.diloco_overlap_steps={self.overlap_steps}"]
        return out

    def describe(self) -> str:
        s = self.dp_mode + (f" H={self.inner_steps} (outer lr {self.outer_lr:g}, momentum {self.outer_momentum:g})"
                            if self.diloco else "")
        s += f" + {self.grad_codec}" if self.grad_codec != "none" else ""
        return s + (f" | act codec {self.act_codec}" if self.act_codec != "none" else "")


@dataclass
class Settings:
    """Everything besides the layout that decides an iteration (what `--set` would change)."""

    pp: int
    dp: int
    micro_batch: int
    schedule: ScheduleChoice
    algo: AlgoChoice
    tied_dtype: str
    partition: tuple[int, ...]

    @property
    def dp_mode(self) -> str:
        return self.algo.dp_mode

    def overrides(self) -> list[str]:
        s = self.schedule
        return [f"parallel.pp={self.pp}", f"parallel.dp={self.dp}", f"train.micro_batch_size={self.micro_batch}",
                f"parallel.schedule={s.name}", f"parallel.extra_warmup={s.extra_warmup}",
                f"parallel.virtual_stages={s.virtual_stages}", *self.algo.overrides(),
                f"parallel.tied_grad_dtype={self.tied_dtype}",
                f"parallel.partition=[{','.join(map(str, self.partition))}]"]

    def describe(self) -> str:
        return (f"PP {self.pp} x DP {self.dp} | {self.schedule.describe()} | micro-batch {self.micro_batch} | "
                f"dp {self.algo.describe()} | tied gradient {self.tied_dtype} | "
                f"layers per chunk {list(self.partition)}")


@dataclass
class Candidate:
    settings: Settings
    grid: Grid
    prediction: LayoutPrediction

    @property
    def iteration_s(self) -> float:
        return self.prediction.iteration_s


@dataclass
class PlanResult:
    """The chosen layout and settings, next to the launch order (same settings, and the config's own)."""

    cluster: Cluster  # the planned job's ranks: rank k here is rank ranks[k] of the cluster planned for
    ranks: list[int]
    best: Candidate  # grids hold the planned job's world ranks
    launch: Candidate  # launch order, its best settings in the chosen shape
    launch_config: Candidate | None  # launch order with the config's own settings (None if they do not fit)
    launch_same: Candidate | None = None  # launch order with exactly the chosen settings
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def layout(self) -> list[tuple[int, int]]:
        """(stage, replica) per world rank of the planned job."""
        return grid_to_layout(self.best.grid)

    def dtfm_cost(self, grid: Grid, sizes: dtfm.DtfmSizes) -> dtfm.DtfmCost:
        return dtfm.layout_cost(self.cluster, grid, sizes)

    def to_json(self, sizes: dtfm.DtfmSizes | None = None) -> dict[str, Any]:
        def cand(c: Candidate | None) -> dict[str, Any] | None:
            if c is None:
                return None
            out = {"predicted_s": c.iteration_s, "bound": c.prediction.bound,
                   "explanation": c.prediction.explanation, "settings": c.settings.overrides(),
                   "pipeline_s": c.prediction.pipeline_s, "sync_s": c.prediction.sync_s}
            if sizes is not None and c.settings.pp * c.settings.dp == len(self.ranks):
                out["dtfm_cost_s"] = self.dtfm_cost(c.grid, sizes).total
            return out

        return {"predicted_s": self.best.iteration_s, "bound": self.best.prediction.bound,
                "launch_order_s": self.launch.iteration_s, "launch_order_bound": self.launch.prediction.bound,
                "launch_order_config_s": self.launch_config.iteration_s if self.launch_config else None,
                "launch_order_same_settings_s": self.launch_same.iteration_s if self.launch_same else None,
                "pp": self.best.settings.pp, "dp": self.best.settings.dp,
                "placement": [list(x) for x in self.layout], "settings": self.best.settings.overrides(),
                "chosen": cand(self.best), "launch_order": cand(self.launch),
                "launch_order_config": cand(self.launch_config), "search": self.stats}


# ---- The workload of one shape and micro-batch -----------------------------------------------------


def _elt(dtype: str) -> float:
    return 2.0 if dtype in ("bfloat16", "float16") else 4.0


@dataclass(eq=False)
class Workload:
    """Sizes and times of one PP × DP shape at one micro-batch size (per chunk; per pipeline rank for
    gradients), with the partition following the DP groups' slowest hosts."""

    cfg: Config
    pp: int
    dp: int
    micro_batch: int
    virtual_stages: int
    platform: str
    size_scale: float
    stage_times: tuple[StageTime, ...] | None = None  # measured, for the config's partition (nominal speed)

    def __post_init__(self) -> None:
        m = self.cfg.model
        self.M = self.cfg.train.global_batch_size // self.dp // self.micro_batch
        self.n_chunks = self.pp * self.virtual_stages
        self.msg_bytes = self.micro_batch * m.seq_len * m.d_model * _elt(compute_dtype_name(self.cfg, self.platform)) \
            * self.size_scale
        self.costs = StageCosts.estimate(m, self.micro_batch)

    def rank_of(self, chunk: int) -> int:
        return chunk % self.pp

    def act_factor(self, codec: str) -> float:
        """Wire bytes of a pipeline message with `codec` over those of the compute dtype."""
        if codec == "none":
            return 1.0
        spec = act_spec(self.cfg, self.platform)
        return wire_nbytes(codec, Kind.ACT, spec) / spec.nbytes

    @cache  # noqa: B019 - one Workload per (shape, micro-batch) lives for one plan
    def partition(self, weights: tuple[float, ...]) -> Partition:
        """Per-rank `weights` (speed of the slowest host of each stage's DP group)."""
        spec = self.cfg.parallel.partition
        per_chunk = [weights[self.rank_of(c)] for c in range(self.n_chunks)]
        if self.stage_times is not None:  # measured for the config's own partition
            w = self.cfg.parallel.stage_weights
            return resolve_partition(spec, self.cfg.model, self.n_chunks, self.micro_batch,
                                     [w[self.rank_of(c)] for c in range(self.n_chunks)] if w else None)
        if isinstance(spec, str) and spec == "balanced":
            return balanced(self.cfg.model.n_layer, self.n_chunks, self.costs, per_chunk)
        try:
            return resolve_partition(spec, self.cfg.model, self.n_chunks, self.micro_batch)
        except ConfigError:  # a fixed partition made for another shape: balance this one
            return balanced(self.cfg.model.n_layer, self.n_chunks, self.costs, per_chunk)

    @cache  # noqa: B019
    def base_times(self, weights: tuple[float, ...]) -> tuple[StageTime, ...]:
        """Per chunk at nominal speed (1.0)."""
        if self.stage_times is not None:
            return self.stage_times
        part = self.partition(weights)
        flops, bw = 700e12, 3.0e12  # jaxpipe.pipeline.costmodel.estimated_stage_times' roofline
        costs = StageCosts.estimate(self.cfg.model, self.micro_batch, flops, bw)
        out = []
        for i, (a, b) in enumerate(part.ranges):
            t = stage_cost(costs, b - a, i == 0, i == part.n_stages - 1)
            out.append(StageTime(t / 3, 2 * t / 3))
        return tuple(out)

    @cache  # noqa: B019
    def grads(self, weights: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[int, ...]]:
        """Per pipeline rank: gradient bytes on the DP links, and how many chunks the chain cuts them into."""
        counts = stage_param_counts(self.cfg.model, self.partition(weights).ranges)
        per_rank = [sum(counts[c] for c in range(self.n_chunks) if self.rank_of(c) == r) for r in range(self.pp)]
        return (tuple(4.0 * n * self.size_scale for n in per_rank),
                tuple(transfer_chunks(4.0 * n) for n in per_rank))

    def tied_bytes(self, dtype: str) -> float:
        m = self.cfg.model
        return float(tied_traffic(m.vocab_size, m.d_model, dtype).egress(0)) * self.size_scale


def grad_factor(codec: str) -> float:
    """Wire bytes of the DP exchange with `parallel.grad_codec` over float32's (jaxpipe.comm.quant's rows)."""
    return quant.chunk_row_bytes(codec) / quant.chunk_row_bytes("none")


def stage_weights(cluster: Cluster, grid: Grid) -> tuple[float, ...]:
    return tuple(min(cluster.speed_of(h) for h in row) for row in grid)


# ---- The bound the layout search anneals on -------------------------------------------------------


class _Matrices:
    """The cluster's links as plain nested lists (the hot loops index them millions of times)."""

    def __init__(self, cluster: Cluster, per_message_s: float):
        n = cluster.n
        self.lat = [[cluster.delay_s(i, j) + per_message_s if i != j else 0.0 for j in range(n)] for i in range(n)]
        self.inv = [[8.0 / cluster.rate_bps(i, j) if i != j else 0.0 for j in range(n)] for i in range(n)]
        self.speed = [cluster.speed_of(i) for i in range(n)]


class BoundObjective:
    """jaxpipe's closed-form estimate of one layout's iteration (see the module docstring); `swap`
    applies a move and rescores only what it touches, `undo` takes the last move back."""

    def __init__(self, cluster: Cluster, mats: _Matrices, work: Workload, grid: Grid, algos: Sequence[AlgoChoice],
                 tied_dtypes: Sequence[str], overlap: bool = True):
        """`overlap`: a schedule that runs forwards and backwards at once (1F1B and its kin) may be chosen.
        Each DP choice is scored by its traffic: its pattern's bytes (codec applied), once per H steps."""
        self.cluster, self.m, self.w = cluster, mats, work
        self.overlap = overlap
        self.P, self.D = len(grid), len(grid[0])
        self.grid = [list(row) for row in grid]
        self.modes = sorted({("chain" if a.pattern == "central_ps" else "ring",
                              grad_factor(a.grad_codec) * a.dp_fraction, a.every) for a in algos})
        self.msg_factor = min(work.act_factor(a.act_codec) for a in algos)
        self.tied_bytes = min(work.tied_bytes(d) for d in tied_dtypes)
        self.hetero = cluster.speed is not None and len(set(cluster.speed)) > 1
        self._reload()

    def _reload(self) -> None:
        P, D = self.P, self.D
        self.weights = stage_weights(self.cluster, self.grid) if self.hetero else (1.0,) * P
        times = self.w.base_times(self.weights)
        self.f = [times[s].fwd for s in range(P)]
        self.b = [times[s].bwd for s in range(P)]
        grads, chunks = self.w.grads(self.weights)
        self.chunk_bytes = [g / c for g, c in zip(grads, chunks, strict=True)]
        self.n_chunks = list(chunks)
        self.seg_bytes = [g / D for g in grads]
        self.pipe = [self._pipe(r) for r in range(D)]
        self.tied = [self._tied(r) for r in range(D)]
        self.ctrl = [self._ctrl(r) for r in range(D)]
        self.dp = {mode: [self._dp(s, mode) for s in range(P)] for mode in self.modes}

    # components (plain loops and comparisons: these run for every move)
    def _pipe(self, r: int) -> float:
        g, lat, inv, sp = self.grid, self.m.lat, self.m.inv, self.m.speed
        M, nbytes, F, B = self.w.M, self.w.msg_bytes * self.msg_factor, self.f, self.b
        fill = mf = mb = mfb = mtf = mtb = 0.0
        prev = -1
        for s in range(self.P):
            h = g[s][r]
            v = sp[h]
            f, b = F[s] / v, B[s] / v
            fill += f + b
            if f > mf:
                mf = f
            if b > mb:
                mb = b
            if f + b > mfb:
                mfb = f + b
            if prev >= 0:
                tf, tb = nbytes * inv[prev][h], nbytes * inv[h][prev]
                fill += tf + tb + lat[prev][h] + lat[h][prev]
                if tf > mtf:
                    mtf = tf
                if tb > mtb:
                    mtb = tb
            prev = h
        gpipe = fill + (M - 1) * ((mf if mf > mtf else mtf) + (mb if mb > mtb else mtb))
        if not self.overlap:
            return gpipe
        overlapped = fill + (M - 1) * max(mfb, mtf, mtb)
        return gpipe if gpipe < overlapped else overlapped

    def _tied(self, r: int) -> float:
        if self.P == 1 or not self.tied_bytes:
            return 0.0
        a, b = self.grid[0][r], self.grid[self.P - 1][r]
        lat, inv = self.m.lat, self.m.inv
        return max(self.tied_bytes * inv[a][b] + lat[a][b], self.tied_bytes * inv[b][a] + lat[b][a])

    def _ctrl(self, r: int) -> float:
        if self.P == 1:
            return 0.0
        hosts = [row[r] for row in self.grid]
        lat = self.m.lat
        worst = max(max(map(lat[a].__getitem__, hosts)) for a in hosts)
        return 2 * (self.P - 1).bit_length() * worst

    def _dp(self, s: int, key: tuple[str, float, int]) -> float:
        D = self.D
        if D == 1:
            return 0.0
        mode, factor, every = key
        return self._dp_once(s, mode, factor) / every

    def _dp_once(self, s: int, mode: str, factor: float) -> float:
        D = self.D
        g, lat, inv = self.grid[s], self.m.lat, self.m.inv
        if mode == "chain":
            cb, total, worst = self.chunk_bytes[s] * factor, 0.0, 0.0
            a = g[0]
            for i in range(1, D):
                b = g[i]
                up, down = cb * inv[b][a], cb * inv[a][b]
                total += up + down + lat[b][a] + lat[a][b]
                if up > worst:
                    worst = up
                if down > worst:
                    worst = down
                a = b
            return total + 2 * (self.n_chunks[s] - 1) * worst
        sb, total, worst_tx, best_x = self.seg_bytes[s] * factor, 0.0, 0.0, math.inf
        a = g[D - 1]
        for b in g:
            tx = sb * inv[a][b]
            x = tx + lat[a][b]
            total += x
            if tx > worst_tx:
                worst_tx = tx
            if x < best_x:
                best_x = x
            a = b
        return 2 * max(total - best_x, (D - 1) * worst_tx)

    # the score
    def value(self) -> float:
        dp = min(max(v) for v in self.dp.values())
        return max(self.pipe) + max(self.tied) + dp + max(self.ctrl)

    def score(self) -> float:
        """The value plus a small share of the means: moves that shorten a replica or a stage that is
        not (yet) the slowest still count, so the annealing does not wander on plateaus."""
        dp = min(sum(v) for v in self.dp.values()) / self.P
        return self.value() + 0.05 * (sum(self.pipe) / self.D + dp)

    def critical(self, rng: random.Random) -> tuple[int, int]:
        """A cell on the slowest replica or the slowest DP group."""
        if rng.random() < 0.5 or self.D == 1:
            r = max(range(self.D), key=lambda i: self.pipe[i] + self.tied[i])
            return rng.randrange(self.P), r
        mode = min(self.dp, key=lambda k: max(self.dp[k]))
        s = max(range(self.P), key=lambda i: self.dp[mode][i])
        return s, rng.randrange(self.D)

    def swap(self, c1: tuple[int, int], c2: tuple[int, int]) -> Any:
        (s1, r1), (s2, r2) = c1, c2
        g = self.grid
        g[s1][r1], g[s2][r2] = g[s2][r2], g[s1][r1]
        if self.hetero and s1 != s2 and stage_weights(self.cluster, g) != self.weights:
            old: Any = (self.weights, self.f, self.b, self.chunk_bytes, self.n_chunks, self.seg_bytes, self.pipe,
                   self.tied, self.ctrl, self.dp)
            self._reload()
            return ("all", c1, c2, old)
        reps, stages = {r1, r2}, {s1, s2}
        old = ([(r, self.pipe[r], self.tied[r], self.ctrl[r]) for r in reps],
               [(s, {k: v[s] for k, v in self.dp.items()}) for s in stages])
        for r in reps:
            self.pipe[r], self.tied[r], self.ctrl[r] = self._pipe(r), self._tied(r), self._ctrl(r)
        for s in stages:
            for mode in self.modes:
                self.dp[mode][s] = self._dp(s, mode)
        return ("part", c1, c2, old)

    def undo(self, token: Any) -> None:
        kind, (s1, r1), (s2, r2), old = token
        g = self.grid
        g[s1][r1], g[s2][r2] = g[s2][r2], g[s1][r1]
        if kind == "all":
            (self.weights, self.f, self.b, self.chunk_bytes, self.n_chunks, self.seg_bytes, self.pipe, self.tied,
             self.ctrl, self.dp) = old
            return
        reps, stages = old
        for r, p, t, c in reps:
            self.pipe[r], self.tied[r], self.ctrl[r] = p, t, c
        for s, vals in stages:
            for mode, v in vals.items():
                self.dp[mode][s] = v


class DtfmObjective:
    """DT-FM's cost of a layout as it runs (`jaxpipe.plan.dtfm.layout_cost`), rescored per move: the
    two touched DP groups and the (up to four) stage boundaries next to them."""

    def __init__(self, cluster: Cluster, grid: Grid, sizes: dtfm.DtfmSizes):
        self.P, self.D = len(grid), len(grid[0])
        n = cluster.n
        self.grid = [list(row) for row in grid]
        self.act = [[dtfm.activation_s(cluster, i, j, sizes) if i != j else 0.0 for j in range(n)] for i in range(n)]
        g = sizes.gradient_bytes * 8 / self.D
        self.grad = [[2 * (cluster.delay_s(i, j) + g / cluster.rate_bps(i, j)) if i != j else 0.0 for j in range(n)]
                     for i in range(n)]
        self.dp = [self._dp(s) for s in range(self.P)]
        self.edge = [self._edge(s) for s in range(self.P - 1)]

    def _dp(self, s: int) -> float:
        row, grad = self.grid[s], self.grad
        return max(sum(grad[i][j] for j in row) for i in row) if self.D > 1 else 0.0

    def _edge(self, s: int) -> tuple[float, float]:
        """The boundary's slowest pair, and the mean pair (which guides the search towards boundaries
        whose pairs are all fast: the slowest alone changes only when the last one is)."""
        a, b, act = self.grid[s], self.grid[s + 1], self.act
        costs = [act[a[r]][b[r]] for r in range(self.D)]
        return max(costs), sum(costs) / self.D

    def value(self) -> float:
        return max(self.dp) + 2 * sum(e[0] for e in self.edge)

    def score(self) -> float:
        return self.value() + 0.05 * (sum(self.dp) / self.P + 2 * sum(e[1] for e in self.edge))

    def critical(self, rng: random.Random) -> tuple[int, int]:
        if rng.random() < 0.5 and self.edge:
            s = max(range(self.P - 1), key=lambda i: self.edge[i][0])
            return s + rng.randrange(2), rng.randrange(self.D)
        return max(range(self.P), key=lambda i: self.dp[i]), rng.randrange(self.D)

    def swap(self, c1: tuple[int, int], c2: tuple[int, int]) -> Any:
        (s1, r1), (s2, r2) = c1, c2
        g = self.grid
        g[s1][r1], g[s2][r2] = g[s2][r2], g[s1][r1]
        stages = {s1, s2}
        edges = {e for s in stages for e in (s - 1, s) if 0 <= e < self.P - 1}
        old = ([(s, self.dp[s]) for s in stages], [(e, self.edge[e]) for e in edges])
        for s in stages:
            self.dp[s] = self._dp(s)
        for e in edges:
            self.edge[e] = self._edge(e)
        return (c1, c2, old)

    def undo(self, token: Any) -> None:
        (s1, r1), (s2, r2), (dps, edges) = token
        g = self.grid
        g[s1][r1], g[s2][r2] = g[s2][r2], g[s1][r1]
        for s, v in dps:
            self.dp[s] = v
        for e, v in edges:
            self.edge[e] = v


def anneal(obj: Any, rng: random.Random, seconds: float | None, max_moves: int | None = None
           ) -> tuple[float, Grid, int]:
    """Simulated annealing over swaps of two cells, on `obj.score()`; returns the best `obj.value()`
    seen, its grid and the moves made. Temperature falls geometrically from 3% to 0.01% of the start,
    over `seconds` of the clock or over `max_moves` moves, whichever runs out first. A move budget alone
    (`seconds=None`) makes the search the same on every machine: the same seed, the same result."""
    if seconds is None and max_moves is None:
        raise ValueError("anneal needs seconds or max_moves")
    P, D = obj.P, obj.D
    if P * D < 2:
        return obj.value(), [list(r) for r in obj.grid], 0
    cur = obj.score()
    best_v, best_grid = obj.value(), [list(r) for r in obj.grid]
    t_hi, t_lo = 0.03 * cur, 1e-4 * cur
    start = time.perf_counter()
    limit = max_moves if max_moves is not None else 10**12
    moves, frac = 0, 0.0
    while moves < limit:
        if seconds is not None and moves % 256 == 0:
            frac = (time.perf_counter() - start) / seconds if seconds > 0 else 1.0
            if frac >= 1.0:
                break
        if max_moves is not None:
            frac = max(frac, moves / max_moves) if seconds is not None else moves / max_moves
        temp = t_hi * (t_lo / t_hi) ** frac
        c1 = obj.critical(rng) if rng.random() < 0.5 else (rng.randrange(P), rng.randrange(D))
        c2 = (rng.randrange(P), rng.randrange(D))
        moves += 1
        if c1 == c2 or obj.grid[c1[0]][c1[1]] == obj.grid[c2[0]][c2[1]]:
            continue
        token = obj.swap(c1, c2)
        new = obj.score()
        if new <= cur or rng.random() < math.exp(-(new - cur) / temp):
            cur = new
            v = obj.value()
            if v < best_v - 1e-12:
                best_v, best_grid = v, [list(r) for r in obj.grid]
        else:
            obj.undo(token)
    return best_v, best_grid, moves


# ---- Where the annealing starts ------------------------------------------------------------------------


def balanced_groups(dist: Sequence[Sequence[float]], members: Sequence[int], k: int, size: int,
                    rng: random.Random) -> list[list[int]]:
    """`k` groups of `size` of `members` with small distances inside: grow each group from the most
    remote member left by its nearest, then swap members between groups while that helps."""
    left = list(members)
    groups: list[list[int]] = []
    for _ in range(k):
        seed = max(left, key=lambda i: (sum(dist[i][j] for j in left), rng.random()))
        g = [seed]
        left.remove(seed)
        while len(g) < size:
            nxt = min(left, key=lambda j: (sum(dist[j][x] for x in g), rng.random()))
            g.append(nxt)
            left.remove(nxt)
        groups.append(g)

    def cost(g: list[int], x: int, skip: int) -> float:
        return sum(dist[x][y] + dist[y][x] for y in g if y != skip)

    for _ in range(4):
        improved = False
        for a in range(k):
            for b in range(a + 1, k):
                for i, x in enumerate(groups[a]):
                    for j, y in enumerate(groups[b]):
                        delta = (cost(groups[a], y, x) + cost(groups[b], x, y)
                                 - cost(groups[a], x, x) - cost(groups[b], y, y))
                        if delta < -1e-12:
                            groups[a][i], groups[b][j] = y, x
                            x = y
                            improved = True
        if not improved:
            break
    return groups


def _order_columns(grid: Grid, dist: Sequence[Sequence[float]]) -> Grid:
    """Orders the replicas (columns) so that neighbouring replicas' hosts are close at every stage:
    the central PS's chain and the ring run in replica order."""
    D = len(grid[0])
    if D <= 2:
        return grid
    cost = np.array([[sum(dist[row[a]][row[b]] for row in grid) if a != b else 0.0 for b in range(D)]
                     for a in range(D)])
    _, order = dtfm.open_path(cost)
    return [[row[i] for i in order] for row in grid]


def _order_path(hosts: list[int], dist: Sequence[Sequence[float]]) -> list[int]:
    cost = np.array([[dist[a][b] for b in hosts] for a in hosts])
    _, order = dtfm.open_path(cost)
    return [hosts[i] for i in order]


def _hosts_packed(cluster: Cluster, P: int, D: int, members: Sequence[int]) -> Grid | None:
    """Each host's ranks on consecutive stages of one replica, the largest hosts first, each into the
    replica filled least so far (so equal hosts line up stage by stage across the replicas, and the
    boundaries between hosts fall at the same stages); a host larger than a replica's room is split.
    None when every host runs one rank."""
    by_host: dict[str, list[int]] = {}
    for h in members:
        by_host.setdefault(cluster.hosts[h], []).append(h)
    blocks = sorted(by_host.values(), key=len, reverse=True)
    if len(blocks[0]) < 2:
        return None
    grid = [[-1] * D for _ in range(P)]
    fill = [0] * D
    queue = list(blocks)
    while queue:
        block = queue.pop(0)
        r = min(range(D), key=lambda c: (fill[c], c))
        room = P - fill[r]
        if len(block) > room:
            queue.insert(0, block[room:])
            block = block[:room]
        for h in block:
            grid[fill[r]][r] = h
            fill[r] += 1
    return grid


def seed_grids(cluster: Cluster, P: int, D: int, mats: _Matrices, work: Workload, rng: random.Random,
               members: Sequence[int]) -> dict[str, Grid]:
    """Starting layouts: the launch order; pipelines inside well-connected sets of P ranks (each
    ordered along its cheapest path); DP groups inside well-connected sets of D ranks, ordered and
    matched the way DT-FM does (bottleneck matchings, an open-loop tour); hosts packed onto
    consecutive stages; a random layout."""
    act = [[work.msg_bytes * (mats.inv[i][j] + mats.inv[j][i]) + mats.lat[i][j] + mats.lat[j][i]
            for j in range(cluster.n)] for i in range(cluster.n)]
    grad_b = work.grads((1.0,) * P)[0]
    gb = sum(grad_b) / len(grad_b) / max(D, 1)
    grad = [[gb * (mats.inv[i][j] + mats.inv[j][i]) + mats.lat[i][j] + mats.lat[j][i]
             for j in range(cluster.n)] for i in range(cluster.n)]
    out: dict[str, Grid] = {"launch order": [[members[r * P + s] for r in range(D)] for s in range(P)]}
    if P > 1 and D > 1:
        pipes = balanced_groups(act, members, D, P, rng)
        grid = [[0] * D for _ in range(P)]
        for r, hosts in enumerate(pipes):
            for s, h in enumerate(_order_path(hosts, act)):
                grid[s][r] = h
        out["pipelines local"] = _order_columns(grid, grad)
        groups = balanced_groups(grad, members, P, D, rng)
        sizes = dtfm.DtfmSizes(work.msg_bytes * work.M, gb * D)
        _, g2 = dtfm.partition_cost(cluster, groups, sizes) if P <= 12 else (None, groups)
        out["DP groups local"] = _order_columns(g2, grad)
    elif D == 1 and P > 1:
        out["path"] = [[h] for h in _order_path(list(members), act)]
    packed = _hosts_packed(cluster, P, D, members)
    if packed is not None:
        out["hosts packed"] = packed
    shuffled = list(members)
    rng.shuffle(shuffled)
    out["random"] = [[shuffled[r * P + s] for r in range(D)] for s in range(P)]
    assert all(sorted(h for row in g for h in row) == sorted(members) for g in out.values()), "seed lost a rank"
    return out


def polish(cluster: Cluster, work: Workload, cand: Candidate, pair: Callable[[int, int], Link], cache_: dict,
           optimizer_s: float, rng: random.Random, seconds: float | None, max_evals: int | None = None
           ) -> tuple[Candidate, int]:
    """First-improvement swaps of two cells, each scored by the full simulation (replicas a swap
    leaves alone come from the cache): every pair of cells while there are few, else random pairs
    with one cell on the slowest replica or DP group; until no swap helps, `seconds` pass or
    `max_evals` simulations are spent. Returns the best candidate and the evaluations."""
    s = cand.settings
    P, D = len(cand.grid), len(cand.grid[0])
    cells = [(i, j) for i in range(P) for j in range(D)]
    deadline = time.perf_counter() + seconds if seconds is not None else math.inf
    evals_left = max_evals if max_evals is not None else math.inf
    evals, improved = 0, True
    while improved and time.perf_counter() < deadline and evals < evals_left:
        improved = False
        if len(cells) <= 16:
            trials = list(itertools.combinations(cells, 2))
            rng.shuffle(trials)
        else:
            pred = cand.prediction
            worst_r = max(range(D), key=lambda r: pred.pipeline_per_replica[r])
            worst_s = max(range(P), key=lambda i: pred.sync_per_stage[i])
            trials = []
            for _ in range(400):
                a = (rng.randrange(P), worst_r) if rng.random() < 0.5 else (worst_s, rng.randrange(D))
                trials.append((a, rng.choice(cells)))
        for (s1, r1), (s2, r2) in trials:
            if time.perf_counter() >= deadline or evals >= evals_left:
                break
            if (s1, r1) == (s2, r2):
                continue
            grid = [list(row) for row in cand.grid]
            grid[s1][r1], grid[s2][r2] = grid[s2][r2], grid[s1][r1]
            c = evaluate(cluster, work, grid, s.schedule, s.algo, s.tied_dtype, pair, cache_, optimizer_s)
            evals += 1
            if c is not None and c.iteration_s < cand.iteration_s * (1 - 1e-9):
                cand, improved = c, True
                break
    return cand, evals


# ---- The plan ----------------------------------------------------------------------------------------------


# Moves of the move budget per simulation of the polish: a simulated layout costs about as much as
# this many bound-scored moves, so a move budget splits its work between the two levels as the
# clock budget does (4/5 annealing, 1/5 polish).
POLISH_MOVES = 300


def default_budget(n: int) -> float:
    """Seconds of annealing for `n` ranks: 18 s for 64 (then simulation of the kept layouts)."""
    return min(20.0, 2.0 + 0.25 * n)


def valid_shapes(cfg: Config, n: int) -> list[tuple[int, int]]:
    out = []
    for pp in range(1, n + 1):
        if n % pp:
            continue
        dp = n // pp
        if pp > cfg.model.n_layer or cfg.train.global_batch_size % dp:
            continue
        out.append((pp, dp))
    return out


def _micro_batches(cfg: Config, dp: int, limit: int = 3) -> list[int]:
    """The smallest divisors of the replica's batch (more micro-batches, smaller bubble), and the
    config's own size when it divides."""
    per = cfg.train.global_batch_size // dp
    divs = [d for d in range(1, per + 1) if per % d == 0 and per // d <= 4096
            and d % cfg.runtime.devices_per_process == 0]
    pick = divs[:limit]
    if cfg.train.micro_batch_size in divs and cfg.train.micro_batch_size not in pick:
        pick.append(cfg.train.micro_batch_size)
    return pick


@cache
def _lowered(choice: ScheduleChoice, pp: int, M: int) -> Lowered | None:
    try:
        sched = make_schedule(choice.name, pp, M, choice.extra_warmup, choice.virtual_stages)
    except ConfigError:
        return None
    return sched.lowered()


def _links(cluster: Cluster, per_message_s: float) -> Callable[[int, int], Link]:
    table = [[Link(cluster.delay_s(i, j), cluster.rate_bps(i, j), per_message_s) if i != j else Link()
              for j in range(cluster.n)] for i in range(cluster.n)]
    return lambda a, b: table[a][b]


def config_algo(cfg: Config) -> AlgoChoice:
    p = cfg.parallel
    diloco = p.dp_mode in ("diloco", "streaming_diloco")
    streaming = p.dp_mode == "streaming_diloco"
    return AlgoChoice(p.dp_mode, p.grad_codec, p.act_codec, p.diloco_inner_steps if diloco else 0,
                      p.diloco_outer_lr, p.diloco_outer_momentum, p.diloco_exchange, act_grad_codec=p.act_grad_codec,
                      fragments=p.diloco_fragments if streaming else 1,
                      overlap_steps=p.diloco_overlap_steps if streaming else 0)


def algo_choices(cfg: Config, dp: int, search: Sequence[str], pinned: Collection[str], budget: float | None,
                 table: QualityTable) -> list[AlgoChoice]:
    """The DP algorithms and codecs the search may choose for `dp` replicas. A key in `pinned` keeps the
    config's value (the user set it). A lossy choice the search makes needs a quality-table row and
    `budget` (percent) > 0, and the rows of one choice must add up to at most the budget; a pinned
    lossy choice is the user's and is not refused by the budget, but with a budget its row must exist."""
    p = cfg.parallel
    priced = budget is not None and budget > 0

    def free(key: str, what: str) -> bool:
        return what in search and f"parallel.{key}" not in pinned

    def rows_for(kind: str, chosen: bool, **key: Any) -> tuple[Row, ...] | None:
        """() lossless, the row(s) of a lossy setting, None when it may not be offered."""
        if not chosen:  # pinned by the user
            return (table.one(kind, **key),) if budget is not None else ()
        if not priced:
            return None
        rows = table.of(kind, **key)
        return (min(rows, key=lambda r: r.loss_pct),) if rows else None

    acts: list[tuple[str, tuple[Row, ...]]] = []
    for codec in (["none", "int8", "float8", "int4"] if free("act_codec", "act_codec") else [p.act_codec]):
        rows = () if codec == "none" else rows_for("act_codec", free("act_codec", "act_codec"), codec=codec)
        if rows is not None:
            acts.append((codec, rows))
    grads: list[tuple[str, tuple[Row, ...]]] = []
    for codec in (["none", "bfloat16", "int8", "int4"] if free("grad_codec", "grad_codec") else [p.grad_codec]):
        rows = () if codec == "none" else rows_for("grad_codec", free("grad_codec", "grad_codec"), codec=codec)
        if rows is not None and (codec == "none" or dp > 1):
            grads.append((codec, rows))
    bases: list[AlgoChoice] = []
    modes = ["central_ps", "sharded_ps", "diloco", "streaming_diloco"] if free("dp_mode", "dp_mode") else [p.dp_mode]
    for mode in modes:
        if mode not in ("diloco", "streaming_diloco"):
            bases.append(AlgoChoice(mode))
            continue
        if dp < 2:
            continue
        chosen = free("dp_mode", "dp_mode")
        key: dict[str, Any] = {"M": dp}
        for k, name in (("H", "diloco_inner_steps"), ("outer_lr", "diloco_outer_lr"),
                        ("outer_momentum", "diloco_outer_momentum")):
            if f"parallel.{name}" in pinned or not chosen:
                key[k] = getattr(p, name)
        if not chosen and budget is None:
            bases.append(dataclasses.replace(config_algo(cfg), grad_codec="none", act_codec="none",
                                             act_grad_codec=None))
            continue
        if chosen and not priced:
            continue
        if mode == "streaming_diloco":
            for k, name in (("fragments", "diloco_fragments"), ("overlap_steps", "diloco_overlap_steps")):
                if f"parallel.{name}" in pinned or not chosen:
                    key[k] = getattr(p, name)
        found = table.of(mode, **key) if chosen else [table.one(mode, **key)]
        for r in found:
            extra = dict(r.key)
            bases.append(AlgoChoice(mode, inner_steps=int(r.get("H")), outer_lr=float(r.get("outer_lr")),
                                    outer_momentum=float(r.get("outer_momentum")), exchange=p.diloco_exchange,
                                    rows=(r,), fragments=int(extra.get("fragments", 1)),
                                    overlap_steps=int(extra.get("overlap_steps", 0))))
    out = []
    for b in bases:
        for gc, grows in grads:
            for ac, arows in acts:
                a = dataclasses.replace(b, grad_codec=gc, act_codec=ac, rows=b.rows + grows + arows,
                                        act_grad_codec=p.act_grad_codec if "parallel.act_grad_codec" in pinned
                                        else None)
                if a.rows and budget is not None and a.loss_pct > budget + 1e-9 and _search_made(a, pinned):
                    continue
                out.append(a)
    return _undominated(out, cfg)


def _search_made(a: AlgoChoice, pinned: Collection[str]) -> bool:
    """Whether the search (not the user) made one of `a`'s lossy choices."""
    return ((a.diloco and "parallel.dp_mode" not in pinned)
            or (a.grad_codec != "none" and "parallel.grad_codec" not in pinned)
            or (a.act_codec != "none" and "parallel.act_codec" not in pinned))


def _undominated(algos: list[AlgoChoice], cfg: Config) -> list[AlgoChoice]:
    """Drops a choice that another beats or equals on every count: pipeline bytes, DP bytes per step
    and loss (bfloat16 gradients against int8's, say)."""
    def cost(a: AlgoChoice) -> tuple[float, float, float, str]:
        act = {"none": 1.0, "int4": 0.25}.get(a.act_codec, 0.5)
        hidden = 0.5 if a.overlap_steps else 1.0  # an overlapped exchange is not dominated by a blocking one
        return act, grad_factor(a.grad_codec) * a.dp_fraction * hidden / a.every, a.loss_pct, a.pattern

    costs = [cost(a) for a in algos]
    keep = []
    for i, a in enumerate(algos):
        ci = costs[i]
        beaten = any(j != i and costs[j][3] == ci[3] and
                     all(x <= y for x, y in zip(costs[j][:3], ci[:3], strict=True)) and
                     (costs[j][:3] != ci[:3] or j < i) for j in range(len(algos)))
        if not beaten:
            keep.append(a)
    return keep


def evaluate(cluster: Cluster, work: Workload, grid: Grid, choice: ScheduleChoice, algo: AlgoChoice, tied_dtype: str,
             pair: Callable[[int, int], Link], cache_: dict, optimizer_s: float = 0.0) -> Candidate | None:
    """jaxpipe's full prediction of one layout with one set of settings (None: the schedule does not fit)."""
    lowered = _lowered(choice, work.pp, work.M)
    if lowered is None:
        return None
    weights = stage_weights(cluster, grid)
    times0 = work.base_times(weights)
    if work.virtual_stages != choice.virtual_stages:
        raise ValueError("workload and schedule disagree on chunks per rank")
    times = [[StageTime(t.fwd / cluster.speed_of(grid[work.rank_of(c)][r]), t.bwd / cluster.speed_of(
        grid[work.rank_of(c)][r]), t.input_frac) for c, t in enumerate(times0)] for r in range(work.dp)]
    grads, chunks = work.grads(weights)
    gf = grad_factor(algo.grad_codec)
    pred = predict_layout(lowered, grid, times, work.msg_bytes * work.act_factor(algo.act_codec), pair,
                          dp_mode=algo.pattern, grad_bytes=[g * gf * algo.dp_fraction for g in grads],
                          grad_chunks=chunks,
                          tied_bytes=work.tied_bytes(tied_dtype), optimizer_s=optimizer_s, cache=cache_,
                          dp_every=algo.every, dp_overlap_steps=algo.overlap_steps)
    settings = Settings(work.pp, work.dp, work.micro_batch, choice, algo, tied_dtype, tuple(work.partition(
        weights).counts))
    return Candidate(settings, [list(r) for r in grid], pred)


def plan_layout(cluster: Cluster, cfg: Config, ranks: Sequence[int] | None = None, *,
                search: Sequence[str] = SEARCHABLE, time_budget_s: float | None = None,
                max_moves: int | None = None, seed: int = 0, platform: str = "gpu",
                stage_times: Sequence[StageTime] | None = None, per_message_s: float = 0.0,
                optimizer_s: float = 0.0, objective: str = "jaxpipe", dtfm_sizes: dtfm.DtfmSizes | None = None,
                log: Callable[[str], None] | None = None, fixed_grid: Grid | None = None,
                pinned: Collection[str] = (), max_loss_increase: float | None = None,
                quality: QualityTable | None = None) -> PlanResult:
    """Plans a job on `ranks` of `cluster` (default: all; world rank k of the job runs on cluster rank
    ranks[k]) for `cfg`: the layout, and whatever of SEARCHABLE `search` names (the rest comes from
    `cfg`). `stage_times` (per chunk, measured for the config's shape and micro-batch at nominal speed)
    replaces the roofline estimate and fixes shape and micro-batch. `objective="dtfm"` anneals the
    layouts on DT-FM's cost model (`dtfm_sizes`) instead of jaxpipe's bound; the settings are still
    chosen by jaxpipe's simulation. `fixed_grid` (with "placement" not searched) scores that layout
    instead of the launch order. `pinned`: the keys the user set (`--set`): never changed. The DP
    algorithm and the codecs are searched within `max_loss_increase` (percent; None or 0: lossless
    choices only), priced from `quality` (default: the shipped table). The layout search runs for
    `time_budget_s` seconds (default: `default_budget`) or, given `max_moves` (and no `time_budget_s`),
    for that many annealing moves and a simulation per POLISH_MOVES of them, with no clock: the same
    plan on any machine. Raises ConfigError when nothing fits."""
    t_start = time.perf_counter()
    ranks = list(range(cluster.n)) if ranks is None else [int(r) for r in ranks]
    if len(set(ranks)) != len(ranks) or not all(0 <= r < cluster.n for r in ranks):
        raise ConfigError(f"plan: ranks must be distinct ranks of the cluster's 0..{cluster.n - 1}")
    unknown = sorted(set(search) - set(SEARCHABLE))
    if unknown:
        raise ConfigError(f"plan --search: '{unknown[0]}' is not one of {', '.join(SEARCHABLE)}")
    sub = cluster.permuted(ranks)  # the planned job's world ranks are 0..n-1 of `sub`
    n = sub.n
    p = cfg.parallel
    fixed_times = tuple(stage_times) if stage_times is not None else None
    if fixed_times is not None:
        search = [s for s in search if s not in ("shape", "micro_batch")]
    shapes = valid_shapes(cfg, n) if "shape" in search else [(p.pp, p.replicas)]
    shapes = [s for s in shapes if s[0] * s[1] == n]
    if not shapes:
        raise ConfigError(f"plan: no PP x DP shape of {n} ranks fits this config (parallel.pp x parallel.dp = "
                          f"{p.pp} x {p.dp}; PP at most model.n_layer = {cfg.model.n_layer}, DP dividing "
                          f"train.global_batch_size = {cfg.train.global_batch_size})")
    schedules = list(ALL_SCHEDULES) if "schedule" in search else [
        ScheduleChoice(p.schedule, p.extra_warmup, p.virtual_stages)]
    if max_loss_increase is not None and not max_loss_increase >= 0:
        raise ConfigError(f"--max-loss-increase must be 0% or more (the loss the plan may add), got "
                          f"{max_loss_increase}")
    table = quality or QualityTable.load()
    # Under emulation (and in the model) allreduce is the sharded PS's ring, so searching one covers both.
    algos_of = {dp: algo_choices(cfg, dp, search, pinned, max_loss_increase, table) for _, dp in shapes}
    shapes = [s for s in shapes if algos_of[s[1]]]
    if not shapes:
        raise ConfigError(f"plan: parallel.dp_mode={p.dp_mode} fits none of the searched shapes (DiLoCo needs "
                          f"parallel.dp >= 2)")
    # A bfloat16 tied gradient is never slower; it is simulated, and kept only where it saves >= 1%.
    tied_dtypes = ["bfloat16"] if "tied_dtype" in search else [p.tied_grad_dtype]
    mats = _Matrices(sub, per_message_s)
    pair = _links(sub, per_message_s)
    rng = random.Random(seed)
    combos = []
    for pp, dp in shapes:
        if cfg.train.global_batch_size % dp:
            continue
        mbs = _micro_batches(cfg, dp) if "micro_batch" in search else [cfg.train.micro_batch_size]
        for mb in mbs:
            if (cfg.train.global_batch_size // dp) % mb:
                continue
            combos.append((pp, dp, mb))
    if not combos:
        raise ConfigError("plan: train.micro_batch_size does not divide the per-replica batch of any shape")
    if max_moves is not None and max_moves < 1:
        raise ConfigError(f"plan: the move budget must be at least 1 move, got {max_moves}")
    budget = time_budget_s if time_budget_s is not None else None if max_moves is not None else default_budget(n)
    stats: dict[str, Any] = {"shapes": [list(s) for s in shapes], "layouts_scored": 0, "layouts_simulated": 0,
                             "objective": objective}
    per_combo: list[tuple[Workload, list[tuple[float, Grid, str]]]] = []
    for pp, dp, mb in combos:
        v1 = Workload(cfg, pp, dp, mb, 1, platform, cfg.network.size_scale, fixed_times
                      if p.virtual_stages == 1 else None)
        members = list(range(n))
        seeds = seed_grids(sub, pp, dp, mats, v1, rng, members) if "placement" in search else {
            "given" if fixed_grid else "launch order": fixed_grid or launch_grid(pp, dp)}
        found: list[tuple[float, Grid, str]] = []
        for name, grid in seeds.items():
            if objective == "dtfm":
                obj: Any = DtfmObjective(sub, grid, dtfm_sizes or dtfm.DtfmSizes.of_workload(cfg, pp, dp))
            else:
                obj = BoundObjective(sub, mats, v1, grid, algos_of[dp], tied_dtypes,
                                     overlap=any(c.name != "gpipe" for c in schedules))
            if "placement" not in search or pp * dp == 1:
                found.append((obj.value(), grid, name))
                continue
            runs = len(combos) * len(seeds)
            value, best_grid, moves = anneal(obj, rng, None if budget is None else budget / runs,
                                             None if max_moves is None else max(1, max_moves // runs))
            stats["layouts_scored"] += moves
            found.append((value, best_grid, name))
        found.sort(key=lambda x: x[0])
        per_combo.append((v1, found))
        if log:
            log(f"  PP {pp} x DP {dp}, micro-batch {mb}: bound after annealing from " +
                ", ".join(f"{name} {v:.3f} s" for v, _, name in found))
    # Settings, by simulation: the two best distinct layouts of every shape and micro-batch whose
    # bound is within 1.5x of the best bound, and the launch order of each of those.
    floor = min(found[0][0] for _, found in per_combo)
    kept: list[tuple[Workload, Grid]] = []
    if objective == "dtfm":  # DT-FM's best layout; jaxpipe only picks its settings
        v1, found = min(per_combo, key=lambda x: x[1][0][0])
        per_combo = [(v1, found[:1])]
    for v1, found in per_combo:
        if found[0][0] > 1.5 * floor:
            continue
        distinct: list[Grid] = []
        for _, grid, _ in found:
            if grid not in distinct and len(distinct) < 2:
                distinct.append(grid)
        launch_g = launch_grid(v1.pp, v1.dp)
        kept += [(v1, g) for g in distinct] + ([] if launch_g in distinct or objective == "dtfm" else [(v1, launch_g)])
    best: Candidate | None = None
    launch_best: dict[tuple[int, int], Candidate] = {}
    cache_: dict = {}
    workloads: dict[tuple[int, int, int, int], Workload] = {}

    def workload(pp: int, dp: int, mb: int, v: int) -> Workload:
        key = (pp, dp, mb, v)
        if key not in workloads:
            times = fixed_times if v == p.virtual_stages else None
            workloads[key] = Workload(cfg, pp, dp, mb, v, platform, cfg.network.size_scale, times)
        return workloads[key]

    def fits(choice: ScheduleChoice, work: Workload) -> bool:
        if fixed_times is not None and choice.virtual_stages != p.virtual_stages:
            return False
        chunks = work.pp * choice.virtual_stages
        # Interleaving needs two layers per rank at least; its order takes seconds to build for long
        # pipelines of many micro-batches, where it also brings little: skipped there.
        return chunks <= cfg.model.n_layer and (choice.virtual_stages == 1 or chunks * work.M <= 1200)

    for v1, grid in kept:
        is_launch = grid == launch_grid(v1.pp, v1.dp)
        for choice in schedules:
            if not fits(choice, v1):
                continue
            work = workload(v1.pp, v1.dp, v1.micro_batch, choice.virtual_stages)
            for algo in algos_of[v1.dp]:
                for td in tied_dtypes:
                    c = evaluate(sub, work, grid, choice, algo, td, pair, cache_, optimizer_s)
                    if c is None:
                        continue
                    stats["layouts_simulated"] += 1
                    if best is None or c.iteration_s < best.iteration_s - 1e-12:
                        best = c
                    if is_launch:
                        key = (v1.pp, v1.dp)
                        if key not in launch_best or c.iteration_s < launch_best[key].iteration_s:
                            launch_best[key] = c
    if best is None:
        raise ConfigError("plan: no schedule fits the searched shapes and micro-batch sizes")
    if "placement" in search and objective == "jaxpipe":
        # The bound only ranks layouts; what it misses (which link's backward traffic the schedule
        # hides, where the tied pair sits) the simulation sees: swaps of the winner, simulated.
        s0 = best.settings
        work = workload(s0.pp, s0.dp, s0.micro_batch, s0.schedule.virtual_stages)
        polished, evals = polish(sub, work, best, pair, cache_, optimizer_s, rng,
                                 None if budget is None else 0.25 * budget,
                                 None if max_moves is None else max(1, max_moves // POLISH_MOVES))
        stats["layouts_simulated"] += evals
        if polished is not best:
            best = polished
            for choice in schedules:
                if not fits(choice, work):
                    continue
                w2 = workload(s0.pp, s0.dp, s0.micro_batch, choice.virtual_stages)
                for algo in algos_of[s0.dp]:
                    for td in tied_dtypes:
                        c = evaluate(sub, w2, best.grid, choice, algo, td, pair, cache_, optimizer_s)
                        if c is not None and c.iteration_s < best.iteration_s - 1e-12:
                            best = c
    if "tied_dtype" in search and best.settings.tied_dtype == "bfloat16":  # rounding only where it pays
        s = best.settings
        exact = evaluate(sub, workload(s.pp, s.dp, s.micro_batch, s.schedule.virtual_stages), best.grid, s.schedule,
                         s.algo, "float32", pair, cache_, optimizer_s)
        if exact is not None and exact.iteration_s <= 1.01 * best.iteration_s:
            best = exact
    shape = (best.settings.pp, best.settings.dp)
    launch = launch_best.get(shape)
    if launch is None:  # the best shape's launch order, with the best settings
        s = best.settings
        launch = evaluate(sub, workload(s.pp, s.dp, s.micro_batch, s.schedule.virtual_stages),
                          launch_grid(s.pp, s.dp), s.schedule, s.algo, s.tied_dtype, pair, cache_, optimizer_s)
        assert launch is not None
    launch_config = None
    if (p.pp * p.replicas == n and cfg.num_microbatches >= 1 and
            (fixed_times is None or len(fixed_times) == cfg.n_chunks)):
        try:
            work = workload(p.pp, p.replicas, cfg.train.micro_batch_size, p.virtual_stages)
            launch_config = evaluate(sub, work, launch_grid(p.pp, p.replicas),
                                     ScheduleChoice(p.schedule, p.extra_warmup, p.virtual_stages), config_algo(cfg),
                                     p.tied_grad_dtype, pair, cache_, optimizer_s)
        except ConfigError:
            launch_config = None
    s = best.settings
    launch_same = evaluate(sub, workload(s.pp, s.dp, s.micro_batch, s.schedule.virtual_stages),
                           launch_grid(s.pp, s.dp), s.schedule, s.algo, s.tied_dtype, pair, cache_, optimizer_s)
    stats["seconds"] = time.perf_counter() - t_start
    return PlanResult(sub, ranks, best, launch, launch_config, launch_same, stats)


def best_for_grid(cluster: Cluster, cfg: Config, grid: Grid, *, search: Sequence[str] = SEARCHABLE,
                  platform: str = "gpu", stage_times: Sequence[StageTime] | None = None, per_message_s: float = 0.0,
                  optimizer_s: float = 0.0) -> Candidate:
    """jaxpipe's prediction of one given layout (`grid` over all of `cluster`'s ranks) with the best
    of the searched settings (`search` as in `plan_layout`; shape and placement stay the grid's)."""
    pp, dp = len(grid), len(grid[0])
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, pp=pp, dp=dp))
    res = plan_layout(cluster, cfg, search=[s for s in search if s not in ("shape", "placement")],
                      platform=platform, stage_times=stage_times, per_message_s=per_message_s,
                      optimizer_s=optimizer_s, fixed_grid=grid)
    return res.best


def format_layout(cluster: Cluster, grid: Grid) -> str:
    """One line per replica: the world rank (and its host or region) running each stage."""
    width = max(len(f"{h} {cluster.label(h)}") for row in grid for h in row)
    lines = []
    for r in range(len(grid[0])):
        cells = [f"{grid[s][r]} {cluster.label(grid[s][r])}".ljust(width) for s in range(len(grid))]
        lines.append(f"  replica {r}: " + " | ".join(cells))
    return "\n".join(lines)


def format_plan(res: PlanResult, sizes: dtfm.DtfmSizes | None = None, placement_out: str | None = None) -> str:
    b, lo = res.best, res.launch
    st = res.stats
    out = [f"cluster: {res.cluster.source or 'cluster file'} ({len(res.ranks)} ranks)",
           f"searched {', '.join(f'{p}x{d}' for p, d in st['shapes'])} (PP x DP): {st['layouts_scored']:,} layouts "
           f"scored by the bound ({st['objective']}), {st['layouts_simulated']} settings simulated, "
           f"{st['seconds']:.1f} s",
           f"chosen: {b.settings.describe()}",
           f"  predicted iteration {b.iteration_s:.3f} s; {b.prediction.explanation}",
           *([f"  loss priced at +{b.settings.algo.loss_pct:.2f} % (rows added) from the quality table:"]
             + [f"    {r.describe()}" for r in b.settings.algo.rows] if b.settings.algo.rows else []),
           f"launch order, same shape, its best settings: {lo.iteration_s:.3f} s ({lo.prediction.bound}-bound): "
           f"{lo.iteration_s / b.iteration_s:.2f}x the chosen layout's time"]
    if res.launch_same is not None and res.launch_same.settings != lo.settings:
        out.append(f"launch order with the chosen settings: {res.launch_same.iteration_s:.3f} s "
                   f"({res.launch_same.prediction.bound}-bound)")
    if res.launch_config is not None:
        lc = res.launch_config
        out.append(f"launch order with the config's settings: {lc.iteration_s:.3f} s ({lc.prediction.bound}-bound)")
    if sizes is not None and b.settings.pp * b.settings.dp == len(res.ranks):
        out.append(f"DT-FM's cost model: chosen {res.dtfm_cost(b.grid, sizes).total:.2f} s, launch order "
                   f"{res.dtfm_cost(lo.grid, sizes).total:.2f} s")
    out.append("layout (world rank and host/region per stage):")
    out.append(format_layout(res.cluster, b.grid))
    sets = " ".join(f"--set {o}" for o in b.settings.overrides())
    where = placement_out or "placement.yaml"
    out.append(f"run it: mpiexec -n {len(res.ranks)} jaxpipe train --config CONFIG --set parallel.placement={where} "
               f"{sets}" + ("" if placement_out else "   (write the file with --placement-out)"))
    return "\n".join(out)
