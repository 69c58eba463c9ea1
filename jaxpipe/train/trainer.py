"""The training loop of one rank, in three parts (nanodo's shape) and a short driver:

- `setup` builds everything the steps need (`Run`: topology, the lowered schedule and its
  executor, this rank's chunk programs, transport, tied-embedding exchange, data-parallel
  algorithm, optimizer, hooks) and the state they change (`TrainState`), checking every input on
  every rank before anything compiles;
- `do_step` is one iteration: the pipeline, the tied-embedding sum, the data-parallel algorithm,
  the pipeline-wide gradient norm, the optimizer update. Its only host waits are the ones the
  update needs (the gradient norm across stages decides clipping and the non-finite verdict); the
  loss's world sum is started during the step and read when the step is reported;
- `report` logs the step and writes its metrics;
- `train` runs set-up, the steps with their hooks (evaluation, checkpoints), and the teardown.

A step starts without waiting for the world: its only waits are the ones the update needs, and
its world sums (loss, stop verdicts, bytes) are read one step late. `runtime.step_barrier` restores
the original's timing method (tools/bench.py and tools/reproduce_seed.py set it): a global barrier,
then the timer covers the pipeline, the gradient synchronisation and the optimizer step, up to the
device having finished; data preparation is outside it. Global rank 0 (first stage of the first pipeline) reports.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from mpi4py import MPI

from jaxpipe import __version__
from jaxpipe.comm.message import Kind
from jaxpipe.comm.netem import NetworkEmulator
from jaxpipe.comm.tied import LocalTiedSum, TiedExchange, make_tied_exchange
from jaxpipe.comm.topology import Topology, read_placement
from jaxpipe.comm.transport import ThreadedTransport, make_transport
from jaxpipe.config import Config, effective_warmup, resolve_world
from jaxpipe.data.source import TokenSource, make_source, replica_sample_indices
from jaxpipe.dp.base import DataParallel, DPContext, make_collectives
from jaxpipe.dp.sync import make_data_parallel
from jaxpipe.errors import CheckpointError, NonFiniteError, Preempted, agree
from jaxpipe.model.gpt import Params, compute_dtype, model_flops_per_token
from jaxpipe.model.layout import init_stage_params, param_count
from jaxpipe.pipeline.executor import Executor, StepBatch
from jaxpipe.pipeline.memory import check_device_memory
from jaxpipe.pipeline.partition import Partition, StageSpec, config_partition
from jaxpipe.pipeline.schedule import SPLIT_BACKWARD, Lowered, Op, Schedule, check, config_schedule
from jaxpipe.pipeline.stage import StageProgram
from jaxpipe.runtime import faults
from jaxpipe.runtime.devices import assign_devices, local_mesh
from jaxpipe.runtime.hostcheck import RankDevices, check_devices, describe_hosts
from jaxpipe.runtime.preempt import PREEMPT
from jaxpipe.runtime.trace import TRACE
from jaxpipe.runtime.watchdog import ACTIVITY, start_watchdog
from jaxpipe.train.checkpoint import check_writable, load_stage, rank_item_names
from jaxpipe.train.finetune import check_init_from
from jaxpipe.train.hooks import RunHooks, find_checkpoint, rank_reads
from jaxpipe.train.observe import Observe, Observer, peak_memory, throughput
from jaxpipe.train.optimizer import LossScaler, Optimizer
from jaxpipe.train.traffic import describe_traffic, pipeline_codecs, tied_wire_bytes


@dataclass
class TrainResult:
    partition: Partition
    chunks: dict[int, StageSpec]  # this rank's chunks
    params: dict[int, Params]  # this rank's chunks, after the last step
    losses: list[float] = field(default_factory=list)  # mean over the global batch, per step
    grad_norms: list[float] = field(default_factory=list)  # global norm before clipping, per step
    iter_times: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)  # steps dropped for non-finite values
    loss_scales: list[float] = field(default_factory=list)  # the loss scale each step used (1.0: no scaling)
    updates: int = 0  # optimizer updates applied in all (checkpointed runs included): steps minus skips
    peak_memory: list[int | None] = field(default_factory=list)  # per stage (global rank 0 only)
    probe: Any = None


@dataclass
class Factories:
    """How set-up builds the parts a test may replace (the NCCL protocol played on CPU)."""

    transport: Callable[..., ThreadedTransport] = make_transport
    tied_exchange: Callable[..., TiedExchange] = make_tied_exchange
    dp_collectives: Callable[..., Any] = make_collectives  # (transport, dp comm, net, world_rank_of)


@dataclass
class Run:
    """Everything the steps need; built once by `setup`."""

    cfg: Config
    comm: Any
    topo: Topology
    schedule: Schedule
    lowered: Lowered
    partition: Partition
    programs: dict[int, StageProgram]  # this rank's chunks
    executor: Executor
    transport: ThreadedTransport
    tied: TiedExchange | None  # the exchange with the other end of the tied embedding, if on another rank
    dp: DataParallel
    optimizer: Optimizer
    scaler: LossScaler
    hooks: RunHooks
    net: NetworkEmulator | None
    source: TokenSource | None
    log: Callable[[str], None]
    metrics_file: TextIO | None = None
    tied_local: LocalTiedSum | None = None  # both ends of the tied embedding on this rank
    n_samples: int | None = None  # training samples (windows) in the data, where it has a count
    hosts: list[RankDevices] = field(default_factory=list)  # every rank's devices, as stated in set-up

    @property
    def first_chunk(self) -> bool:
        return 0 in self.programs

    @property
    def last_chunk(self) -> int:
        return self.schedule.n_chunks - 1

    @property
    def has_last_chunk(self) -> bool:
        return self.last_chunk in self.programs

    @property
    def reporter(self) -> bool:
        return self.topo.rank == 0

    def place(self, trees: dict[int, Any]) -> dict[int, Any]:
        return {c: self.programs[c].place_params(t) for c, t in trees.items()}


@dataclass
class TrainState:
    params: dict[int, Params]
    opt_state: Any
    updates: int  # applied so far: the learning-rate schedule's position


@dataclass
class StepMetrics:
    step: int  # 1-based, as logged
    loss: float
    grad_norm: float
    lr: float
    iter_time_s: float
    finite: bool
    sq_norm: float = 0.0  # the gradients' sum of squares, over the pipeline
    nonfinite_stages: list[int] = field(default_factory=list)
    dp_bytes: int = 0  # bytes on data-parallel links this step, summed over all ranks
    dp_s: float = 0.0  # the data-parallel part of the step (sync + outer step), on the slowest rank
    nonfinite_replicas: int = 0  # pipelines whose step was not finite (all or none unless DiLoCo)
    loss_scale: float = 1.0  # the scale this step's loss was multiplied by
    scale_after: float = 1.0  # the loss scale after this step's update (its report may come a step later)
    preempted: bool = False  # some rank had a SIGTERM/SIGINT when the step's loss sum started: all stop now
    pipe_bytes: int = 0  # activations and their gradients put on links this step, all ranks
    tied_bytes: int = 0  # the tied-embedding exchange's, all ranks


# ---- set-up -------------------------------------------------------------------------------------------


def _bcast_tree(tree: Params, comm: Any, root: int) -> Params:
    """Sends `root`'s values of `tree` to every member of `comm`, as one message."""
    flat, unravel = ravel_pytree(tree)
    buf = np.array(flat)
    comm.Bcast(buf, root=root)
    return unravel(jnp.asarray(buf))


