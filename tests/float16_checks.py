"""What float16 compute asks of every pipeline-message codec and every data-parallel mode, as checks
that any codec or mode can be put through (tests/test_float16.py runs them over the ones that exist).

float16 differs from float32 and bfloat16 in two ways that a codec or a DP mode can break:

- **Range.** float16's largest value is 65504, and the backward pass runs on the loss times a scale
  (65536 at first), so activation gradients routinely sit near the top of the range and overflow to
  inf on purpose: an overflow is how dynamic loss scaling learns that the scale is too high. A message
  codec therefore has to (a) decode float16 messages back to float16, (b) keep every finite value it
  receives below 65000 finite, (c) keep an inf or NaN non-finite (a codec that turned it into a number
  would let the step through with garbage gradients instead of skipping it), (d) stay within its stated
  error over float16's whole range, loss-scaled gradients down to float16's subnormals included.
- **Skipped steps.** A step whose gradients overflow is skipped on every rank that shares the loss
  scale. Gradients reach the data-parallel mode already divided by the scale (LossScaler.unscale), so a
  mode never sees the scale, but it does see the inf/NaN of an overflowing step: a mode that syncs every
  step must carry a non-finite value on one replica to every replica (so all of them skip together and
  keep one scale), and the step must leave its own state (error-feedback residues, outer momentum)
  as if it never happened. A mode that lets replicas drift (`syncs_every_step = False`) lets each
  pipeline decide and scale on its own; it then has to save every replica's loss scale with the
  checkpoint (state.json holds replica 0's), or resumed runs are not exact.

`assert_codec_accepts_float16` is (a)-(d) on one codec instance; `assert_float16_run` checks one real
float16 run (tests/mpi_train_dump.py output) against the single-process reference with its own dynamic
loss scaling: every rank skipped the same steps and used the same scale in every step as the
reference did, losses and parameters agree within the given bounds, and replicas hold equal parameters.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe.comm.codec import Codec
from jaxpipe.comm.message import ArraySpec, Kind, MsgKey

FLOAT16_FINITE = 65000.0  # below float16's 65504, leaving a codec room to round up


def float16_messages(shape: tuple[int, ...] = (4, 32, 64), seed: int = 0) -> np.ndarray:
    """float16 rows that span the range a message meets: activations of order 1 and loss-scaled
    gradients, each row with its own magnitude (1e-7, float16's subnormals, up to 6.5e4)."""
    rng = np.random.default_rng(seed)
    rows = int(np.prod(shape[:-1]))
    magnitude = 10.0 ** np.linspace(-7, np.log10(FLOAT16_FINITE / 4), rows)[:, None]
    x = rng.standard_normal((rows, shape[-1])) * magnitude
    x[-1, 0] = FLOAT16_FINITE  # the largest value a codec must keep finite
    return np.clip(x, -FLOAT16_FINITE, FLOAT16_FINITE).astype(np.float16).reshape(shape)


def assert_codec_accepts_float16(codec: Codec, rel: float, shape: tuple[int, ...] = (4, 32, 64)) -> None:
    """`codec` carries float16 messages: wire arrays as `wire_spec` says, float16 back, finite values
    finite, inf and NaN still non-finite, and every element within `rel` × its row's largest magnitude
    (row-scaled codecs quantise relative to the row; an element-wise codec meets the bound per element)."""
    spec = ArraySpec(shape, "float16")
    x = float16_messages(shape)
    for kind in Kind:
        key = MsgKey(3, 1, kind, 0)
        wire = codec.wire_spec(spec, key)  # the receiver posts it before the message arrives
        enc = codec.encode(jnp.asarray(x), key)
        assert (tuple(enc.shape), jnp.dtype(enc.dtype).name) == (tuple(wire.shape), wire.dtype), \
            f"{codec.describe()}: encoded {enc.dtype}{list(enc.shape)}, wire_spec says {wire}"
        dec = np.asarray(codec.decode(enc, spec, key))
        assert dec.dtype == np.float16 and dec.shape == shape, f"{codec.describe()}: decoded {dec.dtype}{dec.shape}"
        assert np.isfinite(dec).all(), f"{codec.describe()}: finite float16 values came back non-finite"
        x32, dec32 = x.astype(np.float32), dec.astype(np.float32)
        # ...plus float16's own spacing at the value: what any codec's float16 output may round by.
        bound = rel * np.abs(x32).max(axis=-1, keepdims=True) + np.spacing(np.abs(x)).astype(np.float32)
        worst = float((np.abs(dec32 - x32) / np.maximum(bound, np.finfo(np.float32).tiny)).max())
        assert (np.abs(dec32 - x32) <= bound).all(), f"{codec.describe()}: error {worst:.3g} x its bound"
        bad = x.copy()
        bad[0, 0, 0], bad[1, 5, 7] = np.inf, np.nan  # an overflowed gradient, an invalid value
        codec.wire_spec(spec, key)
        out = np.asarray(codec.decode(codec.encode(jnp.asarray(bad), key), spec, key))
        assert not np.isfinite(out[0, 0]).all() and not np.isfinite(out[1, 5]).all(), \
            f"{codec.describe()}: an inf or NaN in a float16 message came back finite (the step would not be skipped)"


def load_case(case: Path) -> tuple[dict, list[dict], dict[str, list[np.ndarray]]]:
    """(rank 0's result.json, every rank's rank<r>.json, {parameter: [its copies on the ranks]})."""
    result = json.loads((case / "result.json").read_text())
    ranks = [json.loads(f.read_text()) for f in sorted(case.glob("rank*.json"))]
    params: dict[str, list[np.ndarray]] = {}
    for f in sorted(case.glob("rank*.npz")):
        for k, v in np.load(f).items():
            params.setdefault("embed/wte" if k == "head/wte" else k, []).append(v)
    return result, ranks, params


def assert_float16_run(case: Path, ref: tuple[list[float], list[float], dict[str, np.ndarray]], record: dict,
                       loss_rtol: float, norm_rtol: float, param_atol: float, replicas_equal: bool = True) -> None:
    """A float16 run (an OUT/<case> of tests/mpi_train_dump.py) against `reference_train(cfg, record=record)`:
    every rank skipped the reference's steps and used its loss scale in every step; losses within
    `loss_rtol`, gradient norms within `norm_rtol` (skipped steps: NaN), parameters within `param_atol`,
    and, with `replicas_equal`, every copy of a parameter (DP replicas, the tied `wte`) bit-identical."""
    ref_losses, ref_norms, ref_params = ref
    result, ranks, params = load_case(case)
    for r, got in enumerate(ranks):
        assert got["skipped_steps"] == record["skipped"], f"rank {r} skipped {got['skipped_steps']}, " \
                                                          f"the reference {record['skipped']}"
        assert got["loss_scales"] == record["scales"], f"rank {r}'s loss scales {got['loss_scales']}"
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=loss_rtol)
    np.testing.assert_allclose(result["grad_norms"], ref_norms, rtol=norm_rtol)  # NaN where skipped
    assert params.keys() == ref_params.keys()
    for k, copies in params.items():
        np.testing.assert_allclose(copies[0], ref_params[k], rtol=0, atol=param_atol, err_msg=k)
        if replicas_equal:
            for c in copies[1:]:
                np.testing.assert_array_equal(c, copies[0], err_msg=f"copies of {k} differ")


def scale_events(scales: list[float], skipped: list[int]) -> set[str]:
    """Which of skip, halve, recover (a finite step right after a skip) and grow a loss-scale trace shows."""
    events = {"skip"} if skipped else set()
    for i, (a, b) in enumerate(itertools.pairwise(scales)):
        events |= {"halve"} if b < a else {"grow"} if b > a else set()
        if i in skipped and i + 1 not in skipped:
            events.add("recover")
    return events


def f16_dot_is_float32_rounded(n: int = 64) -> bool:
    """XLA's CPU backend runs a float16 product as a float32 product of the float16 values, rounded to
    float16 (what docs/gpus.md says CPU float16 does)."""
    a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, 4 * n)).astype(jnp.float16) for i in (0, 1))
    f16 = jax.jit(lambda a, b: a @ b.T)(a, b)
    f32 = (a.astype(jnp.float32) @ b.astype(jnp.float32).T).astype(jnp.float16)
    return f16.dtype == jnp.float16 and bool((f16 == f32).all())
