"""float16 end to end on CPU: the pipeline against a single-process float16 reference, dynamic loss
scaling through real overflows, exact resume with the loss-scale state, every codec and DP mode.

Two launches (2 and 4 ranks) train every multi-rank case of this module (tests/mpi_train_dump.py
--cases); the model and batch are tests/test_mpi.py's, so the float16 programs are compiled once.

Tolerances: the pipeline computes the reference's float16 operations, but in other programs (per
stage, per micro-batch of 2 instead of the batch of 8), so XLA may accumulate a product's float32 sum
in another order, and a float16 result then lands one float16 rounding (2^-11 = 4.9e-4 relative)
apart where float32 would land 2^-24 apart. Measured over 3-8 steps (PP=2 and PP=2 x DP=2, 2-core
CPU): losses 3.8e-6 relative (float32: 2e-6 is the bound), gradient norms 6.1e-5 relative, parameters
2.8e-4 absolute (Adam's update of an element whose gradient is near eps feels the gradient's float16
rounding); the bounds below are 5x, 8x and 3.5x those. A dropped micro-batch or a mislabelled target
moves losses by more than 1% (tests/test_mpi.py). Losses alone cannot tell float16 from float32 here
(the two references differ by 2.9e-6): the overflow runs can, since float32 never overflows.
"""

import json
import re
import typing
from collections.abc import Callable
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
from mpi_util import MODEL, NESTEROV, REPO, TRAIN, launch_once, run_mpi
from reference import reference_diloco, reference_train

from jaxpipe.comm.codec import (
    BFloat16,
    Codec,
    Delta,
    DeltaStore,
    Float8E4M3,
    Float8E5M2,
    Identity,
    Int4,
    Int4Row,
    Int4SR,
    Int8,
)
from jaxpipe.config import ParallelConfig, TrainConfig, load_config
from jaxpipe.errors import ConfigError
from jaxpipe.registry import ACT_CODECS, GRAD_CODECS
from jaxpipe.runtime import faults
from jaxpipe.train import checkpoint

F16 = ["model.dtype=float16"]
# What the trainer logs for a skipped float16 step (jaxpipe.train.trainer.report).
SKIP_LINE = (r"step +\d+ \| skipped: non-finite loss or gradients \(loss [-+.e\d]+, gradient norm² (inf|nan); not "
             r"finite on stages? \d+(, \d+)*\); no update on any rank \(loss scale now [-+.e\d]+\)")
PP2, PP2XDP2 = ["parallel.pp=2", "parallel.dp=1"], ["parallel.pp=2", "parallel.dp=2"]
LOSS_RTOL, NORM_RTOL, PARAM_ATOL = 2e-5, 5e-4, 1e-3
# A loss scale far too high for this model (its gradients overflow float16 from about 2^19 on) and a
# window of 2: the first 4 steps overflow and are skipped, each halving the scale, until 2^18 fits;
# two good steps then double it: skip -> halve -> recover -> grow (and, as gradients grow, overflow again).
OVERFLOW = [*F16, f"train.loss_scale_init={2**22}", "train.loss_scale_window=2", "train.steps=8"]
RESUME_AFTER = 5  # one good step into the window: the checkpoint's count matters for the next step
# Every data-parallel mode gets the overflow run plus a NaN on one replica only (stage 1 of replica 1,
# in a step that is finite otherwise): the mode must carry it to the other replica, so both skip.
DP_FAULT_STEP = 5

# Every codec class of jaxpipe.comm.codec with its float16 promise, the error bound relative to a row's
# largest magnitude (assert_codec_accepts_float16): a new codec class must be added here.
class _DeltaEnds(Codec):
    """Both ends of one delta-mode boundary: the sender's encode, the receiver's posting and decode, each
    with its own copies (first visits go as absolute int8; the check's second message is a delta)."""

    name = "delta"

    def __init__(self) -> None:
        def end(name: str) -> Delta:
            return Delta(Int4(), lambda key: np.arange(4), {0: DeltaStore(name, 8, (32, 64), "float16", save=True)})

        self.send, self.recv = end("send"), end("recv")

    def wire_spec(self, spec, key=None):
        return self.recv.wire_spec(spec, key)

    def encode(self, x, key):
        return self.send.encode(x, key)

    def decode(self, wire, spec, key):
        return self.recv.decode(wire, spec, key)


