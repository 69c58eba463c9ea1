"""GPU/CPU benchmarks, timed as the original DT-FM did: a global barrier, 10 iterations, the first
dropped, the mean of the rest, reported by global rank 0.

    mpiexec -n 4 python tools/bench.py pipeline --config configs/gpt3_xl.yaml [--set k=v ...] [--json out.jsonl]
    python tools/bench.py single --config configs/gpt3_xl.yaml [--set ...]     # whole model on one device
    mpiexec -n 2 python tools/bench.py transport --transport nccl --mib 8 16   # per-message time
    mpiexec -n 4 python tools/bench.py dp-sync --original --diloco 50          # DP exchange, every mode and codec
    python tools/bench.py codec --config configs/gpt3_xl.yaml [--codecs int8,int4]  # encode/decode per message

`pipeline` also measures, in the same run, each stage's forward+backward of one iteration's
micro-batches alone (no communication): the stage ceiling. The pipeline bound is
slowest stage × (M + P − 1) / M and efficiency = bound / measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

H100_BF16_DENSE_TFLOPS = 989.0


def _append_json(path: str | None, row: dict) -> None:
    """One JSON line per result, appended, so that several runs (and GPU calls) share one file."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _config(args: argparse.Namespace):
    from jaxpipe.config import load_config

    # The original's timing method: a world barrier starts every step (a user's --set may turn it off).
    return load_config(args.config, ["runtime.step_barrier=true", *args.overrides, f"train.steps={args.iters}"])


class _MessagesAlreadyThere:
    """A transport whose every message has already arrived (a fixed random array) and whose sends
    go nowhere: a rank's lowered actions run as pure compute, with the executor's own dispatch."""

    name = "none (stage timing)"

    def __init__(self, x):
        self.x = x

    def expect(self, key, peer, spec):
        pass

    def recv(self, key, peer, spec):
        return self.x

    def send(self, key, peer, x):
        pass

    def flush(self):
        pass


def _local_executor(run):
    """This rank's lowered actions over a transport that never waits, with random data."""
    import jax
    import jax.numpy as jnp

    from jaxpipe.pipeline.executor import Executor, StepBatch

    cfg = run.cfg
    program = next(iter(run.programs.values()))
    key = jax.random.PRNGKey(0)
    mb, seq = cfg.train.micro_batch_size, cfg.model.seq_len
    tokens = program.place_input(jax.random.randint(key, (mb, seq), 0, cfg.model.vocab_size, jnp.int32))
    act = program.place_input(jax.random.normal(key, program.act_spec.shape, jnp.float32).astype(
        program.act_spec.dtype))
    executor = Executor(run.lowered, run.topo.stage, run.programs, _MessagesAlreadyThere(act), 1)
    return executor, StepBatch(lambda m: tokens, lambda m: tokens)


def stage_ceiling(run, state, reps: int = 2) -> float:
    """Seconds for this rank to run one step's actions with every message already there: the stage
    ceiling (pure compute, in the schedule's own order)."""
    import jax

    executor, batch = _local_executor(run)

    def one_pass():
        grads = {c: prog.zero_grads(state.params[c]) for c, prog in run.programs.items()}
        jax.block_until_ready(executor.run(0, state.params, grads, batch).grads)

    one_pass()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def transport_one_way_s(run) -> float:
    """The real transport's time per message (no emulation): a ping-pong of one activation between
    stages 0 and 1 of replica 0, median of 5 after a warm-up; 0 on other ranks and at PP = 1."""
    topo, program = run.topo, next(iter(run.programs.values()))
    if run.cfg.parallel.pp < 2 or topo.replica != 0 or topo.stage not in (0, 1):
        return 0.0
    buf = np.zeros(program.act_spec.nbytes, np.uint8)
    peer, samples = 1 - topo.stage, []
    for _ in range(6):
        t0 = time.perf_counter()
        if topo.stage == 0:
            topo.pipe.Send(buf, dest=peer)
            topo.pipe.Recv(buf, source=peer)
        else:
            topo.pipe.Recv(buf, source=peer)
            topo.pipe.Send(buf, dest=peer)
        samples.append((time.perf_counter() - t0) / 2)
    return float(np.median(samples[1:]))


