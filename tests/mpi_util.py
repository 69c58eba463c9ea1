"""Launching real `mpiexec` jobs from tests, each with a hard timeout so a hang fails the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from jaxpipe.runtime.launch import mpiexec_command

REPO = Path(__file__).resolve().parent.parent


def mpiexec() -> list[str]:
    return mpiexec_command()


def test_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
    env.setdefault("JAX_PLATFORMS", "cpu")
    # Cache every compilation, not only those over a second: layouts launched one after another in one
    # job (tests/mpi_train_dump.py --cases) then share the programs they have in common.
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def run_mpi(n: int, args: list[str], timeout: float = 240, env: dict[str, str] | None = None) -> Run:
    """`mpiexec -n N python ARGS...`; the whole process group is killed on timeout."""
    cmd = [*mpiexec(), "-n", str(n), sys.executable, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**test_env(), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"mpiexec -n {n} {' '.join(args)} did not finish in {timeout} s (hang?)\n"
                             f"stdout:\n{out}\nstderr:\n{err}") from None
    return Run(proc.returncode, out, err)
