"""Failures end the job fast and say where; bad numbers are caught; restarts are automatic; bad input
is refused before training.

The multi-rank tests run real `mpiexec` jobs with hard timeouts (so a hang fails the test) and break
them on purpose with `JAXPIPE_FAULT` (jaxpipe.runtime.faults). The fault writes a marker file when it fires,
which tells the test when the failure happened: every job must be gone within 30 s of it.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from mpi_util import MODEL, REPO, TRAIN, mpiexec, refusals, refused, run_mpi, sets
from mpi_util import test_env as mpi_env
from reference import reference_train
from test_mpi import reference as unskipped_reference  # cached: test_mpi computes it too

from jaxpipe.config import ModelConfig, TrainConfig, load_config
from jaxpipe.errors import ConfigError
from jaxpipe.model.layout import init_stage_params
from jaxpipe.pipeline.partition import StageSpec
from jaxpipe.runtime import faults
from jaxpipe.runtime.supervise import supervise, with_resume_auto
from jaxpipe.train import checkpoint
from jaxpipe.train.optimizer import LossScaler, Optimizer

PP2 = ["parallel.pp=2", "parallel.dp=1"]
ENDS_WITHIN_S = 30


def _tagged_pids(tag: str) -> list[int]:
    """Processes still alive that were started with JAXPIPE_TEST_TAG=tag (ranks, launcher)."""
    pids = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"JAXPIPE_TEST_TAG={tag}".encode() in env.read_bytes().split(b"\0"):
                pids.append(int(env.parent.name))
        except OSError:
            pass
    return pids


def faulty_job(tmp_path, n, overrides, fault, args=("-m", "jaxpipe", "train"), timeout=180):
    """Runs the job with `fault`; returns (run, seconds from the fault to the job's end)."""
    marker, tag = tmp_path / "fault_fired", uuid.uuid4().hex
    env = {faults.ENV: fault, faults.MARKER_ENV: str(marker), "JAXPIPE_TEST_TAG": tag}
    run = run_mpi(n, [*args, *sets(overrides)], timeout=timeout, env=env)
    ended = time.time()
    assert marker.exists(), f"the fault {fault} never fired\n{run.stdout}\n{run.stderr}"
    deadline = time.time() + 5  # Killed processes may take a moment to be reaped.
    while _tagged_pids(tag) and time.time() < deadline:
        time.sleep(0.1)
    assert not _tagged_pids(tag), "ranks outlived the job"
    return run, ended - float(marker.read_text().split()[0])


# ---- failures end the job and say where --------------------------------------------------------------


@pytest.mark.mpi
def test_exception_on_one_stage_aborts_every_rank(tmp_path):
    run, after = faulty_job(tmp_path, 4, [*MODEL, *TRAIN, "parallel.pp=4"], "raise@step=1,stage=2,mb=1")
    assert run.returncode == 1, run.stderr
    assert ("jaxpipe: rank 2 (stage 2 of 4, replica 0) failed at step 1, forward of micro-batch 1: "
            "RuntimeError: injected fault raise@step=1,stage=2,mb=1\nTraceback") in run.stderr
    assert "jaxpipe: rank 2 (stage 2 of 4, replica 0): aborting all ranks" in run.stderr
    assert "step " not in run.stdout and after < ENDS_WITHIN_S


def test_abort_waits_until_the_launcher_has_read_its_message():
    """`MPI_Abort` kills the launcher's stdio forwarders too: the message must have left the pipe first."""
    from jaxpipe.runtime.watchdog import _wait_until_read

    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, b"jaxpipe: rank 2 failed\n")
        taken = []

        def slow_forwarder():
            time.sleep(0.3)
            taken.append(os.read(read_fd, 100))

        forwarder = threading.Thread(target=slow_forwarder)
        start = time.monotonic()
        forwarder.start()
        _wait_until_read(write_fd, limit_s=5.0)
        assert 0.3 <= time.monotonic() - start < 5  # returned once the reader had read, not before
        forwarder.join()
        assert taken == [b"jaxpipe: rank 2 failed\n"]
        os.write(write_fd, b"nobody reads this")
        start = time.monotonic()
        _wait_until_read(write_fd, limit_s=0.2)  # a forwarder that is gone costs the limit, not a hang
        assert 0.2 <= time.monotonic() - start < 5
    finally:
        os.close(read_fd)
        os.close(write_fd)