def init_params(cfg: Config, topo: Topology, partition: Partition, programs: dict[int, StageProgram],
                last_chunk: int, init_from: Path | None = None) -> dict[int, Params]:
    """DP rank 0 of each stage initialises (or, fine-tuning, reads `init_from`'s weights); the other
    replicas receive its values (not a shared seed: replicas must start identical even where random
    number generation differs by host). The last chunk's copy of the tied `wte` starts as the first chunk's."""
    params = {}
    if faults.ARMED:
        faults.at_setup()
    for c, program in programs.items():
        spec = partition.stage(c)
        shapes = program.param_shapes()
        if topo.dp_comm.Get_rank() == 0 and init_from:
            p = load_stage(init_from, cfg.model, spec, shapes)
        elif topo.dp_comm.Get_rank() == 0:
            p = init_stage_params(cfg.model, cfg.train.seed, spec.layers, spec.first, spec.last)
        else:
            p = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        if jax.tree.structure(p) != jax.tree.structure(shapes):  # type: ignore[operator]  # jaxlib's stub
            raise AssertionError("chunk parameter layout does not match the StageModel's")
        with ACTIVITY.waiting("set-up (the parameter broadcast to the replicas)", long=True):
            params[c] = _bcast_tree(p, topo.dp_comm, root=0)
    if last_chunk > 0 and cfg.model.tie_embeddings:
        if 0 in params and last_chunk in params:
            params[last_chunk]["wte"] = jnp.copy(params[0]["wte"])  # its own buffer: updates donate each copy
        elif topo.tied is not None:
            mine = params[0]["wte"] if 0 in params else params[last_chunk]["wte"]
            with ACTIVITY.waiting("set-up (the broadcast of the tied embedding)", long=True):
                wte = _bcast_tree(mine, topo.tied, root=0)
            params[0 if 0 in params else last_chunk]["wte"] = wte
    return {c: programs[c].place_params(p) for c, p in params.items()}


