"""The training loop of one rank: set up its stage, then per step run the schedule, synchronise
gradients (tied embedding, data parallel, global norm) and step the optimizer.

Timing follows the original: a global barrier, then the timer covers the pipeline, the gradient
synchronisation and the optimizer step, up to the device having finished; data preparation is
outside it. Global rank 0 (first stage of the first pipeline) reports.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from mpi4py import MPI

from jaxpipe import __version__
from jaxpipe.comm.netem import NetworkEmulator
from jaxpipe.comm.tied import make_tied_exchange
from jaxpipe.comm.topology import Topology
from jaxpipe.comm.transport import make_transport
from jaxpipe.config import Config
from jaxpipe.data.source import TokenSource, make_source, replica_sample_indices
from jaxpipe.dp.sync import make_grad_sync
from jaxpipe.errors import NonFiniteError, agree
from jaxpipe.model.gpt import Params, compute_dtype
from jaxpipe.model.layout import init_stage_params, param_count
from jaxpipe.pipeline.executor import StepBatch, run_step
from jaxpipe.pipeline.partition import Partition, StageSpec, resolve_partition
from jaxpipe.pipeline.schedule import check_consistent, make_schedule
from jaxpipe.pipeline.stage import StageProgram
from jaxpipe.runtime import faults
from jaxpipe.runtime.devices import assign_devices, local_mesh, peak_memory_bytes
from jaxpipe.runtime.timeline import TIMELINE
from jaxpipe.runtime.watchdog import ACTIVITY, start_watchdog
from jaxpipe.train.hooks import RunHooks, check_resume
from jaxpipe.train.optimizer import LossScaler, Optimizer


@dataclass
class TrainResult:
    partition: Partition
    stage: StageSpec
    params: Params  # this rank's stage, after the last step
    losses: list[float] = field(default_factory=list)  # mean over the global batch, per step
    grad_norms: list[float] = field(default_factory=list)  # global norm before clipping, per step
    iter_times: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)  # steps dropped for non-finite values
    updates: int = 0  # optimizer updates applied in all (checkpointed runs included): steps minus skips
    peak_memory: list[int | None] = field(default_factory=list)  # per stage (global rank 0 only)
    probe: Any = None


def _bcast_tree(tree: Params, comm: Any, root: int) -> Params:
    """Sends `root`'s values of `tree` to every member of `comm`, as one message."""
    flat, unravel = ravel_pytree(tree)
    buf = np.array(flat)
    comm.Bcast(buf, root=root)
    return unravel(jnp.asarray(buf))


def init_params(cfg: Config, topo: Topology, spec: StageSpec, program: StageProgram) -> Params:
    """DP rank 0 of each stage initialises; the other replicas receive its values (not a shared
    seed: replicas must start identical even where random number generation differs by host)."""
    shapes = program.param_shapes()
    if topo.dp_comm.Get_rank() == 0:
        params = init_stage_params(cfg.model, cfg.train.seed, spec.layers, spec.first, spec.last)
    else:
        params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    if jax.tree.structure(params) != jax.tree.structure(shapes):
        raise AssertionError("stage parameter layout does not match the StageModel's")
    params = _bcast_tree(params, topo.dp_comm, root=0)
    if topo.tied is not None:  # The last stage's head starts from the first stage's embedding.
        params["wte"] = _bcast_tree(params["wte"], topo.tied, root=0)
    return program.place_params(params)


def _step_batch(source: TokenSource | None, cfg: Config, topo: Topology, step: int,
                program: StageProgram) -> StepBatch:
    if source is None:
        return StepBatch(None, None)
    samples = source.samples(replica_sample_indices(cfg, step, topo.replica).reshape(-1))
    samples = samples.reshape(cfg.num_microbatches, cfg.train.micro_batch_size, -1)
    inputs = [program.place_input(s[:, :-1]) for s in samples] if topo.is_first else None
    targets = [program.place_input(s[:, 1:]) for s in samples] if topo.is_last else None
    return StepBatch(inputs, targets)


def describe(cfg: Config, topo: Topology, partition: Partition, transport: str,
             net: NetworkEmulator | None = None) -> str:
    m, p = cfg.model, cfg.parallel
    return (
        f"jaxpipe {__version__}: {topo.world.Get_size()} ranks = PP {p.pp} x DP {p.dp} | schedule {p.schedule}"
        f"{f' +{p.extra_warmup} warm-up' if p.extra_warmup else ''} | "
        f"dp {p.dp_mode} | layers per stage {partition.counts} | model {m.preset} "
        f"({param_count(m) / 1e6:.1f}M params, {jnp.dtype(compute_dtype(m)).name}) | batch "
        f"{cfg.train.global_batch_size} = {p.dp} x {cfg.num_microbatches} x {cfg.train.micro_batch_size} | "
        f"{jax.default_backend()} x {cfg.runtime.devices_per_process} per rank | transport {transport} | "
        f"{net.describe() if net is not None else 'network emulation off'}"
    )


