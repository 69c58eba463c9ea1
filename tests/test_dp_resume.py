"""Checkpoints of data-parallel state: DiLoCo's replicas train apart, so each replica's parameters and
AdamW state, and each rank's outer parameters, momentum and error-feedback residues, are saved with the
checkpoint; a resume in the middle of an inner phase computes exactly what the uninterrupted run
computes, and a resume into another layout is refused on every rank before anything compiles."""

import json
from pathlib import Path

import numpy as np
import pytest
from mpi_util import MODEL, NESTEROV, TRAIN, WANTED, launch_once, refused, run_mpi, sets

pytestmark = pytest.mark.mpi

# H = 3: the checkpoint after step 2 falls inside the first inner phase (the stages' offsets 0 and 1 with
# staggering: stage 1 syncs after steps 2 and 5, stage 0 after 3 and 5), int8 with error feedback.
# The multi-rank tests' shared model and batch (tests/mpi_util.py), 5 steps, PP=2 x DP=2.
RUN = [*MODEL, *TRAIN, *NESTEROV, "train.steps=5", "parallel.pp=2", "parallel.dp=2",
       "parallel.dp_mode=diloco", "parallel.diloco_inner_steps=3", "parallel.diloco_stagger=true",
       "parallel.diloco_exchange=sharded_ps", "parallel.grad_codec=int8", "train.checkpoint_every=2"]


def _cases(out: Path) -> dict[str, dict]:
    """Both tests' runs, each a straight run then the run resumed from its checkpoint, and the refused
    resume into another layout (run through `jaxpipe train`'s entry point, every rank's status kept)."""
    diloco, stream = out / "diloco", out / "stream"
    other = [*RUN, f"train.checkpoint_dir={diloco / 'c'}", "parallel.dp_mode=central_ps",
             "parallel.diloco_stagger=false"]
    return {
        "diloco_straight": {"set": [*RUN, f"train.checkpoint_dir={diloco / 'a'}"]},
        "diloco_resumed": {"set": [*RUN, f"train.checkpoint_dir={diloco / 'b'}"],
                           "resume": str(diloco / "a" / "step_00000002")},
        "diloco_refused": {"argv": ["train", *sets(other), "--resume", str(diloco / "a" / "step_00000002")]},
        "stream_straight": {"set": [*STREAM, f"train.checkpoint_dir={stream / 'a'}"]},
        "stream_resumed": {"set": [*STREAM, f"train.checkpoint_dir={stream / 'b'}"],
                           "resume": str(stream / "a" / "step_00000005")},
    }


def _launch(tmp_path_factory) -> Path:
    """One launch of 4 ranks for both tests (the cases the collected tests read), once per pytest run."""
    def start(out: Path):
        cases = {k: v for k, v in _cases(out).items() if k in WANTED.get("dp_resume", set())}
        return run_mpi(4, ["tests/mpi_train_dump.py", "--out", str(out), "--cases", json.dumps(cases)], timeout=900)

    run, out = launch_once(tmp_path_factory, "dp_resume", start)
    assert run.returncode == 0, run.stderr[-5000:]
    return out


@pytest.mark.reads_cases("dp_resume", "diloco_straight", "diloco_resumed", "diloco_refused")
def test_diloco_resume_mid_inner_phase_is_exact(tmp_path_factory):
    out = _launch(tmp_path_factory)
    diloco = out / "diloco"
    step2 = diloco / "a" / "step_00000002"
    assert (step2 / "replicas" / "1" / "layer_0").is_dir()  # replica 1's own parameters and AdamW state
    assert sorted(f.name for f in (step2 / "dp").iterdir()) == [
        f"stage{s}_replica{r}.npz" for s in range(2) for r in range(2)]
    straight = json.loads((out / "diloco_straight" / "result.json").read_text())
    again = json.loads((out / "diloco_resumed" / "result.json").read_text())
    assert again["losses"] == straight["losses"][2:]  # exact float equality
    assert again["grad_norms"] == straight["grad_norms"][2:]
    for rank in range(4):
        a, b = (dict(np.load(out / d / f"rank{rank}.npz")) for d in ("diloco_straight", "diloco_resumed"))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"rank {rank} {k}")
    for f in sorted((diloco / "a" / "step_00000005" / "dp").iterdir()):  # outer state, momentum, residues
        a, b = np.load(f), np.load(diloco / "b" / "step_00000005" / "dp" / f.name)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{f.name} {k}")

    message = (f"checkpoint '{step2}' holds 2 DiLoCo replicas that train apart (each its own parameters, AdamW state "
               f"and outer-step state), which resume only into the same layout; this run differs in "
               f"parallel.dp_mode central_ps (checkpoint: diloco); parallel.diloco_stagger False (checkpoint: True)")
    for rank in refused(out, "diloco_refused", 4):  # `jaxpipe train --resume` into another layout
        assert rank["code"] == 2, rank["stderr"][-5000:]
        assert rank["stderr"].count("jaxpipe: error: " + message) == 1, rank["stderr"][-5000:]  # on every rank
        assert "step " not in rank["stdout"]  # nothing trained


# Streaming DiLoCo, H = 4, two fragments, each exchange merged two steps after it starts: fragment 0 (the
# embeddings, the even layers) starts after step 4 and merges after step 6, so the checkpoint after step 5
# is taken with its exchange in flight (the first stage's int8 rows of `wte` owed to the LM head's end).
STREAM = [*MODEL, *TRAIN, *NESTEROV, "train.steps=7", "parallel.pp=2", "parallel.dp=2",
          "parallel.dp_mode=streaming_diloco", "parallel.diloco_inner_steps=4", "parallel.diloco_fragments=2",
          "parallel.diloco_overlap_steps=2", "parallel.grad_codec=int8", "train.checkpoint_every=5"]


@pytest.mark.reads_cases("dp_resume", "stream_straight", "stream_resumed")
def test_streaming_diloco_resume_with_an_exchange_in_flight_is_exact(tmp_path_factory):
    out = _launch(tmp_path_factory)
    step5 = out / "stream" / "a" / "step_00000005"
    saved = np.load(step5 / "dp" / "stage0_replica0.npz")
    assert int(saved["pending0_at"]) == 6 and "pending1_at" not in saved.files  # fragment 0 was in flight
    assert int(np.load(step5 / "dp" / "stage1_replica0.npz")["owed_at"]) == 6  # the head's wte rows, received
    a = json.loads((out / "stream_straight" / "result.json").read_text())
    b = json.loads((out / "stream_resumed" / "result.json").read_text())
    assert b["losses"] == a["losses"][5:] and b["grad_norms"] == a["grad_norms"][5:]  # exact
    for rank in range(4):
        x, y = (dict(np.load(out / d / f"rank{rank}.npz")) for d in ("stream_straight", "stream_resumed"))
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"rank {rank} {k}")
