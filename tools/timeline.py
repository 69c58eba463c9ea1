"""Summarises the per-rank timelines that `tools/bench.py pipeline --timeline FILE` writes: for each
run, how long each stage's host waited on receives, and how long messages took from "the sender
has the computed output" to "the receiver has it on its device" (the latency a schedule must hide).

    python tools/timeline.py FILE
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def latencies_by_receiver(ranks: list[list], kinds: str = "FB") -> list[list[float]]:
    """For each rank, the seconds its messages took from "the sender has the computed output" to
    "this rank has it on its device" (PP-only runs: stage = rank)."""
    ready = {(r, label): t for r, events in enumerate(ranks) for t, what, label in events if what == "ready"}
    out: list[list[float]] = []
    for r, events in enumerate(ranks):
        lat = []
        for t, what, label in events:
            if what == "arrived" and label[0] in kinds:
                src = r - 1 if label.startswith("F") else r + 1
                if (src, label) in ready:
                    lat.append(t - ready[(src, label)])
        out.append(lat)
    return out


def message_latencies(ranks: list[list], kinds: str = "FB") -> list[float]:
    return [x for lat in latencies_by_receiver(ranks, kinds) for x in lat]


def step_mark(events: list, label: str) -> float | None:
    """When (seconds since the step's barrier) one rank passed one of the trainer's step marks."""
    return next((t for t, what, lab in events if what == "step" and lab == label), None)


def summarise(run: dict) -> list[str]:
    ranks = run["ranks"]
    lines = [f"[{run['label']}]"]
    latencies = latencies_by_receiver(ranks)
    for r, events in enumerate(ranks):
        waits, start = [], None
        for t, what, _ in events:
            if what == "wait":
                start = t
            elif what == "got" and start is not None:
                waits.append(t - start)
                start = None
        # Host time per task: from its start (after any receive wait) to the next task's start.
        starts = [t for t, w, _ in events if w in ("task", "got")]
        disp = []
        task_t = None
        for t, what, _ in events:
            if what in ("task", "got"):
                task_t = t
            elif what == "dispatched" and task_t is not None:
                disp.append(t - task_t)
        lat = latencies[r]
        end = max((t for t, w, _ in events if w != "step"), default=0.0)
        steps = " | ".join(f"{label} {t:.3f}" for t, w, label in events if w == "step")
        lines.append(
            f"  stage {r}: last pipeline event {end:.3f} s | receive waits {sum(waits):.3f} s over {len(waits)} "
            f"(max {max(waits, default=0):.4f}) | message latency median "
            f"{np.median(lat) * 1e3 if lat else 0:.2f} ms, max {max(lat, default=0) * 1e3:.2f} ms | host per "
            f"task: dispatch median {np.median(disp) * 1e3 if disp else 0:.2f} ms, "
            f"busy {(end - sum(waits)) / max(1, len(starts) - len(waits)) * 1e3:.2f} ms"
            + (f"\n      after the pipeline (s since step start): {steps}" if steps else ""))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    args = parser.parse_args()
    with open(args.file) as f:
        for line in f:
            print("\n".join(summarise(json.loads(line))))


if __name__ == "__main__":
    main()
