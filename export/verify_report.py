"""What :func:`export.verify` found: output differences, flips, weights, and the verdict.

An output is compared by max abs difference and relative L2, plus what fits its kind:
output quantization steps (straight out of a DequantizeLinear), top-1 agreement (class
logits), or the cosine of mean-pooled embeddings (a text encoder's token outputs: the rows
of ``[batch, tokens, hidden]`` averaged over the tokens its ``attention_mask`` keeps, the
sentence embedding every text metric of the app uses). A text encoder's 2-D outputs other
than ``logits`` (``pooler_output``) are embeddings, not classes: no top-1 there.

The verdict (:meth:`VerifyReport.ok`) depends only on the forced run: exact Q/DQ on
identical input, every flip explained by float noise on its own grid (:mod:`export.flips`),
forced outputs within ``rel_l2``, weight-only weights bit-equal. None of these grows with
the batch, so the same files give the same verdict on any batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export.flips import QuantizerFlips, explain
from qdq.formats import FORMATS

__all__ = ["OutputDiff", "WeightCheck", "VerifyReport", "output_diff"]


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    rel_l2: float
    max_steps: float | None = None  # when the output comes straight from a DequantizeLinear
    top1: float | None = None  # fraction of rows with the same argmax (classifiers)
    cosine_min: float | None = None  # text encoders: mean-pooled embeddings, per sentence
    cosine_mean: float | None = None

    def line(self) -> str:
        parts = [f"max abs {self.max_abs:.3g}", f"rel L2 {self.rel_l2:.3g}"]
        if self.max_steps is not None:
            parts.append(f"max {self.max_steps:.3g} output steps")
        if self.top1 is not None:
            parts.append(f"top-1 agreement {100 * self.top1:.1f}%")
        if self.cosine_min is not None:
            parts.append(f"cosine of mean-pooled embeddings min {self.cosine_min:.6f}, mean "
                         f"{self.cosine_mean:.6f}")
        return f"{self.name}: " + ", ".join(parts)


def _pooled(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the token vectors the mask keeps (one row per sentence), float64."""
    keep = mask.astype(np.float64)[..., None]
    return (tokens * keep).sum(1) / np.maximum(keep.sum(1), 1.0)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(1)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0),
                    (np.abs(a - b).max(1) == 0).astype(np.float64))


def output_diff(name: str, ours: np.ndarray, theirs: np.ndarray, step: float | None,
                classifier: bool | None, mask: np.ndarray | None = None) -> OutputDiff:
    """``ours`` against ``theirs`` (whose norm scales the rel L2). ``classifier``: top-1 of 2-D
    outputs (None: for 2-D outputs with more than one column, unless ``mask`` says it is a
    text model, where only ``logits`` is); ``mask``: the attention mask of a text model,
    whose ``[batch, tokens, hidden]`` outputs are scored by pooled-embedding cosine."""
    ours = ours.astype(np.float64)
    theirs = theirs.astype(np.float64)
    delta = np.abs(ours - theirs)
    norm = float(np.linalg.norm(theirs))
    rel = float(np.linalg.norm(ours - theirs)) / norm if norm > 0 else float(delta.max() > 0)
    if classifier is None:
        classifier = (ours.ndim == 2 and ours.shape[1] > 1
                      and (mask is None or name.split(".")[-1] == "logits"))
    top1 = None
    if classifier and ours.ndim == 2:
        top1 = float(np.mean(ours.argmax(1) == theirs.argmax(1)))
    cos_min = cos_mean = None
    if mask is not None and ours.ndim == 3 and ours.shape[:2] == mask.shape:
        cos = _cosines(_pooled(ours, mask), _pooled(theirs, mask))
        cos_min, cos_mean = float(cos.min()), float(cos.mean())
    steps = float(delta.max() / step) if step else None
    return OutputDiff(name, float(delta.max()) if delta.size else 0.0, rel, steps, top1,
                      cos_min, cos_mean)


@dataclass
class WeightCheck:
    """One weight-only weight: ONNX Runtime's DequantizeLinear output vs PyTorch's."""

    name: str
    node: str
    elements: int
    mismatches: int  # values that differ (expected 0: same integers, same scales)
    max_abs: float


