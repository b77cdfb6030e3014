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

A sweep whose metric cannot tell the layers apart ranks noise; :attr:`SensitivityReport.
warnings` says so, and report.md, the chart, the JSON and ``str(report)`` lead with it:

- every layer measures the same, within ``resolution`` (the metric's smallest step:
  ``100 / N`` for an accuracy over N samples, so the layers differ by one sample at most;
  exactly the same when the step is not known), or
- a finding of the caller's (``extra_warnings``: the FP32 model predicts one class for
  every input, say).

A model that loses nothing to quantization (no layer gains anything back in float) is
not warned about: its layers still differ, and the report shows the drop and an empty
skip list.

Each report also records where it came from (:mod:`qdq.provenance`: date, qdq version,
command line, machine, device).
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
from qdq.provenance import provenance, provenance_line
from sensitivity.errors import SensitivityError

__all__ = ["LayerRow", "SensitivityReport", "MODES", "sensitivity_score"]

#: Sweep modes and what a row's metric measures in each.
MODES = {
    "leave-one-out": "everything quantized except this layer (float)",
    "one-at-a-time": "only this layer quantized, everything else float",
}

#: Rows drawn in the chart at most (the table lists them all).
CHART_ROWS = 40

#: What to do when the metric cannot tell the layers apart (a command line adds its flags).
ADVICE = ("measure a model with trained weights on real data, with enough evaluation "
          "samples for one layer's effect to show, or with a metric that has finer steps")


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
    #: the metric's smallest step (``100 / N`` for an accuracy over N samples); None:
    #: unknown, only identical values count as indistinguishable
    resolution: float | None = None
    #: the caller's own findings about the metric (shown with :attr:`warnings`)
    extra_warnings: list[str] = field(default_factory=list)
    #: what to do about the warnings (:data:`ADVICE` unless the caller says better)
    advice: str = ADVICE
    #: :func:`qdq.provenance.provenance` of the sweep (filled when written if missing)
    provenance: dict[str, Any] | None = None

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

    @property
    def warnings(self) -> list[str]:
        """Why the ranking cannot be trusted, one sentence each (empty when it can)."""
        return self._indistinct() + list(self.extra_warnings)

    def _indistinct(self) -> list[str]:
        ok = [r for r in self.rows if r.ok]
        if not ok:
            return []
        values = [r.metric for r in ok]
        step = self.resolution
        tol = step * (1 + 1e-9) if step else 1e-9 * max(1.0, *map(abs, values))
        where = f" (the metric's resolution is {step:g})" if step else ""
        spread = max(values) - min(values)
        if len(ok) < 2 or spread > tol:
            return []
        same = (f"{values[0]:.4f}" if spread == 0
                else f"{min(values):.4f} to {max(values):.4f}")
        base = (f", as do FP32 and {self.quantized}"
                if abs(self.fp32 - values[0]) <= tol and abs(self.int8 - values[0]) <= tol
                else "")
        return [f"the metric cannot tell the layers apart: all {len(ok)} layers measure "
                f"{self.metric_name} {same}{base}{where}, so their order is noise"]

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
        d["warnings"] = self.warnings
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensitivityReport:
        d = dict(d)
        d.pop("drop", None)
        d.pop("warnings", None)  # computed from the rows
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
    def _warning_lines(self) -> list[str]:
        """Markdown quote block of the warnings and what to do (empty without warnings)."""
        warnings = self.warnings
        if not warnings:
            return []
        lines = [f"> **Warning:** {w}." for w in warnings]
        lines.append(f"> **What to do:** {self.advice}.")
        return ["\n>\n".join(lines), ""]

    def markdown(self) -> str:
        name = self.metric_name
        lines = [
            f"# Layer sensitivity ({self.mode})",
            "",
            *self._warning_lines(),
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
        if self.provenance:
            lines += ["", provenance_line(self.provenance)]
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
        height = 2.0 + 0.28 * max(len(ok), 1)
        fig = Figure(figsize=(9, height))
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
        title = f"Layer sensitivity, {self.mode}: most sensitive on top{shown}"
        if self.warnings:
            title += "\nWARNING: the metric cannot rank these layers (see report.md)"
        ax.set_title(title, fontsize=10, color="#c0392b" if self.warnings else "black")
        values = [ref + w for w in widths] + [self.fp32, self.int8]
        finite = [v for v in values if math.isfinite(v)]
        lo, hi = min(finite), max(finite)
        pad = 0.12 * (hi - lo) or 0.5
        ax.set_xlim(lo - pad, hi + pad)
        # below the axes, never over a bar or its value
        fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8,
                   frameon=False)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout(rect=(0, 0.35 / height, 1, 1))
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))

    def write(self, folder: str | Path) -> Path:
        """Write every report file into ``folder`` (created if needed); returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.provenance is None:
            self.provenance = provenance()
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
        warnings = [f"WARNING: {w}" for w in self.warnings]
        if warnings:
            warnings.append(f"what to do: {self.advice}")
        return "\n".join([head, *top, *warnings])
