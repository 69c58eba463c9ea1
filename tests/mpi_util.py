"""Launching real `mpiexec` jobs from tests, each with a hard timeout so a hang fails the test."""

from __future__ import annotations

import os
import subprocess
from collections.abc import MutableMapping
from pathlib import Path

from jaxpipe.runtime import launch
from jaxpipe.runtime.launch import Finished, mpiexec_command

REPO = Path(__file__).resolve().parent.parent


def mpiexec() -> list[str]:
    return mpiexec_command()


# XLA flags of every test process (the ranks and pytest's own references), for 2 cores:
# - one thread per process for Eigen's matrix work: several ranks share two cores, so each rank's own
#   thread pool only made them preempt each other;
# - LLVM's backend at optimisation level 0: compiling, not running, is where the suite's time goes (tiny
#   models: a program runs for milliseconds and compiles for seconds). The HLO, and so what is computed,
#   is the same; only the machine code is less tuned. Every process of a test uses the same flags, so
#   run-to-run bit-identity checks compare like with like.
TEST_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false --xla_backend_optimization_level=0"


def with_test_flags(flags: str | None) -> str:
    return f"{TEST_XLA_FLAGS} {flags}" if flags and TEST_XLA_FLAGS not in flags else (flags or TEST_XLA_FLAGS)


def configure_test_environment(env: MutableMapping[str, str] = os.environ) -> MutableMapping[str, str]:
    """Sets (in os.environ by default) the environment every test process runs in."""
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
    env.setdefault("JAX_PLATFORMS", "cpu")
    # Cache every compilation, not only those over a second: layouts launched one after another in one
    # job (tests/mpi_train_dump.py --cases), and later launches and tests, then share the programs they
    # have in common.
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    env["XLA_FLAGS"] = with_test_flags(env.get("XLA_FLAGS"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_env() -> dict[str, str]:
    return dict(configure_test_environment(dict(os.environ)))


def run_mpi(n: int, args: list[str], timeout: float = 240, env: dict[str, str] | None = None) -> Finished:
    """`mpiexec -n N python ARGS...`; the whole process group is killed on timeout."""
    try:
        return launch.run_mpi(n, args, timeout, cwd=REPO, env=_merged(env))
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"mpiexec -n {n} {' '.join(args)} did not finish in {timeout} s (hang?)\n"
                             f"stdout:\n{e.output}\nstderr:\n{e.stderr}") from None


def _merged(extra: dict[str, str] | None) -> dict[str, str]:
    env = {**test_env(), **(extra or {})}
    env["XLA_FLAGS"] = with_test_flags(env.get("XLA_FLAGS"))
    return env
