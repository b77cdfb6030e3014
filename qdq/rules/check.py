"""Checking that a rewrite leaves a model's float function unchanged.

The placement rules trace parts of a model with torch.fx, which records one path through
the code: a part whose ``forward`` branches on ``None`` arguments (Hugging Face
embeddings), on shapes or on data is rewritten for the example it was traced with and
may compute something else, or fail, on the real call. So :func:`qdq.rules.apply_rules`
runs the model, every quantizer disabled, before and after, and compares.

A fixed tolerance cannot tell rounding from a change: folding BatchNorm into the convs of
a deep net (resnet152, fcn_resnet50 with BatchNorm statistics from data) moves fp32
outputs by 1e-4 to 1e-3 of their largest value, all of it rounding. So the comparison is
against the model's own noise (:class:`FloatReference`): the original also runs as a
float64 copy, which gives the exact outputs and, against the fp32 ones, how far fp32
rounding alone moves this computation. A rewritten model must stay within
:data:`NOISE_MARGIN` times that of the exact outputs; a rewrite that keeps the weights
(the placement rules) is also run as a float64 copy, where it must match the exact
outputs to float64 rounding. A rewrite that computes something else (a traced
``if x is None`` branch, edited weights) is off by orders of magnitude more.

Example inputs are one :class:`Call`: a tensor, a tuple of positional tensors, or a dict
of keyword arguments (``{"input_ids": ..., "attention_mask": ...}``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from qdq.replace import disable_quantization

__all__ = ["Call", "FloatReference", "float_outputs", "float64_copy", "largest_difference",
           "mismatch", "noise_mismatch", "placeholder_args", "record_calls", "NOISE_FLOOR",
           "NOISE_MARGIN", "TOLERANCE"]

#: Largest difference allowed between float outputs before and after a rewrite, relative
#: to the largest value of the output, where no float64 run measures the noise (and for
#: SmoothQuant's and AWQ's own checks, which pass their own).
TOLERANCE = 1e-4

#: A rewritten model's float outputs may be this many times further from the exact
#: (float64) outputs than the original's are: the same function rounded in another
#: order lands within a small factor of the original's error (0.7x to 1.4x measured
#: after folding resnet50/152, mobilenet_v3, efficientnet_b0 and deeplabv3 with
#: BatchNorm statistics from data), a different function orders of magnitude beyond it.
NOISE_MARGIN = 10.0
#: Differences below this many epsilons of the output's dtype, relative to its largest
#: value, count as rounding even where the original happened to round exactly.
NOISE_FLOOR = 16.0


@dataclass
class Call:
    """Positional and keyword arguments of one model call."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, example_inputs) -> Call | None:
        """A tensor, a tuple/list of arguments, a dict of keyword arguments or a Call
        (None: none)."""
        if example_inputs is None or isinstance(example_inputs, Call):
            return example_inputs
        if isinstance(example_inputs, Mapping):
            return cls((), dict(example_inputs))
        if isinstance(example_inputs, (tuple, list)):
            return cls(tuple(example_inputs), {})
        return cls((example_inputs,), {})

    def __call__(self, module: nn.Module) -> Any:
        return module(*self.args, **self.kwargs)

    def float64(self) -> Call:
        """The same call with every floating tensor (nested in lists, tuples and dicts)
        in float64."""
        return Call(_float64(self.args), _float64(self.kwargs))


