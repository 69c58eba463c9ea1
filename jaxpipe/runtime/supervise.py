"""`jaxpipe supervise`: relaunch a failed training job from its newest complete checkpoint.

    jaxpipe supervise [--max-restarts K] [--delay S] -- mpiexec -n 4 jaxpipe train --config run.yaml

Runs the command; when it fails, runs it again with `--resume auto` (replacing any `--resume`
value), so the trainer continues from the newest committed checkpoint in `train.checkpoint_dir`,
at most K times. A resumed run computes what the uninterrupted run would have (see
jaxpipe.train.hooks), so a job that survives its restarts ends with the same parameters.

What is retried is decided by the exit status: 0 is success; 2 (bad input: config, data files, a
checkpoint of another model), 3 (non-finite loss with `train.on_nonfinite=stop`) and 4 (a checkpoint
save failed with `train.on_save_error=stop`) would fail the same way again, so they end the
supervision at once; 75 (preempted: the job stopped on SIGTERM/SIGINT after committing a checkpoint)
is restarted without counting against K, since every preemption saved its progress; anything else
(an abort after an exception or a deadline, a rank killed by a signal, a lost host) is restarted and
counted. SIGINT and SIGTERM to supervise are passed to the job (which then checkpoints and exits 75)
and end the supervision.

With `--elastic` (jaxpipe.runtime.elastic) every attempt is launched on the hosts still usable: the
hosts file is re-read and probed, a layout function decides the rank count, and the command's {n},
{hostfile} and {hosts} are filled in, so a job that lost a host continues on fewer replicas.

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

from jaxpipe.errors import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_SAVE_FAILED
from jaxpipe.runtime.elastic import Elastic

NO_RETRY = {EXIT_BAD_INPUT: "bad input", EXIT_NONFINITE: "non-finite loss or gradients (train.on_nonfinite=stop)",
            EXIT_SAVE_FAILED: "a checkpoint could not be written (train.on_save_error=stop)"}


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
              log: Callable[[str], None] | None = None, env: dict[str, str] | None = None,
              elastic: Elastic | None = None) -> int:
    """Runs `cmd` until it succeeds, fails in a way a restart cannot fix, or has been restarted
    `max_restarts` times (preemptions not counted); returns the last exit status (a signal as 128 +
    its number). With `elastic`, each attempt runs on the hosts that are usable at its start."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    stopping: list[int] = []
    child: list[subprocess.Popen] = []

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        if child and child[0].poll() is None:
            os.killpg(child[0].pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        attempt, tries, status = 0, 0, 1  # attempt: counted restarts; tries: launches
        while True:
            run = cmd if tries == 0 else with_resume_auto(cmd)
            if elastic is not None:
                prepared = elastic.prepare(run, log)
                if isinstance(prepared, str):
                    log(f"jaxpipe supervise: cannot launch attempt {tries + 1}: {prepared}; giving up")
                    return status
                run, launch = prepared
                log(f"jaxpipe supervise: attempt {tries + 1} on {launch.n} ranks ({launch.note}) of "
                    f"{', '.join(f'{h.name}:{h.slots}' for h in launch.hosts)}")
            log(f"jaxpipe supervise: attempt {tries + 1} ({attempt} of {max_restarts} restarts used): {' '.join(run)}")
            t0 = time.monotonic()
            child[:] = [subprocess.Popen(run, start_new_session=True, env=env)]
            code = child[0].wait()
            took = time.monotonic() - t0
            tries += 1
            if code == 0:
                log(f"jaxpipe supervise: done after {tries} attempt(s), {tries - 1} restart(s)")
                return 0
            status = 128 - code if code < 0 else code
            if stopping:
                log(f"jaxpipe supervise: stopped by signal {stopping[0]}; the job ended with {_status(code)}")
                return status
            if code == EXIT_PREEMPTED:
                log(f"jaxpipe supervise: attempt {tries} was preempted ({_status(code)}: it stopped at a step "
                    f"boundary and committed a checkpoint) after {took:.1f} s; restarting in {delay_s:g} s from "
                    f"the newest checkpoint (--resume auto; preemptions do not count against --max-restarts)")
                time.sleep(delay_s)
                if stopping:
                    return 128 + stopping[0]
                continue
            if code in NO_RETRY:
                log(f"jaxpipe supervise: attempt {tries} failed with {_status(code)} ({NO_RETRY[code]}) "
                    f"after {took:.1f} s; a restart would fail the same way, giving up")
                return status
            if attempt >= max_restarts:
                log(f"jaxpipe supervise: attempt {tries} failed with {_status(code)} after {took:.1f} s; "
                    f"giving up after {max_restarts} restart(s)")
                return status
            attempt += 1
            log(f"jaxpipe supervise: attempt {tries} failed with {_status(code)} after {took:.1f} s; "
                f"restart {attempt} of {max_restarts} in {delay_s:g} s, from the newest checkpoint (--resume auto)")
            time.sleep(delay_s)
            if stopping:
                return 128 + stopping[0]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
