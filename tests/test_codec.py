"""Message codecs and their quantisers without MPI: round-trip error bounds, exactness on the grid,
the wire layout, non-finite rows, delta mode's rules and state, the header check, the transport's
refusal of a wire it cannot carry, tied-embedding error feedback."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpipe.comm import quant
from jaxpipe.comm.codec import (
    BFloat16,
    Delta,
    DeltaStore,
    Float8E4M3,
    Float8E5M2,
    Int4,
    Int8,
    make_codec,
    quant_wire_spec,
    wire_nbytes,
)
from jaxpipe.comm.message import ArraySpec, Kind, MsgKey, make_header
from jaxpipe.comm.tied import LocalTiedSum
from jaxpipe.comm.transport.base import ThreadedTransport
from jaxpipe.config import load_config
from jaxpipe.errors import ConfigError, TransportError

QMAX = {"int8": 127, "int4": 7, "float8_e4m3": 448, "float8_e5m2": 57344}


def rows(seed=0, shape=(3, 16, 64)):
    """Rows whose scales span eight orders of magnitude (activation gradients are ~1e-6)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    mag = 10.0 ** jax.random.uniform(k2, (*shape[:-1], 1), minval=-7, maxval=1)
    return jax.random.normal(k1, shape) * mag


def scale_of(x, fmt):
    s = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / QMAX[fmt]
    return s.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_integer_round_trip_is_within_half_a_step(fmt):
    x = rows()
    s = scale_of(x, fmt)
    err = jnp.abs(quant.roundtrip(x, fmt) - x)
    # Half a quantisation step, plus the clip of the largest value when the bfloat16 scale rounded down (< 2^-8).
    bound = 0.5 * s + 2.0**-8 * s * QMAX[fmt]
    assert bool(jnp.all(err <= bound * (1 + 1e-6)))
    assert float(jnp.max(err / (s * QMAX[fmt]))) > 0.1 / QMAX[fmt]  # not trivially exact


@pytest.mark.parametrize(("fmt", "mantissa", "subnormal_step"), [("float8_e4m3", 3, 2.0**-9),
                                                                  ("float8_e5m2", 2, 2.0**-16)])
def test_float8_round_trip_is_within_half_an_ulp(fmt, mantissa, subnormal_step):
    x = rows(1)
    s = scale_of(x, fmt)
    err = jnp.abs(quant.roundtrip(x, fmt) - x)
    bound = jnp.maximum(jnp.abs(x) * 2.0 ** -(mantissa + 1), 0.5 * subnormal_step * s) + 2.0**-8 * s * QMAX[fmt]
    assert bool(jnp.all(err <= bound * (1 + 1e-6)))


def test_values_on_the_grid_come_back_exactly():
    rng = np.random.default_rng(0)
    s = np.float32(0.1875)  # a bfloat16 value
    for fmt, values in [("int8", np.arange(-127, 128)), ("int4", np.arange(-7, 8)),
                        ("float8_e4m3", np.asarray(jnp.arange(-448, 449, 1.0).astype(jnp.float8_e4m3fn), np.float32)),
                        ("float8_e5m2", np.asarray(jnp.linspace(-57344, 57344, 999).astype(jnp.float8_e5m2),
                                                   np.float32))]:
        q = rng.choice(values, size=(4, 64)).astype(np.float32)
        q[:, 0] = QMAX[fmt]  # every row reaches the format's maximum: its scale is exactly s
        x = jnp.asarray(q * s)
        np.testing.assert_array_equal(np.asarray(quant.roundtrip(x, fmt)), np.asarray(x), err_msg=fmt)


def test_wire_layout_values_then_scale_int4_low_nibble_first():
    x = jnp.array([[1.0, -7.0, 0.0, 7.0]]) * 0.5  # scale 0.5: q = 1, -7, 0, 7
    w = np.asarray(quant.encode_rows(x, "int4"))
    assert w.shape == (1, 2 + 2) and w.dtype == np.uint8
    assert w[0, 0] == (1 + 8) | ((-7 + 8) << 4) and w[0, 1] == (0 + 8) | ((7 + 8) << 4)
    assert w[0, 2:].view(jnp.bfloat16)[0] == 0.5


