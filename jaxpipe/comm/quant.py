"""Row-wise absmax quantisers: pure, jit-able functions that turn the rows of an array (its last axis)
into bytes and back. Shared by the pipeline message codecs (`jaxpipe.comm.codec`), the tied-embedding
exchange (`jaxpipe.comm.tied`) and anything else that must put fewer bytes on a link (data-parallel
gradient compression can use the same functions).

A row of D values travels as its quantised values followed by its scale, in one uint8 row:

    int8       D bytes        value = q · s,  q in [-127, 127]
    int4       D / 2 bytes    two values per byte (low nibble first), q + 8 in [1, 15]
    float8_*   D bytes        value = f · s,  f a float8 (e4m3: |f| <= 448; e5m2: |f| <= 57344)
    then       2 bytes        s, the row's absmax / qmax in bfloat16

Why per row: a token's activation (or its gradient) is one row; rows differ in scale by orders of
magnitude (the gradient of a padded or easy token is tiny), and one scale per row costs 2 bytes per
2,048 values for GPT-3 XL. float8 gets a scale too: activation gradients of a mean loss sit around
1e-6, below even e5m2's smallest subnormal (1.5e-5), and would flush to zero unscaled.

Exactness: the scale is rounded to bfloat16 *before* the values are divided by it, so the decoder
multiplies by exactly the scale the encoder used; values on the grid (q · s for a bfloat16 s) come
back bit for bit. Rounding is to nearest (ties to even). A row holding a NaN or an infinity decodes
as non-finite (its scale carries it), so a later non-finite check still sees the problem.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Format = Literal["int8", "int4", "float8_e4m3", "float8_e5m2"]
FORMATS: tuple[Format, ...] = ("int8", "int4", "float8_e4m3", "float8_e5m2")
SCALE_BYTES = 2  # bfloat16
_QMAX = {"int8": 127.0, "int4": 7.0, "float8_e4m3": 448.0, "float8_e5m2": 57344.0}
_FLOAT8 = {"float8_e4m3": jnp.float8_e4m3fn, "float8_e5m2": jnp.float8_e5m2}


def value_bytes(d: int, fmt: Format) -> int:
    """Bytes of a row's quantised values (without its scale)."""
    if fmt == "int4":
        if d % 2:
            raise ValueError(f"int4 packs two values per byte: the row length ({d}) must be even")
        return d // 2
    return d


def row_bytes(d: int, fmt: Format) -> int:
    """Bytes one row of `d` values takes on the wire: values, then the scale."""
    return value_bytes(d, fmt) + SCALE_BYTES


def _scale(x: jax.Array, fmt: Format) -> jax.Array:
    """Per-row scale (float32 holding a bfloat16 value), [..., 1]."""
    absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    # A row with a NaN or an infinity gets a NaN scale. Not left to `max`: XLA's CPU reductions may
    # return a row's largest finite value instead of its NaN.
    absmax = jnp.where(jnp.isfinite(x).all(axis=-1, keepdims=True), absmax, jnp.nan)
    return (absmax / _QMAX[fmt]).astype(jnp.bfloat16).astype(jnp.float32)


def _values(x: jax.Array, inv: jax.Array, fmt: Format) -> jax.Array:
    """The quantised values of rows `x` (float32) as uint8 [..., value_bytes]."""
    qmax = _QMAX[fmt]
    y = jnp.clip(x * inv, -qmax, qmax)  # the bfloat16 scale may be a hair below absmax / qmax
    if fmt in _FLOAT8:
        return jax.lax.bitcast_convert_type(y.astype(_FLOAT8[fmt]), jnp.uint8)
    q = jnp.round(y).astype(jnp.int8)
    if fmt == "int8":
        return jax.lax.bitcast_convert_type(q, jnp.uint8)
    u = (q + 8).astype(jnp.uint8) & 0xF  # 1..15 (the mask only matters for a NaN row, which decodes as NaN)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unvalues(v: jax.Array, fmt: Format) -> jax.Array:
    """float32 [..., D] from uint8 values [..., value_bytes]."""
    if fmt in _FLOAT8:
        return jax.lax.bitcast_convert_type(v, _FLOAT8[fmt]).astype(jnp.float32)
    if fmt == "int8":
        return jax.lax.bitcast_convert_type(v, jnp.int8).astype(jnp.float32)
    lo = (v & 0xF).astype(jnp.int32) - 8
    hi = (v >> 4).astype(jnp.int32) - 8
    return jnp.stack([lo, hi], axis=-1).reshape(*v.shape[:-1], 2 * v.shape[-1]).astype(jnp.float32)


def encode_rows(x: jax.Array, fmt: Format) -> jax.Array:
    """uint8 [..., row_bytes(D)] for rows `x` [..., D] of any float dtype."""
    x = x.astype(jnp.float32)
    s = _scale(x, fmt)
    # A zero row keeps scale 0 and decodes to zeros; a NaN or infinite scale makes its row decode non-finite.
    inv = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
    values = _values(x, inv, fmt)
    scale = jax.lax.bitcast_convert_type(s[..., 0].astype(jnp.bfloat16), jnp.uint8)  # [..., 2]
    return jnp.concatenate([values, scale], axis=-1)


def decode_rows(w: jax.Array, fmt: Format, dtype: jnp.dtype | str = jnp.float32) -> jax.Array:
    """Rows [..., D] in `dtype` from uint8 wire rows [..., row_bytes(D)]. Finite values are kept
    within `dtype`'s range (float16's 65504: a value a hair above it on the grid would become inf)."""
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


def roundtrip(x: jax.Array, fmt: Format) -> jax.Array:
    """What the far end receives for `x`: decode(encode(x)), in x's dtype."""
    return decode_rows(encode_rows(x, fmt), fmt, x.dtype)
