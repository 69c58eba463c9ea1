"""Every quantiser jaxpipe puts on a link, and the one error-feedback rule: pure, jit-able functions.

Two wire formats, one per purpose, sharing the integer packing (int8 as its two's complement byte;
int4 as q + 8 in [1, 15], two per byte, the even element in the low nibble):

**Rows** (pipeline messages, `jaxpipe.comm.codec`; the tied embedding's gradient, `jaxpipe.comm.tied`).
A row of D values (the last axis: a token's features, an embedding row) travels as its quantised values
followed by its scale, in one uint8 row:

    int8       D bytes        value = q · s,  q in [-127, 127]
    int4       D / 2 bytes    q in [-7, 7]
    float8_*   D bytes        value = f · s,  f a float8 (e4m3: |f| <= 448; e5m2: |f| <= 57344)
    then       2 bytes        s, the row's absmax / qmax in bfloat16

Why per row: rows differ in scale by orders of magnitude (the gradient of a padded or easy token is
tiny), and one scale per row costs 2 bytes per 2,048 values for GPT-3 XL. float8 gets a scale too:
activation gradients of a mean loss sit around 1e-6, below even e5m2's smallest subnormal (1.5e-5).
*Groups* (`group` > 0) are rows of `group` values cut from the last axis, each with its own scale: a
finer grid where one outlier feature would otherwise set a whole token's step (int4's 1/7 of the
absmax is coarse); `group` elements cost group · bits / 8 + 2 bytes.

Exactness: the scale is rounded to bfloat16 *before* the values are divided by it, so the decoder
multiplies by exactly the scale the encoder used; values on the grid come back bit for bit. Rounding
is to nearest (ties to even), or *stochastic* for the integer formats when the caller passes `noise`
(uniform in [0, 1), one per value): q = floor(y + u) is y rounded up with probability frac(y), so the
decoded value is unbiased, E[decode] = x. Why: with int4's step of absmax / 7, every value below
absmax / 14 of its group rounds to zero to nearest, a systematic shrinkage of the many small entries
of a gradient that stochastic rounding keeps on average. The noise comes from the caller so that a
reference can repeat it (`jaxpipe.comm.codec.Int4SR` derives it per message). A row holding a NaN or
an infinity decodes as non-finite (its scale carries it), so a later non-finite check still sees the
problem.

**Chunks** (the data-parallel exchange, `parallel.grad_codec`: a flat float32 buffer). It is cut into
rows of `CHUNK` elements (the last padded with zeros); each travels as one record, so a contiguous
range of rows is a self-contained piece of the message (a shard of the sharded PS, a piece of a chain
broadcast): bfloat16 values (round to nearest even), or int8 / int4 values then a float32 scale
max|x| / qmax. The scale is float32 because a chunk of a flat buffer mixes parameters of very
different size (layer norms beside matmul weights) and the sums of decoded chunks must stay exact to
the last bit in every member's order; multiplications by reciprocals, never divisions (XLA may turn a
division into a multiplication on some shapes and not others, and references repeat the arithmetic).

**Error feedback** (`error_feedback`): what a sender could not send, y - decode(encode(y)), is kept in
float32 and added to the next value it sends, so over many steps the decoded sum follows the true sum
within one quantisation step (CocktailSGD, 1-bit Adam). Non-finite residues are dropped (`zero`) or
the old residue kept (`keep`: an overflowed float16 step must not become the residue).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe.registry import GRAD_CODECS

Format = Literal["int8", "int4", "float8_e4m3", "float8_e5m2"]
FORMATS: tuple[Format, ...] = ("int8", "int4", "float8_e4m3", "float8_e5m2")
SCALE_BYTES = 2  # bfloat16
_QMAX = {"int8": 127.0, "int4": 7.0, "float8_e4m3": 448.0, "float8_e5m2": 57344.0}
_FLOAT8 = {"float8_e4m3": jnp.float8_e4m3fn, "float8_e5m2": jnp.float8_e5m2}


# ---- integer packing (both formats) ------------------------------------------------------------------

def _pack(q: jax.Array, fmt: str) -> jax.Array:
    """uint8 [..., bytes] from integer-valued q [..., D] within ±qmax."""
    if fmt == "int8":
        return jax.lax.bitcast_convert_type(q.astype(jnp.int8), jnp.uint8)
    u = (q.astype(jnp.int32) + 8).astype(jnp.uint8) & 0xF  # the mask only matters for a NaN row
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack(v: jax.Array, fmt: str) -> jax.Array:
    """float32 q [..., D] from packed uint8 [..., bytes]."""
    if fmt == "int8":
        return jax.lax.bitcast_convert_type(v, jnp.int8).astype(jnp.float32)
    lo = (v & 0xF).astype(jnp.int32) - 8
    hi = (v >> 4).astype(jnp.int32) - 8
    return jnp.stack([lo, hi], axis=-1).reshape(*v.shape[:-1], 2 * v.shape[-1]).astype(jnp.float32)


# ---- rows and groups -----------------------------------------------------------------------------------

def value_bytes(d: int, fmt: Format) -> int:
    """Bytes of a row's quantised values (without its scale)."""
    if fmt == "int4":
        if d % 2:
            raise ValueError(f"int4 packs two values per byte: the row length ({d}) must be even")
        return d // 2
    return d


