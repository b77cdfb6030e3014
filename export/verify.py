"""``verify``: run the exported ONNX file in ONNX Runtime (CPU) and PyTorch on the same inputs.

Why two comparisons. A quantized network is a step function of its float values: a value
that sits within float rounding of a ``k + 0.5`` boundary rounds to ``k`` in one runtime
and to ``k + 1`` in the other, because the two runtimes sum a convolution in a different
order (a 1-ulp difference). In a deep network each such flip moves every value it feeds
by one weight times one step, which pushes more values across boundaries downstream: the
free-running outputs drift apart even though both runtimes compute the same function.
PyTorch run against itself with another convolution kernel drifts just as far.

So ``verify`` reports:

* **free run**: both runtimes from the same inputs (max abs diff, relative L2, diff in
  output quantization steps where an output comes straight out of a DequantizeLinear,
  top-1 agreement for classifiers);
* **forced run**: PyTorch again, but every activation quantizer hands on ONNX Runtime's
  own quantized tensor, so flips cannot cascade. For every quantizer it counts the
  values whose integer differs and checks each one is a rounding-boundary flip: one
  step, with the PyTorch value within float noise of a ``k + 0.5`` boundary. It also
  applies the PyTorch quantizer to ONNX Runtime's own input and counts mismatches
  (QuantizeLinear/DequantizeLinear semantics: expected 0).
* optionally the **noise floor**: PyTorch against PyTorch with oneDNN/cuDNN off.

Formats (:mod:`qdq.formats`): FP8 E4M3 quantizers get the same analysis on their own grid
(a step is one E4M3 grid position, a boundary the midpoint between two of them). A
weight-only graph has no activation quantizer, so its forced run is the free run; instead
every weight DequantizeLinear is compared with the layer's dequantized weight (expected:
equal, bit for bit); one that dequantizes gathered embedding rows, with those rows.

Quantizers are matched to Q nodes through the scope names the TorchScript exporter gives
them (``/layer1/layer1.0/conv1/_input_quantizer/QuantizeLinear``); the k-th call of a
quantizer is the k-th Q node of that scope in graph order.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from export.formats import gathered_dq_table, onnx_format, weight_source
from export.onnx_export import flat_outputs
from export.onnx_io import constant_values, producers
from export.onnx_io import load_onnx as _load
from qdq import quantizers as iter_quantizers
from qdq.formats import FORMATS
from qdq.fp8 import fp8_boundary_distance, fp8_codes
from qdq.nn.weight_only import QuantizedWeight

__all__ = ["VerifyError", "VerifyReport", "OutputDiff", "QuantizerFlips", "verify",
           "load_onnx", "ort_session"]

#: Float noise allowed between the two runtimes' values at a quantizer input, relative to
#: the tensor's magnitude (its largest value, or amax if larger). fp32 has a 6e-8 unit
#: round-off; a conv or matmul sum of thousands of terms summed in another order drifts by
#: a few hundred of them. A real difference (a changed weight, a missing op) is far larger.
NOISE_REL = 1e-4


class VerifyError(RuntimeError):
    """The check cannot run as asked; the message names the input at fault."""


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    rel_l2: float
    max_steps: float | None = None  # when the output comes straight from a DequantizeLinear
    top1: float | None = None  # fraction of rows with the same argmax (classifiers)

    def line(self) -> str:
        parts = [f"max abs {self.max_abs:.3g}", f"rel L2 {self.rel_l2:.3g}"]
        if self.max_steps is not None:
            parts.append(f"max {self.max_steps:.3g} output steps")
        if self.top1 is not None:
            parts.append(f"top-1 agreement {100 * self.top1:.1f}%")
        return f"{self.name}: " + ", ".join(parts)


@dataclass
class QuantizerFlips:
    """One activation quantizer call, from the forced and the free run."""

    name: str
    node: str
    elements: int
    flips: int  # forced run: values whose integer differs
    max_flip_steps: int  # forced run: largest integer difference (1 for boundary flips)
    max_boundary_distance: float  # forced run: farthest a flipped value sat from k+0.5 (steps)
    max_input_diff_steps: float  # forced run: largest |x_torch - x_ort| / scale
    noise_limit_steps: float  # float noise allowed for this tensor, in steps
    qdq_mismatches: int  # torch quantizer on ORT's input vs ORT's DequantizeLinear output
    free_differing: int | None = None  # free run: values whose integer differs

    @property
    def boundary_only(self) -> bool:
        """Inputs agree to float noise, so every flip is one step across a k+0.5 boundary.

        With identical Q/DQ (checked separately) an integer can only differ when a k+0.5
        boundary lies between the two inputs; if they differ by float noise only, the
        value sat within that noise of the boundary.
        """
        return (self.max_input_diff_steps <= self.noise_limit_steps
                and (self.flips == 0 or self.max_flip_steps <= 1))


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
        """Every forced-run difference is a one-step flip at a rounding boundary."""
        return all(q.boundary_only for q in self.quantizers)

    def ok(self, rel_l2: float = 1e-3) -> bool:
        """Same function: exact Q/DQ, boundary flips only, forced outputs within ``rel_l2``."""
        forced = self.forced_rel_l2
        return (self.qdq_mismatches == 0 and self.only_boundary_flips
                and not self.unmatched_quantizers and forced is not None and forced <= rel_l2
                and self.weight_mismatches == 0 and not self.unmatched_weights)

    def verdict(self, rel_l2: float = 1e-3) -> str:
        """One phrase for tables: ``same (...)`` with the evidence, or ``NO (...)``."""
        if not self.ok(rel_l2):
            return (f"NO ({self.qdq_mismatches} Q/DQ, {self.weight_mismatches} weight "
                    f"mismatches, flips explained: {self.only_boundary_flips})")
        if self.quantizers:
            return (f"same ({self.flips} boundary flips, forced rel L2 "
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
            n = len(self.quantizers)
            flipped = [q for q in self.quantizers if q.flips]
            worst = max((q.max_boundary_distance for q in flipped), default=0.0)
            noise = max((q.max_input_diff_steps for q in self.quantizers), default=0.0)
            verdict = ("none" if not flipped else
                       f"every one a one-step flip of a value within {worst:.2g} steps of a "
                       f"k+0.5 boundary (inputs differ by at most {noise:.2g} steps: float "
                       "rounding)" if self.only_boundary_flips
                       else "NOT all explained by float rounding at a boundary")
            lines.append(
                f"  {n} activation quantizer calls: Q/DQ mismatches on identical input "
                f"{self.qdq_mismatches}; {self.flips} rounding flips in {len(flipped)} of "
                f"them: {verdict}")
            lines.append(f"  {'quantizer':<44} {'elements':>9} {'flips':>6} "
                         f"{'to bound.':>9} {'free diff':>9}")
            for q in self.quantizers:
                free = "-" if q.free_differing is None else f"{q.free_differing / q.elements:.2%}"
                bound = f"{q.max_boundary_distance:.1e}" if q.flips else "-"
                lines.append(f"  {q.name[:44]:<44} {q.elements:>9} {q.flips:>6} {bound:>9} "
                             f"{free:>9}")
        if self.unmatched_quantizers:
            lines.append("  no Q node of the same shape and scale for: "
                         + ", ".join(self.unmatched_quantizers[:6]))
        if self.weights:
            total = sum(w.elements for w in self.weights)
            lines.append(f"weights: {len(self.weights)} DequantizeLinear ({total} values) vs "
                         f"the layers' dequantized weights: {self.weight_mismatches} differ")
        if self.unmatched_weights:
            lines.append("  no DequantizeLinear for the weights of: "
                         + ", ".join(self.unmatched_weights[:6]))
        return "\n".join(lines)


# --------------------------------------------------------------------------- loading
def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file; a missing or corrupt file raises one VerifyError naming it."""
    return _load(path, error=VerifyError)


