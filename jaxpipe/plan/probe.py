"""`jaxpipe probe-network`: one-way delay and bandwidth between every ordered pair of ranks.

Pairs are measured in rounds of a round-robin tournament: in each round every rank is in exactly
one pair, so no two measurements share a rank's link, and the whole matrix takes N-1 rounds
(minutes for 64 ranks over a WAN, not N·(N-1) one-at-a-time measurements). Within a pair each
direction is measured on its own:

- delay: ping-pongs of a 16-byte message; the one-way delay is the receiver's wall clock at arrival
  minus the sender's at sending, the smallest of the pings (a message can be late for many reasons:
  queues, a busy host; never early). That needs synchronised clocks (one host, or NTP:
  milliseconds against WAN delays of tens); where a pair's two one-way delays disagree with its
  round trip by more than 20% + 1 ms, both are taken as half the round trip instead, and the file
  says so;
- bandwidth: the slope of transfer time over message size, from two sizes (which cancels the
  delay and any fixed per-message cost): a quick estimate from 64 KiB and 1 MiB picks sizes that
  take about `target_s` on the link, measured three times each (the fastest counts).

With `network.*` set, messages go through jaxpipe's link emulation like a transport's
(`network.size_scale` is a model stand-in, not part of the network: it is not applied), which is
how probing is tested: it recovers an emulated matrix.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from mpi4py import MPI

from jaxpipe.comm.cluster import Cluster
from jaxpipe.comm.netem import NetworkEmulator

_PING, _PONG, _DATA, _ACK = 901, 902, 903, 904
_HEADER = 2  # float64 words in front of every payload: send time, emulated or not
_REPS = 3  # of each bandwidth message: the fastest counts


def rounds(n: int) -> Iterator[list[tuple[int, int]]]:
    """N-1 rounds (N rounds for odd N) in which every pair of 0..n-1 meets once, each rank at most
    once per round (the circle method)."""
    m = n + (n % 2)
    ring = list(range(m))
    for _ in range(m - 1):
        yield [(min(a, b), max(a, b)) for a, b in ((ring[i], ring[m - 1 - i]) for i in range(m // 2))
               if a < n and b < n]
        ring = [ring[0], ring[-1], *ring[1:-1]]


def _wait(req: Any) -> None:
    """Completes a request without spinning: a rank spinning in MPI would take the CPU from the link
    emulation's delivery threads (and from the other ranks on a shared host), and the probe would
    measure the host's scheduling instead of the network."""
    while not req.Test():
        time.sleep(0.0002)