def stage_times(run, state, reps: int = 1) -> dict:
    """Per chunk of this rank, {chunk: StageTime}: the median seconds of each computation per
    micro-batch, each waited for on its own (the last chunk's fused L counts as forward + backward;
    split chunks give the input-gradient share of the backward)."""
    from jaxpipe.pipeline.costmodel import StageTime
    from jaxpipe.pipeline.schedule import Op

    executor, batch = _local_executor(run)
    profile: dict = {}
    for i in range(reps + 1):
        grads = {c: prog.zero_grads(state.params[c]) for c, prog in run.programs.items()}
        executor.run(0, state.params, grads, batch, profile=profile if i else None)
    med = {k: float(np.median(v)) for k, v in profile.items()}
    out = {}
    for c in run.programs:
        if (c, Op.L) in med:
            out[c] = StageTime(med[(c, Op.L)], 0.0)
        elif (c, Op.LI) in med:
            out[c] = StageTime(med[(c, Op.LI)], med[(c, Op.W)], input_frac=0.0)
        elif (c, Op.I) in med:
            i, w = med[(c, Op.I)], med[(c, Op.W)]
            out[c] = StageTime(med[(c, Op.F)], i + w, input_frac=i / (i + w))
        else:
            out[c] = StageTime(med[(c, Op.F)], med[(c, Op.B)])
    return out


def cmd_pipeline(args: argparse.Namespace) -> None:
    import jax
    from mpi4py import MPI

    from jaxpipe.model.gpt import model_flops_per_token
    from jaxpipe.pipeline.costmodel import bubble_fraction, plan
    from jaxpipe.pipeline.schedule import config_schedule
    from jaxpipe.runtime.trace import TRACE
    from jaxpipe.train.trainer import train

    cfg = _config(args)
    comm = MPI.COMM_WORLD
    if args.timeline is not None:  # each step replaces the last: the last iteration's trace
        TRACE.enable()
    res = train(cfg, log=(print if args.verbose else (lambda s: None)),
                probe=lambda run, state: (stage_ceiling(run, state), stage_times(run, state)))
    probes = comm.gather(res.probe, root=0)
    timelines = comm.gather(TRACE.stop() if args.timeline is not None else [], root=0)
    if comm.Get_rank() != 0:
        return
    if args.timeline:  # The last iteration's events of every rank, one JSON line per run.
        with open(args.timeline, "a") as f:
            f.write(json.dumps({"label": args.label, "ranks": timelines}) + "\n")
    p, t = cfg.parallel, cfg.train
    P, M = p.pp, cfg.num_microbatches
    per_stage = [c for c, _ in probes[:P]]  # replica 0's ranks
    chunk_times = {c: t for _, times in probes[:P] for c, t in times.items()}
    remat = p.stage_remat or cfg.model.remat
    measured = float(np.mean(res.iter_times[args.skip:]))
    # The schedule's own bound: the slowest rank's compute, plus the bubble the schedule leaves with
    # these computation times and free links (the cost model's simulation of the lowered schedule).
    bubble = bubble_fraction(config_schedule(cfg), [chunk_times[c] for c in sorted(chunk_times)])
    bound = max(per_stage) * (1 + bubble)
    tokens = t.global_batch_size * cfg.model.seq_len
    n_dev = comm.Get_size() * cfg.runtime.devices_per_process
    tflops = model_flops_per_token(cfg.model) * tokens / measured / n_dev / 1e12
    row = {
        "mode": "pipeline", "pp": P, "dp": p.dp, "devices_per_process": cfg.runtime.devices_per_process,
        "micro_batch": t.micro_batch_size, "M": M, "schedule": p.schedule, "extra_warmup": p.extra_warmup,
        "transport": p.transport,
        "partition": res.partition.counts, "scan_blocks": cfg.model.scan_blocks, "remat": remat,
        "iter_s": measured, "skipped_iters": args.skip, "iter_times": res.iter_times, "tokens_per_s": tokens / measured,
        "tflops_per_device": tflops, "mfu": tflops / H100_BF16_DENSE_TFLOPS, "stage_ceiling_s": per_stage,
        "bound_s": bound, "bubble": bubble, "efficiency": bound / measured,
        # The cost model's iteration from these chunk times (links, codecs' roofline times, DP, tied exchange).
        "chunk_times": [[chunk_times[c].fwd, chunk_times[c].bwd] for c in sorted(chunk_times)],
        "predicted_s": plan(cfg, [chunk_times[c] for c in sorted(chunk_times)],
                            platform=jax.default_backend()).iteration_s,
        "peak_mem_gib": [
            (x / 2**30 if x is not None else None) for x in res.peak_memory],
        "label": args.label,
    }
    print(f"[{args.label}] PP={P} DP={p.dp} mb={t.micro_batch_size} M={M} {p.schedule} {p.transport} "
          f"partition={res.partition.counts} scan={cfg.model.scan_blocks} remat={remat} "
          f"extra_warmup={p.extra_warmup}")
    print(f"  iteration {measured:.3f} s | {tokens / measured:,.0f} tok/s | {tflops:.0f} TFLOP/s per device | "
          f"MFU {tflops / H100_BF16_DENSE_TFLOPS:.1%}")
    print(f"  stage ceilings (s per iteration): {' '.join(f'{c:.3f}' for c in per_stage)} | bound {bound:.3f} s | "
          f"efficiency {bound / measured:.3f}")
    print(f"  predicted (cost model, these chunk times) {row['predicted_s']:.3f} s | measured / predicted "
          f"{measured / row['predicted_s']:.2f}")
    print(f"  peak memory per stage (GiB): {row['peak_mem_gib']}", flush=True)
    _append_json(args.json, row)