def _float64(value):
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {k: _float64(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_float64(v) for v in value)
    return value


def float64_copy(module: nn.Module) -> nn.Module | None:
    """A float64 copy of ``module`` (None when it cannot be copied)."""
    try:
        return copy.deepcopy(module).double()
    except Exception:  # noqa: BLE001 - no copy: the check falls back to TOLERANCE
        return None


def _float64_outputs(copy64: nn.Module | None, call: Call) -> Any:
    """``copy64``'s float outputs on ``call`` in float64; None when it does not run so
    (an op without float64 support, a tensor made in float32 inside ``forward``)."""
    if copy64 is None:
        return None
    try:
        return float_outputs(copy64, call.float64())
    except Exception:  # noqa: BLE001 - any failure means: no exact reference
        return None


@dataclass
class FloatReference:
    """One call's float outputs before a rewrite: in the module's own precision and, when
    a float64 copy runs, exactly (float64). Their difference is the rounding noise a
    rewrite that keeps the function is measured against."""

    call: Call
    outputs: Any
    exact: Any | None = None

    @classmethod
    def of(cls, module: nn.Module, call: Call, outputs: Any = None,
           copy64: nn.Module | None = None) -> FloatReference:
        """Run ``module`` (unless its ``outputs`` are given) and a float64 copy of it
        (``copy64``, or one made here) on ``call``."""
        if outputs is None:
            outputs = float_outputs(module, call)
        if copy64 is None:
            copy64 = float64_copy(module)
        return cls(call, outputs, _float64_outputs(copy64, call))

    def mismatch(self, output: Any) -> str | None:
        """None when ``output`` (the rewritten module's, in its own precision) is within
        the noise of the exact outputs; else what differs. Without exact outputs:
        :func:`mismatch` with :data:`TOLERANCE`."""
        if self.exact is None:
            return mismatch(self.outputs, output)
        return noise_mismatch(self.outputs, self.exact, output)

    def exact_mismatch(self, module64: nn.Module | None) -> str | None:
        """None when the float64 copy ``module64`` of the rewritten module gives the exact
        outputs up to float64 rounding (or cannot run in float64); else what differs."""
        if self.exact is None:
            return None
        output = _float64_outputs(module64, self.call)
        if output is None:
            return None
        return noise_mismatch(self.outputs, self.exact, output, exact_run=True)


def float_outputs(module: nn.Module, call: Call) -> Any:
    """``module``'s outputs on ``call`` with every quantizer disabled."""
    with torch.no_grad(), disable_quantization(module):
        return call(module)


def _flat(value, path: str = "output") -> list[tuple[str, Any]]:
    if isinstance(value, torch.Tensor) or value is None:
        return [(path, value)]
    if isinstance(value, Mapping):
        return [item for key, v in value.items() for item in _flat(v, f"{path}.{key}")]
    if isinstance(value, (tuple, list)):
        return [item for i, v in enumerate(value) for item in _flat(v, f"{path}[{i}]")]
    return [(path, value)]


def _aligned(reference, output) -> tuple[list[tuple[str, torch.Tensor, torch.Tensor]],
                                          str | None]:
    """The floating tensors of ``reference`` and ``output`` side by side, or why the two
    differ beyond float values (structure, types, shapes, integers, non-finite places)."""
    ref, out = _flat(reference), _flat(output)
    if [p for p, _ in ref] != [p for p, _ in out]:
        return [], f"outputs differ in structure ({len(ref)} vs {len(out)} values)"
    pairs = []
    for (path, a), (_, b) in zip(ref, out, strict=True):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return [], f"{path}: {type(a).__name__} became {type(b).__name__}"
        if not isinstance(a, torch.Tensor):
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return [], f"{path}: {a.dtype}{list(a.shape)} became {b.dtype}{list(b.shape)}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return [], f"{path}: integer values changed"
            continue
        if a.numel() == 0:
            continue
        if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
            return [], f"{path}: non-finite values moved"
        pairs.append((path, a.detach(), b.detach()))
    return pairs, None


def mismatch(reference, output, tolerance: float = TOLERANCE) -> str | None:
    """None when ``output`` equals ``reference`` (nested tensors, within ``tolerance``
    of each tensor's largest value); otherwise what differs, in a few words."""
    pairs, why = _aligned(reference, output)
    if why is not None:
        return why
    for path, a, b in pairs:
        scale = float(a.abs().max())
        finite = torch.isfinite(a)
        diff = float((a - b)[finite].abs().max()) if finite.any() else 0.0
        if diff > tolerance * max(scale, 1e-12):
            return f"{path}: max difference {diff:.3g} (largest value {scale:.3g})"
    return None


def noise_mismatch(reference, exact, output, exact_run: bool = False) -> str | None:
    """None when ``output`` is as close to ``exact`` as rounding allows; otherwise what
    differs, in a few words.

    ``reference`` is the original's outputs in its own precision, ``exact`` the same in
    float64: per tensor, their largest difference is the noise. ``output`` (same
    precision as ``reference``) may be up to :data:`NOISE_MARGIN` times the noise from
    ``exact``; with ``exact_run`` it is a float64 run of the rewrite and the bound is
    scaled down to float64 rounding. Differences under :data:`NOISE_FLOOR` epsilons of
    the largest value always pass.
    """
    pairs, why = _aligned(exact if exact_run else reference, output)
    if why is not None:
        return why
    ref, ex = dict(_flat(reference)), dict(_flat(exact))
    for path, _, b in pairs:
        r, e = ref.get(path), ex.get(path)
        if not isinstance(e, torch.Tensor) or not isinstance(r, torch.Tensor) \
                or e.shape != b.shape or r.shape != b.shape:
            return f"{path}: the float64 run gave another structure"
        eps = torch.finfo(r.dtype).eps
        e, b, r = e.detach().double(), b.double(), r.detach().double()
        finite = torch.isfinite(e) & torch.isfinite(r) & torch.isfinite(b)
        if not finite.any():
            continue
        e, b, r = e[finite], b[finite], r[finite]
        scale = float(e.abs().max())
        noise = float((r - e).abs().max())
        unit = torch.finfo(torch.float64).eps / eps if exact_run else 1.0
        bound = (NOISE_MARGIN * noise + NOISE_FLOOR * eps * scale) * unit
        diff = float((b - e).abs().max())
        if diff > bound:
            where = "the float64 run" if exact_run else "the outputs"
            return (f"{path}: {where} differ from float64 by {diff:.3g}, "
                    f"{diff / max(noise * unit, 1e-300):.3g}x the float rounding noise "
                    f"{noise * unit:.3g} (largest value {scale:.3g})")
    return None


def largest_difference(reference, output) -> float:
    """The largest difference of any floating output tensor, relative to its largest value
    (same structure assumed: check :func:`mismatch` first)."""
    worst = 0.0
    for (_, a), (_, b) in zip(_flat(reference), _flat(output), strict=True):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel() \
                and isinstance(b, torch.Tensor) and a.shape == b.shape:
            scale = max(float(a.detach().abs().max()), 1e-12)
            worst = max(worst, float((a.detach() - b.detach()).abs().max()) / scale)
    return worst


def record_calls(model: nn.Module, paths: list[str], call: Call) -> dict[str, tuple[Call, Any]]:
    """Run ``model`` in float on ``call``; return, for each module path in ``paths``, its
    first call (arguments) and its outputs."""
    seen: dict[str, tuple[Call, Any]] = {}
    handles = []

    def hook(path):
        def record(module, args, kwargs, output):
            if path not in seen:
                seen[path] = (Call(tuple(args), dict(kwargs)), output)
        return record

    for path in paths:
        module = model.get_submodule(path) if path else model
        handles.append(module.register_forward_hook(hook(path), with_kwargs=True))
    try:
        float_outputs(model, call)
    finally:
        for h in handles:
            h.remove()
    return seen


def placeholder_args(gm: fx.GraphModule, call: Call) -> list | None:
    """The call's arguments in the graph's placeholder order (keywords by name, defaults
    filled in), or None when one is missing."""
    out = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        if i < len(call.args):
            out.append(call.args[i])
        elif node.target in call.kwargs:
            out.append(call.kwargs[node.target])
        elif node.args:
            out.append(node.args[0])
        else:
            return None
    return out