#: ONNX Runtime graph rewrites that change what a Q/DQ graph computes. ``ReluQuantRewrite``
#: (1.32, CPU) removes a Relu that feeds a QuantizeLinear unless the zero point is an int8
#: other than -128 or a uint8 other than 0: with a float8e4m3fn zero point it drops the Relu
#: and negative values pass. It never fires on our INT8 graphs (int8 zero point 0).
UNSAFE_ORT_REWRITES = ("ReluQuantRewrite",)


def ort_session(model: onnx.ModelProto | str | os.PathLike, threads: int | None = None):
    """A CPU session for ``model`` with :data:`UNSAFE_ORT_REWRITES` turned off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(UNSAFE_ORT_REWRITES))
    except Exception as err:  # noqa: BLE001
        raise VerifyError(f"ONNX Runtime cannot load the model: {_first(err)}") from err


def _first(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ------------------------------------------------------------------------ matching
def scope_of(node_name: str) -> str:
    """``/layer1/layer1.0/conv1/_input_quantizer/QuantizeLinear`` -> module path.

    Each scope part is named relative to an ancestor (``layer1.0`` under ``layer1``,
    ``conv.0.0`` under ``conv``): keep only what it adds to the path so far.
    """
    path: list[str] = []
    for part in [p for p in node_name.split("/") if p][:-1]:
        pieces = part.split(".")
        head = pieces[:-1]
        if head and path[-len(head):] == head:
            path.append(pieces[-1])
        else:
            path.extend(pieces)
    return ".".join(path)


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" or (node.input and all(i in names for i in node.input if i)
                                          and node.op_type != "QuantizeLinear"):
            names.update(node.output)
    return names


def activation_qdq_pairs(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(QuantizeLinear, DequantizeLinear) pairs whose input is computed, not a weight."""
    consts = _constant_names(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    pairs = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in consts:
            continue
        dq = next((c for c in consumers.get(node.output[0], [])
                   if c.op_type == "DequantizeLinear"), None)
        if dq is not None:
            pairs.append((node, dq))
    return pairs


# -------------------------------------------------------------------------- helpers
def _as_tuple(inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs)
    raise VerifyError(f"inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}")


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
    raise VerifyError(f"model output of type {type(out).__name__} is not a tensor")


def _diff(name: str, ours: np.ndarray, theirs: np.ndarray, step: float | None,
          classifier: bool | None) -> OutputDiff:
    ours = ours.astype(np.float64)
    theirs = theirs.astype(np.float64)
    delta = np.abs(ours - theirs)
    norm = float(np.linalg.norm(theirs))
    rel = float(np.linalg.norm(ours - theirs)) / norm if norm > 0 else float(delta.max() > 0)
    top1 = None
    is_classifier = classifier if classifier is not None else (ours.ndim == 2
                                                               and ours.shape[1] > 1)
    if is_classifier and ours.ndim == 2:
        top1 = float(np.mean(ours.argmax(1) == theirs.argmax(1)))
    steps = float(delta.max() / step) if step else None
    return OutputDiff(name, float(delta.max()) if delta.size else 0.0, rel, steps, top1)


@contextlib.contextmanager
def _other_kernels():
    """PyTorch with oneDNN and cuDNN off: the same math, another summation order."""
    with torch.backends.mkldnn.flags(enabled=False), torch.backends.cudnn.flags(enabled=False):
        yield


def _output_scales(graph: onnx.GraphProto, consts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Output name -> per-tensor scale, for outputs produced by a DequantizeLinear."""
    producers = {o: n for n in graph.node for o in n.output}
    scales = {}
    for out in graph.output:
        node = producers.get(out.name)
        if node is not None and node.op_type == "DequantizeLinear":
            scale = consts.get(node.input[1])
            if scale is not None and scale.size == 1:
                scales[out.name] = scale
    return scales


# ----------------------------------------------------------------------- model calls
@dataclass
class _TorchCall:
    """How ``verify`` feeds the inputs: positionally, or as keywords (``model(**inputs)``)."""

    tensors: tuple[torch.Tensor, ...]
    keys: list[str] | None = None

    @classmethod
    def of(cls, inputs) -> _TorchCall:
        if isinstance(inputs, Mapping):
            if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs.values()):
                raise VerifyError("keyword inputs must be a non-empty dict of tensors")
            return cls(tuple(inputs.values()), [str(k) for k in inputs])
        return cls(_as_tuple(inputs))

    def in_onnx_order(self, specs) -> tuple[torch.Tensor, ...]:
        """The tensors in the ONNX inputs' order: by name for keywords, else as given."""
        if self.keys is None or {s.name for s in specs} != set(self.keys):
            return self.tensors
        by_name = dict(zip(self.keys, self.tensors, strict=True))
        return tuple(by_name[s.name] for s in specs)

    def example(self, tensors):
        return tensors if self.keys is None else dict(zip(self.keys, tensors, strict=True))

    def outputs(self, model: nn.Module, tensors) -> list[torch.Tensor]:
        if self.keys is None:
            return _flatten(model(*tensors))
        return [t for _, t in flat_outputs(model(**self.example(tensors)))]


# --------------------------------------------------------------------------- verify
@dataclass
class _Pair:
    q: onnx.NodeProto
    dq: onnx.NodeProto
    scale: np.ndarray | None


def _closest_pair(candidates: list[_Pair], ort_values: dict[str, np.ndarray], x: torch.Tensor,
                  step: float, scale: np.ndarray, used: set[str]) -> _Pair | None:
    """The Q node that best answers one quantizer call, among nodes of its shape and scale.

    Within half a step of ``x``, nodes are preferred (1) whose scale is bit-equal to the
    quantizer's (quantizers of near-identical tensors can differ in the last bit: ConvNeXt
    blocks with random weights, whose layer scale of 1e-6 leaves the residual stream
    almost unchanged), (2) not yet taken by another call, so calls and nodes pair one to
    one unless the exporter merged two calls on one tensor into one node, (3) whose input
    is closest.
    """
    xs = x.detach().float().cpu().numpy()
    best, best_key = None, None
    for pair in candidates:
        gap = float(np.abs(ort_values[pair.q.input[0]] - xs).max()) / step
        if gap > 0.5:
            continue
        exact = pair.scale is not None and np.array_equal(pair.scale.reshape(-1),
                                                          scale.reshape(-1))
        key = (not exact, pair.q.name in used, gap)
        if best_key is None or key < best_key:
            best, best_key = pair, key
    return best


class _Recorder:
    """Forward hooks on activation quantizers: record each call, optionally replace it.

    With ``pairs`` and ``ort_values`` the hook hands on ONNX Runtime's DequantizeLinear
    output for the Q node that matches the call: the one of the same scope when its shape
    and scale agree, else (the exporter merges identical Q nodes, the dynamo exporter
    names nodes its own way) the Q node of the same shape and scale whose input is closest,
    within half a step. Calls and Q nodes pair one to one unless the exporter merged two.
    """

    def __init__(self, named: list[tuple[str, nn.Module]], pairs: list[_Pair] | None = None,
                 ort_values: dict[str, np.ndarray] | None = None) -> None:
        self.named = named
        self.pairs = pairs
        self.ort = ort_values or {}
        self.by_scope: dict[str, list[_Pair]] = {}
        for pair in pairs or []:
            self.by_scope.setdefault(scope_of(pair.q.name), []).append(pair)
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor, _Pair | None]]] = {}
        self.unmatched: list[str] = []
        self.used: set[str] = set()
        self._handles = []

    def __enter__(self) -> _Recorder:
        for name, q in self.named:
            self._handles.append(q.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _match(self, name: str, k: int, x: torch.Tensor, module) -> _Pair | None:
        scale = module.step_size.detach().float().cpu().numpy()

        def fits(pair: _Pair) -> bool:
            value = self.ort[pair.q.input[0]]
            return tuple(value.shape) == tuple(x.shape) and (
                pair.scale is None or (pair.scale.size == scale.size
                                       and np.allclose(pair.scale.reshape(-1),
                                                       scale.reshape(-1), rtol=1e-6, atol=0)))

        own = self.by_scope.get(name, [])
        if k < len(own) and fits(own[k]) and own[k].q.name not in self.used:
            return self._take(own[k])
        step = float(scale.max()) if scale.size else 1.0
        fitting = [p for p in self.pairs or [] if fits(p)]
        return self._take(_closest_pair(fitting, self.ort, x, step, scale, self.used))

    def _take(self, pair: _Pair | None) -> _Pair | None:
        """Calls and Q nodes pair one to one where they can: a taken node is offered last."""
        if pair is not None:
            self.used.add(pair.q.name)
        return pair

    def _hook(self, name: str):
        def hook(module, args, output):
            if isinstance(args[0], nn.Parameter):
                return None  # a weight quantizer: its Q/DQ is constant in the graph
            calls = self.calls.setdefault(name, [])
            pair = (self._match(name, len(calls), args[0], module)
                    if self.pairs is not None else None)
            calls.append((args[0].detach(), output.detach(), pair))
            if self.pairs is None:
                return None
            if pair is None:
                self.unmatched.append(f"{name}#{len(calls) - 1}")
                return None
            return torch.from_numpy(self.ort[pair.dq.output[0]]).to(output.device,
                                                                    output.dtype)

        return hook


def verify(model: nn.Module, onnx_path: str | os.PathLike, inputs, *, forced: bool = True,
           noise_floor: bool = False, classifier: bool | None = None,
           fold_bn: bool | None = None, threads: int | None = None) -> VerifyReport:
    """Compare ``model`` (PyTorch, eval mode) with ``onnx_path`` in ONNX Runtime on ``inputs``.

    Args:
        inputs: a tensor or tuple of tensors, fed to both in the same order; or a dict of
            keyword tensors (``model(**inputs)``; ONNX inputs matched by name, as
            ``to_onnx`` names them), whose outputs are flattened as ``to_onnx`` does.
        forced: also run the forced comparison and the per-quantizer flip analysis.
        noise_floor: also run PyTorch against itself with oneDNN/cuDNN off.
        classifier: report top-1 agreement (default: for 2-D outputs with >1 column).
        fold_bn: compare with a copy of ``model`` whose BatchNorms are folded, as
            ``to_onnx(fold_bn=True)`` exports it. Default: when the graph has no
            BatchNormalization and the model has BatchNorm layers.

    Example::

        report = verify(model, "model.onnx", torch.randn(64, 3, 64, 64))
        print(report)
        assert report.ok() and report.top1 == 1.0
    """
    if not isinstance(model, nn.Module):
        raise VerifyError(f"model must be an nn.Module, got {type(model).__name__}")
    call = _TorchCall.of(inputs)
    args = call.tensors
    proto = load_onnx(onnx_path)
    graph = proto.graph
    init_names = {i.name for i in graph.initializer}
    feeds_spec = [i for i in graph.input if i.name not in init_names]
    if len(feeds_spec) != len(args):
        raise VerifyError(f"{Path(onnx_path).name} takes {len(feeds_spec)} inputs, got "
                          f"{len(args)}")
    feeds = {}
    for spec, tensor in zip(feeds_spec, call.in_onnx_order(feeds_spec), strict=True):
        dims = spec.type.tensor_type.shape.dim
        want = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        got = list(tensor.shape)
        if len(want) != len(got) or any(w is not None and w != g
                                        for w, g in zip(want, got, strict=True)):
            shown = ["?" if w is None else w for w in want]
            raise VerifyError(f"input {spec.name!r}: the ONNX model expects shape {shown}, "
                              f"got {got}")
        feeds[spec.name] = tensor.detach().cpu().numpy()
    output_names = [o.name for o in graph.output]

    consts = constant_values(graph)
    fmt = onnx_format(proto)
    pairs = [_Pair(q, dq, consts.get(q.input[1])) for q, dq in activation_qdq_pairs(graph)
             ] if forced else []
    weight_dqs, unmatched_weights = _weight_dqs(graph, model)
    made_by = producers(graph)
    gathered = {name: gathered_dq_table(graph, dq, made_by) for name, dq in weight_dqs.items()}
    existing = set(output_names)
    for name in ([n for p in pairs for n in (p.q.input[0], p.dq.output[0])]
                 + [dq.output[0] for dq in weight_dqs.values()]
                 + [i for i in gathered.values() if i and i not in feeds and i not in consts]):
        if name not in existing:
            graph.output.append(onnx.ValueInfoProto(name=name))
            existing.add(name)
    session = ort_session(proto, threads)
    try:
        results = session.run(None, feeds)
    except Exception as err:  # noqa: BLE001
        raise VerifyError(f"ONNX Runtime failed on the inputs: {_first(err)}") from err
    ort_values = dict(zip([o.name for o in session.get_outputs()], results, strict=True))
    ort_outputs = [ort_values[n] for n in output_names]
    steps = {n: float(v.reshape(())) for n, v in _output_scales(graph, consts).items()}

    if fold_bn is None:
        fold_bn = (not any(n.op_type == "BatchNormalization" for n in graph.node)
                   and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                           for m in model.modules()))
    if fold_bn:
        from qdq.rules import fold_batchnorm

        model = copy.deepcopy(model).eval()
        fold_batchnorm(model, call.example(args))
    model = model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    targs = tuple(a.to(device) for a in args)
    named = [(n, q) for n, q in iter_quantizers(model) if q.is_quant_enabled]
    with torch.no_grad(), _Recorder(named) as rec:
        try:
            free = call.outputs(model, targs)
        except Exception as err:  # noqa: BLE001
            raise VerifyError(f"the PyTorch model fails on the inputs: {_first(err)}") from err
        free_calls = rec.calls if forced else {}
    if len(free) != len(ort_outputs):
        raise VerifyError(f"PyTorch returns {len(free)} outputs, the ONNX model "
                          f"{len(ort_outputs)}")
    report = VerifyReport(
        Path(onnx_path), [list(a.shape) for a in args],
        [_diff(n, o, f.float().cpu().numpy(), steps.get(n), classifier)
         for n, o, f in zip(output_names, ort_outputs, free, strict=True)], format=fmt,
        unmatched_weights=unmatched_weights)
    known = {**consts, **feeds, **ort_values}
    report.weights = [_weight_check(name, model.get_submodule(name), dq,
                                    ort_values[dq.output[0]],
                                    None if gathered[name] is None else known[gathered[name]])
                      for name, dq in weight_dqs.items()]
    if forced and not pairs:
        report.forced_outputs = list(report.outputs)  # nothing to force: the same run

    if noise_floor:
        with torch.no_grad(), _other_kernels():
            alt = call.outputs(model, targs)
        report.noise_floor_rel_l2 = max(
            _diff("", a.float().cpu().numpy(), f.float().cpu().numpy(), None, False).rel_l2
            for a, f in zip(alt, free, strict=True))

    if forced and pairs:
        with torch.no_grad(), _Recorder(named, pairs, ort_values) as rec:
            forced_out = call.outputs(model, targs)
        report.forced_outputs = [
            _diff(n, o, f.float().cpu().numpy(), steps.get(n), classifier)
            for n, o, f in zip(output_names, ort_outputs, forced_out, strict=True)]
        report.unmatched_quantizers = rec.unmatched
        quantizer_of = dict(named)
        for name, calls in rec.calls.items():
            free = free_calls.get(name, [])
            for k, (x_t, _, pair) in enumerate(calls):
                if pair is None:
                    continue
                report.quantizers.append(_flip_stats(
                    f"{name}#{k}" if len(calls) > 1 else name, pair.q.name,
                    quantizer_of[name], x_t.float().cpu(),
                    torch.from_numpy(ort_values[pair.q.input[0]]).float(),
                    torch.from_numpy(ort_values[pair.dq.output[0]]).float(),
                    free[k][1].float().cpu() if k < len(free) else None))
    return report


