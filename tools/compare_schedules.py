"""Every pipeline schedule on one configuration: measured iteration next to the cost model's
prediction from the same run's measured computation times; and, from the GPU stage times recorded in
BENCHMARKS.md, the model's GPT-3 XL prediction per schedule.

    python tools/compare_schedules.py cpu [--iters 6]   # PP=4, M=8, tiny model: one mpiexec launch, 4 ranks
    python tools/compare_schedules.py xl                # GPT-3 XL PP=4 on 4 x H200, predicted at mb 1/2/4

`cpu`: each schedule trains a few iterations in one launch; every rank then times each of its
computations alone (`tools/bench.py stage_times`: the rank's lowered actions with every message
already there), and the run's last-step timeline gives the per-message transport time inside the
pipeline. The prediction simulates the lowered schedule with exactly those times; the fixed
remainder after the pipeline (tied sum, norm exchange, optimizer) is taken once, from GPipe's run, and
applied to every schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CPU_BASE = ["model.n_layer=8", "model.d_model=128", "model.n_head=4", "model.seq_len=128", "model.vocab_size=512",
            "parallel.pp=4", "train.global_batch_size=16", "train.micro_batch_size=2", "train.warmup_steps=1"]
SCHEDULES = {
    "gpipe": ["parallel.schedule=gpipe"],
    "1f1b": ["parallel.schedule=1f1b"],
    "1f1b +1 warm-up": ["parallel.schedule=1f1b", "parallel.extra_warmup=1"],
    "interleaved_1f1b v=2": ["parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2"],
    "zb_h1": ["parallel.schedule=zb_h1"],
}


def worker(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    from jaxpipe.config import load_config
    from jaxpipe.runtime.trace import TRACE
    from jaxpipe.train.trainer import train
    from tools.bench import stage_times
    from tools.timeline import message_latencies

    comm = MPI.COMM_WORLD
    out = {}
    for name, extra in SCHEDULES.items():
        cfg = load_config(None, [*CPU_BASE, *extra, f"train.steps={args.iters}"])
        TRACE.enable()
        res = train(cfg, log=lambda s: None, probe=lambda run, state: {
            c: [t.fwd, t.bwd, t.input_frac] for c, t in stage_times(run, state).items()})
        events = comm.gather(TRACE.stop(), root=0)
        probes = comm.gather(res.probe, root=0)
        if comm.Get_rank() == 0:
            times = {c: t for p in probes for c, t in p.items()}
            lat = message_latencies(events, kinds="F")
            out[name] = {"iter_times": res.iter_times, "times": [times[c] for c in sorted(times)],
                         "per_message_s": float(np.median(lat)) if lat else 0.0}
            Path(args.json).write_text(json.dumps(out))


def cpu_table(iters: int) -> None:
    from jaxpipe.config import load_config
    from jaxpipe.pipeline.costmodel import Link, StageTime, plan
    from jaxpipe.runtime.launch import mpiexec_command

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "schedules.json"
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
        subprocess.run([*mpiexec_command(), "-n", "4", sys.executable, str(Path(__file__).resolve()), "worker",
                        "--iters", str(iters), "--json", str(path)], cwd=REPO, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        runs = json.loads(path.read_text())
    remainder = None
    print("| schedule | measured s | predicted s | measured / predicted | bubble (free links) | per-message ms |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        cfg = load_config(None, [*CPU_BASE, *SCHEDULES[name]])
        times = [StageTime(*t) for t in r["times"]]
        measured = float(np.median(r["iter_times"][1:]))
        link = Link(per_message_s=r["per_message_s"])
        pipeline_only = plan(cfg, times, link, platform="cpu")
        if remainder is None:  # calibrated once, on the first schedule (GPipe)
            remainder = max(0.0, measured - pipeline_only.iteration_s)
        pred = plan(cfg, times, link, optimizer_s=remainder, platform="cpu")
        print(f"| {name} | {measured:.3f} | {pred.iteration_s:.3f} | {measured / pred.iteration_s:.2f} | "
              f"{pred.bubble:.1%} | {r['per_message_s'] * 1e3:.2f} |")
    print(f"(fixed remainder after the pipeline, from gpipe: {remainder:.3f} s)")


# Stage ceilings (s per iteration of 64 sequences, each rank's stage alone) of GPT-3 XL PP=4, balanced
# 6/7/7/4, 1F1B +2 over NCCL on 4 x H200 (BENCHMARKS.md, second GPU session), by micro-batch size.
H200_CEILINGS = {4: [0.525, 0.618, 0.609, 0.610], 2: [0.591, 0.704, 0.699, 0.670], 1: [0.654, 0.748, 0.761, 0.733]}
H200_LAYERS = [6, 7, 7, 4]
NCCL_MESSAGE_S = 1.4e-3  # one-way per activation message over NCCL on H200 (BENCHMARKS.md transport table)


def xl_table() -> None:
    """GPT-3 XL per schedule at mb 1/2/4, from per-layer, embedding and head times fitted to the ceilings."""
    from jaxpipe.config import load_config
    from jaxpipe.pipeline.costmodel import Link, StageTime, plan
    from jaxpipe.pipeline.partition import config_partition
    from jaxpipe.pipeline.schedule import config_schedule

    rows = []
    for mb, ceilings in H200_CEILINGS.items():
        M = 64 // mb
        # Least squares for (layer, embedding, head) seconds per micro-batch, forward + backward.
        a = np.array([[n, s == 0, s == 3] for s, n in enumerate(H200_LAYERS)], float)
        layer, emb, head = np.linalg.lstsq(a, np.array(ceilings) / M, rcond=None)[0]
        emb, head = max(emb, 0.0), max(head, 0.0)
        for name, extra in [("gpipe", []), ("1f1b +2 warm-up", ["parallel.schedule=1f1b", "parallel.extra_warmup=2"]),
                            ("interleaved_1f1b v=2", ["parallel.schedule=interleaved_1f1b",
                                                      "parallel.virtual_stages=2"]),
                            ("zb_h1", ["parallel.schedule=zb_h1"])]:
            over = ["parallel.schedule=gpipe"] if name == "gpipe" else []
            cfg = load_config("configs/gpt3_xl.yaml", [f"train.micro_batch_size={mb}", "model.remat=none",
                                                       *over, *extra])
            partition = config_partition(cfg, config_schedule(cfg))
            times = []
            for c, (lo, hi) in enumerate(partition.ranges):
                t = (hi - lo) * layer + (emb if c == 0 else 0.0) + (head if c == partition.n_stages - 1 else 0.0)
                times.append(StageTime(t / 3, 2 * t / 3))
            pred = plan(cfg, times, Link(per_message_s=NCCL_MESSAGE_S))
            rows.append((mb, name, partition.counts, pred))
    print("| mb | schedule | layers per chunk | predicted iteration s | bubble (free links) | bound |")
    print("|---|---|---|---|---|---|")
    for mb, name, counts, pred in rows:
        print(f"| {mb} | {name} | {counts} | {pred.iteration_s:.3f} | {pred.bubble:.1%} | {pred.bound} |")
    best = sorted(rows, key=lambda r: r[3].iteration_s)
    print("ranked: " + ", ".join(f"{n} mb {mb} ({p.iteration_s:.3f} s)" for mb, n, _, p in best))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--iters", type=int, default=6)
    w.add_argument("--json", required=True)
    c = sub.add_parser("cpu")
    c.add_argument("--iters", type=int, default=6)
    sub.add_parser("xl")
    args = parser.parse_args()
    if args.cmd == "worker":
        worker(args)
    elif args.cmd == "cpu":
        cpu_table(args.iters)
    else:
        xl_table()


if __name__ == "__main__":
    main()
