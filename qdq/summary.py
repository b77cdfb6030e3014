"""``summary(model)``: every quantizer of a model as rows, or as a text table.

A row tells where the quantizer sits (module path and role), how it quantizes (bits,
axis), what it learned (amax range), how that amax was found, its state, which other
module paths share the same quantizer object and which placement rule put it there.

``calibrator`` names the search behind the amax the quantizer holds (``max``,
``entropy``, ``mse``, ``percentile-99.99``; ``set`` by hand, ``+learned`` after QAT,
``unknown`` for an amax loaded from a file that did not record it), not the calibrator
its descriptor asks for: a run that calibrated the activations with percentile-99.99
through histograms shows ``percentile-99.99`` although the descriptors say ``max``.
A quantizer without amax shows what it would collect with, in brackets:
``(histogram)``, ``(max)``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from torch import nn

from qdq.calib import CalibrationError, calib_method_of
from qdq.layer_kinds import float_layers
from qdq.replace import name_quantizers, quantizer_paths

__all__ = ["QuantizerRow", "summary", "summary_rows"]

_ROLE = re.compile(r"_?(?P<role>[a-z0-9_]+?)_quantizers?$")


@dataclass
class QuantizerRow:
    name: str
    module: str
    role: str
    bits: int | tuple[int, int]  # (4, 3): FP8 E4M3
    axis: str
    amax_min: float | None
    amax_max: float | None
    calibrator: str
    state: str
    shared_with: list[str] = field(default_factory=list)
    placed_by: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _split(name: str) -> tuple[str, str]:
    parts = name.split(".")
    # ModuleList members look like "lstm._input_quantizers.0"
    if parts[-1].isdigit() and len(parts) > 1:
        attr, index = parts[-2], parts[-1]
        module = ".".join(parts[:-2])
        m = _ROLE.match(attr)
        return module, f"{m.group('role') if m else attr}[{index}]"
    module = ".".join(parts[:-1])
    m = _ROLE.match(parts[-1])
    return module, m.group("role") if m else parts[-1]


def summary_rows(model: nn.Module) -> list[QuantizerRow]:
    """One row per distinct quantizer, in model order."""
    name_quantizers(model)
    rows = []
    for q, (first, *others) in quantizer_paths(model):
        module, role = _split(first)
        amax = q.amax
        rows.append(QuantizerRow(
            name=first,
            module=module,
            role=role,
            bits=q.num_bits,
            axis="tensor" if q.axis is None else str(q.axis),
            amax_min=None if amax is None else float(amax.min()),
            amax_max=None if amax is None else float(amax.max()),
            calibrator=_calibrated_by(q),
            state=q.state(),
            shared_with=others,
            placed_by=q.placed_by,
        ))
    return rows


def _calibrated_by(q) -> str:
    """How the quantizer's amax was found (see the module docstring)."""
    if q.amax is not None:
        return q.calibrated_by or "unknown"
    if q.calibrator is None:
        return "-"
    try:
        kind = calib_method_of(q.calibrator)
    except CalibrationError:  # a calibrator of the user's own
        kind = type(q.calibrator).__name__
    return f"({kind})"


def _fmt_amax(row: QuantizerRow) -> str:
    if row.amax_min is None:
        return "-"
    if row.amax_min == row.amax_max:
        return f"{row.amax_max:.4g}"
    return f"{row.amax_min:.3g}..{row.amax_max:.3g}"


def summary(model: nn.Module) -> str:
    """A text table of :func:`summary_rows`, a count line, and every layer left float
    with the reason (``!`` marks the reasons to look at)."""
    rows = summary_rows(model)
    header = ["module", "role", "bits", "axis", "amax", "calib", "state", "shared", "rule"]
    table = [header] + [[
        r.module or "(root)", r.role, "fp8" if isinstance(r.bits, tuple) else str(r.bits),
        r.axis, _fmt_amax(r), r.calibrator, r.state,
        ",".join(r.shared_with) if r.shared_with else "", r.placed_by or "",
    ] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
             for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    on = sum(r.state != "off" for r in rows)
    calibrated = sum(r.amax_max is not None for r in rows)
    lines.append(f"{len(rows)} quantizers: {on} enabled, {calibrated} with amax, "
                 f"{sum(bool(r.shared_with) for r in rows)} shared")
    attention = [r for r in rows if r.placed_by == "attention" and r.role in ("input", "other")
                 and r.module.rsplit(".", 1)[-1] in ("qk", "av")]
    if attention:
        lines.append(f"attention matmuls (q @ k^T, attn @ v): {len(attention) // 2}, "
                     f"{sum(r.state != 'off' for r in attention)} of {len(attention)} "
                     "operands quantized")
    lines.extend(float_layer_lines(model))
    return "\n".join(lines)


def float_layer_lines(model: nn.Module, ignore=None) -> list[str]:
    """Every layer left float (:func:`qdq.layer_kinds.float_layers`), grouped by reason,
    each named in full; the unexpected reasons first."""
    found = float_layers(model, ignore)
    if not found:
        return ["layers with weights left float: none"]
    groups: dict[tuple[bool, str], list[str]] = {}
    for layer in found:
        groups.setdefault((layer.expected, layer.reason), []).append(
            f"{layer.name} ({layer.kind})")
    lines = [f"layers with weights left float: {len(found)}"]
    for (expected, reason), names in sorted(groups.items(), key=lambda kv: kv[0][0]):
        mark = "  " if expected else "! "
        lines.append(f"{mark}{reason}: {', '.join(names)}")
    return lines
