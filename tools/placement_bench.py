"""Placement results: DT-FM's five scenarios (planned, not run) and a placed run on CPU (measured).

    python tools/placement_bench.py dtfm [--budget S] [--json-out rows.json]   # the five scenarios, 64 ranks
    python tools/placement_bench.py [--iters 6] [--json-out rows.json]         # the measured CPU run
    python tools/placement_bench.py cities [--max-loss-increase X% | --set parallel.dp_mode=diloco] [--json-out f]
    python tools/placement_bench.py exposed [--ranks 8] [--set KEY=VALUE] [--json-out f]

`cities` (issue 23, "Measured on CPU"): a cluster file of two regions (default
configs/clusters/two_regions_8.yaml: 1 ms / 100 Gbit/s inside, 100 ms / 200 Mbit/s across), the demo
corpus model (configs/tiny_text.yaml, micro-batch 1, 32-token sequences) at PP = n/2 x DP = 2 with `network.size_scale`
= GPT-3 XL's parameters / the model's (the bytes that cross the slow links with DiLoCo are a stage's
parameters; the activation bytes this charges are printed next to XL's). A calibration launch
(network off), then the layout search with those times twice: with DiLoCo allowed (a loss budget, or
keys pinned with --set, as `jaxpipe plan`) and lossless (the best exact-DP layout). One launch then
runs the planned layout with the network on and off, the exact-DP layout with the network on (a few
steps: over the slow links it is slow) and off (as many steps as the planned run: its losses, which
neither emulation nor placement change). Steady state: a window of whole rounds of H steps after two
rounds of outer steps (compilation). Prints and writes measured vs predicted iteration, network-off /
planned, and the losses at equal tokens.

`exposed` (issue 23 item 5): Streaming DiLoCo, blocking DiLoCo at the same H, and the same layout with
no exchange in the window, at 10 ms / 1 Gbit/s (shared egress per rank, as netem on a NIC) with XL's
DP bytes, in one launch: the share of the iteration each adds over the no-exchange run, and the time
inside the DP calls from the per-step metrics (`dp_s`, the slowest rank's).

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
    `--calibrate` the first also measures stage times and the per-message cost. Per run: the step
    times and losses, and from its per-step metrics the DP part of each step (`dp_s`, the slowest
    rank's), the DP bytes and the validation losses."""
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
        cfg = load_config(args.config, [*overrides, *([] if any(o.startswith("train.steps=") for o in overrides)
                                                       else [f"train.steps={args.iters}"])])
        metrics = Path(args.json).with_suffix(f".run{i}.jsonl")
        res = train(cfg, log=lambda s: None, probe=probe if (args.calibrate and i == 0) else None,
                    metrics_out=metrics)
        if args.calibrate and i == 0:
            probes = comm.gather(res.probe, root=0)
            if comm.Get_rank() == 0:
                merged = {c: t for times, _, _, rep in probes if rep == 0 for c, t in times.items()}
                out["stage_times"] = [merged[c] for c in sorted(merged)]
                out["per_message_s"] = max(p[1] for p in probes)
        row: dict = {"overrides": overrides, "iter_times": res.iter_times, "losses": res.losses}
        if comm.Get_rank() == 0:
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            steps = [r for r in rows if "loss" in r]
            row.update(dp_s=[r.get("dp_s", 0.0) for r in steps], dp_bytes=[r.get("dp_bytes", 0) for r in steps],
                       val_losses={str(r["step"]): r["val_loss"] for r in rows if "val_loss" in r})
        out["runs"].append(row)
        if comm.Get_rank() == 0:
            Path(args.json).write_text(json.dumps(out))


def _mpirun(n: int, args: list[str], timeout: float, config: str | None = None) -> None:
    import os
    import subprocess

    from jaxpipe.runtime.launch import run_mpi

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
    args = [str(Path(__file__).resolve()), "worker", *args, *(["--config", config] if config else [])]
    done = run_mpi(n, args, timeout, cwd=REPO, env=env, output="inherit")
    if done.returncode:
        raise subprocess.CalledProcessError(done.returncode, ["mpiexec", "-n", str(n), *args])


# ---- Across cities (issue 23): the planned layout with DiLoCo, the network off, the best exact DP -------

# Sequences of 32 tokens: with XL's DP bytes (size_scale 794) an activation is charged 12 MiB, 1.5 x XL's.
CITIES_DEFAULTS = ["train.checkpoint_every=0", "train.checkpoint_dir=null", "train.log_every=100000",
                   "train.eval_every=0", "train.micro_batch_size=1", "model.seq_len=32"]
