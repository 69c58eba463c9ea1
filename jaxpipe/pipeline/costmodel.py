"""Predicts an iteration's time from stage compute times, message sizes, the schedule, the
data-parallel algorithm and the links, and names what bounds it.

The pipeline part is an event simulation of exactly what the executor does: every stage walks its
schedule's task list; a task starts when the stage is free and its input has arrived; each output
leaves through the stage's egress link (shared by both directions, like a NIC under netem), which
it occupies for bytes·8/R, and arrives one delay later. The last stage runs forward, loss and
backward at its FWD task and sends the input gradient then. After its last task each stage
exchanges the tied embedding's gradient (first and last stage) and averages its gradients over
the DP replicas with the algorithm's traffic pattern; then a small allreduce and the optimizer
step end the iteration.

The bound is the largest of: compute (M micro-batches on the slowest stage), the pipeline bubble
(what compute-only simulation adds to that), the link (what the real links add to compute-only
simulation) and synchronisation (tied embedding + DP + control after the pipeline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from jaxpipe.config import Config
from jaxpipe.model.layout import stage_param_counts
from jaxpipe.pipeline.partition import Partition, StageCosts, resolve_partition, stage_cost
from jaxpipe.pipeline.schedule import Phase, Schedule, make_schedule

CHUNK_BYTES = 4 * 2**20  # jaxpipe.dp.sync's chunk size for emulated chain/ring transfers


@dataclass(frozen=True)
class StageTime:
    """Seconds per micro-batch; for the last stage `fwd` + `bwd` run fused at its FWD task."""

    fwd: float
    bwd: float

    @property
    def total(self) -> float:
        return self.fwd + self.bwd


@dataclass(frozen=True)
class Link:
    delay_s: float = 0.0
    rate_bps: float = math.inf
    per_message_s: float = 0.0  # fixed cost of the real transport per message (host copies, MPI)

    def transfer_s(self, nbytes: float) -> float:
        return 0.0 if math.isinf(self.rate_bps) else nbytes * 8.0 / self.rate_bps

    @classmethod
    def of(cls, delay_ms: float, rate_gbit: float, per_message_s: float = 0.0) -> Link:
        return cls(delay_ms / 1e3, rate_gbit * 1e9 if rate_gbit > 0 else math.inf, per_message_s)


@dataclass
class PipelineSim:
    makespan: float
    stage_end: list[float]
    link_busy: list[float]  # seconds each stage's egress carried data


def simulate_pipeline(schedule: Schedule, times: list[StageTime], msg_bytes: float, link: Link) -> PipelineSim:
    P = schedule.n_stages
    if len(times) != P:
        raise ValueError(f"{len(times)} stage times for {P} stages")
    tasks = [schedule.tasks(s) for s in range(P)]
    ptr, free, egress, busy = [0] * P, [0.0] * P, [0.0] * P, [0.0] * P
    arrived: dict[tuple[int, int, Phase], float] = {}

    def send(src: int, dst: int, mb: int, kind: Phase, ready: float) -> None:
        start = max(ready, egress[src])
        tx = link.transfer_s(msg_bytes)
        egress[src] = start + tx
        busy[src] += tx
        arrived[(dst, mb, kind)] = egress[src] + link.delay_s + link.per_message_s

    remaining = sum(len(t) for t in tasks)
    while remaining:
        progressed = False
        for s in range(P):
            while ptr[s] < len(tasks[s]):
                t = tasks[s][ptr[s]]
                first, last = s == 0, s == P - 1
                need = None
                if t.phase == Phase.FWD and not first:
                    need = (s, t.microbatch, Phase.FWD)
                elif t.phase == Phase.BWD and not last:
                    need = (s, t.microbatch, Phase.BWD)
                if need is not None and need not in arrived:
                    break
                start = max(free[s], arrived.get(need, 0.0) if need else 0.0)
                if t.phase == Phase.FWD:
                    end = start + (times[s].total if last else times[s].fwd)
                    if not last:
                        send(s, s + 1, t.microbatch, Phase.FWD, end)
                    elif not first:  # The fused last stage sends the input gradient at once.
                        send(s, s - 1, t.microbatch, Phase.BWD, end)
                else:
                    end = start + (0.0 if last else times[s].bwd)
                    if not first and not last:
                        send(s, s - 1, t.microbatch, Phase.BWD, end)
                free[s] = end
                ptr[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError("schedule deadlocks: no stage can run its next task")
    ends = [max(free[s], egress[s]) for s in range(P)]
    return PipelineSim(max(ends), ends, busy)


def dp_sync_s(mode: str, dp: int, grad_bytes: float, link: Link, n_chunks: int | None = None) -> float:
    """Time to average `grad_bytes` over `dp` replicas with jaxpipe's algorithm on these links
    (`n_chunks`: how many pieces the chain moves, by default as jaxpipe.dp.sync cuts them)."""
    if dp <= 1:
        return 0.0
    if mode == "central_ps":  # Pipelined chain reduce to the server, then chain broadcast back.
        n = n_chunks or max(1, min(64, math.ceil(grad_bytes / CHUNK_BYTES)))
        chunk = grad_bytes / n
        hops = dp - 1
        one_way = hops * (link.transfer_s(chunk) + link.delay_s + link.per_message_s) + (n - 1) * link.transfer_s(chunk)
        return 2 * one_way
    # Ring reduce-scatter + all-gather (sharded PS / allreduce).
    return 2 * (dp - 1) * (link.transfer_s(grad_bytes / dp) + link.delay_s + link.per_message_s)


@dataclass
class Prediction:
    iteration_s: float
    pipeline_s: float
    compute_only_s: float
    sync_s: float  # after the pipeline: tied embedding + DP + control, on the critical stage
    components: dict[str, float] = field(default_factory=dict)
    bound: str = ""
    explanation: str = ""


def predict(
    schedule: str | Schedule,
    times: list[StageTime],
    msg_bytes: float,
    link: Link,
    *,
    n_microbatches: int | None = None,
    dp: int = 1,
    dp_mode: str = "central_ps",
    grad_bytes: list[float] | None = None,
    tied_bytes: float = 0.0,
    optimizer_s: float = 0.0,
    grad_chunks: list[int] | None = None,
) -> Prediction:
    """Iteration time of one pipeline (and its DP peers) and what bounds it."""
    P = len(times)
    if isinstance(schedule, str):
        if n_microbatches is None:
            raise ValueError("n_microbatches is needed with a schedule name")
        schedule = make_schedule(schedule, P, n_microbatches)
    M = schedule.n_microbatches
    sim = simulate_pipeline(schedule, times, msg_bytes, link)
    ideal = simulate_pipeline(schedule, times, msg_bytes, Link())
    grads = grad_bytes or [0.0] * P
    tied = (link.transfer_s(tied_bytes) + link.delay_s + link.per_message_s) if (P > 1 and tied_bytes) else 0.0
    control = 2 * max(0, (P - 1).bit_length()) * link.delay_s
    ends = []
    for s in range(P):
        start = sim.stage_end[s]
        if s in (0, P - 1) and tied:  # The exchange needs both ends of the pipeline.
            start = max(sim.stage_end[0], sim.stage_end[P - 1]) + tied
        ends.append(start + dp_sync_s(dp_mode, dp, grads[s], link, grad_chunks[s] if grad_chunks else None))
    iteration = max(ends) + control + optimizer_s
    compute = M * max(t.total for t in times)
    comps = {  # Each term is a length of time the iteration cannot be shorter than.
        "compute": compute,
        "pipeline bubble": max(0.0, ideal.makespan - compute),
        "link": max(sim.link_busy),  # the busiest egress, both directions of traffic
        "synchronisation": max(0.0, iteration - optimizer_s - sim.makespan),
    }
    bound = max(comps, key=comps.get)  # type: ignore[arg-type]
    slow = max(range(P), key=lambda s: sim.link_busy[s])
    per_phase_compute = M * max(t.fwd for t in times)
    why = {
        "compute": f"the slowest stage computes {compute:.3f} s of the {iteration:.3f} s",
        "pipeline bubble": f"filling and draining {P} stages adds {comps['pipeline bubble']:.3f} s to "
                           f"{compute:.3f} s of compute (M = {M} micro-batches)",
        "link": f"stage {slow}'s link is busy {sim.link_busy[slow]:.3f} s per iteration, more than the "
                f"{compute:.3f} s the slowest stage computes: {msg_bytes / 2**20:.1f} MiB per message at "
                f"{link.rate_bps / 1e9:.3g} Gbit/s is {link.transfer_s(msg_bytes) * 1e3:.0f} ms, and a "
                f"forward phase moves {M} of them ({M * link.transfer_s(msg_bytes):.3f} s) against "
                f"{per_phase_compute:.3f} s of forward compute",
        "synchronisation": f"after the pipeline, {comps['synchronisation']:.3f} s of gradient exchange "
                           f"(tied embedding {tied:.3f} s, DP {dp_mode} over {dp} replicas up to "
                           f"{max(dp_sync_s(dp_mode, dp, g, link) for g in grads):.3f} s)",
    }[bound]
    return Prediction(iteration, sim.makespan, ideal.makespan, iteration - sim.makespan - optimizer_s - control,
                      comps, bound, f"{bound}-bound: {why}")


# ---- The original DT-FM GPT-3 XL runs, from their facts only ----------------------------------------

ORIGINAL_SETTINGS = [  # (label, delay_ms, rate_gbit)
    ("default (~0.1 ms, 10 Gbps)", 0.1, 10.0),
    ("1 ms, 5 Gbps", 1.0, 5.0),
    ("5 ms, 2 Gbps", 5.0, 2.0),
    ("10 ms, 1 Gbps", 10.0, 1.0),
    ("50 ms, 1 Gbps", 50.0, 1.0),
]
ORIGINAL_PP_FP32 = [15.16, 15.49, 16.80, 22.90, 29.08]
ORIGINAL_PP_FP16 = [4.56, 5.32, 7.16, 12.24, 12.96]
ORIGINAL_DP4_FP32 = [16.17, 17.55, 21.99, 33.39, 37.61]
ORIGINAL_DP4_FP16 = [5.30, 6.28, 10.88, 18.21, 18.68]


def original_model(fp16: bool, dp: int) -> list[Prediction]:
    """Predicts the original's table from its facts alone: 12 stages of 2 GPT-3 XL layers, one 16 MiB
    (fp32) or 8 MiB (fp16) message per micro-batch and direction, 64 micro-batches, GPipe, central
    PS over `dp` replicas of the 164 M (stage 0) / 101 M (others) parameters' gradients in the
    message precision; per-stage compute (backward = 2 ×
    forward) is fitted to the default row of the pipeline-only column, the only measurement used."""
    P, M = 12, 64
    msg = (8 if fp16 else 16) * 2**20
    elt = 2 if fp16 else 4
    grads = [164e6 * elt] + [100.7e6 * elt] * (P - 1)
    target = (ORIGINAL_PP_FP16 if fp16 else ORIGINAL_PP_FP32)[0]
    d0, r0 = ORIGINAL_SETTINGS[0][1:]

    def total(f: float) -> float:
        return predict("gpipe", [StageTime(f, 2 * f)] * P, msg, Link.of(d0, r0), n_microbatches=M).iteration_s

    lo, hi = 0.0, target
    for _ in range(60):  # bisection: the fitted forward time per micro-batch
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < target else (lo, mid)
    f = (lo + hi) / 2
    return [
        predict("gpipe", [StageTime(f, 2 * f)] * P, msg, Link.of(d, r),
                n_microbatches=M, dp=dp, dp_mode="central_ps", grad_bytes=grads)
        for _, d, r in ORIGINAL_SETTINGS
    ]


# ---- From a jaxpipe config -------------------------------------------------------------------------

def estimated_stage_times(cfg: Config, partition: Partition, flops_per_s: float = 700e12,
                          bytes_per_s: float = 3.0e12) -> list[StageTime]:
    """Roofline estimate (see StageCosts.estimate), split 1/3 forward, 2/3 backward."""
    costs = StageCosts.estimate(cfg.model, cfg.train.micro_batch_size, flops_per_s, bytes_per_s)
    out = []
    for i, (a, b) in enumerate(partition.ranges):
        t = stage_cost(costs, b - a, i == 0, i == partition.n_stages - 1)
        out.append(StageTime(t / 3, 2 * t / 3))
    return out


def plan(cfg: Config, stage_times: list[StageTime] | None = None, link: Link | None = None,
         optimizer_s: float = 0.0, platform: str = "gpu") -> Prediction:
    """The prediction for a config: its partition, schedule, DP mode, message and gradient sizes,
    and its `network` settings unless `link` is given. `platform` resolves `model.dtype=auto`."""
    p = cfg.parallel
    partition = resolve_partition(p.partition, cfg.model, p.pp, cfg.train.micro_batch_size, p.stage_weights)
    times = stage_times or estimated_stage_times(cfg, partition)
    m = cfg.model
    elt = 2 if compute_dtype_name(cfg, platform) in ("bfloat16", "float16") else 4
    msg = cfg.train.micro_batch_size * m.seq_len * m.d_model * elt * cfg.network.size_scale
    if link is None:
        link = Link.of(cfg.network.delay_ms, cfg.network.rate_gbit)
    counts = stage_param_counts(cfg.model, partition.ranges)
    grads = [4.0 * n * cfg.network.size_scale for n in counts]
    chunks = [max(1, min(64, math.ceil(4.0 * n / CHUNK_BYTES))) for n in counts]  # cut from the real bytes
    tied_elt = 2.0 if p.tied_grad_dtype == "bfloat16" else 4.0
    tied = tied_elt * m.vocab_size * m.d_model * cfg.network.size_scale if p.pp > 1 else 0.0
    schedule = make_schedule(p.schedule, p.pp, cfg.num_microbatches, p.extra_warmup)
    return predict(schedule, times, msg, link, n_microbatches=cfg.num_microbatches, dp=p.dp,
                   dp_mode=p.dp_mode, grad_bytes=grads, tied_bytes=tied, optimizer_s=optimizer_s,
                   grad_chunks=chunks)


def compute_dtype_name(cfg: Config, platform: str = "gpu") -> str:
    """The config's compute dtype on `platform`, without touching a JAX backend (as model.compute_dtype)."""
    if cfg.model.dtype == "auto":
        return "bfloat16" if platform == "gpu" else "float32"
    return cfg.model.dtype


def format_prediction(pred: Prediction) -> str:
    parts = " | ".join(f"{k} {v:.3f} s" for k, v in pred.components.items())
    return f"predicted iteration {pred.iteration_s:.3f} s ({parts})\n{pred.explanation}"
