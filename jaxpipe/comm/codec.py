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

The quantising codecs (`float8`, `int8`, `int4`, `int4_sr`, `int4_row`; `jaxpipe.comm.quant`) scale
every token row (the last axis) by its absmax, `int4` (and `int4_sr`, rounded stochastically) every
group of `parallel.act_int4_group` values of it, and
put one uint8 array on the wire, shaped [samples, bytes per sample] (each row's or group's values, then
its bfloat16 scale): a dtype every transport carries (host-staged MPI, CUDA-aware MPI and NCCL alike),
split along the batch like the activation when a stage spans several devices. `float8` is e4m3 for
activations (precision) and e5m2 for their gradients (range).

The classes fill `jaxpipe.registry.ACT_CODECS` (the values of `parallel.act_codec` and
`parallel.act_grad_codec`), each checking its own keys (`validate_config`) before anything compiles;
`bytes_per_element` is what the cost model, the planner and the step's counters all read.
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
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe.comm import quant
from jaxpipe.comm.message import ArraySpec, Kind, MsgKey
from jaxpipe.errors import ConfigError
from jaxpipe.registry import ACT_CODECS

if TYPE_CHECKING:
    from jaxpipe.config import Config

INT4_GROUP = 32  # parallel.act_int4_group's default: values per scale (BENCHMARKS.md, "int4 within 1 %")


class Codec(ABC):
    """Stateless unless a subclass says otherwise; one instance per message kind and rank."""

    name: ClassVar[str]
    code: ClassVar[int]  # in the message header; unique per class
    delta_capable: ClassVar[bool] = False  # can carry parallel.act_delta's changes

    @classmethod
    def make(cls, kind: Kind, cfg: Config | None = None, replica: int = 0) -> Codec:
        """The instance for messages of `kind` under `cfg` (None: the defaults) on data-parallel
        replica `replica` (a codec that draws random numbers draws other ones per replica)."""
        return cls()

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """The activation codec also carries the delta mode's rules (`Delta.validate_config`)."""
        if cfg.parallel.act_codec == cls.name:
            Delta.validate_config(cfg)

    def bytes_per_element(self, spec: ArraySpec) -> float:
        """Wire bytes per value of a message of `spec` (no header)."""
        return self.wire_spec(spec).nbytes / max(1, int(np.prod(spec.shape)))

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


@ACT_CODECS.register
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


@ACT_CODECS.register
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


