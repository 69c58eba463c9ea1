"""Reading the per-rank traces `jaxpipe train --trace DIR` writes (jaxpipe.runtime.trace): one merged
Chrome/Perfetto file, the Gantt picture, and the numbers `tools/timeline.py` summarises.

    jaxpipe trace merge DIR [--out FILE]          # DIR/trace.json: opens in ui.perfetto.dev, chrome://tracing
    jaxpipe trace plot DIR --out timeline.png     # a row per rank, a colour per computation, messages as lines

The picture's bound is the cost model's iteration for this schedule, partition and links with the
computation times the trace measured (each chunk's median F, B, I, W, L, LI), so the gap to the
measured iteration is what the run loses beyond the schedule's bubble and the links: host overhead,
dispatch, transport time, stragglers. Efficiency is bound / measured.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaxpipe.errors import ConfigError

RANK_FILE = re.compile(r"rank(\d+)\.trace\.json$")
# One colour per computation (the schedule IR's ops), and for the phases after the pipeline.
OP_COLOURS = {"F": "#4c72b0", "B": "#dd8452", "I": "#e5ae38", "W": "#8c613c", "L": "#55a868", "LI": "#64b5cd",
              "E": "#8172b3", "EL": "#937860"}
# (The picture is the iteration: the barrier before it, the loss sum, evaluation and checkpoint saves
# after it are in the Perfetto trace only.)
PHASE_COLOURS = {"tied embedding sum": "#c44e52", "data-parallel sync": "#da8bc3", "gradient norm": "#8c8c8c",
                 "norm exchange": "#b0b0b0", "optimizer update": "#404040"}
_OLD_MARKS = {"pipeline done": "pipeline", "tied embedding summed": "tied embedding sum",
              "data-parallel sync done": "data-parallel sync", "gradient norm computed": "gradient norm"}


@dataclass
class Traces:
    events: list[dict[str, Any]]  # every rank's, on rank 0's clock (µs)
    ranks: list[dict[str, Any]] = field(default_factory=list)  # each rank's facts (otherData.jaxpipe)

    @property
    def world(self) -> int:
        return len(self.ranks)


def load(trace_dir: str | Path) -> Traces:
    """Every rank's file in `trace_dir` (all of ranks 0..N-1, or an error naming the missing)."""
    d = Path(trace_dir)
    files = {int(m.group(1)): p for p in d.glob("rank*.trace.json") if (m := RANK_FILE.search(p.name))}
    if not files:
        raise ConfigError(f"{d}: no rank*.trace.json files (write them with jaxpipe train --trace {d})")
    docs = {r: json.loads(p.read_text()) for r, p in sorted(files.items())}
    world = docs[min(docs)]["otherData"]["jaxpipe"].get("world", len(docs))
    missing = sorted(set(range(world)) - set(docs))
    if missing:
        raise ConfigError(f"{d}: the trace of rank{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} "
                          f"is missing ({len(docs)} of {world} ranks)")
    return Traces([e for r in sorted(docs) for e in docs[r]["traceEvents"]],
                  [docs[r]["otherData"]["jaxpipe"] for r in sorted(docs)])


def merge(trace_dir: str | Path, out: str | Path | None = None) -> Path:
    """One Chrome trace of every rank (a process per rank, flows between them)."""
    traces = load(trace_dir)
    path = Path(out) if out is not None else Path(trace_dir) / "trace.json"
    doc = {"traceEvents": traces.events, "displayTimeUnit": "ms", "otherData": {"jaxpipe": {"ranks": traces.ranks}}}
    path.write_text(json.dumps(doc))
    return path


# ---- what the events say -------------------------------------------------------------------------------


def flows(events: list[dict[str, Any]]) -> dict[int, tuple[dict[str, Any] | None, dict[str, Any] | None]]:
    """Per message id: (the sender's flow start, the receiver's flow end)."""
    out: dict[int, list[Any]] = defaultdict(lambda: [None, None])
    for e in events:
        if e.get("cat") == "message":
            out[e["id"]][0 if e["ph"] == "s" else 1] = e
    return {k: (v[0], v[1]) for k, v in out.items()}


