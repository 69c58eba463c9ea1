"""Pipeline schedules as data: for each stage, the ordered list of tasks it runs in one step.

The executor (`jaxpipe.executor`) only walks these lists, so a new schedule is one class here and
nothing else. A schedule must be *consistent*: the order in which stage s sends activations
(FWD tasks) is the order in which stage s+1 consumes them, and likewise for gradients going back.
`check_consistent` verifies that for any schedule.

The last stage runs forward, loss and backward of a micro-batch as one fused program at its FWD
task and sends the input gradient right away (its BWD task has nothing left to do), so the
previous stage's first backward can start as soon as its forwards are done. GPipe keeps its two
phases on every other stage.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass


class Phase(enum.IntEnum):
    FWD = 0
    BWD = 1


@dataclass(frozen=True)
class Task:
    microbatch: int
    phase: Phase

    def __repr__(self) -> str:
        return f"{self.phase.name[0]}{self.microbatch}"


@dataclass(frozen=True)
class Schedule(ABC):
    n_stages: int
    n_microbatches: int

    @abstractmethod
    def tasks(self, stage: int) -> list[Task]:
        """Tasks of `stage` in execution order; each micro-batch has exactly one FWD and one BWD."""


@dataclass(frozen=True)
class GPipe(Schedule):
    """All forwards, then all backwards, both in micro-batch order (GPipe; the original's default).

    Backwards in forward order because the fused last stage produces gradients in that order:
    the first gradient a stage needs is the first one that exists.
    """

    def tasks(self, stage: int) -> list[Task]:
        m = self.n_microbatches
        return [Task(i, Phase.FWD) for i in range(m)] + [Task(i, Phase.BWD) for i in range(m)]


@dataclass(frozen=True)
class OneFOneB(Schedule):
    """PipeDream-flush 1F1B: P-1-s warm-up forwards, then alternate one forward and one backward.

    Same bubble as GPipe but at most P-s micro-batches of activations alive per stage, and both
    directions of a link busy at once.

    Plain 1F1B exposes the link: in steady state stage s+1 waits, every micro-batch, for a gradient
    to travel to s, s's backward, s's next forward and that activation to travel back (two message
    latencies per micro-batch). `extra_warmup` more warm-up forwards keep that many activations
    queued ahead at every stage, hiding latencies up to about `extra_warmup` micro-batches of
    compute, for that many more micro-batches of activations held per stage.
    """

    extra_warmup: int = 0

    def tasks(self, stage: int) -> list[Task]:
        m = self.n_microbatches
        warmup = min(self.n_stages - 1 - stage + self.extra_warmup, m)
        out = [Task(i, Phase.FWD) for i in range(warmup)]
        fwd, bwd = warmup, 0
        while bwd < m:
            if fwd < m:
                out.append(Task(fwd, Phase.FWD))
                fwd += 1
            out.append(Task(bwd, Phase.BWD))
            bwd += 1
        return out


SCHEDULES: dict[str, type[Schedule]] = {"gpipe": GPipe, "1f1b": OneFOneB}


def make_schedule(name: str, n_stages: int, n_microbatches: int, extra_warmup: int = 0) -> Schedule:
    if name == "1f1b":
        return OneFOneB(n_stages, n_microbatches, extra_warmup)
    if extra_warmup:
        raise ValueError(f"extra_warmup applies to the 1f1b schedule, not {name}")
    return SCHEDULES[name](n_stages, n_microbatches)


def check_consistent(schedule: Schedule) -> None:
    """Raises if the schedule could deadlock or mix up messages between neighbouring stages."""
    for s in range(schedule.n_stages):
        tasks = schedule.tasks(s)
        m = schedule.n_microbatches
        for phase in Phase:
            ids = sorted(t.microbatch for t in tasks if t.phase == phase)
            if ids != list(range(m)):
                raise ValueError(f"stage {s}: {phase.name} tasks cover micro-batches {ids}, expected 0..{m - 1}")
        for t in tasks:
            if t.phase == Phase.BWD and tasks.index(Task(t.microbatch, Phase.FWD)) > tasks.index(t):
                raise ValueError(f"stage {s}: backward of micro-batch {t.microbatch} before its forward")
    for s in range(schedule.n_stages - 1):
        sent = [t.microbatch for t in schedule.tasks(s) if t.phase == Phase.FWD]
        used = [t.microbatch for t in schedule.tasks(s + 1) if t.phase == Phase.FWD]
        if sent != used:
            raise ValueError(f"stages {s}->{s + 1}: activations sent in order {sent} but consumed in {used}")
        # The (fused) last stage sends each gradient at its FWD task, every other stage at its BWD task.
        back_phase = Phase.FWD if s + 1 == schedule.n_stages - 1 else Phase.BWD
        back = [t.microbatch for t in schedule.tasks(s + 1) if t.phase == back_phase]
        need = [t.microbatch for t in schedule.tasks(s) if t.phase == Phase.BWD]
        if back != need:
            raise ValueError(f"stages {s + 1}->{s}: gradients sent in order {back} but consumed in {need}")
