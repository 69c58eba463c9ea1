"""float16 end to end on CPU: the pipeline against a single-process float16 reference, dynamic loss
scaling through real overflows, exact resume with the loss-scale state, every codec and DP mode.

Two launches (2 and 4 ranks) train every multi-rank case of this module (tests/mpi_train_dump.py
--cases); the model and batch are tests/test_mpi.py's, so the float16 programs are compiled once.

Tolerances: the pipeline computes exactly the reference's float16 operations, but in other programs
(per stage, per micro-batch of 2 instead of the batch of 8), so XLA may accumulate a product's
float32 sum in another order, and a float16 result then lands one float16 rounding (2^-11 = 4.9e-4
relative) apart. Such differences are ~2^13 times float32's, so float32's bounds (2e-6 on losses and
norms) become LOSS_RTOL and PARAM_ATOL here (parameters: 3 Adam steps of lr 1e-2).
"""

import json
import re
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from float16_checks import (
    FLOAT16_FINITE,
    assert_codec_accepts_float16,
    assert_float16_run,
    f16_dot_is_float32_rounded,
    load_case,
    scale_events,
)
from mpi_util import REPO, run_mpi
from reference import reference_train
from test_mpi import MODEL, TRAIN

from jaxpipe.comm.codec import CODECS, BFloat16, Identity
from jaxpipe.config import TrainConfig, load_config
from jaxpipe.dp.sync import DP_MODES
from jaxpipe.runtime import faults
from jaxpipe.train import checkpoint

F16 = ["model.dtype=float16"]
# What the trainer logs for a skipped float16 step (jaxpipe.train.trainer.report).
SKIP_LINE = (r"step +\d+ \| skipped: non-finite loss or gradients \(loss [-+.e\d]+, gradient norm² (inf|nan); not "
             r"finite on stages? \d+(, \d+)*\); no update on any rank \(loss scale now [-+.e\d]+\)")
PP2, PP2XDP2 = ["parallel.pp=2", "parallel.dp=1"], ["parallel.pp=2", "parallel.dp=2"]
LOSS_RTOL, PARAM_ATOL = 5e-3, 5e-3
# A loss scale far too high for this model (its gradients overflow float16 from about 2^19 on) and a
# window of 2: the first 4 steps overflow and are skipped, each halving the scale, until 2^18 fits;
# two good steps then double it: skip -> halve -> recover -> grow (and, as gradients grow, overflow again).
OVERFLOW = [*F16, f"train.loss_scale_init={2**22}", "train.loss_scale_window=2", "train.steps=8"]
RESUME_AFTER = 5  # one good step into the window: the checkpoint's count matters for the next step
# Every data-parallel mode gets the overflow run plus a NaN on one replica only (stage 1 of replica 1,
# in a step that is finite otherwise): the mode must carry it to the other replica, so both skip.
DP_FAULT_STEP = 5

# Each codec of jaxpipe.comm.codec with what it promises for float16 messages: its error bound relative
# to a row's largest magnitude (assert_codec_accepts_float16). A codec added to CODECS must be added here.
FLOAT16_CODECS = {"none": (Identity, 0.0), "bfloat16": (BFloat16, 2.0**-8)}
# Each data-parallel mode with its float16 bounds (loss rtol, parameter atol, replicas bit-equal):
# the exact modes meet the pipeline's own. A mode added to DP_MODES must be added here.
FLOAT16_DP_MODES = {mode: (LOSS_RTOL, PARAM_ATOL, True) for mode in ("central_ps", "sharded_ps", "allreduce")}


def cfg_of(extra):
    return load_config(None, MODEL + TRAIN + extra)


@cache
def reference(extra: tuple[str, ...], skip: frozenset[int] = frozenset()):
    record: dict = {}
    return reference_train(cfg_of(list(extra)), skip=skip, record=record), record


_runs: dict[int, tuple] = {}


def launch(n: int, tmp_root: Path):
    """One launch per world size trains every case of that size (the first test to ask pays)."""
    if n not in _runs:
        out = tmp_root / f"float16_{n}"
        out.mkdir()
        env = None
        if n == 2:
            ckpt = out / "ckpt"
            cases = {
                "pp2": {"set": MODEL + TRAIN + PP2 + F16},
                "pp2_tied_bf16": {"set": MODEL + TRAIN + PP2 + F16 + ["parallel.tied_grad_dtype=bfloat16"]},
                "pp2_overflow": {"set": MODEL + TRAIN + PP2 + OVERFLOW + [
                    f"train.checkpoint_dir={ckpt}", f"train.checkpoint_every={RESUME_AFTER}"]},
                "pp2_overflow_resumed": {"set": MODEL + TRAIN + PP2 + OVERFLOW,
                                         "resume": str(ckpt / f"step_{RESUME_AFTER:08d}")},
            }
        else:
            cases = {f"pp2xdp2_{mode}": {"set": MODEL + TRAIN + PP2XDP2 + OVERFLOW + [f"parallel.dp_mode={mode}"]}
                     for mode in FLOAT16_DP_MODES}
            env = {faults.ENV: f"nan@step={DP_FAULT_STEP},stage=1,replica=1"}
        run = run_mpi(n, ["tests/mpi_train_dump.py", "--out", str(out), "--cases", json.dumps(cases)],
                      timeout=900, env=env)
        _runs[n] = (run, out)
    run, out = _runs[n]
    assert run.returncode == 0, run.stderr[-20000:]
    return out


