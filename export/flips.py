"""Rounding flips: which code differences between two runtimes float noise explains.

Two runtimes that compute the same function sum in different orders, so the value at a
quantizer's input differs between them by float noise. Where a rounding boundary lies
between the two values, the codes differ: a *flip*. The rule, the same for every format:

    a flip is explained when every boundary it crosses lies within the float-noise
    allowance of PyTorch's value, and the two inputs differ by no more than it anywhere.

The allowance is absolute, one per tensor: :data:`NOISE_REL` times the tensor's magnitude
(its largest value, or amax if larger). fp32 has a 6e-8 unit round-off; a sum of thousands
of terms in another order drifts by a few hundred of them. A real difference (a changed
weight, a missing op) is far larger.

What the allowance means in codes depends on the grid, and is measured with the *local
step*: the spacing of the two grid points a boundary separates.

* INT8: uniform, local step = the scale, boundaries at ``k + 0.5``. At magnitude amax the
  allowance is ``127e-4`` steps: a flip crosses one code.
* FP8 E4M3: the local step is ``scale * 2^(e - 3)`` for ``|x| / scale`` in
  ``[2^e, 2^(e+1))``, and ``scale * 2^-9`` below ``2^-6`` (subnormals). At the top of the
  range the allowance is a small part of a step (one code); near zero it spans tens of
  steps, so float noise can cross several codes there, which is still only float noise.

Each flip's *margin* is the distance from PyTorch's value to the farthest boundary it
crossed, in local steps and in the float domain (compared with the allowance); the worst
flip of every quantizer is kept, with the codes the allowance can cross at its value.

Example::

    stats = flip_stats("fc._input_quantizer", "/fc/QuantizeLinear", quantizer,
                       x_torch, x_ort, dq_ort)
    assert stats.boundary_only, stats.why_not()
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from qdq.fp8 import fp8_codes, round_to_fp8
from qdq.tensor_quant import quant_bounds

__all__ = ["NOISE_REL", "Grid", "grid_of", "Flip", "QuantizerFlips", "flip_stats",
           "NonFiniteError"]

#: Float noise allowed between the two runtimes' values at a quantizer input, relative to
#: the tensor's magnitude (its largest value, or amax if larger).
NOISE_REL = 1e-4


class NonFiniteError(ValueError):
    """A quantizer input holds NaN or Inf: there is no code to compare."""


# ----------------------------------------------------------------------------- grids
@dataclass(frozen=True)
class Grid:
    """A quantizer's grid in units of its scale, codes numbered in order one apart."""

    name: str
    qmin: int = -128
    qmax: int = 127

    @property
    def fp8(self) -> bool:
        return self.name == "fp8"

    def codes(self, r: torch.Tensor) -> torch.Tensor:
        """``r`` (value / scale) rounded onto the grid (saturating) as int64 codes."""
        if self.fp8:
            return fp8_codes(round_to_fp8(r.float()))
        return torch.round(r.double()).clamp(self.qmin, self.qmax).to(torch.int64)

    def value(self, codes: torch.Tensor) -> torch.Tensor:
        """The grid point (in units of the scale, float64) of each code."""
        if not self.fp8:
            return codes.double()
        magnitude = codes.abs().to(torch.uint8).view(torch.float8_e4m3fn).double()
        return torch.where(codes < 0, -magnitude, magnitude)

    def step_text(self, step: float) -> str:
        """A local step (in units of the scale) in words."""
        if not self.fp8:
            return "1 x scale (uniform grid)"
        power = round(math.log2(step)) if step > 0 else 0
        kind = "subnormal" if power == -9 else "8 steps per power of two"
        return f"2^{power} x scale (E4M3, {kind})"


def grid_of(quantizer) -> Grid:
    """INT8 (its integer range) or FP8 E4M3, as ``quantizer`` rounds."""
    if getattr(quantizer, "is_fp8", False):
        return Grid("fp8", -126, 126)
    qmin, qmax, _ = quant_bounds(quantizer.num_bits, quantizer.unsigned,
                                 quantizer.narrow_range)
    return Grid(f"int{quantizer.num_bits}", int(qmin), int(qmax))


# ----------------------------------------------------------------------------- stats
@dataclass(frozen=True)
class Flip:
    """One flipped value: PyTorch's and ONNX Runtime's inputs and codes, and its margin."""

    torch_value: float  # PyTorch's input (float domain)
    ort_value: float  # ONNX Runtime's input
    torch_code: int
    ort_code: int
    scale: float
    local_step: float  # spacing of the grid at the farthest boundary crossed, / scale
    margin_steps: float  # PyTorch's value to that boundary, in local steps
    margin: float  # the same distance in the float domain
    allowed_codes: int  # codes the float-noise allowance can cross from PyTorch's value

    @property
    def codes(self) -> int:
        return abs(self.ort_code - self.torch_code)

    @property
    def difference(self) -> float:
        return abs(self.torch_value - self.ort_value)


