"""`jaxpipe plan --sweep`'s ranking: every pipeline schedule × pipeline codec for the configured network,
by predicted iteration, each priced in validation loss from the shipped quality table (`quality.yaml`),
the fastest within a loss budget marked.

Why a table and not a model of the loss: what a codec costs in loss is only known from a full run (the
project's rule for quality claims), so the planner reads the measured rows and treats a setting without
one as unmeasured: shown, never chosen. Schedules do not change the loss (every schedule computes the
same gradients: tests/test_mpi.py), so a choice's loss is its codec's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxpipe.config import Config, read_yaml, validate
from jaxpipe.errors import ConfigError
from jaxpipe.pipeline.costmodel import Prediction, plan

QUALITY_FILE = Path(__file__).with_name("quality.yaml")
# (parallel.schedule, parallel.virtual_stages) the sweep tries.
SCHEDULES = (("gpipe", 1), ("gpipe_ring", 1), ("1f1b", 1), ("zb_h1", 1), ("interleaved_1f1b", 2))
PIPELINE_KEYS = ("parallel.act_codec", "parallel.act_grad_codec", "parallel.act_delta", "parallel.act_int4_group")


@dataclass(frozen=True)
class QualityRow:
    setting: dict[str, Any]  # dotted config keys -> values
    loss_increase_pct: float
    source: str


def load_quality(path: str | Path = QUALITY_FILE) -> list[QualityRow]:
    rows = read_yaml(path, f"quality table {path}") or []
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "loss_increase_pct" not in row or "source" not in row:
            raise ConfigError(f"quality table {path}: row {i} needs loss_increase_pct and source")
        setting = {k: v for k, v in row.items() if k not in ("loss_increase_pct", "source")}
        out.append(QualityRow(setting, float(row["loss_increase_pct"]), str(row["source"])))
    return out


def with_settings(cfg: Config, setting: dict[str, Any]) -> Config:
    """`cfg` with dotted keys replaced, validated (a ConfigError names what cannot work)."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in setting.items():
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = value
    new = dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **v) for s, v in sections.items()})
    validate(new)
    return new


def pipeline_rows(rows: list[QualityRow]) -> list[QualityRow]:
    """The rows about pipeline codecs (they name parallel.act_codec and only pipeline codec keys)."""
    return [r for r in rows if "parallel.act_codec" in r.setting and set(r.setting) <= set(PIPELINE_KEYS)]


def codec_label(setting: dict[str, Any]) -> str:
    act, grad = setting["parallel.act_codec"], setting.get("parallel.act_grad_codec", "none")
    group = setting.get("parallel.act_int4_group")
    g = f" (group {group})" if group is not None else ""
    return f"{'delta ' if setting.get('parallel.act_delta') else ''}{act} / {grad}{g}"


@dataclass
class Choice:
    schedule: str
    codec: str
    loss_increase_pct: float
    source: str
    prediction: Prediction | None = None
    refused: str | None = None  # why the combination cannot run


def sweep(cfg: Config, rows: list[QualityRow] | None = None, platform: str = "gpu") -> list[Choice]:
    """Every schedule × pipeline codec row, fastest first (refused combinations last), on the
    configured network, DP mode and tied-gradient wire, from the roofline stage times."""
    out = []
    defaults = {"parallel.act_delta": False, "parallel.act_grad_codec": "none"}
    for row in pipeline_rows(rows if rows is not None else load_quality()):
        for schedule, v in SCHEDULES:
            setting = {**defaults, **row.setting, "parallel.schedule": schedule, "parallel.virtual_stages": v,
                       "parallel.extra_warmup": 0}
            choice = Choice(schedule if v == 1 else f"{schedule} (v={v})", codec_label(row.setting),
                            row.loss_increase_pct, row.source)
            try:
                choice.prediction = plan(with_settings(cfg, setting), platform=platform)
            except (ConfigError, ValueError) as e:
                choice.refused = str(e)
            out.append(choice)
    return sorted(out, key=lambda c: (c.prediction is None, c.prediction.iteration_s if c.prediction else 0.0))


def best_within(choices: list[Choice], max_loss_increase_pct: float) -> Choice | None:
    ok = [c for c in choices if c.prediction is not None and c.loss_increase_pct <= max_loss_increase_pct]
    return ok[0] if ok else None


def format_sweep(choices: list[Choice], max_loss_increase_pct: float, network: str) -> str:
    best = best_within(choices, max_loss_increase_pct)
    lines = [f"schedule x pipeline codec at {network} (roofline stage times; loss from jaxpipe/plan/quality.yaml, "
             f"budget +{max_loss_increase_pct:g} %):",
             "| schedule | act / grad codec | iteration s | bound | loss vs none | |", "|---|---|---|---|---|---|"]
    for c in choices:
        if c.prediction is None:
            continue
        mark = "**fastest within budget**" if c is best else ("over budget" if c.loss_increase_pct >
                                                               max_loss_increase_pct else "")
        lines.append(f"| {c.schedule} | {c.codec} | {c.prediction.iteration_s:.3f} | {c.prediction.bound} | "
                     f"{c.loss_increase_pct:+.2f} % | {mark} |")
    refused: dict[str, list[str]] = {}
    for c in choices:
        if c.refused:
            refused.setdefault(f"{c.codec}: {c.refused}", []).append(c.schedule)
    for why, schedules in refused.items():
        lines.append(f"not possible here ({', '.join(schedules)}): {why}")
    lines.append(f"fastest within +{max_loss_increase_pct:g} %: " + (
        f"{best.schedule} with {best.codec}, {best.prediction.iteration_s:.3f} s (loss: {best.source})"
        if best is not None and best.prediction is not None else "none of the measured settings"))
    return "\n".join(lines)
