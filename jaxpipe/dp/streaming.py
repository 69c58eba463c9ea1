"""Streaming DiLoCo (`parallel.dp_mode=streaming_diloco`, arXiv 2501.18512): DiLoCo whose outer step is
cut into fragments that sync in turn, each exchange running while the replica computes on.

Fragments: F = `parallel.diloco_fragments`, strided over layers: layer l belongs to fragment l % F
(the embeddings and the final LayerNorm to fragment 0). Strided, as the paper does, rather than a
contiguous block of stages: every pipeline rank holds about 1/F of every fragment, so each fragment's
exchange is spread over all stages' DP links at once (each carries 1/F of its bytes) instead of
loading one stage's link with all of them while the others idle.

Fragment f starts its outer step after the steps k with (k + f·H // F) % H == 0 (H =
`parallel.diloco_inner_steps`): its pseudo-gradient outer_f - local_f goes out (`grad_codec`: int8 /
int4 rows with error feedback; the server sums in float32) and the outer Nesterov step comes back,
on a background thread, while the replica runs the next tau = `parallel.diloco_overlap_steps` inner
steps. After step k + tau the replica merges: local_f <- alpha·local_f + (1 - alpha)·outer_f
(alpha = `parallel.diloco_merge_alpha`; 0 replaces the fragment). The exchanges of one rank run one
at a time, in the order every replica starts them (one worker thread). After the run's last step all
in-flight exchanges are merged and every fragment takes one blocking outer step and is replaced by
it, so a run ends with one model, as DiLoCo's does.

The tied `wte` (fragment 0): the first stage's copy takes part; the rows of the step that came back
which hold it go on to the LM head's stage, which adds them to its outer copy and merges with the
same float32 arithmetic (numpy, on the host, element by element), so both copies stay bit-identical.

Checkpoints: `state()` first waits for the exchanges in flight (their results depend only on what was
sent when they started) and saves each one's result, not yet merged, with the step it merges at; the
LM head's end receives the `wte` rows it is owed. A resume loads them and merges at the same step, so
it continues exactly as the uninterrupted run.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe.comm import quant
from jaxpipe.comm.traffic import NONE, Traffic, Transfer
from jaxpipe.config import Config, ParallelConfig
from jaxpipe.dp.base import DPContext, Trees
from jaxpipe.dp.diloco import DiLoCo, outer_step
from jaxpipe.dp.exchange import PATTERNS, Exchange, padded_rows
from jaxpipe.errors import ConfigError
from jaxpipe.registry import DP_ALGORITHMS


def merge(local: np.ndarray, outer: np.ndarray, alpha: float) -> np.ndarray:
    """alpha·local + (1 - alpha)·outer in float32, element by element (numpy: no fused multiply-add,
    so every end that merges the same values gets the same bits)."""
    a = np.float32(alpha)
    return (local * a + outer * (np.float32(1.0) - a)).astype(np.float32)


def fragment_of_layer(layer: int, fragments: int) -> int:
    return layer % fragments


@DP_ALGORITHMS.register
class StreamingDiLoCo(DiLoCo):
    name = "streaming_diloco"

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        super().validate_config(cfg)
        p = cfg.parallel
        F, H, tau = p.diloco_fragments, p.diloco_inner_steps, p.diloco_overlap_steps
        if p.diloco_stagger:
            raise ConfigError("parallel.diloco_stagger staggers blocking DiLoCo by stage; streaming_diloco already "
                              "syncs its fragments in turn: set parallel.diloco_stagger=false")
        if F < 1 or cfg.model.n_layer < F:
            raise ConfigError(f"parallel.diloco_fragments ({F}) must be between 1 and model.n_layer "
                              f"({cfg.model.n_layer}): fragments are strided layers (layer l in fragment l % F)")
        if not 0 <= tau < H:
            raise ConfigError(f"parallel.diloco_overlap_steps ({tau}) must be at least 0 and below "
                              f"parallel.diloco_inner_steps ({H}): a fragment's exchange must be merged before "
                              f"that fragment's next outer step starts")
        if not 0.0 <= p.diloco_merge_alpha <= 1.0:
            raise ConfigError(f"parallel.diloco_merge_alpha must be between 0 and 1, got {p.diloco_merge_alpha}")

    @classmethod
    def traffic(cls, p: ParallelConfig, n_elements: int, dp: int, wte_elements: int = 0,
                wte_offset: int = 0) -> Traffic:
        """One fragment (about 1/F of the rank's buffer) every H/F steps, hidden behind tau steps."""
        if dp < 2:
            return NONE
        F = max(1, p.diloco_fragments)
        rows = padded_rows(-(-n_elements // F), dp)
        moves = PATTERNS[p.diloco_exchange].transfers(rows, p.grad_codec, dp)
        if wte_elements:  # fragment 0 on the first stage: the wte's step on to the head, once per H
            moves += (Transfer("p2p", padded_rows(wte_elements, 1) * quant.chunk_row_bytes(p.grad_codec) // F),)
        return Traffic(f"streaming_diloco H={p.diloco_inner_steps} F={F} tau={p.diloco_overlap_steps} "
                       f"{p.diloco_exchange}" + (f" + {p.grad_codec}" if p.grad_codec != "none" else ""), moves,
                       every=max(1, p.diloco_inner_steps // F), overlap_steps=p.diloco_overlap_steps, size=dp)

    def __init__(self, ctx: DPContext):
        super().__init__(ctx)
        p = ctx.parallel
        self.F, self.tau, self.alpha = p.diloco_fragments, p.diloco_overlap_steps, p.diloco_merge_alpha
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxpipe-streaming-diloco")
        self.idx: list[np.ndarray] = []
        self.exchanges: list[Exchange] = []
        self.outer_f: list[np.ndarray] = []
        self.momentum_f: list[jax.Array | None] = []
        # In flight: fragment -> (merge step, Future of (new outer, new momentum, bytes sent)).
        self.inflight: dict[int, tuple[int, Future]] = {}
        self.done: dict[int, tuple[int, np.ndarray, Any]] = {}  # drained, not merged: (step, outer, momentum)
        self.wte_owed: tuple[int, np.ndarray] | None = None  # the head's end: (merge step, wte step rows received)
        self._sent_pending = 0

    def fragment_offset(self, f: int) -> int:
        return (f * self.H) // self.F

    def starts_at(self, k: int, f: int) -> bool:
        return (k + self.fragment_offset(f)) % self.H == 0 and k < self.ctx.steps

    def _fragments(self, params: Trees) -> np.ndarray:
        """Per element of this rank's flat buffer (without the head's `wte`), its fragment."""
        out = []
        layers = self.ctx.chunk_layers
        for path, leaf in jax.tree_util.tree_flatten_with_path(self._strip(params))[0]:
            keys = [getattr(k, "key", k) for k in path]
            chunk, top = keys[0], str(keys[1])
            start = layers[chunk].start if chunk in layers else 0
            if top == "blocks":  # stacked [layers of the chunk, ...]
                per = np.array([fragment_of_layer(start + j, self.F) for j in range(leaf.shape[0])])
                out.append(np.repeat(per, leaf.size // leaf.shape[0]))
            elif top.startswith("block_"):
                out.append(np.full(leaf.size, fragment_of_layer(start + int(top.split("_")[1]), self.F)))
            else:
                out.append(np.zeros(leaf.size, np.int64))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def setup(self, params: Trees) -> None:
        saved, self._saved = self._saved, None
        super().setup(params)  # the flat layout, outer copy, head's outer `wte`, and `wte_at`
        assert self.outer is not None
        frag = self._fragments(params)
        outer = np.asarray(self.outer)
        self.idx = [np.nonzero(frag == f)[0] for f in range(self.F)]
        self.exchanges = [Exchange(self.mode, self.codec, self.coll, int(i.size)) for i in self.idx]
        serves = self.mode == "sharded_ps" or self.coll.rank == 0
        self.outer_f = [outer[i].copy() for i in self.idx]
        self.momentum_f = [jnp.zeros((e.span_rows, e.chunk), jnp.float32) if serves else None for e in self.exchanges]
        self.wte_at_f = int(np.searchsorted(self.idx[0], self.wte_at)) if self.idx else 0
        if 0 in params and self.ctx.last_chunk > 0:
            self.wte_size = int(params[0]["wte"].size)
        if saved is not None:
            self._load(saved)

    # ---- the exchange of one fragment, on the worker thread ---------------------------------------------
    def _job(self, f: int, pseudo: np.ndarray, send_wte: int) -> tuple[np.ndarray, Any, int]:
        ex, mom = self.exchanges[f], self.momentum_f[f]
        before = self.coll.sent
        nxt: list[Any] = [mom]

        def serve(mean: jax.Array, first_row: int) -> jax.Array:
            assert mom is not None
            nxt[0], delta = outer_step(mean, mom, self.lr, self.mu)
            return delta

        delta = np.asarray(ex.run(jnp.asarray(pseudo), serve))
        ex.commit(True)
        new_outer = (self.outer_f[f] + delta).astype(np.float32)
        sent = self.coll.sent - before
        if send_wte:  # fragment 0's rows holding `wte` on to the LM head's end (over the emulated link)
            sent += self._send_wte_rows(ex, self.wte_at_f, send_wte)
        return new_outer, nxt[0], sent

    def _recv_rows(self) -> np.ndarray:
        assert self.outer_wte is not None
        return self._recv_wte_step(self.outer_wte)

    def _start(self, k: int, f: int, flat: np.ndarray, first_chunk: bool) -> None:
        pseudo = (self.outer_f[f] - flat[self.idx[f]]).astype(np.float32)
        send = int(self.wte_size) if (f == 0 and first_chunk and self.tied is not None) else 0
        self.inflight[f] = (k + self.tau, self.worker.submit(self._job, f, pseudo, send))

    def _drain(self, f: int) -> tuple[int, np.ndarray, Any]:
        if f in self.inflight:
            at, fut = self.inflight.pop(f)
            new_outer, mom, sent = fut.result()
            self._sent_pending += sent
            self.done[f] = (at, new_outer, mom)
        return self.done[f]

    def _apply(self, f: int, flat: np.ndarray, alpha: float) -> None:
        """Fragment f's finished outer step: the new outer values, merged into the local ones."""
        _, new_outer, mom = self._drain(f)
        del self.done[f]
        self.outer_f[f], self.momentum_f[f] = new_outer, mom
        flat[self.idx[f]] = merge(flat[self.idx[f]], new_outer, alpha)

    def _merge_step(self, f: int) -> int:
        return self.inflight[f][0] if f in self.inflight else self.done[f][0]

    def _head_merges(self, k: int) -> bool:
        """The LM head's end: whether fragment 0's outer step (started tau steps earlier) merges after k."""
        return k - self.tau >= 1 and self.starts_at(k - self.tau, 0)

    def after_update(self, step: int, params: Trees, opt_state: Any, applied: bool = True) -> tuple[Trees, Any]:
        assert self.outer is not None
        k = self._step_done = step + 1
        self._wire_bytes = 0
        first_chunk = 0 in params
        head_end = self.head_copy and not first_chunk
        last = k == self.ctx.steps
        merges = sorted(f for f in set(self.inflight) | set(self.done) if last or self._merge_step(f) == k)
        starts = [f for f in range(self.F) if self.starts_at(k, f)]
        head_merge = head_end and (self._head_merges(k) or (last and self.wte_owed is not None))
        if not (merges or starts or last or head_merge):
            return params, opt_state
        flat = np.array(self._ravel(self._strip(params)), np.float32)
        for f in merges:
            self._apply(f, flat, self.alpha)
        head_wte = np.array(params[self.ctx.last_chunk]["wte"], np.float32) if head_end else None
        if head_merge:
            assert self.outer_wte is not None and head_wte is not None
            self.outer_wte = (self.outer_wte + self._owed_rows(k)).astype(np.float32)
            head_wte = merge(head_wte, self.outer_wte, self.alpha)
        if last:  # one blocking outer step of every fragment; every replica continues from (ends with) it
            for f in range(self.F):
                self._start(k, f, flat, first_chunk)
                self._apply(f, flat, 0.0)
            if head_end:
                assert self.outer_wte is not None
                self.outer_wte = (self.outer_wte + self._recv_rows()).astype(np.float32)
                head_wte = self.outer_wte.copy()
        else:
            for f in starts:
                self._start(k, f, flat, first_chunk)
        new = dict(params)
        if merges or last:
            trees = self.ctx.place(self._unravel(jnp.asarray(flat)))
            if self.head_copy:
                lastc = self.ctx.last_chunk
                # gpipe_ring's one rank with both chunks: a buffer of its own (updates donate each copy).
                wte = jnp.copy(trees[0]["wte"]) if 0 in trees else params[lastc]["wte"]
                trees[lastc] = {**trees[lastc], "wte": wte}
            new.update(trees)
        if head_end and (head_merge or last):
            assert head_wte is not None
            lastc = self.ctx.last_chunk
            new[lastc] = {**new[lastc], "wte": jax.device_put(head_wte, params[lastc]["wte"].sharding)}
        self._wire_bytes, self._sent_pending = self._sent_pending, 0
        return new, opt_state

    # ---- the LM head's copy of `wte` ---------------------------------------------------------------------
    _step_done = 0
    wte_size = 0

    def _owed_rows(self, k: int) -> np.ndarray:
        """The wte step rows merging after step k: received early (a checkpoint), or now."""
        if self.wte_owed is not None:
            rows, self.wte_owed = self.wte_owed[1], None
            return rows
        return self._recv_rows()

    def _owed_at(self) -> int:
        """The head's end: the step its `wte` merges after, if fragment 0's exchange is in flight (0: none)."""
        k = self._step_done
        for j in range(max(1, k - self.tau + 1), k + 1):
            if self.starts_at(j, 0) and j + self.tau > k:
                return j + self.tau
        return 0

    # ---- checkpointed state ----------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for f in range(self.F):
            if f in self.inflight or f in self.done:
                at, new_outer, mom = self._drain(f)
                out[f"pending{f}_at"] = np.array(at, np.int64)
                out[f"pending{f}_outer"] = new_outer
                if mom is not None:
                    out[f"pending{f}_momentum"] = np.asarray(mom)
            out[f"outer{f}"] = self.outer_f[f]
            if self.momentum_f[f] is not None:
                out[f"momentum{f}"] = np.asarray(self.momentum_f[f])
            out.update({f"{k}{f}": v for k, v in self.exchanges[f].state().items()})
        if self.outer_wte is not None:
            out["outer_wte"] = np.asarray(self.outer_wte)
            owed_at = self._owed_at() if self.head_copy else 0
            if owed_at and self.wte_owed is None:  # fragment 0's step is in flight: receive it now
                self.wte_owed = (owed_at, self._recv_rows())
            if self.wte_owed is not None:
                out["owed_at"] = np.array(self.wte_owed[0], np.int64)
                out["owed_rows"] = self.wte_owed[1]
        return out

    def _load(self, saved: dict[str, np.ndarray]) -> None:
        for f in range(self.F):
            self.outer_f[f] = _need(saved, f"outer{f}", self.outer_f[f].shape)
            if self.momentum_f[f] is not None:
                m = _need(saved, f"momentum{f}", tuple(self.momentum_f[f].shape))  # type: ignore[union-attr]
                self.momentum_f[f] = jnp.asarray(m)
            self.exchanges[f].load_state({k: saved[f"{k}{f}"] for k in ("residue_up", "residue_down")
                                          if f"{k}{f}" in saved})
            if f"pending{f}_at" in saved:
                mom = jnp.asarray(saved[f"pending{f}_momentum"]) if f"pending{f}_momentum" in saved else None
                self.done[f] = (int(saved[f"pending{f}_at"]), np.asarray(saved[f"pending{f}_outer"], np.float32), mom)
        if self.outer_wte is not None:
            self.outer_wte = _need(saved, "outer_wte", self.outer_wte.shape)
            if "owed_at" in saved:
                self.wte_owed = (int(saved["owed_at"]), np.asarray(saved["owed_rows"], np.float32))

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self._saved = state

    def signature(self) -> dict[str, Any]:
        return {**super().signature(), "fragments": self.F, "tau": self.tau, "alpha": self.alpha}

    def describe(self) -> str:
        return (f"streaming_diloco H={self.H}, {self.F} fragments (strided layers), exchange overlapped with "
                f"{self.tau} steps, merge alpha {self.alpha:g} ({self.mode} over {self.coll.name}, {self.codec} "
                f"pseudo-gradients, outer Nesterov SGD lr {self.lr:g} momentum {self.mu:g})")

    def close(self) -> None:
        self.worker.shutdown(wait=True)
        super().close()


def _need(saved: dict[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    value = saved.get(key)
    if value is None or tuple(value.shape) != tuple(shape):
        raise ValueError(f"{key}: saved {None if value is None else value.shape}, need {shape}")
    return np.asarray(value, np.float32).copy()
