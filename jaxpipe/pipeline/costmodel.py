"""Predicts an iteration's time from chunk compute times, message sizes, the schedule, the
data-parallel algorithm and the links, and names what bounds it.

The pipeline part simulates the lowered schedule (`jaxpipe.pipeline.schedule.lower`) with the
same engine the validator uses (`walk`): every rank runs its actions in order; a computation
starts when the rank is free and its input has arrived and lasts its chunk's time for that
computation (`StageTime.of`); each send leaves through the sender's egress link (shared by all its
messages, like a NIC under netem, unless `links` gives a pair a link of its own), occupies it for
bytes·8/R and arrives one delay later. After its last action each rank exchanges the tied
embedding's gradient (the ranks of the first and the last chunk) and averages its gradients over
the DP replicas with the algorithm's traffic pattern; then a small allreduce and the optimizer
step end the iteration.

The bound is the largest of: compute (the busiest rank's computations), the pipeline bubble (what
compute-only simulation adds to that), the link (what the real links add to compute-only
simulation) and synchronisation (tied embedding + DP + control after the pipeline).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from jaxpipe.comm.codec import wire_nbytes
from jaxpipe.comm.message import ArraySpec, Kind
from jaxpipe.comm.netem import transfer_chunks
from jaxpipe.comm.traffic import Traffic, tied_traffic
from jaxpipe.config import Config
from jaxpipe.model.layout import stage_param_counts
from jaxpipe.pipeline.partition import Partition, StageCosts, config_partition, stage_cost
from jaxpipe.pipeline.schedule import Action, Lowered, Op, Schedule, config_schedule, lower, make_schedule, walk
from jaxpipe.registry import GRAD_CODECS


def codec_bytes(codec: str, fp32_bytes: float) -> float:
    """What `fp32_bytes` of float32 gradients become on the wire with `parallel.grad_codec` (the
    codec's own bytes per element, jaxpipe.comm.quant)."""
    return fp32_bytes / 4 * GRAD_CODECS.get(codec).bytes_per_element()


@dataclass(frozen=True)
class StageTime:
    """Seconds per micro-batch of one chunk: its forward and its full backward. The split backward's
    halves take `input_frac` and 1 - `input_frac` of the backward (for matmuls the input and the
    weight gradient cost the same)."""

    fwd: float
    bwd: float
    input_frac: float = 0.5

    @property
    def total(self) -> float:
        return self.fwd + self.bwd

    def of(self, op: Op) -> float:
        i = self.bwd * self.input_frac
        return {Op.F: self.fwd, Op.B: self.bwd, Op.I: i, Op.W: self.bwd - i, Op.L: self.fwd + self.bwd,
                Op.LI: self.fwd + i, Op.E: self.fwd, Op.EL: self.fwd}[op]


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


# Links between pipeline ranks: one for all pairs, or a function of (src rank, dst rank) returning
# the pair's link and whether it has an egress of its own (True) or shares the sender's (False).
Links = Link | Callable[[int, int], tuple[Link, bool]]


def _link_fn(links: Links) -> Callable[[int, int], tuple[Link, bool]]:
    if isinstance(links, Link):
        return lambda a, b: (links, False)
    return links


@dataclass
class PipelineSim:
    makespan: float
    stage_end: list[float]  # per rank
    link_busy: list[float]  # seconds each rank's egress carried data


def simulate_pipeline(schedule: Schedule | Lowered, times: Sequence[StageTime],
                      msg_bytes: float | Callable[[Action], float], links: Links) -> PipelineSim:
    """`times` per chunk; `msg_bytes` per message (a number, or a function of the send action).
    The lowered schedule runs through `schedule.walk`, the validator's engine; what a computation
    lasts and a message takes is looked up once per chunk and per (sender, receiver, kind)."""
    lowered = schedule if isinstance(schedule, Lowered) else lower(schedule)
    s = lowered.schedule
    if len(times) != s.n_chunks:
        raise ValueError(f"{len(times)} chunk times for {s.n_chunks} chunks")
    link_of = _link_fn(links)
    nbytes = msg_bytes if callable(msg_bytes) else (lambda a: float(msg_bytes))
    dur = [{op: t.of(op) for op in Op if not op.is_comm} for t in times]
    egress: dict[tuple[int, int | None], float] = {}
    wire: dict[tuple[int, int, Op], tuple[float, float, tuple[int, int | None]]] = {}
    busy = [0.0] * s.n_ranks

    def compute(r: int, a: Action, start: float) -> float:
        return start + dur[a.chunk][a.op]

    def send(r: int, a: Action, ready: float) -> float:
        assert a.peer is not None
        how = wire.get((r, a.peer, a.op))
        if how is None:
            link, own = link_of(r, a.peer)
            how = wire[(r, a.peer, a.op)] = (link.transfer_s(nbytes(a)), link.delay_s + link.per_message_s,
                                             (r, a.peer if own else None))
        tx, lat, key = how
        start = max(ready, egress.get(key, 0.0))
        egress[key] = start + tx
        busy[r] += tx
        return start + tx + lat

    ends = walk(lowered, compute, send)
    for (r, _), t in egress.items():
        ends[r] = max(ends[r], t)
    return PipelineSim(max(ends), ends, busy)


def rank_compute_s(lowered: Lowered, times: Sequence[StageTime]) -> list[float]:
    """Each rank's computation time per step (no waiting)."""
    return [sum(times[a.chunk].of(a.op) for a in lowered.compute(r)) for r in range(len(lowered.ranks))]


def bubble_fraction(schedule: Schedule, times: Sequence[StageTime]) -> float:
    """Idle time of the busiest rank over its compute, with free links: (P-1)/M for GPipe and 1F1B,
    (P-1)/(3M) for ZB-H1 with equal F, I and W times."""
    lowered = lower(schedule)
    compute = max(rank_compute_s(lowered, times))
    return (simulate_pipeline(lowered, times, 0.0, Link()).makespan - compute) / compute


def collective_s(op: str, dp: int, nbytes: float, link: Link, n_chunks: int | None = None) -> float:
    """One of jaxpipe.dp.collectives' operations on `nbytes` over `dp` members (the emulated patterns):
    `chain` (reduce to or broadcast from DP rank 0, pipelined in `n_chunks`), `ring_reduce_scatter`,
    `ring_allreduce`, and the direct sends `gather` (every member's `nbytes` to the root),
    `allgather` (every member's `nbytes` to every other) and `alltoall` (1/dp of `nbytes` to each)."""
    hop = link.delay_s + link.per_message_s
    if op == "chain":
        n = n_chunks or transfer_chunks(nbytes)
        chunk = nbytes / n
        return (dp - 1) * (link.transfer_s(chunk) + hop) + (n - 1) * link.transfer_s(chunk)
    if op == "ring_reduce_scatter":
        return (dp - 1) * (link.transfer_s(nbytes / dp) + hop)
    if op == "ring_allreduce":
        return 2 * (dp - 1) * (link.transfer_s(nbytes / dp) + hop)
    egress = {"gather": nbytes, "allgather": (dp - 1) * nbytes, "alltoall": (dp - 1) / dp * nbytes}[op]
    return link.transfer_s(egress) + hop


_COLLECTIVE = {"reduce": "chain", "bcast": "chain", "reduce_scatter": "ring_reduce_scatter",
               "allreduce": "ring_allreduce", "gather": "gather", "allgather": "allgather", "alltoall": "alltoall"}


def traffic_s(traffic: Traffic, link: Link, n_chunks: int | None = None) -> float:
    """One exchange of `traffic` (jaxpipe.comm.traffic: what the algorithm says it sends) over `link`
    between every pair of its members; `n_chunks`: how many pieces a chain cuts its buffer into."""
    if traffic.size < 2 and not any(t.op == "p2p" for t in traffic.transfers):
        return 0.0
    total = 0.0
    for t in traffic.transfers:
        if t.op == "p2p":
            total += link.transfer_s(t.nbytes) + link.delay_s + link.per_message_s
        elif traffic.size > 1:
            total += collective_s(_COLLECTIVE[t.op], traffic.size, t.nbytes, link, n_chunks)
    return total


def dp_traffic(mode: str, dp: int, grad_bytes: float, codec: str = "none", *, inner_steps: int = 1,
               exchange: str = "central_ps", wte_bytes: float = 0.0) -> Traffic:
    """The traffic the DP algorithm `mode` (its class in jaxpipe.registry.DP_ALGORITHMS) describes for a
    rank with `grad_bytes` of float32 parameters (`wte_bytes` of them the tied embedding's)."""
    from jaxpipe.config import ParallelConfig
    from jaxpipe.registry import DP_ALGORITHMS

    keys: dict[str, Any] = dict(dp=dp, dp_mode=mode, grad_codec=codec, diloco_inner_steps=inner_steps,
                                diloco_exchange=exchange)
    p = ParallelConfig(**keys)
    return DP_ALGORITHMS.get(mode).traffic(p, int(grad_bytes // 4), dp, int(wte_bytes // 4))


def dp_sync_s(mode: str, dp: int, grad_bytes: float, link: Link, n_chunks: int | None = None,
              codec: str = "none") -> float:
    """Time to average `grad_bytes` (float32) over `dp` replicas with jaxpipe's algorithm on these links
    (`n_chunks`: how many pieces the chain moves, by default as jaxpipe.dp.collectives cuts them;
    `codec`: parallel.grad_codec). Encoding and decoding are not counted (device work)."""
    if dp <= 1:
        return 0.0
    return traffic_s(dp_traffic(mode, dp, grad_bytes, codec), link, n_chunks)


def diloco_sync_s(exchange: str, dp: int, grad_bytes: float, link: Link, codec: str = "none",
                  wte_bytes: float = 0.0, n_chunks: int | None = None) -> float:
    """One DiLoCo outer step of a stage: the pseudo-gradients' exchange and the step back
    (`exchange`: parallel.diloco_exchange), plus, on the first stage, the step of the tied `wte`
    (`wte_bytes` of float32) sent on to the LM head's stage through the same egress."""
    if dp <= 1:
        return 0.0
    return traffic_s(dp_traffic("diloco", dp, grad_bytes, codec, exchange=exchange, wte_bytes=wte_bytes), link,
                     n_chunks)


@dataclass
class Prediction:
    iteration_s: float
    pipeline_s: float
    compute_only_s: float
    sync_s: float  # after the pipeline: tied embedding + DP + control, on the critical rank
    components: dict[str, float] = field(default_factory=dict)
    bound: str = ""
    explanation: str = ""
    bubble: float = 0.0  # idle fraction of the busiest rank with free links
    dp_s: float = 0.0  # the DP part per step (DiLoCo: one outer step over H), the slowest rank's
    dp_outer_s: float = 0.0  # DiLoCo: one outer step, the slowest rank's


def predict(
    schedule: str | Schedule,
    times: Sequence[StageTime],
    msg_bytes: float,
    link: Link,
    *,
    n_microbatches: int | None = None,
    dp: int = 1,
    dp_mode: str = "central_ps",
    grad_bytes: Sequence[float] | None = None,
    tied_bytes: float = 0.0,
    optimizer_s: float = 0.0,
    grad_chunks: Sequence[int] | None = None,
    links: Links | None = None,
    grad_codec: str = "none",
    diloco_inner_steps: int = 1,
    diloco_exchange: str = "central_ps",
    wte_bytes: float = 0.0,
    grad_msg_bytes: float | None = None,
) -> Prediction:
    """Iteration time of one pipeline (and its DP peers) and what bounds it. `times` per chunk;
    `grad_bytes` and `grad_chunks` per pipeline rank; `links` (default: `link` everywhere) for
    the pipeline's messages, `link` for the tied and DP exchanges. `msg_bytes` per activation
    message, `grad_msg_bytes` per gradient message (default: the same). With `dp_mode` diloco the
    iteration is the mean over an inner phase: one outer step per `diloco_inner_steps` (the first
    stage also sends the tied `wte`'s step, `wte_bytes` of float32, to the last)."""
    if isinstance(schedule, str):
        if n_microbatches is None:
            raise ValueError("n_microbatches is needed with a schedule name")
        schedule = make_schedule(schedule, len(times), n_microbatches)
    lowered = lower(schedule)
    P, M = schedule.n_ranks, schedule.n_microbatches
    g_msg = msg_bytes if grad_msg_bytes is None else grad_msg_bytes
    nbytes = (lambda a: g_msg if a.op == Op.SEND_GRAD else msg_bytes) if g_msg != msg_bytes else msg_bytes
    sim = simulate_pipeline(lowered, times, nbytes, links if links is not None else link)
    ideal = simulate_pipeline(lowered, times, nbytes, Link())
    grads = list(grad_bytes or [0.0] * P)
    ends_of = (schedule.rank_of(0), schedule.rank_of(schedule.n_chunks - 1))
    tied = (link.transfer_s(tied_bytes) + link.delay_s + link.per_message_s) if (
        ends_of[0] != ends_of[1] and tied_bytes) else 0.0
    control = 2 * max(0, (P - 1).bit_length()) * link.delay_s

    def dp_of(r: int) -> float:
        chunks = grad_chunks[r] if grad_chunks else None
        if dp_mode == "diloco":
            wte = wte_bytes if r == ends_of[0] and ends_of[0] != ends_of[1] else 0.0
            return diloco_sync_s(diloco_exchange, dp, grads[r], link, grad_codec, wte, chunks)
        return dp_sync_s(dp_mode, dp, grads[r], link, chunks, grad_codec)

    outer = [dp_of(r) for r in range(P)]
    per_step = [t / diloco_inner_steps for t in outer] if dp_mode == "diloco" else outer
    # Each end of the tied embedding averages its own part over DP, then the two ends sum.
    ends = [sim.stage_end[r] + per_step[r] for r in range(P)]
    if tied:
        both = max(ends[ends_of[0]], ends[ends_of[1]]) + tied
        ends[ends_of[0]] = ends[ends_of[1]] = both
    iteration = max(ends) + control + optimizer_s
    per_rank = rank_compute_s(lowered, times)
    compute = max(per_rank)
    outer_note = f", one outer step {max(outer):.3f} s every {diloco_inner_steps}" if dp_mode == "diloco" else ""
    slow = max(range(P), key=lambda r: sim.link_busy[r])
    per_phase_compute = M * max(t.fwd for t in times) * schedule.virtual_stages
    rate = link.rate_bps / 1e9
    comps, bound, why = _bound(
        schedule, compute, ideal.makespan, max(sim.link_busy), sim.makespan, iteration, optimizer_s,
        lambda: f"stage {slow}'s link is busy {sim.link_busy[slow]:.3f} s per iteration, more than the "
                f"{compute:.3f} s the slowest stage computes: {msg_bytes / 2**20:.1f} MiB per message"
                f"{f' ({g_msg / 2**20:.1f} MiB per gradient)' if g_msg != msg_bytes else ''} at "
                f"{rate:.3g} Gbit/s is {link.transfer_s(msg_bytes) * 1e3:.0f} ms, and a "
                f"forward phase moves {M * schedule.virtual_stages} of them "
                f"({M * schedule.virtual_stages * link.transfer_s(msg_bytes):.3f} s) against "
                f"{per_phase_compute:.3f} s of forward compute",
        lambda s: f"after the pipeline, {s:.3f} s of gradient exchange (tied embedding {tied:.3f} s, DP {dp_mode}"
                  f"{f' + {grad_codec}' if grad_codec != 'none' else ''} over {dp} replicas up to "
                  f"{max(per_step):.3f} s per step{outer_note})")
    return Prediction(iteration, sim.makespan, ideal.makespan, iteration - sim.makespan - optimizer_s - control,
                      comps, bound, why, (ideal.makespan - compute) / compute if compute else 0.0,
                      max(per_step), max(outer) if dp_mode == "diloco" else 0.0)


def _bound(schedule: Schedule, compute: float, ideal_s: float, link_busy: float, makespan: float, iteration: float,
           optimizer_s: float, why_link: Callable[[], str],
           why_sync: Callable[[float], str]) -> tuple[dict[str, float], str, str]:
    """The four lengths of time an iteration cannot be shorter than (the busiest rank's compute, what
    the schedule's fill and drain add with free links, the busiest egress's traffic, the exchanges
    between the pipeline's end at `makespan` and the optimizer step), the largest (the bound) and why,
    in words: the link and synchronisation reasons from the caller, who knows its links and exchanges."""
    comps = {"compute": compute, "pipeline bubble": max(0.0, ideal_s - compute), "link": link_busy,
             "synchronisation": max(0.0, iteration - optimizer_s - makespan)}
    bound = max(comps, key=lambda k: comps[k])
    if bound == "compute":
        why = f"the busiest rank computes {compute:.3f} s of the {iteration:.3f} s"
    elif bound == "pipeline bubble":
        why = (f"filling and draining {schedule.n_ranks} ranks adds {comps[bound]:.3f} s to {compute:.3f} s of "
               f"compute (M = {schedule.n_microbatches} micro-batches, {schedule.name})")
    else:
        why = why_link() if bound == "link" else why_sync(comps[bound])
    return comps, bound, f"{bound}-bound: {why}"


# ---- The original DT-FM's network settings (`jaxpipe plan --sweep`) ---------------------------------
# Its published iteration times under them, and the model of those runs, are in tools/dtfm_original.py.

ORIGINAL_SETTINGS = [  # (label, delay_ms, rate_gbit)
    ("default (~0.1 ms, 10 Gbps)", 0.1, 10.0),
    ("1 ms, 5 Gbps", 1.0, 5.0),
    ("5 ms, 2 Gbps", 5.0, 2.0),
    ("10 ms, 1 Gbps", 10.0, 1.0),
    ("50 ms, 1 Gbps", 50.0, 1.0),
]


# ---- From a jaxpipe config -------------------------------------------------------------------------

def estimated_stage_times(cfg: Config, partition: Partition, flops_per_s: float = 700e12,
                          bytes_per_s: float = 3.0e12) -> list[StageTime]:
    """Roofline estimate per chunk (see StageCosts.estimate), split 1/3 forward, 2/3 backward."""
    costs = StageCosts.estimate(cfg.model, cfg.train.micro_batch_size, flops_per_s, bytes_per_s)
    out = []
    for i, (a, b) in enumerate(partition.ranges):
        t = stage_cost(costs, b - a, i == 0, i == partition.n_stages - 1)
        out.append(StageTime(t / 3, 2 * t / 3))
    return out


@dataclass(frozen=True)
class CodecTimes:
    """Seconds per message the codecs add on the device: encoding behind the producing program,
    decoding ahead of the consuming one (measured: `tools/bench.py codec`)."""

    act_encode: float = 0.0
    act_decode: float = 0.0
    grad_encode: float = 0.0
    grad_decode: float = 0.0


def with_codec_times(times: Sequence[StageTime], codec: CodecTimes) -> list[StageTime]:
    """Chunk times with the codec work of its messages added: a chunk's forward encodes the
    activation it sends and decodes the one it receives, its backward likewise for gradients."""
    n = len(times)
    out = []
    for c, t in enumerate(times):
        fwd = t.fwd + (codec.act_encode if c < n - 1 else 0.0) + (codec.act_decode if c > 0 else 0.0)
        bwd = t.bwd + (codec.grad_encode if c > 0 else 0.0) + (codec.grad_decode if c < n - 1 else 0.0)
        out.append(StageTime(fwd, bwd, t.input_frac))
    return out


def act_spec(cfg: Config, platform: str = "gpu") -> ArraySpec:
    """One pipeline message's array: a micro-batch's activation (or its gradient)."""
    m = cfg.model
    return ArraySpec((cfg.train.micro_batch_size, m.seq_len, m.d_model), compute_dtype_name(cfg, platform))


def message_bytes(cfg: Config, platform: str = "gpu") -> tuple[int, int]:
    """(activation, gradient) wire bytes per message with the config's codecs; delta mode at its
    steady state (every sample seen: the change in `act_codec`)."""
    spec, p = act_spec(cfg, platform), cfg.parallel
    return wire_nbytes(p.act_codec, Kind.ACT, spec, cfg), wire_nbytes(p.act_grad_codec, Kind.GRAD, spec, cfg)


def estimated_codec_times(cfg: Config, platform: str = "gpu", bytes_per_s: float = 3.0e12,
                          launch_s: float = 10e-6, host_bytes_per_s: float = 20e9) -> CodecTimes:
    """Roofline estimate (memory-bound: read the message, write the wire, and back; delta mode also
    reads and rewrites its copy, and moves it between host and device) for when nothing was measured."""
    spec, p = act_spec(cfg, platform), cfg.parallel
    full = spec.nbytes

    def one(name: str, kind: Kind, delta: bool = False) -> tuple[float, float]:
        if name == "none" or (name == "bfloat16" and spec.dtype == "bfloat16"):
            return 0.0, 0.0
        wire = wire_nbytes(name, kind, spec, cfg)
        enc = launch_s + (full + wire) / bytes_per_s
        if delta:  # read the copy, write the new one; the copy goes host -> device, the new one back
            enc += 2 * full / bytes_per_s + 2 * full / host_bytes_per_s + launch_s
        return enc, enc
    a_enc, a_dec = one(p.act_codec, Kind.ACT, p.act_delta)
    g_enc, g_dec = one(p.act_grad_codec, Kind.GRAD)
    return CodecTimes(a_enc, a_dec, g_enc, g_dec)


def tied_bytes_per_end(cfg: Config) -> float:
    """The tied exchange's bytes per end and step (its traffic description, jaxpipe.comm.traffic), where
    its ends are on two ranks; `predict` charges nothing where they share one (gpipe_ring). 0 with an
    untied head (model.tie_embeddings off): there is no tied exchange at all."""
    m = cfg.model
    if not m.tie_embeddings:
        return 0.0
    return float(tied_traffic(m.vocab_size, m.d_model, cfg.parallel.tied_grad_dtype).egress(0))


def plan(cfg: Config, stage_times: Sequence[StageTime] | None = None, link: Link | None = None,
         optimizer_s: float = 0.0, platform: str = "gpu", links: Links | None = None,
         codec_times: CodecTimes | None = None) -> Prediction:
    """The prediction for a config: its schedule, partition, DP mode, message (codec wire) and
    gradient sizes, and its `network` settings unless `link` is given. `stage_times` per chunk
    (default: the roofline estimate); `platform` resolves `model.dtype=auto`; `codec_times` per
    message (default: a roofline estimate) is added to the chunks' compute."""
    p = cfg.parallel
    schedule = config_schedule(cfg)
    partition = config_partition(cfg, schedule)
    times = list(stage_times) if stage_times is not None else estimated_stage_times(cfg, partition)
    if p.pp > 1:
        times = with_codec_times(times, codec_times if codec_times is not None else
                                 estimated_codec_times(cfg, platform))
    m = cfg.model
    act, grad = message_bytes(cfg, platform)
    msg, grad_msg = act * cfg.network.size_scale, grad * cfg.network.size_scale
    if link is None:
        link = Link.of(cfg.network.delay_ms, cfg.network.rate_gbit)
    counts = stage_param_counts(m, partition.ranges)
    per_rank = [sum(counts[c] for c in schedule.chunks_of(r)) for r in range(p.pp)]
    grads = [4.0 * n * cfg.network.size_scale for n in per_rank]
    chunks = [transfer_chunks(4.0 * n) for n in per_rank]  # cut from the real bytes, not the scaled ones
    tied = tied_bytes_per_end(cfg) * cfg.network.size_scale
    return predict(schedule, times, msg, link, dp=p.replicas, dp_mode=p.dp_mode, grad_bytes=grads, tied_bytes=tied,
                   optimizer_s=optimizer_s, grad_chunks=chunks, links=links, grad_codec=p.grad_codec,
                   diloco_inner_steps=p.diloco_inner_steps, diloco_exchange=p.diloco_exchange,
                   wte_bytes=4.0 * m.vocab_size * m.d_model * cfg.network.size_scale if m.tie_embeddings else 0.0,
                   grad_msg_bytes=grad_msg)


def compute_dtype_name(cfg: Config, platform: str = "gpu") -> str:
    """The config's compute dtype on `platform`, without touching a JAX backend (as model.compute_dtype)."""
    if cfg.model.dtype == "auto":
        return "bfloat16" if platform == "gpu" else "float32"
    return cfg.model.dtype


def format_prediction(pred: Prediction) -> str:
    parts = " | ".join(f"{k} {v:.3f} s" for k, v in pred.components.items())
    dp = f"\ndata-parallel part {pred.dp_s:.3f} s per step" + (
        f" (one outer step {pred.dp_outer_s:.3f} s)" if pred.dp_outer_s else "") if pred.dp_s else ""
    return (f"predicted iteration {pred.iteration_s:.3f} s ({parts})\n{pred.explanation}\n"
            f"bubble with free links: {pred.bubble:.1%} of the busiest rank's compute{dp}")


# ---- Many replicas on a cluster: per-pair links, per-host speeds ---------------------------------------
#
# A placement puts each (pipeline rank, replica) on its own host, so every replica's pipeline runs over
# its own links at its own hosts' speeds, the tied exchange crosses each replica's own pair, and each
# stage's DP group averages over the links between its members. `predict_layout` simulates all of it; each
# `Lowered` schedule is simulated once per distinct replica (its links and speeds) by `simulate_pipeline`.

PairLink = Callable[[int, int], Link]  # (src, dst) -> the link between them, each pair its own


def chain_average_ends(grad_bytes: float, ready: Sequence[float], hop: PairLink, n_chunks: int) -> list[float]:
    """When each member of a central-PS group is done (jaxpipe.dp.collectives.Emulated's reduce_sum + bcast):
    a pipelined chain reduce n-1 -> ... -> 0 in `n_chunks` pieces, then a chain broadcast back;
    member i may start at `ready[i]`; `hop(a, b)` is the link from member a to member b. A member
    receives the pieces in order and forwards each at once (its sends do not block it, they queue on
    its link), and waits for its last send to be delivered before the next phase."""
    n = len(ready)
    if n <= 1:
        return list(ready)
    piece = grad_bytes / n_chunks
    k = np.arange(n_chunks, dtype=np.float64)
    t = [float(x) for x in ready]

    def forward(me: int, src_arrivals: np.ndarray | None, dst: int | None) -> np.ndarray | None:
        # Receives in order: the c-th piece is in hand at the running maximum of the arrivals.
        have = np.full(n_chunks, t[me]) if src_arrivals is None else np.maximum.accumulate(
            np.maximum(src_arrivals, t[me]))
        t[me] = float(have[-1])
        if dst is None:
            return None
        link = hop(me, dst)
        tx = link.transfer_s(piece)
        # free_c = tx + max(have_c, free_{c-1}) = (c+1)·tx + max_{j<=c}(have_j - j·tx)
        free = np.maximum.accumulate(have - k * tx) + (k + 1) * tx
        due = free + link.delay_s + link.per_message_s
        t[me] = max(t[me], float(due[-1]))
        return due

    arrivals = None
    for me in range(n - 1, -1, -1):  # reduce towards member 0
        arrivals = forward(me, arrivals, me - 1 if me > 0 else None)
    for me in range(n):  # broadcast back
        arrivals = forward(me, arrivals, me + 1 if me < n - 1 else None)
    return t


def ring_average_ends(grad_bytes: float, ready: Sequence[float], hop: PairLink,
                      direct_gather: bool = False) -> list[float]:
    """When each member of a ring reduce-scatter + all-gather is done (jaxpipe.dp.collectives'
    emulated allreduce): 2·(n-1) steps, in each every member sends one 1/n segment to its right
    neighbour and waits for the one from its left; each phase ends when its own sends are delivered.
    `direct_gather` (the sharded PS): after the ring reduce-scatter each member sends its averaged
    segment straight to every other member, one after the other on its own egress."""
    n = len(ready)
    if n <= 1:
        return list(ready)
    links = [hop(i, (i + 1) % n) for i in range(n)]
    tx = [link.transfer_s(grad_bytes / n) for link in links]
    lat = [link.delay_s + link.per_message_s for link in links]
    t, free = list(ready), [0.0] * n
    for phase in range(2):
        if phase == 1 and direct_gather:
            ends = list(t)
            for i in range(n):
                clock = max(t[i], free[i])
                for j in ((i + d) % n for d in range(1, n)):
                    link = hop(i, j)
                    clock += link.transfer_s(grad_bytes / n)
                    arrive = clock + link.delay_s + link.per_message_s
                    ends[j], ends[i] = max(ends[j], arrive), max(ends[i], arrive)
            return ends
        last_due = [0.0] * n
        for _step in range(n - 1):
            due = [0.0] * n
            for i in range(n):
                start = max(t[i], free[i])
                free[i] = start + tx[i]
                due[i] = last_due[i] = free[i] + lat[i]
            t = [max(t[i], due[(i - 1) % n]) for i in range(n)]
        t = [max(t[i], last_due[i]) for i in range(n)]
    return t


def dp_average_ends(mode: str, grad_bytes: float, ready: Sequence[float], hop: PairLink,
                    n_chunks: int | None = None) -> list[float]:
    """Per member, when the DP average of `mode` is done (see `dp_sync_s` for one link everywhere)."""
    if mode == "central_ps":
        n = n_chunks or transfer_chunks(grad_bytes)
        return chain_average_ends(grad_bytes, ready, hop, n)
    return ring_average_ends(grad_bytes, ready, hop, direct_gather=mode == "sharded_ps")


def exchange_s(nbytes: float, a_to_b: Link, b_to_a: Link) -> float:
    """Both ends send at once and each waits for the other's bytes and for its own to be delivered
    (the tied-embedding exchange, full duplex)."""
    return max(lnk.transfer_s(nbytes) + lnk.delay_s + lnk.per_message_s for lnk in (a_to_b, b_to_a))


@dataclass
class LayoutPrediction(Prediction):
    pipeline_per_replica: list[float] = field(default_factory=list)
    sync_per_stage: list[float] = field(default_factory=list)  # DP (and tied) end minus pipeline end, worst replica


def _pair_link(links: dict[tuple[int, int], Link], a: int, b: int) -> tuple[Link, bool]:
    return links[(a, b)], True


def predict_layout(
    schedule: Schedule | Lowered,
    grid: Sequence[Sequence[int]],
    times: Sequence[Sequence[StageTime]],
    msg_bytes: float,
    pair: PairLink,
    *,
    dp_mode: str = "central_ps",
    grad_bytes: Sequence[float] | None = None,
    grad_chunks: Sequence[int] | None = None,
    tied_bytes: float = 0.0,
    optimizer_s: float = 0.0,
    cache: dict | None = None,
    dp_every: int = 1,
    dp_overlap_steps: int = 0,
) -> LayoutPrediction:
    """The iteration of D replicas placed on hosts: `grid[s][r]` is the host (world rank) of pipeline
    rank s of replica r, `times[r]` replica r's per-chunk times (its hosts' speeds), `pair(a, b)` the
    link between hosts a and b (every pair its own); `grad_bytes`/`grad_chunks` per pipeline rank.
    Each replica's pipeline is simulated on its own links; the tied exchange runs per replica once both
    its ends are done; each stage's DP average starts per member when that member is done; then the
    gradient-norm allreduce along each pipeline (2·log2(P) of its longest delay) and the update.
    `cache` (a dict kept across calls) reuses simulations of identical replicas. `dp_every`: the DP
    exchange runs once per that many steps (DiLoCo's H): its time counts 1/dp_every per step;
    `dp_overlap_steps`: it runs behind that many steps (Streaming DiLoCo's tau), so only what exceeds
    their pipelines' time is waited for."""
    lowered = schedule if isinstance(schedule, Lowered) else lower(schedule)
    sched = lowered.schedule
    directed = sorted({(a, b) for a, b in lowered.links} | {(b, a) for a, b in lowered.links})
    P, D = sched.n_ranks, len(grid[0])
    grads = list(grad_bytes or [0.0] * P)
    ends_of = (sched.rank_of(0), sched.rank_of(sched.n_chunks - 1))
    memo = cache if cache is not None else {}
    sims, ideals, computes = [], [], []
    for r in range(D):
        hosts = tuple(grid[s][r] for s in range(P))
        links = {(a, b): pair(hosts[a], hosts[b]) for a, b in directed}
        rt = tuple(times[r])
        key = ("sim", id(lowered), msg_bytes, rt, tuple(links.items()))
        if key not in memo:
            memo[key] = simulate_pipeline(lowered, rt, msg_bytes, partial(_pair_link, links))
        if ("ideal", id(lowered), rt) not in memo:
            memo[("ideal", id(lowered), rt)] = (simulate_pipeline(lowered, rt, msg_bytes, Link()),
                                                rank_compute_s(lowered, rt))
        sims.append(memo[key])
        ideal, comp = memo[("ideal", id(lowered), rt)]
        ideals.append(ideal)
        computes.append(comp)
    done = [[sims[r].stage_end[s] for r in range(D)] for s in range(P)]
    tied = [0.0] * D
    if ends_of[0] != ends_of[1] and tied_bytes:
        for r in range(D):
            a, b = grid[ends_of[0]][r], grid[ends_of[1]][r]
            tied[r] = exchange_s(tied_bytes, pair(a, b), pair(b, a))
            at = max(done[ends_of[0]][r], done[ends_of[1]][r]) + tied[r]
            done[ends_of[0]][r] = done[ends_of[1]][r] = at
    finish = []
    for s in range(P):
        hop = lambda i, j, s=s: pair(grid[s][i], grid[s][j])  # noqa: E731
        ends = dp_average_ends(dp_mode, grads[s], done[s], hop, grad_chunks[s] if grad_chunks else None) \
            if D > 1 else done[s]
        if dp_every > 1 or dp_overlap_steps:
            hidden = dp_overlap_steps * max(sim.makespan for sim in sims)
            ends = [d + max(0.0, e - d - hidden) / dp_every for d, e in zip(done[s], ends, strict=True)]
        finish.append(ends)
    bits = max(0, (P - 1).bit_length())
    ckey = ("control", tuple(map(tuple, grid)))
    if ckey not in memo:
        memo[ckey] = max((2 * bits * max(pair(grid[s][r], grid[q][r]).delay_s for q in range(P) if q != s)
                          for s in range(P) for r in range(D)), default=0.0) if P > 1 else 0.0
    control = memo[ckey]
    last = max(max(f) for f in finish)
    iteration = last + control + optimizer_s
    compute = max(max(c) for c in computes)
    makespan = max(sim.makespan for sim in sims)
    ideal = max(i.makespan for i in ideals)
    worst = max(range(D), key=lambda r: sims[r].makespan)
    slow_dp = max(range(P), key=lambda s: max(finish[s]) - max(sims[r].stage_end[s] for r in range(D)))
    comps, bound, why = _bound(
        sched, compute, ideal, max(max(sim.link_busy) for sim in sims), makespan, iteration, optimizer_s,
        lambda: f"replica {worst}'s pipeline takes {sims[worst].makespan:.3f} s; its busiest link carries "
                f"{max(sims[worst].link_busy):.3f} s of messages",
        lambda s: f"after the pipelines, {s:.3f} s of gradient exchange (tied embedding up to {max(tied):.3f} s, "
                  f"DP {dp_mode} over {D} replicas; slowest: stage {slow_dp})")
    bubble = (ideal - compute) / compute if compute else 0.0
    return LayoutPrediction(
        iteration, makespan, ideal, iteration - makespan - optimizer_s - control, comps, bound, why,
        bubble, pipeline_per_replica=[sim.makespan for sim in sims],
        sync_per_stage=[max(finish[s]) - max(sims[r].stage_end[s] for r in range(D)) for s in range(P)])