# Each codec's error bound relative to its row's absmax: half a step of the grid (int8 1/127, int4 1/7;
# float8 half an ulp, 2^-4 for e4m3's 3 mantissa bits, 2^-3 for e5m2's 2) plus 1% for the bfloat16 scale.
FLOAT16_CODECS: dict[str, tuple[Callable[[], Codec], float]] = {
    "Identity": (Identity, 0.0),
    "BFloat16": (BFloat16, 2.0**-8),
    "Int8": (Int8, 0.5 / 127 * 1.01),
    "Int4": (Int4, 0.5 / 7 * 1.01),
    "Int4Row": (Int4Row, 0.5 / 7 * 1.01),
    "Int4SR": (Int4SR, 1 / 7 * 1.01),  # rounded stochastically: up to a whole step
    "Float8E4M3": (Float8E4M3, 2.0**-4 * 1.01),
    "Float8E5M2": (Float8E5M2, 2.0**-3 * 1.01),
    "Delta": (_DeltaEnds, 0.5 / 127 * 1.01),
}
# The parallel.* choices that decide how messages and gradients travel (item 4 of issue 18: every value
# trains float16 or is refused before compilation). Keys this branch lacks are skipped.
CHOICE_KEYS = ("dp_mode", "grad_codec", "diloco_exchange", "act_codec", "act_grad_codec", "act_delta",
               "tied_grad_dtype")
# One PP=2 x DP=2 float16 run per entry, all in one 4-rank launch (start-up and compilation shared):
# OVERFLOW's loss scale plus a NaN on replica 1's stage 1 in step DP_FAULT_STEP. Each entry: the choices
# it sets and its bounds (loss rtol, norm rtol, parameter atol, replicas bit-equal). A choice left at its
# default is trained by every entry that does not set it; every other value must be set by an entry
# here, or appear in FLOAT16_REFUSED with the start of the ConfigError that refuses it with float16.
FLOAT16_RUNS: dict[str, tuple[list[str], float, float, float, bool]] = {
    "central_ps": (["parallel.dp_mode=central_ps"], LOSS_RTOL, NORM_RTOL, PARAM_ATOL, True),
    "sharded_ps": (["parallel.dp_mode=sharded_ps"], LOSS_RTOL, NORM_RTOL, PARAM_ATOL, True),
    "allreduce": (["parallel.dp_mode=allreduce"], LOSS_RTOL, NORM_RTOL, PARAM_ATOL, True),
    # The tied gradient's bfloat16 rounding (measured: losses 1.5e-5, norms 9e-5, parameters 4.3e-4).
    "tied_bfloat16": (["parallel.tied_grad_dtype=bfloat16"], 1e-4, 1e-3, 2e-3, True),
    # Gradient codecs (error feedback) against the uncompressed reference, bounds ~4x the measured error
    # (losses / norms / parameters): bfloat16 5.5e-6 / 1.8e-4 / 4.1e-4, int8 7.4e-5 / 5.2e-4 / 7.1e-3,
    # int4 3.5e-5 / 0.41 / 2.0e-2 (Adam gives an int4-rounded small gradient element a full-size update,
    # so after 3 updates of lr 1e-2 the last norm is 41% off; the losses stay close).
    "grad_bfloat16": (["parallel.grad_codec=bfloat16"], 2e-5, 1e-3, 2e-3, True),
    "grad_int8": (["parallel.grad_codec=int8"], 3e-4, 2e-3, 3e-2, True),
    "grad_int4": (["parallel.grad_codec=int4"], 1.5e-4, 1.0, 4e-2, True),
    # Pipeline codecs (issue 12) in float16 compute, against the uncompressed float16 reference; bounds
    # ~4x the measured errors (losses / norms / parameters): int4 3.3e-4 / 1.9e-2 / 2.3e-2, bfloat16
    # activations + float8 gradients 4.4e-5 / 7.2e-3 / 1.6e-2, float8 + bfloat16 5.8e-5 / 9.8e-4 / 7.0e-3,
    # int8 with the tied embedding in int8 4.2e-5 / 8.3e-4 / 4.6e-3 (this run found that an overflowed
    # float16 gradient became the tied error feedback's residue and made every later step non-finite).
    "act_int8_tied_int8": (["parallel.act_codec=int8", "parallel.act_grad_codec=int8",
                            "parallel.tied_grad_dtype=int8"], 2e-4, 4e-3, 2e-2, True),
    "act_int4": (["parallel.act_codec=int4", "parallel.act_grad_codec=int4"], 1.5e-3, 8e-2, 8e-2, True),
    "act_bf16_grad_float8": (["parallel.act_codec=bfloat16", "parallel.act_grad_codec=float8"], 2e-4, 3e-2, 6e-2,
                             True),
    "act_float8_grad_bf16": (["parallel.act_codec=float8", "parallel.act_grad_codec=bfloat16"], 2.5e-4, 4e-3, 3e-2,
                             True),
    # The LM head back on rank 0 (issue 24): the tied sum local to rank 0, the overflow's skips and the
    # other replica's NaN seen there too, both copies of `wte` bit-identical. Measured: losses 2.3e-6,
    # norms 2.4e-4, parameters 1.5e-3 (one element, layer_1/proj/bias, whose gradient sits near Adam's
    # eps: another partition's float16 roundings), the rest within 3.1e-4.
    "gpipe_ring": (["parallel.schedule=gpipe_ring"], LOSS_RTOL, NORM_RTOL, 5e-3, True),
}
# Choices whose float16 handling is checked at the codec level instead (test_codec_accepts_float16):
# delta mode needs token data, and the multi-rank float16 runs use the synthetic stream.
FLOAT16_CODEC_LEVEL = {"parallel.act_delta=true": "Delta",
                       # int4 with a scale per row: int4's float16 run (act_int4) with other scales.
                       "parallel.act_codec=int4_row": "Int4Row", "parallel.act_grad_codec=int4_row": "Int4Row",
                       # int4's groups rounded stochastically: int4's float16 run with another rounding.
                       "parallel.act_codec=int4_sr": "Int4SR", "parallel.act_grad_codec=int4_sr": "Int4SR"}
