"""The measured quality table the layout search prices lossy choices with (quality.yaml, shipped with
the package; rows from BENCHMARKS.md). A lossy choice (DiLoCo, a codec) is offered only where a row
says what it cost and the sum of the rows a plan relies on stays within the user's budget
(`jaxpipe plan --max-loss-increase X%`); the plan names the rows. Rows of independent mechanisms add
(a pipeline codec and a DP choice act on different messages): an assumption, stated in the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxpipe.config import read_yaml
from jaxpipe.errors import ConfigError

DEFAULT = Path(__file__).with_name("quality.yaml")


@dataclass(frozen=True)
class Row:
    kind: str  # act_codec, grad_codec, diloco
    key: tuple[tuple[str, Any], ...]
    loss_pct: float
    source: str

    def get(self, name: str) -> Any:
        return dict(self.key)[name]

    def describe(self) -> str:
        k = ", ".join(f"{a}={b}" for a, b in self.key)
        return f"{self.kind} {k}: {self.loss_pct:+.2f} % ({self.source})"


class QualityTable:
    def __init__(self, rows: list[Row], path: str):
        self.rows, self.path = rows, path

    @classmethod
    def load(cls, path: str | Path | None = None) -> QualityTable:
        """quality.yaml's rows (dotted config keys, as `jaxpipe plan --sweep` reads them), by what the
        search varies: a pipeline codec in both directions, a DP gradient codec, DiLoCo's M, H and outer
        step. Rows of other settings (mixed codecs, delta mode) serve the sweep only."""
        where = str(path or DEFAULT)
        data = read_yaml(where, f"quality table {where}") or []
        if not isinstance(data, list):
            raise ConfigError(f"quality table {where}: expected a list of rows (dotted config keys, "
                              f"loss_increase_pct, source)")
        rows = []
        for i, e in enumerate(data):
            if not isinstance(e, dict) or "loss_increase_pct" not in e:
                raise ConfigError(f"quality table {where}: row {i} has no loss_increase_pct")
            kind_key = _search_key(e)
            if kind_key is not None:
                rows.append(Row(*kind_key, float(e["loss_increase_pct"]), str(e.get("source", ""))))
        return cls(rows, where)

    def of(self, kind: str, **key: Any) -> list[Row]:
        """The rows of `kind` whose keys match `key` (keys not named match anything)."""
        return [r for r in self.rows if r.kind == kind and all(dict(r.key).get(k) == v for k, v in key.items())]

    def one(self, kind: str, **key: Any) -> Row:
        """The row a pinned setting relies on, or a ConfigError naming what is missing."""
        rows = self.of(kind, **key)
        if not rows:
            what = ", ".join(f"{k}={v}" for k, v in key.items())
            raise ConfigError(f"the quality table {self.path} has no {kind} row with {what}: measure it "
                              f"(BENCHMARKS.md) and add the row, or drop --max-loss-increase to plan without "
                              f"pricing the loss")
        return min(rows, key=lambda r: r.loss_pct)


def _search_key(e: dict[str, Any]) -> tuple[str, tuple[tuple[str, Any], ...]] | None:
    """(kind, key) of a row the layout search can use, or None."""
    setting = {k.removeprefix("parallel."): v for k, v in e.items() if k not in ("loss_increase_pct", "source")}
    if setting.get("dp_mode") in ("diloco", "streaming_diloco"):
        key = {"M": setting.get("dp"), "H": setting.get("diloco_inner_steps"),
               "outer_lr": setting.get("diloco_outer_lr"), "outer_momentum": setting.get("diloco_outer_momentum"),
               "warmup": 0}
        for name, k in (("diloco_fragments", "fragments"), ("diloco_overlap_steps", "overlap_steps")):
            if name in setting:
                key[k] = setting[name]
        return str(setting["dp_mode"]), tuple(key.items())
    if "grad_codec" in setting and set(setting) <= {"grad_codec", "dp_mode"}:
        return "grad_codec", (("codec", setting["grad_codec"]),)
    act, grad = setting.get("act_codec"), setting.get("act_grad_codec")
    if act is not None and act == grad and set(setting) <= {"act_codec", "act_grad_codec", "act_int4_group"} \
            and setting.get("act_int4_group", 32) == 32:  # the search keeps int4's default group
        return "act_codec", (("codec", act),)
    return None


def parse_budget(text: str | float | None) -> float | None:
    """`--max-loss-increase`: "1%", "1" or 0.5 (percent); None: no lossy choice is offered."""
    if text is None:
        return None
    try:
        value = float(str(text).strip().rstrip("%"))
    except ValueError:
        raise ConfigError(f"--max-loss-increase: expected a percentage such as 1% or 0.5, got {text!r}") from None
    if not value >= 0:
        raise ConfigError(f"--max-loss-increase must be 0% or more (the loss the plan may add), got {text}")
    return value
