"""Pipeline schedules as data: one action IR, the schedules written over it, and the one pass that
lowers them to what the executor runs.

A schedule emits, for each pipeline rank, the ordered *compute* actions of one step. An action
names the model chunk (virtual stage), the micro-batch and the computation (`Op`); what each
computation consumes and produces is stated once, in `CONSUMES` / `PRODUCES`, never implied by a
position in the list. The model is cut into `n_ranks × virtual_stages` chunks, chunk c on rank
c mod P.

The schedules a config can name (`parallel.schedule`) register themselves in
`jaxpipe.registry.SCHEDULES`; each checks the settings it reads (`check_settings`, which
`config.validate` runs through `validate_config`) and builds itself from them (`build`), so adding
one is one class here and nothing elsewhere.

`lower` adds what crosses between ranks: a receive before every action whose input lives on
another rank, a send after every action whose output another rank consumes (a neighbouring chunk
on the same rank hands its value over in memory). Everything else works on its output:
`jaxpipe.pipeline.executor` runs it, `check` validates it in linear time (printing the per-rank
grid with the offending action marked), `jaxpipe.pipeline.costmodel` simulates it, evaluation
runs the forward-only schedule through the same executor, and `format_grid` prints it. No other
module works out what an action receives or sends. `Action.from_str` and `parse_actions` read the
printed form back (`"1F0 1F1 0B0"`), so orders are written as they print.

Computations:
- `F`   forward of a chunk, keeping what its backward needs;
- `B`   full backward (input and weight gradients) from those residuals;
- `I`   input-gradient half of the backward (zero-bubble's "B"), keeping what `W` needs;
- `W`   weight-gradient half, from what `I` kept (no second forward);
- `L`   the last chunk's forward + loss + full backward, fused in one program;
- `LI`  the last chunk's forward + loss + input gradient (its `W` comes later);
- `E`   forward only (evaluation), keeping nothing; `EL` the last chunk's forward + loss.
"""

from __future__ import annotations

import enum
import re
from abc import ABC, abstractmethod
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import TYPE_CHECKING, ClassVar

from jaxpipe.comm.message import Kind
from jaxpipe.errors import ConfigError
from jaxpipe.registry import SCHEDULES

if TYPE_CHECKING:
    from jaxpipe.config import Config


class Op(enum.Enum):
    F = "F"
    B = "B"
    I = "I"
    W = "W"
    L = "L"
    LI = "LI"
    E = "E"
    EL = "EL"
    # Added by `lower`:
    RECV_ACT = "recv-act"  # the chunk's input activation, from the rank of chunk - 1
    SEND_ACT = "send-act"  # the chunk's output activation, to the rank of chunk + 1
    RECV_GRAD = "recv-grad"  # the gradient of the chunk's output, from the rank of chunk + 1
    SEND_GRAD = "send-grad"  # the gradient of the chunk's input, to the rank of chunk - 1

    @property
    def is_comm(self) -> bool:
        return self in _COMM


_COMM = {Op.RECV_ACT, Op.SEND_ACT, Op.RECV_GRAD, Op.SEND_GRAD}
# What each computation consumes from a neighbouring chunk and produces for one (the first chunk's
# input is tokens, the last chunk's output gradient is the loss's: those need no message).
CONSUMES: dict[Op, Kind | None] = {Op.F: Kind.ACT, Op.B: Kind.GRAD, Op.I: Kind.GRAD, Op.W: None, Op.L: Kind.ACT,
                                   Op.LI: Kind.ACT, Op.E: Kind.ACT, Op.EL: Kind.ACT}
PRODUCES: dict[Op, Kind | None] = {Op.F: Kind.ACT, Op.B: Kind.GRAD, Op.I: Kind.GRAD, Op.W: None, Op.L: Kind.GRAD,
                                   Op.LI: Kind.GRAD, Op.E: Kind.ACT, Op.EL: None}
LAST_CHUNK_ONLY = {Op.L, Op.LI, Op.EL}  # they compute the loss
NOT_LAST_CHUNK = {Op.F, Op.B, Op.I, Op.E}  # they need a chunk after them
# The complete ways to run one micro-batch through one chunk.
TRAINING_LIFECYCLES = ({Op.F: 1, Op.B: 1}, {Op.F: 1, Op.I: 1, Op.W: 1}, {Op.L: 1}, {Op.LI: 1, Op.W: 1})
EVAL_LIFECYCLES = ({Op.E: 1}, {Op.EL: 1})


