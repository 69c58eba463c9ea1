"""Launching real `mpiexec` jobs from tests, each with a hard timeout so a hang fails the test."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from jaxpipe.runtime import launch
from jaxpipe.runtime.launch import Finished, mpiexec_command

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


def run_mpi(n: int, args: list[str], timeout: float = 240, env: dict[str, str] | None = None) -> Finished:
    """`mpiexec -n N python ARGS...`; the whole process group is killed on timeout."""
    try:
        return launch.run_mpi(n, args, timeout, cwd=REPO, env={**test_env(), **(env or {})})
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"mpiexec -n {n} {' '.join(args)} did not finish in {timeout} s (hang?)\n"
                             f"stdout:\n{e.output}\nstderr:\n{e.stderr}") from None