LOSSY = ("parallel.dp_mode", "parallel.diloco_", "parallel.grad_codec", "parallel.act_codec", "parallel.act_grad_codec")


def xl_scale(cfg) -> float:
    """`network.size_scale` that charges this model's DP bytes as GPT-3 XL's: the parameter counts' ratio
    (what crosses the slow links in DiLoCo is a stage's parameters)."""
    from jaxpipe.config import load_config
    from jaxpipe.model.layout import param_count

    return float(round(param_count(load_config(REPO / "configs" / "gpt3_xl.yaml").model) / param_count(cfg.model)))


def stands_for(cfg) -> dict:
    """What the scaled bytes stand for next to GPT-3 XL (PP = the config's, micro-batch 1, bf16 activations)."""
    from jaxpipe.config import load_config
    from jaxpipe.model.layout import param_count

    xl = load_config(REPO / "configs" / "gpt3_xl.yaml").model
    m, s = cfg.model, cfg.network.size_scale
    act = cfg.train.micro_batch_size * m.seq_len * m.d_model * 4 * s  # float32 on CPU
    xl_act = xl.seq_len * xl.d_model * 2
    return {"size_scale": s, "dp_bytes_vs_xl": param_count(m) * s / param_count(xl),
            "activation_bytes_vs_xl": act / xl_act, "activation_mib": act / 2**20}


def _steady(values: list[float], lo: int, hi: int) -> float:
    """Mean of steps lo+1..hi (1-based), the window that holds whole DiLoCo rounds."""
    window = values[lo:hi]
    if not window:
        raise SystemExit(f"no steps in the window {lo + 1}..{hi}: raise --rounds or lower --skip")
    return float(np.mean(window))


def _window(algo, skip: int | None, rounds: int, iters: int) -> tuple[int, int, int]:
    """(steps to drop, last step of the window, steps to run): after two rounds of outer steps of every
    fragment and their merges (measured on CPU: the first outer step compiles, the second still pays
    seconds more, from the third on they are steady), `rounds` whole rounds of H steps, then the run's
    last step (its extra blocking outer step is not a steady-state step)."""
    if algo.diloco:
        lo = skip if skip is not None else 2 * algo.inner_steps + algo.overlap_steps + 1
        hi = lo + rounds * algo.inner_steps
    else:
        lo = skip if skip is not None else 2
        hi = lo + iters
    return lo, hi, hi + 1


def _run_sets(base: list[str], settings, placement: Path | None, matrix: str | None, steps: int) -> list[str]:
    keep = [o for o in settings.overrides() if not o.startswith(("parallel.pp=", "parallel.dp="))]
    return [*base, *keep, f"train.steps={steps}", *([f"parallel.placement={placement}"] if placement else []),
            *([f"network.matrix={matrix}"] if matrix else [])]


def _calibrate(n: int, config: str, base: list[str], args: argparse.Namespace, tmp: Path, log) -> tuple:
    """Stage times, per-message time and the fixed remainder (what the model leaves over), network off."""
    from jaxpipe.comm.cluster import uniform_cluster
    from jaxpipe.config import load_config
    from jaxpipe.pipeline.costmodel import StageTime
    from jaxpipe.plan.grid import launch_grid
    from jaxpipe.plan.search import best_for_grid

    cal = tmp / "calibration.json"
    t0 = time.time()
    _mpirun(n, ["--calibrate", "--iters", str(args.calib_iters), "--runs", json.dumps([base]), "--json", str(cal)],
            args.timeout, config)
    calib = json.loads(cal.read_text())
    times = [StageTime(*t) for t in calib["stage_times"]]
    cfg = load_config(config, base)
    measured = float(np.mean(calib["runs"][0]["iter_times"][2:]))
    off = best_for_grid(uniform_cluster(n, 0.0, 1e6), cfg, launch_grid(cfg.parallel.pp, cfg.parallel.replicas),
                        search=[], platform="cpu", stage_times=times, per_message_s=calib["per_message_s"])
    remainder = max(0.0, measured - off.iteration_s)
    log(f"calibration (network off, {time.time() - t0:.0f} s): measured {measured:.3f} s, modelled "
        f"{off.iteration_s:.3f} s -> fixed remainder {remainder:.3f} s; transport "
        f"{calib['per_message_s'] * 1e3:.2f} ms per message; stage fwd/bwd ms "
        f"{[(round(t.fwd * 1e3, 1), round(t.bwd * 1e3, 1)) for t in times]}")
    return times, calib["per_message_s"], remainder, calib


