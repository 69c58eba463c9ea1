"""Which layers each pipeline stage holds.

A `Partition` is a list of contiguous, non-empty layer ranges that covers every layer exactly once.
Stage 0 also holds the embeddings, the last stage the final LayerNorm, LM head and loss, so an
even split of layers is not an even split of work: `balanced` counts those too (the GPT-3 XL
head costs about 2.6 layers: 1.75 of FLOPs plus its float32 logits traffic), and divides by each
host's relative speed when hosts differ.

    >>> from jaxpipe.pipeline.partition import Partition, balanced
    >>> Partition.from_counts([3, 2, 3]).ranges
    ((0, 3), (3, 5), (5, 8))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jaxpipe.config import Config, ModelConfig
from jaxpipe.errors import ConfigError

if TYPE_CHECKING:
    from jaxpipe.pipeline.schedule import Schedule


@dataclass(frozen=True)
class StageSpec:
    index: int
    n_stages: int
    start: int
    stop: int

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)

    @property
    def n_layers(self) -> int:
        return self.stop - self.start

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.n_stages - 1


@dataclass(frozen=True)
class Partition:
    n_layers: int
    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        check_ranges(self.ranges, self.n_layers)

    @classmethod
    def from_ranges(cls, ranges: Sequence[Sequence[int]], n_layers: int) -> Partition:
        for r in ranges:
            if len(r) != 2:
                raise ConfigError(f"partition range {list(r)} must be [start, stop)")
        return cls(n_layers, tuple((int(a), int(b)) for a, b in ranges))

    @classmethod
    def from_counts(cls, counts: Sequence[int], n_layers: int | None = None) -> Partition:
        total = sum(counts)
        if n_layers is not None and total != n_layers:
            raise ConfigError(
                f"partition counts {list(counts)} add up to {total} layers but the model has {n_layers}"
            )
        for i, c in enumerate(counts):
            if c < 1:
                raise ConfigError(f"partition counts {list(counts)}: stage {i} has {c} layers; every stage needs >= 1")
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return cls(total, tuple((s, s + c) for s, c in zip(starts, counts, strict=True)))

    @classmethod
    def even(cls, n_layers: int, n_stages: int) -> Partition:
        base, extra = divmod(n_layers, n_stages)
        return cls.from_counts([base + (1 if i < extra else 0) for i in range(n_stages)], n_layers)

    @property
    def n_stages(self) -> int:
        return len(self.ranges)

    @property
    def counts(self) -> list[int]:
        return [b - a for a, b in self.ranges]

    def stage(self, index: int) -> StageSpec:
        start, stop = self.ranges[index]
        return StageSpec(index, self.n_stages, start, stop)


def check_ranges(ranges: Sequence[tuple[int, int]], n_layers: int) -> None:
    """Rejects gaps, overlaps, empty or out-of-range stages, saying which stage and layer."""
    if not ranges:
        raise ConfigError("a partition needs at least one stage")
    expected = 0
    for i, (start, stop) in enumerate(ranges):
        if stop <= start:
            raise ConfigError(f"partition stage {i} is empty: range [{start}, {stop}) holds no layer")
        if start > expected:
            raise ConfigError(
                f"partition has a gap: layers {expected}..{start - 1} belong to no stage (stage {i} starts at {start})"
            )
        if start < expected:
            raise ConfigError(
                f"partition overlaps: stage {i} starts at layer {start} but layer {start} is already in stage {i - 1}"
            )
        expected = stop
    if expected != n_layers:
        if expected < n_layers:
            raise ConfigError(f"partition ends at layer {expected} but the model has {n_layers}: layers "
                              f"{expected}..{n_layers - 1} belong to no stage")
        raise ConfigError(f"partition reaches layer {expected - 1} but the model has only {n_layers} layers")


@dataclass(frozen=True)
class StageCosts:
    """Relative cost of a layer, the embedding and the head (any unit; only ratios matter)."""

    layer: float
    embedding: float
    head: float

    @classmethod
    def estimate(cls, cfg: ModelConfig, micro_batch_size: int = 1,
                 flops_per_s: float = 700e12, bytes_per_s: float = 3.0e12) -> StageCosts:
        """Roofline estimate of fwd+bwd seconds per micro-batch.

        Layers and the head are matmul bound (3 × forward FLOPs). The embedding is bandwidth
        bound: its backward writes a dense V×D gradient (read + write of fp32 accumulators) per
        micro-batch. The default rates are an H100's measured matmul and copy rates; on other
        hardware only their ratio matters.
        """
        d, s, v = cfg.d_model, cfg.seq_len, cfg.vocab_size
        tokens = micro_batch_size * s
        layer = 3 * tokens * (24 * d * d + 4 * s * d) / flops_per_s
        # The head's matmuls, plus the float32 logits (and their gradient) written and read by the
        # softmax cross-entropy, ~6 passes over tokens × V × 4 bytes: on H100 that traffic alone is
        # about half a GPT-3 XL layer, and the measured head is ~2.8 layers, not the 1.75 FLOPs say.
        head = 3 * tokens * 2 * d * v / flops_per_s + 6 * 4 * tokens * v / bytes_per_s
        embedding = (3 * 4 * v * d + 3 * 4 * tokens * d) / bytes_per_s
        return cls(layer=layer, embedding=embedding, head=head)


def stage_cost(costs: StageCosts, n_layers: int, first: bool, last: bool) -> float:
    return n_layers * costs.layer + (costs.embedding if first else 0.0) + (costs.head if last else 0.0)


def balanced(
    n_layers: int,
    n_stages: int,
    costs: StageCosts,
    weights: Sequence[float] | None = None,
) -> Partition:
    """The contiguous split that minimises the slowest stage's time, cost / speed weight.

    Exact dynamic programme over split points (O(stages × layers²), instant for any GPT-3).
    Among splits with the same slowest stage, the one with the most even layer counts wins.
    """
    if n_stages > n_layers:
        raise ConfigError(f"cannot split {n_layers} layers over {n_stages} stages: a stage would be empty")
    w = list(weights) if weights is not None else [1.0] * n_stages
    if len(w) != n_stages:
        raise ConfigError(f"{len(w)} stage weights given for {n_stages} stages")
    if min(w) <= 0:
        raise ConfigError(f"stage weights must be positive, got {w}")

    def t(stage: int, count: int) -> float:
        return stage_cost(costs, count, stage == 0, stage == n_stages - 1) / w[stage]

    inf = float("inf")
    # best[s][l] = (max stage time, sum of squared counts) of stages 0..s-1 covering layers 0..l-1.
    best = [[(inf, inf)] * (n_layers + 1) for _ in range(n_stages + 1)]
    choice = [[0] * (n_layers + 1) for _ in range(n_stages + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, n_stages + 1):
        for end in range(s, n_layers - (n_stages - s) + 1):
            for count in range(1, end - (s - 1) + 1):
                prev = best[s - 1][end - count]
                if prev[0] == inf:
                    continue
                cand = (max(prev[0], t(s - 1, count)), prev[1] + count * count)
                # Compare times with a relative tolerance so float noise does not beat evenness.
                cur = best[s][end]
                if cand[0] < cur[0] * (1 - 1e-9) or (cand[0] <= cur[0] * (1 + 1e-9) and cand[1] < cur[1]):
                    best[s][end] = cand
                    choice[s][end] = count
    counts = []
    end = n_layers
    for s in range(n_stages, 0, -1):
        c = choice[s][end]
        counts.append(c)
        end -= c
    return Partition.from_counts(counts[::-1], n_layers)


def resolve_partition(
    spec: str | list[int] | list[list[int]],
    cfg: ModelConfig,
    n_stages: int,
    micro_batch_size: int = 1,
    weights: Sequence[float] | None = None,
) -> Partition:
    """Turns the `parallel.partition` config value into a checked Partition."""
    if isinstance(spec, str):
        if spec == "balanced":
            return balanced(cfg.n_layer, n_stages, StageCosts.estimate(cfg, micro_batch_size), weights)
        if spec == "even":
            return Partition.even(cfg.n_layer, n_stages)
        raise ConfigError(f"parallel.partition: {spec!r} is not 'balanced', 'even', a list of counts or of ranges")
    if len(spec) != n_stages:
        raise ConfigError(f"parallel.partition has {len(spec)} stages but parallel.pp is {n_stages}")
    if all(isinstance(x, int) for x in spec):
        return Partition.from_counts(spec, cfg.n_layer)  # type: ignore[arg-type]
    return Partition.from_ranges(spec, cfg.n_layer)  # type: ignore[arg-type]


def config_partition(cfg: Config, schedule: Schedule) -> Partition:
    """The partition a config resolves to under its schedule (`stage_weights` per rank, by the
    schedule's chunk→rank map)."""
    p = cfg.parallel
    weights = [p.stage_weights[schedule.rank_of(c)] for c in range(schedule.n_chunks)] if p.stage_weights else None
    return resolve_partition(p.partition, cfg.model, schedule.n_chunks, cfg.train.micro_batch_size, weights)
