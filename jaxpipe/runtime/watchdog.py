"""What this rank is doing, and the deadlines that keep a dead or hung peer from hanging the job.

An MPI job fails in ways an exception alone does not cover. A rank that hangs, or that leaves
through `sys.exit` (whose `MPI_Finalize` then waits for peers that wait for it), leaves its
neighbours blocked forever in a receive or a collective; MPICH's mpiexec ends the job only when a
rank process dies. And a traceback says where in the code a rank failed, not where in the job:
which rank and stage, which step, which task. Hence:

- `ACTIVITY`, one small record per process that the trainer, executor and run hooks keep current
  with plain attribute stores (no formatting and no device synchronisation on the hot path):
  rank, stage, step and the task or communication in progress. Failure messages read it.
- Receive deadlines: the transport's `recv` gives up after the current deadline and raises an
  error naming the message and the peer (`ThreadedTransport.recv_timeout`, set from here).
- Collective deadlines: MPI collectives cannot time out, so the trainer runs them inside
  `ACTIVITY.waiting(...)`, and a daemon thread (`start_watchdog`) aborts the whole job when one
  outlasts the deadline, after printing what was waited for.

The deadline is `runtime.comm_timeout_s` (or 5 times the last step's time, if longer), except during
set-up (communicators, device assignment, data and checkpoint checks, the parameter broadcast, the
transport's and NCCL's set-up), a run's first step, its first evaluation and checkpoint saves, which
get `runtime.first_step_timeout_s`: set-up waits for the slowest rank's initialisation, the first
step compiles, and a stage's first receive waits for every upstream stage's compilation in turn.
"""

from __future__ import annotations

import array
import fcntl
import sys
import termios
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, NoReturn

_POLL_S = 0.25
STEP_MULTIPLE = 5.0
DEADLINE_KEYS = "deadline: runtime.comm_timeout_s, or runtime.first_step_timeout_s in set-up and a run's first step"


class Activity:
    """One per process (`ACTIVITY`). `doing` says what this rank is doing now, in the failure
    messages' words (the executor prepares its strings once, so keeping it current is one store)."""

    def __init__(self) -> None:
        self.rank: int | None = None
        self.stage: int | None = None
        self.n_stages = 0
        self.replica = 0
        self.step: int | None = None  # 1-based, as logged; None until the first step starts
        self.doing: Any = "set-up"
        self.comm_timeout_s: float | None = None
        self.first_step_timeout_s: float | None = None
        self.timeout_s: float | None = None  # the deadline in force now
        self.transport: Any = None  # its `recv_timeout` follows `timeout_s`
        # (what, since, deadline) of the collective in progress; one attribute, so the watchdog
        # thread always reads a consistent triple.
        self.wait: tuple[str, float, float | None] | None = None

    def configure(self, rank: int, stage: int | None, n_stages: int, replica: int, comm_timeout_s: float,
                  first_step_timeout_s: float) -> None:
        """At the start of a run (set-up: no step yet); `stage` None until the topology is built."""
        self.rank, self.stage, self.n_stages, self.replica = rank, stage, n_stages, replica
        self.step, self.doing, self.wait, self.transport = None, "set-up", None, None
        self.comm_timeout_s = comm_timeout_s or None  # 0: no deadline
        self.first_step_timeout_s = first_step_timeout_s or None
        self.set_timeout(self.first_step_timeout_s)

    def locate(self, stage: int, replica: int) -> None:
        """Once the topology says where this rank runs."""
        self.stage, self.replica = stage, replica

    def attach(self, transport: Any) -> None:
        """From now on the transport's receive deadline follows this record's."""
        self.transport = transport
        self.set_timeout(self.timeout_s)

    def set_timeout(self, seconds: float | None) -> None:
        self.timeout_s = seconds
        if self.transport is not None:
            self.transport.recv_timeout = seconds

    def begin_step(self, step: int, first: bool, last_step_s: float = 0.0) -> None:
        """`step` is 1-based; `first`: the first step this process runs (it compiles). A run whose
        steps take long (a large model, slow links) gets `STEP_MULTIPLE` times its last step's time
        (`last_step_s`, 0 while only the compiling step is known) where that exceeds the configured
        deadline, so slowness alone never aborts it."""
        self.step = step
        self.doing = "reading the step's batch"
        if first or self.comm_timeout_s is None:
            self.set_timeout(self.first_step_timeout_s if first else None)
        else:
            self.set_timeout(max(self.comm_timeout_s, STEP_MULTIPLE * last_step_s))

    @contextmanager
    def phase(self, what: str, long: bool = False) -> Iterator[None]:
        """Work after a step (evaluation, checkpoint); `long` gives it the first-step deadline."""
        saved = self.timeout_s
        self.doing = what
        if long:
            self.set_timeout(self.first_step_timeout_s)
        try:
            yield
        finally:
            self.set_timeout(saved)

    @contextmanager
    def waiting(self, what: str, long: bool = False) -> Iterator[None]:
        """Runs a blocking collective under the watchdog's deadline."""
        self.doing = what
        self.wait = (what, time.monotonic(), self.first_step_timeout_s if long else self.timeout_s)
        try:
            yield
        finally:
            self.wait = None

    # -- reading -------------------------------------------------------------------------------------
    def who(self) -> str:
        if self.rank is None or self.stage is None:
            return f"rank {_world_rank() if self.rank is None else self.rank}"
        return f"rank {self.rank} (stage {self.stage} of {self.n_stages}, replica {self.replica})"

    def where(self) -> str:
        doing = self.doing
        return f"during {doing}" if self.step is None else f"at step {self.step}, {doing}"


