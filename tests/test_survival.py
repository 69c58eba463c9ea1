"""Surviving what decentralised clusters do: preemption, a lost host, damaged checkpoints, a disk that
fails mid-run, a hung set-up.

The multi-rank tests run real `mpiexec` jobs with hard timeouts (tests/test_reliability.py's style)
and break them with `JAXPIPE_FAULT`; the fault `pause` holds a job at a known step while the test
signals it or takes its disk away. Their uninterrupted reference is tests/test_mpi.py's PP=2 x DP=2
layout `pp2xdp2_central_ps` (the same model, batch and 3 steps, trained in its group-4 launch), which
itself equals the single-process reference (tests/reference.py).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pytest
from mpi_util import MODEL, REPO, TRAIN, mpiexec, sets
from mpi_util import test_env as mpi_env
from test_mpi import group_run, reads, reference
from test_reliability import ENDS_WITHIN_S, faulty_job

from jaxpipe.cli import main
from jaxpipe.config import load_config
from jaxpipe.errors import ConfigError
from jaxpipe.model.layout import init_stage_params
from jaxpipe.pipeline.partition import StageSpec
from jaxpipe.runtime import elastic, faults, launch
from jaxpipe.runtime.elastic import Host
from jaxpipe.runtime.supervise import supervise
from jaxpipe.train import checkpoint
from jaxpipe.train.hooks import find_checkpoint
from jaxpipe.train.optimizer import Optimizer

PY = sys.executable
ALL_ITEMS = {"embed", "head", *(f"layer_{i}" for i in range(8))}


# ---- a job the test can act on while it runs -----------------------------------------------------------


class Job(launch.Job):
    """A command in its own session, its output collected while it runs (jaxpipe.runtime.launch),
    with the tests' hard timeouts."""

    def __init__(self, cmd: list[str], env: dict[str, str]):
        super().__init__(cmd, cwd=REPO, env=env)

    def until(self, ready, what: str, timeout: float = 240) -> None:
        super().until(ready, what, timeout)

    def wait(self, timeout: float = 900) -> int:
        try:
            return super().wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"did not finish in {timeout} s\n{self.stdout}\n{self.stderr}") from None


def fault_env(tmp_path: Path, fault: str) -> tuple[dict[str, str], Path]:
    marker = tmp_path / "fault_fired"
    env = {**mpi_env(), faults.ENV: fault, faults.MARKER_ENV: str(marker), "JAXPIPE_TEST_TAG": uuid.uuid4().hex}
    return env, marker


def fired(marker: Path, after: str = "") -> str:
    """What the fault wrote when it fired ('' while it has not, or while it still holds `after`)."""
    with suppress(OSError):
        text = marker.read_text()
        if text.endswith("\n") and text != after:
            return text
    return ""


def release(marker: Path, note: str) -> None:
    Path(f"{marker}.release").write_text(note)


@contextmanager
def read_only(path: Path):
    """`path` made unwritable, the way a lost mount or revoked permission would: chmod where that binds
    (not root), `chattr +i` where it does not; skips where neither can."""
    def writable() -> bool:
        probe = path / f".probe-{uuid.uuid4().hex}"
        try:
            probe.mkdir()
        except OSError:
            return False
        probe.rmdir()
        return True

    path.chmod(0o555)
    immutable = False
    if writable():
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    try:
        if writable():
            pytest.skip("cannot make a directory read-only here (root without chattr)")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