def cities(args: argparse.Namespace) -> None:
    """The planned layout (DiLoCo allowed by --max-loss-increase, or pinned with --set), the same run with
    the network off, and the best exact-DP layout (its loss from a network-off run of as many steps:
    emulation and placement change when values move, not which), all in one launch after a calibration."""
    from jaxpipe.comm.cluster import load_cluster
    from jaxpipe.comm.topology import write_placement
    from jaxpipe.config import load_config, parse_override
    from jaxpipe.plan.quality import parse_budget
    from jaxpipe.plan.search import format_layout, plan_layout

    out: list[str] = []

    def log(line: str) -> None:
        out.append(line)
        print(line, flush=True)

    cluster = load_cluster(args.cluster)
    n = cluster.n
    config = args.config
    user = list(args.set)
    pinned = {parse_override(o)[0] for o in user}
    shape = [f"parallel.pp={n // 2}", "parallel.dp=2"]
    scale = args.size_scale or xl_scale(load_config(config, [*CITIES_DEFAULTS, *shape, *user]))
    base = [*CITIES_DEFAULTS, *shape, f"network.size_scale={scale:g}", *user]
    cfg = load_config(config, base)
    log(f"cluster {args.cluster} ({n} ranks: {cluster.source}); model {config} "
        f"({json.dumps(stands_for(cfg))}); pinned {sorted(pinned) or 'nothing'}; loss budget "
        f"{args.max_loss_increase or 'none'}")
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        calib_base = [o for o in base if not o.startswith(LOSSY)]  # exact DP: the stage times only
        times, per_msg, remainder, calib = _calibrate(n, config, calib_base, args, tmp, log)
        plan_kw = dict(platform="cpu", stage_times=times, per_message_s=per_msg, optimizer_s=remainder,
                       time_budget_s=args.budget)
        planned = plan_layout(cluster, cfg, pinned=pinned, max_loss_increase=parse_budget(args.max_loss_increase),
                              **plan_kw)
        exact_cfg = load_config(config, [o for o in base if not o.startswith(LOSSY)])
        exact = plan_layout(cluster, exact_cfg, pinned={k for k in pinned if not k.startswith(LOSSY)},
                            max_loss_increase=None, **plan_kw)
        ps, es = planned.best.settings, exact.best.settings
        lo, hi, steps = _window(ps.algo, args.skip, args.rounds, args.iters)
        e_lo, e_hi, e_steps = _window(es.algo, 1, 1, args.exact_iters)  # (exact DP over the slow links is slow)
        log(f"planned: {ps.describe()}\n  predicted {planned.best.iteration_s:.3f} s "
            f"({planned.best.prediction.bound}); {planned.best.prediction.explanation}\n" +
            "".join(f"  quality row: {r.describe()}\n" for r in ps.algo.rows)
            + format_layout(cluster, planned.best.grid))
        log(f"best exact DP: {es.describe()}\n  predicted {exact.best.iteration_s:.3f} s "
            f"({exact.best.prediction.bound})\n" + format_layout(cluster, exact.best.grid))
        p_file, e_file = tmp / "planned.yaml", tmp / "exact.yaml"
        write_placement(p_file, planned.layout, ps.pp, ps.dp, settings=ps.overrides())
        write_placement(e_file, exact.layout, es.pp, es.dp, settings=es.overrides())
        net_off = [o for o in base if not o.startswith("network.matrix")]
        ev = [f"train.eval_every={steps}"]
        runs = {"planned": _run_sets(base + ev, ps, p_file, args.cluster, steps),
                "planned_network_off": _run_sets(net_off + ev, ps, p_file, None, steps),
                "exact": _run_sets(base, es, e_file, args.cluster, e_steps),
                "exact_network_off": _run_sets(net_off + ev, es, e_file, None, steps)}
        log(f"runs ({steps} steps; window: steps {lo + 1}..{hi}; exact DP timed over steps {e_lo + 1}..{e_hi} of "
            f"{e_steps}):")
        meas = tmp / "runs.json"
        t0 = time.time()
        _mpirun(n, ["--runs", json.dumps(list(runs.values())), "--json", str(meas)], args.timeout, config)
        got = dict(zip(runs, json.loads(meas.read_text())["runs"], strict=True))
    wall = time.time() - t0
    m_plan = _steady(got["planned"]["iter_times"], lo, hi)
    m_off = _steady(got["planned_network_off"]["iter_times"], lo, hi)
    m_exact = _steady(got["exact"]["iter_times"], e_lo, e_hi)
    p_plan, p_exact = planned.best.iteration_s, exact.best.iteration_s

    def final(run: dict) -> dict:
        last = run["losses"][-args.loss_window:]
        val = run.get("val_losses", {}).get(str(len(run["losses"])))
        return {"final_train_loss": run["losses"][-1], f"mean_train_loss_last_{len(last)}": float(np.mean(last)),
                "val_loss": val}

    q_plan, q_exact = final(got["planned"]), final(got["exact_network_off"])
    key = "val_loss" if q_plan["val_loss"] is not None and q_exact["val_loss"] is not None else \
        f"mean_train_loss_last_{min(args.loss_window, steps)}"
    loss_pct = 100 * (q_plan[key] / q_exact[key] - 1)
    log(f"measured ({wall:.0f} s): planned {m_plan:.3f} s/iter (predicted {p_plan:.3f} s -> measured / predicted "
        f"{m_plan / p_plan:.2f}, target <= 1.15); network off {m_off:.3f} s -> network-off / planned "
        f"{m_off / m_plan:.2f} (target >= 0.8); exact DP {m_exact:.3f} s/iter (predicted {p_exact:.3f} s -> "
        f"{m_exact / p_exact:.2f}); exact / planned {m_exact / m_plan:.2f}")
    log(f"loss at {steps} steps x {cfg.train.global_batch_size} x {cfg.model.seq_len} tokens ({key}): planned "
        f"{q_plan[key]:.4f}, exact DP {q_exact[key]:.4f} -> {loss_pct:+.2f} %; final training losses "
        f"{q_plan['final_train_loss']:.4f} / {q_exact['final_train_loss']:.4f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "cluster": args.cluster, "config": config, "overrides": base, "pinned": sorted(pinned),
            "max_loss_increase": args.max_loss_increase, "stands_for": stands_for(cfg),
            "calibration": {"stage_times": calib["stage_times"], "per_message_s": per_msg, "remainder_s": remainder},
            "planned": {"settings": ps.overrides(), "placement": planned.layout, "predicted_s": p_plan,
                        "measured_s": m_plan, "measured_over_predicted": m_plan / p_plan,
                        "network_off_s": m_off, "network_off_over_planned": m_off / m_plan,
                        "quality_rows": [r.describe() for r in ps.algo.rows], **q_plan},
            "exact": {"settings": es.overrides(), "placement": exact.layout, "predicted_s": p_exact,
                      "measured_s": m_exact, "measured_over_predicted": m_exact / p_exact, **q_exact},
            "loss_key": key, "loss_increase_pct": loss_pct, "window": [lo + 1, hi], "steps": steps,
            "exact_window": [e_lo + 1, e_hi], "runs": got, "log": out}, indent=1))