def describe(run: Run) -> str:
    cfg, topo = run.cfg, run.topo
    m, p = cfg.model, cfg.parallel
    counts = run.partition.counts
    layers = (f"layers per stage {counts}" if p.virtual_stages == 1 else
              f"layers per chunk {counts} ({p.virtual_stages} chunks per rank)")
    return (
        f"jaxpipe {__version__}: {topo.world.Get_size()} ranks = PP {p.pp} x DP {p.dp} | schedule {p.schedule}"
        f"{f' +{p.extra_warmup} warm-up' if p.extra_warmup else ''} | "
        f"dp {run.dp.describe()} | {layers} | model {m.preset} "
        f"({param_count(m) / 1e6:.1f}M params, {jnp.dtype(compute_dtype(m)).name}) | batch "
        f"{cfg.train.global_batch_size} = {p.dp} x {cfg.num_microbatches} x {cfg.train.micro_batch_size} | "
        f"{describe_hosts(run.hosts, cfg.runtime.devices_per_process)} | transport {run.transport.name} | "
        f"{run.net.describe() if run.net is not None else 'network emulation off'}"
        + (f" | placement {p.placement}" if p.placement else "") + " | "
        + describe_traffic(cfg, run.lowered, run.executor.spec, run.n_samples,
                           2 * tied_wire_bytes(cfg) if run.tied is not None else 0)
        + _warmup_note(cfg)
    )


def _warmup_note(cfg: Config) -> str:
    """A run shorter than its warm-up trains with the warm-up clipped: the first line says so."""
    t = cfg.train
    w = effective_warmup(t)
    return f" | warm-up clipped from {t.warmup_steps} to {w} (train.steps={t.steps})" if w != t.warmup_steps else ""


def _agreed(comm: Any, what: str, check: Callable[[], Any]) -> Any:
    """`agree` under the set-up deadline (runtime.first_step_timeout_s): a rank that never arrives
    ends the job with a message naming `what`, instead of a hang."""
    with ACTIVITY.waiting(f"set-up ({what})", long=True):
        return agree(comm, check)


