"""``SensitivityReport``: the result of a sweep, ranked, and written for people to read.

``report.write(folder)`` leaves, each file written atomically (temp file + rename):

==================  ================================================================
report.md           baselines, ranked table, failed layers, skip list, the chart
rows.jsonl          the sweep's own record (a header, the baselines, one line per
                    layer): ``sweep(resume=...)`` on it measures nothing again
sensitivity.csv     the ranked table for spreadsheets
sensitivity.json    everything, reloadable with ``SensitivityReport.load``
sensitivity.png     horizontal bars: each layer's delta, ranked, baselines marked
skip_layers.txt     layer names to keep in float, one a line (``#`` comments)
==================  ================================================================
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qdq.fileio import atomic_write
from sensitivity.errors import SensitivityError

__all__ = ["LayerRow", "SensitivityReport", "MODES", "sensitivity_score"]

#: Sweep modes and what a row's metric measures in each.
MODES = {
    "leave-one-out": "everything quantized except this layer (float)",
    "one-at-a-time": "only this layer quantized, everything else float",
}

#: Rows drawn in the chart at most (the table lists them all).
CHART_ROWS = 40


@dataclass
class LayerRow:
    """One layer's measurement. ``delta`` is against the mode's reference baseline
    (INT8 for leave-one-out, FP32 for one-at-a-time); ``sensitivity`` is signed so that
    larger always means "quantizing this layer costs more"."""

    layer: str
    metric: float | None
    delta: float | None = None
    sensitivity: float | None = None
    status: str = "ok"
    error: str | None = None
    seconds: float = 0.0
    members: list[str] = field(default_factory=list)
    quantizers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def sensitivity_score(mode: str, metric: float, fp32: float, int8: float,
                      higher_is_better: bool = True) -> tuple[float, float]:
    """``(delta, sensitivity)`` of one layer's metric under ``mode``."""
    sign = 1.0 if higher_is_better else -1.0
    if mode == "leave-one-out":
        delta = metric - int8
        return delta, sign * delta
    if mode == "one-at-a-time":
        delta = metric - fp32
        return delta, -sign * delta
    raise SensitivityError(f"sweep mode {mode!r} is unknown; choose one of {list(MODES)}")


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