# ---- the pipeline against one process -----------------------------------------------------------------


@pytest.mark.mpi
def test_float16_pipeline_equals_single_process(tmp_path_factory):
    """PP=2 in float16, 3 steps at the default loss scale: the float16 single-process reference's
    losses, gradient norms and parameters (to float16's rounding, see the module's docstring)."""
    out = launch(2, tmp_path_factory.getbasetemp())
    ref, record = reference(tuple(F16))
    assert record["skipped"] == [] and record["scales"] == [65536.0] * 3
    assert_float16_run(out / "pp2", ref, record, LOSS_RTOL, PARAM_ATOL)
    # Computed in float16, not silently in float32: the float32 run is further away than the bound.
    f32_losses, _, _ = reference(())[0]
    assert max(abs(a / b - 1) for a, b in zip(load_case(out / "pp2")[0]["losses"], f32_losses, strict=True)) > 0


@pytest.mark.mpi
def test_float16_with_a_bfloat16_tied_exchange(tmp_path_factory):
    """float16 compute with the tied embedding's gradient sent in bfloat16: both copies of `wte` stay
    bit-identical, and training stays within the bfloat16 wire's rounding of the float16 reference."""
    out = launch(2, tmp_path_factory.getbasetemp())
    ref, record = reference(tuple(F16))
    _, _, params = load_case(out / "pp2_tied_bf16")
    first, last = params["embed/wte"]
    np.testing.assert_array_equal(last, first)
    assert_float16_run(out / "pp2_tied_bf16", ref, record, loss_rtol=1e-2, param_atol=1e-2)


# ---- dynamic loss scaling through real overflows -------------------------------------------------------


@pytest.mark.mpi
def test_overflow_skips_halves_recovers_and_grows(tmp_path_factory):
    """A loss scale far too high: float16 gradients overflow for real, every rank skips the same steps
    and keeps the same scale as the single process that applies the same rule (its own overflows), and
    the parameters are those of a run that never took the skipped steps."""
    out = launch(2, tmp_path_factory.getbasetemp())
    ref, record = reference(tuple(OVERFLOW))
    assert {"skip", "halve", "recover", "grow"} <= scale_events(record["scales"], record["skipped"]), record
    assert_float16_run(out / "pp2_overflow", ref, record, LOSS_RTOL, PARAM_ATOL)
    result, ranks, _ = load_case(out / "pp2_overflow")
    assert ranks[0]["updates"] == len(record["scales"]) - len(record["skipped"])
    assert all(np.isnan(result["grad_norms"][s]) for s in record["skipped"])
    log = (out / "pp2_overflow" / "log.txt").read_text().splitlines()
    skip_lines = [line for line in log if re.fullmatch(SKIP_LINE, line)]
    assert [int(line.split()[1]) - 1 for line in skip_lines] == record["skipped"], log
    for line, s in zip(skip_lines, record["skipped"], strict=True):
        assert f"(loss {result['losses'][s]:.4g}, " in line and line.endswith(f"now {record['scales'][s] / 2:g})")


@pytest.mark.mpi
def test_float16_resume_is_bit_identical(tmp_path_factory):
    """The overflow run stopped after step 4 and resumed: the checkpoint holds the loss scale and its
    good-step count, and steps 5-8 (losses, skips, scales, parameters) are the uninterrupted run's bits."""
    out = launch(2, tmp_path_factory.getbasetemp())
    _, record = reference(tuple(OVERFLOW))
    state = checkpoint.read_state(out / "ckpt" / f"step_{RESUME_AFTER:08d}")
    assert state["loss_scale"]["dynamic"] and state["loss_scale"]["scale"] == record["scales"][RESUME_AFTER]
    # A count that matters: without it (or the scale) the resumed run would double the scale a step late.
    assert state["loss_scale"]["good_steps"] == 1
    straight, straight_ranks, straight_params = load_case(out / "pp2_overflow")
    resumed, resumed_ranks, resumed_params = load_case(out / "pp2_overflow_resumed")
    assert resumed["losses"] == straight["losses"][RESUME_AFTER:]
    np.testing.assert_array_equal(resumed["grad_norms"], straight["grad_norms"][RESUME_AFTER:])
    for a, b in zip(resumed_ranks, straight_ranks, strict=True):
        assert a["loss_scales"] == b["loss_scales"][RESUME_AFTER:]
        assert a["skipped_steps"] == [s for s in b["skipped_steps"] if s >= RESUME_AFTER]
        assert a["updates"] == b["updates"]
    for k, copies in straight_params.items():
        for a, b in zip(resumed_params[k], copies, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=k)