def message_latencies(ranks: list[list[dict[str, Any]]], kinds: str = "FB") -> list[float]:
    """Seconds each message took from "the sender has the computed output" to "the receiver has it on
    its device", for messages of the given kinds ('F' activations, 'B' gradients); `ranks` is every
    rank's event list (`TRACE.stop()` gathered), or one merged list inside a list."""
    events = [e for r in ranks for e in r]
    names = {(e["pid"], e["ts"]): e["args"]["message"] for e in events if e.get("cat") == "send"}
    out = []
    for start, end in flows(events).values():
        if start is None or end is None:
            continue
        label = names.get((start["pid"], start["ts"]), "?")
        if label[0] in kinds:
            out.append((end["ts"] - start["ts"]) / 1e6)
    return out


def step_mark(events: list[dict[str, Any]], label: str, step: int | None = None) -> float | None:
    """When (seconds since the step's barrier) one rank ended a phase of its step: a phase's name
    ("pipeline", "tied embedding sum", "data-parallel sync", "gradient norm", "norm exchange",
    "optimizer update"), or one of the older marks ("pipeline done", "data-parallel sync done", ...).
    `step`: 1-based; default the last recorded."""
    name = _OLD_MARKS.get(label, label)
    phases = [e for e in events if e.get("cat") == "phase"]
    if step is None:
        steps = [e["args"].get("step") for e in phases if e["args"].get("step") is not None]
        step = max(steps) if steps else None
    starts = [e for e in phases if e["name"] == "pipeline" and e["args"].get("step") == step]
    ends = [e for e in phases if e["name"] == name and e["args"].get("step") == step]
    if not starts or not ends:
        return None
    return (ends[-1]["ts"] + ends[-1]["dur"] - starts[-1]["ts"]) / 1e6


def chunk_times(traces: Traces, steps: set[int] | None = None) -> dict[int, dict[str, float]]:
    """Per chunk, the median seconds of each computation in training steps (`steps`: 1-based)."""
    samples: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for e in traces.events:
        if e.get("cat") == "compute" and e["args"]["step"] > 0 and (steps is None or e["args"]["step"] in steps):
            samples[e["args"]["chunk"]][e["name"]].append(e["dur"] / 1e6)
    return {c: {op: float(np.median(v)) for op, v in ops.items()} for c, ops in samples.items()}


@dataclass
class Verdict:
    step: int
    iteration_s: float  # measured (the trainer's timer, global rank 0)
    bound_s: float | None  # the cost model with the measured computation times
    bound: str = ""  # what bounds it (compute, pipeline bubble, link, synchronisation)
    bubble: float | None = None
    efficiency: float | None = None


def verdict(traces: Traces, step: int) -> Verdict:
    from jaxpipe.config import config_from_dict
    from jaxpipe.pipeline.costmodel import Link, StageTime, plan

    facts = traces.ranks[0]
    measured = float(facts["iteration_s"][str(step)])
    cfg = config_from_dict(facts["config"])
    times = chunk_times(traces)
    stage_times = []
    for c in range(cfg.n_chunks):
        t = times.get(c, {})
        if "L" in t:
            stage_times.append(StageTime(t["L"], 0.0))
        elif "LI" in t and "W" in t:
            stage_times.append(StageTime(t["LI"], t["W"], input_frac=0.0))
        elif "I" in t and "W" in t and "F" in t:
            stage_times.append(StageTime(t["F"], t["I"] + t["W"], input_frac=t["I"] / (t["I"] + t["W"])))
        elif "F" in t and "B" in t:
            stage_times.append(StageTime(t["F"], t["B"]))
        else:
            return Verdict(step, measured, None)
    n = cfg.network
    pred = plan(cfg, stage_times, Link.of(n.delay_ms, n.rate_gbit), platform=facts.get("platform", "gpu"))
    return Verdict(step, measured, pred.iteration_s, pred.bound, pred.bubble, pred.iteration_s / measured)


# ---- the picture ---------------------------------------------------------------------------------------