def setup(cfg: Config, comm: Any, log: Callable[[str], None], resume: str | None = None,
          factories: Factories | None = None) -> tuple[Run, TrainState, int]:
    """Everything a run needs, and its state at `start_step` (0, or after the resumed step).
    Collective over `comm`; bad input raises the same ConfigError on every rank before any compile.
    Every collective of the set-up runs under the watchdog's deadline."""
    f = factories or Factories()
    p = cfg.parallel
    schedule = config_schedule(cfg)
    last = schedule.n_chunks - 1
    ACTIVITY.configure(comm.Get_rank(), None, p.pp, 0, cfg.runtime.comm_timeout_s, cfg.runtime.first_step_timeout_s)
    start_watchdog()
    # parallel.placement: which rank runs which (stage, replica), checked on every rank together.
    layout = _agreed(comm, "the placement file", lambda: read_placement(p.placement or "", p.pp, p.replicas)) \
        if p.placement else None
    with ACTIVITY.waiting("set-up (splitting the communicators)", long=True):
        # An untied head (model.tie_embeddings off) has no tied pair: no exchange at all.
        ends = (schedule.rank_of(0), schedule.rank_of(last if cfg.model.tie_embeddings else 0))
        topo = Topology.create(comm, p.pp, p.replicas, tied_stages=ends, layout=layout)
    ACTIVITY.locate(topo.stage, topo.replica)
    _agreed(comm, "loading the fault injection", lambda: faults.load(topo.rank, topo.stage, topo.replica))
    k = cfg.runtime.devices_per_process
    placed = _agreed(comm, "the device assignment", lambda: assign_devices(comm, k))  # Before JAX touches a device.
    # Every rank states its host, platform and GPUs; a rank without its GPU is refused here, everywhere.
    hosts = _agreed(comm, "the device check", lambda: check_devices(comm, k, placed))
    mesh = _agreed(comm, "the local device mesh", lambda: local_mesh(k)) if k > 1 else None
    partition = _agreed(comm, "the partition", lambda: config_partition(cfg, schedule))
    if any(h.platform == "gpu" for h in hosts):  # Each stage's predicted peak memory against its devices'.
        mem = [[hosts[topo.world_rank_of(s, r)].memory_bytes for r in range(p.replicas)] for s in range(p.pp)]
        _agreed(comm, "the memory check", lambda: check_device_memory(cfg, mem, log if topo.rank == 0 else None))
    chunks = schedule.chunks_of(topo.stage)
    needs_data = 0 in chunks or last in chunks
    # Every rank opens the data (a missing file fails the whole job here, before any compile).
    source = _agreed(comm, "opening the data", lambda: make_source(cfg.data, cfg.model))
    # A checkpoint of another model, batch size or (DiLoCo) layout fails here, before anything compiles;
    # a damaged one is refused (or, with --resume auto, skipped for the previous one).
    with ACTIVITY.waiting("set-up (the checkpoint checks: checksums of each rank's items)", long=True):
        reads = rank_reads(cfg, topo.stage, topo.replica, {c: partition.stage(c) for c in chunks})
        resume_from = find_checkpoint(cfg, resume, comm, reads, log if comm.Get_rank() == 0 else None,
                                      [list(r) for r in partition.ranges])
    # train.init_from (fine-tuning): the items this rank reads are checked on every rank, before anything compiles.
    init_from = None
    if (src := cfg.train.init_from) and resume_from is None:
        names = rank_item_names({c: partition.stage(c) for c in chunks})
        init_from = _agreed(comm, "the train.init_from checkpoint", lambda: check_init_from(src, names))
    # A checkpoint directory this job cannot write fails here, on every rank, not at the first save.
    if (ckpt_dir := cfg.train.checkpoint_dir) and cfg.train.checkpoint_every:
        _agreed(comm, "the checkpoint directory check", lambda: check_writable(ckpt_dir, "train.checkpoint_dir"))
    # Emulated links are keyed by world rank (network.matrix: a cluster file, checked on every rank).
    net = _agreed(comm, "the network emulation", lambda: NetworkEmulator.from_config(cfg.network, topo.rank,
                                                                                      comm.Get_size()))

    lowered = schedule.lowered()
    check(lowered)
    programs = {c: StageProgram(cfg.stage_model(topo.stage), partition.stage(c), cfg.train.micro_batch_size, mesh,
                                split=schedule.uses(c, SPLIT_BACKWARD)) for c in chunks}
    # train.init_from (fine-tuning): its weights, unless resuming (the resumed checkpoint has newer ones).
    params = init_params(cfg, topo, partition, programs, last, init_from)
    optimizer = Optimizer(cfg.train)
    opt_state = programs[chunks[0]].place_params(optimizer.init(params))  # committed, as the update returns it
    place_trees = lambda trees: {c: programs[c].place_params(t) for c, t in trees.items()}  # noqa: E731
    dp_rank_of = lambda i: topo.world_rank_of(topo.stage, i)  # noqa: E731
    tied_peer = topo.world_rank_of(topo.tied_stages[1] if 0 in chunks else topo.tied_stages[0])
    dp = make_data_parallel(DPContext(
        topo.dp_comm, net, dp_rank_of, p, place_trees,
        collectives=lambda: f.dp_collectives(p.transport, topo.dp_comm, net, dp_rank_of),
        # An untied head (model.tie_embeddings off) has no `wte` copy: no tied pair for the DP algorithm.
        stage=topo.stage, n_stages=p.pp, steps=cfg.train.steps, last_chunk=last,
        tied=topo.tied if cfg.model.tie_embeddings else None,
        tied_first=0 in chunks, tied_peer=tied_peer, chunk_layers={c: partition.stage(c) for c in chunks}))
    # -- compressed pipeline traffic: this rank's codecs (jaxpipe.train.traffic), checked before compiling.
    act_spec, place = programs[chunks[0]].act_spec, programs[chunks[0]].place_input
    codecs, codec_state = pipeline_codecs(cfg, topo, schedule, partition, source, act_spec, place)

    def make_checked_transport() -> ThreadedTransport:
        t = f.transport(p.transport, topo.pipe, topo.stage, topo.world_rank_of, place, single_device=mesh is None,
                        net=net, codecs=codecs, links=lowered.links)
        t.check_codecs(act_spec)
        return t

    transport = _agreed(comm, f"the {p.transport} transport", make_checked_transport)
    ACTIVITY.attach(transport)
    tied = None
    what = f"the tied-embedding exchange over {p.transport}"
    if topo.tied is not None:  # Every rank takes part in `agree` (it is collective); only the pair builds.
        peer = topo.world_rank_of(topo.tied_stages[1] if 0 in chunks else topo.tied_stages[0])
        tied = _agreed(comm, what, lambda: f.tied_exchange(p.transport, topo.tied, 0 in chunks, peer, net,
                                                           p.tied_grad_dtype, replica=topo.replica))
    else:
        _agreed(comm, what, lambda: None)
    tied_local = LocalTiedSum(p.tied_grad_dtype, topo.replica) if (
        0 in chunks and last in chunks and last and cfg.model.tie_embeddings) else None
    stateful = [*codec_state, *(tied.stateful() if tied else []), *(tied_local.stateful() if tied_local else [])]
    run = Run(cfg=cfg, comm=comm, topo=topo, schedule=schedule, lowered=lowered, partition=partition,
              programs=programs, executor=Executor(lowered, topo.stage, programs, transport, p.recv_lookahead),
              transport=transport, tied=tied, dp=dp, optimizer=optimizer,
              scaler=LossScaler(cfg.train, compute_dtype(cfg.model)), hooks=None,  # type: ignore[arg-type]
              net=net, source=source if needs_data else None, log=log, tied_local=tied_local,
              n_samples=getattr(source, "n_samples", None), hosts=hosts)
    # Resume (a checkpoint path, or "auto"), evaluation and checkpoints: see jaxpipe.train.hooks.
    run.hooks = RunHooks(cfg, topo, schedule, partition, programs, transport, dp, log, run.scaler, stateful)
    params, opt_state, start_step = run.hooks.restore(params, opt_state, resume, resume_from)
    dp.setup(params)
    # The learning-rate schedule is at the count of applied updates, not at the step: a skipped step
    # moves the data on but not the schedule.
    return run, TrainState(params, opt_state, optimizer.applied_updates(opt_state)), start_step


# ---- one step ------------------------------------------------------------------------------------------