def _int_codes(v: torch.Tensor) -> torch.Tensor:
    return torch.round(v)


def _int_boundary_distance(r: torch.Tensor) -> torch.Tensor:
    return ((r - torch.floor(r)) - 0.5).abs()


def _grid(quantizer) -> tuple:
    """(codes, boundary distance) of the quantizer's grid, both on values / scale: integer
    steps for INT8, E4M3 grid positions for FP8 (one step = one code either way)."""
    if getattr(quantizer, "is_fp8", False):
        return fp8_codes, fp8_boundary_distance
    return _int_codes, _int_boundary_distance


def _flip_stats(name, node, quantizer, x_t, x_o, dq_o, free_out) -> QuantizerFlips:
    scale = quantizer.step_size.detach().float().cpu()
    codes, boundary_distance = _grid(quantizer)
    q_o = codes(dq_o / scale)
    with torch.no_grad():
        q_t = codes(quantizer(x_t).float() / scale)
        same_input = quantizer(x_o).float()
    qdq_mismatches = int((same_input != dq_o).sum())
    delta = (q_t - q_o).abs()
    flipped = delta > 0
    to_boundary = boundary_distance(x_t / scale)
    free_differing = None
    if free_out is not None and free_out.shape == dq_o.shape:
        free_differing = int((codes(free_out / scale) != q_o).sum())
    magnitude = max(float(x_o.abs().max()) if x_o.numel() else 0.0,
                    float(quantizer.amax.detach().float().max()))
    return QuantizerFlips(
        name=name, node=node, elements=int(x_t.numel()), flips=int(flipped.sum()),
        max_flip_steps=int(delta.max()) if delta.numel() else 0,
        max_boundary_distance=float(to_boundary[flipped].max()) if flipped.any() else 0.0,
        max_input_diff_steps=float(((x_t - x_o).abs() / scale).max()) if x_t.numel() else 0.0,
        noise_limit_steps=NOISE_REL * magnitude / float(scale.min()),
        qdq_mismatches=qdq_mismatches, free_differing=free_differing)


