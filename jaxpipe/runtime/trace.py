"""Per-rank trace of what the pipeline does, on one clock across ranks: the record `jaxpipe train
--trace DIR` writes and `tools/bench.py --timeline` gathers.

A pipeline's performance is who waited for whom, so the trace holds, per rank: each computation
(F, B, I, W, L, LI, E, EL) as the device ran it, each host dispatch and receive wait, each message
from "the sender has the computed output" to "it is on the wire", each arrival, and the phases
of a step (the barrier, the pipeline, tied-embedding sum, data-parallel sync, gradient norm and
its exchange, optimizer update, loss sum, evaluation, checkpoint save). Offsets to rank 0's clock
are measured at start-up over MPI (`sync_clocks`), so the ranks' files merge into one timeline.

Recording is off by default; every event site tests `TRACE.enabled` (one attribute) and does
nothing more. Device time is observed without stalling the host: a watcher thread waits for each
computation's output and takes the moment it is ready as the computation's end, and the later of
its dispatch and the previous computation's end as its start (a device runs one rank's programs
in order). Outputs that the next program donates (accumulated gradients) are watched through a
one-element slice taken before the donation.

Each rank's file is a Chrome trace (the JSON that ui.perfetto.dev and chrome://tracing open);
message flows carry ids both ends compute alike, so merging is concatenation
(`jaxpipe.export.trace`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TRACKS = {0: "host", 1: "compute", 2: "send", 3: "receive"}
HOST, COMPUTE, SEND, RECEIVE = 0, 1, 2, 3
_CLOCK_TAG = 31001


def _clock_id() -> str:
    """What identifies this process's `time.perf_counter` clock: the kernel's boot id where that
    clock is CLOCK_MONOTONIC (one clock per running kernel, containers included), else the process."""
    if "CLOCK_MONOTONIC" in time.get_clock_info("perf_counter").implementation:
        try:
            return "boot " + Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            pass
    return f"process {socket.gethostname()} {os.getpid()}"


def flow_id(src: int, dst: int, step: int, label: str) -> int:
    """The id of one message's flow arrow (sender world rank, receiver world rank, step, `MsgKey.short`),
    computed alike on both ends; 48 bits, so JavaScript's numbers hold it exactly."""
    digest = hashlib.blake2b(f"{src}>{dst}@{step}:{label}".encode(), digest_size=6).digest()
    return int.from_bytes(digest, "big")


def message_label(kind: int, chunk: int, microbatch: int) -> str:
    """As `MsgKey.short`: 'F' for an activation, 'B' for a gradient, receiving chunk . micro-batch."""
    return f"{'FB'[kind]}{chunk}.{microbatch}"


