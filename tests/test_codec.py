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
    Int4Row,
    Int4SR,
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
from jaxpipe.registry import ACT_CODECS

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
    assert quant_wire_spec(spec, "int4", 32) == ArraySpec((2, 32 * 2 * 18), "uint8")  # 2 groups of 16 + 2 bytes
    sizes = {n: wire_nbytes(n, Kind.ACT, spec) for n in ACT_CODECS.names()}
    assert sizes == {"none": 16384, "bfloat16": 8192, "float8": 4224, "int8": 4224, "int4": 2304, "int4_sr": 2304,
                     "int4_row": 2176}
    # GPT-3 XL at micro-batch 1: 8 MiB in bfloat16, a hair over 4 and 2 MiB in int8 and int4_row; int4's
    # scale per 32 values costs 4.5 bits per value.
    xl = ArraySpec((1, 2048, 2048), "bfloat16")
    assert wire_nbytes("int8", Kind.ACT, xl) == 2048 * 2050 and wire_nbytes("int4_row", Kind.GRAD, xl) == 2048 * 1026
    assert wire_nbytes("int4", Kind.GRAD, xl) == 2048 * 64 * 18
    assert make_codec("int4", Kind.ACT).bytes_per_element(xl) == 0.5625


@pytest.mark.parametrize("codec", [Int8(), Int4(), Int4(64), Int4Row(), Float8E4M3(), Float8E5M2(), BFloat16()])
def test_codec_decode_of_encode_is_the_quantiser_round_trip(codec):
    x = rows(2, (2, 8, 64))
    spec = ArraySpec(tuple(x.shape), "float32")
    key = MsgKey(0, 0, Kind.ACT)
    wire = codec.encode(x, key)
    assert wire.shape == codec.wire_spec(spec, key).shape
    got = codec.decode(wire, spec, key)
    want = x.astype(jnp.bfloat16).astype(jnp.float32) if codec.name == "bfloat16" else codec.roundtrip(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    if isinstance(codec, Int4):  # the groups' scales: each group of `group` values is a row of its own
        per_group = quant.roundtrip(x.reshape(2, 8, 64 // codec.group, codec.group), "int4").reshape(x.shape)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(per_group))


def test_int4_groups_wire_layout_and_outlier():
    """Each group's values (low nibble first), then its bfloat16 scale; an outlier coarsens only its group."""
    x = jnp.concatenate([jnp.full((1, 4), 0.5), jnp.array([[70.0, 1.0, -1.0, 0.0]])], axis=1)
    w = np.asarray(quant.encode_rows(x, "int4", 4))
    assert w.shape == (1, 2 * (2 + 2))
    s0 = np.asarray(jnp.asarray(w[0, 2:4]).view(jnp.bfloat16).astype(jnp.float32))[0]
    assert s0 == np.float32(np.asarray(jnp.float32(0.5 / 7).astype(jnp.bfloat16).astype(jnp.float32)))
    assert w[0, 0] == (7 + 8) | ((7 + 8) << 4)  # 0.5 / s0 = 7 in both nibbles
    y = np.asarray(quant.roundtrip(x, "int4", 4))
    np.testing.assert_allclose(y[0, :4], 0.5, rtol=1e-2)  # the per-row scale (70 / 7 = 10) would zero these
    assert np.all(np.asarray(quant.roundtrip(x, "int4"))[0, :4] == 0)


def test_int4_sr_draws_each_messages_own_noise_and_is_unbiased():
    """int4_sr's wire is int4's (same bytes), rounded up with probability frac(y) using noise from the
    message's key, written out here: train.seed, then replica, step, micro-batch, kind, chunk folded in."""
    x = rows(4, (2, 8, 64)) * 1e-3
    spec = ArraySpec(tuple(x.shape), "float32")
    codec = Int4SR(32, seed=11, replica=1)
    assert codec.wire_spec(spec) == Int4(32).wire_spec(spec) and make_codec("int4_sr", Kind.GRAD).code == 7

    def sent(key: MsgKey, c: Int4SR = codec) -> np.ndarray:
        return np.asarray(c.decode(c.encode(x, key), spec, key))

    key = MsgKey(5, 3, Kind.GRAD, 2)
    k = jax.random.key(11)
    for v in (1, 5, 3, 1, 2):
        k = jax.random.fold_in(k, v)
    want = quant.roundtrip(x, "int4", 32, jax.random.uniform(k, x.shape, jnp.float32))
    np.testing.assert_array_equal(sent(key), np.asarray(want))
    others = [MsgKey(6, 3, Kind.GRAD, 2), MsgKey(5, 2, Kind.GRAD, 2), MsgKey(5, 3, Kind.ACT, 2),
              MsgKey(5, 3, Kind.GRAD, 1)]
    for other in others:  # any other message (or replica) draws other noise
        assert (sent(other) != sent(key)).mean() > 0.1, other
    assert (sent(key, Int4SR(32, seed=11, replica=0)) != sent(key)).mean() > 0.1
    nearest = np.asarray(Int4(32).roundtrip(x))
    np.testing.assert_array_equal(sent(MsgKey(-1, 3, Kind.ACT, 2)), nearest)  # evaluation: to nearest
    # Unbiased: the mean over 400 messages is within 4 standard errors (one quantum / sqrt(4·400)) of x;
    # rounding to nearest is off by up to half a quantum for good (values below it become 0).
    mean = np.mean([sent(MsgKey(s, 0, Kind.GRAD, 1)) for s in range(400)], axis=0)
    quantum = np.asarray(jnp.repeat(jnp.max(jnp.abs(x.reshape(2, 8, 2, 32)), axis=-1) / 7, 32, axis=-1))
    assert np.all(np.abs(mean - np.asarray(x)) <= 4 * quantum / np.sqrt(4 * 400) + 1e-9)
    assert np.abs(nearest - np.asarray(x)).mean() > 5 * np.abs(mean - np.asarray(x)).mean()


def test_every_registered_codec_round_trips_and_names_its_class():
    x = rows(5, (2, 8, 64))
    spec = ArraySpec(tuple(x.shape), "float32")
    for name in ACT_CODECS.names():
        for kind in (Kind.ACT, Kind.GRAD):
            codec = make_codec(name, kind)
            assert codec.name == name
            key = MsgKey(0, 0, kind)
            y = codec.decode(codec.encode(x, key), spec, key)
            bound = 0.15 if name == "int4_sr" else 0.1  # stochastically rounded: up to a whole int4 step (1/7)
            assert y.shape == x.shape and float(jnp.max(jnp.abs(y - x))) < bound * float(jnp.max(jnp.abs(x))), name


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
    for codec in (Int8(), Int4(4), Int4Row(), Float8E4M3(), Float8E5M2(), BFloat16()):
        spec = ArraySpec((1, 4), "float16")
        y = codec.decode(codec.encode(x, MsgKey(0, 0, Kind.ACT)), spec, MsgKey(0, 0, Kind.ACT))
        assert y.dtype == jnp.float16 and bool(jnp.isfinite(y).all()), codec.name


# ---- delta mode -----------------------------------------------------------------------------------

def delta_pair(windows, n_samples=8):
    """A sender and a receiver of boundary chunk 1 with stores of their own; `windows[step][mb]`."""
    ids = lambda key: np.asarray(windows[key.step][key.microbatch])  # noqa: E731
    make = lambda name: Delta(Int4(4), ids, {1: DeltaStore(name, n_samples, (4, 8), "float32", save=True)})  # noqa: E731
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
    full, small = quant_wire_spec(spec, "int8").nbytes, quant_wire_spec(spec, "int4", 4).nbytes
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
    t = _Checks(1, lambda s: 10 + s, codecs={Kind.ACT: Int4(4)})
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

    NoFloat8(0, lambda s: s, codecs={Kind.ACT: Int4(4), Kind.GRAD: Float8E5M2()}).check_codecs(
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
    (["parallel.act_grad_codec=int4", "model.d_model=96", "model.n_head=3", "parallel.act_int4_group=64"],
     "parallel.act_int4_group (64) must be an even number of values that divides model.d_model (96)"),
    (["parallel.grad_codec=int2"], "parallel.grad_codec: 'int2' is not one of 'none', 'bfloat16', 'int8', 'int4'"),
    (["parallel.act_delta_dir=/tmp/x"], "parallel.act_delta_dir is set but parallel.act_delta is off"),
    (["parallel.act_grad_codec=int2"], "parallel.act_grad_codec: 'int2' is not one of 'none', 'bfloat16'"),
    (["parallel.act_delta=true", "parallel.act_codec=int4_sr"],
     "parallel.act_delta keeps, at both ends, what each sample's last visit delivered, coded to nearest; "
     "parallel.act_codec=int4_sr rounds stochastically: use parallel.act_codec=int4 with act_delta"),
    (["parallel.act_grad_codec=int4_sr", "train.seed=-1"],
     "int4_sr draws its rounding noise from train.seed: it must be 0 or more (got -1)"),
    (["parallel.act_grad_codec=int4_sr", "model.d_model=96", "model.n_head=3", "parallel.act_int4_group=64"],
     "parallel.act_int4_group (64) must be an even number of values that divides model.d_model (96)"),
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