def cmd_single(args: argparse.Namespace) -> None:
    """The whole model on one device, gradient accumulation over the same global batch."""
    import jax
    import jax.numpy as jnp

    from jaxpipe.model.gpt import model_flops_per_token
    from jaxpipe.model.layout import init_stage_params
    from jaxpipe.pipeline.partition import Partition
    from jaxpipe.pipeline.stage import StageProgram
    from jaxpipe.runtime.devices import local_mesh, peak_memory_bytes
    from jaxpipe.train.optimizer import Optimizer

    cfg = _config(args)
    L = cfg.model.n_layer
    k = cfg.runtime.devices_per_process
    mesh = local_mesh(k) if k > 1 else None
    spec = Partition.from_counts([L]).stage(0)
    program = StageProgram(cfg.model, spec, cfg.train.micro_batch_size, mesh)
    params = program.place_params(init_stage_params(cfg.model, 0, range(L), True, True))
    opt = Optimizer(cfg.train)
    state = opt.init(params)
    M = cfg.train.global_batch_size // cfg.train.micro_batch_size
    key = jax.random.PRNGKey(0)
    x = targets = program.place_input(jax.random.randint(
        key, (cfg.train.micro_batch_size, cfg.model.seq_len), 0, cfg.model.vocab_size, jnp.int32))
    scale = jnp.float32(1.0 / M)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        grads = program.zero_grads(params)
        for _ in range(M):
            grads, _, _ = program.forward_backward_loss(params, grads, x, targets, scale)
        norm = jnp.sqrt(program.sq_norm(grads, False))
        params, state = opt.update(params, state, grads, norm)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - t0)
    measured = float(np.mean(times[args.skip:]))
    tokens = cfg.train.global_batch_size * cfg.model.seq_len
    tflops = model_flops_per_token(cfg.model) * tokens / measured / k / 1e12
    peak = peak_memory_bytes(program.devices)
    row = {"mode": "single", "devices": k, "micro_batch": cfg.train.micro_batch_size, "M": M, "iter_s": measured,
           "iter_times": times, "tflops_per_device": tflops, "scan_blocks": cfg.model.scan_blocks,
           "peak_mem_gib": peak / 2**30 if peak else None, "label": args.label}
    print(f"[{args.label}] whole model on {k} device(s), mb={cfg.train.micro_batch_size} x {M}: iteration "
          f"{measured:.3f} s | {tflops:.0f} TFLOP/s per device | peak {row['peak_mem_gib']} GiB", flush=True)
    _append_json(args.json, row)