def metrics(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


UNINTERRUPTED = "pp2xdp2_central_ps"


def uninterrupted(tmp_path_factory) -> tuple[list[float], dict[str, np.ndarray]]:
    """Losses and final parameters of test_mpi's uninterrupted PP=2 x DP=2 run (3 steps)."""
    run, out = group_run(4, tmp_path_factory, UNINTERRUPTED)
    assert run.returncode == 0, run.stderr[-5000:]
    case = out / UNINTERRUPTED
    params: dict[str, np.ndarray] = {}
    for f in sorted(case.glob("rank*.npz")):
        params.update((k, v) for k, v in np.load(f).items() if k != "head/wte")
    return json.loads((case / "result.json").read_text())["losses"], params


def train_cmd(n: int | str, overrides: list[str], metrics_out: Path) -> list[str]:
    return [*mpiexec(), "-n", str(n), PY, "-m", "jaxpipe", "train", *sets(overrides), "--metrics-out", str(metrics_out)]


# ---- 1. preemption -------------------------------------------------------------------------------------


@pytest.mark.mpi
@reads(4, UNINTERRUPTED)
def test_sigterm_on_one_rank_checkpoints_every_stage_and_supervise_resumes_bit_identically(tmp_path,
                                                                                          tmp_path_factory):
    """SIGTERM to rank 1 alone during step 1 of 3 (PP=2 x DP=2): the world learns of it with step 1's
    sums, read after step 2 (no step barrier: they are read a step late), so every rank stops after
    step 2, the checkpoint of step 2 holds every stage's items, the job exits 75; `supervise` (with no
    restarts to spend: a preemption costs none) resumes it, and step 3 and the final parameters are bit
    for bit those of the uninterrupted run."""
    ref_losses, ref_params = uninterrupted(tmp_path_factory)
    ckpt = tmp_path / "ckpt"
    env, marker = fault_env(tmp_path, "pause@step=1,rank=1")
    base = [*MODEL, *TRAIN, "parallel.pp=2", "parallel.dp=auto", f"train.checkpoint_dir={ckpt}",
            "train.checkpoint_every=3", "runtime.preempt_grace_s=60"]
    cmd = [PY, "-m", "jaxpipe", "supervise", "--max-restarts", "0", "--delay", "0", "--",
           *train_cmd(4, base, tmp_path / "m.jsonl")]
    job = Job(cmd, env)
    job.until(lambda: fired(marker), "the pause at step 1")
    note = fired(marker)
    os.kill(int(note.split()[1]), signal.SIGTERM)  # rank 1's own process, not the launcher
    job.until(lambda: "SIGTERM received" in job.stderr, "rank 1's notice")
    release(marker, note)
    assert job.wait() == 0, job.stdout + job.stderr
    assert ("jaxpipe: rank 1 (stage 1 of 2, replica 0): SIGTERM received at step 1, " in job.stderr
            and job.stderr.count("SIGTERM received") == 1), job.stderr
    step2 = ckpt / "step_00000002"
    said = re.search(rf"preempted: SIGTERM on rank 1; every rank stopped after step 2, checkpoint {step2} "
                     r"committed; (\d+\.\d) s from the signal to the exit; exit status 75", job.stdout)
    assert said and float(said.group(1)) < 60, job.stdout
    assert "jaxpipe supervise: attempt 1 was preempted (exit status 75: it stopped at a step boundary" in job.stderr
    assert "resumed from" in job.stdout and "after step 2" in job.stdout
    assert "jaxpipe supervise: done after 2 attempt(s), 1 restart(s)" in job.stderr
    # The checkpoint of step 2 on every stage: all items, each matching its checksum.
    state = checkpoint.read_state(step2)
    assert state["step"] == 2 and set(state["checksums"]["items"]) == ALL_ITEMS
    assert checkpoint.verify(step2) is None
    assert metrics(tmp_path / "m.jsonl") == {3: ref_losses[2]}  # the resumed attempt's step, bit for bit
    _, final = checkpoint.load_flat(ckpt / "step_00000003")
    assert final.keys() == ref_params.keys()
    for k, v in ref_params.items():
        np.testing.assert_array_equal(final[k], v, err_msg=k)


PREEMPT_CHILD = """
import os, signal, sys, time
from jaxpipe.runtime.preempt import PREEMPT
with PREEMPT.installed(float(sys.argv[1]), saves=True):
    os.kill(os.getpid(), signal.SIGTERM)
    print("flag", PREEMPT.requested, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # within a second: the same notice delivered twice
    time.sleep(0.2)
    print("repeat ignored", flush=True)
    time.sleep(30)
print("handlers restored", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, flush=True)
"""


def test_second_signal_and_grace_end_the_process_at_once(tmp_path):
    """The flag is up before the next statement; a repeat within a second is the same notice; a
    second signal later exits at once (143) even while the main thread sleeps in C, and so does the
    grace period; after a run the handlers are restored."""
    proc = subprocess.Popen([PY, "-c", PREEMPT_CHILD, "0"], cwd=REPO, env=mpi_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "flag True\n"
    assert proc.stdout.readline() == "repeat ignored\n"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err
    assert "jaxpipe: rank 0: SIGTERM received during set-up: all ranks stop at the next step boundary, commit a " \
           "checkpoint there and exit with status 75; a second signal exits at once" in err
    assert "jaxpipe: rank 0: second signal (SIGTERM) during set-up: exiting at once, without a checkpoint" in err
    grace = subprocess.run([PY, "-c", PREEMPT_CHILD, "1"], cwd=REPO, env=mpi_env(), capture_output=True, text=True,
                           timeout=20)
    assert grace.returncode == 143
    assert ("jaxpipe: rank 0: still running 1 s after SIGTERM (runtime.preempt_grace_s), during set-up: exiting "
            "without this step's checkpoint; aborting all ranks") in grace.stderr
    done = subprocess.run([PY, "-c", PREEMPT_CHILD.replace("time.sleep(30)", "pass"), "0"], cwd=REPO,
                          env=mpi_env(), capture_output=True, text=True, timeout=20)
    assert done.returncode == 0 and "handlers restored True" in done.stdout, done.stderr


# ---- 2. elastic restart --------------------------------------------------------------------------------


def test_dp_auto_takes_the_replicas_the_ranks_allow(capsys):
    """The global batch stays; the replicas, hence the micro-batches per replica, follow the ranks."""
    base = ["parallel.pp=2", "parallel.dp=auto", "train.global_batch_size=16", "train.micro_batch_size=2"]
    for world, dp, m in [(2, 1, 8), (4, 2, 4), (8, 4, 2)]:
        cfg = load_config(None, base, world_size=world)
        assert (cfg.parallel.dp, cfg.num_microbatches, cfg.train.global_batch_size) == (dp, m, 16)
    with pytest.raises(ConfigError, match=r"parallel.dp=auto: 5 launched ranks are not a multiple of parallel.pp "
                                          r"\(2\): launch a multiple of 2 ranks, or set parallel.dp"):
        load_config(None, base, world_size=5)
    with pytest.raises(ConfigError, match=re.escape(
            "train.global_batch_size (16) must be divisible by parallel.dp (3) (parallel.dp=auto gave 3: 6 launched "
            "ranks / parallel.pp 2;")):
        load_config(None, base, world_size=6)
    with pytest.raises(SystemExit) as e:  # no MPI, no ranks to count
        main(["plan", "--set", "parallel.pp=2", "--set", "parallel.dp=auto"])
    assert e.value.code == 2
    assert "jaxpipe: error: parallel.dp=auto takes the replica count from the launched ranks (N / parallel.pp), " \
           "and this command runs without MPI: set parallel.dp to a number" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="parallel.dp: 'some' is not a valid"):
        load_config(None, ["parallel.dp=some"])


def test_hosts_probe_and_layout(tmp_path):
    assert elastic.parse_hosts("a:2\nb slots=3  # Open MPI's form\n\n# c\nd\n") == [Host("a", 2), Host("b", 3),
                                                                                   Host("d", 1)]
    with pytest.raises(ConfigError, match=r"hosts, line 1: 'a:0': expected 'host', 'host:slots' or 'host slots=N'"):
        elastic.parse_hosts("a:0", "hosts")
    layout = elastic.even_replicas(pp=2, global_batch=8, micro_batch=2)
    assert layout([Host("a", 2), Host("b", 2)]) == elastic.Launch(4, (Host("a", 2), Host("b", 2)), (), "PP 2 x DP 2")
    # 6 slots: DP 3 would not divide 8 samples into micro-batches of 2, so DP 2 on the first 4 slots.
    assert layout([Host("a", 3), Host("b", 3)]) == elastic.Launch(4, (Host("a", 3), Host("b", 1)), (), "PP 2 x DP 2")
    assert layout([Host("a", 1)]) == "1 usable slot(s) are fewer than parallel.pp = 2"
    alive, dead = elastic.probe([Host("a", 2), Host("b", 2)], "test {host} != b")
    assert alive == [Host("a", 2)] and dead == [(Host("b", 2), "probe `test b != b` failed with exit status 1")]
    launch = elastic.Launch(2, (Host("a", 2),), ("parallel.placement=x",))
    assert elastic.render(["mpiexec", "-n", "{n}", "-f", "{hostfile}", "--hosts", "{hosts}", "train"], launch,
                          "/h") == ["mpiexec", "-n", "2", "-f", "/h", "--hosts", "a:2", "train", "--set",
                                    "parallel.placement=x"]


def test_supervise_elastic_relaunches_on_the_usable_hosts(tmp_path, capsys):
    """Attempt 1 fails; host b's probe fails from then on; attempt 2 runs on a's slots alone, with
    --resume auto, from a hostfile listing only a. Without parallel.dp=auto --elastic refuses."""
    calls, hosts, hostfile = tmp_path / "calls", tmp_path / "hosts", tmp_path / "hostfile"
    hosts.write_text("a:2\nb:2\n")
    job = tmp_path / "job.py"
    job.write_text(f"import sys\nwith open({str(calls)!r}, 'a') as f: f.write(' '.join(sys.argv[1:]) + '\\n')\n"
                   f"print(open(sys.argv[4]).read().strip(), file=sys.stderr)\n"
                   f"sys.exit(9 if len(open({str(calls)!r}).readlines()) == 1 else 0)\n")
    log: list[str] = []
    probe = f"test {{host}} = a -o ! -e {calls}"
    spec = elastic.Elastic(hosts, elastic.even_replicas(2, 8, 2), hostfile, probe, 10)
    assert supervise([PY, str(job), "-n", "{n}", "-f", "{hostfile}"], 1, delay_s=0, log=log.append,
                     elastic=spec) == 0
    assert calls.read_text().splitlines() == [f"-n 4 -f {hostfile}", f"-n 2 -f {hostfile} --resume auto"]
    assert hostfile.read_text() == "a:2\n"
    assert f"jaxpipe supervise: host b (2 slot(s)) left out: probe `test b = a -o ! -e {calls}` failed with exit " \
           "status 1" in log
    assert "jaxpipe supervise: attempt 1 on 4 ranks (PP 2 x DP 2) of a:2, b:2" in log
    assert "jaxpipe supervise: attempt 2 on 2 ranks (PP 2 x DP 1) of a:2" in log
    with pytest.raises(SystemExit) as e:
        main(["supervise", "--elastic", "--hosts", str(hosts), "--", "mpiexec", "-n", "{n}", "jaxpipe", "train",
              "--set", "parallel.pp=2"])
    assert e.value.code == 2
    assert "supervise --elastic: the job trains with parallel.dp=1; set parallel.dp=auto" in capsys.readouterr().err


@pytest.mark.mpi
@reads(4, UNINTERRUPTED)
def test_lost_host_restarts_on_fewer_replicas_and_the_losses_continue(tmp_path, tmp_path_factory):
    """PP=2 x DP=2 on hosts A and B (2 slots each); the rank of stage 1 on B (rank 3) is killed in
    step 2 and B stops answering its probe. `supervise --elastic` relaunches on A alone: PP=2 x DP=1
    from the step-1 checkpoint, the same global batch as 4 micro-batches per replica instead of 2.

    Steps 2 and 3 equal the uninterrupted PP=2 x DP=2 run to rounding, not bit for bit: with DP=2
    each replica sums 2 micro-batch gradients scaled by 1/2 and the parameter server averages the two
    sums; with DP=1 one replica sums 4 gradients scaled by 1/4, the same mean in another float32
    order. Both runs are held to the single-process reference at test_mpi's tolerance (2e-6)."""
    ref_losses, ref_params = uninterrupted(tmp_path_factory)
    ckpt, hosts = tmp_path / "ckpt", tmp_path / "hosts"
    hosts.write_text("hostA:2\nhostB:2\n")
    env, marker = fault_env(tmp_path, "kill@step=2,rank=3")
    base = [*MODEL, *TRAIN, "parallel.pp=2", "parallel.dp=auto", f"train.checkpoint_dir={ckpt}",
            "train.checkpoint_every=1"]
    cmd = [PY, "-m", "jaxpipe", "supervise", "--elastic", "--hosts", str(hosts),
           "--probe", f"test {{host}} = hostA -o ! -e {marker}", "--max-restarts", "1", "--delay", "0", "--",
           *train_cmd("{n}", base, tmp_path / "m.jsonl")]
    job = Job(cmd, env)
    assert job.wait() == 0, job.stdout + job.stderr
    err = job.stderr
    assert "jaxpipe supervise: attempt 1 on 4 ranks (PP 2 x DP 2) of hostA:2, hostB:2" in err
    assert "jaxpipe supervise: attempt 1 failed with exit status 9 after" in err
    assert f"jaxpipe supervise: host hostB (2 slot(s)) left out: probe `test hostB = hostA -o ! -e {marker}` " \
           "failed with exit status 1" in err
    assert "jaxpipe supervise: attempt 2 on 2 ranks (PP 2 x DP 1) of hostA:2" in err
    assert "2 ranks = PP 2 x DP 1" in job.stdout and "batch 8 = 1 x 4 x 2" in job.stdout
    assert f"resumed from {ckpt / 'step_00000001'} after step 1" in job.stdout
    losses = metrics(tmp_path / "m.jsonl")
    assert sorted(losses) == [2, 3]
    np.testing.assert_allclose([losses[2], losses[3]], ref_losses[1:], rtol=2e-6)
    np.testing.assert_allclose([losses[2], losses[3]], reference()[0][1:], rtol=2e-6)
    _, final = checkpoint.load_flat(ckpt / "step_00000003")
    for k, v in ref_params.items():
        np.testing.assert_allclose(final[k], v, rtol=0, atol=2e-6, err_msg=k)


# ---- 3. checkpoint integrity, set-up deadlines ----------------------------------------------------------


def _flip_a_byte(item: Path) -> None:
    data = max((p for p in item.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))


def test_damaged_checkpoints_are_refused_and_resume_auto_falls_back(tmp_path):
    """A flipped byte in an item, a missing item, an edited state.json: each is named; `--resume auto`
    takes the newest intact checkpoint, logging every one it skipped; a path to a damaged one is
    refused; sampling and export refuse it too (verified on load)."""
    root = tmp_path / "ckpt"
    cfg = load_config(None, [*MODEL, *TRAIN, "parallel.pp=1", f"train.checkpoint_dir={root}"])
    spec = StageSpec(0, 1, 0, 8)
    params = init_stage_params(cfg.model, 0, range(8), True, True)
    opt = Optimizer(cfg.train).init({0: params})
    for step in (1, 2, 3, 4):
        checkpoint.save(root, step, comm=checkpoint.OneProcess(), writer=True, model=cfg.model, specs={0: spec},
                        params={0: params}, opt_state=opt, state={"config": cfg.to_dict()})
    names = checkpoint.rank_item_names({0: spec})
    _flip_a_byte(root / "step_00000004" / "layer_2")
    import shutil

    shutil.rmtree(root / "step_00000003" / "layer_5")
    state2 = root / "step_00000002" / checkpoint.STATE_FILE
    state2.write_text(state2.read_text().replace('"seed": 0', '"seed": 1'))
    log: list[str] = []
    found = find_checkpoint(cfg, "auto", checkpoint.OneProcess(), lambda _state: names, log.append)
    assert found is not None and found[0] == root / "step_00000001"
    step = root / "step_{:08d}"
    assert log == [
        f"resume: checkpoint '{step.as_posix().format(4)}' is damaged or incomplete: item 'layer_2' does not match its "
        f"checksum in state.json (same size: its bytes changed) (found by rank 0); taking the previous checkpoint",
        f"resume: checkpoint '{step.as_posix().format(3)}' is damaged or incomplete: item 'layer_5' is missing (found "
        f"by rank 0); taking the previous checkpoint",
        f"resume: checkpoint '{step.as_posix().format(2)}' is damaged or incomplete: state.json does not match its "
        f"checksum in COMMIT (found by rank 0); taking the previous checkpoint"]
    _, flat = checkpoint.load_flat(found[0])  # the intact one loads, bit for bit what was saved
    np.testing.assert_array_equal(flat["layer_2/qkv/kernel"], np.asarray(params["blocks"]["qkv"]["kernel"][2]))
    with pytest.raises(ConfigError, match=re.escape(
            f"checkpoint '{step.as_posix().format(4)}' is damaged or incomplete: item 'layer_2' does not match its "
            f"checksum in state.json (same size: its bytes changed) (found by rank 0): resume from another checkpoint "
            f"(--resume auto takes the newest intact one)")):
        find_checkpoint(cfg, str(root / "step_00000004"), checkpoint.OneProcess(), lambda _state: names)
    with pytest.raises(ConfigError, match="is damaged or incomplete: item 'layer_2' does not match its checksum"):
        checkpoint.load_model(root / "step_00000004")
    _flip_a_byte(root / "step_00000001" / "embed")
    with pytest.raises(ConfigError, match=re.escape(f"--resume auto: none of the 4 checkpoint(s) in '{root}' is "
                                                    f"intact (newest: checkpoint '{step.as_posix().format(4)}'")):
        find_checkpoint(cfg, "auto", checkpoint.OneProcess(), lambda _state: names)


SAVE_CHILD = """
import resource, sys
from jaxpipe.config import ModelConfig, TrainConfig
from jaxpipe.errors import CheckpointError
from jaxpipe.model.layout import init_stage_params
from jaxpipe.pipeline.partition import StageSpec
from jaxpipe.train import checkpoint
from jaxpipe.train.optimizer import Optimizer

model = ModelConfig(n_layer=2, d_model=64, n_head=2, seq_len=8, vocab_size=64)
params = init_stage_params(model, 0, range(2), True, True)
opt = Optimizer(TrainConfig()).init({0: params})
args = dict(comm=checkpoint.OneProcess(), writer=True, model=model, specs={0: StageSpec(0, 1, 0, 2)},
            params={0: params}, opt_state=opt, state={"config": {"model": model.__dict__}})
checkpoint.save(sys.argv[1], 1, **args)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))  # a full disk
try:
    checkpoint.save(sys.argv[1], 2, **args)
except CheckpointError as e:
    print(e)
"""


def test_a_full_disk_mid_save_commits_nothing(tmp_path):
    """Files that cannot grow past 20 kB (what a full disk does to a write): the save names the item
    it was writing and the newest committed checkpoint, and leaves no step_2 behind, not even .tmp."""
    root = tmp_path / "ckpt"
    done = subprocess.run([PY, "-c", SAVE_CHILD, str(root)], cwd=REPO, env=mpi_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"checkpoint save of step 2 failed on rank 0, writing '{root}/step_00000002.tmp/")
    assert done.stdout.rstrip().endswith(f"nothing was committed (newest committed checkpoint: {root}/step_00000001)")
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]


