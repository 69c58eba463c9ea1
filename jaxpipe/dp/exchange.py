"""One exchange over a stage's DP group: every replica puts in a flat float32 buffer, the group's
mean is formed, a server function turns (its span of) the mean into what goes back, and every
replica receives the same result. The exact gradient modes serve the mean itself; DiLoCo serves
its outer optimizer's step.

Patterns (one class each, `PATTERNS` by name), with `grad_codec` none:
- `central_ps`: sum to DP rank 0 (reduce), serve the whole buffer there, broadcast it back;
- `sharded_ps`: reduce-scatter, every member serves its 1/D, all-gather;
- `allreduce`: allreduce, every member serves the whole buffer (the same arithmetic everywhere).

With a codec (jaxpipe.comm.quant) a quantised buffer cannot be summed on the way, so the members'
messages reach whoever serves them whole and are decoded and summed there in float32, in rank
order:
- `central_ps`: every replica quantises its buffer (with error feedback), the server gathers and
  sums them, quantises what it serves (with its own error feedback) and broadcasts it;
- `sharded_ps`: the same with rows split by owner: an all-to-all of the quantised rows, each owner
  sums and serves its rows, an all-gather of the quantised results;
- `allreduce`: an all-gather of the quantised buffers; every member decodes and sums all of them
  (one quantisation only, but (D-1)·|c| per member instead of 2·(D-1)/D·|c|).
Every member decodes the same bytes, the server included, so replicas stay bit-identical.

Residues (error feedback) are proposed by `run` and kept by `commit(True)`: a step that is then
skipped (non-finite) leaves them as they were, as it leaves the parameters.

An exchange can also start now and finish later (`start` -> `Pending.wait`): it then runs on a
thread of its own, over the DP group's own communicator (the collectives `Dup` it), while the
caller goes on computing; MPI is initialised with MPI_THREAD_MULTIPLE. Streaming DiLoCo overlaps
its outer steps with inner steps this way.

Each pattern describes its own traffic (`Pattern.transfers`, jaxpipe.comm.traffic): the operations
it runs and their buffers, which the metrics count and the cost model and the planner time.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe.comm import quant
from jaxpipe.comm.traffic import Transfer
from jaxpipe.dp.collectives import Collectives

Serve = Callable[[jax.Array, int], jax.Array]  # (mean rows of my span, first row) -> rows to send back


@partial(jax.jit, static_argnums=(1, 2))
def to_rows(x: jax.Array, rows: int, chunk: int) -> jax.Array:
    return jnp.pad(x, (0, rows * chunk - x.size)).reshape(rows, chunk)


@partial(jax.jit, static_argnums=1)
def from_rows(x: jax.Array, n: int) -> jax.Array:
    return x.reshape(-1)[:n]


@partial(jax.jit, static_argnums=1)
def _div(x: jax.Array, d: int) -> jax.Array:
    return x / jnp.float32(d)


def _identity(mean: jax.Array, first_row: int) -> jax.Array:
    return mean


def padded_rows(n: int, d: int, chunk: int = quant.CHUNK) -> int:
    """Rows of `chunk` elements a buffer of `n` travels in over `d` members (a whole number per member)."""
    return -(-max(n, 1) // (chunk * d)) * d


class Pattern(ABC):
    """Who serves which rows and which collectives carry them (see the module doc)."""

    name: ClassVar[str] = "?"
    sharded: ClassVar[bool] = False  # every member serves its 1/D of the rows
    sends_back: ClassVar[bool] = True  # a server sends its result back (coded, with its own error feedback)

    def serves(self, rank: int) -> bool:
        return True

    @abstractmethod
    def plain(self, ex: Exchange, x: jax.Array, serve: Serve) -> jax.Array:
        """float32 rows in, the served rows out (every member)."""

    @abstractmethod
    def coded(self, ex: Exchange, wire: jax.Array, serve: Serve, down: jax.Array | None
              ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        """Quantised rows in: (served rows decoded, what came back on the wire or None, new down residue)."""

    @classmethod
    @abstractmethod
    def transfers(cls, rows: int, codec: str, d: int, chunk: int = quant.CHUNK) -> tuple[Transfer, ...]:
        """The operations one exchange of `rows` runs, with each member's buffer bytes."""