def cmd_transport(args: argparse.Namespace) -> None:
    """Ping-pong between ranks 0 and 1 through a jaxpipe transport: one-way time per message."""
    import jax
    import jax.numpy as jnp
    from mpi4py import MPI

    from jaxpipe.comm.message import ArraySpec, Kind, MsgKey
    from jaxpipe.comm.transport import make_transport

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    from jaxpipe.runtime.devices import assign_devices

    assign_devices(comm, 1)
    t = make_transport(args.transport, comm, rank, lambda s: s)
    for mib in args.mib:
        n = mib * 2**20 // 2
        spec = ArraySpec((n,), "bfloat16")
        x = jax.device_put(jnp.ones((n,), jnp.bfloat16))
        times = []
        for i in range(args.reps + 2):
            comm.Barrier()
            t0 = time.perf_counter()
            if rank == 0:
                t.send(MsgKey(i, 0, Kind.ACT), 1, x)
                y = t.recv(MsgKey(i, 0, Kind.GRAD), 1, spec)
                y.block_until_ready()
                t.flush()
            else:
                y = t.recv(MsgKey(i, 0, Kind.ACT), 0, spec)
                t.send(MsgKey(i, 0, Kind.GRAD), 0, y)
                t.flush()
            times.append((time.perf_counter() - t0) / 2)
        if rank == 0:
            one_way = float(np.median(times[2:]))
            print(f"[{args.label}] transport {t.name}: {mib} MiB bf16 one-way {one_way * 1e3:.2f} ms "
                  f"({mib * 2**20 / one_way / 1e9:.1f} GB/s)", flush=True)
            _append_json(args.json, {"mode": "transport", "transport": t.name, "mib": mib,
                                     "one_way_s": one_way, "label": args.label})
    t.close()


CODEC_ROWS = ("none", "bfloat16", "float8", "int8", "int4", "delta-int4")


def codec_times(spec, names=CODEC_ROWS, reps: int = 10, place=None) -> dict:
    """{name: CodecTimes} per message of `spec` on this process's device: the median seconds of each
    codec's jitted encode and decode, each waited for. `delta-int4` is in its steady state (the copy
    read from host memory, the change encoded, the new copy written back)."""
    import jax
    import jax.numpy as jnp

    from jaxpipe.comm.codec import Delta, DeltaStore, Int4, make_codec
    from jaxpipe.comm.message import Kind, MsgKey
    from jaxpipe.pipeline.costmodel import CodecTimes

    place = place or jax.device_put
    x = place(jax.random.normal(jax.random.PRNGKey(0), spec.shape, jnp.float32).astype(spec.dtype))
    ids = np.arange(spec.shape[0])

    def timed(fn, flush) -> float:
        out = []
        for i in range(reps + 2):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(i))
            flush()
            out.append(time.perf_counter() - t0)
        return float(np.median(out[2:]))

    result = {}
    for name in names:
        per_kind = []
        for kind in (Kind.ACT, Kind.GRAD):
            if name == "delta-int4" and kind == Kind.ACT:
                stores = [{1: DeltaStore(f"bench{j}", len(ids), spec.shape[1:], spec.dtype)} for j in (0, 1)]
                send, recv = (Delta(Int4(), lambda key: ids, st, place) for st in stores)
                key0 = MsgKey(0, 0, kind, 1)
                recv.wire_spec(spec, key0)
                recv.decode(send.encode(x, key0), spec, key0)  # the first visit: now both ends hold copies
                wires = {}

                def enc(i, send=send, recv=recv, wires=wires):
                    key = MsgKey(i + 1, 0, Kind.ACT, 1)
                    recv.wire_spec(spec, key)
                    wires[i] = send.encode(x, key)
                    return wires[i]

                e = timed(enc, send.flush)
                d = timed(lambda i, recv=recv, wires=wires: recv.decode(wires[i], spec, MsgKey(i + 1, 0, Kind.ACT, 1)),
                          recv.flush)
            else:
                codec = make_codec("int8" if name == "delta-int4" else name, kind)
                key = MsgKey(0, 0, kind, 1)
                wire = codec.encode(x, key)
                e = timed(lambda i, codec=codec, key=key: codec.encode(x, key), lambda: None)
                d = timed(lambda i, codec=codec, key=key, wire=wire: codec.decode(wire, spec, key), lambda: None)
            per_kind += [e, d]
        result[name] = CodecTimes(*per_kind)
    return result


