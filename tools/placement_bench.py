"""Placement results: DT-FM's five scenarios (planned, not run) and a placed run on CPU (measured).

    python tools/placement_bench.py dtfm [--budget S] [--json-out rows.json]   # the five scenarios, 64 ranks
    python tools/placement_bench.py [--iters 6] [--json-out rows.json]         # the measured CPU run

`dtfm`: GPT-3 XL with DT-FM's workload (configs/dtfm_xl.yaml: 8 stages x 8 replicas, 488 sequences),
for each scenario the predicted iteration (jaxpipe's model, each layout with its best settings) of
the listed rank order, of jaxpipe's launch order on the ranks shuffled with seed 7 (the anchors'
shuffle), and of jaxpipe's placement of those shuffled ranks; DT-FM's cost of each
(`jaxpipe.plan.dtfm`); and jaxpipe's search run on DT-FM's own objective, next to DT-FM's own
result (tools/dtfm_original.py).

The measured run:
Eight ranks, PP=4 x DP=2, the tiny CPU model with XL-equivalent activation bytes (`network.size_scale`:
the float32 64 KiB activation charged as GPT-3 XL's 8 MiB bf16 one), on an emulated two-region cluster
(`network.matrix`: 1 ms / 10 Gbit/s inside a region, 50 ms / 0.5 Gbit/s across) whose ranks alternate
between the regions, so the launch order runs every pipeline link across the slow path.

1. calibration, one `mpiexec` (network off): each chunk's forward and backward time per micro-batch
   (alone, no communication), the real transport's time per message and the iteration; what the model
   leaves over (optimizer step, host overhead) is the fixed remainder;
2. `plan_layout` with those times chooses the layout (shape and micro-batch kept) and the schedule and
   DP mode, and predicts it and the launch order with the same settings;
3. one `mpiexec` runs the launch order and then the placed layout, both with those settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = ["model.n_layer=8", "model.d_model=64", "model.n_head=4", "model.seq_len=128", "model.vocab_size=512",
         "train.global_batch_size=64", "train.micro_batch_size=2", "network.size_scale=128",
         "train.warmup_steps=1", "parallel.pp=4", "parallel.dp=2"]


def dtfm_table(args: argparse.Namespace) -> None:
    from jaxpipe.config import load_config
    from jaxpipe.plan import dtfm
    from jaxpipe.plan.cluster import DTFM_CASES, dtfm_scenario
    from jaxpipe.plan.grid import launch_grid
    from jaxpipe.plan.search import best_for_grid, plan_layout
    from tools.dtfm_original import GA, SHUFFLED_LAUNCH

    cfg = load_config(REPO / "configs" / "dtfm_xl.yaml")
    sizes = dtfm.ANCHOR_SIZES
    rows = []
    for case, ga, anchor_launch in zip(DTFM_CASES, GA, SHUFFLED_LAUNCH, strict=True):
        listed = dtfm_scenario(case)
        shuffled = listed.shuffled(7)
        t0 = time.perf_counter()
        res = plan_layout(shuffled, cfg, time_budget_s=args.budget)
        plan_s = time.perf_counter() - t0
        on_dtfm = plan_layout(shuffled, cfg, time_budget_s=args.budget, objective="dtfm", dtfm_sizes=sizes,
                              search=["placement"])
        listed_c = best_for_grid(listed, cfg, launch_grid(8, 8))
        launch_c = best_for_grid(shuffled, cfg, launch_grid(8, 8))
        dtfm_c = best_for_grid(shuffled, cfg, on_dtfm.best.grid)
        row = {
            "case": case, "plan_s": plan_s, "anchor_ga": ga, "anchor_launch": anchor_launch,
            "listed_s": listed_c.iteration_s, "launch_s": launch_c.iteration_s, "placed_s": res.best.iteration_s,
            "placed_settings": res.best.settings.describe(), "placed_bound": res.best.prediction.bound,
            "launch_settings": launch_c.settings.describe(), "dtfm_objective_s": dtfm_c.iteration_s,
            "dtfm_listed": dtfm.layout_cost(listed, listed_c.grid, sizes).total,
            "dtfm_launch": dtfm.layout_cost(shuffled, launch_grid(8, 8), sizes).total,
            "dtfm_launch_groups": dtfm.partition_cost(shuffled, launch_grid(8, 8), sizes)[0].total,
            "dtfm_placed": dtfm.layout_cost(shuffled, res.best.grid, sizes).total,
            "dtfm_objective": dtfm.layout_cost(shuffled, on_dtfm.best.grid, sizes).total,
            "layouts_scored": res.stats["layouts_scored"], "layouts_simulated": res.stats["layouts_simulated"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| case | listed order s | shuffled launch order s | jaxpipe placement s | launch / placed | "
          "DT-FM cost: listed / shuffled launch (its groups) / jaxpipe placement / jaxpipe search on DT-FM's "
          "objective | DT-FM GA (anchor) | plan s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['listed_s']:.2f} | {r['launch_s']:.2f} | **{r['placed_s']:.2f}** | "
              f"{r['launch_s'] / r['placed_s']:.2f}x | {r['dtfm_listed']:.2f} / {r['dtfm_launch']:.2f} "
              f"({r['dtfm_launch_groups']:.2f}) / {r['dtfm_placed']:.2f} / **{r['dtfm_objective']:.2f}** | "
              f"{r['anchor_ga']:.2f} | {r['plan_s']:.1f} |")
    print("\nRankings of the four layouts (listed L, shuffled launch S, jaxpipe placement J, jaxpipe's search on "
          "DT-FM's objective T), fastest first:")
    for r in rows:
        names = {"L": ("listed_s", "dtfm_listed"), "S": ("launch_s", "dtfm_launch"), "J": ("placed_s", "dtfm_placed"),
                 "T": ("dtfm_objective_s", "dtfm_objective")}
        by_j = sorted(names, key=lambda k: r[names[k][0]])
        by_d = sorted(names, key=lambda k: r[names[k][1]])
        pairs = [(a, b) for i, a in enumerate("LSJT") for b in "LSJT"[i + 1:]]
        discord = [f"{a}{b}" for a, b in pairs
                   if (r[names[a][0]] - r[names[b][0]]) * (r[names[a][1]] - r[names[b][1]]) < 0]
        print(f"  {r['case']}: jaxpipe {' < '.join(by_j)} | DT-FM {' < '.join(by_d)} | disagree on "
              f"{', '.join(discord) or 'none'}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))


def worker(args: argparse.Namespace) -> None:
    """Runs each of `--runs` (a JSON list of override lists) in turn in this one launch; with
    `--calibrate` the first also measures stage times and the per-message cost."""
    from mpi4py import MPI

    from jaxpipe.config import load_config
    from jaxpipe.train.trainer import train
    from tools.bench import stage_times, transport_one_way_s

    comm = MPI.COMM_WORLD
    out: dict = {"runs": []}

    def probe(run, state):
        times = {c: [t.fwd, t.bwd, t.input_frac] for c, t in stage_times(run, state).items()}
        one_way = transport_one_way_s(run)  # the real transport's time per message
        topo = run.topo
        return times, one_way, topo.stage, topo.replica

    for i, overrides in enumerate(json.loads(args.runs)):
        cfg = load_config(None, [*overrides, f"train.steps={args.iters}"])
        res = train(cfg, log=lambda s: None, probe=probe if (args.calibrate and i == 0) else None)
        if args.calibrate and i == 0:
            probes = comm.gather(res.probe, root=0)
            if comm.Get_rank() == 0:
                merged = {c: t for times, _, _, rep in probes if rep == 0 for c, t in times.items()}
                out["stage_times"] = [merged[c] for c in sorted(merged)]
                out["per_message_s"] = max(p[1] for p in probes)
        out["runs"].append({"overrides": overrides, "iter_times": res.iter_times})
        if comm.Get_rank() == 0:
            Path(args.json).write_text(json.dumps(out))


def _mpirun(n: int, args: list[str], timeout: float) -> None:
    import os
    import subprocess

    from jaxpipe.runtime.launch import run_mpi

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
    args = [str(Path(__file__).resolve()), "worker", *args]
    done = run_mpi(n, args, timeout, cwd=REPO, env=env, output="inherit")
    if done.returncode:
        raise subprocess.CalledProcessError(done.returncode, ["mpiexec", "-n", str(n), *args])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--runs", required=True)
    w.add_argument("--iters", type=int, default=6)
    w.add_argument("--json", required=True)
    w.add_argument("--calibrate", action="store_true")
    d = sub.add_parser("dtfm")
    d.add_argument("--budget", type=float, default=None, help="seconds of annealing per plan (default: plan's)")
    d.add_argument("--json-out")
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--skip", type=int, default=2, help="iterations dropped before the mean (compilation)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    if args.cmd == "worker":
        worker(args)
        return
    if args.cmd == "dtfm":
        dtfm_table(args)
        return

    from jaxpipe.comm.topology import write_placement
    from jaxpipe.config import load_config
    from jaxpipe.pipeline.costmodel import StageTime
    from jaxpipe.plan.cluster import two_region_cluster
    from jaxpipe.plan.grid import launch_grid
    from jaxpipe.plan.search import best_for_grid, plan_layout

    with tempfile.TemporaryDirectory() as tmp:
        cluster_file, placement = Path(tmp) / "cluster8.yaml", Path(tmp) / "placement.yaml"
        cluster = two_region_cluster(8, inside=(1.0, 10.0), across=(50.0, 0.5), alternate=True)
        cluster.save(cluster_file)
        cal = Path(tmp) / "calibration.json"
        t0 = time.time()
        _mpirun(8, ["--calibrate", "--iters", str(args.iters), "--runs", json.dumps([MODEL]), "--json", str(cal)],
                args.timeout)
        calib = json.loads(cal.read_text())
        times = [StageTime(*t) for t in calib["stage_times"]]
        per_msg = calib["per_message_s"]
        cfg = load_config(None, MODEL)
        measured_off = float(np.mean(calib["runs"][0]["iter_times"][args.skip:]))
        # The network-off run through the same model: what it leaves over is the fixed remainder.
        from jaxpipe.comm.cluster import uniform_cluster

        off = best_for_grid(uniform_cluster(8, 0.0, 1e6), cfg, launch_grid(4, 2), search=[], platform="cpu",
                            stage_times=times, per_message_s=per_msg)
        remainder = max(0.0, measured_off - off.iteration_s)
        print(f"calibration (network off, {time.time() - t0:.0f} s): measured {measured_off:.3f} s, modelled "
              f"{off.iteration_s:.3f} s -> fixed remainder {remainder:.3f} s; transport {per_msg * 1e3:.2f} ms per "
              f"message; stage fwd/bwd ms {[(round(t.fwd * 1e3, 1), round(t.bwd * 1e3, 1)) for t in times]}",
              flush=True)
        res = plan_layout(cluster, cfg, search=["placement", "schedule", "dp_mode"], platform="cpu",
                          stage_times=times, per_message_s=per_msg, optimizer_s=remainder)
        s = res.best.settings
        write_placement(placement, res.layout, s.pp, s.dp, settings=s.overrides())
        launch = res.launch_same
        assert launch is not None
        print(f"plan ({res.stats['seconds']:.1f} s): {s.describe()}", flush=True)
        print(f"  placed predicted {res.best.iteration_s:.3f} s ({res.best.prediction.bound}); launch order "
              f"predicted {launch.iteration_s:.3f} s ({launch.prediction.bound})", flush=True)
        common = [*MODEL, f"network.matrix={cluster_file}", *[o for o in s.overrides()
                                                             if not o.startswith(("parallel.pp=", "parallel.dp="))]]
        runs = [common, [*common, f"parallel.placement={placement}"]]
        meas = Path(tmp) / "runs.json"
        t0 = time.time()
        _mpirun(8, ["--iters", str(args.iters), "--runs", json.dumps(runs), "--json", str(meas)], args.timeout)
        got = json.loads(meas.read_text())["runs"]
        m_launch, m_placed = (float(np.mean(r["iter_times"][args.skip:])) for r in got)
        print(f"measured ({time.time() - t0:.0f} s): launch order {m_launch:.3f} s, placed {m_placed:.3f} s "
              f"(iterations: {[round(x, 3) for x in got[0]['iter_times']]} / "
              f"{[round(x, 3) for x in got[1]['iter_times']]})")
        gain_m, gain_p = m_launch / m_placed, launch.iteration_s / res.best.iteration_s
        print(f"gain (launch / placed): measured {gain_m:.2f}x, predicted {gain_p:.2f}x -> measured / predicted "
              f"{gain_m / gain_p:.2f} (target >= 0.85)")
        print("layout:\n" + "\n".join(f"  replica {r}: " + " ".join(
            f"{res.best.grid[st][r]}{cluster.label(res.best.grid[st][r])}" for st in range(s.pp))
            for r in range(s.dp)))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({
                "settings": s.overrides(), "placement": res.layout, "measured_launch_s": m_launch,
                "measured_placed_s": m_placed, "predicted_launch_s": launch.iteration_s,
                "predicted_placed_s": res.best.iteration_s, "calibration_s": measured_off, "remainder_s": remainder,
                "per_message_s": per_msg, "stage_times": calib["stage_times"], "iter_times": [r["iter_times"]
                                                                                             for r in got]}, indent=1))


if __name__ == "__main__":
    main()