def step_batch(run: Run, step: int) -> StepBatch:
    cfg = run.cfg
    if run.source is None:
        return StepBatch()
    samples = run.source.samples(replica_sample_indices(cfg, step, run.topo.replica).reshape(-1))
    samples = samples.reshape(cfg.num_microbatches, cfg.train.micro_batch_size, -1)
    place = next(iter(run.programs.values())).place_input
    inputs = [place(s[:, :-1]) for s in samples] if run.first_chunk else None
    targets = [place(s[:, 1:]) for s in samples] if run.has_last_chunk else None
    return StepBatch(inputs.__getitem__ if inputs else None, targets.__getitem__ if targets else None)


def sum_tied(run: Run, grads: dict[int, Params]) -> dict[int, Params]:
    """Both copies of `wte` get the sum of the two gradients (bit-identical on both ends)."""
    last = run.last_chunk
    if last == 0 or not run.cfg.model.tie_embeddings:
        return grads
    if run.tied_local is not None:  # Both ends on this rank (V shape).
        g = run.tied_local(grads[0]["wte"], grads[last]["wte"])
        # Two buffers: the update donates each copy's gradient (and each copy's parameters) separately.
        return {**grads, 0: {**grads[0], "wte": g}, last: {**grads[last], "wte": jnp.copy(g)}}
    if run.tied is None:
        return grads
    c = 0 if run.first_chunk else last
    return {**grads, c: {**grads[c], "wte": run.tied(grads[c]["wte"])}}


def do_step(run: Run, state: TrainState, step: int, batch: StepBatch) -> tuple[TrainState, StepMetrics, Any]:
    """One iteration (`step` 0-based); returns the new state, the step's metrics (the loss still
    to be read from the returned request, see `finish_loss`) and that request."""
    topo, p = run.topo, run.cfg.parallel
    if run.cfg.runtime.step_barrier:  # The original's timing method (tools/bench.py, tools/reproduce_seed.py).
        # Waits for every rank's previous step: the first two include compilation.
        TRACE.phase("barrier")
        with ACTIVITY.waiting("the barrier that starts the step", long=step <= run.hooks.start_step + 1):
            run.comm.Barrier()
    TRACE.phase("pipeline")
    t0 = time.perf_counter()
    grads = {c: prog.zero_grads(state.params[c]) for c, prog in run.programs.items()}
    run.transport.take_bytes()  # (an evaluation's traffic is not this step's)
    result = run.executor.run(step, state.params, grads, batch, loss_scale=run.scaler.scale)
    grads = run.scaler.unscale(result.grads)  # From here on, gradients of the loss itself (float16: see LossScaler).
    pipe_bytes = run.transport.take_bytes()
    if faults.ARMED:
        grads = faults.poison(step + 1, grads)
        faults.at_sync(step + 1)
    # Each end of the tied embedding averages its own part of the `wte` gradient over DP before the
    # two are summed: a codec quantises by position in the stage's buffer, where `wte` differs, so
    # averaging the summed gradient at both ends could leave the copies apart.
    dp_s = 0.0
    with ACTIVITY.waiting(f"the data-parallel gradient sync ({p.dp_mode})"):
        if run.dp.syncs_every_step or TRACE.enabled:
            jax.block_until_ready(grads)  # The DP part starts when the gradients are there.
        TRACE.phase("data-parallel sync")
        t_dp = time.perf_counter()
        grads = run.dp.sync_gradients(step, grads)
        dp_s += time.perf_counter() - t_dp
    with ACTIVITY.waiting("the tied-embedding gradient sum"):
        TRACE.phase("tied embedding sum")
        grads = sum_tied(run, grads)
    TRACE.phase("gradient norm")
    # Every stage's gradient sum of squares and the loss go to the whole pipeline. With a DP algorithm
    # that averages every step the gradients, hence the norm, are equal on all replicas, so every rank
    # of the job decides the same about a non-finite step (a non-finite loss makes the gradients so).
    skip_tied = run.last_chunk > 0 and run.cfg.model.tie_embeddings
    sq = sum(float(prog.sq_norm(grads[c], skip_tied and c == run.last_chunk)) for c, prog in run.programs.items())
    loss = result.mean_loss
    local = np.array([sq, float(loss) if loss is not None else 0.0])
    TRACE.phase("norm exchange")
    with ACTIVITY.waiting("the exchange of gradient norms along the pipeline"):
        parts = np.array(topo.pipe.allgather(local))  # [stage, (sq norm, loss)]
    if run.net is not None:  # A small allreduce over emulated links: ~2·log2(P) one-way delays.
        time.sleep(run.net.collective_latency(p.pp, [topo.world_rank_of(s) for s in range(p.pp)]))
    sq_total, pipe_loss = (float(v) for v in parts.sum(axis=0))
    finite = math.isfinite(sq_total) and math.isfinite(pipe_loss)
    norm = math.sqrt(sq_total) if finite else float("nan")
    lr = float(run.optimizer.schedule(state.updates))
    params, opt_state, updates = state.params, state.opt_state, state.updates
    ACTIVITY.doing = "the optimizer update"
    TRACE.phase("optimizer update")
    if finite:
        params, opt_state = run.optimizer.update(params, opt_state, grads, jnp.float32(norm))
        updates += 1
    with ACTIVITY.waiting(f"the data-parallel step after the update ({run.dp.describe()})"):
        if not run.dp.syncs_every_step:
            jax.block_until_ready(params)  # The outer step's time starts after the update's.
        t_dp = time.perf_counter()
        params, opt_state = run.dp.after_update(step, params, opt_state, finite)
        dp_s += time.perf_counter() - t_dp
    # The world sums (the pipelines' losses, non-finite pipelines, bytes on DP, pipeline and tied links)
    # and the slowest rank's DP time are for reporting and the stop verdict only: nothing waits for them
    # here. They carry the
    # ranks' preemption flags too (jaxpipe.runtime.preempt): every rank learns of a signal at one step.
    tied_bytes = run.tied.take_bytes() if run.tied is not None else 0
    send = np.array([pipe_loss if topo.stage == p.pp - 1 else 0.0, float(not finite and topo.stage == 0),
                     float(run.dp.wire_bytes()), float(PREEMPT.requested), float(pipe_bytes), float(tied_bytes)])
    buf, send_s, buf_s = np.zeros(6), np.array([dp_s]), np.zeros(1)
    loss_req = run.comm.Iallreduce(send, buf, op=MPI.SUM)
    dp_req = run.comm.Iallreduce(send_s, buf_s, op=MPI.MAX)
    jax.block_until_ready(params)
    dt = time.perf_counter() - t0
    TRACE.phase(None)
    scale = run.scaler.scale
    run.scaler.update(finite)
    bad = [s for s in range(p.pp) if not np.isfinite(parts[s]).all()]
    metrics = StepMetrics(step + 1, float("nan"), norm, lr, dt, finite, sq_total, bad, loss_scale=scale,
                          scale_after=run.scaler.scale)
    return TrainState(params, opt_state, updates), metrics, (loss_req, buf, send, dp_req, buf_s, send_s)