@dataclass(frozen=True)
class Action:
    op: Op
    chunk: int
    microbatch: int
    peer: int | None = None  # communication actions: the other pipeline rank

    def __str__(self) -> str:
        if self.op.is_comm:
            arrow = "<" if self.op in (Op.RECV_ACT, Op.RECV_GRAD) else ">"
            what = "a" if self.op in (Op.RECV_ACT, Op.SEND_ACT) else "g"
            return f"{self.chunk}{what}{self.microbatch}{arrow}{self.peer}"
        return f"{self.chunk}{self.op.value}{self.microbatch}"

    @classmethod
    def from_str(cls, text: str) -> Action:
        """The action `str` printed: `1F0` (compute), `0a3>1` / `1g3<2` (send / receive)."""
        if m := _COMPUTE_RE.fullmatch(text):
            return cls(Op(m[2]), int(m[1]), int(m[3]))
        if m := _COMM_RE.fullmatch(text):
            op = {("a", "<"): Op.RECV_ACT, ("a", ">"): Op.SEND_ACT, ("g", "<"): Op.RECV_GRAD,
                  ("g", ">"): Op.SEND_GRAD}[(m[2], m[4])]
            return cls(op, int(m[1]), int(m[3]), int(m[5]))
        raise ValueError(f"{text!r} is not an action: write chunk, computation, micro-batch (e.g. 1F0, 2LI3) or "
                         f"chunk, a/g, micro-batch, </>, peer (e.g. 0a3>1)")

    def describe(self, chunk: bool = True) -> str:
        """The action in the failure messages' words."""
        what = {Op.F: "forward", Op.B: "backward", Op.I: "input-gradient backward", Op.W: "weight-gradient backward",
                Op.L: "forward", Op.LI: "forward", Op.E: "evaluation forward", Op.EL: "evaluation forward",
                Op.RECV_ACT: "receive of the activation", Op.RECV_GRAD: "receive of the gradient",
                Op.SEND_ACT: "send of the activation", Op.SEND_GRAD: "send of the gradient"}[self.op]
        return f"{what} of micro-batch {self.microbatch}" + (f" on chunk {self.chunk}" if chunk else "")

    def message(self) -> tuple[Kind, int, int]:
        """(kind, receiving chunk, micro-batch) of the message a communication action moves: the
        identity a send and its receive share."""
        if self.op == Op.RECV_ACT:
            return Kind.ACT, self.chunk, self.microbatch
        if self.op == Op.SEND_ACT:
            return Kind.ACT, self.chunk + 1, self.microbatch
        if self.op == Op.RECV_GRAD:
            return Kind.GRAD, self.chunk, self.microbatch
        if self.op == Op.SEND_GRAD:
            return Kind.GRAD, self.chunk - 1, self.microbatch
        raise ValueError(f"{self} moves no message")


_COMPUTE_RE = re.compile(r"(\d+)(LI|EL|F|B|I|W|L|E)(\d+)")
_COMM_RE = re.compile(r"(\d+)([ag])(\d+)([<>])(\d+)")


def parse_actions(text: str) -> list[Action]:
    """One rank's actions as `format_grid` prints them, separated by spaces: `"1F0 1F1 0B0"`."""
    return [Action.from_str(word) for word in text.split()]


class ScheduleError(ValueError):
    """A schedule that would deadlock, mix up messages or leave work undone; the message holds the
    per-rank grid with the offending action marked."""


