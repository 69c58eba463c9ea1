"""DiLoCo (`parallel.dp_mode=diloco`): replicas train apart and meet every H steps.

Each replica runs `parallel.diloco_inner_steps` (H) ordinary steps with its own AdamW on its own
data, with no data-parallel traffic at all. Then, per stage, the replicas' pseudo-gradients
(outer parameters - local parameters) go to the stage's parameter server — DP rank 0, the
original's central PS, or every member for its 1/D with `parallel.diloco_exchange=sharded_ps` —
which averages them in float32 and applies the outer optimizer, SGD with Nesterov momentum
(`diloco_outer_lr` 1.0, `diloco_outer_momentum` 0.0 by default: plain averaging, the best setting of the
sweep in BENCHMARKS.md "DiLoCo outer settings"; the DiLoCo paper's 0.7 / 0.9 lost 10-19 points more there):

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
takes part in the outer step; the rows of the step that came back which cover `wte` go on to the
other end over the tied communicator, as they came (quantised by the codec), and that end adds
them to its copy of the outer `wte` as the first stage does, so both copies stay bit-identical
whatever the codec.

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

from jaxpipe.comm import quant
from jaxpipe.comm.traffic import NONE, Traffic, Transfer
from jaxpipe.config import Config, ParallelConfig
from jaxpipe.dp.base import DataParallel, DPContext, Trees
from jaxpipe.dp.exchange import PATTERNS, Exchange, padded_rows
from jaxpipe.errors import ConfigError
from jaxpipe.registry import DP_ALGORITHMS

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


@DP_ALGORITHMS.register
class DiLoCo(DataParallel):
    name = "diloco"
    syncs_every_step = False
    per_replica_params = True
    lossy = True

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        super().validate_config(cfg)
        p = cfg.parallel
        if isinstance(p.dp, int) and p.dp < 2:
            raise ConfigError(f"parallel.dp_mode={cls.name} needs parallel.dp >= 2: DiLoCo's outer step averages "
                              f"replicas, and parallel.dp is {p.dp} (raise parallel.dp, or use "
                              f"parallel.dp_mode=central_ps)")
        if p.diloco_exchange not in PATTERNS or not PATTERNS[p.diloco_exchange].sends_back:
            raise ConfigError(f"parallel.diloco_exchange: {p.diloco_exchange!r} is not one of central_ps, sharded_ps")

    @classmethod
    def traffic(cls, p: ParallelConfig, n_elements: int, dp: int, wte_elements: int = 0,
                wte_offset: int = 0) -> Traffic:
        """The outer step's exchange every H steps on the step's critical path, plus on the first stage
        the step of the tied `wte` sent on to the LM head's stage (as it came back: coded)."""
        if dp < 2:
            return NONE
        rows = padded_rows(n_elements, dp)
        moves = PATTERNS[p.diloco_exchange].transfers(rows, p.grad_codec, dp)
        if wte_elements:
            # The rows holding `wte` (elements wte_offset.. of the buffer), whole rows as they came back.
            rows_wte = -(-(wte_offset % quant.CHUNK + wte_elements) // quant.CHUNK)
            moves += (Transfer("p2p", rows_wte * quant.chunk_row_bytes(p.grad_codec)),)
        return Traffic(f"diloco H={p.diloco_inner_steps} {p.diloco_exchange}"
                       + (f" + {p.grad_codec}" if p.grad_codec != "none" else ""), moves,
                       every=p.diloco_inner_steps, size=dp)

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
        self.outer_wte: np.ndarray | None = None  # that copy's outer values (a rank without chunk 0), on the host
        self.wte_at = 0  # where chunk 0's `wte` starts in this rank's flat buffer

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
        self.head_copy = last > 0 and last in params and "wte" in params[last]  # (an untied head has none)
        flat, unravel = ravel_pytree(self._strip(params))
        self._ravel = jax.jit(lambda t: ravel_pytree(t)[0])
        self._unravel = jax.jit(unravel)
        self.exchange = Exchange(self.mode, self.codec, self.coll, int(flat.size))
        serves = self.mode == "sharded_ps" or self.coll.rank == 0
        shape = (self.exchange.span_rows, self.exchange.chunk)
        self.outer = jnp.array(flat, jnp.float32, copy=True)
        if 0 in params and self.ctx.last_chunk > 0:  # Where ravel_pytree puts chunk 0's `wte`.
            at = 0
            for path, leaf in jax.tree_util.tree_flatten_with_path(self._strip(params))[0]:
                if [getattr(k, "key", k) for k in path] == [0, "wte"]:
                    break
                at += leaf.size
            self.wte_at = at
        if self.head_copy and 0 not in params:
            self.outer_wte = np.array(params[self.ctx.last_chunk]["wte"], np.float32)
        self.momentum = jnp.zeros(shape, jnp.float32) if serves else None
        if self._saved is not None:
            saved = self._saved
            self.exchange.load_state(saved)
            self.outer = _load(saved, "outer", self.outer)
            if self.momentum is not None:
                self.momentum = _load(saved, "momentum", self.momentum)
            if self.outer_wte is not None:
                self.outer_wte = np.asarray(_load(saved, "outer_wte", jnp.asarray(self.outer_wte))).copy()

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
                # Both chunks on one rank (gpipe_ring): the same values in a buffer of its own, as the
                # optimizer's update donates each chunk's parameters (one buffer twice is refused).
                wte = jnp.copy(trees[0]["wte"]) if 0 in trees else params[last]["wte"]
                trees[last] = {**trees[last], "wte": wte}
            new.update(trees)
            self._wire_bytes += self.coll.sent - before
            if 0 in params and self.tied is not None:  # The first chunk's end sends the step of `wte`.
                self._send_wte_step(params[0]["wte"].size)
        if self.head_copy and 0 not in params and self.syncs_at(k, 0):
            assert self.outer_wte is not None
            last = self.ctx.last_chunk
            # The same float32 addition as the first stage's (outer + step), on the host.
            self.outer_wte = self.outer_wte + self._recv_wte_step(self.outer_wte)
            new[last] = {**new[last], "wte": jax.device_put(self.outer_wte.copy(), params[last]["wte"].sharding)}
        return new, opt_state

    # ---- the tied embedding's outer step, first chunk -> LM head ----------------------------------
    def _send_wte_step(self, size: int) -> None:
        assert self.exchange is not None
        self._wire_bytes += self._send_wte_rows(self.exchange, self.wte_at, size)

    def _send_wte_rows(self, ex: Exchange, at: int, size: int) -> int:
        """The rows of `ex`'s last result which hold `wte` (elements at.. of its buffer), as they came
        back (coded), to the LM head's end, over the emulated link when there is one (waiting for these
        sends only: Streaming DiLoCo calls this on its exchange thread). Returns the bytes sent."""
        assert self.tied is not None and ex.back is not None
        chunk = ex.chunk
        first, stop = at // chunk, -(-(at + size) // chunk)
        head = np.array([at - first * chunk, stop - first], np.int64)
        rows = np.ascontiguousarray(np.asarray(ex.back[first:stop]))
        dst, net, tied = 1 - self.tied.Get_rank(), self.ctx.net, self.tied
        if net is None:
            tied.Send(head, dest=dst, tag=_TIED_TAG)
            tied.Send(rows, dest=dst, tag=_TIED_TAG + 1)
        else:
            sends: list[Any] = []
            net.send(self.ctx.tied_peer, rows.nbytes, lambda: sends.extend(
                [tied.Isend(head, dest=dst, tag=_TIED_TAG), tied.Isend(rows, dest=dst, tag=_TIED_TAG + 1)]),
                owner=self)
            net.drain(owner=self)
            MPI.Request.Waitall(sends)
        return int(rows.nbytes)

    def _recv_wte_step(self, like: np.ndarray) -> np.ndarray:
        """The LM head's end: the `wte` rows the first stage's end sends (`_send_wte_rows`), decoded."""
        assert self.tied is not None
        src = 1 - self.tied.Get_rank()
        head = np.empty(2, np.int64)
        self.tied.Recv(head, source=src, tag=_TIED_TAG)
        offset, n_rows = int(head[0]), int(head[1])
        codec = self.codec
        rows = np.empty((n_rows, quant.chunk_row_bytes(codec)), np.uint8)
        self.tied.Recv(rows, source=src, tag=_TIED_TAG + 1)
        step = np.asarray(quant.decode_chunks(jnp.asarray(rows), codec)).reshape(-1)[offset: offset + like.size]
        return step.reshape(like.shape)

    # ---- checkpointed state -----------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        assert self.exchange is not None and self.outer is not None
        out = {"outer": np.asarray(self.outer), **self.exchange.state()}
        if self.outer_wte is not None:
            out["outer_wte"] = np.asarray(self.outer_wte)
        if self.momentum is not None:
            out["momentum"] = np.asarray(self.momentum)
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self._saved = state

    def signature(self) -> dict[str, Any]:
        return {"dp_mode": self.name, "grad_codec": self.codec, "dp": self.ctx.size, "H": self.H,
                "diloco_exchange": self.mode, "diloco_stagger": self.stagger}

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