def cmd_codec(args: argparse.Namespace) -> None:
    """Encode and decode time per message of every codec, at the config's activation shape."""
    from jaxpipe.comm.codec import wire_nbytes
    from jaxpipe.comm.message import Kind
    from jaxpipe.pipeline.costmodel import act_spec

    cfg = _config(args)
    import jax

    spec = act_spec(cfg, jax.default_backend())
    names = args.codecs.split(",")
    for name, t in codec_times(spec, names, args.reps).items():
        wire = wire_nbytes("int4" if name == "delta-int4" else name, Kind.ACT, spec)
        row = {"mode": "codec", "codec": name, "spec": str(spec), "wire_bytes": wire, "bytes": spec.nbytes,
               "act_encode_s": t.act_encode, "act_decode_s": t.act_decode, "grad_encode_s": t.grad_encode,
               "grad_decode_s": t.grad_decode, "backend": jax.default_backend(), "label": args.label}
        print(f"[{args.label}] codec {name:10s} {spec}: {wire / 2**10:.1f} KiB on the wire ({wire / spec.nbytes:.3f} "
              f"of the array) | act encode {t.act_encode * 1e3:.3f} ms decode {t.act_decode * 1e3:.3f} ms | grad "
              f"encode {t.grad_encode * 1e3:.3f} ms decode {t.grad_decode * 1e3:.3f} ms", flush=True)
        _append_json(args.json, row)


