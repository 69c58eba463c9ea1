"""Measured per-stage peak device memory against the memory model's prediction (jaxpipe.pipeline.memory),
on GPUs, for the settings the BENCHMARKS.md points do not cover: remat dots/block on stages that keep
residuals across programs, GPipe's M micro-batches held, the split backward (zb_h1), micro-batch 2.

GPT-3 XL's width (d 2048, seq 2048, vocab 50257) with 8 layers at PP=2, batch 16, two steps per setting,
each setting its own `mpiexec` (a failed one costs only itself). Two GPUs (one per stage):

    python tools/memcheck_gpu.py [--json OUT.jsonl]

One GPU shared by both stages (each process gets half of it; the model's check uses each process's own
allocator limit, so the comparison holds):

    python tools/memcheck_gpu.py --share

Prints, per setting and stage, predicted / measured GiB and their ratio, and the range of the ratios
(the error `ERROR_RANGE` in jaxpipe/pipeline/memory.py should cover).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPE = ["model.preset=xl", "model.n_layer=8", "parallel.pp=2", "train.global_batch_size=16", "train.steps=2",
         "train.warmup_steps=1", "model.scan_blocks=false", "runtime.memory_check=warn"]
SETTINGS = {
    "gpipe-dots-mb1": ["parallel.schedule=gpipe", "model.remat=dots", "train.micro_batch_size=1"],
    "gpipe-block-mb2": ["parallel.schedule=gpipe", "model.remat=block", "train.micro_batch_size=2"],
    "1f1b-none-mb1": ["parallel.schedule=1f1b", "model.remat=none", "train.micro_batch_size=1"],
    "1f1b+2-none-mb2": ["parallel.schedule=1f1b", "parallel.extra_warmup=2", "model.remat=none",
                        "train.micro_batch_size=2"],
    "1f1b-dots-mb2": ["parallel.schedule=1f1b", "model.remat=dots", "train.micro_batch_size=2"],
    "zb_h1-none-mb1": ["parallel.schedule=zb_h1", "model.remat=none", "train.micro_batch_size=1"],
    "gpipe-none-mb1-scan": ["parallel.schedule=gpipe", "model.remat=none", "train.micro_batch_size=1",
                            "model.scan_blocks=true", "train.global_batch_size=8"],
}


def one(label: str, sets: list[str], out: str) -> None:
    """Inside the launch: train two steps, then global rank 0 writes predicted and measured peaks."""
    from mpi4py import MPI

    from jaxpipe.config import load_config
    from jaxpipe.pipeline.memory import GiB, rank_memory
    from jaxpipe.train.trainer import train

    cfg = load_config(None, SHAPE + sets)
    res = train(cfg, log=lambda s: None)
    if MPI.COMM_WORLD.Get_rank() == 0:
        import jax

        stats = jax.local_devices()[0].memory_stats() or {}
        predicted = [r.peak / GiB for r in rank_memory(cfg, "gpu")]
        measured = [x / GiB if x is not None else None for x in res.peak_memory]
        row = {"label": label, "sets": sets, "predicted_gib": predicted, "measured_gib": measured,
               "limit_gib": stats.get("bytes_limit", 0) / GiB, "device": jax.local_devices()[0].device_kind}
        Path(out).write_text(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--share", action="store_true", help="both ranks on GPU 0 (CUDA_VISIBLE_DEVICES=0,0)")
    ap.add_argument("--only", nargs="*", default=list(SETTINGS), help="settings to run")
    ap.add_argument("--json", help="append one JSON row per setting")
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--set", nargs="*", default=[], help="more overrides for every setting (last wins)")
    ap.add_argument("--one", nargs=2, metavar=("LABEL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one[0], SETTINGS[args.one[0]] + args.set, args.one[1])
        return
    sys.path.insert(0, str(REPO))
    from jaxpipe.runtime.launch import run_mpi

    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if args.share:
        env |= {"CUDA_VISIBLE_DEVICES": "0,0", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.45"}
    ratios = []
    for label in args.only:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            one_args = [__file__, "--one", label, f.name, *(["--set", *args.set] if args.set else [])]
            try:  # on a timeout every rank ends, not only mpiexec (they hold the GPU)
                run = run_mpi(2, one_args, args.timeout, cwd=REPO, env=env)
            except subprocess.TimeoutExpired:
                print(f"{label}: timed out after {args.timeout:.0f} s", flush=True)
                continue
            text = Path(f.name).read_text()
        if run.returncode != 0 or not text:
            tail = (run.stdout + run.stderr).strip().splitlines()[-3:]
            print(f"{label}: exit {run.returncode}: {' | '.join(tail)}", flush=True)
            continue
        row = json.loads(text)
        cells = []
        for p, m in zip(row["predicted_gib"], row["measured_gib"], strict=True):
            if m:
                ratios.append(p / m)
            cells.append(f"{p:.2f} / {m:.2f} ({p / m:.3f})" if m else f"{p:.2f} / n/a")
        print(f"{label:22s} limit {row['limit_gib']:.1f} GiB on {row['device']}: predicted / measured GiB per stage: "
              + "  ".join(cells), flush=True)
        if args.json:
            with open(args.json, "a") as out:
                out.write(json.dumps(row) + "\n")
    if ratios:
        print(f"predicted / measured: {min(ratios):.3f} .. {max(ratios):.3f} over {len(ratios)} stages")


if __name__ == "__main__":
    main()
