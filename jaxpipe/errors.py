"""Errors a user can act on, and the rule that every rank learns of them together.

A pipeline over MPI hangs when one rank stops early while its peers wait in a collective or a
receive. Every check that could fail on one rank alone (a file missing on one host, a bad
partition computed from local state) therefore goes through `agree`, which makes all ranks
raise the same message before any compute starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Exit statuses of `jaxpipe train` besides 0 (done) and 1 (an abort: exception, deadline), which
# `jaxpipe supervise` reads: what a restart can fix and what it cannot.
EXIT_BAD_INPUT = 2  # ConfigError: the same input fails the same way
EXIT_NONFINITE = 3  # NonFiniteError with train.on_nonfinite=stop
EXIT_SAVE_FAILED = 4  # CheckpointError with train.on_save_error=stop: the disk needs fixing first
EXIT_PREEMPTED = 75  # Preempted: stopped on a signal at a step boundary (sysexits' EX_TEMPFAIL: retry later)


class ConfigError(ValueError):
    """Bad input: the message says which key or file is wrong and what to change."""


class TransportError(RuntimeError):
    """A message between stages did not match what both sides agreed on, or never came."""


class NonFiniteError(FloatingPointError):
    """A step's loss or gradients are not finite and `train.on_nonfinite` is `stop`. Every rank
    raises it at the same step (the verdict comes from numbers all ranks share), so the job can
    end without an abort."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, write access lost). Raised on every rank together
    (the save's collectives carry each rank's outcome), after the half-written directory was dropped."""

    agreed = True


class Preempted(Exception):
    """Every rank stopped together at a step boundary because some rank received SIGTERM or SIGINT;
    `checkpoint` is what was committed for that step (None without train.checkpoint_dir)."""

    def __init__(self, message: str, step: int, checkpoint: str | None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


def agree(comm: Any, check: Callable[[], T]) -> T:
    """Runs `check` on every rank; if it raises ConfigError anywhere, raises it everywhere.

    The error text is taken from the lowest failing rank, so all ranks print the same line.
    """
    result: T | None = None
    message = None
    try:
        result = check()
    except ConfigError as e:
        message = str(e)
    messages = comm.allgather(message)
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if failed:
        rank, text = failed[0]
        error = ConfigError(text if len({m for _, m in failed}) == 1 else f"(rank {rank}) {text}")
        error.agreed = True  # type: ignore[attr-defined]  # The CLI may exit without aborting the job.
        raise error
    return result  # type: ignore[return-value]
