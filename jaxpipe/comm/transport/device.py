"""JAX GPU arrays as raw device bytes and back, without copies (CuPy over DLPack). CuPy is
imported lazily: CPU installs never need it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxpipe.comm.message import ArraySpec


def wait_stream(stream: Any) -> None:
    """Waits for a CuPy stream. CuPy's synchronize releases the GIL while it waits (polling an
    event with sleeps instead measured slower: every wake-up takes the GIL from the main thread)."""
    stream.synchronize()


def wire_view(x: jax.Array) -> jax.Array:
    """`x` in a dtype CuPy knows (it has no bfloat16: uint16 bits). Dispatched on the main thread."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def as_bytes_on_device(x: jax.Array) -> Any:
    """A CuPy uint8 view of a JAX GPU array (already through `wire_view`), without a copy."""
    import cupy

    x.block_until_ready()
    return cupy.from_dlpack(x).ravel().view(cupy.uint8), x


def from_bytes_on_device(buf: Any, spec: ArraySpec) -> jax.Array:
    """The inverse: a JAX array over a CuPy byte buffer (zero-copy through DLPack)."""
    dtype = jnp.dtype(spec.dtype)
    if dtype == jnp.bfloat16:
        arr = jax.dlpack.from_dlpack(buf.view("uint16"))
        return jax.lax.bitcast_convert_type(arr, jnp.bfloat16).reshape(spec.shape)
    return jax.dlpack.from_dlpack(buf.view(dtype.name)).reshape(spec.shape)
