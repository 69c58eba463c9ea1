"""Preemption: SIGTERM or SIGINT (what Slurm, a spot reclaim and Ctrl-C send) is a notice, not a crash.

Whichever rank gets it, and whether it comes to the ranks or to the launcher (MPICH's `mpiexec`,
Hydra, forwards both signals to every rank and waits; a launcher that follows SIGTERM with SIGKILL
after a moment must leave the signal to the ranks themselves), the job stops together at a step
boundary:

- the signal only sets a flag (`PREEMPT.requested`); the trainer folds it into the world allreduce of
  the loss that every step already does, so all ranks learn of it at the same step, commit a checkpoint
  of that step together (when train.checkpoint_dir is set) and exit with `EXIT_PREEMPTED` (75), which
  `jaxpipe supervise` restarts from that checkpoint;
- a thread reads the signal wakeup fd, so it sees every signal even while the main thread is blocked in
  MPI or XLA (Python runs signal handlers only between bytecodes): a second signal aborts the job at
  once, and a job still running `runtime.preempt_grace_s` after the first one is aborted without its
  checkpoint, both with status 128 + the signal's number (a restart resumes from the previous one);
- a repeat within `REPEAT_S` of the first signal is the same notice delivered twice (a scheduler that
  signals every process while the launcher forwards its own copy), not a second signal.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from jaxpipe.runtime.watchdog import ACTIVITY, abort

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_S = 1.0


class Preemption:
    """One per process (`PREEMPT`), armed for the duration of a training run (`installed`)."""

    def __init__(self) -> None:
        self.signum = 0
        self.wall_time = 0.0  # time.time() of the first signal: ranks compare it, the log reports from it
        self._since: float | None = None  # time.monotonic() of the first signal
        self._count = 0
        self._lock = threading.Lock()
        self.grace_s: float | None = None
        self.saves = False  # whether a checkpoint follows (for the notice's wording)

    @property
    def requested(self) -> bool:
        return self._since is not None

    def _first(self, signum: int) -> None:
        with self._lock:
            if self._since is not None:
                return
            self._since, self.wall_time, self.signum = time.monotonic(), time.time(), signum
        then = ("commit a checkpoint there and exit" if self.saves
                else "and exit (no checkpoint: train.checkpoint_dir is not set)")
        os.write(2, (f"jaxpipe: {ACTIVITY.who()}: {signal.Signals(signum).name} received {ACTIVITY.where()}: all "
                     f"ranks stop at the next step boundary, {then} with status 75; a second signal exits at once\n"
                     ).encode())

    def _handler(self, signum: int, _frame: Any) -> None:
        # The main thread, between bytecodes: only makes sure the flag is up before the step goes on
        # (the reader thread counts the signals).
        self._first(signum)

    def _read(self, fd: int) -> None:
        try:
            while True:
                timeout = None
                if self._since is not None and self.grace_s:
                    timeout = max(0.0, self._since + self.grace_s - time.monotonic())
                if not select.select([fd], [], [], timeout)[0]:
                    name = signal.Signals(self.signum).name
                    abort(f"jaxpipe: {ACTIVITY.who()}: still running {self.grace_s:g} s after {name} "
                          f"(runtime.preempt_grace_s), {ACTIVITY.where()}: exiting without this step's checkpoint; "
                          f"aborting all ranks", 128 + self.signum)
                data = os.read(fd, 64)
                if not data:  # uninstalled
                    return
                for signum in data:
                    if signum not in SIGNALS:
                        continue
                    self._count += 1
                    if self._since is None or self._count == 1:
                        self._first(signum)
                    elif time.monotonic() - self._since > REPEAT_S:
                        abort(f"jaxpipe: {ACTIVITY.who()}: second signal ({signal.Signals(signum).name}) "
                              f"{ACTIVITY.where()}: exiting at once, without a checkpoint; aborting all ranks",
                              128 + signum)
        finally:
            os.close(fd)

    @contextmanager
    def installed(self, grace_s: float, saves: bool) -> Iterator[None]:
        """Arms the handlers (main thread only; elsewhere signals keep their handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._since, self.signum, self.wall_time, self._count = None, 0, 0.0, 0
        self.grace_s, self.saves = grace_s or None, saves
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        previous = {s: signal.signal(s, self._handler) for s in SIGNALS}
        old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        reader = threading.Thread(target=self._read, args=(read_fd,), name="jaxpipe-signals", daemon=True)
        reader.start()
        try:
            yield
        finally:
            signal.set_wakeup_fd(old_fd)
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
            with suppress(OSError):
                os.close(write_fd)  # the reader sees the end of the pipe and returns
            reader.join(timeout=5)


PREEMPT = Preemption()