DEADLINES = {
    # Stage 0 hangs before sending micro-batch 1 of step 2: stage 1's receive gives up.
    "receive": (PP2, "hang@step=2,stage=0,mb=1",
                "jaxpipe: rank 1 (stage 1 of 2, replica 0) failed at step 2, forward of micro-batch 1: TransportError: "
                "receive deadline: stage 1 (rank 1) waited 2 s for the activation of micro-batch 1 of step 2 from "
                "stage 0 (rank 0): that rank is dead, hung or far slower"),
    # Replica 1 hangs before the data-parallel sync: replica 0 would wait in the collective for ever
    # (MPI collectives have no timeout); the watchdog ends the job. (A peer that dies instead is
    # cleaned up by mpiexec at once: see the SIGKILL test.)
    "collective": (["parallel.pp=1", "parallel.dp=2"], "hang@step=2,rank=1,at=sync",
                   "jaxpipe: rank 0 (stage 0 of 1, replica 0) waited 2 s at step 2 in the data-parallel gradient "
                   "sync (central_ps): another rank is dead, hung or far slower"),
}


@pytest.mark.mpi
@pytest.mark.parametrize("case", list(DEADLINES))
def test_deadline_ends_a_job_whose_peer_is_gone(tmp_path, case):
    parallel, fault, message = DEADLINES[case]
    run, after = faulty_job(tmp_path, 2, [*MODEL, *TRAIN, *parallel, "runtime.comm_timeout_s=2"], fault)
    assert run.returncode == 1 and message in run.stderr, run.stderr
    assert after < ENDS_WITHIN_S


# ---- bad numbers -------------------------------------------------------------------------------------


@pytest.mark.mpi
def test_injected_nan_is_skipped_on_every_rank(tmp_path):
    """NaN gradients on stage 1 of replica 1 in step 2 of 3: after DP averaging and the tied-embedding
    sum every rank sees them, and no rank updates. The exact reference is a run in which step 2's
    update never happened: parameters, Adam moments and Adam's step counter (which the learning-rate
    schedule reads) stay, and step 3 trains on step 3's data with step 2's learning rate."""
    overrides = [*MODEL, *TRAIN, "parallel.pp=2", "parallel.dp=2", "train.on_nonfinite=skip"]
    run, _ = faulty_job(tmp_path, 4, overrides, "nan@step=2,stage=1,replica=1",
                        args=("tests/mpi_train_dump.py", "--out", str(tmp_path)))
    assert run.returncode == 0, run.stderr
    for rank in range(4):  # every rank: the same single skip, two updates
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (got["skipped_steps"], got["updates"]) == ([1], 2)
    cfg = load_config(None, MODEL + TRAIN)
    ref_losses, ref_norms, ref_params = reference_train(cfg, skip=frozenset({1}))
    result = json.loads((tmp_path / "result.json").read_text())
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=2e-6)  # step 2's loss itself is finite
    assert np.isnan(result["grad_norms"][1])
    np.testing.assert_allclose([result["grad_norms"][i] for i in (0, 2)], [ref_norms[i] for i in (0, 2)], rtol=2e-6)
    _, _, unskipped = unskipped_reference()
    moved = max(float(np.abs(unskipped[k] - v).max()) for k, v in ref_params.items())
    assert moved > 1e-3  # the skip matters far beyond the tolerance below
    for f in sorted(tmp_path.glob("rank*.npz")):
        for k, v in np.load(f).items():
            ref = ref_params["embed/wte" if k == "head/wte" else k]
            np.testing.assert_allclose(v, ref, rtol=0, atol=2e-6, err_msg=f"{f.name} {k}")


