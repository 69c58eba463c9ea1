"""Run under mpiexec by the tests: trains per the given overrides and writes what the tests compare.

Each rank writes `rank<r>.npz` with its chunks' parameters in the per-layer layout and
`rank<r>.json` with the steps it skipped, the updates it applied and the loss scale of every step;
global rank 0 also writes `result.json` with per-step losses and gradient norms and `log.txt` with
what the run logged. With `--cases JSON` ({name: {"set": [...], "handshake": bool, "nccl_dp": bool,
"resume": PATH}}) one launch trains each case in turn, into OUT/<name>/ (a case may resume from an
earlier one's checkpoint); rank 0 also writes `metrics.jsonl` there (per-step rows: bytes on the links included).

A case {"argv": [...], "env": {...}} instead runs the command line's own entry point (`jaxpipe.cli.main`,
what `python -m jaxpipe` runs) with those arguments and environment variables: the tests' bad inputs, many
in one launch (start-up paid once). Every rank writes OUT/<name>/rank<r>.json with its exit status and what
it printed. A case that aborts instead of refusing ends the whole launch, and so fails every test reading it.
"""

import argparse
import io
import json
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
from mpi4py import MPI

from jaxpipe.model.layout import flatten_per_layer
from jaxpipe.train.finetune import load_config  # (adopts train.init_from's model)
from jaxpipe.train.trainer import Factories, train

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--set", dest="overrides", action="append", default=[])
parser.add_argument("--handshake-transport", action="store_true",
                    help="use tests/handshake_transport.py (the NCCL transport's protocol and tied sum on CPU)")
parser.add_argument("--cases", help="JSON: several runs in this one launch, each into OUT/<name>")
parser.add_argument("--resume", help="a checkpoint to resume from (as `jaxpipe train --resume`)")
args = parser.parse_args()


def run_case(overrides: list[str], handshake: bool, out: Path, nccl_dp: bool = False,
             resume: str | None = None) -> None:
    factories = None
    if handshake or nccl_dp:
        import handshake_transport

        factories = Factories()
        if handshake:
            factories.transport = handshake_transport.make_transport
            factories.tied_exchange = handshake_transport.make_tied_exchange
        if nccl_dp:  # The NCCL data-parallel collectives' protocol, played by MPI on CPU.
            factories.dp_collectives = handshake_transport.make_dp_collectives
    cfg = load_config(None, overrides)
    out.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    res = train(cfg, log=log.append, factories=factories, resume=resume or args.resume,
                metrics_out=out / "metrics.jsonl")
    flat = {}
    for c, spec in res.chunks.items():
        flat.update(flatten_per_layer(cfg.model, spec.layers, spec.first, spec.last, res.params[c]))
    rank = MPI.COMM_WORLD.Get_rank()
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"rank{rank}.npz", **{k: np.asarray(v) for k, v in flat.items()})
    (out / f"rank{rank}.json").write_text(json.dumps({"skipped_steps": res.skipped_steps, "updates": res.updates,
                                                      "loss_scales": res.loss_scales}))
    if rank == 0:
        (out / "result.json").write_text(json.dumps({"losses": res.losses, "grad_norms": res.grad_norms}))
        (out / "log.txt").write_text("".join(line + "\n" for line in log))


def run_command(argv: list[str], env: dict[str, str], out: Path) -> None:
    from jaxpipe.cli import main

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    printed, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with redirect_stdout(printed), redirect_stderr(err):
            main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{MPI.COMM_WORLD.Get_rank()}.json").write_text(json.dumps(
        {"code": code, "stdout": printed.getvalue(), "stderr": err.getvalue()}))
    MPI.COMM_WORLD.Barrier()  # the next case starts on every rank together


if args.cases:
    for name, case in json.loads(args.cases).items():
        if "argv" in case:
            run_command(case["argv"], case.get("env", {}), Path(args.out) / name)
            continue
        run_case(case["set"], case.get("handshake", False), Path(args.out) / name, case.get("nccl_dp", False),
                 case.get("resume"))
else:
    run_case(args.overrides, args.handshake_transport, Path(args.out))
