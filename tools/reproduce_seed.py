"""Reproduces the original DT-FM GPT-3 XL tables under jaxpipe's link emulation, next to the cost
model's predictions, and checks the cost model against the original's own numbers.

    python tools/reproduce_seed.py --platform cpu      # small model, messages scaled; 4 ranks on CPU
    python tools/reproduce_seed.py --platform gpu      # GPT-3 XL on 4 GPUs (PP=4; PP=2 x DP=2)
    python tools/reproduce_seed.py --model-only        # only the cost model vs the original's tables
    python tools/reproduce_seed.py --platform cpu --tables pp --codecs none,bfloat16,int8,int4,delta-int4
                                                       # the PP table once per pipeline codec, one launch
    python tools/reproduce_seed.py --platform cpu --tables pp --codecs none,int8,int4_row,int4 \
        --schedules gpipe,gpipe_ring                   # ... per schedule too (one launch and calibration each)

For each table it first runs the configuration with the network off, measuring every stage's
forward and backward time per micro-batch (alone, no communication), the real transport's time per
message, and the iteration; the fixed remainder (optimizer step, host overhead) is taken from that
run. Then it runs the five network settings and prints measured and predicted seconds side by side.
The DP table reports the synchronisation part (what follows the pipeline) separately.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jaxpipe.pipeline.costmodel import ORIGINAL_SETTINGS, Link, StageTime, plan  # noqa: E402
from tools.dtfm_original import (  # noqa: E402
    ORIGINAL_DP4_FP16,
    ORIGINAL_DP4_FP32,
    ORIGINAL_PP_FP16,
    ORIGINAL_PP_FP32,
    original_model,
)

# The CPU stand-in: messages of the tiny model (128 KiB) charged as GPT-3 XL's 8 MiB bf16
# activations, so that link time, not the CPU's compute, dominates as it did in the original.
CPU_COMMON = ["model.n_layer=8", "model.d_model=64", "model.n_head=4", "model.seq_len=128",
              "model.vocab_size=512", "train.global_batch_size=16", "train.micro_batch_size=2",
              "network.size_scale=128", "train.warmup_steps=1"]
PLATFORMS = {
    "cpu": {
        "pp": (4, [*CPU_COMMON, "parallel.pp=4", "parallel.dp=1", "parallel.partition=even"]),
        "dp": (4, [*CPU_COMMON, "parallel.pp=2", "parallel.dp=2", "parallel.dp_mode=central_ps",
                                "train.global_batch_size=32"]),
        "iters": 4,
    },
    "gpu": {
        # GPipe as the original; 64 micro-batches of activations need remat=dots; the tied embedding's
        # gradient crosses the slow link in bfloat16.
        "pp": (4, ["--config", "configs/gpt3_xl.yaml", "train.micro_batch_size=1", "model.remat=dots",
                   "parallel.transport=nccl", "parallel.tied_grad_dtype=bfloat16"]),
        "dp": (4, ["--config", "configs/gpt3_xl.yaml", "model.n_layer=4", "parallel.pp=2", "parallel.dp=2",
                   "train.global_batch_size=128", "train.micro_batch_size=1", "parallel.transport=nccl",
                   "parallel.tied_grad_dtype=bfloat16"]),
        "iters": 3,
    },
}


# Pipeline codecs for `--codecs` (parallel.act_codec / act_grad_codec / act_delta). Delta mode is AQ-SGD's
# setting: activations as int4 changes, gradients in int8.
CODEC_SETS = {
    "none": [],
    "bfloat16": ["parallel.act_codec=bfloat16", "parallel.act_grad_codec=bfloat16"],
    "float8": ["parallel.act_codec=float8", "parallel.act_grad_codec=float8"],
    "int8": ["parallel.act_codec=int8", "parallel.act_grad_codec=int8"],
    "int4": ["parallel.act_codec=int4", "parallel.act_grad_codec=int4"],
    "int4_row": ["parallel.act_codec=int4_row", "parallel.act_grad_codec=int4_row"],
    "delta-int4": ["parallel.act_codec=int4", "parallel.act_delta=true", "parallel.act_grad_codec=int8"],
}
# With codecs the CPU messages are charged 256x, so that bfloat16's 32 KiB message stands for GPT-3 XL's
# 8 MiB bf16 activation (what `none` sends on GPU); the data is a token file of one batch of windows, so
# every step after the first revisits every sample (delta mode's steady state) and all codecs read the same.
CPU_CODEC_SCALE = 256


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    config = None
    overrides = []
    it = iter(args)
    for a in it:
        if a == "--config":
            config = next(it)
        else:
            overrides.append(a)
    return config, overrides


# ---- worker: one mpiexec run --------------------------------------------------------------------------

def worker(args: argparse.Namespace) -> None:
    """Runs the network-off calibration and then every setting in `--settings`, one after another in
    this one launch (start-up and compilation are paid once per table, not once per row)."""
    from mpi4py import MPI

    from jaxpipe.config import load_config
    from jaxpipe.runtime.trace import TRACE
    from jaxpipe.train.trainer import train
    from tools.bench import stage_times, transport_one_way_s
    from tools.timeline import message_latencies, step_mark

    comm = MPI.COMM_WORLD
    settings = json.loads(args.settings)
    codecs = json.loads(args.codecs) if args.codecs else None  # [[name, overrides], ...]

    def probe(run, state):
        program = next(iter(run.programs.values()))
        times = {c: [t.fwd, t.bwd, t.input_frac] for c, t in stage_times(run, state).items()}
        one_way = transport_one_way_s(run)  # the real transport's time per message (no emulation)
        codec_s = None
        if codecs:  # each codec's encode/decode per message on this rank's device (tools/bench.py codec)
            from tools.bench import codec_times

            measured = codec_times(program.act_spec, [c for c, _ in codecs], reps=10, place=program.place_input)
            codec_s = {k: list(dataclasses.astuple(v)) for k, v in measured.items()}
        return times, one_way, codec_s

    runs = [(s, None, []) for s in settings] if not codecs else \
        [(None, None, [])] + [(s, name, extra) for name, extra in codecs for s in settings if s is not None]
    out: dict = {"runs": []}
    for i, (setting, codec, extra) in enumerate(runs):
        net = [] if setting is None else [f"network.delay_ms={setting[0]}", f"network.rate_gbit={setting[1]}"]
        iters = 2 * args.iters if setting is None else args.iters  # the calibration: more iterations
        cfg = load_config(args.config, ["runtime.step_barrier=true", *args.overrides, *extra, *net,
                                        f"train.steps={iters}"])  # the original's timing: a barrier per step
        TRACE.enable()  # each run's last step: message latency, the DP part
        res = train(cfg, log=lambda s: None, probe=probe if i == 0 else None)
        events = comm.gather(TRACE.stop(), root=0)
        dp_part = None
        if comm.Get_rank() == 0:
            # From the last rank's pipeline end to the last rank's end of synchronisation (tied embedding +
            # DP), the part the model predicts as `sync_s`; ranks' clocks start at the step's barrier.
            ends = [step_mark(e, "data-parallel sync done") for e in events]
            pipes = [step_mark(e, "pipeline done") for e in events]
            if None not in ends and None not in pipes:
                dp_part = max(ends) - max(pipes)
        if i == 0:
            probes = comm.gather(res.probe, root=0)
            if comm.Get_rank() == 0:
                P = cfg.parallel.pp
                merged = {c: t for s in range(P) for c, t in probes[s][0].items()}  # replica 0's ranks
                out["stage_times"] = [merged[c] for c in sorted(merged)]
                out["ping_s"] = max(p[1] for p in probes)
                # Replica 0's pipeline is world ranks 0..P-1 (rank = replica * P + stage).
                # Activations only: under GPipe a gradient can wait at its receiver for the forwards
                # to finish, which is the schedule's time, not the transport's.
                lat = message_latencies(events[:P], kinds="F") if P > 1 else []
                out["per_message_s"] = float(np.median(lat)) if lat else out["ping_s"]
                if codecs:  # per codec, the median over replica 0's ranks
                    out["codec_s"] = {c: np.median([probes[r][2][c] for r in range(P)], axis=0).tolist()
                                      for c, _ in codecs}
        out["runs"].append({"setting": setting, "codec": codec, "iter_times": res.iter_times, "sync_s": dp_part})
        if comm.Get_rank() == 0:  # written after every row: a run cut short still leaves its rows
            Path(args.json).write_text(json.dumps(out))


# ---- driver ------------------------------------------------------------------------------------------

def _mpirun(n: int, args: list[str], timeout: float) -> None:
    from jaxpipe.runtime.launch import run_mpi

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
    args = [str(Path(__file__).resolve()), "worker", *args]
    # On a timeout every rank ends (they hold GPUs), SIGTERM first so that they can let go of them.
    done = run_mpi(n, args, timeout, cwd=REPO, env=env, output="discard", grace_s=10)
    if done.returncode:
        raise subprocess.CalledProcessError(done.returncode, ["mpiexec", "-n", str(n), *args])


def run_table(name: str, platform: str, fp16_reference: bool, timeout: float,
              rows_wanted: list[int] | None = None, codecs: list[str] | None = None,
              schedule: str | None = None) -> list[dict]:
    """One launch: the calibration, then every (codec, setting); `schedule` replaces the table's
    parallel.schedule (its own calibration: each schedule has its own chunks and stage times)."""
    from jaxpipe.config import load_config
    from jaxpipe.pipeline.costmodel import CodecTimes

    n, spec = PLATFORMS[platform][name]
    iters = PLATFORMS[platform]["iters"]
    config, overrides = _split(spec)
    if schedule:
        overrides = [*overrides, f"parallel.schedule={schedule}"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if codecs:
            overrides = [*overrides, *_codec_data(Path(tmp), platform, load_config(config, overrides))]
        out = Path(tmp) / f"{name}.json"
        sets = [a for o in overrides for a in ("--set", o)]
        wanted = rows_wanted if rows_wanted is not None else list(range(len(ORIGINAL_SETTINGS)))
        settings = [None] + [[ORIGINAL_SETTINGS[i][1], ORIGINAL_SETTINGS[i][2]] for i in wanted]
        args = ["--iters", str(iters), "--settings", json.dumps(settings)] + (["--config", config] if config else [])
        if codecs:
            args += ["--codecs", json.dumps([[c, CODEC_SETS[c]] for c in codecs])]
        try:
            _mpirun(n, [*args, *sets, "--json", str(out)], timeout)
        except subprocess.TimeoutExpired:  # keep the rows that finished
            print(f"  {name} table: stopped after {timeout:.0f} s (--timeout); reporting the rows that ran",
                  flush=True)
        if not out.exists():
            return rows
        result = json.loads(out.read_text())
    off, runs = result["runs"][0], result["runs"][1:]
    cfg = load_config(config, overrides)
    times = [StageTime(*t) for t in result["stage_times"]]
    per_msg = result["per_message_s"]
    measured_off = float(np.median(off["iter_times"][1:]))
    pred_off = plan(cfg, times, Link(per_message_s=per_msg), platform=platform)
    other = max(0.0, measured_off - pred_off.iteration_s)
    stage_ms = [(round(t.fwd * 1e3, 1), round(t.bwd * 1e3, 1)) for t in times]
    print(f"  calibration ({name}, network off): measured {measured_off:.3f} s, modelled "
          f"{pred_off.iteration_s:.3f} s -> fixed remainder {other:.3f} s; real transport "
          f"{per_msg * 1e3:.2f} ms per message in the pipeline (idle ping-pong "
          f"{result.get('ping_s', 0) * 1e3:.2f} ms); stage fwd/bwd ms {stage_ms}", flush=True)
    ref_pp = ORIGINAL_PP_FP16 if fp16_reference else ORIGINAL_PP_FP32
    ref_dp = ORIGINAL_DP4_FP16 if fp16_reference else ORIGINAL_DP4_FP32
    order = [(i, None) for i in wanted] if not codecs else [(i, c) for c in codecs for i in wanted]
    for (i, codec), r in zip(order, runs, strict=False):
        label, delay, rate = ORIGINAL_SETTINGS[i]
        measured = float(np.median(r["iter_times"][1:]))
        row_cfg = load_config(config, [*overrides, *CODEC_SETS[codec]]) if codec else cfg
        codec_s = CodecTimes(*result["codec_s"][codec]) if codec else None
        pred = plan(row_cfg, times, Link.of(delay, rate, per_msg), optimizer_s=other, platform=platform,
                    codec_times=codec_s)
        rows.append({"setting": label, "codec": codec, "schedule": cfg.parallel.schedule,
                     "original_s": (ref_pp if name == "pp" else ref_dp)[i],
                     "measured_s": measured, "predicted_s": pred.iteration_s,
                     "predicted_sync_s": pred.sync_s, "measured_sync_s": r.get("sync_s"), "bound": pred.bound,
                     "iter_times": r["iter_times"]})
        print(f"  ran {name} {cfg.parallel.schedule} {codec or ''} {label}: {measured:.3f} s "
              f"(predicted {pred.iteration_s:.3f} s)", flush=True)
    if codecs:
        print("  codec encode/decode ms per message (act enc, act dec, grad enc, grad dec): " + "; ".join(
            f"{c} " + ",".join(f"{v * 1e3:.2f}" for v in result["codec_s"][c]) for c in codecs), flush=True)
    return rows


def _codec_data(tmp: Path, platform: str, cfg) -> list[str]:
    """Overrides for the codec tables: the bytes scale and a token file of one global batch of windows."""
    m, t = cfg.model, cfg.train
    tokens = tmp / "tokens.bin"
    n = t.global_batch_size // cfg.parallel.dp * cfg.parallel.dp
    np.random.default_rng(0).integers(0, m.vocab_size, n * m.seq_len + 1).astype(np.uint16).tofile(tokens)
    scale = [f"network.size_scale={CPU_CODEC_SCALE}"] if platform == "cpu" else []
    return [*scale, "data.source=tokens", f"data.path={tokens}", "data.dtype=uint16"]


def print_model_check() -> bool:
    print("Cost model vs the original's published tables (tools/dtfm_original.original_model)")
    ok = 0
    total = 0
    for title, fp16, dp, ref in [("PP fp32", False, 1, ORIGINAL_PP_FP32), ("PP fp16", True, 1, ORIGINAL_PP_FP16),
                                 ("PP+DP4 fp32", False, 4, ORIGINAL_DP4_FP32),
                                 ("PP+DP4 fp16", True, 4, ORIGINAL_DP4_FP16)]:
        preds = original_model(fp16, dp)
        print(f"| {title:12s} | " + " | ".join(f"{lab}" for lab, _, _ in ORIGINAL_SETTINGS) + " |")
        cells = []
        for p, r in zip(preds, ref, strict=True):
            ratio = p.iteration_s / r
            total += 1
            ok += abs(ratio - 1) <= 0.20
            cells.append(f"{r:.2f} / {p.iteration_s:.2f} ({ratio:.2f})")
        print("| original / predicted (ratio) | " + " | ".join(cells) + " |")
    print(f"{ok} of {total} rows within 20%")
    return ok == total


def print_codec_table(name: str, platform: str, rows: list[dict]) -> None:
    bf16 = {r["setting"]: r["measured_s"] for r in rows if r["codec"] == "bfloat16"}
    print(f"\n{name.upper()} ({platform}) | schedule | codec | network | measured s | predicted s | "
          f"measured/predicted | bound | iteration / bfloat16's")
    for r in rows:
        over = f"{r['measured_s'] / bf16[r['setting']]:.2f}" if r["setting"] in bf16 else "-"
        print(f"{r['schedule']:10s} | {r['codec']:10s} | {r['setting']:28s} | {r['measured_s']:.3f} | "
              f"{r['predicted_s']:.3f} | {r['measured_s'] / r['predicted_s']:.2f} | {r['bound']} | {over}")
    if rows:
        worst = max(r["measured_s"] / r["predicted_s"] for r in rows)
        print(f"worst measured/predicted {worst:.2f} (target <= 1.15)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--config")
    w.add_argument("--set", dest="overrides", action="append", default=[])
    w.add_argument("--iters", type=int, default=4)
    w.add_argument("--json", required=True)
    w.add_argument("--settings", required=True, help="JSON list: null (network off) or [delay_ms, rate_gbit]")
    w.add_argument("--codecs", help="JSON list of [name, overrides]: every setting once per codec")
    parser.add_argument("--platform", choices=list(PLATFORMS), default="cpu")
    parser.add_argument("--model-only", action="store_true")
    parser.add_argument("--tables", default="pp,dp")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--rows", help="comma-separated indices of the five settings to run (default: all)")
    parser.add_argument("--json-out", help="write all rows here")
    parser.add_argument("--codecs", help=f"comma-separated pipeline codecs ({', '.join(CODEC_SETS)}): the tables "
                        "run once per codec in the same launch, with each codec's iteration over bfloat16's")
    parser.add_argument("--schedules", help="comma-separated parallel.schedule values (e.g. gpipe,gpipe_ring): "
                        "each table once per schedule, a launch and a calibration each (default: the table's)")
    args = parser.parse_args()
    if args.cmd == "worker":
        worker(args)
        return
    print_model_check()
    if args.model_only:
        return
    fp16 = args.platform == "gpu"  # bf16 runs compare against the original's fp16 column
    results = {}
    for name in args.tables.split(","):
        print(f"\nrunning the {name} table on {args.platform} ...", flush=True)
        rows = [int(i) for i in args.rows.split(",")] if args.rows else None
        results[name] = []
        for schedule in (args.schedules.split(",") if args.schedules else [None]):
            results[name] += run_table(name, args.platform, fp16, args.timeout, rows,
                                       args.codecs.split(",") if args.codecs else None, schedule)
    for name, rows in results.items():
        if args.codecs:
            print_codec_table(name, args.platform, rows)
            continue
        col = "PP" if name == "pp" else "PP+DP"
        print(f"\n{col} ({args.platform}) | original s | jaxpipe measured s | predicted s | measured/predicted "
              f"| bound" + (" | measured sync s | predicted sync s" if name == "dp" else ""))
        for r in rows:
            dp = r.get("measured_sync_s")
            dp_cell = f" | {dp:.3f}" if dp is not None else " | -"
            extra = f"{dp_cell} | {r['predicted_sync_s']:.3f}" if name == "dp" else ""
            print(f"{r['setting']:28s} | {r['original_s']:.2f} | {r['measured_s']:.3f} | {r['predicted_s']:.3f} | "
                  f"{r['measured_s'] / r['predicted_s']:.2f} | {r['bound']}{extra}")
        if not rows:
            continue
        meas = [r["measured_s"] for r in rows]
        pred = [r["predicted_s"] for r in rows]
        same_rank = list(np.argsort(meas)) == list(np.argsort(pred))
        worst = max(m / p for m, p in zip(meas, pred, strict=True))
        print(f"worst measured/predicted {worst:.2f} (target <= 1.15); ranking of settings matches: {same_rank}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