class _Link:
    """Sends from this rank, through the emulated link when there is one (`emulate=False`: straight
    over MPI, for the baseline)."""

    def __init__(self, comm: Any, net: NetworkEmulator | None, max_bytes: int):
        self.comm, self.net = comm, net
        self.buf = np.zeros(max(max_bytes, 1 << 20) // 8 + _HEADER, np.float64)  # reused: no page faults
        self.rbuf = np.zeros_like(self.buf)

    def send(self, buf: np.ndarray, dst: int, tag: int, emulate: bool = True) -> None:
        if self.net is None or not emulate:
            _wait(self.comm.Isend(buf, dest=dst, tag=tag))
            return
        reqs: list[Any] = []
        self.net.send(dst, buf.nbytes, lambda: reqs.append(self.comm.Isend(buf, dest=dst, tag=tag)))
        self.net.drain()
        for r in reqs:
            _wait(r)

    def recv(self, buf: np.ndarray, src: int, tag: int) -> None:
        _wait(self.comm.Irecv(buf, source=src, tag=tag))

    def recv_payload(self, src: int) -> np.ndarray:
        status = MPI.Status()
        while not self.comm.Iprobe(source=src, tag=_DATA, status=status):
            time.sleep(0.0002)
        view = self.rbuf[: status.Get_count(MPI.BYTE) // 8]
        self.recv(view, src, _DATA)
        return view


def _measure_direction(link: _Link, me: int, src: int, dst: int, pings: int, target_s: float,
                       max_bytes: int) -> dict[str, float]:
    """Both ends call this; returns on `dst` the one-way delay and the rate, on `src` the round trip.
    With emulated links the same pings and sizes also go straight over MPI, and that time (the host's
    own messaging and copying, which the emulation adds on top of the link: see jaxpipe.comm.netem)
    is taken off, so what is left is the emulated link."""
    small = np.zeros(_HEADER, np.float64)
    baseline = link.net is not None
    out: dict[str, float] = {}
    if me == src:
        rtts = []
        for emulate in ((True, False) if baseline else (True,)):
            for _ in range(pings):
                t0 = time.time()
                small[0], small[1] = t0, float(emulate)
                link.send(small, dst, _PING, emulate)
                link.recv(small, dst, _PONG)
                if emulate:
                    rtts.append(time.time() - t0)
        out["rtt"] = min(rtts)
        ack = np.zeros(1, np.float64)

        def payload(size: int, emulate: bool = True) -> float:
            buf = link.buf[: max(_HEADER, size // 8)]
            buf[0], buf[1] = time.time(), float(emulate)
            link.send(buf, dst, _DATA, emulate)
            link.recv(ack, dst, _ACK)
            return float(ack[0])

        payload(64 << 10)
        estimate = payload(1 << 20)  # the receiver's quick rate estimate, bit/s
        big = int(min(max_bytes, max(1 << 20, target_s * estimate / 8))) // 8 * 8
        for emulate in ((True, False) if baseline else (True,)):
            for size in (big // 8, big) * _REPS:
                payload(size, emulate)
        return out
    samples: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(pings * (2 if baseline else 1)):
        link.recv(small, src, _PING)
        samples[bool(small[1])].append(time.time() - small[0])
        link.send(small, src, _PONG, bool(small[1]))
    out["one_way"] = min(samples[True]) - (min(samples[False]) if baseline else 0.0)
    took: dict[tuple[bool, int], float] = {}

    def receive() -> tuple[bool, int]:
        view = link.recv_payload(src)
        dt = time.time() - view[0]
        key = (bool(view[1]), view.nbytes)
        took[key] = min(took.get(key, float("inf")), dt)
        return key

    def slope(a: tuple[bool, int], b: tuple[bool, int]) -> float:
        """Seconds per byte between two sizes."""
        return (took[b] - took[a]) / (b[1] - a[1])

    first = receive()
    link.send(np.zeros(1, np.float64), src, _ACK)
    second = receive()
    quick = slope(first, second)
    link.send(np.array([8 / quick if quick > 0 else 1e13]), src, _ACK)
    keys = []
    for _ in range(2 * _REPS * (2 if baseline else 1)):
        keys.append(receive())
        link.send(np.zeros(1, np.float64), src, _ACK)
    emul = sorted({k for k in keys if k[0]}, key=lambda k: k[1])
    per_byte = slope(emul[0], emul[-1])
    if baseline:
        raw = sorted({k for k in keys if not k[0]}, key=lambda k: k[1])
        per_byte -= max(0.0, slope(raw[0], raw[-1]))
    out["rate"] = 8 / per_byte if per_byte > 0 else 1e13
    return out


def probe_network(comm: Any, net: NetworkEmulator | None = None, *, pings: int = 5, target_s: float = 0.25,
                  max_bytes: int = 64 << 20, log: Callable[[str], None] | None = None) -> Cluster | None:
    """Collective over `comm`; returns the measured cluster on rank 0 (None elsewhere)."""
    n, me = comm.Get_size(), comm.Get_rank()
    hosts = comm.allgather(MPI.Get_processor_name())
    link = _Link(comm, net, max_bytes)
    mine: dict[tuple[int, int], dict[str, float]] = {}
    t_start = time.time()
    for i, pairs in enumerate(rounds(n)):
        for a, b in pairs:
            if me not in (a, b):
                continue
            for src, dst in ((a, b), (b, a)):
                mine.setdefault((src, dst), {}).update(
                    _measure_direction(link, me, src, dst, pings, target_s, max_bytes))
        comm.Barrier()
        if log and me == 0:
            log(f"probe-network: round {i + 1} of {n - 1 + n % 2} done ({time.time() - t_start:.1f} s)")
    parts = comm.gather(mine, root=0)
    if me != 0:
        return None
    merged: dict[tuple[int, int], dict[str, float]] = {}
    for part in parts:
        for key, vals in part.items():
            merged.setdefault(key, {}).update(vals)
    delay = [[0.0] * n for _ in range(n)]
    bw = [[0.0] * n for _ in range(n)]
    fallback = []
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            ow_ij, ow_ji = merged[(i, j)]["one_way"], merged[(j, i)]["one_way"]
            rtt = (merged[(i, j)]["rtt"] + merged[(j, i)]["rtt"]) / 2
            if min(ow_ij, ow_ji) < 0 or abs(ow_ij + ow_ji - rtt) > 0.2 * rtt + 1e-3:  # clocks disagree
                ow_ij = rtt / 2
                fallback.append((i, j))
            delay[i][j] = round(ow_ij * 1e3, 3)
            bw[i][j] = round(merged[(i, j)]["rate"] / 1e9, 4)
    note = (f"probe-network: {n} ranks, {time.strftime('%Y-%m-%d %H:%M:%S')}, {time.time() - t_start:.0f} s; "
            f"one-way delays from wall clocks")
    if fallback:
        note += f" (half the round trip for {len(fallback)} of {n * (n - 1)} pairs whose clocks disagree)"
    if net is not None:
        note += f"; links emulated ({net.describe()})"
    return Cluster(tuple(hosts), tuple(map(tuple, delay)), tuple(map(tuple, bw)), source=note)


def emulator_for_probe(cfg: Any, rank: int, world: int) -> NetworkEmulator | None:
    """The configured emulation with `size_scale` 1: the probe measures links, not a stand-in model."""
    return NetworkEmulator.from_config(dataclasses.replace(cfg.network, size_scale=1.0), rank, world)