# ---- Schedules -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule(ABC):
    """`n_ranks` pipeline ranks, `n_microbatches` per step, `virtual_stages` chunks per rank, chunk c
    on rank c mod `n_ranks`.

    A schedule a config can name is registered (`@SCHEDULES.register`) under its `name`; its
    `check_settings` holds the rules of the settings it reads, and `build` makes it from them."""

    n_ranks: int
    n_microbatches: int
    virtual_stages: int = 1
    name: ClassVar[str] = "?"
    forward_only: ClassVar[bool] = False

    # ---- from settings (the registry's side) ----

    @classmethod
    def check_settings(cls, n_ranks: int, n_microbatches: int | None, extra_warmup: int = 0,
                       virtual_stages: int = 1) -> None:
        """Raises ConfigError, saying what to change, unless this schedule can run these settings
        (`n_microbatches` None: not known yet, parallel.dp=auto). The base rules: one chunk per rank,
        no extra warm-up; a schedule that reads either setting overrides this."""
        if extra_warmup < 0:
            raise ConfigError(f"parallel.extra_warmup must be 0 or more, got {extra_warmup}")
        if extra_warmup:
            raise ConfigError(f"parallel.extra_warmup ({extra_warmup}) applies to parallel.schedule=1f1b only "
                              f"(got {cls.name}): set it to 0 or use 1f1b")
        if virtual_stages != 1:
            raise ConfigError(f"parallel.virtual_stages={virtual_stages} needs a schedule over several chunks per "
                              f"rank (interleaved_1f1b); {cls.name} runs one chunk per rank")

    @classmethod
    def build(cls, n_ranks: int, n_microbatches: int, extra_warmup: int = 0, virtual_stages: int = 1) -> Schedule:
        """This schedule for these settings, once `check_settings` accepts them."""
        cls.check_settings(n_ranks, n_microbatches, extra_warmup, virtual_stages)
        return cls(n_ranks, n_microbatches, virtual_stages)

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """`check_settings` on a config's parallel.pp, micro-batches per replica, parallel.extra_warmup
        and parallel.virtual_stages (config.validate calls it for the class parallel.schedule names)."""
        p = cfg.parallel
        m = cfg.num_microbatches if isinstance(p.dp, int) else None
        cls.check_settings(p.pp, m, p.extra_warmup, p.virtual_stages)

    @classmethod
    def from_config(cls, cfg: Config, n_microbatches: int | None = None) -> Schedule:
        """The schedule a config runs (`n_microbatches`: per replica, by default the config's)."""
        p = cfg.parallel
        return cls.build(p.pp, n_microbatches or cfg.num_microbatches, p.extra_warmup, p.virtual_stages)

    @classmethod
    def ideal_bubble(cls, n_ranks: int, n_microbatches: int, virtual_stages: int = 1) -> float:
        """The busiest rank's idle time over its compute with free links, every chunk of a rank
        taking 1/v of the work with F, I and W one unit each, for M a multiple of P: the figure
        the schedule is chosen for (docs/training.md's table; the tests hold it to it)."""
        return (n_ranks - 1) / n_microbatches

    # ---- the order ----

    @property
    def n_chunks(self) -> int:
        return self.n_ranks * self.virtual_stages

    def rank_of(self, chunk: int) -> int:
        return chunk % self.n_ranks

    def chunks_of(self, rank: int) -> list[int]:
        return [c for c in range(self.n_chunks) if self.rank_of(c) == rank]

    @abstractmethod
    def actions(self, rank: int) -> list[Action]:
        """The compute actions of `rank` for one step, in execution order."""

    def lowered(self) -> Lowered:
        return lower(self)

    def uses(self, chunk: int, ops: set[Op]) -> bool:
        return any(a.op in ops for a in self.actions(self.rank_of(chunk)) if a.chunk == chunk)

    def describe(self) -> str:
        v = f", {self.virtual_stages} chunks per rank" if self.virtual_stages > 1 else ""
        return f"{self.name} ({self.n_ranks} ranks, {self.n_microbatches} micro-batches{v})"

    def _last(self, chunk: int) -> bool:
        return chunk == self.n_chunks - 1


@SCHEDULES.register
@dataclass(frozen=True)
class GPipe(Schedule):
    """All forwards, then all backwards, both in micro-batch order (GPipe; the original's default).

    Backwards in forward order because the fused last chunk produces gradients in that order: the
    first gradient a rank needs is the first one that exists."""

    name: ClassVar[str] = "gpipe"

    def actions(self, rank: int) -> list[Action]:
        m = range(self.n_microbatches)
        (c,) = self.chunks_of(rank)
        if self._last(c):
            return [Action(Op.L, c, i) for i in m]
        return [Action(Op.F, c, i) for i in m] + [Action(Op.B, c, i) for i in m]


@SCHEDULES.register
@dataclass(frozen=True)
class OneFOneB(Schedule):
    """PipeDream-flush 1F1B: P-1-r warm-up forwards, then alternate one forward and one backward.

    Same bubble as GPipe but at most P-r micro-batches of activations alive per rank, and both
    directions of a link busy at once. Plain 1F1B exposes the link: in steady state rank r+1 waits,
    every micro-batch, for a gradient to travel to r, r's backward, r's next forward and that
    activation to travel back (two message latencies per micro-batch). `extra_warmup` more warm-up
    forwards keep that many activations queued ahead at every rank, hiding latencies up to about
    `extra_warmup` micro-batches of compute, for that many more activations held per rank."""

    extra_warmup: int = 0
    name: ClassVar[str] = "1f1b"

    @classmethod
    def check_settings(cls, n_ranks: int, n_microbatches: int | None, extra_warmup: int = 0,
                       virtual_stages: int = 1) -> None:
        # Any number of extra warm-up forwards (the base refuses a negative one); the rest as the base.
        super().check_settings(n_ranks, n_microbatches, min(extra_warmup, 0), virtual_stages)

    @classmethod
    def build(cls, n_ranks: int, n_microbatches: int, extra_warmup: int = 0, virtual_stages: int = 1) -> Schedule:
        cls.check_settings(n_ranks, n_microbatches, extra_warmup, virtual_stages)
        return cls(n_ranks, n_microbatches, 1, extra_warmup)

    def actions(self, rank: int) -> list[Action]:
        (c,) = self.chunks_of(rank)
        m = self.n_microbatches
        if self._last(c):
            return [Action(Op.L, c, i) for i in range(m)]
        warmup = min(self.n_ranks - 1 - rank + self.extra_warmup, m)
        return _one_f_one_b([(c, i) for i in range(m)], [(c, i) for i in range(m)], warmup, lambda _: False)