FLOAT16_REFUSED: dict[str, str] = {}
# DiLoCo's replicas decide on their own (replica 1 alone skips step DP_FAULT_STEP), so these runs meet
# reference_diloco with per-replica loss scales instead: exchange -> bounds (loss, norm, parameter atol).
DILOCO_H = 3
# Measured with jax 0.10.2 (two float16 replicas, an outer step and a skipped step behind it): losses
# within 2.2e-5 of the reference at step 8, parameters within 1.1e-3 (one element of 12288), so 5e-5
# and 2e-3; a step applied or skipped wrongly moves the losses by > 1e-3.
DILOCO_LOSS_RTOL, DILOCO_PARAM_ATOL = 5e-5, 2e-3
FLOAT16_DILOCO: dict[str, tuple[float, float, float]] = {
    "central_ps": (DILOCO_LOSS_RTOL, NORM_RTOL, DILOCO_PARAM_ATOL),
    "sharded_ps": (DILOCO_LOSS_RTOL, NORM_RTOL, DILOCO_PARAM_ATOL),
}


def diloco_set(exchange: str) -> list[str]:
    return ["parallel.dp_mode=diloco", f"parallel.diloco_inner_steps={DILOCO_H}",
            f"parallel.diloco_exchange={exchange}", *NESTEROV]


def choices() -> list[str]:
    """Every non-default value of the CHOICE_KEYS this branch has, as an override."""
    hints, defaults, out = typing.get_type_hints(ParallelConfig), ParallelConfig(), []
    registered = {"act_codec": ACT_CODECS, "act_grad_codec": ACT_CODECS, "grad_codec": GRAD_CODECS}
    for key in CHOICE_KEYS:
        if key in hints:
            values = (True, False) if hints[key] is bool else registered[key].names() if key in registered else \
                typing.get_args(hints[key])
            out += [f"parallel.{key}={str(v).lower() if isinstance(v, bool) else v}" for v in values
                    if v != getattr(defaults, key)]
    return out


def cfg_of(extra):
    return load_config(None, MODEL + TRAIN + extra)


@cache
def reference(extra: tuple[str, ...], skip: frozenset[int] = frozenset()):
    record: dict = {}
    return reference_train(cfg_of(list(extra)), skip=skip, record=record), record