@dataclass
class SensitivityReport:
    """Baselines and per-layer rows of one sweep (see :data:`MODES`)."""

    mode: str
    fp32: float
    int8: float
    rows: list[LayerRow]
    metric_name: str = "metric"
    higher_is_better: bool = True
    seconds: float = 0.0
    eval_seconds: float = 0.0
    world_size: int = 1
    skip: list[str] = field(default_factory=list)
    skip_metric: float | None = None
    skip_note: str | None = None
    #: what the all-quantized baseline is called (``INT8``, ``FP8``; the model's format)
    quantized: str = "INT8"

    # ------------------------------------------------------------------ queries
    def ranked(self) -> list[LayerRow]:
        """Measured rows, most sensitive first; failed rows last, in model order."""
        ok = sorted((r for r in self.rows if r.ok), key=lambda r: -(r.sensitivity or 0.0))
        return ok + [r for r in self.rows if not r.ok]

    def ranked_layers(self) -> list[str]:
        """Names of the measured layers, most sensitive first."""
        return [r.layer for r in self.ranked() if r.ok]

    @property
    def failed(self) -> list[LayerRow]:
        return [r for r in self.rows if not r.ok]

    @property
    def drop(self) -> float:
        """How much full INT8 loses against FP32 (positive = worse)."""
        return (self.fp32 - self.int8) if self.higher_is_better else (self.int8 - self.fp32)

    def suggested_skip(self, fraction: float = 0.1) -> list[str]:
        """Layers whose own sensitivity is at least ``fraction`` of the INT8 drop
        (a suggestion: measure it with ``partial_quantize``)."""
        if self.drop <= 0:
            return []
        return [r.layer for r in self.ranked() if r.ok and (r.sensitivity or 0.0)
                >= fraction * self.drop]

    # --------------------------------------------------------------- serialise
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = [asdict(r) for r in self.ranked()]
        d["drop"] = self.drop
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensitivityReport:
        d = dict(d)
        d.pop("drop", None)
        d["rows"] = [LayerRow(**r) for r in d["rows"]]
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> SensitivityReport:
        """Read ``sensitivity.json`` (or a report folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "sensitivity.json"
        if not path.is_file():
            raise SensitivityError(f"sensitivity report {path}: no such file")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError, KeyError) as err:
            raise SensitivityError(f"sensitivity report {path}: not a report ({err})") from err

    # ------------------------------------------------------------------ render
    def markdown(self) -> str:
        name = self.metric_name
        lines = [
            f"# Layer sensitivity ({self.mode})",
            "",
            f"Each row: {name} with {MODES[self.mode]}. Delta is against "
            f"{self.quantized if self.mode == 'leave-one-out' else 'FP32'}; rows are ranked by "
            "sensitivity (what quantizing the layer costs).",
            "",
            "| baseline | " + name + " |",
            "|---|---|",
            f"| FP32 (all quantizers off) | {self.fp32:.4f} |",
            f"| {self.quantized} (all quantizers on) | {self.int8:.4f} |",
            f"| drop | {self.drop:.4f} |",
            "",
            f"{len(self.rows)} layers, {len(self.failed)} failed; sweep {self.seconds:.1f} s, "
            f"one evaluation {self.eval_seconds:.2f} s"
            + (f", {self.world_size} ranks" if self.world_size > 1 else "") + ".",
            "",
            "![sensitivity](sensitivity.png)",
            "",
            f"| rank | layer | {name} | delta | sensitivity | quantizers |",
            "|---:|---|---:|---:|---:|---|",
        ]
        for i, r in enumerate(self.ranked(), 1):
            if r.ok:
                lines.append(f"| {i} | `{r.layer}` | {r.metric:.4f} | {r.delta:+.4f} | "
                             f"{r.sensitivity:+.4f} | {len(r.quantizers)} |")
        if self.failed:
            lines += ["", "## Failed layers", ""]
            lines += [f"- `{r.layer}`: {r.error}" for r in self.failed]
        lines += ["", "## Skip list", ""]
        skip, note = self._skip_list()
        lines.append(note)
        lines += [""] + [f"- `{s}`" for s in skip]
        return "\n".join(lines) + "\n"

    def _skip_list(self) -> tuple[list[str], str]:
        if self.skip or self.skip_metric is not None:
            note = self.skip_note or (f"measured with these layers in float: {self.metric_name}"
                                      f" {self.skip_metric:.4f}")
            return list(self.skip), note
        return self.suggested_skip(), ("suggested (not measured together): layers whose own "
                                       "sensitivity is at least 10% of the INT8 drop")

    def rows_jsonl(self) -> str:
        """The sweep's line format: header, baselines, then one line per layer."""
        meta = {"kind": "meta", "mode": self.mode, "metric_name": self.metric_name,
                "layers": [r.layer for r in self.rows]}
        lines = [meta] + [{"task": name, "metric": value, "status": "ok", "error": None}
                          for name, value in (("fp32", self.fp32), ("int8", self.int8))]
        lines += [{"task": r.layer, **asdict(r)} for r in self.rows]
        return "".join(json.dumps(line) + "\n" for line in lines)

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["rank", "layer", self.metric_name, "delta", "sensitivity", "status",
                         "seconds", "quantizers", "error"])
        for i, r in enumerate(self.ranked(), 1):
            writer.writerow([i, r.layer, r.metric, r.delta, r.sensitivity, r.status,
                             f"{r.seconds:.3f}", " ".join(r.quantizers), r.error or ""])
        return buf.getvalue()

    def plot(self, path: Path) -> None:
        """The chart: one bar per layer from the reference baseline to its metric."""
        from matplotlib.figure import Figure  # no pyplot: no global backend or state

        ok = [r for r in self.ranked() if r.ok][:CHART_ROWS]
        ref = self.int8 if self.mode == "leave-one-out" else self.fp32
        fig = Figure(figsize=(9, 1.6 + 0.28 * max(len(ok), 1)))
        ax = fig.subplots()
        y = list(range(len(ok)))
        widths = [r.delta for r in ok]
        colors = ["#c0392b" if (r.sensitivity or 0) > 0 else "#7f8c8d" for r in ok]
        ax.barh(y, widths, left=ref, color=colors, height=0.7)
        labels = [r.layer + (f" (+{len(r.members) - 1} shared)" if len(r.members) > 1
                             else "") for r in ok]
        ax.set_yticks(y, labels, fontsize=8)
        for yi, w in zip(y, widths, strict=True):
            ax.annotate(f"{w:+.3g}", (ref + w, yi), xytext=(3 if w >= 0 else -3, 0),
                        textcoords="offset points", va="center",
                        ha="left" if w >= 0 else "right", fontsize=7)
        ax.invert_yaxis()
        ax.axvline(self.fp32, color="#2471a3", ls="--", lw=1.2,
                   label=f"FP32 {self.fp32:.3f}")
        ax.axvline(self.int8, color="#d35400", ls=":", lw=1.5,
                   label=f"{self.quantized} {self.int8:.3f}")
        ax.set_xlabel(f"{self.metric_name} ({MODES[self.mode]})")
        shown = "" if len(ok) == len([r for r in self.rows if r.ok]) else \
            f", top {len(ok)} shown"
        ax.set_title(f"Layer sensitivity, {self.mode}: most sensitive on top{shown}",
                     fontsize=10)
        values = [ref + w for w in widths] + [self.fp32, self.int8]
        finite = [v for v in values if math.isfinite(v)]
        lo, hi = min(finite), max(finite)
        pad = 0.12 * (hi - lo) or 0.5
        ax.set_xlim(lo - pad, hi + pad)
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))

    def write(self, folder: str | Path) -> Path:
        """Write every report file into ``folder`` (created if needed); returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _write_text(folder / "rows.jsonl", self.rows_jsonl())
        _write_text(folder / "sensitivity.csv", self.csv())
        _write_text(folder / "sensitivity.json", json.dumps(self.to_dict(), indent=1) + "\n")
        self.plot(folder / "sensitivity.png")
        skip, note = self._skip_list()
        _write_text(folder / "skip_layers.txt",
                    f"# {note}\n" + "".join(f"{s}\n" for s in skip))
        _write_text(folder / "report.md", self.markdown())
        return folder

    def __str__(self) -> str:
        head = (f"{self.mode}: FP32 {self.fp32:.4f}, {self.quantized} {self.int8:.4f} "
                f"({self.metric_name}); {len(self.rows)} layers")
        top = [f"  {r.layer:<40} {r.metric:.4f} ({r.delta:+.4f})" for r in self.ranked()[:10]
               if r.ok]
        return "\n".join([head, *top])