@pytest.mark.mpi
def test_injected_nan_stops_every_rank_with_stop(tmp_path):
    run, after = faulty_job(tmp_path, 2, [*MODEL, *TRAIN, *PP2], "nan@step=2,stage=1")
    assert run.returncode == 3, run.stderr
    line = ("jaxpipe: error: step 2: non-finite loss or gradients (loss 4.867, gradient norm² nan; not finite on "
            "stages 0, 1); train.on_nonfinite=stop ends the run")
    assert run.stderr.count(line) == 2, run.stderr  # once per rank, and no traceback
    assert "Traceback" not in run.stderr and "step     3" not in run.stdout and after < ENDS_WITHIN_S


def test_loss_scaler_state_machine():
    """float16's dynamic loss scale: halve on overflow (never below 1), double after `window` good steps
    in a row, an overflow restarting the count; off for float32 unless asked for."""
    scaler = LossScaler(TrainConfig(loss_scale_init=8.0, loss_scale_window=3), "float16")
    assert scaler.dynamic and scaler.scale == 8.0
    trace = []
    for finite in [True, True, False, True, True, True, True, False, False, False, False, False]:
        scaler.update(finite)
        trace.append(scaler.scale)
    assert trace == [8, 8, 4, 4, 4, 8, 8, 4, 2, 1, 1, 1]
    for mode, dtype, dynamic in [("auto", "float32", False), ("auto", "bfloat16", False), ("off", "float16", False),
                                 ("dynamic", "float32", True)]:
        scaler = LossScaler(TrainConfig(loss_scaling=mode), dtype)
        assert scaler.dynamic == dynamic, (mode, dtype)
        scaler.update(False)
        assert scaler.scale == (32768.0 if dynamic else 1.0)


# ---- automatic restart -------------------------------------------------------------------------------


