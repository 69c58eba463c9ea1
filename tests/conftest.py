import json
import os
import sys
import tempfile
from pathlib import Path

# Tests import the helpers beside them (reference.py, mpi_util.py) and run on CPU only.
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest
from mpi_util import RUN_BOUND_ENV, TINY_JOB_STEPS, configure_test_environment, launch_once, run_mpi, want_cases

# Before JAX starts its backend: this process (the single-process references) compiles with the same
# XLA flags and the same persistent cache as the ranks the tests launch.
configure_test_environment()


# Shared launches that tests reach through a fixture (the others through `reads_cases` marks).
LAUNCH_OF_FIXTURE = {"tiny_job": "tiny_job", "straight": "training_run"}
# Where the pytest-xdist workers tell the controller which tests read one shared launch (a JSON file
# {nodeid: launch}): pytest 9 no longer lets pytest-xdist's `--dist loadgroup` rename test ids, which is
# how it learns the groups, so `pytest_xdist_make_scheduler` below groups them itself.
GROUPS_ENV = "JAXPIPE_TEST_GROUPS"


def _launch_group(item) -> str | None:
    launches = {m.args[0] for m in item.iter_markers("reads_cases")}
    launches |= {LAUNCH_OF_FIXTURE[f] for f in getattr(item, "fixturenames", ()) if f in LAUNCH_OF_FIXTURE}
    return "+".join(sorted(launches)) or None


def pytest_configure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER") and getattr(config.option, "numprocesses", None):
        fd, path = tempfile.mkstemp(prefix="jaxpipe-test-groups-", suffix=".json")
        os.close(fd)
        os.environ[GROUPS_ENV] = path  # the workers, started after this, inherit it


def pytest_unconfigure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER") and GROUPS_ENV in os.environ:
        Path(os.environ.pop(GROUPS_ENV)).unlink(missing_ok=True)


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what will not run
def pytest_collection_modifyitems(config, items):
    want_cases(items)
    # Tests that launch processes first, in-process ones last: the long ones start early and the
    # short ones fill the end of both workers' queues.
    items.sort(key=lambda item: item.get_closest_marker("mpi") is None)
    if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(GROUPS_ENV):
        groups = {item.nodeid: g for item in items if (g := _launch_group(item))}
        tmp = f"{os.environ[GROUPS_ENV]}.{os.environ['PYTEST_XDIST_WORKER']}"
        Path(tmp).write_text(json.dumps(groups))
        os.replace(tmp, os.environ[GROUPS_ENV])  # every worker writes the same map, each at once


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`pytest -n 2`: the tests that read one shared launch go to one worker together (the other worker
    never sits blocked on the launch's lock, it runs other tests meanwhile); the groups first, the
    largest first, then the single tests in collection order. Another `--dist` is left as asked."""
    if config.getvalue("dist") != "load" or not os.environ.get(GROUPS_ENV):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LaunchGroups(LoadScopeScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # read once every worker has collected (and written the map)
                self.groups = json.loads(Path(os.environ[GROUPS_ENV]).read_text() or "{}")
            return self.groups.get(nodeid, nodeid)

    return LaunchGroups(config, log)


@pytest.fixture(scope="session")
def tiny_job(tmp_path_factory):
    """The README's default job (`mpiexec -n 4 jaxpipe train`: the tiny GPT, 4 stages), 30 steps, traced
    (its last two steps), with TensorBoard and per-step metrics: one launch serves the tests that it
    learns (tests/test_mpi.py) and those of the trace, the picture, TensorBoard and the plain step lines
    (tests/test_observe.py)."""
    run, tmp = launch_once(tmp_path_factory, "tiny_job", lambda tmp: run_mpi(
        4, ["-m", "jaxpipe", "train", "--set", f"train.steps={TINY_JOB_STEPS}", "--trace", str(tmp / "trace"),
            "--tensorboard", str(tmp / "tb"), "--metrics-out", str(tmp / "m.jsonl")], timeout=900, env=RUN_BOUND_ENV))
    assert run.returncode == 0, run.stderr[-20000:]
    return tmp, run