def finish_loss(run: Run, metrics: StepMetrics, pending: Any) -> StepMetrics:
    """Completes the step's loss sum (started in `do_step`): the mean over the global batch."""
    req, buf, _send, dp_req, buf_s, _send_s = pending
    TRACE.phase("loss sum")
    with ACTIVITY.waiting("the allreduce of the loss"):
        req.Wait()
        dp_req.Wait()
    TRACE.phase(None)
    metrics.loss = float(buf[0]) / run.cfg.parallel.replicas  # Each pipeline's loss lives on its last stage.
    metrics.nonfinite_replicas, metrics.dp_bytes, metrics.dp_s = int(buf[1]), int(buf[2]), float(buf_s[0])
    metrics.preempted = bool(buf[3] > 0)
    metrics.pipe_bytes, metrics.tied_bytes = int(buf[4]), int(buf[5])
    return metrics


def check_finite(run: Run, m: StepMetrics) -> str | None:
    """None for a step this pipeline applied; else what was not finite, or NonFiniteError when the run
    must stop. Each pipeline decides on its own numbers (the same on all of them when DP syncs every
    step); a stop is for every rank as soon as any pipeline was not finite (DiLoCo's replicas differ)."""
    if m.finite and not m.nonfinite_replicas:
        return None
    where = f"stage{'s' * (len(m.nonfinite_stages) > 1)} {', '.join(map(str, m.nonfinite_stages))}" \
        if m.nonfinite_stages else "another replica"
    what = f"non-finite loss or gradients (loss {m.loss:.4g}, gradient norm² {m.sq_norm:.4g}; not finite on {where})"
    if not run.scaler.dynamic and run.cfg.train.on_nonfinite == "stop":
        raise NonFiniteError(
            f"step {m.step}: {what}; train.on_nonfinite=stop ends the run: lower train.lr or raise "
            f"train.warmup_steps, check the data, resume from the last checkpoint, or set "
            f"train.on_nonfinite=skip to drop such steps")
    return what if not m.finite else None


# ---- reporting -----------------------------------------------------------------------------------------


def report(run: Run, m: StepMetrics, skipped: str | None) -> None:
    cfg = run.cfg
    tokens = cfg.train.global_batch_size * cfg.model.seq_len
    if run.reporter and skipped is not None:
        run.log(f"step {m.step:>5} | skipped: {skipped}; no update on "
                + ("any rank" if run.dp.syncs_every_step else "this replica's ranks (DiLoCo: each replica decides)")
                + (f" (loss scale now {m.scale_after:g})" if run.scaler.dynamic else ""))
    if run.reporter and ((m.step - 1) % cfg.train.log_every == 0 or m.step == cfg.train.steps):
        run.log(f"step {m.step:>5} | loss {m.loss:.4f} | {m.iter_time_s:.3f} s | {tokens / m.iter_time_s:,.0f} tok/s"
                f"{_throughput_text(run, m)} | grad norm {m.grad_norm:.3f} | lr {m.lr:.2e}")
    if run.metrics_file is not None:
        row = {"step": m.step, "loss": m.loss, "iter_time_s": m.iter_time_s, "tokens_per_s": tokens / m.iter_time_s,
               "grad_norm": m.grad_norm, "lr": m.lr, "dp_bytes": m.dp_bytes, "dp_s": m.dp_s,
               "pipe_bytes": m.pipe_bytes, "tied_bytes": m.tied_bytes}
        if run.scaler.dynamic:  # float16: the scale the step used, and whether it was skipped
            row |= {"loss_scale": m.loss_scale, "skipped": skipped is not None}
        run.metrics_file.write(json.dumps(row) + "\n")
        run.metrics_file.flush()