def test_wire_specs_are_one_uint8_array_split_by_sample():
    spec = ArraySpec((2, 32, 64), "float32")
    assert quant_wire_spec(spec, "int8") == ArraySpec((2, 32 * 66), "uint8")
    assert quant_wire_spec(spec, "int4") == ArraySpec((2, 32 * 34), "uint8")
    sizes = {n: wire_nbytes(n, Kind.ACT, spec) for n in ("none", "bfloat16", "float8", "int8", "int4")}
    assert sizes == {"none": 16384, "bfloat16": 8192, "float8": 4224, "int8": 4224, "int4": 2176}
    # GPT-3 XL at micro-batch 1: 8 MiB in bfloat16, a hair over 4 and 2 MiB in int8 and int4.
    xl = ArraySpec((1, 2048, 2048), "bfloat16")
    assert wire_nbytes("int8", Kind.ACT, xl) == 2048 * 2050 and wire_nbytes("int4", Kind.GRAD, xl) == 2048 * 1026


@pytest.mark.parametrize("codec", [Int8(), Int4(), Float8E4M3(), Float8E5M2(), BFloat16()])
def test_codec_decode_of_encode_is_the_quantiser_round_trip(codec):
    x = rows(2, (2, 8, 64))
    spec = ArraySpec(tuple(x.shape), "float32")
    key = MsgKey(0, 0, Kind.ACT)
    wire = codec.encode(x, key)
    assert wire.shape == codec.wire_spec(spec, key).shape
    got = codec.decode(wire, spec, key)
    want = x.astype(jnp.bfloat16).astype(jnp.float32) if codec.name == "bfloat16" else quant.roundtrip(x, codec.fmt)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_float8_is_e4m3_forward_and_e5m2_backward():
    assert isinstance(make_codec("float8", Kind.ACT), Float8E4M3)
    assert isinstance(make_codec("float8", Kind.GRAD), Float8E5M2)
    assert make_codec("float8", Kind.ACT).code != make_codec("float8", Kind.GRAD).code


def test_non_finite_rows_stay_non_finite_and_zero_rows_zero():
    x = rows(3, (4, 64)).at[0, 5].set(jnp.nan).at[1, 9].set(jnp.inf).at[2].set(0.0)
    for fmt in quant.FORMATS:
        y = quant.roundtrip(x, fmt)
        assert not bool(jnp.isfinite(y[0]).any()) and not bool(jnp.isfinite(y[1]).any()), fmt
        assert bool((y[2] == 0).all()) and bool(jnp.isfinite(y[3]).all()), fmt


def test_float16_compute_saturates_instead_of_overflowing():
    x = jnp.array([[65504.0, -65504.0, 1.0, 3.0]], jnp.float16)
    for codec in (Int8(), Int4(), Float8E4M3(), Float8E5M2(), BFloat16()):
        spec = ArraySpec((1, 4), "float16")
        y = codec.decode(codec.encode(x, MsgKey(0, 0, Kind.ACT)), spec, MsgKey(0, 0, Kind.ACT))
        assert y.dtype == jnp.float16 and bool(jnp.isfinite(y).all()), codec.name


# ---- delta mode -----------------------------------------------------------------------------------

def delta_pair(windows, n_samples=8):
    """A sender and a receiver of boundary chunk 1 with stores of their own; `windows[step][mb]`."""
    ids = lambda key: np.asarray(windows[key.step][key.microbatch])  # noqa: E731
    make = lambda name: Delta(Int4(), ids, {1: DeltaStore(name, n_samples, (4, 8), "float32", save=True)})  # noqa: E731
    return make("send"), make("recv")


