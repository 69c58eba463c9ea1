import os
import sys
from pathlib import Path

# Tests import the helpers beside them (reference.py, mpi_util.py) and run on CPU only.
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest
from mpi_util import TINY_JOB_STEPS, configure_test_environment, launch_once, run_mpi, want_cases

# Before JAX starts its backend: this process (the single-process references) compiles with the same
# XLA flags and the same persistent cache as the ranks the tests launch.
configure_test_environment()


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what will not run
def pytest_collection_modifyitems(config, items):
    want_cases(items)


@pytest.fixture(scope="session")
def tiny_job(tmp_path_factory):
    """The README's default job (`mpiexec -n 4 jaxpipe train`: the tiny GPT, 4 stages), 30 steps, traced
    (its last two steps), with TensorBoard and per-step metrics: one launch serves the tests that it
    learns (tests/test_mpi.py) and those of the trace, the picture, TensorBoard and the plain step lines
    (tests/test_observe.py)."""
    run, tmp = launch_once(tmp_path_factory, "tiny_job", lambda tmp: run_mpi(
        4, ["-m", "jaxpipe", "train", "--set", f"train.steps={TINY_JOB_STEPS}", "--trace", str(tmp / "trace"),
            "--tensorboard", str(tmp / "tb"), "--metrics-out", str(tmp / "m.jsonl")], timeout=900))
    assert run.returncode == 0, run.stderr[-20000:]
    return tmp, run