def _run_stamped(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, list[tuple[float, str]]]:
    """(status, stdout, stderr lines with their arrival times); the process group is killed on timeout."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out: list[str] = []
    err: list[tuple[float, str]] = []
    readers = [threading.Thread(target=lambda: out.extend(proc.stdout)),
               threading.Thread(target=lambda: err.extend((time.time(), line) for line in proc.stderr))]
    for r in readers:
        r.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout} s") from None
    finally:
        for r in readers:
            r.join()
    return code, "".join(out), err


@pytest.mark.mpi
def test_killed_rank_ends_the_job_and_supervise_resumes_it_to_the_uninterrupted_result(tmp_path):
    """SIGKILL of rank 1 in step 3 of 4: the launcher ends the job within 30 s; `jaxpipe supervise`
    relaunches it with --resume auto from the step-2 checkpoint, and it finishes bit for bit as a run
    that was never killed (the fault's marker file keeps it from firing again)."""
    base = [*MODEL, *TRAIN, *PP2, "train.steps=4", "train.checkpoint_every=2"]
    straight = tmp_path / "straight.jsonl"
    run = run_mpi(2, ["-m", "jaxpipe", "train", *sets([*base, f"train.checkpoint_dir={tmp_path / 'a'}"]),
                      "--metrics-out", str(straight)])
    assert run.returncode == 0, run.stderr
    supervised, marker, tag = tmp_path / "supervised.jsonl", tmp_path / "fault_fired", uuid.uuid4().hex
    env = {**mpi_env(), faults.ENV: "kill@step=3,rank=1", faults.MARKER_ENV: str(marker), "JAXPIPE_TEST_TAG": tag}
    job = [*mpiexec(), "-n", "2", sys.executable, "-m", "jaxpipe", "train"]
    cmd = [sys.executable, "-m", "jaxpipe", "supervise", "--max-restarts", "2", "--delay", "0", "--", *job,
           *sets([*base, f"train.checkpoint_dir={tmp_path / 'b'}"]), "--metrics-out", str(supervised)]
    code, stdout, err = _run_stamped(cmd, env, timeout=300)
    stderr = "".join(line for _, line in err)
    assert code == 0, stdout + stderr
    assert "Killed (signal 9)" in stdout + stderr  # MPICH's notice; it cleans up the other rank
    [ended] = [t for t, line in err if "jaxpipe supervise: attempt 1 failed with exit status 9 after" in line]
    assert ended - float(marker.read_text().split()[0]) < ENDS_WITHIN_S
    assert "restart 1 of 2 in 0 s, from the newest checkpoint (--resume auto)" in stderr
    assert "jaxpipe supervise: done after 2 attempt(s), 1 restart(s)" in stderr
    assert "resumed from" in stdout and "after step 2" in stdout
    assert not _tagged_pids(tag)
    rows = [json.loads(line) for line in supervised.read_text().splitlines()]  # the last attempt's
    ref = [json.loads(line) for line in straight.read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref[2:]]  # bit for bit


def _script(tmp_path, body):
    path = tmp_path / "job.py"
    path.write_text(body)
    return [sys.executable, str(path)]


def test_supervise_decides_what_to_retry(tmp_path):
    """Restarts with --resume auto until success or K restarts; bad input (2) and a non-finite stop (3)
    are not retried: they would fail the same way."""
    log: list[str] = []
    calls = tmp_path / "calls"
    flaky = _script(tmp_path, f"import sys\nf = open({str(calls)!r}, 'a'); f.write(' '.join(sys.argv[1:]) + '\\n')\n"
                              f"f.close(); sys.exit(0 if len(open({str(calls)!r}).readlines()) == 3 else 1)\n")
    assert supervise([*flaky, "--resume", "x"], max_restarts=2, delay_s=0, log=log.append) == 0
    assert calls.read_text().splitlines() == ["--resume x", "--resume auto", "--resume auto"]
    calls.unlink()
    assert supervise(flaky, max_restarts=1, delay_s=0, log=log.append) == 1
    assert "giving up after 1 restart(s)" in log[-1]
    for code in (2, 3):
        log.clear()
        assert supervise(_script(tmp_path, f"raise SystemExit({code})"), 5, delay_s=0, log=log.append) == code
        assert len(log) == 2 and "a restart would fail the same way, giving up" in log[-1]
    assert with_resume_auto(["train", "--resume=a/b", "--set", "x=1"]) == ["train", "--set", "x=1", "--resume", "auto"]


def test_fault_specs():
    assert faults.parse("kill@step=3,rank=1; nan@step=2,stage=1,replica=0") == [
        faults.Fault("kill", 3, rank=1, text="kill@step=3,rank=1"),
        faults.Fault("nan", 2, stage=1, replica=0, text="nan@step=2,stage=1,replica=0")]
    assert faults.load(1, 1, 0, {faults.ENV: "raise@step=2,stage=0;hang@step=1,stage=1"}) == [
        faults.Fault("hang", 1, stage=1, text="hang@step=1,stage=1")]
    for bad, message in [("explode@step=1", "the kind must be one of"), ("kill@rank=1", "say which step"),
                         ("kill@step=x", "step='x' is not an integer"), ("kill@step=1,node=2", "unknown key 'node'")]:
        with pytest.raises(ConfigError, match=message):
            faults.parse(bad)
    faults.ARMED.clear()


# ---- bad input is refused before training, on every rank ----------------------------------------------


def _checkpoint_of_another_model(root: Path) -> Path:
    """A committed checkpoint of a narrower model, written in-process (no MPI job needed)."""
    model = ModelConfig(n_layer=6, d_model=32, n_head=4, seq_len=32, vocab_size=128)
    params = init_stage_params(model, 0, range(6), True, True)
    opt = Optimizer(TrainConfig()).init({0: params})
    cfg = load_config(None, MODEL + TRAIN + ["model.d_model=32"])
    return checkpoint.save(root, 2, comm=checkpoint.OneProcess(), writer=True, model=model,
                           specs={0: StageSpec(0, 1, 0, 6)}, params={0: params}, opt_state=opt,
                           state={"config": cfg.to_dict()})


def _token_dir(root: Path, n_tokens: int, meta_tokens: int, bad_at: int | None = None) -> Path:
    root.mkdir()
    tokens = (np.arange(n_tokens) % 100).astype(np.uint16)
    if bad_at is not None:
        tokens[bad_at] = 60000  # a corrupted region, far from the file's start
    tokens.tofile(root / "train.bin")
    meta = {"dtype": "uint16", "vocab_size": 100, "train": {"file": "train.bin", "tokens": meta_tokens}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


BAD_INPUT = {
    "wrong_type": (["train.steps=three"], None, "train.steps: expected an integer, got 'three'"),
    "truncated_tokens": (["data.source=tokens", "data.path={tmp}/data"],
                         lambda tmp: _token_dir(tmp / "data", 900, 1000),
                         "data.path '{tmp}/data/train.bin' holds 900 tokens but meta.json says 1000: the file was "
                         "truncated or replaced after `jaxpipe prepare-data`; prepare the data again"),
    "corrupt_tokens": (["data.source=tokens", "data.path={tmp}/data"],
                       lambda tmp: _token_dir(tmp / "data", 33 * 200 + 1, 33 * 200 + 1, bad_at=32 * 150 + 5),
                       "data.path '{tmp}/data/train.bin' holds token id 60000 >= model.vocab_size (128) in window "
                       "150 (tokens from 4800): wrong data.dtype or a tokenizer with a larger vocabulary"),
    "checkpoint_of_another_model": (["train.checkpoint_dir={tmp}/ckpt"],
                                    lambda tmp: _checkpoint_of_another_model(tmp / "ckpt"),
                                    "checkpoint '{tmp}/ckpt/step_00000002' is of another model: model.d_model 32 "
                                    "(checkpoint) vs 64"),
}


def _refusals(tmp_path_factory):
    """Every bad input, in one launch of 2 ranks (each case's files made in its own directory first)."""
    def bad(name: str):
        overrides, make, _ = BAD_INPUT[name]

        def case(files: Path) -> dict:
            if make is not None:
                make(files)
            fill = {"tmp": str(files)}
            return {"argv": ["train", *sets([o.format(**fill) for o in [*MODEL, *TRAIN, *PP2, *overrides]]),
                             "--resume", "auto"]}
        return case

    return refusals(tmp_path_factory, "reliability_refusals", 2, {name: bad(name) for name in BAD_INPUT})


@pytest.mark.mpi
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.reads_cases("reliability_refusals", c))
                                  for c in BAD_INPUT])