def _one_f_one_b(fwd: Sequence[tuple[int, int]], bwd: Sequence[tuple[int, int]], warmup: int,
                 fused: Callable[[int], bool]) -> list[Action]:
    """`warmup` forwards, then one forward and one backward in turn, then the remaining backwards.
    A chunk for which `fused` holds runs its forward as `L`; its backward slots stay in the order
    and run nothing, so every other backward keeps the place the unfused order gives it."""
    out = [Action(Op.L if fused(c) else Op.F, c, i) for c, i in fwd[:warmup]]
    f, b = warmup, 0
    while f < len(fwd) or b < len(bwd):
        if f < len(fwd):
            c, i = fwd[f]
            out.append(Action(Op.L if fused(c) else Op.F, c, i))
            f += 1
        if b < len(bwd):
            if not fused(bwd[b][0]):
                out.append(Action(Op.B, *bwd[b]))
            b += 1
    return out


@SCHEDULES.register
@dataclass(frozen=True)
class Interleaved1F1B(Schedule):
    """Megatron-LM's interleaved 1F1B over v chunks per rank (looped: chunk c on rank c mod P).

    Micro-batches go in rounds of P: within a round a rank runs each of its chunks' forwards in
    chunk order (backwards in reverse chunk order), so the bubble shrinks to (P-1)/(v·M) at v
    times the messages. Warm-up: 2(P-1-r) + (v-1)·P forwards. The last chunk runs fused (`L`), so
    its backward slots run nothing. Needs at least P micro-batches. With M a multiple of P this is
    Megatron's order; with a last round shorter than P, ranks whose next backward would wait for
    a forward they have not run get one more warm-up forward at a time until the order cannot
    deadlock (the same walk `check` uses), which holds a few more activations there."""

    name: ClassVar[str] = "interleaved_1f1b"

    @classmethod
    def check_settings(cls, n_ranks: int, n_microbatches: int | None, extra_warmup: int = 0,
                       virtual_stages: int = 1) -> None:
        super().check_settings(n_ranks, n_microbatches, extra_warmup, 1)
        if virtual_stages < 2:
            raise ConfigError("parallel.schedule=interleaved_1f1b needs parallel.virtual_stages >= 2 (model chunks "
                              "per rank); with one chunk per rank use 1f1b")
        if n_microbatches is not None and n_microbatches < n_ranks:
            raise ConfigError(f"parallel.schedule=interleaved_1f1b needs at least parallel.pp = {n_ranks} "
                              f"micro-batches per replica, got {n_microbatches}: raise train.global_batch_size or "
                              f"lower train.micro_batch_size")

    @classmethod
    def ideal_bubble(cls, n_ranks: int, n_microbatches: int, virtual_stages: int = 1) -> float:
        return (n_ranks - 1) / (virtual_stages * n_microbatches)

    def actions(self, rank: int) -> list[Action]:
        return list(_interleaved_orders(self.n_ranks, self.n_microbatches, self.virtual_stages)[rank])


@dataclass(frozen=True)
class Explicit(Schedule):
    """A schedule given as its per-rank action lists (tests, and orders computed elsewhere)."""

    orders: tuple[tuple[Action, ...], ...] = ()
    name: ClassVar[str] = "explicit"

    @classmethod
    def parse(cls, n_microbatches: int, ranks: Sequence[str], virtual_stages: int = 1) -> Explicit:
        """From each rank's order as it prints: `Explicit.parse(2, ["0F0 0F1 0B0 0B1", "1L0 1L1"])`."""
        return cls(len(ranks), n_microbatches, virtual_stages, tuple(tuple(parse_actions(r)) for r in ranks))

    def actions(self, rank: int) -> list[Action]:
        return list(self.orders[rank])


@cache
def _interleaved_orders(P: int, M: int, v: int) -> tuple[tuple[Action, ...], ...]:
    rounds = [list(range(s, min(s + P, M))) for s in range(0, M, P)]
    last = v * P - 1
    fwd = [[(j * P + r, i) for rnd in rounds for j in range(v) for i in rnd] for r in range(P)]
    bwd = [[(j * P + r, i) for rnd in rounds for j in reversed(range(v)) for i in rnd] for r in range(P)]
    warmup = [min(2 * (P - 1 - r) + (v - 1) * P, v * M) for r in range(P)]
    while True:
        orders = tuple(tuple(_one_f_one_b(fwd[r], bwd[r], warmup[r], lambda c: c == last)) for r in range(P))
        try:
            walk(lower(Explicit(P, M, v, orders)), lambda r, a, t: t, lambda r, a, t: t)
            return orders
        except Deadlock as e:
            grown = [r for r in e.blocked if warmup[r] < v * M]
            if not grown:  # all forwards first cannot deadlock; unreachable
                raise
            for r in grown:
                warmup[r] += 1


