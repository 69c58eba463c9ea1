"""One exchange over a stage's DP group: every replica puts in a flat float32 buffer, the group's
mean is formed, a server function turns (its span of) the mean into what goes back, and every
replica receives the same result. The exact gradient modes serve the mean itself; DiLoCo serves
its outer optimizer's step.

Patterns (`mode`), with `grad_codec` none:
- `central_ps`: sum to DP rank 0 (reduce), serve the whole buffer there, broadcast it back;
- `sharded_ps`: reduce-scatter, every member serves its 1/D, all-gather;
- `allreduce`: allreduce, every member serves the whole buffer (the same arithmetic everywhere).

With a codec (jaxpipe.dp.quant) a quantised buffer cannot be summed on the way, so the members'
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
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe.dp import quant
from jaxpipe.dp.collectives import Collectives

Serve = Callable[[jax.Array, int], jax.Array]  # (mean rows of my span, first row) -> rows to send back
MODES = ("central_ps", "sharded_ps", "allreduce")


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


class Exchange:
    def __init__(self, mode: str, codec: str, coll: Collectives, n: int, chunk: int = quant.CHUNK):
        if mode not in MODES:
            raise ValueError(f"unknown exchange {mode!r}")
        self.mode, self.codec, self.coll, self.n, self.chunk = mode, codec, coll, n, chunk
        d = coll.size
        self.rows = -(-max(n, 1) // (chunk * d)) * d  # a whole number of rows per member
        self.span_rows = self.rows // d if mode == "sharded_ps" else self.rows
        zeros = lambda r: jnp.zeros((r, chunk), jnp.float32)  # noqa: E731
        self.up = zeros(self.rows) if codec != "none" else None
        serves = mode == "sharded_ps" or (mode == "central_ps" and coll.rank == 0)
        self.down = zeros(self.span_rows) if codec != "none" and mode != "allreduce" and serves else None
        self._pending: tuple[jax.Array | None, jax.Array | None] | None = None
        # What came back in the last run (central and sharded PS), in `codec`'s wire rows [rows, row_bytes].
        self.back: jax.Array | None = None

    @property
    def first_row(self) -> int:
        """The first row this member serves."""
        return self.coll.rank * self.span_rows if self.mode == "sharded_ps" else 0

    def run(self, flat: jax.Array, serve: Serve | None = None) -> jax.Array:
        """The served result (length n) on every member; `serve` is called where this member serves."""
        serve = serve or _identity
        coll, d, codec = self.coll, self.coll.size, self.codec
        x = to_rows(flat, self.rows, self.chunk)
        if codec == "none":
            if self.mode == "central_ps":
                total = coll.reduce_sum(x)
                out = coll.bcast(serve(_div(total, d), 0) if total is not None else x)
            elif self.mode == "sharded_ps":
                mine = coll.reduce_scatter_sum(x)
                out = coll.allgather(serve(_div(mine, d), self.first_row)).reshape(self.rows, self.chunk)
            else:
                out = serve(_div(coll.allreduce_sum(x), d), 0)
            self.back = quant.encode(out, "none") if self.mode != "allreduce" else None
            return from_rows(out, self.n)
        wire, up = quant.encode_ef(x, self.up, codec)
        down = self.down
        if self.mode == "central_ps":
            got = coll.gather(wire)
            if got is not None:
                back, down = quant.encode_ef(serve(quant.mean_of(got, codec, d), 0), down, codec)
            else:
                back = wire
            self.back = coll.bcast(back)
            out = quant.decode(self.back, codec)
        elif self.mode == "sharded_ps":
            got = coll.alltoall(wire.reshape(d, self.span_rows, -1))
            back, down = quant.encode_ef(serve(quant.mean_of(got, codec, d), self.first_row), down, codec)
            self.back = coll.allgather(back).reshape(self.rows, -1)
            out = quant.decode(self.back, codec)
        else:
            out = serve(quant.mean_of(coll.allgather(wire), codec, d), 0)
            self.back = None
        self._pending = (up, down)
        return from_rows(out, self.n)

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