def test_delta_first_visits_go_in_int8_then_deltas_keep_both_copies_identical():
    windows = [[[0, 1], [2, 3]], [[1, 0], [2, 4]], [[3, 2], [0, 1]]]  # step 1, mb 1 meets new window 4
    sender, receiver = delta_pair(windows)
    spec = ArraySpec((2, 4, 8), "float32")
    base = rows(0, (8, 4, 8))  # each sample's activation, drifting a little between visits (training)
    sizes = []
    for step in range(3):
        for mb in range(2):
            key = MsgKey(step, mb, Kind.ACT, 1)
            wire_spec = receiver.wire_spec(spec, key)  # posted before it arrives, in the sender's order
            x = base[np.asarray(windows[step][mb])] + 0.01 * step * rows(10 * step + mb, (2, 4, 8))
            wire = sender.encode(x, key)
            assert wire.shape == wire_spec.shape
            sizes.append(wire.nbytes)
            got = receiver.decode(wire, spec, key)
            ids = np.asarray(windows[step][mb])
            np.testing.assert_array_equal(sender.stores[1].get(ids), np.asarray(got))  # both ends' copies
            np.testing.assert_array_equal(receiver.stores[1].get(ids), np.asarray(got))
            if step == 0 or (step, mb) == (1, 1):
                np.testing.assert_array_equal(np.asarray(got), np.asarray(quant.roundtrip(x, "int8")))
            else:  # the copy plus the int4 round trip of the change
                assert float(jnp.max(jnp.abs(got - x))) < float(jnp.max(jnp.abs(x - quant.roundtrip(x, "int4"))))
    full, small = quant_wire_spec(spec, "int8").nbytes, quant_wire_spec(spec, "int4").nbytes
    assert sizes == [full, full, small, full, small, small]


def test_evaluation_never_uses_deltas_nor_touches_the_copies():
    sender, receiver = delta_pair([[[0, 1]]])
    spec = ArraySpec((2, 4, 8), "float32")
    x = rows(5, (2, 4, 8))
    key = MsgKey(-3, 0, Kind.ACT, 1)  # the evaluation after step 2
    assert receiver.wire_spec(spec, key) == quant_wire_spec(spec, "int8")
    got = receiver.decode(sender.encode(x, key), spec, key)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(quant.roundtrip(x, "int8")))
    assert not sender.stores[1].has.any() and not receiver.stores[1].has.any()


def test_delta_copies_round_trip_through_a_checkpoint():
    sender, receiver = delta_pair([[[0, 1]]])
    spec = ArraySpec((2, 4, 8), "float32")
    key = MsgKey(0, 0, Kind.ACT, 1)
    receiver.wire_spec(spec, key)
    receiver.decode(sender.encode(rows(6, (2, 4, 8)), key), spec, key)
    saved = receiver.stores[1].extra_state()
    fresh = DeltaStore("recv", 8, (4, 8), "float32")
    assert fresh.load_extra_state(lambda name: saved.get(name)) is None
    np.testing.assert_array_equal(fresh.copies, receiver.stores[1].copies)
    np.testing.assert_array_equal(fresh.has, [True, True, False, False, False, False, False, False])
    other = DeltaStore("recv", 9, (4, 8), "float32")  # another data set: nothing to restore
    assert "no matching copies" in other.load_extra_state(lambda name: saved.get(name))


# ---- the transport's checks --------------------------------------------------------------------------

class _Checks(ThreadedTransport):
    name = "test"

    def post_recv(self, *a): ...
    def complete_recv(self, *a): ...
    def _payload_bytes(self, *a): ...
    def wire_send(self, *a): ...
    def finish_sends(self, *a): ...