@SCHEDULES.register
@dataclass(frozen=True)
class ZeroBubbleH1(Schedule):
    """Zero-bubble ZB-H1 (Qi et al., 2023): the backward split into I (input gradient, which the
    previous rank waits for) and W (weight gradient, which nobody waits for); W actions move into
    the bubbles, so with equal F, I and W times the bubble falls from 1F1B's (P-1)/M to
    (P-1)/(3M).

    The order is the one a greedy list scheduler finds with equal unit times (the last rank's fused
    forward + loss + input gradient `LI` counting two): each rank runs, whenever it is free, the
    input gradient that has arrived, else the next forward, else a pending W. Activation memory is
    1F1B's: at most P-r micro-batches between their F and their I on rank r; a W may wait behind
    up to P-1 later micro-batches, holding only what W needs (the inputs of the weight matmuls and
    the gradients of their outputs)."""

    name: ClassVar[str] = "zb_h1"

    @classmethod
    def ideal_bubble(cls, n_ranks: int, n_microbatches: int, virtual_stages: int = 1) -> float:
        return (n_ranks - 1) / (3 * n_microbatches)

    def actions(self, rank: int) -> list[Action]:
        return list(_zb_h1_orders(self.n_ranks, self.n_microbatches)[rank])


@cache  # every rank's order comes out of one greedy run: run it once, not once per rank
def _zb_h1_orders(P: int, M: int) -> tuple[tuple[Action, ...], ...]:
    clock, orders = [0] * P, [[] for _ in range(P)]  # type: list[int], list[list[Action]]
    act = {(0, m): 0 for m in range(M)}  # (rank, micro-batch) -> when its input activation is there
    grad: dict[tuple[int, int], int] = {}
    nf, ni, nw = [0] * P, [0] * P, [0] * P
    while any(n < M for n in nw):
        best: tuple[int, int, int, Op] | None = None
        for r in range(P):
            if nw[r] == M:
                continue
            last = r == P - 1
            options = []
            may_forward = nf[r] < M and nf[r] - ni[r] < P - r and nf[r] - nw[r] < 2 * P - r - 1
            if may_forward and (r, nf[r]) in act:
                options.append((max(clock[r], act[(r, nf[r])]), 0 if last else 1, Op.LI if last else Op.F))
            if not last and ni[r] < nf[r] and (r, ni[r]) in grad:
                options.append((max(clock[r], grad[(r, ni[r])]), 0, Op.I))
            if nw[r] < ni[r]:
                options.append((clock[r], 2, Op.W))
            if options:
                start, prio, op = min(options, key=lambda o: (o[0], o[1]))
                if best is None or (start, r) < (best[0], best[1]):
                    best = (start, r, prio, op)
        assert best is not None
        start, r, _, op = best
        if op in (Op.F, Op.LI):
            m = nf[r]
            nf[r] += 1
            if op == Op.LI:
                ni[r] += 1
        elif op == Op.I:
            m = ni[r]
            ni[r] += 1
        else:
            m = nw[r]
            nw[r] += 1
        end = start + (2 if op == Op.LI else 1)
        if op == Op.F:
            act[(r + 1, m)] = end
        elif op in (Op.I, Op.LI) and r > 0:
            grad[(r - 1, m)] = end
        clock[r] = end
        orders[r].append(Action(op, r, m))
    return tuple(tuple(o) for o in orders)


@dataclass(frozen=True)
class ForwardOnly(Schedule):
    """Evaluation: every micro-batch forward through every chunk, keeping nothing; the last chunk
    computes the loss. Chunks sit where the training schedule put them (`chunk_ranks`). Micro-batches
    go in rounds of `round_size` (evaluation: one validation batch); within a round a rank runs all
    of them through one chunk before its next, so ranks overlap as under GPipe and a chunk's values
    for the next chunk on the same rank never pile up beyond a round."""

    chunk_ranks: tuple[int, ...] = ()
    round_size: int = 0  # 0: all micro-batches in one round
    name: ClassVar[str] = "forward"
    forward_only: ClassVar[bool] = True

    @classmethod
    def like(cls, schedule: Schedule, n_microbatches: int | None = None, round_size: int = 0) -> ForwardOnly:
        return cls(schedule.n_ranks, n_microbatches or schedule.n_microbatches, schedule.virtual_stages,
                   tuple(schedule.rank_of(c) for c in range(schedule.n_chunks)), round_size)

    def rank_of(self, chunk: int) -> int:
        return self.chunk_ranks[chunk] if self.chunk_ranks else super().rank_of(chunk)

    def actions(self, rank: int) -> list[Action]:
        m, size = self.n_microbatches, self.round_size or self.n_microbatches
        return [Action(Op.EL if self._last(c) else Op.E, c, i) for start in range(0, m, size)
                for c in self.chunks_of(rank) for i in range(start, min(start + size, m))]


