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


# Shared launches that tests reach through a fixture (the others through `reads_cases` marks).
LAUNCH_OF_FIXTURE = {"tiny_job": "tiny_job", "straight": "training_run"}


def pytest_itemcollected(item):
    """Under `pytest -n 2` (`--dist loadgroup`, pyproject.toml) the tests that read one shared launch go
    to one worker together: the other worker then never sits blocked on the launch's lock, it runs
    other tests meanwhile."""
    launches = {m.args[0] for m in item.iter_markers("reads_cases")}
    launches |= {LAUNCH_OF_FIXTURE[f] for f in getattr(item, "fixturenames", ()) if f in LAUNCH_OF_FIXTURE}
    if launches:
        item.add_marker(pytest.mark.xdist_group("+".join(sorted(launches))))


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what will not run
def pytest_collection_modifyitems(config, items):
    want_cases(items)
    # Tests that launch processes first, in-process ones last: the long ones start early and the
    # short ones fill the end of both workers' queues (xdist hands out groups of a shared launch first,
    # the most tests first, then single tests in this order).
    items.sort(key=lambda item: item.get_closest_marker("mpi") is None)


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
