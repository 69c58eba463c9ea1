"""Summarises per-rank traces (jaxpipe.runtime.trace): how long each rank's host waited on receives,
how long messages took from "the sender has the computed output" to "the receiver has it on its
device" (the latency a schedule must hide), the host's dispatch time per computation and the
device's busy time, and when each phase after the pipeline ended.

    python tools/timeline.py FILE      # what `tools/bench.py pipeline --timeline FILE` appends (one run a line)
    python tools/timeline.py DIR       # what `jaxpipe train --trace DIR` writes (the last traced step)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxpipe.export.trace import load, message_latencies, step_mark

__all__ = ["latencies_by_receiver", "message_latencies", "step_mark", "summarise"]


def latencies_by_receiver(ranks: list[list[dict[str, Any]]], kinds: str = "FB") -> list[list[float]]:
    """For each rank, the seconds the messages it received took (see `message_latencies`)."""
    sends = [e for r in ranks for e in r if e.get("cat") == "send" or (e.get("cat") == "message" and e["ph"] == "s")]
    return [message_latencies([sends + [e for e in events if e.get("cat") == "message" and e["ph"] == "f"]], kinds)
            for events in ranks]


def _last_step(events: list[dict[str, Any]]) -> int | None:
    steps = [e["args"]["step"] for e in events if e.get("cat") == "compute" and e["args"]["step"] > 0]
    return max(steps) if steps else None


def summarise(run: dict[str, Any]) -> list[str]:
    ranks = run["ranks"]
    lines = [f"[{run['label']}]"]
    latencies = latencies_by_receiver(ranks)
    for r, events in enumerate(ranks):
        step = _last_step(events)
        mine = [e for e in events if e.get("args", {}).get("step") == step]
        waits = [e["dur"] / 1e6 for e in mine if e.get("cat") == "wait"]
        disp = [e["dur"] / 1e6 for e in mine if e.get("cat") == "dispatch"]
        busy = sum(e["dur"] / 1e6 for e in mine if e.get("cat") == "compute")
        pipe = next((e for e in mine if e.get("cat") == "phase" and e["name"] == "pipeline"), None)
        lat = latencies[r]
        phases = " | ".join(f"{name} {t:.3f}" for name in ("pipeline", "tied embedding sum", "data-parallel sync",
                                                             "gradient norm", "norm exchange", "optimizer update")
                            if (t := step_mark(events, name, step)) is not None)
        lines.append(
            f"  rank {r}: pipeline {pipe['dur'] / 1e6 if pipe else 0:.3f} s | device busy {busy:.3f} s | receive "
            f"waits {sum(waits):.3f} s over {len(waits)} (max {max(waits, default=0):.4f}) | message latency median "
            f"{np.median(lat) * 1e3 if lat else 0:.2f} ms, max {max(lat, default=0) * 1e3:.2f} ms | dispatch "
            f"median {np.median(disp) * 1e3 if disp else 0:.2f} ms"
            + (f"\n      phases end (s since the step's barrier): {phases}" if phases else ""))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a --timeline JSONL file, or a --trace directory")
    args = parser.parse_args()
    path = Path(args.path)
    if path.is_dir():
        traces = load(path)
        by_rank: list[list[dict[str, Any]]] = [[] for _ in range(traces.world)]
        for e in traces.events:
            by_rank[e["pid"]].append(e)
        print("\n".join(summarise({"label": str(path), "ranks": by_rank})))
        return
    with open(path) as f:
        for line in f:
            print("\n".join(summarise(json.loads(line))))


if __name__ == "__main__":
    main()