def test_codec_mismatch_names_both_ranks():
    t = _Checks(1, lambda s: 10 + s, codecs={Kind.ACT: Int4()})
    key = MsgKey(3, 1, Kind.ACT)
    spec = t.codecs[Kind.ACT].wire_spec(ArraySpec((2, 3, 4), "float32"), key)
    with pytest.raises(TransportError) as e:
        t.check_header(key, 0, spec, make_header(key, spec.nbytes, "uint8", Int8.code))
    assert str(e.value) == ("stage 0 (rank 10) sent the activation of micro-batch 1 of step 4 encoded with codec "
                            "int8, but stage 1 (rank 11) decodes activations with int4: every rank must use the "
                            "same parallel.act_codec and parallel.act_grad_codec")


def test_a_wire_the_transport_cannot_carry_is_refused_before_compiling():
    class Float8Wire(Float8E4M3):  # a codec that would hand CuPy a float8 array
        def wire_spec(self, spec, key=None):
            return ArraySpec(spec.shape, "float8_e4m3fn")

    class NoFloat8(_Checks):
        name = "nccl-like"
        wire_dtypes = frozenset({"float32", "bfloat16", "uint8"})

    NoFloat8(0, lambda s: s, codecs={Kind.ACT: Int4(), Kind.GRAD: Float8E5M2()}).check_codecs(
        ArraySpec((2, 3, 4), "float32"))
    with pytest.raises(ConfigError, match="parallel.act_codec=float8 sends float8_e4m3fn arrays, which the "
                                          "nccl-like transport cannot carry"):
        NoFloat8(0, lambda s: s, codecs={Kind.ACT: Float8Wire()}).check_codecs(ArraySpec((2, 3, 4), "float32"))


# ---- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    (["parallel.act_delta=true", "parallel.act_codec=bfloat16"],
     "parallel.act_delta sends the act_codec-coded change of each activation: set parallel.act_codec to int4, "
     "int8 or float8 (got 'bfloat16')"),
    (["parallel.act_delta=true", "parallel.act_codec=int4"],
     "parallel.act_delta keeps a copy per training sample and sends the change since its last visit, but "
     "data.source=synthetic never visits a sample twice"),
    (["parallel.act_codec=int4", "model.d_model=129", "model.n_head=3"],
     "int4 packs two values per byte: model.d_model (129) must be even"),
    (["parallel.act_delta_dir=/tmp/x"], "parallel.act_delta_dir is set but parallel.act_delta is off"),
    (["parallel.act_grad_codec=int2"], "parallel.act_grad_codec: 'int2' is not one of 'none', 'bfloat16'"),
])
def test_bad_codec_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


# ---- tied embedding ----------------------------------------------------------------------------------

def test_int8_error_feedback_leaves_no_bias():
    """A constant gradient sent K times: the rounding errors do not add up (error feedback sends what
    int8 dropped next time), so the sum received is K·g within one half step; plain rounding is off by K·bias."""
    g = rows(7, (16, 64)) * 1e-3
    tied = LocalTiedSum("int8")
    zero = jnp.zeros_like(g)
    total = zero
    for _ in range(50):
        total = total + tied(g, zero)
    step = scale_of(g, "int8")
    drift = jnp.abs(total - 50 * g)
    assert bool(jnp.all(drift <= 0.5 * step * 1.01 + 1e-12))
    plain = jnp.abs(50 * quant.roundtrip(g, "int8") - 50 * g)
    assert float(plain.max()) > 10 * float(drift.max())


def test_delta_copies_can_live_in_a_memory_mapped_file(tmp_path):
    store = DeltaStore("act_delta.layer4.r0", 3, (2, 4), "float32", directory=str(tmp_path))
    store.put(np.array([2]), jnp.full((1, 2, 4), 7.0))
    store.sync()
    np.testing.assert_array_equal(np.load(tmp_path / "act_delta.layer4.r0.npy", mmap_mode="r")[2], np.full((2, 4), 7.0))
    np.testing.assert_array_equal(store.get(np.array([2, 0])), np.stack([np.full((2, 4), 7.0), np.zeros((2, 4))]))
