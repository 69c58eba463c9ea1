"""`jaxpipe supervise`: relaunch a failed training job from its newest complete checkpoint.

    jaxpipe supervise [--max-restarts K] [--delay S] -- mpiexec -n 4 jaxpipe train --config run.yaml

Runs the command; when it fails, runs it again with `--resume auto` (replacing any `--resume`
value), so the trainer continues from the newest committed checkpoint in `train.checkpoint_dir`,
at most K times. A resumed run computes what the uninterrupted run would have (see
jaxpipe.train.hooks), so a job that survives its restarts ends with the same parameters.

What is retried is decided by the exit status: 0 is success; 2 (bad input: config, data files, a
checkpoint of another model) and 3 (non-finite loss with `train.on_nonfinite=stop`) would fail the
same way again, so they end the supervision at once; anything else (an abort after an exception or
a deadline, a rank killed by a signal, a lost host) is restarted. SIGINT and SIGTERM are passed to
the job, which then ends the supervision too.

A Python process rather than a shell loop: it owns the job's process group (so a stop reaches every
launcher process and rank), and restarts need no parsing of the command beyond `--resume`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

NO_RETRY = {2: "bad input", 3: "non-finite loss or gradients (train.on_nonfinite=stop)"}


def with_resume_auto(cmd: list[str]) -> list[str]:
    """`cmd` with `--resume auto`: any `--resume X` / `--resume=X` replaced, else appended."""
    out, i = [], 0
    while i < len(cmd):
        if cmd[i] == "--resume":
            i += 2
            continue
        if not cmd[i].startswith("--resume="):
            out.append(cmd[i])
        i += 1
    return [*out, "--resume", "auto"]


def _status(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def supervise(cmd: list[str], max_restarts: int, delay_s: float = 5.0,
              log: Callable[[str], None] | None = None, env: dict[str, str] | None = None) -> int:
    """Runs `cmd` until it succeeds, fails in a way a restart cannot fix, or has been restarted
    `max_restarts` times; returns the last exit status (a signal as 128 + its number)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    stopping: list[int] = []
    child: list[subprocess.Popen] = []

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        if child and child[0].poll() is None:
            os.killpg(child[0].pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        attempt = 0
        while True:
            run = cmd if attempt == 0 else with_resume_auto(cmd)
            log(f"jaxpipe supervise: attempt {attempt + 1} of {max_restarts + 1}: {' '.join(run)}")
            t0 = time.monotonic()
            child[:] = [subprocess.Popen(run, start_new_session=True, env=env)]
            code = child[0].wait()
            took = time.monotonic() - t0
            if code == 0:
                log(f"jaxpipe supervise: done after {attempt + 1} attempt(s), {attempt} restart(s)")
                return 0
            status = 128 - code if code < 0 else code
            if stopping:
                log(f"jaxpipe supervise: stopped by signal {stopping[0]}; the job ended with {_status(code)}")
                return status
            if code in NO_RETRY:
                log(f"jaxpipe supervise: attempt {attempt + 1} failed with {_status(code)} ({NO_RETRY[code]}) "
                    f"after {took:.1f} s; a restart would fail the same way, giving up")
                return status
            if attempt >= max_restarts:
                log(f"jaxpipe supervise: attempt {attempt + 1} failed with {_status(code)} after {took:.1f} s; "
                    f"giving up after {max_restarts} restart(s)")
                return status
            attempt += 1
            log(f"jaxpipe supervise: attempt {attempt} failed with {_status(code)} after {took:.1f} s; "
                f"restart {attempt} of {max_restarts} in {delay_s:g} s, from the newest checkpoint (--resume auto)")
            time.sleep(delay_s)
            if stopping:
                return 128 + stopping[0]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