SPLIT_BACKWARD = {Op.I, Op.LI, Op.W}


def make_schedule(name: str, n_ranks: int, n_microbatches: int, extra_warmup: int = 0,
                  virtual_stages: int = 1) -> Schedule:
    """The registered schedule `name` (parallel.schedule) for these settings, checked by its class."""
    cls: type[Schedule] = SCHEDULES.get(name)
    return cls.build(n_ranks, n_microbatches, extra_warmup, virtual_stages)


def config_schedule(cfg: Config) -> Schedule:
    """The schedule a (validated) config runs."""
    cls: type[Schedule] = SCHEDULES.get(cfg.parallel.schedule)
    return cls.from_config(cfg)


# ---- Lowering ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lowered:
    """Per rank, the compute actions of the schedule with their receives and sends in place."""

    schedule: Schedule
    ranks: tuple[tuple[Action, ...], ...]
    _links: frozenset[tuple[int, int]] = field(default=frozenset())

    @property
    def links(self) -> frozenset[tuple[int, int]]:
        """The unordered pairs of ranks that exchange messages."""
        return self._links

    def compute(self, rank: int) -> list[Action]:
        return [a for a in self.ranks[rank] if not a.op.is_comm]

    @cached_property
    def program(self) -> tuple[tuple[tuple[tuple[int, int, Action], ...], ...], int]:
        """What `walk` runs: per rank (kind, message, action), kind compute, send or receive and
        the message numbered (a send and its receive share the number); and how many messages."""
        ids: dict[tuple[int, tuple[Kind, int, int]], int] = {}
        programs = []
        for r, actions in enumerate(self.ranks):
            prog = []
            for a in actions:
                if a.op in (Op.SEND_ACT, Op.SEND_GRAD):
                    assert a.peer is not None
                    prog.append((_SEND, ids.setdefault((a.peer, a.message()), len(ids)), a))
                elif a.op in (Op.RECV_ACT, Op.RECV_GRAD):
                    prog.append((_RECV, ids.setdefault((r, a.message()), len(ids)), a))
                else:
                    prog.append((_COMPUTE, -1, a))
            programs.append(tuple(prog))
        return tuple(programs), len(ids)

    def send_order(self, src: int, dst: int) -> list[tuple[Kind, int, int]]:
        """The messages `src` sends to `dst`, in the order it sends them: the order in which `dst`
        must post its receives from `src` (a transport completes one peer's messages in order)."""
        return [a.message() for a in self.ranks[src] if a.op in (Op.SEND_ACT, Op.SEND_GRAD) and a.peer == dst]


def lower(schedule: Schedule) -> Lowered:
    """The one pass that decides what crosses between ranks."""
    ranks, links = [], set()
    last = schedule.n_chunks - 1
    for rank in range(schedule.n_ranks):
        out: list[Action] = []
        for a in schedule.actions(rank):
            consumes, produces = CONSUMES[a.op], PRODUCES[a.op]
            if consumes == Kind.ACT and a.chunk > 0 and (src := schedule.rank_of(a.chunk - 1)) != rank:
                out.append(Action(Op.RECV_ACT, a.chunk, a.microbatch, src))
            elif consumes == Kind.GRAD and a.chunk < last and (src := schedule.rank_of(a.chunk + 1)) != rank:
                out.append(Action(Op.RECV_GRAD, a.chunk, a.microbatch, src))
            out.append(a)
            if produces == Kind.ACT and a.chunk < last and (dst := schedule.rank_of(a.chunk + 1)) != rank:
                out.append(Action(Op.SEND_ACT, a.chunk, a.microbatch, dst))
                links.add((min(rank, dst), max(rank, dst)))
            elif produces == Kind.GRAD and a.chunk > 0 and (dst := schedule.rank_of(a.chunk - 1)) != rank:
                out.append(Action(Op.SEND_GRAD, a.chunk, a.microbatch, dst))
                links.add((min(rank, dst), max(rank, dst)))
        ranks.append(tuple(out))
    return Lowered(schedule, tuple(ranks), frozenset(links))


# ---- Walking a lowered schedule: the validator's and the simulator's one engine --------------------