def _throughput(run: Run, m: StepMetrics) -> Any:
    cfg = run.cfg
    devices = next(iter(run.programs.values())).devices
    return throughput(model_flops_per_token(cfg.model), cfg.train.global_batch_size * cfg.model.seq_len,
                      m.iter_time_s, run.topo.world.Get_size() * cfg.runtime.devices_per_process,
                      devices[0].device_kind)


def _throughput_text(run: Run, m: StepMetrics) -> str:
    """Model TFLOP/s per device (and MFU where the device's peak is known); this rank's peak memory."""
    t = _throughput(run, m)
    mfu = f" (MFU {t.mfu:.1%})" if t.mfu is not None else ""
    peak = peak_memory(next(iter(run.programs.values())).devices)
    mem = f" | mem {peak / 2**30:.2f} GiB" if peak is not None else ""
    return f" | {t.tflops_per_device:.3g} TFLOP/s/device{mfu}{mem}"


def report_end(run: Run, result: TrainResult) -> None:
    with ACTIVITY.waiting("the end-of-run gather"):
        peaks = run.comm.gather(peak_memory(next(iter(run.programs.values())).devices), root=0)
    if run.reporter and result.iter_times:
        p = run.cfg.parallel
        result.peak_memory = [peaks[run.topo.world_rank_of(s, 0)] for s in range(p.pp)]
        steady = result.iter_times[1:] or result.iter_times
        mem = " ".join(f"{x / 2**30:.2f}" if x is not None else "n/a" for x in result.peak_memory)
        what = "peak memory per stage (GiB, process RSS)" if jax.default_backend() == "cpu" else \
            "peak device memory per stage (GiB)"
        run.log(f"done: {run.cfg.train.steps} steps, mean iteration {np.mean(steady):.3f} s (first step excluded), "
                f"final loss {result.losses[-1]:.4f}, {what}: {mem}")


# ---- observing: trace, TensorBoard, the progress line (jaxpipe.train.observe) ----------------------------


def start_observing(run: Run, state: TrainState, start_step: int, observe: Observe) -> Observer:
    """Collective when tracing (the clocks are synchronised). The progress line takes over the log."""
    cfg, topo = run.cfg, run.topo
    observer = Observer(observe, cfg.train.steps, start_step, run.reporter, run.log)
    run.log = run.hooks.log = observer.log
    program = next(iter(run.programs.values()))
    meta = {"stage": topo.stage, "replica": topo.replica, "world": topo.world.Get_size(), "pp": cfg.parallel.pp,
            "dp": cfg.parallel.dp, "chunks": sorted(run.programs), "schedule": run.schedule.describe(),
            "n_microbatches": cfg.num_microbatches, "platform": jax.default_backend(),
            "device_kind": program.devices[0].device_kind, "config": cfg.to_dict(),
            "partition": [list(r) for r in run.partition.ranges]}
    observer.pipeline_bytes = pipeline_bytes(run)
    observer.arm_trace(topo.world, meta, cfg.train.steps,
                       [prog.zero_grads(state.params[c]) for c, prog in run.programs.items()])
    return observer


def observe_step(run: Run, observer: Observer, m: StepMetrics) -> None:
    """Once a step's world sums are read: TensorBoard and the progress line get it."""
    if not run.reporter:
        return
    cfg = run.cfg
    tokens_per_s = cfg.train.global_batch_size * cfg.model.seq_len / m.iter_time_s
    t = _throughput(run, m)
    observer.step_done(m.step, m.loss, tokens_per_s, {
        "train/loss": m.loss, "train/lr": m.lr, "train/grad_norm": m.grad_norm, "perf/tokens_per_s": tokens_per_s,
        "perf/iter_time_s": m.iter_time_s, "perf/tflops_per_device": t.tflops_per_device, "perf/mfu": t.mfu,
        "comm/pipeline_bytes": float(observer.pipeline_bytes), "comm/dp_bytes": float(m.dp_bytes)})
    if m.step in run.hooks.val_losses:
        loss = run.hooks.val_losses[m.step]
        observer.evaluated(m.step, loss, math.exp(min(loss, 700.0)))


def _conclude_step(run: Run, result: TrainResult, observer: Observer, metrics: StepMetrics, pending: Any) -> bool:
    """Reads a step's world sums, checks, reports and records it; True when a rank was preempted."""
    metrics = finish_loss(run, metrics, pending)
    skipped = check_finite(run, metrics)
    if skipped is not None:
        result.skipped_steps.append(metrics.step - 1)
    report(run, metrics, skipped)
    result.losses.append(metrics.loss)
    result.loss_scales.append(metrics.loss_scale)
    result.grad_norms.append(metrics.grad_norm)
    result.iter_times.append(metrics.iter_time_s)
    observe_step(run, observer, metrics)
    return metrics.preempted