def plot(trace_dir: str | Path, out: str | Path, step: int | None = None) -> tuple[Path, Verdict]:
    """The Gantt chart of one traced training step (default the last): a row per rank, computations
    coloured by kind and labelled with their micro-batch, receive waits hatched below, the phases
    after the pipeline in grey tones, each message a line from its send to its arrival."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("jaxpipe trace plot needs matplotlib: pip install 'jaxpipe[observe]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    traces = load(trace_dir)
    traced = sorted(int(s) for s in traces.ranks[0]["iteration_s"])
    if not traced:
        raise ConfigError(f"{trace_dir}: the trace holds no completed training step")
    if step is None:
        step = traced[-1]
    elif step not in traced:
        raise ConfigError(f"--step {step}: the trace holds steps {', '.join(map(str, traced))}")
    v = verdict(traces, step)
    in_step = [e for e in traces.events if e.get("args", {}).get("step") == step or e.get("cat") == "message"]
    zero = min((e["ts"] for e in in_step if e.get("cat") == "phase" and e["name"] == "pipeline"), default=0.0)
    world = traces.world
    several = any(len(r.get("chunks", [])) > 1 for r in traces.ranks)
    fig_w = 14.0
    fig, ax = plt.subplots(figsize=(fig_w, 1.3 + 0.62 * world))
    end = 0.0
    for e in in_step:
        if e.get("ph") != "X":
            continue
        y, x0, w = e["pid"], (e["ts"] - zero) / 1e6, e["dur"] / 1e6
        cat = e.get("cat")
        if cat == "compute":
            ax.broken_barh([(x0, w)], (y - 0.3, 0.6), facecolors=OP_COLOURS.get(e["name"], "#999999"),
                           edgecolor="white", linewidth=0.4)
            end = max(end, x0 + w)
            e["_label"] = (x0, w, y, f"{e['args']['chunk']}.{e['args']['microbatch']}" if several
                           else str(e["args"]["microbatch"]))
        elif cat == "wait":
            ax.broken_barh([(x0, w)], (y + 0.32, 0.1), facecolors="none", edgecolor="#bbbbbb", hatch="////",
                           linewidth=0.3)
        elif cat == "phase" and e["name"] in PHASE_COLOURS:
            ax.broken_barh([(x0, w)], (y - 0.3, 0.6), facecolors=PHASE_COLOURS[e["name"]], alpha=0.85)
            end = max(end, x0 + w)
    span = max(end, 1e-9)
    for e in in_step:
        if "_label" in e:
            x0, w, y, text = e.pop("_label")
            if w > span * 0.012 * max(1, len(text)):
                ax.text(x0 + w / 2, y, text, ha="center", va="center", fontsize=6, color="white")
    sends = {(e["pid"], e["ts"]): e for e in in_step if e.get("cat") == "send"}
    for start, stop in flows(in_step).values():
        if start is None or stop is None:
            continue
        send = sends.get((start["pid"], start["ts"]))
        if send is None or send["args"]["step"] != step:
            continue
        grad = send["args"]["message"].startswith("B")
        ax.plot([(start["ts"] - zero) / 1e6, (stop["ts"] - zero) / 1e6], [start["pid"], stop["pid"]],
                color="#c44e52" if grad else "#222222", linewidth=0.5, alpha=0.55)
    ax.set_ylim(world - 0.4, -0.6)
    ax.set_yticks(range(world))
    ax.set_yticklabels([f"rank {r['rank']}\nstage {r['stage']}" + (f" r{r['replica']}" if r["dp"] > 1 else "")
                        for r in traces.ranks], fontsize=8)
    ax.set_xlim(0, span * 1.01)
    ax.set_xlabel("seconds since the step's barrier (rank 0's clock)")
    facts = traces.ranks[0]
    title = f"{facts['schedule']}, PP {facts['pp']} x DP {facts['dp']}, step {step}: iteration {v.iteration_s:.3f} s"
    if v.bound_s is not None and v.efficiency is not None:
        title += (f" | bound {v.bound_s:.3f} s ({v.bound}; bubble {v.bubble:.0%} with free links)"
                  f" | efficiency {v.efficiency:.0%}")
    ax.set_title(title, fontsize=10)
    ops = sorted({e["name"] for e in in_step if e.get("cat") == "compute"}, key=list(OP_COLOURS).index)
    phases = [p for p in PHASE_COLOURS  # the phases long enough to be seen
              if any(e.get("cat") == "phase" and e["name"] == p and e["dur"] / 1e6 > span * 0.002 for e in in_step)]
    handles = [Patch(color=OP_COLOURS[o], label=o) for o in ops] + [
        Patch(color=PHASE_COLOURS[p], label=p) for p in phases] + [
        Patch(facecolor="none", edgecolor="#bbbbbb", hatch="////", label="receive wait"),
        plt.Line2D([], [], color="#222222", linewidth=0.8, label="activation"),
        plt.Line2D([], [], color="#c44e52", linewidth=0.8, label="gradient")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13 - 0.02 * (4 - min(world, 4))),
              ncol=min(len(handles), 9), fontsize=7, frameon=False)
    ax.grid(axis="x", linewidth=0.3, alpha=0.5)
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path, v
