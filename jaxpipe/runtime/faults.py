"""Fault injection, so that the failure handling can be tested on a real job: `JAXPIPE_FAULT`.

    JAXPIPE_FAULT='KIND@step=N[,rank=R][,stage=S][,replica=D][,mb=M][,at=task|sync]'  (';' separates several)

KIND is what happens on the matching rank(s) in step N (1-based, as logged; step 0 is the set-up,
just before the parameter broadcast):
    raise   a RuntimeError (the ordinary failure path: message, traceback, abort)
    kill    SIGKILL of the process itself (a crashed host, an OOM kill)
    exit    os._exit(1): a rank that vanishes without MPI_Abort or a signal
    hang    sleeps forever (a stuck device or host; the peers' deadlines must end the job)
    pause   sleeps until the file PATH.release holds what the fault wrote into PATH (the marker below), at
            most 120 s: holds the job at a known point while a test acts on it (signals it, takes its
            disk away); several pauses are released one by one
    nan     multiplies the stage's gradients of that step by NaN (train.on_nonfinite decides)
`at=task` (default) fires at the stage's first task of micro-batch M (default 0); `at=sync` after the
pipeline, before gradient synchronisation. `nan` always acts on the step's gradients.

`JAXPIPE_FAULT_MARKER=PATH` arms the faults only while PATH does not exist, and a fault creates PATH
(holding the time, the process id and the fault) when it fires: a supervised restart of the job then
runs clean, and a test learns when and where the fault happened.

Read once per process (`load`); with no fault configured the hooks cost one truth test.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxpipe.errors import ConfigError

ENV, MARKER_ENV = "JAXPIPE_FAULT", "JAXPIPE_FAULT_MARKER"
KINDS = ("raise", "kill", "exit", "hang", "pause", "nan")
PAUSE_LIMIT_S = 120.0
_KEYS = ("step", "rank", "stage", "replica", "mb", "at")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None
    stage: int | None = None
    replica: int | None = None
    mb: int = 0
    at: str = "task"
    text: str = ""

    def applies_to(self, rank: int, stage: int, replica: int) -> bool:
        return all(want is None or want == have
                   for want, have in ((self.rank, rank), (self.stage, stage), (self.replica, replica)))


def parse(spec: str) -> list[Fault]:
    faults = []
    for text in filter(None, (part.strip() for part in spec.split(";"))):
        kind, _, args = text.partition("@")
        if kind not in KINDS:
            raise ConfigError(f"{ENV}: {text!r}: the kind must be one of {', '.join(KINDS)}")
        fields: dict[str, Any] = {}
        for item in filter(None, args.split(",")):
            key, _, value = item.partition("=")
            if key not in _KEYS:
                raise ConfigError(f"{ENV}: {text!r}: unknown key {key!r} (known: {', '.join(_KEYS)})")
            if key == "at":
                if value not in ("task", "sync"):
                    raise ConfigError(f"{ENV}: {text!r}: at= must be task or sync")
                fields[key] = value
                continue
            try:
                fields[key] = int(value)
            except ValueError:
                raise ConfigError(f"{ENV}: {text!r}: {key}={value!r} is not an integer") from None
        if "step" not in fields:
            raise ConfigError(f"{ENV}: {text!r}: say which step, e.g. {kind}@step=2,stage=1")
        faults.append(Fault(kind, text=text, **fields))
    return faults


ARMED: list[Fault] = []  # this process's faults that have not fired yet


def load(rank: int, stage: int, replica: int, env: dict[str, str] | None = None) -> list[Fault]:
    """Arms the faults of `JAXPIPE_FAULT` that concern this rank (none if the marker exists)."""
    env = dict(os.environ) if env is None else env
    faults = parse(env.get(ENV, ""))
    marker = env.get(MARKER_ENV)
    if marker and Path(marker).exists():
        faults = []
    ARMED[:] = [f for f in faults if f.applies_to(rank, stage, replica)]
    return list(ARMED)


def _fire(fault: Fault) -> None:
    ARMED.remove(fault)
    marker = os.environ.get(MARKER_ENV)
    note = f"{time.time()} {os.getpid()} {fault.text}\n"
    if marker:
        Path(marker).write_text(note)
    if fault.kind == "raise":
        raise RuntimeError(f"injected fault {fault.text}")
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.kind == "exit":
        os._exit(1)
    if fault.kind == "hang":
        while True:
            time.sleep(3600)
    if fault.kind == "pause":
        release = Path(f"{marker}.release") if marker else None
        until = time.monotonic() + PAUSE_LIMIT_S
        while time.monotonic() < until:
            with suppress(OSError):
                if release is not None and release.read_text() == note:
                    return
            time.sleep(0.02)


def at_setup() -> None:
    """The trainer's set-up, before the parameter broadcast: faults of step 0."""
    for fault in ARMED:
        if fault.kind != "nan" and fault.step == 0:
            _fire(fault)
            return


def at_task(step: int, microbatch: int) -> None:
    """The executor, before a task of step `step` (1-based) runs."""
    for fault in ARMED:
        if fault.kind != "nan" and fault.at == "task" and fault.step == step and fault.mb == microbatch:
            _fire(fault)
            return


def at_sync(step: int) -> None:
    """The trainer, after the pipeline and before gradient synchronisation."""
    for fault in ARMED:
        if fault.kind != "nan" and fault.at == "sync" and fault.step == step:
            _fire(fault)
            return


def poison(step: int, grads: Any) -> Any:
    """`grads` times NaN if a `nan` fault is due at `step`; else `grads` unchanged."""
    for fault in ARMED:
        if fault.kind == "nan" and fault.step == step:
            import jax
            import jax.numpy as jnp

            _fire(fault)
            return jax.tree.map(lambda g: g * jnp.nan, grads)
    return grads
