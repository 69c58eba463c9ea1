"""Message codecs: what a pipeline message looks like on the wire.

A codec is one class: `encode` turns the array a stage program produced into the wire array and
`decode` turns a received wire array back into what the next program consumes, both jitted and run
on the device (the transport dispatches `encode` right behind the program that produced the
message and `decode` right ahead of the one that consumes it), so only the wire's bytes ever
cross a link or the host. `wire_spec` says what the receiver must expect, and `code` travels in
every message header, so two ranks that disagree on a codec fail with a message naming both
instead of decoding garbage.

`key` (the message's step, micro-batch, kind and chunk) is passed to both ends so that a stateful
codec can keep per-sample state (`Delta`).

The quantising codecs (`float8`, `int8`, `int4`; `jaxpipe.comm.quant`) scale every token row (the
last axis) by its absmax and put one uint8 array on the wire, shaped [samples, bytes per sample]
(each row's values, then its bfloat16 scale): a dtype every transport carries (host-staged MPI,
CUDA-aware MPI and NCCL alike), split along the batch like the activation when a stage spans
several devices. `float8` is e4m3 for activations (precision) and e5m2 for their gradients (range).
Codecs apply to messages between ranks; where two consecutive chunks share a rank the value is
passed on as it is (nothing crosses a link).
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe.comm import quant
from jaxpipe.comm.message import ArraySpec, Kind, MsgKey

NAMES = ("none", "bfloat16", "float8", "int8", "int4")


class Codec(ABC):
    """Stateless unless a subclass says otherwise; one instance per message kind and rank."""

    name: ClassVar[str]
    code: ClassVar[int]  # in the message header; unique per class

    @abstractmethod
    def wire_spec(self, spec: ArraySpec, key: MsgKey | None = None) -> ArraySpec:
        """The wire array for a message whose decoded array is `spec` (a stateful codec's may
        depend on `key`; called before `decode` of the same key, in the sender's order)."""

    @abstractmethod
    def encode(self, x: jax.Array, key: MsgKey) -> jax.Array:
        """The wire array for `x` (dispatched on the device, not waited for)."""

    @abstractmethod
    def decode(self, wire: jax.Array, spec: ArraySpec, key: MsgKey) -> jax.Array:
        """`spec`-shaped array from a received wire array (dispatched on the device)."""

    def flush(self) -> None:  # noqa: B027 - optional hook
        """At the end of a step's traffic (the transport's flush): completes background work."""

    def describe(self) -> str:
        return self.name


class Identity(Codec):
    """`none`: the message travels as the stage computed it (the compute dtype)."""

    name, code = "none", 0

    def wire_spec(self, spec: ArraySpec, key: MsgKey | None = None) -> ArraySpec:
        return spec

    def encode(self, x: jax.Array, key: MsgKey) -> jax.Array:
        return x

    def decode(self, wire: jax.Array, spec: ArraySpec, key: MsgKey) -> jax.Array:
        return wire


@jax.jit
def _to_bf16(x: jax.Array) -> jax.Array:
    return x.astype(jnp.bfloat16)


@partial(jax.jit, static_argnums=1)
def _widen(x: jax.Array, dtype: str) -> jax.Array:
    return quant.saturate(x.astype(jnp.float32), dtype)


class BFloat16(Codec):
    """Rounded to bfloat16 on the wire, widened back to the compute dtype on arrival (what `none`
    sends on GPU, where the compute dtype is bfloat16: then both are the same bytes). Into float16
    finite values saturate at 65504 (a bfloat16 rounding can step just past it)."""

    name, code = "bfloat16", 1

    def wire_spec(self, spec: ArraySpec, key: MsgKey | None = None) -> ArraySpec:
        return ArraySpec(spec.shape, "bfloat16")

    def encode(self, x: jax.Array, key: MsgKey) -> jax.Array:
        return x if x.dtype == jnp.bfloat16 else _to_bf16(x)

    def decode(self, wire: jax.Array, spec: ArraySpec, key: MsgKey) -> jax.Array:
        return wire if spec.dtype == "bfloat16" else _widen(wire, spec.dtype)


# ---- row-quantising codecs ----------------------------------------------------------------------

def _layout(shape: Sequence[int]) -> tuple[int, int]:
    """(samples, row length): the leading axis is the batch, the last the row (a token's features)."""
    return (int(shape[0]) if len(shape) >= 2 else 1), int(shape[-1])


def quant_wire_spec(spec: ArraySpec, fmt: quant.Format) -> ArraySpec:
    b, d = _layout(spec.shape)
    rows = int(np.prod(spec.shape)) // d
    return ArraySpec((b, rows // b * quant.row_bytes(d, fmt)), "uint8")


@partial(jax.jit, static_argnums=1)
def _encode(x: jax.Array, fmt: quant.Format) -> jax.Array:
    b, d = _layout(x.shape)
    return quant.encode_rows(x.reshape(b, -1, d), fmt).reshape(b, -1)


@partial(jax.jit, static_argnums=(1, 2, 3))
def _decode(wire: jax.Array, fmt: quant.Format, shape: tuple[int, ...], dtype: str) -> jax.Array:
    b, d = _layout(shape)
    return quant.decode_rows(wire.reshape(b, -1, quant.row_bytes(d, fmt)), fmt, dtype).reshape(shape)


class RowQuant(Codec):
    """Absmax per token row in `fmt` (see jaxpipe.comm.quant); decoded into the compute dtype."""

    fmt: ClassVar[quant.Format]

    def wire_spec(self, spec: ArraySpec, key: MsgKey | None = None) -> ArraySpec:
        return quant_wire_spec(spec, self.fmt)

    def encode(self, x: jax.Array, key: MsgKey) -> jax.Array:
        return _encode(x, self.fmt)

    def decode(self, wire: jax.Array, spec: ArraySpec, key: MsgKey) -> jax.Array:
        return _decode(wire, self.fmt, tuple(spec.shape), spec.dtype)


class Int8(RowQuant):
    name, code, fmt = "int8", 2, "int8"


class Int4(RowQuant):
    name, code, fmt = "int4", 3, "int4"


class Float8E4M3(RowQuant):
    name, code, fmt = "float8", 4, "float8_e4m3"

    def describe(self) -> str:
        return "float8 (e4m3)"


class Float8E5M2(RowQuant):
    name, code, fmt = "float8", 5, "float8_e5m2"

    def describe(self) -> str:
        return "float8 (e5m2)"


# ---- AQ-SGD's delta mode ------------------------------------------------------------------------

class DeltaStore:
    """The copy of every sample's activation at one chunk boundary that both of its ends hold: what
    the last visit of that sample delivered (host memory, or a memory-mapped file under `directory`).
    Writes come from device arrays and complete on a background thread (so the host never waits
    for the producing program); a read of a sample waits for that sample's pending write."""

    def __init__(self, name: str, n_samples: int, row_shape: tuple[int, ...], dtype: str,
                 directory: str | None = None, save: bool = False):
        self.name, self.save = name, save  # `save`: this end writes the copies into checkpoints
        shape = (n_samples, *row_shape)
        np_dtype = np.dtype(jnp.dtype(dtype))
        if directory is None:
            self.copies = np.zeros(shape, np_dtype)
        else:
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.copies = np.lib.format.open_memmap(Path(directory) / f"{name}.npy", "w+", np_dtype, shape)
        self.has = np.zeros(n_samples, bool)
        self._pending: dict[int, int] = {}
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self._q: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._write_loop, name=f"jaxpipe-delta-{name}", daemon=True)
        self._thread.start()

    @property
    def nbytes(self) -> int:
        return int(self.copies.nbytes)

    def get(self, ids: np.ndarray) -> np.ndarray:
        with self._cv:
            while any(int(i) in self._pending for i in ids) and self._error is None:
                self._cv.wait(0.1)
            self._raise()
        return np.ascontiguousarray(self.copies[ids])

    def put(self, ids: np.ndarray, x: jax.Array) -> None:
        with self._cv:
            self._raise()
            for i in ids:
                self._pending[int(i)] = self._pending.get(int(i), 0) + 1
        self._q.put((ids, x))

    def sync(self) -> None:
        self._q.join()
        with self._cv:
            self._raise()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _write_loop(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                ids, x = item
                try:
                    self.copies[ids] = np.asarray(x)  # waits for the device value, releasing the GIL
                except BaseException as e:  # Surfaced at the next get, put or sync.
                    self._error = e
                with self._cv:
                    for i in ids:
                        n = self._pending.pop(int(i)) - 1
                        if n:
                            self._pending[int(i)] = n
                    self._cv.notify_all()
            finally:
                self._q.task_done()

    # checkpoint state (jaxpipe.train.hooks): both ends hold the same copies, so one end saves them.
    def extra_state(self) -> dict[str, np.ndarray]:
        self.sync()
        return {f"{self.name}.copies": self.copies, f"{self.name}.has": self.has} if self.save else {}

    def load_extra_state(self, get: Callable[[str], np.ndarray | None]) -> str | None:
        copies, has = get(f"{self.name}.copies"), get(f"{self.name}.has")
        if copies is None or has is None or copies.shape != self.copies.shape or copies.dtype != self.copies.dtype:
            self.has[:] = False
            return f"{self.name}: no matching copies in the checkpoint; every sample's next visit goes in int8"
        self.copies[:] = copies
        self.has[:] = has
        return None


@partial(jax.jit, static_argnums=2)
def _encode_delta(x: jax.Array, copy: jax.Array, fmt: quant.Format) -> jax.Array:
    return _encode(x.astype(jnp.float32) - copy.astype(jnp.float32), fmt)


@partial(jax.jit, static_argnums=(2, 3, 4))
def _decode_delta(wire: jax.Array, copy: jax.Array, fmt: quant.Format, shape: tuple[int, ...],
                  dtype: str) -> jax.Array:
    return quant.saturate(copy.astype(jnp.float32) + _decode(wire, fmt, shape, "float32"), dtype)


@jax.jit
def _finite_or(new: jax.Array, old: jax.Array) -> jax.Array:
    """The copy to keep: `new` where finite, else `old`. A non-finite activation (a float16 overflow,
    a step the loss scaler skips) must not become a sample's copy: every later delta against it would
    be non-finite too. Both ends apply it to the same values, so their copies stay identical."""
    return jnp.where(jnp.isfinite(new), new, old.astype(new.dtype))


class Delta(Codec):
    """AQ-SGD's activation compression: a sample's activation travels as the `inner`-coded
    difference to the copy both ends hold of what that sample's last visit delivered; the receiver
    adds it to its copy, and both ends replace their copy by the result (computed by the same jitted
    program from the same wire bytes, so the copies stay identical).

    Rules, in the order messages travel (the sender's `encode`, the receiver's `wire_spec` at
    posting, which the executor does in the sender's order):
    - a micro-batch goes as absolute int8 values when any of its samples has no copy yet (the first
      epoch; the micro-batch straddling its end; a sample this replica has not seen); otherwise as
      deltas in `inner`;
    - evaluation (negative message steps: validation samples, which have no training index) never
      uses deltas: it sends absolute int8 values and neither reads nor writes a copy.

    `sample_ids(key)`: the data windows a training message's micro-batch holds (both ends compute
    the same from the step, the replica and the data order); `stores`: one per chunk boundary this
    rank is an end of, keyed by the consuming chunk; `place` puts a copy on the device(s)."""

    name = "delta"
    code = 0x10

    def __init__(self, inner: RowQuant, sample_ids: Callable[[MsgKey], np.ndarray],
                 stores: dict[int, DeltaStore], place: Callable[[np.ndarray], jax.Array] = jax.device_put):
        self.inner, self.first = inner, Int8()
        self.code = Delta.code | inner.code  # type: ignore[misc]
        self.sample_ids, self.stores, self.place = sample_ids, stores, place
        self._plans: dict[MsgKey, tuple[np.ndarray, bool]] = {}

    def describe(self) -> str:
        return f"{self.inner.name} deltas (first visits int8)"

    def _plan(self, key: MsgKey) -> tuple[np.ndarray, bool]:
        """(sample windows, as deltas?) of a training message; decided once, in message order."""
        if key not in self._plans:
            ids = np.asarray(self.sample_ids(key), np.int64)
            store = self.stores[key.chunk]
            delta = bool(store.has[ids].all())
            store.has[ids] = True
            self._plans[key] = (ids, delta)
        return self._plans[key]

    def wire_spec(self, spec: ArraySpec, key: MsgKey | None = None) -> ArraySpec:
        if key is None or key.step < 0 or not self._plan(key)[1]:
            return self.first.wire_spec(spec)
        return self.inner.wire_spec(spec)

    def encode(self, x: jax.Array, key: MsgKey) -> jax.Array:
        if key.step < 0:
            return self.first.encode(x, key)
        ids, delta = self._plan(key)
        self._plans.pop(key)
        store, shape, dtype = self.stores[key.chunk], tuple(x.shape), jnp.dtype(x.dtype).name
        copy = self.place(store.get(ids)) if delta else jnp.zeros(shape, dtype)
        if delta:
            wire = _encode_delta(x, copy, self.inner.fmt)
            store.put(ids, _finite_or(_decode_delta(wire, copy, self.inner.fmt, shape, dtype), copy))
        else:
            wire = self.first.encode(x, key)
            store.put(ids, _finite_or(_decode(wire, self.first.fmt, shape, dtype), copy))
        return wire

    def decode(self, wire: jax.Array, spec: ArraySpec, key: MsgKey) -> jax.Array:
        if key.step < 0:
            return self.first.decode(wire, spec, key)
        ids, delta = self._plans.pop(key)
        store = self.stores[key.chunk]
        copy = self.place(store.get(ids)) if delta else jnp.zeros(tuple(spec.shape), spec.dtype)
        if delta:
            out = _decode_delta(wire, copy, self.inner.fmt, tuple(spec.shape), spec.dtype)
        else:
            out = self.first.decode(wire, spec, key)
        store.put(ids, _finite_or(out, copy))
        return out

    def flush(self) -> None:
        for store in self.stores.values():
            store.sync()

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


# ---- construction ------------------------------------------------------------------------------

def make_codec(name: str, kind: Kind) -> Codec:
    """`parallel.act_codec` (kind ACT) or `parallel.act_grad_codec` (kind GRAD) by name."""
    if name == "float8":
        return Float8E4M3() if kind == Kind.ACT else Float8E5M2()
    classes: dict[str, type[Codec]] = {"none": Identity, "bfloat16": BFloat16, "int8": Int8, "int4": Int4}
    if name not in classes:
        raise ValueError(f"unknown codec {name!r} (one of {', '.join(NAMES)})")
    return classes[name]()


_ALL = (Identity(), BFloat16(), Int8(), Int4(), Float8E4M3(), Float8E5M2())


def codec_name(code: int) -> str:
    """The name of the codec with header code `code`, for error messages."""
    inner = next((c.describe() for c in _ALL if c.code == code & ~Delta.code), f"codec#{code}")
    return f"{inner} deltas" if code & Delta.code else inner


def wire_nbytes(name: str, kind: Kind, spec: ArraySpec) -> int:
    """Bytes one message of `spec` takes on the wire with codec `name` (no header)."""
    return make_codec(name, kind).wire_spec(spec).nbytes