_COMPUTE, _SEND, _RECV = 0, 1, 2


class Deadlock(Exception):
    def __init__(self, blocked: dict[int, int]):
        super().__init__("deadlock")
        self.blocked = blocked  # rank -> index of the action it cannot run


def walk(lowered: Lowered, compute: Callable[[int, Action, float], float],
         send: Callable[[int, Action, float], float]) -> list[float]:
    """Runs every rank's actions in order: `compute(rank, action, start)` returns when the action
    ends, `send(rank, action, ready)` when its message arrives; a receive waits for its message.
    Each action is visited once (ranks wait on a message, not in a loop). Returns each rank's end
    time; raises `Deadlock` with every stuck rank's action when no rank can move on. The checker,
    the schedule builders and the cost model all run schedules through this one engine."""
    programs, n_messages = lowered.program
    n = len(programs)
    clock, ptr = [0.0] * n, [0] * n
    arrived: list[float | None] = [None] * n_messages  # per message: when it is at its receiver
    waiting = [-1] * n_messages  # per message: the rank blocked on it
    ready = deque(range(n))
    while ready:
        r = ready.popleft()
        prog, i, t = programs[r], ptr[r], clock[r]
        while i < len(prog):
            kind, msg, a = prog[i]
            if kind == _COMPUTE:
                t = compute(r, a, t)
            elif kind == _SEND:
                arrived[msg] = send(r, a, t)
                if waiting[msg] >= 0:
                    ready.append(waiting[msg])
                    waiting[msg] = -1
            else:
                at = arrived[msg]
                if at is None:
                    waiting[msg] = r
                    break
                t = max(t, at)
            i += 1
        ptr[r], clock[r] = i, t
    blocked = {r: ptr[r] for r in range(n) if ptr[r] < len(programs[r])}
    if blocked:
        raise Deadlock(blocked)
    return clock


# ---- Validation ----------------------------------------------------------------------------------------


def format_grid(lowered: Lowered, marks: dict[tuple[int, int], str] | None = None, comm: bool = True) -> str:
    """One line per rank, its actions in order; marked actions read `>>action<<` with a note below."""
    marks = marks or {}
    lines, notes = [], []
    for r, actions in enumerate(lowered.ranks):
        cells = []
        for i, a in enumerate(actions):
            if a.op.is_comm and not comm and (r, i) not in marks:
                continue
            cells.append(f">>{a}<<" if (r, i) in marks else str(a))
            if (r, i) in marks:
                notes.append(f"  rank {r}, action {i} ({a}): {marks[(r, i)]}")
        lines.append(f"rank {r}: " + " ".join(cells))
    legend = ("(chunk, computation, micro-batch; '0a3>1': chunk 0 sends micro-batch 3's activation to rank 1, "
              "'1g3<2': chunk 1 receives micro-batch 3's gradient from rank 2)")
    return "\n".join([*lines, legend, *notes])


def format_timeline(lowered: Lowered, cost: Callable[[Action], int] | None = None) -> str:
    """The compute actions placed in time with unit costs (`L` 3, `LI` 2, `B` 2 unless `cost` says
    otherwise) and free messages: a column per time unit, '.' where a rank idles (the bubble)."""
    cost = cost or (lambda a: {Op.L: 3, Op.LI: 2, Op.B: 2}.get(a.op, 1))
    rows: list[list[tuple[float, Action]]] = [[] for _ in lowered.ranks]

    def compute(r: int, a: Action, start: float) -> float:
        rows[r].append((start, a))
        return start + cost(a)

    ends = walk(lowered, compute, lambda r, a, t: t)
    width = max(len(str(a)) for row in rows for _, a in row)
    out = []
    for r, row in enumerate(rows):
        cells, t = [], 0.0
        for start, a in row:
            cells += ["." * width] * int(start - t)
            cells += [str(a).ljust(width)] + ["-" * width] * (cost(a) - 1)
            t = start + cost(a)
        cells += ["." * width] * int(max(ends) - t)
        out.append(f"rank {r}: " + " ".join(cells))
    return "\n".join(out)