@pytest.mark.mpi
def test_hung_setup_collective_ends_the_job_naming_it(tmp_path):
    """Rank 1 hangs before the parameter broadcast; rank 0 waits for it in the broadcast of the tied
    embedding and the set-up deadline (runtime.first_step_timeout_s) ends the job."""
    run, after = faulty_job(tmp_path, 2, [*MODEL, *TRAIN, "parallel.pp=2", "runtime.first_step_timeout_s=8"],
                            "hang@step=0,rank=1")
    assert run.returncode == 1, run.stderr
    assert ("jaxpipe: rank 0 (stage 0 of 2, replica 0) waited 8 s in set-up (the broadcast of the tied embedding): "
            "another rank is dead, hung or far slower (deadline: runtime.comm_timeout_s, or "
            "runtime.first_step_timeout_s in set-up and a run's first step); aborting all ranks") in run.stderr
    assert "step " not in run.stdout and after < ENDS_WITHIN_S


# ---- 4. save failures ----------------------------------------------------------------------------------


@pytest.mark.mpi
def test_checkpoint_dir_turning_read_only_mid_run_stops_the_run(tmp_path):
    """After the step-2 checkpoint the directory becomes read-only: the step-4 save fails on every
    rank with the path, exit status 4 (train.on_save_error=stop), and step 2 stays the newest."""
    ckpt = tmp_path / "ckpt"
    env, marker = fault_env(tmp_path, "pause@step=3,rank=0")
    base = [*MODEL, *TRAIN, "parallel.pp=2", "train.steps=4", f"train.checkpoint_dir={ckpt}",
            "train.checkpoint_every=2"]
    job = Job(train_cmd(2, base, tmp_path / "m.jsonl"), env)
    job.until(lambda: fired(marker), "the pause at step 3")
    with read_only(ckpt):
        release(marker, fired(marker))
        code = job.wait()
    assert code == 4, job.stdout + job.stderr
    line = (f"jaxpipe: error: checkpoint save of step 4 failed on rank 0, creating '{ckpt}/step_00000004.tmp': "
            f"PermissionError: ")
    assert job.stderr.count(line) == 2, job.stderr  # once per rank
    assert (f"nothing was committed (newest committed checkpoint: {ckpt}/step_00000002); train.on_save_error=stop "
            f"ends the run: free space or restore write access to '{ckpt}', then resume with --resume auto"
            ) in job.stderr
    assert "Traceback" not in job.stderr and "step     4" in job.stdout
    assert [s for s, _ in checkpoint.committed(ckpt)] == [2] and not (ckpt / "step_00000004.tmp").exists()