def row_bytes(d: int, fmt: Format, group: int = 0) -> int:
    """Bytes one row of `d` values takes on the wire: values, then the scale (per group of `group`)."""
    if group:
        if d % group:
            raise ValueError(f"groups of {group} values must divide the row length ({d})")
        return d // group * row_bytes(group, fmt)
    return value_bytes(d, fmt) + SCALE_BYTES


def _scale(x: jax.Array, fmt: Format) -> jax.Array:
    """Per-row scale (float32 holding a bfloat16 value), [..., 1]."""
    absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    # A row with a NaN or an infinity gets a NaN scale. Not left to `max`: XLA's CPU reductions may
    # return a row's largest finite value instead of its NaN.
    absmax = jnp.where(jnp.isfinite(x).all(axis=-1, keepdims=True), absmax, jnp.nan)
    return (absmax / _QMAX[fmt]).astype(jnp.bfloat16).astype(jnp.float32)


def _values(x: jax.Array, inv: jax.Array, fmt: Format, noise: jax.Array | None = None) -> jax.Array:
    """The quantised values of rows `x` (float32) as uint8 [..., value_bytes]; rounded stochastically
    with `noise` (uniform [0, 1), x's shape): floor(y + u) stays within ±qmax for |y| <= qmax."""
    qmax = _QMAX[fmt]
    y = jnp.clip(x * inv, -qmax, qmax)  # the bfloat16 scale may be a hair below absmax / qmax
    if fmt in _FLOAT8:
        return jax.lax.bitcast_convert_type(y.astype(_FLOAT8[fmt]), jnp.uint8)
    return _pack(jnp.round(y) if noise is None else jnp.clip(jnp.floor(y + noise), -qmax, qmax), fmt)


def _unvalues(v: jax.Array, fmt: Format) -> jax.Array:
    """float32 [..., D] from uint8 values [..., value_bytes]."""
    if fmt in _FLOAT8:
        return jax.lax.bitcast_convert_type(v, _FLOAT8[fmt]).astype(jnp.float32)
    return _unpack(v, fmt)


def _grouped(x: jax.Array, group: int) -> jax.Array:
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group) if group else x


def encode_rows(x: jax.Array, fmt: Format, group: int = 0, noise: jax.Array | None = None) -> jax.Array:
    """uint8 [..., row_bytes(D)] for rows `x` [..., D] of any float dtype (a scale per `group` values
    when `group`, each group's values then its scale); rounded stochastically with `noise` (uniform
    [0, 1) float32 of x's shape; integer formats only)."""
    if noise is not None and fmt in _FLOAT8:
        raise ValueError(f"stochastic rounding is for the integer formats, not {fmt}")
    if group:
        w = encode_rows(_grouped(x, group), fmt, noise=None if noise is None else _grouped(noise, group))
        return w.reshape(*x.shape[:-1], -1)
    x = x.astype(jnp.float32)
    s = _scale(x, fmt)
    # A zero row keeps scale 0 and decodes to zeros; a NaN or infinite scale makes its row decode non-finite.
    inv = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
    values = _values(x, inv, fmt, noise)
    scale = jax.lax.bitcast_convert_type(s[..., 0].astype(jnp.bfloat16), jnp.uint8)  # [..., 2]
    return jnp.concatenate([values, scale], axis=-1)