@dataclass
class QuantizerFlips:
    """One activation quantizer call, from the forced and the free run."""

    name: str
    node: str
    elements: int
    flips: int  # forced run: values whose code differs
    max_flip_steps: int  # forced run: most codes one flip crosses
    max_boundary_distance: float  # forced run: largest margin of a flip, in local steps
    max_input_diff_steps: float  # forced run: largest |x_torch - x_ort| / scale
    noise_limit_steps: float  # float noise allowed for this tensor, / scale
    qdq_mismatches: int  # torch quantizer on ORT's input vs ORT's DequantizeLinear output
    free_differing: int | None = None  # free run: values whose code differs
    grid: str = "int8"
    noise: float = 0.0  # float noise allowed (float domain)
    max_input_diff: float = 0.0  # largest |x_torch - x_ort| (float domain)
    unexplained: int = 0  # flips whose farthest boundary lies beyond the allowance
    worst: Flip | None = None  # the flip with the largest margin in the float domain

    @property
    def boundary_only(self) -> bool:
        """Every flip is explained by float noise (module docstring): the inputs agree to
        the allowance everywhere, and each flip crosses only boundaries within it."""
        return self.max_input_diff <= self.noise and self.unexplained == 0

    @property
    def noise_used(self) -> float:
        """Largest input difference as a fraction of the allowance (<= 1: float noise)."""
        return self.max_input_diff / self.noise if self.noise > 0 else math.inf

    def why_not(self) -> str:
        """Why the flips are not explained, in numbers (empty when they are)."""
        if self.boundary_only:
            return ""
        parts = []
        if self.max_input_diff > self.noise:
            parts.append(f"inputs differ by up to {self.max_input_diff:.3g}, "
                         f"{self.noise_used:.3g}x the float noise allowed ({self.noise:.3g})")
        if self.unexplained:
            parts.append(f"{self.unexplained} flips cross a boundary beyond the float noise "
                         "allowed")
        return f"{self.name}: " + "; ".join(parts)


@contextlib.contextmanager
def _without_pre_scale(quantizer):
    """The quantizer without its ``pre_quant_scale`` (ONNX Runtime's Q input is already
    multiplied by it); restored however the block ends."""
    pre = getattr(quantizer, "pre_quant_scale", None)
    if pre is None:
        yield
        return
    quantizer.pre_quant_scale = None
    try:
        yield
    finally:
        quantizer.pre_quant_scale = pre


def effective_input(quantizer, x: torch.Tensor) -> torch.Tensor:
    """What the quantizer rounds: ``x`` times its ``pre_quant_scale`` when it has one."""
    pre = getattr(quantizer, "pre_quant_scale", None)
    return x if pre is None else x * pre.to(device=x.device, dtype=x.dtype)


def _check_finite(name: str, node: str, **tensors: torch.Tensor) -> None:
    for who, t in tensors.items():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            raise NonFiniteError(
                f"quantizer {name} (Q node {node}): {who}'s input holds {int(bad.sum())} "
                f"non-finite values (NaN/Inf) of {t.numel()}; no code can be compared "
                "(look for NaN/Inf weights, amax or inputs)")


