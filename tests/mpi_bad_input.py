"""Run under mpiexec by the tests: `jaxpipe train` with each of several bad inputs in turn, in one launch
(start-up paid once instead of once per input).

Each case runs the command's own entry point (`jaxpipe.cli.main`, what `python -m jaxpipe` runs) with its
own command line and environment variables; every rank writes OUT/<case>/rank<r>.json with its exit status
and what it printed. A case that aborts instead of refusing ends the whole launch, and so fails every test
that reads it. Usage: mpi_bad_input.py --out OUT --cases JSON ({name: {"argv": [...], "env": {...}}}).
"""

import argparse
import io
import json
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from mpi4py import MPI

from jaxpipe.cli import main

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--cases", required=True)
args = parser.parse_args()

rank = MPI.COMM_WORLD.Get_rank()
for name, case in json.loads(args.cases).items():
    env = case.get("env", {})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main(case["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    where = Path(args.out) / name
    where.mkdir(parents=True, exist_ok=True)
    (where / f"rank{rank}.json").write_text(json.dumps({"code": code, "stdout": out.getvalue(),
                                                        "stderr": err.getvalue()}))
    MPI.COMM_WORLD.Barrier()  # the next case starts on every rank together