def launch(n: int, tmp_path_factory):
    """One launch per world size trains every case of that size, once per pytest run (the first test to
    ask pays)."""

    def start(out: Path):
        env = None
        if n == 2:
            ckpt = out / "ckpt"
            cases = {
                "pp2": {"set": MODEL + TRAIN + PP2 + F16},
                "pp2_overflow": {"set": MODEL + TRAIN + PP2 + OVERFLOW + [
                    f"train.checkpoint_dir={ckpt}", f"train.checkpoint_every={RESUME_AFTER}"]},
                "pp2_overflow_resumed": {"set": MODEL + TRAIN + PP2 + OVERFLOW,
                                         "resume": str(ckpt / f"step_{RESUME_AFTER:08d}")},
            }
        else:
            cases = {f"pp2xdp2_{name}": {"set": MODEL + TRAIN + PP2XDP2 + OVERFLOW + run[0]}
                     for name, run in FLOAT16_RUNS.items()}
            cases |= {f"pp2xdp2_diloco_{ex}": {"set": MODEL + TRAIN + PP2XDP2 + OVERFLOW + diloco_set(ex)}
                      for ex in FLOAT16_DILOCO}
            env = {faults.ENV: f"nan@step={DP_FAULT_STEP},stage=1,replica=1"}
        return run_mpi(n, ["tests/mpi_train_dump.py", "--out", str(out), "--cases", json.dumps(cases)],
                       timeout=900, env=env)

    run, out = launch_once(tmp_path_factory, f"float16_{n}", start)
    assert run.returncode == 0, run.stderr[-20000:]
    return out


# ---- the pipeline against one process -----------------------------------------------------------------


@pytest.mark.mpi
@pytest.mark.reads_cases("float16_2")
def test_float16_pipeline_equals_single_process(tmp_path_factory):
    """PP=2 in float16, 3 steps at the default loss scale: the float16 single-process reference's
    losses, gradient norms and parameters (to float16's rounding, see the module's docstring)."""
    out = launch(2, tmp_path_factory)
    ref, record = reference(tuple(F16))
    assert record["skipped"] == [] and record["scales"] == [65536.0] * 3
    assert_float16_run(out / "pp2", ref, record, LOSS_RTOL, NORM_RTOL, PARAM_ATOL)
    assert "params, float16) |" in (out / "pp2" / "log.txt").read_text().splitlines()[0]


# ---- dynamic loss scaling through real overflows -------------------------------------------------------


@pytest.mark.mpi
@pytest.mark.reads_cases("float16_2")
def test_overflow_skips_halves_recovers_and_grows(tmp_path_factory):
    """A loss scale far too high: float16 gradients overflow for real, every rank skips the same steps
    and keeps the same scale as the single process that applies the same rule (its own overflows), and
    the parameters are those of a run that never took the skipped steps."""
    out = launch(2, tmp_path_factory)
    ref, record = reference(tuple(OVERFLOW))
    assert {"skip", "halve", "recover", "grow"} <= scale_events(record["scales"], record["skipped"]), record
    assert_float16_run(out / "pp2_overflow", ref, record, LOSS_RTOL, NORM_RTOL, PARAM_ATOL)
    result, ranks, _ = load_case(out / "pp2_overflow")
    assert ranks[0]["updates"] == len(record["scales"]) - len(record["skipped"])
    assert all(np.isnan(result["grad_norms"][s]) for s in record["skipped"])
    log = (out / "pp2_overflow" / "log.txt").read_text().splitlines()
    skip_lines = [line for line in log if re.fullmatch(SKIP_LINE, line)]
    assert [int(line.split()[1]) - 1 for line in skip_lines] == record["skipped"], log
    for line, s in zip(skip_lines, record["skipped"], strict=True):
        assert f"(loss {result['losses'][s]:.4g}, " in line and line.endswith(f"now {record['scales'][s] / 2:g})")


@pytest.mark.mpi
@pytest.mark.reads_cases("float16_2")
def test_float16_resume_is_bit_identical(tmp_path_factory):
    """The overflow run stopped after step 5 and resumed: the checkpoint holds the loss scale and its
    good-step count, and steps 6-8 (losses, skips, scales, parameters) are the uninterrupted run's bits."""
    out = launch(2, tmp_path_factory)
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


def test_every_codec_and_choice_has_a_float16_check():
    """Item 4 of issue 18: a new codec class, DP mode or wire choice states what it does with float16."""
    codecs, todo = set(), [Codec]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if hasattr(cls, "name") and cls.__module__ == "jaxpipe.comm.codec":  # concrete (a base has no name)
            codecs.add(cls.__name__)
    assert codecs - set(FLOAT16_CODECS) == set(), "add each codec's float16 bound to FLOAT16_CODECS"
    named = {o for run in FLOAT16_RUNS.values() for o in run[0]} | set(FLOAT16_REFUSED)
    named |= {o for ex in FLOAT16_DILOCO for o in diloco_set(ex)}
    named |= {o for o, codec in FLOAT16_CODEC_LEVEL.items() if codec in FLOAT16_CODECS}
    assert [c for c in choices() if c not in named] == [], "add a float16 run to FLOAT16_RUNS (or a refusal)"


