"""Launching real `mpiexec` jobs from tests, each with a hard timeout so a hang fails the test."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

from jaxpipe.runtime import launch
from jaxpipe.runtime.launch import Finished, mpiexec_command

REPO = Path(__file__).resolve().parent.parent
TINY_JOB_STEPS = 30
# The multi-rank tests' one model and training shape (tests that launch share their compiled programs
# through the persistent cache): small enough to run in seconds, deep enough for uneven 4-stage
# partitions and 2 chunks per rank.
MODEL = ["model.n_layer=8", "model.d_model=64", "model.n_head=4", "model.seq_len=32", "model.vocab_size=128"]
# Adam's eps is raised from 1e-8 so that gradients that are zero in exact arithmetic (the attention
# key bias: softmax ignores a per-row constant) but rounding noise in practice do not become ±lr steps.
TRAIN = ["train.global_batch_size=8", "train.micro_batch_size=2", "train.steps=3", "train.warmup_steps=1",
         "train.decay_steps=10", "train.lr=1e-2", "train.eps=1e-4"]


# DiLoCo's outer optimizer as the DiLoCo paper sets it (Nesterov momentum): the defaults are plain averaging
# (lr 1, momentum 0, the sweep's best: BENCHMARKS.md), under which momentum would play no part, so the
# multi-rank DiLoCo cases pin these to check every term of the outer step against the reference.
NESTEROV = ["parallel.diloco_outer_lr=0.7", "parallel.diloco_outer_momentum=0.9"]


def sets(items: list[str]) -> list[str]:
    """`--set` before every override, as the command line takes them."""
    return [a for item in items for a in ("--set", item)]
  # the steps of the shared default-job launch (tests/conftest.py `tiny_job`)


def mpiexec() -> list[str]:
    return mpiexec_command()


# XLA flags of every test process (the ranks and pytest's own references), for 2 cores:
# - one thread per process for Eigen's matrix work: several ranks share two cores, so each rank's own
#   thread pool only made them preempt each other;
# - LLVM's backend at optimisation level 0: compiling, not running, is where the suite's time goes (tiny
#   models: a program runs for milliseconds and compiles for seconds). The HLO, and so what is computed,
#   is the same; only the machine code is less tuned;
# - XLA's older loop emitters instead of its MLIR fusion emitters: a cold 4-rank ZB-H1 run of the test
#   model took 30 -> 19 s of CPU (20.3-21.7 -> 12.4-14.5 s wall, two runs each), most of it compiling.
# Every process of a test uses the same flags, so run-to-run bit-identity checks compare like with like.
TEST_XLA_FLAGS = ("--xla_cpu_multi_thread_eigen=false --xla_backend_optimization_level=0 "
                  "--xla_cpu_use_fusion_emitters=false")


# For a launch that runs longer than it compiles (the README's default job: 30 steps of the 1.7M tiny GPT),
# LLVM's usual optimisation wins: 76 -> 52 s for that job alone on 2 cores (compiling 9.5 -> 19.6 s, a step
# 2.1 -> 0.7 s), identical losses. XLA reads its flags left to right, so this one overrides the -O0 above.
RUN_BOUND_ENV = {"XLA_FLAGS": "--xla_backend_optimization_level=2"}


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
    # MPICH's busy wait yields with nanosleep instead of sched_yield: a rank waiting for a peer that is
    # still compiling no longer spins on one of the two cores that peer needs. Cold 4-rank runs of the
    # test model (ZB-H1; 1F1B PP=2 x DP=2), two each: system CPU 12-13 -> 4-5 s and 5-6 -> 3 s, wall
    # 21-25 -> 17-19 s and 14-16 -> 12-15 s. (Open MPI ignores MPICH's variables.)
    env.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
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


def shared_dir(tmp_path_factory: Any) -> Path:
    """A directory every test process of this pytest run shares: pytest-xdist's workers each get their
    own base temporary directory, inside one that is common to them."""
    base = Path(tmp_path_factory.getbasetemp())
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


# Which cases of each shared launch (tests/test_mpi.py `group_run`) the tests collected in this pytest run
# read, from their `reads_cases` marks (filled by tests/conftest.py once collection is done; every
# pytest-xdist worker collects the same tests, so every worker agrees on what a launch trains).
WANTED: dict[str, set[str]] = {}


def want_cases(items: list[Any]) -> None:
    WANTED.clear()
    for item in items:
        for mark in item.iter_markers("reads_cases"):
            WANTED.setdefault(mark.args[0], set()).update(mark.args[1:])


def launch_once(tmp_path_factory: Any, name: str, launch: Callable[[Path], Finished]) -> tuple[Finished, Path]:
    """`launch(out)` once per pytest run, whichever test (in whichever xdist worker) asks first; the
    others wait for it and read what it left in `out` (its exit status and output saved beside it)."""
    root = shared_dir(tmp_path_factory)
    out, saved = root / name, root / f"{name}.run.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not saved.exists():
            out.mkdir(exist_ok=True)
            run = launch(out)
            saved.write_text(json.dumps({"returncode": run.returncode, "stdout": run.stdout, "stderr": run.stderr}))
    return Finished(**json.loads(saved.read_text())), out


def refusals(tmp_path_factory: Any, launch: str, n: int,
             cases: dict[str, Callable[[Path], dict[str, Any]]]) -> tuple[Finished, Path]:
    """Bad inputs refused by `jaxpipe train`, one after another in one launch of `n` ranks
    (tests/mpi_train_dump.py's "argv" cases), once per pytest run. `cases[name](files)` gives
    {"argv": [...], "env": {...}} and may write what the case needs into `files` (out/files/<name>);
    only the cases that the collected tests read (their `reads_cases(launch, name)` marks) are made
    and run. Each rank's exit status and output: `refused(out, name, n)`."""
    def start(out: Path) -> Finished:
        made = {}
        for name in sorted(WANTED.get(launch, set()) & cases.keys()):
            files = out / "files" / name
            files.mkdir(parents=True)
            made[name] = cases[name](files)
        return run_mpi(n, ["tests/mpi_train_dump.py", "--out", str(out), "--cases", json.dumps(made)], timeout=600)

    return launch_once(tmp_path_factory, launch, start)


def refused(out: Path, case: str, n: int) -> list[dict[str, Any]]:
    """Every rank's {"code", "stdout", "stderr"} of one case of a `refusals` launch."""
    return [json.loads((out / case / f"rank{r}.json").read_text()) for r in range(n)]