@pytest.mark.mpi
def test_read_only_mid_run_with_warn_trains_on_and_a_launcher_sigint_stops_it(tmp_path):
    """train.on_save_error=warn: the failed step-4 save is logged and training goes on. Then SIGINT to
    the launcher (mpiexec forwards it to every rank) during step 6: every rank stops after step 6,
    and its checkpoint, which cannot be written either, is reported missing: exit 75."""
    ckpt = tmp_path / "ckpt"
    env, marker = fault_env(tmp_path, "pause@step=3,rank=0;pause@step=6,rank=1")
    base = [*MODEL, *TRAIN, "parallel.pp=2", "train.steps=8", "train.decay_steps=10", f"train.checkpoint_dir={ckpt}",
            "train.checkpoint_every=2", "train.on_save_error=warn"]
    job = Job(train_cmd(2, base, tmp_path / "m.jsonl"), env)
    job.until(lambda: fired(marker), "the pause at step 3")
    first = fired(marker)
    with read_only(ckpt):
        release(marker, first)
        job.until(lambda: fired(marker, after=first), "the pause at step 6")
        job.signal(signal.SIGINT)  # the launcher, as Ctrl-C would
        job.until(lambda: job.stderr.count("SIGINT received") == 2, "both ranks' notices")
        release(marker, fired(marker))
        code = job.wait()
    assert code == 75, job.stdout + job.stderr
    out = job.stdout
    assert (f"warning: checkpoint save of step 4 failed on rank 0, creating '{ckpt}/step_00000004.tmp': "
            f"PermissionError: ") in out
    assert "training goes on without it (train.on_save_error=warn)" in out
    assert "step     5 |" in out and "step     6 |" in out and "step     7" not in out
    assert re.search(r"preempted: SIGINT on ranks 0, 1; every rank stopped after step 6, no checkpoint \(its save "
                     r"failed, see above\); \d+\.\d s from the signal to the exit; exit status 75", out), out
    assert [s for s, _ in checkpoint.committed(ckpt)] == [2]
