"""Seeing what a run does and taking what users type: the per-rank trace (merge, flows, the Gantt
picture), TensorBoard, the progress line, `--set a=1 b=2`, short runs, `--dry-run`, `--version`."""

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
from mpi_util import REPO, TINY_JOB_STEPS, mpiexec
from mpi_util import test_env as mpi_env

from jaxpipe.cli import _parser
from jaxpipe.config import effective_warmup, load_config
from jaxpipe.errors import ConfigError
from jaxpipe.export import trace as trace_files
from jaxpipe.pipeline.costmodel import config_schedule
from jaxpipe.pipeline.schedule import Op
from jaxpipe.train.checkpoint import check_writable
from jaxpipe.train.observe import launcher_terminal, parse_trace_steps, progress_wanted
from jaxpipe.train.optimizer import learning_rate

# ---- the command line and config ---------------------------------------------------------------------


def test_set_takes_several_values_and_repeats():
    args = _parser().parse_args(["train", "--set", "train.steps=3", "parallel.pp=2", "--config", "x.yaml",
                                 "--set", "model.n_layer=4"])
    assert args.overrides == ["train.steps=3", "parallel.pp=2", "model.n_layer=4"] and args.config == "x.yaml"
    args = _parser().parse_args(["plan", "--set", "network.delay_ms=10", "network.rate_gbit=1", "--sweep"])
    assert args.overrides == ["network.delay_ms=10", "network.rate_gbit=1"] and args.sweep


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == "jaxpipe 0.1.0"


def test_runs_shorter_than_the_warmup_clip_it():
    one = load_config(None, ["train.steps=1"])  # warm-up 2 by default
    assert effective_warmup(one.train) == 0
    assert float(learning_rate(one.train)(0)) == pytest.approx(one.train.lr)  # the one step at the peak rate
    assert effective_warmup(load_config(None, ["train.steps=2"]).train) == 1
    assert effective_warmup(load_config(None, ["train.steps=20"]).train) == 2
    # An explicit decay shorter than the warm-up is a contradiction, not a short run.
    with pytest.raises(ConfigError, match=r"train.warmup_steps \(2\) must be smaller than train.decay_steps \(2\)"):
        load_config(None, ["train.decay_steps=2"])


def test_trace_steps():
    assert parse_trace_steps(None, 20) == range(18, 20)  # the last two
    assert parse_trace_steps("3:5", 20) == range(2, 5)
    assert parse_trace_steps("7", 20) == range(6, 7)
    assert parse_trace_steps("19:", 20) == range(18, 20)
    with pytest.raises(ConfigError, match=r"--trace-steps '5:30': need 1 <= A <= B <= train.steps \(20\)"):
        parse_trace_steps("5:30", 20)
    with pytest.raises(ConfigError, match="expected A:B"):
        parse_trace_steps("a:b", 20)


def test_unwritable_checkpoint_dir_message(tmp_path):
    (tmp_path / "a_file").write_text("")
    bad = tmp_path / "a_file" / "ckpt"
    with pytest.raises(ConfigError) as e:
        check_writable(bad, "train.checkpoint_dir")
    assert str(e.value) == (f"train.checkpoint_dir '{bad}' cannot be written: Not a directory; choose a directory "
                            f"this job can write on every host, or set train.checkpoint_every=0")
    check_writable(tmp_path / "new" / "ckpt", "train.checkpoint_dir")  # created, and left empty
    assert list((tmp_path / "new" / "ckpt").iterdir()) == []


