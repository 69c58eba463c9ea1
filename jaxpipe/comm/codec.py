"""Message codecs: what a pipeline message looks like on the wire.

A codec is one class: `encode` turns the array a stage program produced into the wire array and
`decode` turns a received wire array back into what the next program consumes, both jitted and run
on the device (the transport dispatches `encode` right behind the program that produced the
message and `decode` right ahead of the one that consumes it), so only the wire's bytes ever
cross a link or the host. `wire_spec` says what the receiver must expect, and `code` travels in
every message header, so two ranks that disagree on a codec fail with a message naming both
instead of decoding garbage.

`key` (the message's step, micro-batch, kind and chunk) is passed to both ends so that a stateful
codec can keep per-sample state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import partial
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpipe.comm.message import ArraySpec, MsgKey


class Codec(ABC):
    """Stateless unless a subclass says otherwise; one instance per message kind and rank."""

    name: ClassVar[str]
    code: ClassVar[int]  # in the message header; unique per class

    @abstractmethod
    def wire_spec(self, spec: ArraySpec) -> ArraySpec:
        """The wire array for a message whose decoded array is `spec`."""

    @abstractmethod
    def encode(self, x: jax.Array, key: MsgKey) -> jax.Array:
        """The wire array for `x` (dispatched on the device, not waited for)."""

    @abstractmethod
    def decode(self, wire: jax.Array, spec: ArraySpec, key: MsgKey) -> jax.Array:
        """`spec`-shaped array from a received wire array (dispatched on the device)."""

    def describe(self) -> str:
        return self.name


class Identity(Codec):
    """`none`: the message travels as the stage computed it (the compute dtype)."""

    name, code = "none", 0

    def wire_spec(self, spec: ArraySpec) -> ArraySpec:
        return spec

    def encode(self, x: jax.Array, key: MsgKey) -> jax.Array:
        return x

    def decode(self, wire: jax.Array, spec: ArraySpec, key: MsgKey) -> jax.Array:
        return wire


@jax.jit
def _to_bf16(x: jax.Array) -> jax.Array:
    return x.astype(jnp.bfloat16)


class BFloat16(Codec):
    """Rounded to bfloat16 on the wire, widened back to the compute dtype on arrival (what `none`
    sends on GPU, where the compute dtype is bfloat16: then both are the same bytes)."""

    name, code = "bfloat16", 1

    def wire_spec(self, spec: ArraySpec) -> ArraySpec:
        return ArraySpec(spec.shape, "bfloat16")

    def encode(self, x: jax.Array, key: MsgKey) -> jax.Array:
        return x if x.dtype == jnp.bfloat16 else _to_bf16(x)

    def decode(self, wire: jax.Array, spec: ArraySpec, key: MsgKey) -> jax.Array:
        return wire if spec.dtype == "bfloat16" else _widen(wire, spec.dtype)


@partial(jax.jit, static_argnums=1)
def _widen(x: jax.Array, dtype: str) -> jax.Array:
    return x.astype(dtype)


CODECS: dict[str, type[Codec]] = {c.name: c for c in (Identity, BFloat16)}


def codec_name(code: int) -> str:
    """The name of the codec with header code `code`, for error messages."""
    return next((c.name for c in CODECS.values() if c.code == code), f"codec#{code}")


def make_codec(name: str, **kwargs: Any) -> Codec:
    return CODECS[name](**kwargs)
