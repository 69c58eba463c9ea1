"""Link emulation inside jaxpipe: every rank's egress behaves like `tc netem delay D rate R`.

Kernel netem is not available on the machines jaxpipe is developed on (and rarely on shared
clusters), so the transports and the data-parallel synchronisation route their messages through
`NetworkEmulator`: a message that is ready at time t waits until its link is free, occupies the
link for bytes·8/R, and is put on the wire D later. Links are full duplex (only egress is
modelled, like netem on a NIC), so a rank's sends to all peers share one link unless a per-pair
override gives that pair a link of its own. Small control messages pay the delay too.

`network.matrix` (a cluster file, `jaxpipe.comm.cluster`) gives every ordered pair of world ranks
its own delay and rate, each pair a link of its own (a WAN path: what limits a pair between two
sites is the path, not the sender's NIC), so any measured or published cluster runs here;
`network.pairs` entries override single pairs on top of it.

`size_scale` multiplies the bytes the *model* charges for each message (not what is sent): on CPU,
where compute is slow, a small model's messages can stand in for GPT-3 XL's 16 MiB activations.

The real transfer still happens, at the time the emulated link would have delivered the message;
its own (small) duration adds on top, which the cost model accounts for as a per-message overhead.

Every send names its `owner` (the transport, the tied exchange, one DP group's collectives), and
`drain(owner=...)` waits for that owner's sends only: a DP exchange running on a thread of its own
(Streaming DiLoCo) keeps the emulator busy for seconds, and the pipeline's end-of-step flush must not
wait for it. The sends still share the rank's egress link, as on a real NIC.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jaxpipe.comm.cluster import load_cluster
from jaxpipe.config import NetworkConfig
from jaxpipe.errors import ConfigError

CHUNK_BYTES = 4 * 2**20  # bulk transfers over emulated links move in pieces of this size (at most 64)


def transfer_chunks(nbytes: float) -> int:
    """How many pieces a bulk transfer (a data-parallel reduce or broadcast) is cut into over emulated
    links, so that a chain of hops works on several pieces at once."""
    return int(min(64, max(1, -(-int(nbytes) // CHUNK_BYTES))))


@dataclass(frozen=True)
class LinkSpec:
    delay_s: float
    rate_bps: float  # bits per second

    def transfer_s(self, nbytes: float) -> float:
        return nbytes * 8.0 / self.rate_bps


class NetworkEmulator:
    """One per rank: reserves this rank's egress links and delivers sends when they are due."""

    def __init__(self, rank: int, default: LinkSpec, pairs: dict[tuple[int, int], LinkSpec] | None = None,
                 size_scale: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.rank = rank
        self.default = default
        self.pairs = dict(pairs or {})
        self.size_scale = size_scale
        self.clock = clock
        self.matrix = ""  # the cluster file the pairs come from, if any
        self._free: dict[tuple[int, int | None], float] = {}
        self._lock = threading.Lock()
        self._heap: list[tuple[float, int, Callable[[], None], object]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._pending = 0
        self._owned: dict[object, int] = {}  # scheduled, not yet on the wire, per owner
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._deliver_loop, name="jaxpipe-netem", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, cfg: NetworkConfig, rank: int, world: int | None = None) -> NetworkEmulator | None:
        """`world`: the job's size, which a `network.matrix` file must match (checked when given)."""
        if not cfg.enabled:
            return None
        pairs: dict[tuple[int, int], LinkSpec] = {}
        source = ""
        if cfg.matrix:
            cluster = load_cluster(cfg.matrix, f"network.matrix {cfg.matrix}")
            if world is not None and cluster.n != world:
                raise ConfigError(f"network.matrix {cfg.matrix} describes {cluster.n} ranks, but the job has {world}: "
                                  f"use a cluster file of {world} ranks")
            pairs = {(rank, j): LinkSpec(cluster.delay_s(rank, j), cluster.rate_bps(rank, j))
                     for j in range(cluster.n) if j != rank}
            source = cfg.matrix
        pairs.update({(int(a), int(b)): LinkSpec(d / 1e3, r * 1e9) for a, b, d, r in cfg.pairs})
        rate = cfg.rate_gbit * 1e9 if cfg.rate_gbit > 0 else float("inf")
        net = cls(rank, LinkSpec(cfg.delay_ms / 1e3, rate), pairs, cfg.size_scale)
        net.matrix = source
        return net

    def link(self, dst: int) -> LinkSpec:
        return self.pairs.get((self.rank, dst), self.default)

    def reserve(self, dst: int, nbytes: int, ready: float | None = None) -> float:
        """Claims the link to `dst` for one message of `nbytes`; returns when it is due at `dst`."""
        spec = self.link(dst)
        key = (self.rank, dst) if (self.rank, dst) in self.pairs else (self.rank, None)
        now = self.clock() if ready is None else ready
        with self._lock:
            start = max(now, self._free.get(key, 0.0))
            done = start + spec.transfer_s(nbytes * self.size_scale)
            self._free[key] = done
        return done + spec.delay_s

    def send_at(self, due: float, put_on_wire: Callable[[], None], owner: object = None) -> None:
        """Runs `put_on_wire` (which must not block for long) on the delivery thread at `due`."""
        with self._cv:
            if self._error is not None:
                raise self._error
            self._pending += 1
            self._owned[owner] = self._owned.get(owner, 0) + 1
            heapq.heappush(self._heap, (due, next(self._seq), put_on_wire, owner))
            self._cv.notify_all()

    def send(self, dst: int, nbytes: int, put_on_wire: Callable[[], None], owner: object = None) -> float:
        due = self.reserve(dst, nbytes)
        self.send_at(due, put_on_wire, owner)
        return due

    def drain(self, poll: Callable[[], Any] | None = None, owner: object = None) -> None:
        """Waits until every send of `owner` (None: every scheduled send) has been put on the wire.
        `poll`, if given, runs about every millisecond meanwhile: Open MPI moves a large message's data
        only inside MPI calls of the sender, so a sender that waits here must keep calling MPI (e.g.
        `MPI.Request.Testall`)."""
        def busy() -> int:
            return self._pending if owner is None else self._owned.get(owner, 0)

        with self._cv:
            while busy() and self._error is None:
                if poll is None:
                    self._cv.wait(0.1)
                    continue
                self._cv.release()
                try:
                    poll()
                finally:
                    self._cv.acquire()
                self._cv.wait(0.001)
            if self._error is not None:
                raise self._error

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    def _deliver_loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (not self._heap or self._heap[0][0] > self.clock()):
                    timeout = (self._heap[0][0] - self.clock()) if self._heap else None
                    self._cv.wait(timeout if timeout is None else max(timeout, 0.0))
                if self._closed:
                    return
                _, _, fn, owner = heapq.heappop(self._heap)
            try:
                fn()
            except BaseException as e:  # Surfaced to whoever drains or schedules next.
                with self._cv:
                    self._error = e
            with self._cv:
                self._pending -= 1
                left = self._owned[owner] - 1
                if left:
                    self._owned[owner] = left
                else:
                    del self._owned[owner]
                self._cv.notify_all()

    def collective_latency(self, n: int, peers: list[int] | None = None) -> float:
        """One-way delays a small allreduce over `n` ranks pays (recursive doubling, there and back);
        with `peers` (their world ranks), the longest delay from this rank to one of them."""
        others = [p for p in peers or [] if p != self.rank]
        delay = max(self.link(p).delay_s for p in others) if others else self.default.delay_s
        return 2 * max(0, (n - 1).bit_length()) * delay

    def describe(self) -> str:
        rate = self.default.rate_bps / 1e9
        s = f"network emulation on: delay {self.default.delay_s * 1e3:g} ms, rate {rate:g} Gbit/s"
        if self.matrix:
            s = f"network emulation on: per-pair links from {self.matrix}"
        elif self.pairs:
            s += f", {len(self.pairs)} pair override(s)"
        if self.size_scale != 1:
            s += f", message sizes x{self.size_scale:g}"
        return s