def cmd_dp_sync(args: argparse.Namespace) -> None:
    """The data-parallel exchange of one stage over all ranks (its DP group), every mode and codec, over
    emulated links: a buffer of `--elements` float32 charged as `--params` parameters' gradients
    (network.size_scale = params / elements), at one link (`--delay-ms`, `--rate-gbit`) or at the
    original's five settings (`--original`), next to the time the cost model predicts and, with
    `--original`, the original's fp16 DP4 - DP1 overhead. `--diloco H` adds DiLoCo's outer step
    (pseudo-gradients up, step down, the tied `wte`'s step on to another rank: `--wte-params`),
    amortised over H. A first pass on an unlimited link compiles every program."""
    import jax.numpy as jnp
    from mpi4py import MPI

    from jaxpipe.comm import quant
    from jaxpipe.comm.netem import LinkSpec, NetworkEmulator
    from jaxpipe.dp.collectives import Emulated, n_chunks
    from jaxpipe.dp.diloco import outer_step
    from jaxpipe.dp.exchange import Exchange
    from jaxpipe.pipeline.costmodel import ORIGINAL_SETTINGS, Link, diloco_sync_s, dp_sync_s
    from tools.dtfm_original import ORIGINAL_DP4_FP16, ORIGINAL_PP_FP16

    comm = MPI.COMM_WORLD
    me, size = comm.Get_rank(), comm.Get_size()
    scale = args.params / args.elements
    grads = jnp.asarray(np.random.default_rng(me).standard_normal(args.elements).astype(np.float32) * 1e-3)
    wte_n = round(args.wte_params / scale)
    settings = ([(label, d, r, o - p) for (label, d, r), o, p in zip(ORIGINAL_SETTINGS, ORIGINAL_DP4_FP16,
                                                                     ORIGINAL_PP_FP16, strict=True)]
                if args.original else [("link", args.delay_ms, args.rate_gbit, 0.0)])
    cases = [(mode, codec, 0) for mode in args.modes for codec in args.codecs]
    cases += [(exchange, codec, h) for h in args.diloco for exchange in ("central_ps", "sharded_ps")
              for codec in args.diloco_codecs]

    def one(coll: Emulated, mode: str, codec: str, h: int) -> float:
        ex = Exchange(mode, codec, coll, args.elements)
        momentum = jnp.zeros((ex.span_rows, ex.chunk), jnp.float32)
        serve = (lambda m, first: outer_step(m, momentum, 0.7, 0.9)[1]) if h else None
        comm.Barrier()
        t0 = time.perf_counter()
        out = ex.run(grads, serve)
        ex.commit(True)
        if h and wte_n:  # rank r stands in for its pipeline's first stage: the `wte` step to a neighbour
            assert ex.back is not None
            rows = np.asarray(ex.back[: -(-wte_n // ex.chunk)])
            p2p, dst, src = coll.p2p, (me + 1) % size, (me - 1) % size
            got = np.empty_like(rows)
            req = p2p.irecv(got, src, tag=70000)
            p2p.send(rows, dst, tag=70000)
            p2p.wait([req])
        np.asarray(out)
        comm.Barrier()
        return time.perf_counter() - t0

    warm = NetworkEmulator(me, LinkSpec(0.0, float("inf")), size_scale=scale)
    for case in cases:
        one(Emulated(comm, warm, lambda i: i), *case)
    warm.close()
    for label, delay, rate, overhead in settings:
        net = NetworkEmulator(me, LinkSpec(delay / 1e3, rate * 1e9 if rate > 0 else float("inf")), size_scale=scale)
        coll = Emulated(comm, net, lambda i: i)
        link = Link.of(delay, rate)
        nbytes = 4.0 * args.params
        for mode, codec, h in cases:
            took = float(np.median([one(coll, mode, codec, h) for _ in range(args.reps)]))
            chunks_f32 = n_chunks(nbytes, args.elements)
            chunks = n_chunks(scale * quant.wire_bytes(codec, args.elements), args.elements) if codec != "none" \
                else chunks_f32
            model = (diloco_sync_s(mode, size, nbytes, link, codec, 4.0 * args.wte_params, chunks) if h
                     else dp_sync_s(mode, size, nbytes, link, chunks, codec))
            per_step = took / h if h else took
            if me == 0:
                what = f"diloco H={h} ({mode})" if h else mode
                vs = f" | {per_step / overhead:.3f} of the original's {overhead:.2f} s" if overhead else ""
                amortised = f", per step {per_step:.4f} s" if h else ""
                print(f"[{args.label}] {label:28s} {what:24s} {codec:9s} {took:7.3f} s (model {model:7.3f}, "
                      f"measured/model {took / model if model else float('nan'):.2f}){amortised}{vs}", flush=True)
                _append_json(args.json, {"mode": "dp-sync", "dp_mode": "diloco" if h else mode, "exchange": mode,
                                         "codec": codec, "H": h, "ranks": size, "setting": label, "delay_ms": delay,
                                         "rate_gbit": rate, "seconds": took, "per_step_s": per_step,
                                         "modelled_s": model, "original_overhead_s": overhead,
                                         "params": args.params, "elements": args.elements, "label": args.label})
        net.close()


def cmd_dispatch(args: argparse.Namespace) -> None:
    """Host time to dispatch a middle stage's forward and backward (the call returning, not the
    compute) and the device time per task, with the residuals packed into a few buffers and without:
    the per-task host cost that paced the pipeline at micro-batch 1 and 2."""
    import jax

    from jaxpipe.model.layout import init_stage_params
    from jaxpipe.pipeline import stage as stage_module
    from jaxpipe.pipeline.partition import StageSpec
    from jaxpipe.pipeline.stage import StageProgram

    cfg = _config(args)
    n = args.layers
    spec = StageSpec(1, 3, 0, n)  # a middle stage: activations in and out
    results = {}
    for packed in (False, True):
        stage_module._Packer.MIN_LEAVES = 16 if packed else 10**9
        prog = StageProgram(cfg.model, spec, cfg.train.micro_batch_size)
        params = prog.place_params(init_stage_params(cfg.model, 0, spec.layers, False, False))
        key = jax.random.PRNGKey(0)
        x = prog.place_input(jax.random.normal(key, prog.act_spec.shape).astype(prog.act_spec.dtype))
        grads = prog.zero_grads(params)
        for _ in range(2):  # compile and warm
            y, saved = prog.forward(params, x)
            grads, _ = prog.backward(grads, saved, y)
        jax.block_until_ready(grads)
        f_host, b_host, total = [], [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            y, saved = prog.forward(params, x)
            t1 = time.perf_counter()
            grads, g_x = prog.backward(grads, saved, y)
            t2 = time.perf_counter()
            jax.block_until_ready((grads, g_x))
            t3 = time.perf_counter()
            f_host.append(t1 - t0)
            b_host.append(t2 - t1)
            total.append(t3 - t0)
        n_saved = len(jax.tree.leaves(saved))
        results[packed] = (float(np.median(f_host)), float(np.median(b_host)), float(np.median(total)), n_saved)
        how = "packed" if packed else "as arrays"
        print(f"[{args.label}] {n} layers, mb {cfg.train.micro_batch_size}, residuals {how} ({n_saved} arrays): "
              f"host dispatch forward {results[packed][0] * 1e3:.2f} ms, backward "
              f"{results[packed][1] * 1e3:.2f} ms; forward + backward on the device {results[packed][2] * 1e3:.2f} ms",
              flush=True)
        _append_json(args.json, {"mode": "dispatch", "layers": n, "micro_batch": cfg.train.micro_batch_size,
                                 "packed": packed, "arrays": n_saved, "forward_host_s": results[packed][0],
                                 "backward_host_s": results[packed][1], "task_pair_s": results[packed][2],
                                 "label": args.label})
    stage_module._Packer.MIN_LEAVES = 10**9  # the default


def cmd_dp_codec(args: argparse.Namespace) -> None:
    """Device time of the data-parallel gradient codecs (jaxpipe.comm.quant) on a stage's whole gradient:
    a replica's encode with error feedback, and the server's decode + float32 mean of `--replicas`
    messages. On a GPU this is the part of the DP step the links do not see."""
    import jax
    import jax.numpy as jnp

    from jaxpipe.comm import quant

    rows = int(-(-int(args.params) // quant.CHUNK))
    x = jax.random.normal(jax.random.PRNGKey(0), (rows, quant.CHUNK), jnp.float32) * 1e-3
    residue = jnp.zeros_like(x)
    for codec in args.codecs:
        wire, res = quant.encode_chunks_ef(x, residue, codec)
        wires = jnp.stack([wire] * args.replicas)
        jax.block_until_ready(quant.mean_of(wires, codec, args.replicas))  # compile
        enc, dec = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            wire, res = jax.block_until_ready(quant.encode_chunks_ef(x, res, codec))
            t1 = time.perf_counter()
            jax.block_until_ready(quant.mean_of(wires, codec, args.replicas))
            t2 = time.perf_counter()
            enc.append(t1 - t0)
            dec.append(t2 - t1)
        e, d = float(np.median(enc)), float(np.median(dec))
        print(f"[{args.label}] {jax.devices()[0].device_kind}: {codec} on {rows * quant.CHUNK / 1e6:.0f}M elements "
              f"({wire.nbytes / 2**20:.1f} MiB on the wire): encode with error feedback {e * 1e3:.2f} ms, "
              f"decode + mean of {args.replicas} {d * 1e3:.2f} ms", flush=True)
        _append_json(args.json, {"mode": "dp-codec", "codec": codec, "elements": rows * quant.CHUNK,
                                 "wire_bytes": int(wire.nbytes), "encode_s": e, "decode_mean_s": d,
                                 "replicas": args.replicas, "device": jax.devices()[0].device_kind,
                                 "label": args.label})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("pipeline", "single", "transport", "dp-sync", "dispatch", "codec", "dp-codec"):
        p = sub.add_parser(name)
        p.add_argument("--config")
        p.add_argument("--set", dest="overrides", action="append", default=[])
        p.add_argument("--iters", type=int, default=10)
        p.add_argument("--skip", type=int, default=1, help="iterations dropped before the mean (the original: 1)")
        p.add_argument("--json")
        p.add_argument("--label", default=name)
        p.add_argument("--verbose", action="store_true")
        p.add_argument("--timeline",
                       help="pipeline: append every rank's last-iteration trace (jaxpipe.runtime.trace) here")
        if name == "transport":
            p.add_argument("--transport", default="mpi")
            p.add_argument("--mib", type=int, nargs="+", default=[8, 16])
            p.add_argument("--reps", type=int, default=20)
        if name == "dispatch":
            p.add_argument("--layers", type=int, default=7, help="layers in the stage (GPT-3 XL's middle stage: 7)")
            p.add_argument("--reps", type=int, default=20)
        if name == "dp-codec":
            p.add_argument("--params", type=float, default=204e6,
                           help="float32 gradient elements of the stage (the original's stage 0: 204e6)")
            p.add_argument("--replicas", type=int, default=4, help="messages the server decodes and sums")
            p.add_argument("--codecs", nargs="+", default=["bfloat16", "int8", "int4"])
            p.add_argument("--reps", type=int, default=10)
        if name == "codec":
            p.add_argument("--codecs", default=",".join(CODEC_ROWS))
            p.add_argument("--reps", type=int, default=20)
        if name == "dp-sync":
            p.add_argument("--params", type=float, default=204e6,
                           help="parameters whose gradients the buffer stands for (the original's stage 0: 204e6)")
            p.add_argument("--elements", type=int, default=2**21, help="float32 elements actually sent")
            p.add_argument("--modes", nargs="+", default=["central_ps", "sharded_ps", "allreduce"])
            p.add_argument("--codecs", nargs="+", default=["none", "bfloat16", "int8", "int4"])
            p.add_argument("--diloco", type=int, nargs="*", default=[], help="DiLoCo's H (amortised outer step)")
            p.add_argument("--diloco-codecs", nargs="+", default=["int8"])
            p.add_argument("--wte-params", type=float, default=50257 * 2048, help="the tied embedding (GPT-3 XL)")
            p.add_argument("--reps", type=int, default=1)
            p.add_argument("--original", action="store_true", help="the original's five network settings")
            p.add_argument("--delay-ms", type=float, default=0.0)
            p.add_argument("--rate-gbit", type=float, default=0.0, help="0: unlimited")
    args = parser.parse_args()
    {"pipeline": cmd_pipeline, "single": cmd_single, "transport": cmd_transport,
     "dp-sync": cmd_dp_sync, "dispatch": cmd_dispatch, "codec": cmd_codec, "dp-codec": cmd_dp_codec}[args.cmd](args)


if __name__ == "__main__":
    main()
