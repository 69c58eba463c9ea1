"""Gradient codecs for the data-parallel exchange (`parallel.grad_codec`), run on the device.

A flat float32 buffer is cut into rows of `CHUNK` elements (the last padded with zeros); each row
travels as one record of `row_bytes` bytes, so a contiguous range of rows is a self-contained
piece of the message (a shard of the sharded PS, a chunk of a chain broadcast):

- `bfloat16`: the row rounded to bfloat16 (round to nearest even), 2 bytes per element;
- `int8`: q = round(x / s) in [-127, 127] with s = max|x| / 127 of the row, then s as 4 bytes;
- `int4`: q in [-7, 7] with s = max|x| / 7, stored as q + 8, two per byte (even element in the low
  nibble), then s.

A row holding a non-finite value gets a NaN scale, so it decodes to NaN: an overflowing float16
step stays visible to the non-finite check after the exchange instead of turning into zeros.

Error feedback (`encode_ef`): what a sender could not send, y - decode(encode(y)), is kept in
float32 and added to the next buffer it sends, so over many steps the decoded sum follows the
true sum within one quantisation step (CocktailSGD, 1-bit Adam). Residues are dropped (zeroed)
where they are not finite.

A module of its own, below the algorithms that use it, so other codecs (pipeline messages) can
share the arithmetic.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

CHUNK = 1024  # elements per row (one scale each): int8 adds 0.4 %, int4 0.8 %
CODECS = ("none", "bfloat16", "int8", "int4")
_LEVELS = {"int8": 127.0, "int4": 7.0}


def row_bytes(codec: str, chunk: int = CHUNK) -> int:
    """Wire bytes of one row."""
    return {"none": 4 * chunk, "bfloat16": 2 * chunk, "int8": chunk + 4, "int4": chunk // 2 + 4}[codec]


def wire_bytes(codec: str, n: int, chunk: int = CHUNK) -> int:
    """Wire bytes of a buffer of `n` float32 elements (rows padded)."""
    return -(-n // chunk) * row_bytes(codec, chunk)


def _scale(y: jax.Array, levels: float) -> jax.Array:
    # Multiplications by reciprocals, never divisions: XLA may turn a division into one on some shapes
    # and not others, and a reference must be able to repeat the arithmetic bit for bit.
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
def encode(y: jax.Array, codec: str) -> jax.Array:
    """[rows, CHUNK] float32 -> [rows, row_bytes] uint8."""
    if codec == "none":
        return _to_bytes(y)
    if codec == "bfloat16":
        return _to_bytes(jax.lax.bitcast_convert_type(y.astype(jnp.bfloat16), jnp.uint16))
    levels = _LEVELS[codec]
    s = _scale(y, levels)
    inv = jnp.where(s > 0, jnp.float32(1.0) / jnp.where(s > 0, s, 1.0), 0.0)
    q = jnp.round(y * inv[:, None])
    q = jnp.clip(q, -levels, levels).astype(jnp.int32)
    if codec == "int8":
        body = jax.lax.bitcast_convert_type(q.astype(jnp.int8), jnp.uint8)
    else:
        nib = (q + 8).astype(jnp.uint8)
        body = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return jnp.concatenate([body, _to_bytes(s[:, None])], axis=1)


@partial(jax.jit, static_argnums=1)
def decode(b: jax.Array, codec: str) -> jax.Array:
    """[rows, row_bytes] uint8 -> [rows, CHUNK] float32."""
    if codec == "none":
        return _from_bytes(b, jnp.float32)
    if codec == "bfloat16":
        return jax.lax.bitcast_convert_type(_from_bytes(b, jnp.uint16), jnp.bfloat16).astype(jnp.float32)
    body, s = b[:, :-4], _from_bytes(b[:, -4:], jnp.float32)[:, 0]
    if codec == "int8":
        q = jax.lax.bitcast_convert_type(body, jnp.int8).astype(jnp.float32)
    else:
        lo, hi = (body & 15).astype(jnp.float32) - 8.0, (body >> 4).astype(jnp.float32) - 8.0
        q = jnp.stack([lo, hi], axis=2).reshape(body.shape[0], -1)
    return q * s[:, None]


@partial(jax.jit, static_argnums=2)
def encode_ef(x: jax.Array, residue: jax.Array, codec: str) -> tuple[jax.Array, jax.Array]:
    """(wire rows of x + residue, the new residue)."""
    y = x + residue
    wire = encode(y, codec)
    left = y - decode(wire, codec)
    return wire, jnp.where(jnp.isfinite(left), left, 0.0)


def mean_of(wires: jax.Array, codec: str, n: int) -> jax.Array:
    """The mean of `n` decoded messages ([n, rows, row_bytes]), summed in rank order in float32.
    Decoded first, in programs of their own: fused into the sum, a decode's multiply and the add
    could become one FMA (one rounding instead of two) on some shapes and not others."""
    return _mean([decode(wires[r], codec) for r in range(n)])


@jax.jit
def _mean(parts: list[jax.Array]) -> jax.Array:
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total * jnp.float32(1.0 / len(parts))