def test_unwritable_metrics_out_is_refused_before_compiling(tmp_path, capsys):
    """Before, the metrics file was opened after set-up, on global rank 0 alone, and its error was reported as
    a failure of the tied-embedding exchange; now the flag is checked with the others (`--dry-run` too)."""
    from jaxpipe.cli import main

    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        main(["train", "--dry-run", "--metrics-out", str(tmp_path / "a_file" / "m.jsonl")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"jaxpipe: error: --metrics-out's directory '{tmp_path / 'a_file'}' cannot be written: File exists; "
        "choose a directory this job can write on every host, or leave --metrics-out out")


def test_dry_run_prints_the_plan_without_touching_a_device():
    code = ("import sys; from jaxpipe.cli import main; main(sys.argv[1:]); from jax._src import xla_bridge; "
            "print('backends', len(xla_bridge._backends))")
    r = subprocess.run([sys.executable, "-c", code, "train", "--dry-run", "--set", "parallel.pp=2", "train.steps=1"],
                       cwd=REPO, env=mpi_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "# resolved config" in out and "  steps: 1\n" in out and "  pp: 2\n" in out
    assert "stage 0: layers [0, 5) (5 + embedding)" in out and "stage 1: layers [5, 8) (3 + head/loss)" in out
    assert "parameters: 1,668,352 (1.7M); per stage: 1.1M, 0.7M" in out
    assert "rank 1: ... 1L0 --- --- 1L1" in out  # the schedule grid
    assert "# predicted iteration: " in out and "compute-bound" in out
    assert out.strip().endswith("backends 0")  # nothing compiled: no JAX backend was even started


# ---- the terminal ------------------------------------------------------------------------------------


def test_progress_line_only_on_a_terminal():
    r, w = os.pipe()
    with os.fdopen(w, "w") as pipe:
        assert progress_wanted("auto", pipe) == (False, None)
        assert progress_wanted("on", pipe)[0]
    os.close(r)
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as tty:
        shown, name = progress_wanted("auto", tty)
        assert shown and name == os.ttyname(tty.fileno())
        assert progress_wanted("off", tty) == (False, None)
    os.close(master)
    assert launcher_terminal() is None  # pytest is no MPI launcher, whatever its own stdout is


def _run_on_a_terminal(cmd: list[str], timeout: float = 240) -> str:
    """`cmd` with stdout and stderr on a pseudo-terminal of 160 columns, as a user at a terminal runs it."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(cmd, cwd=REPO, env=mpi_env(), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the terminal's last writer closed it
                    break
                if not chunk:
                    break
                out += chunk
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout} s:\n{out.decode(errors='replace')}")
    finally:
        os.close(master)
        proc.wait(timeout=30)
    assert proc.returncode == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


@pytest.mark.mpi
def test_one_step_run_on_a_terminal_shows_the_progress_line():
    """Through mpiexec (a rank's stdout is a pipe to the launcher, the launcher's a terminal): the live
    line; a run of one step, shorter than the warm-up, trains at the peak rate and says so first."""
    out = _run_on_a_terminal([*mpiexec(), "-n", "1", sys.executable, "-m", "jaxpipe", "train",
                              "--set", "parallel.pp=1", "train.steps=1"])
    assert "\x1b[" in out  # a live display, drawn with terminal control sequences
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out).replace("\r", "\n")
    assert "| warm-up clipped from 2 to 0 (train.steps=1)" in plain
    assert "step 1/1" in plain and "ETA" in plain and "tok/s" in plain
    assert "lr 3.00e-03" in plain  # step 1 at the peak rate, not 0


# ---- one traced 4-rank run: trace, picture, TensorBoard, plain lines ---------------------------------------


@pytest.fixture(scope="module")
def traced(tiny_job):
    """The README's default job, 30 steps, its last two traced (tests/conftest.py)."""
    return tiny_job


@pytest.mark.mpi
def test_plain_lines_when_stdout_is_not_a_terminal(traced):
    _, run = traced
    assert "\x1b[" not in run.stdout and "\r" not in run.stdout  # no progress bar into a pipe
    lines = run.stdout.splitlines()
    assert lines[0].startswith("jaxpipe 0.1.0: 4 ranks = PP 4 x DP 1")
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == TINY_JOB_STEPS and all(" TFLOP/s/device | mem " in line for line in steps)
    assert "peak memory per stage (GiB, process RSS): " in lines[-1] and "n/a" not in lines[-1]


@pytest.mark.mpi
def test_trace_merges_with_every_rank_and_matching_flows(traced):
    tmp, _ = traced
    merged = json.loads(trace_files.merge(tmp / "trace").read_text())
    events = merged["traceEvents"]
    rows = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert rows == {r: f"rank {r} (stage {r}, replica 0)" for r in range(4)}
    starts = {e["id"]: e for e in events if e.get("cat") == "message" and e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e.get("cat") == "message" and e["ph"] == "f"}
    lowered = config_schedule(load_config(None, ["parallel.pp=4"])).lowered()
    per_step = sum(a.op in (Op.SEND_ACT, Op.SEND_GRAD) for actions in lowered.ranks for a in actions)
    assert per_step == 48 and starts.keys() == ends.keys() and len(starts) == 2 * per_step
    for i, s in starts.items():  # each arrow goes from a pipeline neighbour, forward in time (one clock)
        f = ends[i]
        assert abs(f["pid"] - s["pid"]) == 1 and f["ts"] > s["ts"], (s, f)
    # Every rank's computations of a traced step are the schedule's: GPipe's F and B, the last stage's L.
    last = [e for e in events if e.get("cat") == "compute" and e["args"]["step"] == TINY_JOB_STEPS]
    for r, actions in enumerate(lowered.ranks):
        want = sorted((a.op.value, a.microbatch) for a in actions if not a.op.is_comm)
        assert sorted((e["name"], e["args"]["microbatch"]) for e in last if e["pid"] == r) == want
    phases = {e["name"] for e in events if e.get("cat") == "phase" and e["args"].get("step") == TINY_JOB_STEPS}
    assert {"pipeline", "tied embedding sum", "data-parallel sync", "gradient norm", "norm exchange",
            "optimizer update", "loss sum"} <= phases
    assert "barrier" not in phases  # runtime.step_barrier is off: no world barrier in a training step
    assert trace_files.message_latencies([events], kinds="F") and trace_files.step_mark(events, "pipeline") > 0


@pytest.mark.mpi
def test_trace_plot_writes_the_gantt_picture(traced):
    tmp, _ = traced
    path, verdict = trace_files.plot(tmp / "trace", tmp / "timeline.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    metrics = [json.loads(line) for line in (tmp / "m.jsonl").read_text().splitlines()]
    assert verdict.step == TINY_JOB_STEPS and verdict.iteration_s == pytest.approx(metrics[-1]["iter_time_s"])
    assert verdict.bound_s is not None and verdict.bound_s > 0 and verdict.bound in (
        "compute", "pipeline bubble", "link", "synchronisation")
    r = subprocess.run([sys.executable, "tools/timeline.py", str(tmp / "trace")], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [line.split(":")[0].strip() for line in r.stdout.splitlines() if line.startswith("  rank")] == [
        "rank 0", "rank 1", "rank 2", "rank 3"]


@pytest.mark.mpi
def test_tensorboard_events_hold_the_logged_values(traced):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _ = traced
    events = EventAccumulator(str(tmp / "tb"))
    events.Reload()
    metrics = [json.loads(line) for line in (tmp / "m.jsonl").read_text().splitlines()]
    for tag, key in [("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                     ("perf/tokens_per_s", "tokens_per_s"), ("perf/iter_time_s", "iter_time_s"),
                     ("comm/dp_bytes", "dp_bytes")]:
        got = events.Scalars(tag)
        assert [e.step for e in got] == list(range(1, TINY_JOB_STEPS + 1)), tag
        np.testing.assert_allclose([e.value for e in got], [m[key] for m in metrics], rtol=1e-6, err_msg=tag)
    # 48 messages per step of 2 x 128 x 128 float32 activations (or their gradients), one pipeline.
    assert [e.value for e in events.Scalars("comm/pipeline_bytes")] == [48 * 2 * 128 * 128 * 4] * TINY_JOB_STEPS
    assert "perf/tflops_per_device" in events.Tags()["scalars"]
    assert "perf/mfu" not in events.Tags()["scalars"]  # CPU: no known peak
    assert Path(tmp / "tb").is_dir()


# ---- one clock across machines -------------------------------------------------------------------------


class _ThreadComm:
    """Two ranks in two threads: the calls `Trace.sync_clocks` makes, over queues."""

    def __init__(self, rank: int, boxes: dict, barrier):
        self.rank, self.boxes, self.barrier = rank, boxes, barrier

    def Get_rank(self):
        return self.rank

    def send(self, obj, dest, tag):
        self.boxes[(self.rank, dest)].put(obj)

    def recv(self, source, tag):
        return self.boxes[(source, self.rank)].get(timeout=30)

    def allgather(self, obj):
        self.boxes["all"][self.rank] = obj
        self.barrier.wait()
        out = list(self.boxes["all"])
        self.barrier.wait()
        return out

    def bcast(self, obj, root):
        if self.rank == root:
            self.boxes["bcast"] = obj
        self.barrier.wait()
        out = self.boxes["bcast"]
        self.barrier.wait()
        return out


@pytest.mark.parametrize(("ids", "expected"), [(("boot a", "boot b"), -5.0), (("boot a", "boot a"), 0.0)])
def test_clock_offsets(ids, expected):
    """Another machine's clock, 5 s ahead, is measured back to rank 0's; one machine's ranks share a clock."""
    import queue
    import threading

    from jaxpipe.runtime.trace import Trace

    boxes = {(0, 1): queue.Queue(), (1, 0): queue.Queue(), "all": [None, None]}
    barrier = threading.Barrier(2)
    traces = [Trace(), Trace()]
    clocks = [time.perf_counter, lambda: time.perf_counter() + 5.0]
    threads = [threading.Thread(target=traces[r].sync_clocks, args=(_ThreadComm(r, boxes, barrier),),
                                kwargs={"clock": clocks[r], "clock_id": ids[r]}) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert traces[0].offset == 0.0
    assert traces[1].offset == pytest.approx(expected, abs=0.05)
    assert traces[0].epoch == traces[1].epoch
