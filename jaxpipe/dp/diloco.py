"""DiLoCo (`parallel.dp_mode=diloco`): replicas train apart and meet every H steps.

Each replica runs `parallel.diloco_inner_steps` (H) ordinary steps with its own AdamW on its own
data, with no data-parallel traffic at all. Then, per stage, the replicas' pseudo-gradients
(outer parameters - local parameters) go to the stage's parameter server — DP rank 0, the
original's central PS, or every member for its 1/D with `parallel.diloco_exchange=sharded_ps` —
which averages them in float32 and applies the outer optimizer, SGD with Nesterov momentum
(`diloco_outer_lr` 0.7, `diloco_outer_momentum` 0.9, the DiLoCo paper's values):

    m <- mu·m + g;   delta = -lr·(g + mu·m)

and sends `delta` back; every replica (the server too) sets its outer parameters to
outer + delta and continues from them. `grad_codec` quantises the pseudo-gradients on the way up
and the step on the way down, each with error feedback (jaxpipe.dp.exchange); with `none` the new
outer parameters are exact. The inner AdamW state carries on across outer steps, as in DiLoCo.

`parallel.diloco_stagger=true` gives stage s the offset floor(s·H / P): it syncs after the steps
k with (k + offset) % H == 0, so each step syncs at most a few stages' parameters instead of the
whole model (Streaming DiLoCo's fragments, a stage being one). Every stage also syncs after the
run's last step, so a run ends with one model.

The tied embedding: the stage with the LM head keeps a copy of `wte`, identical to the first
stage's between outer steps (both get the same summed gradient). Only the first stage's copy
takes part in the outer step; the new values go to the other end over the tied communicator, so
both copies stay bit-identical whatever the codec.

Outer parameters, momentum and residues are this rank's state (`state()`), checkpointed with each
replica's own parameters and AdamW state, so a resume in the middle of an inner phase is exact.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from mpi4py import MPI

from jaxpipe.dp.base import DataParallel, DPContext, Trees
from jaxpipe.dp.exchange import Exchange

_TIED_TAG = 78


@partial(jax.jit, static_argnums=(2, 3))
def outer_step(g: jax.Array, m: jax.Array, lr: float, mu: float) -> tuple[jax.Array, jax.Array]:
    """(new momentum, parameter change): SGD with Nesterov momentum (PyTorch's, dampening 0)."""
    m = jnp.float32(mu) * m + g
    return m, -jnp.float32(lr) * (g + jnp.float32(mu) * m)


@jax.jit
def _sub(a: jax.Array, b: jax.Array) -> jax.Array:
    return a - b


@jax.jit
def _add(a: jax.Array, b: jax.Array) -> jax.Array:
    return a + b


class DiLoCo(DataParallel):
    name = "diloco"
    syncs_every_step = False
    per_replica_params = True

    def __init__(self, ctx: DPContext):
        super().__init__(ctx)
        p = ctx.parallel
        self.H, self.lr, self.mu = p.diloco_inner_steps, p.diloco_outer_lr, p.diloco_outer_momentum
        self.codec, self.mode, self.stagger = p.grad_codec, p.diloco_exchange, p.diloco_stagger
        self.coll = ctx.build_collectives()
        self.offset = self.offset_of(ctx.stage)
        self.tied = ctx.tied.Dup() if ctx.tied is not None else None
        self.exchange: Exchange | None = None
        self.outer: jax.Array | None = None
        self.momentum: jax.Array | None = None
        self._saved: dict[str, np.ndarray] | None = None
        self._ravel: Any = None
        self._unravel: Any = None
        self.head_copy = False  # this rank holds the LM head's copy of `wte`

    def offset_of(self, stage: int) -> int:
        return (stage * self.H) // self.ctx.n_stages if self.stagger else 0

    def syncs_at(self, k: int, stage: int) -> bool:
        """Whether `stage` runs its outer step after step `k` (1-based)."""
        return (k + self.offset_of(stage)) % self.H == 0 or k == self.ctx.steps

    def _strip(self, params: Trees) -> Trees:
        """The trees that take part in the outer step: without the head's copy of `wte`."""
        last = self.ctx.last_chunk
        if not self.head_copy:
            return dict(params)
        return {**params, last: {k: v for k, v in params[last].items() if k != "wte"}}

    def setup(self, params: Trees) -> None:
        last = self.ctx.last_chunk
        self.head_copy = last > 0 and last in params
        flat, unravel = ravel_pytree(self._strip(params))
        self._ravel = jax.jit(lambda t: ravel_pytree(t)[0])
        self._unravel = jax.jit(unravel)
        self.exchange = Exchange(self.mode, self.codec, self.coll, int(flat.size))
        serves = self.mode == "sharded_ps" or self.coll.rank == 0
        shape = (self.exchange.span_rows, self.exchange.chunk)
        self.outer = jnp.array(flat, jnp.float32)
        self.momentum = jnp.zeros(shape, jnp.float32) if serves else None
        if self._saved is not None:
            saved = self._saved
            self.exchange.load_state(saved)
            self.outer = _load(saved, "outer", self.outer)
            if self.momentum is not None:
                self.momentum = _load(saved, "momentum", self.momentum)

    def _serve(self, mean: jax.Array, first_row: int) -> jax.Array:
        assert self.momentum is not None
        self._momentum_next, delta = outer_step(mean, self.momentum, self.lr, self.mu)
        return delta

    def after_update(self, step: int, params: Trees, opt_state: Any, applied: bool = True) -> tuple[Trees, Any]:
        assert self.exchange is not None and self.outer is not None
        k, stage = step + 1, self.ctx.stage
        self._wire_bytes = 0
        new = dict(params)
        if self.syncs_at(k, stage):
            before = self.coll.sent
            pseudo = _sub(self.outer, self._ravel(self._strip(params)))
            delta = self.exchange.run(pseudo, self._serve)
            self.exchange.commit(True)
            if self.momentum is not None:
                self.momentum = self._momentum_next
            self.outer = _add(self.outer, delta)
            trees = self.ctx.place(self._unravel(self.outer))
            if self.head_copy:  # Until it hears from the first chunk, the head keeps its `wte`.
                last = self.ctx.last_chunk
                wte = trees[0]["wte"] if 0 in trees else params[last]["wte"]
                trees[last] = {**trees[last], "wte": wte}
            new.update(trees)
            self._wire_bytes += self.coll.sent - before
            if 0 in params and self.tied is not None:  # The first chunk's end sends the new `wte`.
                self._send_wte(new[0]["wte"])
        if self.head_copy and 0 not in params and self.syncs_at(k, 0):
            last = self.ctx.last_chunk
            new[last] = {**new[last], "wte": self._recv_wte(params[last]["wte"])}
        return new, opt_state

    # ---- the tied embedding's new values, first chunk -> LM head -----------------------------------
    def _send_wte(self, wte: jax.Array) -> None:
        assert self.tied is not None
        buf = np.ascontiguousarray(np.asarray(wte, np.float32))
        dst = 1 - self.tied.Get_rank()
        net = self.ctx.net
        if net is None:
            self.tied.Send(buf, dest=dst, tag=_TIED_TAG)
        else:
            sends: list[Any] = []
            tied = self.tied
            net.send(self.ctx.tied_peer, buf.nbytes, lambda: sends.append(tied.Isend(buf, dest=dst, tag=_TIED_TAG)))
            net.drain()
            MPI.Request.Waitall(sends)
        self._wire_bytes += buf.nbytes

    def _recv_wte(self, like: jax.Array) -> jax.Array:
        assert self.tied is not None
        buf = np.empty(like.shape, np.float32)
        self.tied.Recv(buf, source=1 - self.tied.Get_rank(), tag=_TIED_TAG)
        return jax.device_put(buf, like.sharding)

    # ---- checkpointed state -----------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        assert self.exchange is not None and self.outer is not None
        out = {"outer": np.asarray(self.outer), **self.exchange.state()}
        if self.momentum is not None:
            out["momentum"] = np.asarray(self.momentum)
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self._saved = state

    def signature(self) -> dict[str, Any]:
        return {"dp_mode": self.name, "grad_codec": self.codec, "dp": self.ctx.size, "H": self.H,
                "diloco_exchange": self.mode, "diloco_stagger": self.stagger,
                "elements": int(self.outer.size) if self.outer is not None else 0}

    def describe(self) -> str:
        return (f"diloco H={self.H} ({self.mode} exchange over {self.coll.name}, {self.codec} pseudo-gradients"
                f"{' with error feedback' if self.codec != 'none' else ''}, outer Nesterov SGD lr {self.lr:g} "
                f"momentum {self.mu:g}{', staggered by stage' if self.stagger else ''})")

    def close(self) -> None:
        self.coll.close()


def _load(saved: dict[str, np.ndarray], key: str, like: jax.Array) -> jax.Array:
    value = saved.get(key)
    if value is None or tuple(value.shape) != tuple(like.shape):
        raise ValueError(f"{key}: saved {None if value is None else value.shape}, need {like.shape}")
    return jax.device_put(jnp.asarray(value, jnp.float32), like.sharding)