def flip_stats(name: str, node: str, quantizer, x_torch: torch.Tensor, x_ort: torch.Tensor,
               dq_ort: torch.Tensor, free_out: torch.Tensor | None = None) -> QuantizerFlips:
    """The flips of one quantizer call (CPU tensors): ``x_torch`` is PyTorch's input to the
    quantizer (before any ``pre_quant_scale``), ``x_ort`` and ``dq_ort`` ONNX Runtime's
    QuantizeLinear input and DequantizeLinear output, ``free_out`` the quantizer's output in
    the free run. Raises :class:`NonFiniteError` naming the quantizer on NaN/Inf input."""
    grid = grid_of(quantizer)
    scale32 = quantizer.step_size.detach().float().cpu()
    scale = scale32.double()
    with torch.no_grad():
        x_t = effective_input(quantizer, x_torch.float())
        _check_finite(name, node, PyTorch=x_t, **{"ONNX Runtime": x_ort})
        with _without_pre_scale(quantizer):
            fq_t = quantizer(x_t).float()
            same_input = quantizer(x_ort).float()
    qdq_mismatches = int((same_input != dq_ort).sum())
    q_t = grid.codes(fq_t / scale32)
    q_o = grid.codes(dq_ort / scale32)
    x_t64, x_o64 = x_t.double(), x_ort.double()
    diff = (x_t64 - x_o64).abs()
    amax = quantizer.amax
    magnitude = max(float(x_o64.abs().max()) if x_o64.numel() else 0.0,
                    float(amax.detach().abs().max()) if amax is not None else 0.0)
    noise = NOISE_REL * magnitude
    flipped = q_t != q_o
    free_differing = None
    if free_out is not None and free_out.shape == dq_ort.shape:
        free_differing = int((grid.codes(free_out.float() / scale32) != q_o).sum())
    stats = QuantizerFlips(
        name=name, node=node, elements=int(x_t.numel()), flips=int(flipped.sum()),
        max_flip_steps=0, max_boundary_distance=0.0,
        max_input_diff_steps=float((diff / scale).max()) if diff.numel() else 0.0,
        noise_limit_steps=noise / float(scale.min()), qdq_mismatches=qdq_mismatches,
        free_differing=free_differing, grid=grid.name, noise=noise,
        max_input_diff=float(diff.max()) if diff.numel() else 0.0)
    if stats.flips:
        _margins(stats, grid, flipped, q_t, q_o, x_t64, x_o64, scale.expand_as(x_t64))
    return stats


def _margins(stats: QuantizerFlips, grid: Grid, flipped, q_t, q_o, x_t, x_o, scale) -> None:
    """Fill in the flips' margins: the farthest boundary each crossed is the one next to
    ONNX Runtime's code, on PyTorch's side."""
    qt, qo, s = q_t[flipped], q_o[flipped], scale[flipped]
    rt = x_t[flipped] / s
    toward = torch.sign(qo - qt)
    v_o, v_in = grid.value(qo), grid.value(qo - toward)
    step = (v_o - v_in).abs()
    distance = (rt - (v_o + v_in) / 2).abs()
    margin = distance * s
    steps = distance / step
    stats.max_flip_steps = int((qo - qt).abs().max())
    stats.max_boundary_distance = float(steps.max())
    stats.unexplained = int((margin > stats.noise).sum())
    i = int(margin.argmax())
    reach = rt[i] + toward[i] * stats.noise / s[i]
    allowed = int((grid.codes(reach.reshape(1)) - qt[i]).abs())
    stats.worst = Flip(torch_value=float(x_t[flipped][i]), ort_value=float(x_o[flipped][i]),
                       torch_code=int(qt[i]), ort_code=int(qo[i]), scale=float(s[i]),
                       local_step=float(step[i]), margin_steps=float(steps[i]),
                       margin=float(margin[i]), allowed_codes=allowed)


# ------------------------------------------------------------------------ explanation
def explain(calls: list[QuantizerFlips]) -> list[str]:
    """Why the flips of ``calls`` are float noise, with the actual margins (the worst flip,
    and the input difference closest to the allowance), or which calls are not explained
    and why: a few lines."""
    bad = [q for q in calls if not q.boundary_only]
    if bad:
        more = [f"  (and {len(bad) - 5} more)"] if len(bad) > 5 else []
        return (["NOT all explained by float noise at a rounding boundary:"]
                + [f"  {q.why_not()}" for q in bad[:5]] + more)
    used = max(calls, key=lambda q: q.noise_used)
    lines = [f"every flip explained by float noise ({NOISE_REL:.0e} of each tensor's "
             "magnitude allowed):",
             f"  inputs differ by at most {used.noise_used:.2g} of the allowance "
             f"({used.name})"]
    flipped = [q for q in calls if q.flips]
    if not flipped:
        return lines
    worst = max(flipped, key=lambda q: q.worst.margin / q.noise if q.noise else math.inf)
    f = worst.worst
    grid = Grid(worst.grid)
    s = "s" if f.codes != 1 else ""
    can = "s" if f.allowed_codes != 1 else ""
    lines.append(
        f"  farthest boundary crossed: {worst.name}, {grid.name.upper()} code "
        f"{f.torch_code} -> {f.ort_code} ({f.codes} code{s}) at x = {f.torch_value:.4g} "
        f"({f.torch_value / f.scale:.4g} x scale), local step {grid.step_text(f.local_step)}:"
        f" the boundary lies {f.margin_steps:.3g} local steps ({f.margin:.3g}) from "
        f"PyTorch's value; ONNX Runtime's value differs by {f.difference:.3g}; allowance "
        f"{worst.noise:.3g}, which can cross {f.allowed_codes} code{can} there")
    return lines