#: the attribute under which ``to_onnx``'s wrappers hold the model (initializer prefix)
_WRAPPER = "model."


def _weight_dqs(graph: onnx.GraphProto, model: nn.Module
                ) -> tuple[dict[str, onnx.NodeProto], list[str]]:
    """Weight-only weights of ``model`` -> the DequantizeLinear reading their codes
    (initializer ``<module>.codes``, or ``model.<module>.codes`` behind the export's
    wrappers for keyword inputs), and the weights with none."""
    made_by = producers(graph)
    by_codes = {weight_source(graph, n.input[0], made_by): n for n in graph.node
                if n.op_type == "DequantizeLinear"}
    for name, node in list(by_codes.items()):  # exact names first, then unwrapped ones
        while name.startswith(_WRAPPER):
            name = name[len(_WRAPPER):]
            by_codes.setdefault(name, node)
    found, missing = {}, []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedWeight):
            dq = by_codes.get(f"{name}.codes")
            if dq is None:
                missing.append(name)
            else:
                found[name] = dq
    return found, missing


def _weight_check(name: str, module: QuantizedWeight, dq: onnx.NodeProto,
                  ort_value: np.ndarray, rows: np.ndarray | None = None) -> WeightCheck:
    """``rows``: the indices a DQ of gathered embedding rows looked up (None: whole weight)."""
    with torch.no_grad():
        ours = module().float().cpu().numpy()
    if rows is not None:
        ours = np.take(ours, np.asarray(rows, np.int64), axis=0)
    if ours.shape != ort_value.shape:
        return WeightCheck(name, dq.name, int(ours.size), int(ours.size), float("inf"))
    delta = np.abs(ours - ort_value)
    return WeightCheck(name, dq.name, int(ours.size), int((ours != ort_value).sum()),
                       float(delta.max()) if delta.size else 0.0)