def check(lowered: Lowered) -> None:
    """Raises ScheduleError unless every micro-batch runs through every chunk exactly once in a
    valid order, every message is sent once and received once in the order it was sent, and the
    ranks cannot deadlock. Linear in the number of actions."""
    s = lowered.schedule

    def fail(what: str, marks: dict[tuple[int, int], str]) -> None:
        raise ScheduleError(f"schedule {s.describe()}: {what}\n{format_grid(lowered, marks)}")

    lifecycles = EVAL_LIFECYCLES if s.forward_only else TRAINING_LIFECYCLES
    last = s.n_chunks - 1
    for r, actions in enumerate(lowered.ranks):
        seen: dict[tuple[int, int], dict[Op, int]] = defaultdict(dict)
        for i, a in enumerate(actions):
            if a.op.is_comm:
                continue
            if s.rank_of(a.chunk) != r or not 0 <= a.microbatch < s.n_microbatches:
                fail(f"rank {r} runs chunk {a.chunk}, micro-batch {a.microbatch}, which is not its own",
                     {(r, i): "not this rank's chunk or micro-batch"})
            if a.op in LAST_CHUNK_ONLY and a.chunk != last:
                fail(f"{a.op.value} computes the loss, but chunk {a.chunk} is not the last", {(r, i): "not the last"})
            if a.op in NOT_LAST_CHUNK and a.chunk == last:
                fail(f"the last chunk must compute the loss (L, LI or EL), not {a.op.value}", {(r, i): "use L or LI"})
            done = seen[(a.chunk, a.microbatch)]
            if a.op in done:
                fail(f"{a} runs twice", {(r, i): "second time"})
            need = {Op.B: (Op.F,), Op.I: (Op.F,), Op.W: (Op.I, Op.LI)}.get(a.op)
            if need and not any(n in done for n in need):
                fail(f"{a} runs before its {'/'.join(n.value for n in need)}", {(r, i): "too early"})
            done[a.op] = i
        for c in s.chunks_of(r):
            for m in range(s.n_microbatches):
                done = seen.get((c, m), {})
                if {op: 1 for op in done} not in lifecycles:
                    have = " ".join(op.value for op in done) or "nothing"
                    at = {(r, i): "incomplete" for i in done.values()}
                    fail(f"rank {r} runs {have} for chunk {c}, micro-batch {m}: a micro-batch needs one of "
                         + ", ".join("+".join(op.value for op in lc) for lc in lifecycles), at)
    # Messages: each sent once, after the computation that produces it, and received once by the rank
    # that consumes it. (Their order may differ: a rank posts its receives from a peer in the order
    # that peer sends, `Lowered.send_order`, so a message never waits behind one sent later.)
    sends: dict[tuple[int, tuple[Kind, int, int]], tuple[int, int]] = {}
    for r, actions in enumerate(lowered.ranks):
        made = set()
        for i, a in enumerate(actions):
            if not a.op.is_comm:
                made.add((PRODUCES[a.op], a.chunk, a.microbatch))
            elif a.op in (Op.SEND_ACT, Op.SEND_GRAD):
                kind = Kind.ACT if a.op == Op.SEND_ACT else Kind.GRAD
                if (kind, a.chunk, a.microbatch) not in made:
                    fail(f"{a} sends before {a.chunk}'s computation produces it (a send out of order)",
                         {(r, i): "nothing to send yet"})
                assert a.peer is not None
                key = (a.peer, a.message())
                if key in sends:
                    fail(f"{a} is sent twice", {sends[key]: "first", (r, i): "again"})
                sends[key] = (r, i)
    for r, actions in enumerate(lowered.ranks):
        for i, a in enumerate(actions):
            if a.op in (Op.RECV_ACT, Op.RECV_GRAD):
                src = sends.pop((r, a.message()), None)
                if src is None or src[0] != a.peer:
                    fail(f"rank {r} waits for a message rank {a.peer} never sends", {(r, i): "never sent"})
    for (dst, _), (r, i) in sends.items():
        fail(f"rank {r} sends a message rank {dst} never receives", {(r, i): "never received"})
    # Local hand-overs: a chunk's neighbour on the same rank must have produced its input first.
    for r, actions in enumerate(lowered.ranks):
        produced = set()
        for i, a in enumerate(actions):
            if a.op in (Op.RECV_ACT, Op.RECV_GRAD):
                produced.add(a.message())
                continue
            if a.op.is_comm:
                continue
            consumed = CONSUMES[a.op]
            if consumed is not None and not (a.chunk == 0 and consumed == Kind.ACT) and not (
                    a.chunk == last and consumed == Kind.GRAD) and (consumed, a.chunk, a.microbatch) not in produced:
                fail(f"{a} runs before its input exists", {(r, i): "input not yet produced"})
            out_kind = PRODUCES[a.op]
            if out_kind == Kind.ACT and a.chunk < last:
                produced.add((Kind.ACT, a.chunk + 1, a.microbatch))
            elif out_kind == Kind.GRAD and a.chunk > 0:
                produced.add((Kind.GRAD, a.chunk - 1, a.microbatch))
    try:
        walk(lowered, lambda r, a, t: t, lambda r, a, t: t)
    except Deadlock as e:
        fail("deadlock: every rank that has work left waits for a message that is never sent first",
             {(r, i): "waits here" for r, i in e.blocked.items()})