@pytest.mark.parametrize("choice", list(FLOAT16_REFUSED))
def test_choice_refuses_float16_before_compiling(choice):
    with pytest.raises(ConfigError, match=re.escape(FLOAT16_REFUSED[choice])):
        load_config(None, MODEL + TRAIN + PP2XDP2 + F16 + [choice])


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
@pytest.mark.reads_cases("float16_4")
@pytest.mark.parametrize("name", list(FLOAT16_RUNS))
def test_choice_trains_float16(tmp_path_factory, name):
    """PP=2 x DP=2 in float16 through real overflows, and a NaN on one replica's gradients in step 5:
    all four ranks skip the reference's overflows and step 5, keep its scale, and end with its parameters."""
    out = launch(4, tmp_path_factory)
    ref, record = reference(tuple(OVERFLOW), frozenset({DP_FAULT_STEP - 1}))
    assert DP_FAULT_STEP - 1 not in reference(tuple(OVERFLOW))[1]["skipped"]  # the NaN is what skips step 5
    _, loss_rtol, norm_rtol, param_atol, replicas_equal = FLOAT16_RUNS[name]
    assert_float16_run(out / f"pp2xdp2_{name}", ref, record, loss_rtol, norm_rtol, param_atol, replicas_equal)


@pytest.mark.mpi
@pytest.mark.reads_cases("float16_4")
@pytest.mark.parametrize("exchange", list(FLOAT16_DILOCO))
def test_diloco_trains_float16(tmp_path_factory, exchange):
    """DiLoCo (H = 3) at PP=2 x DP=2 in float16 through real overflows and the NaN on replica 1 in step 5:
    each replica skips its own steps with its own loss scale (reference_diloco's), and after the last
    outer step every copy of a parameter is the reference's one model."""
    out = launch(4, tmp_path_factory)
    cfg = cfg_of(PP2XDP2 + OVERFLOW + diloco_set(exchange))
    record: dict = {}
    losses, norms, replicas = reference_diloco(cfg, [range(0, 4), range(4, 8)],
                                               skip={1: frozenset({DP_FAULT_STEP - 1})}, record=record)
    assert DP_FAULT_STEP - 1 not in record["skipped"][0] and record["skipped"][0] != record["skipped"][1]
    result, ranks, params = load_case(out / f"pp2xdp2_diloco_{exchange}")
    loss_rtol, norm_rtol, param_atol = FLOAT16_DILOCO[exchange]
    for r, got in enumerate(ranks):
        replica = r // 2  # launch order: replica-major, PP=2
        assert got["skipped_steps"] == record["skipped"][replica], f"rank {r} skipped {got['skipped_steps']}"
        assert got["loss_scales"] == record["scales"][replica], f"rank {r}'s loss scales {got['loss_scales']}"
    np.testing.assert_allclose(result["losses"], losses, rtol=loss_rtol)
    np.testing.assert_allclose(result["grad_norms"], norms, rtol=norm_rtol)
    assert params.keys() == replicas[0].keys()
    for k, copies in params.items():
        for c in copies:
            np.testing.assert_allclose(c, replicas[0][k], rtol=0, atol=param_atol, err_msg=k)


# ---- what the docs say --------------------------------------------------------------------------------


@pytest.mark.mpi
@pytest.mark.reads_cases("float16_2")
def test_docs_float16_lines_are_what_the_code_does(tmp_path_factory):
    """docs/gpus.md's float16 section: its defaults are the config's, CPU float16 products are float32
    products rounded to float16 as it says, and its example skip lines have the form the overflow run logs."""
    text = (REPO / "docs" / "gpus.md").read_text()
    section = text[text.index("\n## float16\n"):]
    section = section.split("\n## ", 2)[1]  # up to the next section, or the end of the page
    prose = " ".join(section.split())
    defaults = TrainConfig()
    assert f"`train.loss_scale_init`, {defaults.loss_scale_init:g}" in prose
    assert f"`train.loss_scale_window` ({defaults.loss_scale_window})" in prose
    assert "a float32 product of the float16 values, rounded to float16" in prose and f16_dot_is_float32_rounded()
    examples = [line for line in section.splitlines() if "| skipped:" in line]
    assert examples and all(re.fullmatch(SKIP_LINE, line) for line in examples), examples
    log = (launch(2, tmp_path_factory) / "pp2_overflow" / "log.txt").read_text()
    assert any(re.fullmatch(SKIP_LINE, line) for line in log.splitlines()), log