def decode_rows(w: jax.Array, fmt: Format, dtype: jnp.dtype | str = jnp.float32, group: int = 0) -> jax.Array:
    """Rows [..., D] in `dtype` from uint8 wire rows [..., row_bytes(D)]. Finite values are kept
    within `dtype`'s range (float16's 65504: a value a hair above it on the grid would become inf)."""
    if group:
        per = row_bytes(group, fmt)
        y = decode_rows(w.reshape(*w.shape[:-1], w.shape[-1] // per, per), fmt, dtype)
        return y.reshape(*w.shape[:-1], -1)
    v, s = w[..., :-SCALE_BYTES], w[..., -SCALE_BYTES:]
    scale = jax.lax.bitcast_convert_type(s, jnp.bfloat16).astype(jnp.float32)  # [...]
    y = _unvalues(v, fmt) * scale[..., None]
    return saturate(y, dtype)


def saturate(y: jax.Array, dtype: jnp.dtype | str) -> jax.Array:
    """`y` cast to `dtype` with finite values clipped to its range (non-finite ones kept)."""
    dtype = jnp.dtype(dtype)
    if dtype != jnp.float32 and jnp.issubdtype(dtype, jnp.floating):
        big = float(jnp.finfo(dtype).max)
        y = jnp.where(jnp.isfinite(y), jnp.clip(y, -big, big), y)
    return y.astype(dtype)


def roundtrip(x: jax.Array, fmt: Format, group: int = 0, noise: jax.Array | None = None) -> jax.Array:
    """What the far end receives for `x`: decode(encode(x)), in x's dtype (`noise`: see encode_rows)."""
    return decode_rows(encode_rows(x, fmt, group, noise), fmt, x.dtype, group)


def uniform_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The stochastic rounding's u ~ U[0, 1) for values of `shape` from a PRNG key: the one draw every
    sender and reference makes (float32, the key's default implementation)."""
    return jax.random.uniform(key, shape, jnp.float32)


# ---- error feedback (the one rule every compressed sender with memory follows) ---------------------

def error_feedback(encode: Callable[[jax.Array], jax.Array], decode: Callable[[jax.Array], jax.Array],
                   x: jax.Array, residue: jax.Array, nonfinite: Literal["zero", "keep"] = "zero"
                   ) -> tuple[jax.Array, jax.Array]:
    """(the wire of x + residue, the new residue): what `decode` will not give back is sent next time.
    A non-finite part of the new residue is zeroed, or (`keep`) left at the old residue."""
    y = x.astype(jnp.float32) + residue
    wire = encode(y)
    left = y - decode(wire)
    return wire, jnp.where(jnp.isfinite(left), left, 0.0 if nonfinite == "zero" else residue)


@jax.jit
def rows_int8_ef(g: jax.Array, residue: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows of `g` in int8 with error feedback; an overflowed (float16) or NaN gradient keeps the old
    residue for its rows (the step is skipped everywhere anyway)."""
    return error_feedback(lambda y: encode_rows(y, "int8"), lambda w: decode_rows(w, "int8"), g, residue, "keep")


class ErrorFeedback:
    """One sender's residue for `rows_int8_ef`, kept on the device and carried by checkpoints under `name`."""

    def __init__(self, name: str) -> None:
        self.name = name  # of its checkpoint item
        self.residue: jax.Array | None = None
        self._restored: np.ndarray | None = None  # from a checkpoint, placed like the first gradient

    def encode(self, g: jax.Array) -> jax.Array:
        if self.residue is None:
            self.residue = (jnp.zeros_like(g, jnp.float32) if self._restored is None else
                            jax.device_put(np.asarray(self._restored, np.float32), g.sharding))
            self._restored = None
        wire, self.residue = rows_int8_ef(g, self.residue)
        return wire

    def extra_state(self) -> dict[str, np.ndarray]:
        if self.residue is None:
            return {} if self._restored is None else {self.name: np.asarray(self._restored)}
        return {self.name: np.asarray(self.residue)}

    def load_extra_state(self, get: Any) -> str | None:
        self.residue, self._restored = None, get(self.name)
        if self._restored is None:
            return f"{self.name}: not in the checkpoint; the tied-embedding error feedback restarts from zero"
        return None


# ---- chunks (the data-parallel exchange: parallel.grad_codec) ------------------------------------------

CHUNK = 1024  # elements per row (one scale each): int8 adds 0.4 %, int4 0.8 %


class GradCodec:
    """A `parallel.grad_codec`: how a chunk of `CHUNK` float32 elements travels (see the module)."""

    name: ClassVar[str]
    levels: ClassVar[float] = 0.0  # qmax of the integer codecs

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """No keys of its own (parallel.grad_codec's need of parallel.dp >= 2 is the DP layer's rule)."""

    @classmethod
    def row_bytes(cls, chunk: int = CHUNK) -> int:
        """Wire bytes of one chunk: the one place the DP exchange's size per element is stated."""
        raise NotImplementedError

    @classmethod
    def bytes_per_element(cls, chunk: int = CHUNK) -> float:
        return cls.row_bytes(chunk) / chunk


@GRAD_CODECS.register
class GradNone(GradCodec):
    name = "none"

    @classmethod
    def row_bytes(cls, chunk: int = CHUNK) -> int:
        return 4 * chunk


@GRAD_CODECS.register
class GradBFloat16(GradCodec):
    name = "bfloat16"

    @classmethod
    def row_bytes(cls, chunk: int = CHUNK) -> int:
        return 2 * chunk


@GRAD_CODECS.register
class GradInt8(GradCodec):
    name, levels = "int8", 127.0

    @classmethod
    def row_bytes(cls, chunk: int = CHUNK) -> int:
        return chunk + 4


@GRAD_CODECS.register
class GradInt4(GradCodec):
    name, levels = "int4", 7.0

    @classmethod
    def row_bytes(cls, chunk: int = CHUNK) -> int:
        return chunk // 2 + 4


CODECS = GRAD_CODECS.names()


def chunk_row_bytes(codec: str, chunk: int = CHUNK) -> int:
    """Wire bytes of one chunk row in `parallel.grad_codec` `codec`."""
    return int(GRAD_CODECS.get(codec).row_bytes(chunk))


def wire_bytes(codec: str, n: int, chunk: int = CHUNK) -> int:
    """Wire bytes of a buffer of `n` float32 elements (rows padded)."""
    return -(-n // chunk) * chunk_row_bytes(codec, chunk)


def _chunk_scale(y: jax.Array, levels: float) -> jax.Array:
    amax = jnp.max(jnp.abs(y), axis=1)
    # Non-finite rows by their elements, not by `max`: XLA's CPU reductions may skip a NaN.
    ok = jnp.isfinite(y).all(axis=1)
    return jnp.where(ok, amax * jnp.float32(1.0 / levels), jnp.float32(jnp.nan))


def _to_bytes(x: jax.Array) -> jax.Array:
    """[rows, k] of a 16/32-bit type as [rows, k * itemsize] uint8."""
    b = jax.lax.bitcast_convert_type(x, jnp.uint8)
    return b.reshape(x.shape[0], -1)


def _from_bytes(b: jax.Array, dtype: jnp.dtype) -> jax.Array:
    size = jnp.dtype(dtype).itemsize
    return jax.lax.bitcast_convert_type(b.reshape(b.shape[0], -1, size), dtype)


@partial(jax.jit, static_argnums=1)
def encode_chunks(y: jax.Array, codec: str) -> jax.Array:
    """[rows, CHUNK] float32 -> [rows, chunk_row_bytes] uint8."""
    if codec == "none":
        return _to_bytes(y)
    if codec == "bfloat16":
        return _to_bytes(jax.lax.bitcast_convert_type(y.astype(jnp.bfloat16), jnp.uint16))
    levels = GRAD_CODECS.get(codec).levels
    s = _chunk_scale(y, levels)
    inv = jnp.where(s > 0, jnp.float32(1.0) / jnp.where(s > 0, s, 1.0), 0.0)
    q = jnp.clip(jnp.round(y * inv[:, None]), -levels, levels)
    return jnp.concatenate([_pack(q, codec), _to_bytes(s[:, None])], axis=1)


@partial(jax.jit, static_argnums=1)
def decode_chunks(b: jax.Array, codec: str) -> jax.Array:
    """[rows, chunk_row_bytes] uint8 -> [rows, CHUNK] float32."""
    if codec == "none":
        return _from_bytes(b, jnp.float32)
    if codec == "bfloat16":
        return jax.lax.bitcast_convert_type(_from_bytes(b, jnp.uint16), jnp.bfloat16).astype(jnp.float32)
    body, s = b[:, :-4], _from_bytes(b[:, -4:], jnp.float32)[:, 0]
    return _unpack(body, codec) * s[:, None]


@partial(jax.jit, static_argnums=2)
def encode_chunks_ef(x: jax.Array, residue: jax.Array, codec: str) -> tuple[jax.Array, jax.Array]:
    """(wire rows of x + residue, the new residue; non-finite residues dropped)."""
    return error_feedback(lambda y: encode_chunks(y, codec), lambda w: decode_chunks(w, codec), x, residue, "zero")


def mean_of(wires: jax.Array, codec: str, n: int) -> jax.Array:
    """The mean of `n` decoded messages ([n, rows, row_bytes]), summed in rank order in float32.
    Decoded first, in programs of their own: fused into the sum, a decode's multiply and the add
    could become one FMA (one rounding instead of two) on some shapes and not others."""
    return _mean([decode_chunks(wires[r], codec) for r in range(n)])


@jax.jit
def _mean(parts: list[jax.Array]) -> jax.Array:
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total * jnp.float32(1.0 / len(parts))