class Trace:
    def __init__(self) -> None:
        self.enabled = False  # recording now: the only thing event sites test
        self.armed = False  # `begin_step` decides `enabled`
        self.window: range | None = None  # 0-based steps to record; None: each step replaces the last
        self.out_dir: Path | None = None
        self.offset = 0.0  # add to time.perf_counter() for rank 0's clock
        self.epoch = 0.0  # rank 0's clock at start-up: time zero of the trace
        self.rank = 0
        self.meta: dict[str, Any] = {}
        self.events: list[tuple[Any, ...]] = []
        self.iteration_s: dict[int, float] = {}  # 1-based step -> the trainer's measured iteration
        self.written: Path | None = None
        self._step = 0
        self._phase: tuple[float, str] | None = None
        self._watch: queue.Queue[Any] | None = None
        self._last_end = 0.0
        self._marker: Any = None

    # -- set-up -------------------------------------------------------------------------------------
    def enable(self, steps: range | None = None, out_dir: str | Path | None = None) -> None:
        """Records the steps in `steps` (0-based), or with None each step anew, keeping the last
        (benchmarks). With `out_dir` the trace is written there once the window has passed."""
        self.armed, self.window, self.events, self.iteration_s = True, steps, [], {}
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.written = None

    def disable(self) -> None:
        self.settle()
        self.enabled = self.armed = False

    def sync_clocks(self, comm: Any, rounds: int = 16, clock: Callable[[], float] = time.perf_counter,
                    clock_id: str | None = None) -> None:
        """Collective: this rank's offset to rank 0's clock, and the trace's time zero. Processes of
        one machine read one clock (CLOCK_MONOTONIC, shared by everything under one kernel: their
        offset is exactly 0); each other machine's first rank measures its offset to rank 0 by the
        round trip with the least delay of `rounds` (as NTP does), and the rest of its machine takes it.
        (`clock` and `clock_id` stand in for the real ones in tests.)"""
        rank = comm.Get_rank()
        self.rank, self.offset = rank, 0.0
        clocks = comm.allgather(clock_id or _clock_id())
        leaders = sorted({clocks.index(c) for c in clocks} - {clocks.index(clocks[0])})
        measured: dict[int, float] = {}
        for peer in leaders:
            if rank == 0:
                best = (float("inf"), 0.0)
                for _ in range(rounds):
                    t0 = clock()
                    comm.send(None, dest=peer, tag=_CLOCK_TAG)
                    theirs = comm.recv(source=peer, tag=_CLOCK_TAG)
                    t1 = clock()
                    best = min(best, (t1 - t0, (t0 + t1) / 2 - theirs))
                measured[peer] = best[1]
            elif rank == peer:
                for _ in range(rounds):
                    comm.recv(source=0, tag=_CLOCK_TAG)
                    comm.send(clock(), dest=0, tag=_CLOCK_TAG)
        measured = comm.bcast(measured, root=0)
        self.offset = measured.get(clocks.index(clocks[rank]), 0.0)
        self.epoch = comm.bcast(clock() if rank == 0 else None, root=0)

    # -- steps ----------------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """`step` 0-based; called before the step's barrier."""
        self._step = step
        if self.window is None:
            self.settle()
            self.events = []
            self.enabled = True
        else:
            self.enabled = step in self.window
        if self.enabled:
            self.events.append(("step", time.perf_counter(), step))

    def end_step(self, iteration_s: float) -> None:
        """After the step's hooks; writes the trace when the window has passed."""
        if not self.enabled:
            return
        self.phase(None)
        self.events.append(("step_end", time.perf_counter(), self._step))
        self.iteration_s[self._step + 1] = iteration_s
        if self.window is not None:
            self.enabled = False
            if self._step == self.window[-1] and self.out_dir is not None:
                self.write()

    def phase(self, name: str | None) -> None:
        """Ends the current phase of the step and starts `name` (None: no phase)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._phase is not None:
            self.events.append(("phase", self._phase[0], now, self._phase[1]))
        self._phase = (now, name) if name is not None else None

    def mark(self, what: str, label: Any) -> None:
        """A point in time with a name, for anything the fixed events do not cover."""
        if self.enabled:
            self.events.append(("mark", time.perf_counter(), what, str(label)))

    # -- the executor (main thread) ---------------------------------------------------------------------
    def waited(self, step: int, label: str, stage: int, t0: float) -> None:
        """A receive of message `label` from pipeline rank `stage` blocked the host from `t0` until now."""
        self.events.append(("wait", t0, time.perf_counter(), step, label, stage))

    def computed(self, step: int, op: str, chunk: int, microbatch: int, t0: float, output: Any,
                 donated: Any = None) -> None:
        """A computation dispatched from `t0` until now; its end is when `output` is ready, or,
        when it has none of its own that lives on, one element of `donated` (taken now)."""
        now = time.perf_counter()
        self.events.append(("dispatch", t0, now, step, op, chunk, microbatch))
        if output is None:
            output = self._slice(donated)
        if self._watch is None:
            self._watch = queue.Queue()
            threading.Thread(target=self._watch_loop, args=(self._watch,), name="jaxpipe-trace",
                             daemon=True).start()
        self._watch.put((step, op, chunk, microbatch, t0, output))

    def _slice(self, tree: Any) -> Any:
        import jax

        if self._marker is None:
            self._marker = jax.jit(lambda x: x.reshape(-1)[:1])
        leaves = jax.tree.leaves(tree)
        return self._marker(min(leaves, key=lambda x: x.size)) if leaves else None

    def warm(self, trees: Sequence[Any]) -> None:
        """Compiles the one-element slice for these gradient trees now, not inside a traced step."""
        import jax

        for tree in trees:
            jax.block_until_ready(self._slice(tree))

    def _watch_loop(self, q: queue.Queue[Any]) -> None:
        import jax

        while True:
            step, op, chunk, microbatch, t0, output = q.get()
            with contextlib.suppress(Exception):  # A deleted buffer: its program has finished.
                jax.block_until_ready(output)
            end = time.perf_counter()
            start = min(max(t0, self._last_end), end)
            self._last_end = end
            self.events.append(("compute", start, end, step, op, chunk, microbatch))
            q.task_done()

    def settle(self) -> None:
        """Waits until every dispatched computation's end is known."""
        if self._watch is not None:
            self._watch.join()

    # -- the transports' threads --------------------------------------------------------------------------
    def ready(self, step: int, label: str, src: int, dst: int) -> None:
        self.events.append(("ready", time.perf_counter(), step, label, src, dst))

    def sent(self, step: int, label: str, src: int, dst: int) -> None:
        self.events.append(("sent", time.perf_counter(), step, label, src, dst))

    def arrived(self, step: int, label: str, src: int, dst: int) -> None:
        self.events.append(("arrived", time.perf_counter(), step, label, src, dst))

    # -- output -------------------------------------------------------------------------------------------
    def stop(self) -> list[dict[str, Any]]:
        """Stops recording; this rank's events as Chrome trace events."""
        self.disable()
        return self.chrome_events()

    def _us(self, t: float) -> float:
        return round((t + self.offset - self.epoch) * 1e6, 3)

    def chrome_events(self) -> list[dict[str, Any]]:
        pid, us = self.rank, self._us
        out: list[dict[str, Any]] = []

        def span(tid: int, name: str, cat: str, t0: float, t1: float, **args: Any) -> dict[str, Any]:
            ev = {"name": name, "cat": cat, "ph": "X", "ts": us(t0), "dur": max(0.001, round((t1 - t0) * 1e6, 3)),
                  "pid": pid, "tid": tid, "args": args}
            out.append(ev)
            return ev

        ready: dict[tuple[int, str, int], float] = {}
        sent: dict[tuple[int, str, int], float] = {}
        starts: dict[int, float] = {}
        for ev in self.events:
            if ev[0] == "ready":
                ready[(ev[2], ev[3], ev[5])] = ev[1]
            elif ev[0] == "sent":
                sent[(ev[2], ev[3], ev[5])] = ev[1]
        for ev in self.events:
            kind = ev[0]
            if kind == "compute":
                _, t0, t1, step, op, chunk, mb = ev
                span(COMPUTE, op, "compute", t0, t1, step=step + 1, chunk=chunk, microbatch=mb)
            elif kind == "dispatch":
                _, t0, t1, step, op, chunk, mb = ev
                span(HOST, f"dispatch {chunk}{op}{mb}", "dispatch", t0, t1, step=step + 1, chunk=chunk,
                     microbatch=mb, op=op)
            elif kind == "wait":
                _, t0, t1, step, label, stage = ev
                span(HOST, f"wait {label} from stage {stage}", "wait", t0, t1, step=step + 1, message=label,
                     stage=stage)
            elif kind == "phase":
                _, t0, t1, name = ev
                span(HOST, name, "phase", t0, t1, step=self._step_of(t0))
            elif kind == "step":
                starts[ev[2]] = ev[1]
            elif kind == "step_end":
                step = ev[2]
                if step in starts:
                    span(HOST, f"step {step + 1}", "step", starts[step], ev[1], step=step + 1,
                         iteration_s=self.iteration_s.get(step + 1))
            elif kind == "arrived":
                _, t, step, label, src, dst = ev
                span(RECEIVE, f"arrived {label} from rank {src}", "arrival", t, t, step=step + 1, message=label,
                     src=src)
                out.append({"name": "message", "cat": "message", "ph": "f", "bp": "e",
                            "id": flow_id(src, dst, step, label), "ts": us(t), "pid": pid, "tid": RECEIVE})
            elif kind == "mark":
                out.append({"name": f"{ev[2]}: {ev[3]}", "cat": "mark", "ph": "i", "s": "t", "ts": us(ev[1]),
                            "pid": pid, "tid": HOST})
        for (step, label, dst), t0 in ready.items():
            t1 = sent.get((step, label, dst), t0)
            src = self.rank
            span(SEND, f"send {label} to rank {dst}", "send", t0, t1, step=step + 1, message=label, dst=dst)
            out.append({"name": "message", "cat": "message", "ph": "s", "id": flow_id(src, dst, step, label),
                        "ts": us(t0), "pid": pid, "tid": SEND})
        out.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        meta = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": self._process_name()}},
                {"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": pid}}]
        for tid, name in TRACKS.items():
            meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
            meta.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
        return meta + out

    def _step_of(self, t: float) -> int | None:
        step = None
        for ev in self.events:
            if ev[0] == "step" and ev[1] <= t:
                step = ev[2] + 1
        return step

    def _process_name(self) -> str:
        m = self.meta
        if "stage" in m:
            return f"rank {self.rank} (stage {m['stage']}, replica {m.get('replica', 0)})"
        return f"rank {self.rank}"

    def write(self, out_dir: str | Path | None = None) -> Path:
        """This rank's Chrome trace, `DIR/rank<R>.trace.json`, with the run's facts under
        `otherData.jaxpipe` (what `jaxpipe trace plot` needs: the config, the iteration times)."""
        self.settle()
        d = Path(out_dir) if out_dir is not None else self.out_dir
        assert d is not None
        d.mkdir(parents=True, exist_ok=True)
        facts = {**self.meta, "rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(),
                 "clock_offset_s": self.offset, "iteration_s": {str(k): v for k, v in self.iteration_s.items()}}
        doc = {"traceEvents": self.chrome_events(), "displayTimeUnit": "ms", "otherData": {"jaxpipe": facts}}
        path = d / f"rank{self.rank:05d}.trace.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.rename(path)
        self.written = path
        return path


TRACE = Trace()