# ---- Streaming DiLoCo's exposed DP at 10 ms / 1 Gbit/s (issue 23 item 5) -------------------------------

# At 1 Gbit/s a 12 MiB activation takes 0.1 s: 4 micro-batches per replica keep a step near a second.
EXPOSED_DEFAULTS = ["train.global_batch_size=8", "network.delay_ms=10", "network.rate_gbit=1",
                    "parallel.diloco_inner_steps=20",
                    "parallel.diloco_fragments=2", "parallel.diloco_overlap_steps=4", "parallel.grad_codec=int8"]


def exposed(args: argparse.Namespace) -> None:
    """Streaming DiLoCo and blocking DiLoCo at the same H, and the same layout with no DP exchange in the
    window (DiLoCo with H = the run's steps), in one launch. The DP part not hidden behind compute: the
    step time it adds over the no-exchange run, and (per-step metrics) the slowest rank's time inside the
    DP calls (waits for an exchange, the host's ravel and merge)."""
    from jaxpipe.config import load_config
    from jaxpipe.plan.search import config_algo

    n = args.ranks
    shape = [f"parallel.pp={n // 2}", "parallel.dp=2"]
    pre = [*CITIES_DEFAULTS, *shape, *EXPOSED_DEFAULTS, *args.set]
    scale = args.size_scale or xl_scale(load_config(args.config, pre))
    base = [*pre, f"network.size_scale={scale:g}"]
    stream_cfg = load_config(args.config, [*base, "parallel.dp_mode=streaming_diloco"])
    algo = config_algo(stream_cfg)
    lo, hi, steps = _window(algo, args.skip, args.rounds, 0)
    runs = {"streaming_diloco": [*base, "parallel.dp_mode=streaming_diloco", f"train.steps={steps}"],
            "diloco": [*base, "parallel.dp_mode=diloco", f"train.steps={steps}"],
            "no_exchange": [*base, "parallel.dp_mode=diloco", f"parallel.diloco_inner_steps={steps}",
                            f"train.steps={steps}"]}
    print(f"{n} ranks, PP {n // 2} x DP 2, {json.dumps(stands_for(stream_cfg))}; {algo.describe()}, "
          f"F={algo.fragments} tau={algo.overlap_steps}; {steps} steps, window {lo + 1}..{hi}", flush=True)
    with tempfile.TemporaryDirectory() as tmp_s:
        meas = Path(tmp_s) / "runs.json"
        t0 = time.time()
        _mpirun(n, ["--runs", json.dumps(list(runs.values())), "--json", str(meas)], args.timeout, args.config)
        got = dict(zip(runs, json.loads(meas.read_text())["runs"], strict=True))
    base_s = _steady(got["no_exchange"]["iter_times"], lo, hi)
    rows = {}
    for name in ("streaming_diloco", "diloco"):
        r = got[name]
        it = _steady(r["iter_times"], lo, hi)
        dp = _steady(r["dp_s"], lo, hi)
        rows[name] = {"iteration_s": it, "added_over_no_exchange_s": it - base_s,
                      "exposed_share": (it - base_s) / it, "dp_calls_s": dp, "dp_calls_share": dp / it,
                      "dp_bytes_per_step": _steady([float(b) for b in r["dp_bytes"]], lo, hi),
                      "final_train_loss": r["losses"][-1],
                      f"mean_train_loss_last_{args.loss_window}": float(np.mean(r["losses"][-args.loss_window:]))}
        print(f"{name}: {it:.3f} s/iter, {it - base_s:+.3f} s over no exchange ({base_s:.3f} s) -> exposed "
              f"{100 * (it - base_s) / it:.1f} % of the iteration; inside the DP calls {dp * 1e3:.1f} ms "
              f"({100 * dp / it:.1f} %)", flush=True)
    s, b = rows["streaming_diloco"], rows["diloco"]
    print(f"measured ({time.time() - t0:.0f} s): streaming exposed {100 * s['exposed_share']:.1f} % "
          f"(target <= 2 %), blocking {100 * b['exposed_share']:.1f} %; loss (last {args.loss_window} steps) "
          f"streaming {s[f'mean_train_loss_last_{args.loss_window}']:.4f} vs blocking "
          f"{b[f'mean_train_loss_last_{args.loss_window}']:.4f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"overrides": base, "stands_for": stands_for(stream_cfg),
                                                   "window": [lo + 1, hi], "steps": steps,
                                                   "no_exchange_s": base_s, **rows, "runs": got}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--runs", required=True)
    w.add_argument("--iters", type=int, default=6)
    w.add_argument("--json", required=True)
    w.add_argument("--calibrate", action="store_true")
    w.add_argument("--config")
    c = sub.add_parser("cities", help="issue 23: the planned layout (DiLoCo) vs network off vs best exact DP")
    c.add_argument("--cluster", default=str(REPO / "configs" / "clusters" / "two_regions_8.yaml"))
    e = sub.add_parser("exposed", help="issue 23: Streaming DiLoCo's exposed DP at 10 ms / 1 Gbit/s")
    e.add_argument("--ranks", type=int, default=8)
    for q in (c, e):
        q.add_argument("--config", default=str(REPO / "configs" / "tiny_text.yaml"))
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="config overrides; in `cities` the keys set here are pinned (as `jaxpipe plan --set`)")
        q.add_argument("--size-scale", type=float, help="default: GPT-3 XL's parameters / the model's")
        q.add_argument("--rounds", type=int, default=2, help="whole rounds of H steps in the timing window")
        q.add_argument("--skip", type=int, help="steps before the window (default: 2 H + tau + 1; without DiLoCo 2)")
        q.add_argument("--loss-window", type=int, default=10, help="steps the mean training loss is over")
        q.add_argument("--timeout", type=float, default=600)
        q.add_argument("--json-out")
    c.add_argument("--max-loss-increase", metavar="X%", help="the search's loss budget (quality table rows)")
    c.add_argument("--iters", type=int, default=6, help="window of a planned run without DiLoCo")
    c.add_argument("--exact-iters", type=int, default=3, help="timed steps of the exact-DP run (network on), after "
                   "its first")
    c.add_argument("--calib-iters", type=int, default=6)
    c.add_argument("--budget", type=float, default=None, help="seconds of annealing per plan (default: plan's)")
    d = sub.add_parser("dtfm")
    d.add_argument("--budget", type=float, default=None, help="seconds of annealing per plan (default: plan's)")
    d.add_argument("--json-out")
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--skip", type=int, default=2, help="iterations dropped before the mean (compilation)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    command = {"worker": worker, "dtfm": dtfm_table, "cities": cities, "exposed": exposed}.get(args.cmd)
    if command is not None:
        command(args)
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
