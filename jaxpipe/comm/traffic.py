"""What an exchange puts on the links: one description that the run's metrics, the cost model, `jaxpipe
plan` and the layout search all read, so they cannot disagree on what an algorithm sends.

An exchange is a sequence of `Transfer`s, each one of the group operations of jaxpipe.dp.collectives
(the emulated patterns: chains for reduce and broadcast, rings for reduce-scatter and allreduce,
direct sends for gather, all-gather and all-to-all) or a point-to-point send, on a buffer of
`nbytes` per member. A `Traffic` adds when it happens (`every` steps, starting after step `offset`)
and how much compute may hide it (`overlap_steps`: the exchange may run behind that many following
steps before anyone waits for it; 0: it sits on the step's critical path).

`egress(op, nbytes, size, rank)` is the one formula of the bytes a member sends in an operation; the
collectives count their `sent` bytes with it, whichever backend moves them.
"""

from __future__ import annotations

from dataclasses import dataclass

OPS = ("reduce", "bcast", "reduce_scatter", "allreduce", "gather", "allgather", "alltoall", "p2p")

# One-way delays in a row per operation: -k means k·(n-1).
HOPS: dict[str, int] = {"reduce": -1, "bcast": -1, "reduce_scatter": -1, "allreduce": -2,
                        "gather": 1, "allgather": 1, "alltoall": 1, "p2p": 1}


def egress(op: str, nbytes: int, size: int, rank: int) -> int:
    """The bytes member `rank` of `size` sends in `op` on a buffer of `nbytes` (the emulated pattern)."""
    n, me = size, rank
    return int({
        "reduce": nbytes * (me > 0),  # chain n-1 -> ... -> 0
        "bcast": nbytes * (me < n - 1),  # chain 0 -> ... -> n-1
        "reduce_scatter": nbytes * (n - 1) // n,  # ring
        "allreduce": 2 * nbytes * (n - 1) // n,  # ring reduce-scatter + ring all-gather
        "gather": nbytes * (me > 0),  # every member to the root
        "allgather": nbytes * (n - 1),  # my piece to every other member
        "alltoall": nbytes * (n - 1) // n,  # row j to member j
        "p2p": nbytes,  # one message to one peer
    }[op])


def hops(op: str, size: int) -> int:
    h = HOPS[op]
    return h if h > 0 else -h * (size - 1)


@dataclass(frozen=True)
class Transfer:
    op: str  # one of OPS
    nbytes: int  # the buffer each member passes to the operation (gather / all-gather: its own piece)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown transfer {self.op!r}")


@dataclass(frozen=True)
class Traffic:
    """One algorithm's exchange, as it runs: which transfers, on which steps, how much may overlap."""

    what: str
    transfers: tuple[Transfer, ...] = ()
    every: int = 1  # one exchange per `every` steps (DiLoCo: H)
    overlap_steps: int = 0  # steps of compute the exchange may run behind before the update needs it
    size: int = 1  # members of the group

    @property
    def messages(self) -> int:
        """Operations per exchange (each a message per link, or a pipelined chain of them)."""
        return len(self.transfers)

    def egress(self, rank: int) -> int:
        """Bytes member `rank` sends in one exchange."""
        return sum(egress(t.op, t.nbytes, self.size, rank) for t in self.transfers) if self.size > 1 else 0

    def bytes_per_step(self, rank: int) -> float:
        return self.egress(rank) / self.every

    def on_step(self, step: int) -> bool:
        """Whether an exchange starts after step `step` (1-based)."""
        return step % self.every == 0

    def scaled(self, factor: float) -> Traffic:
        """The same exchange with every buffer `factor` times larger (`network.size_scale`)."""
        return Traffic(self.what, tuple(Transfer(t.op, round(t.nbytes * factor)) for t in self.transfers),
                       self.every, self.overlap_steps, self.size)

    def describe(self) -> str:
        ops = " + ".join(f"{t.op} {t.nbytes / 2**20:.2f} MiB" for t in self.transfers) or "nothing"
        when = "every step" if self.every == 1 else f"every {self.every} steps"
        hide = f", hidden behind up to {self.overlap_steps} steps of compute" if self.overlap_steps else ""
        return f"{self.what}: {ops} {when}{hide}"


NONE = Traffic("none")


# ---- the tied embedding's exchange (first and last pipeline rank) ------------------------------------------

def tied_row_bytes(d_model: int, dtype: str) -> int:
    """Wire bytes of one row of `wte`'s gradient with `parallel.tied_grad_dtype` (int8: absmax per row,
    jaxpipe.comm.quant's rows: the values, then the scale)."""
    from jaxpipe.comm import quant

    if dtype == "int8":
        return quant.row_bytes(d_model, "int8")
    return {"float32": 4 * d_model, "bfloat16": 2 * d_model}[dtype]


def tied_traffic(vocab_size: int, d_model: int, dtype: str) -> Traffic:
    """Each end sends its copy's gradient (coded) to the other, every step, on the critical path."""
    return Traffic(f"tied embedding ({dtype})", (Transfer("p2p", vocab_size * tied_row_bytes(d_model, dtype)),),
                   size=2)