def train(
    cfg: Config,
    comm: Any = None,
    metrics_out: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    probe: Callable[[StageProgram, Params, Topology], Any] | None = None,
    resume: str | None = None,
) -> TrainResult:
    """Trains per `cfg` on this rank's stage. `probe`, if given, runs once after set-up and before
    the first step (benchmarks use it to time a stage alone); its result is `TrainResult.probe`."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    log = log or (lambda s: print(s, flush=True))
    p = cfg.parallel
    topo = Topology.create(comm, p.pp, p.dp)
    ACTIVITY.configure(topo.rank, topo.stage, p.pp, topo.replica, cfg.runtime.comm_timeout_s,
                       cfg.runtime.first_step_timeout_s)
    agree(comm, lambda: faults.load(topo.rank, topo.stage, topo.replica))
    k = cfg.runtime.devices_per_process
    agree(comm, lambda: assign_devices(comm, k))  # Before JAX touches a device.
    mesh = agree(comm, lambda: local_mesh(k)) if k > 1 else None
    partition = agree(comm, lambda: resolve_partition(
        p.partition, cfg.model, p.pp, cfg.train.micro_batch_size, p.stage_weights))
    spec = partition.stage(topo.stage)
    needs_data = topo.is_first or topo.is_last
    # Every rank opens the data (a missing file fails the whole job here, before any compile).
    source = agree(comm, lambda: make_source(cfg.data, cfg.model))
    if not needs_data:
        source = None
    # A checkpoint of another model or batch size fails here, before anything compiles.
    resume_from = agree(comm, lambda: check_resume(cfg, resume))

    program = StageProgram(cfg.stage_model(topo.stage), spec, cfg.train.micro_batch_size, mesh)
    schedule = make_schedule(p.schedule, p.pp, cfg.num_microbatches, p.extra_warmup)
    check_consistent(schedule)
    tasks = schedule.tasks(topo.stage)
    params = init_params(cfg, topo, spec, program)
    optimizer = Optimizer(cfg.train)
    opt_state = program.place_params(optimizer.init(params))  # committed, as the update returns it
    net = NetworkEmulator.from_config(cfg.network, topo.rank)
    grad_sync = make_grad_sync(p.dp_mode, topo.dp_comm, net, lambda i: topo.world_rank_of(topo.stage, i))
    transport = agree(comm, lambda: make_transport(p.transport, topo.pipe, topo.stage, topo.world_rank_of,
                                                   program.place_input, single_device=mesh is None, net=net))
    ACTIVITY.attach(transport)
    # Every rank takes part in `agree` (it is collective); only the tied pair builds the sum.
    tied_peer = topo.world_rank_of(topo.pp - 1 if topo.stage == 0 else 0)
    tied = agree(comm, lambda: make_tied_exchange(p.transport, topo.tied, topo.stage == 0, tied_peer, net,
                                                   p.tied_grad_dtype) if topo.tied is not None else None)
    start_watchdog()
    scaler = LossScaler(cfg.train, compute_dtype(cfg.model))
    skip_tied = spec.last and not spec.first
    is_reporter = topo.rank == 0
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
    result = TrainResult(partition=partition, stage=spec, params=params)
    metrics_file = open(metrics_out, "w") if (metrics_out and is_reporter) else None  # noqa: SIM115
    if is_reporter:
        log(describe(cfg, topo, partition, transport.name, net))
    # Resume (a checkpoint path, or "auto"), evaluation and checkpoints: see jaxpipe.train.hooks.
    hooks = RunHooks(cfg, topo, spec, program, transport, partition, log)
    params, opt_state, start_step = hooks.restore(params, opt_state, resume, resume_from)
    if probe is not None:
        result.probe = probe(program, params, topo)
    # The learning-rate schedule is at the count of applied updates, not at the step: a skipped step
    # moves the data on but not the schedule.
    result.updates = optimizer.applied_updates(opt_state)

    healthy = True
    try:
        for step in range(start_step, cfg.train.steps):
            warm = result.iter_times[1:]  # The first step's time is mostly compilation.
            ACTIVITY.begin_step(step + 1, first=step == start_step, last_step_s=warm[-1] if warm else 0.0)
            batch = _step_batch(source, cfg, topo, step, program)
            # Waits for every rank's previous step: the first two include compilation.
            with ACTIVITY.waiting("the barrier that starts the step", long=step <= start_step + 1):
                comm.Barrier()
            if TIMELINE.enabled:  # Keeps the last step's events only.
                TIMELINE.start()
            t0 = time.perf_counter()
            grads = program.zero_grads(params)
            grads, loss = run_step(step, tasks, program, transport, params, grads, batch, p.recv_lookahead,
                                   loss_scale=scaler.scale)
            if faults.ARMED:
                grads = faults.poison(step + 1, grads)
                faults.at_sync(step + 1)
            with ACTIVITY.waiting("the tied-embedding gradient sum"):
                if TIMELINE.enabled:  # Tracing only: the phases after the pipeline start from its end.
                    jax.block_until_ready(grads)
                    TIMELINE.mark("step", "pipeline done")
                if tied is not None:
                    grads = {**grads, "wte": tied(grads["wte"])}
                TIMELINE.mark("step", "tied embedding summed")
            with ACTIVITY.waiting(f"the data-parallel gradient sync ({p.dp_mode})"):
                grads = program.place_params(grad_sync(grads))
                TIMELINE.mark("step", "data-parallel sync done")
            # Every stage's gradient sum of squares and the loss go to the whole pipeline; the replicas'
            # losses are summed over the world. DP averaging made the gradients, hence the norm, equal on
            # all replicas, so every rank of the job decides the same about a non-finite step.
            local = np.array([float(program.sq_norm(grads, skip_tied)), float(loss) if loss is not None else 0.0])
            TIMELINE.mark("step", "gradient norm computed")
            with ACTIVITY.waiting("the exchange of gradient norms along the pipeline"):
                parts = np.array(topo.pipe.allgather(local))  # [stage, (sq norm, loss)]
            if net is not None:  # A small allreduce over emulated links: ~2·log2(P) one-way delays.
                time.sleep(net.collective_latency(p.pp))
            sq_total, pipe_loss = (float(v) for v in parts.sum(axis=0))
            with ACTIVITY.waiting("the allreduce of the loss"):
                loss_sum = comm.allreduce(pipe_loss if topo.is_last else 0.0, op=MPI.SUM)
            mean_loss = loss_sum / p.dp  # Each pipeline's loss lives on its last stage.
            finite = math.isfinite(sq_total) and math.isfinite(loss_sum)
            norm = math.sqrt(sq_total) / scaler.scale if finite else float("nan")
            lr = float(optimizer.schedule(result.updates))
            ACTIVITY.doing = "the optimizer update"
            if finite:
                params, opt_state = optimizer.update(params, opt_state, grads, jnp.float32(norm),
                                                     jnp.float32(1.0 / scaler.scale))
                result.updates += 1
            jax.block_until_ready(params)
            TIMELINE.mark("step", "optimizer step done")
            dt = time.perf_counter() - t0
            scaler.update(finite)
            if not finite:
                bad = [str(s) for s in range(p.pp) if not np.isfinite(parts[s]).all()]
                where = f"stage{'s' * (len(bad) > 1)} {', '.join(bad)}" if bad else "another replica"
                what = (f"non-finite loss or gradients (loss {mean_loss:.4g}, gradient norm² {sq_total:.4g}; "
                        f"not finite on {where})")
                if not scaler.dynamic and cfg.train.on_nonfinite == "stop":
                    raise NonFiniteError(
                        f"step {step + 1}: {what}; train.on_nonfinite=stop ends the run: lower train.lr or raise "
                        f"train.warmup_steps, check the data, resume from the last checkpoint, or set "
                        f"train.on_nonfinite=skip to drop such steps")
                result.skipped_steps.append(step)
                if is_reporter:
                    log(f"step {step + 1:>5} | skipped: {what}; no update on any rank"
                        + (f" (loss scale now {scaler.scale:g})" if scaler.dynamic else ""))
            result.losses.append(mean_loss)
            result.grad_norms.append(norm)
            result.iter_times.append(dt)
            if is_reporter and (step % cfg.train.log_every == 0 or step == cfg.train.steps - 1):
                log(f"step {step + 1:>5} | loss {mean_loss:.4f} | {dt:.3f} s | {tokens_per_step / dt:,.0f} tok/s"
                    f" | grad norm {norm:.3f} | lr {lr:.2e}")
            if metrics_file is not None:
                metrics_file.write(json.dumps({
                    "step": step + 1, "loss": mean_loss, "iter_time_s": dt, "tokens_per_s": tokens_per_step / dt,
                    "grad_norm": norm, "lr": lr,
                }) + "\n")
                metrics_file.flush()
            hooks.after_step(step + 1, params, opt_state, metrics_file)
    except BaseException as e:
        # The job is about to be aborted: joining a receiver thread blocked on a dead peer would only
        # delay that. A non-finite stop happens on every rank at once, with no message in flight.
        healthy = isinstance(e, NonFiniteError)
        raise
    finally:
        if healthy:
            transport.close()
            if tied is not None:
                tied.close()
        if net is not None:
            net.close()
        if metrics_file is not None:
            metrics_file.close()
    result.params = params
    with ACTIVITY.waiting("the end-of-run gather"):
        peaks = comm.gather(peak_memory_bytes(program.devices), root=0)
    if is_reporter and result.iter_times:
        result.peak_memory = [peaks[s] for s in range(p.pp)]
        steady = result.iter_times[1:] or result.iter_times
        mem = " ".join(f"{x / 2**30:.2f}" if x is not None else "n/a" for x in result.peak_memory)
        log(f"done: {cfg.train.steps} steps, mean iteration {np.mean(steady):.3f} s (first step excluded), "
            f"final loss {result.losses[-1]:.4f}, peak device memory per stage (GiB): {mem}")
    sys.stdout.flush()
    return result