@dataclass
class VerifyReport:
    onnx_path: Path
    shapes: list[list[int]]
    outputs: list[OutputDiff]
    forced_outputs: list[OutputDiff] = field(default_factory=list)
    quantizers: list[QuantizerFlips] = field(default_factory=list)
    unmatched_quantizers: list[str] = field(default_factory=list)
    #: quantizer calls whose input does not depend on the model's inputs (a position-bias
    #: table): the exporter folds their Q/DQ into a constant, so they have no Q node
    folded_constants: list[str] = field(default_factory=list)
    noise_floor_rel_l2: float | None = None
    #: the graph's format (``export.formats.onnx_format``)
    format: str = "int8"
    weights: list[WeightCheck] = field(default_factory=list)
    unmatched_weights: list[str] = field(default_factory=list)

    @property
    def weight_mismatches(self) -> int:
        return sum(w.mismatches for w in self.weights)

    @property
    def max_abs(self) -> float:
        return max(o.max_abs for o in self.outputs)

    @property
    def rel_l2(self) -> float:
        return max(o.rel_l2 for o in self.outputs)

    @property
    def top1(self) -> float | None:
        values = [o.top1 for o in self.outputs if o.top1 is not None]
        return min(values) if values else None

    @property
    def cosine(self) -> float | None:
        """Text encoders: the lowest cosine of a sentence's mean-pooled embedding between
        ONNX Runtime and PyTorch (free run); None for other models."""
        values = [o.cosine_min for o in self.outputs if o.cosine_min is not None]
        return min(values) if values else None

    @property
    def cosine_mean(self) -> float | None:
        values = [o.cosine_mean for o in self.outputs if o.cosine_mean is not None]
        return min(values) if values else None

    @property
    def forced_rel_l2(self) -> float | None:
        return max((o.rel_l2 for o in self.forced_outputs), default=None)

    @property
    def flips(self) -> int:
        return sum(q.flips for q in self.quantizers)

    @property
    def qdq_mismatches(self) -> int:
        return sum(q.qdq_mismatches for q in self.quantizers)

    @property
    def only_boundary_flips(self) -> bool:
        """Every forced-run difference is a flip that float noise explains (any number of
        codes the noise can cross on the quantizer's grid)."""
        return all(q.boundary_only for q in self.quantizers)

    def problems(self, rel_l2: float = 1e-3) -> list[str]:
        """What stops the verdict "same function", one phrase each (empty: ok)."""
        found = []
        if self.qdq_mismatches:
            found.append(f"{self.qdq_mismatches} Q/DQ mismatches on identical input")
        if not self.only_boundary_flips:
            bad = sum(not q.boundary_only for q in self.quantizers)
            found.append(f"flips not explained by float noise in {bad} quantizer calls")
        if self.unmatched_quantizers:
            found.append(f"{len(self.unmatched_quantizers)} quantizer calls without a Q node")
        forced = self.forced_rel_l2
        if forced is None:
            found.append("no forced run")
        elif not forced <= rel_l2:
            found.append(f"forced outputs differ by rel L2 {forced:.3g} > {rel_l2:g}")
        if self.weight_mismatches:
            found.append(f"{self.weight_mismatches} weight values differ")
        if self.unmatched_weights:
            found.append(f"{len(self.unmatched_weights)} weights without a DequantizeLinear")
        return found

    def ok(self, rel_l2: float = 1e-3) -> bool:
        """Same function: exact Q/DQ, flips explained by float noise, forced outputs within
        ``rel_l2``, weights equal."""
        return not self.problems(rel_l2)

    def verdict(self, rel_l2: float = 1e-3) -> str:
        """One phrase for tables: ``same (...)`` with the evidence, or ``NO (...)``."""
        problems = self.problems(rel_l2)
        if problems:
            return f"NO ({'; '.join(problems)})"
        if self.quantizers:
            return (f"same ({self.flips} float-noise flips, forced rel L2 "
                    f"{self.forced_rel_l2:.1e})")
        if self.weights:
            return f"same ({len(self.weights)} weights equal)"
        return "same (no Q/DQ)"

    def __str__(self) -> str:
        title = FORMATS[self.format].title if self.format in FORMATS else self.format
        lines = [f"ONNX Runtime vs PyTorch on {self.onnx_path.name} ({title}), inputs "
                 f"{self.shapes}", "free run (both from the same inputs):"]
        lines += [f"  {o.line()}" for o in self.outputs]
        if self.noise_floor_rel_l2 is not None:
            lines.append(f"  noise floor (PyTorch vs PyTorch, oneDNN/cuDNN off): rel L2 "
                         f"{self.noise_floor_rel_l2:.3g}")
        if self.forced_outputs and not self.quantizers:
            lines.append("forced run: no activation quantizer to force, the same as the free "
                         "run")
        elif self.forced_outputs:
            lines.append("forced run (PyTorch takes ONNX Runtime's quantized activations):")
            lines += [f"  {o.line()}" for o in self.forced_outputs]
        if self.quantizers:
            lines += self._flip_lines()
        if self.unmatched_quantizers:
            lines.append("  no Q node of the same shape and scale for:")
            lines += [f"    {name}" for name in self.unmatched_quantizers]
        if self.folded_constants:
            lines.append("  read a constant (the same on other inputs), so the exporter folded "
                         "their Q/DQ into the graph's constants; the outputs above cover them:")
            lines += [f"    {name}" for name in self.folded_constants]
        if self.weights:
            total = sum(w.elements for w in self.weights)
            lines.append(f"weights: {len(self.weights)} DequantizeLinear ({total} values) vs "
                         f"the layers' dequantized weights: {self.weight_mismatches} differ")
        if self.unmatched_weights:
            lines.append("  no DequantizeLinear for the weights of:")
            lines += [f"    {name}" for name in self.unmatched_weights]
        return "\n".join(lines)

    def _flip_lines(self) -> list[str]:
        """The flip summary, its explanation, and one row per call; names come last on
        the row and in full, however long."""
        flipped = sum(1 for q in self.quantizers if q.flips)
        lines = [f"  {len(self.quantizers)} activation quantizer calls: Q/DQ mismatches on "
                 f"identical input {self.qdq_mismatches}; {self.flips} rounding flips in "
                 f"{flipped} of them"]
        lines += [f"  {line}" for line in explain(self.quantizers)]
        lines += ["  codes: most codes one flip crosses; margin: farthest boundary a flip "
                  "crossed from PyTorch's value, in local grid steps; dx/noise: largest "
                  "input difference over the float noise allowed",
                  f"  {'elements':>9} {'flips':>6} {'codes':>5} {'margin':>8} "
                  f"{'dx/noise':>8} {'free diff':>9}  quantizer"]
        for q in self.quantizers:
            free = "-" if q.free_differing is None else f"{q.free_differing / q.elements:.2%}"
            codes = str(q.max_flip_steps) if q.flips else "-"
            margin = f"{q.max_boundary_distance:.2g}" if q.flips else "-"
            flag = "" if q.boundary_only else "   <- NOT explained"
            lines.append(f"  {q.elements:>9} {q.flips:>6} {codes:>5} {margin:>8} "
                         f"{q.noise_used:>8.2g} {free:>9}  {q.name}{flag}")
        return lines