class CentralPattern(Pattern):
    name = "central_ps"

    def serves(self, rank: int) -> bool:
        return rank == 0

    def plain(self, ex: Exchange, x: jax.Array, serve: Serve) -> jax.Array:
        coll = ex.coll
        total = coll.reduce_sum(x)
        return coll.bcast(serve(_div(total, coll.size), 0) if total is not None else x)

    def coded(self, ex: Exchange, wire: jax.Array, serve: Serve, down: jax.Array | None
              ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        coll, codec = ex.coll, ex.codec
        got = coll.gather(wire)
        back = wire
        if got is not None:
            back, down = quant.encode_chunks_ef(serve(quant.mean_of(got, codec, coll.size), 0), down, codec)
        back = coll.bcast(back)
        return quant.decode_chunks(back, codec), back, down

    @classmethod
    def transfers(cls, rows: int, codec: str, d: int, chunk: int = quant.CHUNK) -> tuple[Transfer, ...]:
        nbytes = rows * quant.chunk_row_bytes(codec, chunk)
        up = "reduce" if codec == "none" else "gather"
        return Transfer(up, nbytes), Transfer("bcast", nbytes)


class ShardedPattern(Pattern):
    name = "sharded_ps"
    sharded = True

    def plain(self, ex: Exchange, x: jax.Array, serve: Serve) -> jax.Array:
        coll = ex.coll
        mine = coll.reduce_scatter_sum(x)
        return coll.allgather(serve(_div(mine, coll.size), ex.first_row)).reshape(ex.rows, ex.chunk)

    def coded(self, ex: Exchange, wire: jax.Array, serve: Serve, down: jax.Array | None
              ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        coll, codec, d = ex.coll, ex.codec, ex.coll.size
        got = coll.alltoall(wire.reshape(d, ex.span_rows, -1))
        back, down = quant.encode_chunks_ef(serve(quant.mean_of(got, codec, d), ex.first_row), down, codec)
        back = coll.allgather(back).reshape(ex.rows, -1)
        return quant.decode_chunks(back, codec), back, down

    @classmethod
    def transfers(cls, rows: int, codec: str, d: int, chunk: int = quant.CHUNK) -> tuple[Transfer, ...]:
        row = quant.chunk_row_bytes(codec, chunk)
        up = "reduce_scatter" if codec == "none" else "alltoall"
        return Transfer(up, rows * row), Transfer("allgather", rows // d * row)


class AllreducePattern(Pattern):
    name = "allreduce"
    sends_back = False  # every member serves the whole buffer itself

    def plain(self, ex: Exchange, x: jax.Array, serve: Serve) -> jax.Array:
        return serve(_div(ex.coll.allreduce_sum(x), ex.coll.size), 0)

    def coded(self, ex: Exchange, wire: jax.Array, serve: Serve, down: jax.Array | None
              ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        return serve(quant.mean_of(ex.coll.allgather(wire), ex.codec, ex.coll.size), 0), None, down

    @classmethod
    def transfers(cls, rows: int, codec: str, d: int, chunk: int = quant.CHUNK) -> tuple[Transfer, ...]:
        nbytes = rows * quant.chunk_row_bytes(codec, chunk)
        return (Transfer("allreduce" if codec == "none" else "allgather", nbytes),)


PATTERNS: dict[str, type[Pattern]] = {c.name: c for c in (CentralPattern, ShardedPattern, AllreducePattern)}
MODES = tuple(PATTERNS)


class Pending:
    """An exchange started on its own thread; `wait` returns its result (or raises its error)."""

    def __init__(self, fn: Callable[[], jax.Array]):
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="jaxpipe-dp-exchange", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], jax.Array]) -> None:
        try:
            self._result = fn()
            jax.block_until_ready(self._result)
        except BaseException as e:
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> jax.Array:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


class Exchange:
    def __init__(self, pattern: str | Pattern, codec: str, coll: Collectives, n: int, chunk: int = quant.CHUNK):
        if isinstance(pattern, str):
            if pattern not in PATTERNS:
                raise ValueError(f"unknown exchange {pattern!r}")
            pattern = PATTERNS[pattern]()
        self.pattern, self.codec, self.coll, self.n, self.chunk = pattern, codec, coll, n, chunk
        self.mode = pattern.name
        d = coll.size
        self.rows = padded_rows(n, d, chunk)
        self.span_rows = self.rows // d if pattern.sharded else self.rows
        zeros = lambda r: jnp.zeros((r, chunk), jnp.float32)  # noqa: E731
        self.up = zeros(self.rows) if codec != "none" else None
        keeps_down = codec != "none" and pattern.sends_back and pattern.serves(coll.rank)
        self.down = zeros(self.span_rows) if keeps_down else None
        self._pending: tuple[jax.Array | None, jax.Array | None] | None = None
        # What came back in the last run (central and sharded PS), in `codec`'s wire rows [rows, row_bytes].
        self.back: jax.Array | None = None

    @property
    def first_row(self) -> int:
        """The first row this member serves."""
        return self.coll.rank * self.span_rows if self.pattern.sharded else 0

    def transfers(self) -> tuple[Transfer, ...]:
        return self.pattern.transfers(self.rows, self.codec, self.coll.size, self.chunk)

    def run(self, flat: jax.Array, serve: Serve | None = None) -> jax.Array:
        """The served result (length n) on every member; `serve` is called where this member serves."""
        serve = serve or _identity
        x = to_rows(flat, self.rows, self.chunk)
        if self.codec == "none":
            out = self.pattern.plain(self, x, serve)
            self.back = quant.encode_chunks(out, "none") if self.pattern.sends_back else None
            return from_rows(out, self.n)
        wire, up = quant.encode_chunks_ef(x, self.up, self.codec)
        out, self.back, down = self.pattern.coded(self, wire, serve, self.down)
        self._pending = (up, down)
        return from_rows(out, self.n)

    def start(self, flat: jax.Array, serve: Serve | None = None) -> Pending:
        """`run` on a thread of its own: the caller computes on while the bytes move."""
        return Pending(lambda: self.run(flat, serve))

    def commit(self, keep: bool) -> None:
        """Keeps (or drops) the residues the last `run` proposed."""
        if self._pending is not None and keep:
            self.up, self.down = self._pending
        self._pending = None

    # ---- checkpointed state -----------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        out = {}
        if self.up is not None:
            out["residue_up"] = np.asarray(self.up)
        if self.down is not None:
            out["residue_down"] = np.asarray(self.down)
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for key, attr in (("residue_up", "up"), ("residue_down", "down")):
            mine = getattr(self, attr)
            if mine is None:
                continue
            saved = state.get(key)
            if saved is None or tuple(saved.shape) != tuple(mine.shape):
                raise ValueError(f"{key}: saved {None if saved is None else saved.shape}, need {mine.shape}")
            setattr(self, attr, jax.device_put(jnp.asarray(saved, jnp.float32), mine.sharding))