def quant_wire_spec(spec: ArraySpec, fmt: quant.Format, group: int = 0) -> ArraySpec:
    b, d = _layout(spec.shape)
    rows = int(np.prod(spec.shape)) // d
    return ArraySpec((b, rows // b * quant.row_bytes(d, fmt, group)), "uint8")


@partial(jax.jit, static_argnums=(1, 2))
def _encode(x: jax.Array, fmt: quant.Format, group: int = 0) -> jax.Array:
    b, d = _layout(x.shape)
    return quant.encode_rows(x.reshape(b, -1, d), fmt, group).reshape(b, -1)


@partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _decode(wire: jax.Array, fmt: quant.Format, shape: tuple[int, ...], dtype: str, group: int = 0) -> jax.Array:
    b, d = _layout(shape)
    return quant.decode_rows(wire.reshape(b, -1, quant.row_bytes(d, fmt, group)), fmt, dtype, group).reshape(shape)


class RowQuant(Codec):
    """Absmax per token row (or per `group` values of it) in `fmt` (see jaxpipe.comm.quant); decoded
    into the compute dtype."""

    fmt: ClassVar[quant.Format]
    delta_capable = True
    group: int = 0

    def wire_spec(self, spec: ArraySpec, key: MsgKey | None = None) -> ArraySpec:
        return quant_wire_spec(spec, self.fmt, self.group)

    def encode(self, x: jax.Array, key: MsgKey) -> jax.Array:
        return _encode(x, self.fmt, self.group)

    def decode(self, wire: jax.Array, spec: ArraySpec, key: MsgKey) -> jax.Array:
        return _decode(wire, self.fmt, tuple(spec.shape), spec.dtype, self.group)

    def roundtrip(self, x: jax.Array) -> jax.Array:
        """What the far end decodes for `x` (references repeat the codec's arithmetic with it)."""
        return quant.roundtrip(x, self.fmt, self.group)


@ACT_CODECS.register
class Int8(RowQuant):
    name, code, fmt = "int8", 2, "int8"


class _Int4Rows(RowQuant):
    fmt = "int4"

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        if cfg.model.d_model % 2:
            raise ConfigError(f"int4 packs two values per byte: model.d_model ({cfg.model.d_model}) must be even "
                              f"for parallel.act_codec / parallel.act_grad_codec = int4")
        super().validate_config(cfg)


@ACT_CODECS.register
class Int4(_Int4Rows):
    """int4 with a bfloat16 scale per group of `group` values of a row (`parallel.act_int4_group`):
    4 + 16 / group bits per value (4.5 at 32). Chosen over the per-row scale by the demo-corpus runs
    (BENCHMARKS.md): with one scale per token row, one large feature sets the step of all of them."""

    name, code = "int4", 6

    def __init__(self, group: int = INT4_GROUP):
        self.group = group

    @classmethod
    def make(cls, kind: Kind, cfg: Config | None = None, replica: int = 0) -> Codec:
        return cls(cfg.parallel.act_int4_group if cfg is not None else INT4_GROUP)

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        super().validate_config(cfg)
        g, d = cfg.parallel.act_int4_group, cfg.model.d_model
        if g < 2 or g % 2 or d % g:
            raise ConfigError(f"parallel.act_int4_group ({g}) must be an even number of values that divides "
                              f"model.d_model ({d}), e.g. 32 or 64; parallel.act_codec=int4_row keeps one scale "
                              f"per row")



def rounding_key(seed: int, replica: int, key: MsgKey) -> tuple[int, ...]:
    """The integers a stochastically rounded message's noise is drawn from: the run's seed, then the
    data-parallel replica, step, micro-batch, kind and receiving chunk folded in, in this order
    (`noise_of`). Both ends and a single-process reference can name every message's noise, and no two
    messages of a run share it."""
    return (seed, replica, key.step, key.microbatch, int(key.kind), key.chunk)


def noise_of(ids: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """U[0, 1) noise for a message of `shape` from its `rounding_key` integers (traceable: the key is
    folded inside the program that encodes, one dispatch per message)."""
    k = jax.random.key(ids[0])
    for i in range(1, len(ids)):
        k = jax.random.fold_in(k, ids[i])
    return quant.uniform_noise(k, shape)


@partial(jax.jit, static_argnums=(2, 3))
def _encode_sr(x: jax.Array, ids: jax.Array, fmt: quant.Format, group: int) -> jax.Array:
    b, d = _layout(x.shape)
    noise = noise_of(ids, tuple(x.shape)).reshape(b, -1, d)
    return quant.encode_rows(x.reshape(b, -1, d), fmt, group, noise).reshape(b, -1)


@ACT_CODECS.register
class Int4SR(Int4):
    """`int4_sr`: `int4`'s groups and bytes, rounded stochastically in training (unbiased: E[decoded]
    = the value; see jaxpipe.comm.quant). The noise of each message is drawn from `rounding_key`
    (train.seed, the replica, the message's step, micro-batch, kind and chunk), so a reference repeats
    it exactly. Evaluation messages (negative steps) round to nearest: validation wants the closest
    value, not an unbiased one. Meant for the activations' gradients (`parallel.act_grad_codec`),
    where int4's round-to-nearest zeroes every value below 1/14 of its group's absmax; on activations
    too it is allowed (noisier forward values, but no systematic bias)."""

    name, code = "int4_sr", 7
    delta_capable = False  # the delta mode's copies follow the change's nearest rounding

    def __init__(self, group: int = INT4_GROUP, seed: int = 0, replica: int = 0):
        super().__init__(group)
        self.seed, self.replica = seed, replica

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        p = cfg.parallel
        if p.act_delta and p.act_codec == cls.name:
            raise ConfigError("parallel.act_delta keeps, at both ends, what each sample's last visit delivered, "
                              "coded to nearest; parallel.act_codec=int4_sr rounds stochastically: use "
                              "parallel.act_codec=int4 with act_delta (int4_sr stays possible for "
                              "parallel.act_grad_codec)")
        if cfg.train.seed < 0:
            raise ConfigError(f"int4_sr draws its rounding noise from train.seed: it must be 0 or more "
                              f"(got {cfg.train.seed})")
        super().validate_config(cfg)

    @classmethod
    def make(cls, kind: Kind, cfg: Config | None = None, replica: int = 0) -> Codec:
        if cfg is None:
            return cls(replica=replica)
        return cls(cfg.parallel.act_int4_group, cfg.train.seed, replica)

    def encode(self, x: jax.Array, key: MsgKey) -> jax.Array:
        if key.step < 0:
            return _encode(x, self.fmt, self.group)
        ids = np.asarray(rounding_key(self.seed, self.replica, key), np.uint32)
        return _encode_sr(x, ids, self.fmt, self.group)

    def describe(self) -> str:
        return "int4 (stochastic rounding)"


@ACT_CODECS.register
class Int4Row(_Int4Rows):
    """int4 with one scale per token row (the format before groups): 4 + 16 / d_model bits per value."""

    name, code = "int4_row", 3


@ACT_CODECS.register
class Float8E4M3(RowQuant):
    """`float8`: e4m3 for activations; its gradients get `Float8E5M2` (`make`)."""

    name, code, fmt = "float8", 4, "float8_e4m3"

    @classmethod
    def make(cls, kind: Kind, cfg: Config | None = None, replica: int = 0) -> Codec:
        return Float8E4M3() if kind == Kind.ACT else Float8E5M2()

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


@partial(jax.jit, static_argnums=(2, 3))
def _encode_delta(x: jax.Array, copy: jax.Array, fmt: quant.Format, group: int = 0) -> jax.Array:
    return _encode(x.astype(jnp.float32) - copy.astype(jnp.float32), fmt, group)


@partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _decode_delta(wire: jax.Array, copy: jax.Array, fmt: quant.Format, shape: tuple[int, ...],
                  dtype: str, group: int = 0) -> jax.Array:
    return quant.saturate(copy.astype(jnp.float32) + _decode(wire, fmt, shape, "float32", group), dtype)


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

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """`parallel.act_delta` and `parallel.act_delta_dir`: the combinations that cannot work."""
        p = cfg.parallel
        if p.act_delta:
            if not (p.act_codec in ACT_CODECS and ACT_CODECS.get(p.act_codec).delta_capable):
                raise ConfigError(f"parallel.act_delta sends the act_codec-coded change of each activation: set "
                                  f"parallel.act_codec to int4, int8 or float8 (got {p.act_codec!r})")
            if cfg.data.source != "tokens":
                raise ConfigError("parallel.act_delta keeps a copy per training sample and sends the change since "
                                  "its last visit, but data.source=synthetic never visits a sample twice: use "
                                  "data.source=tokens (or turn parallel.act_delta off)")
        elif p.act_delta_dir is not None:
            raise ConfigError("parallel.act_delta_dir is set but parallel.act_delta is off")

    def __init__(self, inner: RowQuant, sample_ids: Callable[[MsgKey], np.ndarray],
                 stores: dict[int, DeltaStore], place: Callable[[np.ndarray], jax.Array] = jax.device_put):
        self.inner, self.first = inner, Int8()
        self.code = Delta.code | inner.code  # type: ignore[misc]
        self.sample_ids, self.stores, self.place = sample_ids, stores, place
        self._plans: dict[MsgKey, tuple[np.ndarray, bool]] = {}

    def describe(self) -> str:
        return f"{self.inner.describe()} deltas (first visits int8)"

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
            wire = _encode_delta(x, copy, self.inner.fmt, self.inner.group)
            store.put(ids, _finite_or(_decode_delta(wire, copy, self.inner.fmt, shape, dtype, self.inner.group),
                                      copy))
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
            out = _decode_delta(wire, copy, self.inner.fmt, tuple(spec.shape), spec.dtype, self.inner.group)
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

def make_codec(name: str, kind: Kind, cfg: Config | None = None, replica: int = 0) -> Codec:
    """`parallel.act_codec` (kind ACT) or `parallel.act_grad_codec` (kind GRAD) by name, with `cfg`'s
    settings of it (None: the defaults), for data-parallel replica `replica`."""
    if name not in ACT_CODECS:
        raise ValueError(f"unknown codec {name!r} (one of {', '.join(ACT_CODECS.names())})")
    return ACT_CODECS.get(name).make(kind, cfg, replica)


_ALL = (Identity(), BFloat16(), Int8(), Int4(), Int4SR(), Int4Row(), Float8E4M3(), Float8E5M2())


def codec_name(code: int) -> str:
    """The name of the codec with header code `code`, for error messages."""
    inner = next((c.describe() for c in _ALL if c.code == code & ~Delta.code), f"codec#{code}")
    return f"{inner} deltas" if code & Delta.code else inner


def wire_nbytes(name: str, kind: Kind, spec: ArraySpec, cfg: Config | None = None) -> int:
    """Bytes one message of `spec` takes on the wire with codec `name` (no header)."""
    return make_codec(name, kind, cfg).wire_spec(spec).nbytes