ACTIVITY = Activity()


def _world_rank() -> int:
    if "mpi4py.MPI" not in sys.modules:
        return 0
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank() if MPI.Is_initialized() else 0


def mpi_world_size() -> int:
    """The job's size, or 1 where MPI was never started (single-process commands, unit tests)."""
    if "mpi4py.MPI" not in sys.modules:
        return 1
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size() if MPI.Is_initialized() and not MPI.Is_finalized() else 1


def _wait_until_read(fd: int, limit_s: float = 2.0) -> None:
    """Waits until the reader of pipe `fd` (the launcher's stdio forwarder) has taken what was written.

    `MPI_Abort` makes the launcher kill every process of the job, its own forwarders included; a
    message still sitting in the pipe then dies with them (seen under MPICH's hydra on a loaded box:
    the job ended with an empty stderr). Once the forwarder has read it, the message travels to
    `mpiexec` ahead of the abort request. A terminal or file has nothing to wait for.
    """
    deadline = time.monotonic() + limit_s
    pending = array.array("i", [0])
    while time.monotonic() < deadline:
        try:
            fcntl.ioctl(fd, termios.FIONREAD, pending)
        except OSError:  # not a pipe or socket
            return
        if pending[0] == 0:
            return
        time.sleep(0.01)


def abort(message: str, code: int = 1) -> NoReturn:
    """Prints `message` (one write: ranks share the terminal) and ends every rank of the job."""
    sys.stdout.flush()
    sys.stderr.write(message if message.endswith("\n") else message + "\n")
    sys.stderr.flush()
    if mpi_world_size() > 1:
        for stream in (sys.stdout, sys.stderr):
            # Streams replaced or closed (pytest's capture) have no pipe to wait for.
            with suppress(OSError, ValueError, AttributeError):
                _wait_until_read(stream.fileno())
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(code)
    import os

    os._exit(code)


def report_failure(exc: BaseException, code: int = 1) -> NoReturn:
    """The CLI's last word on an unexpected exception: where it happened, the traceback, then abort,
    so no peer is left waiting for this rank."""
    tb = "".join(traceback.format_exception(exc))
    if ACTIVITY.rank is None and mpi_world_size() == 1:  # not a training job: nobody to locate or abort
        abort(f"{tb}jaxpipe: failed: {type(exc).__name__}: {exc}", code)
    head = f"jaxpipe: {ACTIVITY.who()} failed {ACTIVITY.where()}: {type(exc).__name__}: {exc}"
    abort(f"{head}\n{tb}jaxpipe: {ACTIVITY.who()}: aborting all ranks\n", code)


def _watch() -> None:
    while True:
        time.sleep(_POLL_S)
        wait = ACTIVITY.wait
        if wait is None:
            continue
        what, since, deadline = wait
        if deadline is not None and time.monotonic() - since > deadline:
            when = "" if ACTIVITY.step is None else f" at step {ACTIVITY.step}"  # set-up: `what` says so
            abort(f"jaxpipe: {ACTIVITY.who()} waited {round(deadline, 1):g} s{when} in {what}: "
                  f"another rank is dead, hung or far slower ({DEADLINE_KEYS}); aborting all ranks")


_started = threading.Event()


def start_watchdog() -> None:
    """Idempotent: one daemon thread per process, idle unless a collective is in progress."""
    if not _started.is_set():
        _started.set()
        threading.Thread(target=_watch, name="jaxpipe-watchdog", daemon=True).start()