def test_resume_of_an_unscaled_checkpoint_keeps_the_initial_scale():
    """A float32 checkpoint (or one from before the scale was saved) resumed in float16 starts at
    train.loss_scale_init; a float16 one continues with its scale and count."""
    from jaxpipe.train.optimizer import LossScaler

    scaler = LossScaler(TrainConfig(loss_scale_init=1024.0, loss_scale_window=3), "float16")
    for saved in (None, LossScaler(TrainConfig(), "float32").state()):
        scaler.load_state(saved)
        assert (scaler.scale, scaler.good_steps) == (1024.0, 0)
    scaler.load_state({"dynamic": True, "scale": 256.0, "good_steps": 2})
    scaler.update(True)
    assert (scaler.scale, scaler.good_steps) == (512.0, 0)
    fp32 = LossScaler(TrainConfig(), "float32")
    fp32.load_state({"dynamic": True, "scale": 256.0, "good_steps": 2})
    assert fp32.scale == 1.0


# ---- every codec and data-parallel mode ----------------------------------------------------------------


def test_every_codec_and_dp_mode_has_a_float16_check():
    """item 4 of issue 18: a new codec or DP mode must state what it does with float16 here."""
    assert set(CODECS) == set(FLOAT16_CODECS), "add the new codec's float16 bound to FLOAT16_CODECS"
    assert set(DP_MODES) == set(FLOAT16_DP_MODES), "add the new DP mode's float16 bounds to FLOAT16_DP_MODES"


@pytest.mark.parametrize("name", list(FLOAT16_CODECS))
def test_codec_accepts_float16(name):
    make, rel = FLOAT16_CODECS[name]
    assert_codec_accepts_float16(make(), rel)


def test_codec_check_catches_a_codec_that_hides_an_overflow():
    """The check fails a codec that saturates instead of keeping inf (so it can fail at all)."""

    class Saturating(Identity):
        def encode(self, x, key):
            return x.clip(-FLOAT16_FINITE, FLOAT16_FINITE)

    with pytest.raises(AssertionError, match="came back finite"):
        assert_codec_accepts_float16(Saturating(), 0.0)
    with pytest.raises(AssertionError, match="error"):  # bfloat16's rounding is above a zero bound
        assert_codec_accepts_float16(BFloat16(), 0.0)


@pytest.mark.mpi
@pytest.mark.parametrize("mode", list(FLOAT16_DP_MODES))
def test_dp_mode_accepts_float16(tmp_path_factory, mode):
    """PP=2 x DP=2 in float16 through real overflows, and a NaN on one replica's gradients in step 6:
    all four ranks skip the reference's overflows and step 6, keep its scale, and end with its parameters."""
    out = launch(4, tmp_path_factory.getbasetemp())
    ref, record = reference(tuple(OVERFLOW), frozenset({DP_FAULT_STEP - 1}))
    natural = reference(tuple(OVERFLOW))[1]
    assert DP_FAULT_STEP - 1 not in natural["skipped"]  # the NaN is what skips step 6
    loss_rtol, param_atol, replicas_equal = FLOAT16_DP_MODES[mode]
    assert_float16_run(out / f"pp2xdp2_{mode}", ref, record, loss_rtol, param_atol, replicas_equal)


# ---- what the README says ------------------------------------------------------------------------------


@pytest.mark.mpi
def test_readme_float16_lines_are_what_the_code_does(tmp_path_factory):
    """The README's float16 section: its defaults are the config's, CPU float16 products are float32
    products rounded to float16 as it says, and its example skip lines have the form the overflow run logs."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### float16"):]
    section = section[:section.index("\n## ")]
    defaults = TrainConfig()
    assert f"`train.loss_scale_init`, {defaults.loss_scale_init:g}" in section
    assert f"`train.loss_scale_window` ({defaults.loss_scale_window})" in section
    assert "a float32 product of the float16 values, rounded to float16" in section and f16_dot_is_float32_rounded()
    examples = [line for line in section.splitlines() if "| skipped:" in line]
    assert examples and all(re.fullmatch(SKIP_LINE, line) for line in examples), examples
    log = (launch(2, tmp_path_factory.getbasetemp()) / "pp2_overflow" / "log.txt").read_text()
    assert any(re.fullmatch(SKIP_LINE, line) for line in log.splitlines()), log