def pipeline_bytes(run: Run) -> int:
    """Bytes the pipelines' messages carry per step, all replicas together (as encoded on the wire)."""
    sends = [a for actions in run.lowered.ranks for a in actions if a.op in (Op.SEND_ACT, Op.SEND_GRAD)]
    spec = next(iter(run.programs.values())).act_spec
    codecs = getattr(run.transport, "codecs", {})
    total = 0
    for a in sends:
        kind = Kind.ACT if a.op == Op.SEND_ACT else Kind.GRAD
        total += codecs[kind].wire_spec(spec).nbytes if kind in codecs else spec.nbytes
    return total * run.cfg.parallel.replicas


# ---- the driver ---------------------------------------------------------------------------------------


def train(
    cfg: Config,
    comm: Any = None,
    metrics_out: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    probe: Callable[[Run, TrainState], Any] | None = None,
    resume: str | None = None,
    factories: Factories | None = None,
    observe: Observe | None = None,
) -> TrainResult:
    """Trains per `cfg` on this rank's chunks. `probe`, if given, runs once after set-up and before
    the first step (benchmarks use it to time a stage alone); its result is `TrainResult.probe`.
    `observe`: trace, TensorBoard and the progress line (see jaxpipe.train.observe; off by default).

    `parallel.dp=auto` takes the replicas the launched ranks allow. A SIGTERM/SIGINT on any rank ends
    the run after the current step with a checkpoint: Preempted (see jaxpipe.runtime.preempt)."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    cfg = agree(comm, lambda: resolve_world(cfg, comm.Get_size()))
    with PREEMPT.installed(cfg.runtime.preempt_grace_s, saves=bool(cfg.train.checkpoint_dir)):
        return _train(cfg, comm, metrics_out, log, probe, resume, factories, observe)


def _train(cfg: Config, comm: Any, metrics_out: str | Path | None, log: Callable[[str], None] | None,
           probe: Callable[[Run, TrainState], Any] | None, resume: str | None,
           factories: Factories | None, observe: Observe | None) -> TrainResult:
    run, state, start_step = setup(cfg, comm, log or (lambda s: print(s, flush=True)), resume, factories)
    result = TrainResult(partition=run.partition, chunks={c: run.partition.stage(c) for c in run.programs},
                         params=state.params, updates=state.updates)
    observer = start_observing(run, state, start_step, observe or Observe(progress="off"))
    if run.reporter:
        run.log(describe(run))
        if metrics_out:
            run.metrics_file = open(metrics_out, "w")  # noqa: SIM115 - closed in the finally below
    if probe is not None:
        result.probe = probe(run, state)
    healthy = True
    late: list[tuple[StepMetrics, Any]] = []  # steps whose world sums are still to be read
    try:
        for step in range(start_step, cfg.train.steps):
            warm = result.iter_times[1:]  # The first step's time is mostly compilation.
            ACTIVITY.begin_step(step + 1, first=step == start_step, last_step_s=warm[-1] if warm else 0.0)
            batch = step_batch(run, step)
            if TRACE.armed:
                TRACE.begin_step(step)
            state, metrics, pending = do_step(run, state, step, batch)
            # Without the step barrier a step's world sums (loss, stop verdicts) are read after the next
            # step has run, so no rank waits for the whole world between steps; every rank reads them at
            # the same step, so all learn of a preemption or a non-finite stop together. A step with an
            # evaluation or a checkpoint (collective anyway), the last and every step under the barrier
            # are read at once, so the log keeps its order.
            late.append((metrics, pending))
            now = cfg.runtime.step_barrier or step + 1 == cfg.train.steps or run.hooks.acts_after(step + 1)
            preempted = False
            while len(late) > (0 if now else 1):
                preempted |= _conclude_step(run, result, observer, *late.pop(0))
            run.hooks.after_step(step + 1, state.params, state.opt_state, run.metrics_file)
            if TRACE.enabled:  # This step's span ends here, whenever its world sums are read.
                TRACE.end_step(metrics.iter_time_s)
            if preempted and step + 1 < cfg.train.steps:
                run.hooks.stop_preempted(step + 1, state.params, state.opt_state)
    except BaseException as e:
        # The job is about to be aborted: joining a receiver thread blocked on a dead peer would only
        # delay that. A non-finite stop, a failed save and a preemption happen on every rank at once,
        # at a step boundary, with no message in flight.
        healthy = isinstance(e, NonFiniteError | CheckpointError | Preempted)
        raise
    finally:
        if healthy:
            run.transport.close()
            if run.tied is not None:
                run.tied.close()
        if healthy:
            run.dp.close()
        if run.net is not None:
            run.net.close()
        if run.metrics_file is not None:
            run.metrics_file.close()
        observer.close(write_trace=healthy)
    result.params, result.updates = state.params, state.updates
    report_end(run, result)
    sys.stdout.flush()
    return result
