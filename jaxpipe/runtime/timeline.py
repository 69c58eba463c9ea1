"""A per-rank record of when each task and message happened (host clock), for finding where a
pipeline waits. Off by default and then one attribute test per event; `tools/bench.py --timeline`
turns it on for the last iteration and gathers every rank's events.

Events are (seconds since `start`, what, label): `task` when the executor begins a task,
`wait`/`got` around a receive it blocks on, `ready` when the sender thread has the computed
output of a task (its compute finished on the device), `sent` when the message is on the wire,
`arrived` when the receiver thread has a message on the device.
"""

from __future__ import annotations

import time
from typing import Any


class Timeline:
    def __init__(self) -> None:
        self.enabled = False
        self.t0 = 0.0
        self.events: list[tuple[float, str, str]] = []

    def start(self) -> None:
        self.events = []
        self.t0 = time.perf_counter()
        self.enabled = True

    def stop(self) -> list[tuple[float, str, str]]:
        self.enabled = False
        return self.events

    def mark(self, what: str, label: Any) -> None:
        if self.enabled:
            self.events.append((time.perf_counter() - self.t0, what, str(label)))


TIMELINE = Timeline()