def test_bad_input_is_refused_before_training_on_every_rank(tmp_path_factory, case):
    run, out = _refusals(tmp_path_factory)
    assert run.returncode == 0, run.stdout + run.stderr  # the launch ran its cases (each refused in-process)
    message = BAD_INPUT[case][2].format(tmp=out / "files" / case)
    for rank in refused(out, case, 2):
        assert rank["code"] == 2, rank["stderr"]
        assert rank["stderr"].count(f"jaxpipe: error: {message}") == 1, rank["stderr"]  # on every rank
        assert "step " not in rank["stdout"]


def test_token_file_checks_every_window_it_reads(tmp_path):
    """The start-up check samples at most 256 windows of a large file; a corrupt window it missed is
    still refused when a step reads it (an id beyond the vocabulary would be silently clamped)."""
    from jaxpipe.data.source import TokenFileSource

    path = _token_dir(tmp_path / "data", 8 * 1000 + 1, 8 * 1000 + 1, bad_at=8 * 1 + 3) / "train.bin"
    source = TokenFileSource(str(path), "uint16", vocab_size=128, seq_len=8)  # window 1 is not sampled
    source.samples(np.array([0, 2, 999]))
    with pytest.raises(ConfigError, match=r"token id 60000 >= model.vocab_size \(128\) in window 1 .*the file is "
                                          r"corrupt; prepare the data again"):
        source.samples(np.array([0, 1]))


def test_config_timeouts_are_checked():
    assert load_config(None).runtime.comm_timeout_s == 300.0
    with pytest.raises(ConfigError, match="runtime.comm_timeout_s and runtime.first_step_timeout_s must be >= 0"):
        load_config(None, ["runtime.comm_timeout_s=-1"])
    with pytest.raises(ConfigError, match="runtime.first_step_timeout_s: expected a number, got 'soon'"):
        load_config(None, ["runtime.first_step_timeout_s=soon"])


def test_environment_of_the_tests_is_clean():
    assert faults.ENV not in os.environ  # a stray fault would break every other test's job
