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
  top-1 agreement for classifiers, the cosine of mean-pooled embeddings for text
  encoders: keyword inputs with an ``attention_mask`` and token outputs);
* **forced run**: PyTorch again, but every activation quantizer hands on ONNX Runtime's
  own quantized tensor, so flips cannot cascade. For every quantizer it counts the
  values whose code differs and checks each one is explained by float noise at a
  rounding boundary, on the quantizer's own grid (:mod:`export.flips`: INT8's uniform
  step, FP8's local step of the value's binade); the report gives the actual margins. It
  also applies the PyTorch quantizer to ONNX Runtime's own input and counts mismatches
  (QuantizeLinear/DequantizeLinear semantics: expected 0).
* optionally the **noise floor**: PyTorch against PyTorch with oneDNN/cuDNN off.

A weight-only graph has no activation quantizer, so its forced run is the free run;
instead every weight DequantizeLinear is compared with the layer's dequantized weight
(expected: equal, bit for bit); one that dequantizes gathered embedding rows, with those
rows. NaN or Inf in the inputs, the model's weights or amax, the ONNX file's constants or a
quantizer's input is one :class:`VerifyError` naming the tensor.

Quantizers are matched to Q nodes through the scope names the TorchScript exporter gives
them (``/layer1/layer1.0/conv1/_input_quantizer/QuantizeLinear``); the k-th call of a
quantizer is the k-th Q node of that scope in graph order. Where the scope says nothing (an
fx GraphModule's scopes are leaf names, ``/block.0/_input_quantizer_3``; the dynamo
exporter names nodes its own way), a call on a PyTorch tensor that an earlier call already
matched takes a Q node on the same ONNX tensor (the exporter merges identical nodes), and
any other call the first free node of its shape and scale after the last node taken, in
graph order, which is the order the exporter traced the calls in. Nearness of values
alone cannot tell apart the near-identical tensors of blocks that barely change their
input (ConvNeXt's layer scale of 1e-6).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from export.flips import (
    NOISE_REL,
    NonFiniteError,
    QuantizerFlips,
    effective_input,
    flip_stats,
)
from export.formats import gathered_dq_table, onnx_format, weight_source
from export.onnx_export import flat_outputs, non_finite_tensors
from export.onnx_io import constant_values, producers
from export.onnx_io import load_onnx as _load
from export.verify_report import OutputDiff, VerifyReport, WeightCheck, output_diff
from qdq import quantizers as iter_quantizers
from qdq.nn.weight_only import QuantizedWeight

__all__ = ["VerifyError", "VerifyReport", "OutputDiff", "QuantizerFlips", "WeightCheck",
           "verify", "load_onnx", "ort_session", "NOISE_REL"]


class VerifyError(RuntimeError):
    """The check cannot run as asked; the message names the input at fault."""


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

    def attention_mask(self) -> np.ndarray | None:
        """A text model's ``attention_mask`` keyword input (None without one)."""
        if self.keys is None or "attention_mask" not in self.keys:
            return None
        return self.tensors[self.keys.index("attention_mask")].detach().cpu().numpy()

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


def _tensor_key(x: torch.Tensor) -> tuple:
    """Which PyTorch tensor a call quantizes: its memory, layout and in-place version (the
    recorder keeps every input alive, so the memory is not reused meanwhile)."""
    return (x.device, x.dtype, x.data_ptr(), tuple(x.shape), tuple(x.stride()), x._version)


def _next_pair(candidates: list[_Pair], ort_values: dict[str, np.ndarray], x: np.ndarray,
               step: float, scale: np.ndarray, used: set[str], position: dict[str, int],
               cursor: int) -> _Pair | None:
    """The Q node that best answers one quantizer call, among nodes of its shape and scale.

    Within half a step of ``x``, nodes are preferred (1) whose scale is bit-equal to the
    quantizer's (quantizers of near-identical tensors can differ in the last bit), (2) not
    yet taken by another call, so calls and nodes pair one to one, (3) after the last node
    taken (``cursor``), the first in graph order; behind it, the closest input. The
    exporter writes Q nodes in the order it traced the calls, so order tells apart what
    values cannot: the near-identical inputs of ConvNeXt blocks with random weights, whose
    layer scale of 1e-6 leaves the residual stream almost unchanged.
    """
    best, best_key = None, None
    for pair in candidates:
        gap = float(np.abs(ort_values[pair.q.input[0]] - x).max()) / step
        if gap > 0.5:
            continue
        exact = pair.scale is not None and np.array_equal(pair.scale.reshape(-1),
                                                          scale.reshape(-1))
        at = position[pair.q.name]
        behind = at <= cursor
        key = (not exact, pair.q.name in used, behind, gap if behind else float(at))
        if best_key is None or key < best_key:
            best, best_key = pair, key
    return best


class _Recorder:
    """Forward hooks on activation quantizers: record each call, optionally replace it.

    With ``pairs`` and ``ort_values`` the hook hands on ONNX Runtime's DequantizeLinear
    output for the Q node that matches the call (module docstring): the k-th of the same
    scope when its shape and scale agree; else one on the same ONNX tensor as an earlier
    call on the same PyTorch tensor (the exporter merged the two nodes); else
    :func:`_next_pair`.
    """

    def __init__(self, named: list[tuple[str, nn.Module]], pairs: list[_Pair] | None = None,
                 ort_values: dict[str, np.ndarray] | None = None) -> None:
        self.named = named
        self.pairs = pairs
        self.ort = ort_values or {}
        self.by_scope: dict[str, list[_Pair]] = {}
        for pair in pairs or []:
            self.by_scope.setdefault(scope_of(pair.q.name), []).append(pair)
        self.position = {pair.q.name: i for i, pair in enumerate(pairs or [])}
        self.cursor = -1
        self.sources: dict[tuple, str] = {}  # PyTorch tensor -> ONNX tensor it matched
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
        key = _tensor_key(x) if getattr(module, "pre_quant_scale", None) is None else None
        x = effective_input(module, x)

        def fits(pair: _Pair) -> bool:
            value = self.ort[pair.q.input[0]]
            return tuple(value.shape) == tuple(x.shape) and (
                pair.scale is None or (pair.scale.size == scale.size
                                       and np.allclose(pair.scale.reshape(-1),
                                                       scale.reshape(-1), rtol=1e-6, atol=0)))

        own = self.by_scope.get(name, [])
        if k < len(own) and fits(own[k]) and own[k].q.name not in self.used:
            return self._take(own[k], key)
        step = float(scale.max()) if scale.size else 1.0
        fitting = [p for p in self.pairs or [] if fits(p)]
        source = self.sources.get(key) if key is not None else None
        same = [p for p in fitting if p.q.input[0] == source]
        xs = x.detach().float().cpu().numpy()
        return self._take(_next_pair(same or fitting, self.ort, xs, step, scale, self.used,
                                     self.position, self.cursor), key)

    def _take(self, pair: _Pair | None, key: tuple | None) -> _Pair | None:
        """Note the node as taken (offered last to later calls), where graph order has got
        to, and which ONNX tensor this PyTorch tensor is."""
        if pair is not None:
            self.used.add(pair.q.name)
            self.cursor = max(self.cursor, self.position[pair.q.name])
            if key is not None:
                self.sources.setdefault(key, pair.q.input[0])
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


def _other_inputs(args: tuple) -> tuple:
    """The same inputs in another order (rows rolled), or with float noise for one row:
    what depends on the inputs changes, a constant does not."""
    if all(a.dim() and a.shape[0] > 1 for a in args):
        return tuple(a.roll(1, 0) for a in args)
    gen = torch.Generator().manual_seed(0)
    return tuple(a + torch.randn(a.shape, generator=gen).to(a.device, a.dtype)
                 if a.is_floating_point() else a for a in args)


def _split_constant_calls(model: nn.Module, call, targs: tuple, named, unmatched: list[str],
                          free_calls: dict) -> tuple[list[str], list[str]]:
    """``unmatched`` split into calls without a Q node and calls whose input is the same
    on other inputs (a constant the exporter folded, with its Q/DQ, into the graph)."""
    if not unmatched:
        return [], []
    with torch.no_grad(), _Recorder(named) as rec:
        call.outputs(model, _other_inputs(targs))
    missing, folded = [], []
    for label in unmatched:
        name, _, k = label.rpartition("#")
        first, again = free_calls.get(name, []), rec.calls.get(name, [])
        k = int(k)
        same = (k < len(first) and k < len(again)
                and first[k][0].shape == again[k][0].shape
                and torch.equal(first[k][0], again[k][0]))
        (folded if same else missing).append(label)
    return missing, folded


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
        classifier: report top-1 agreement (default: for 2-D outputs with >1 column; with
            keyword inputs that hold an ``attention_mask``, a text model, only for
            ``logits``, and token outputs are scored by mean-pooled embedding cosine).
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
    _check_inputs(feeds)
    _check_model(model)

    consts = constant_values(graph)
    _check_constants(consts, Path(onnx_path).name)
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
    mask = call.attention_mask()

    def compare(outputs: list[torch.Tensor], run: str) -> list[OutputDiff]:
        return [_compare_output(n, o, f.float().cpu().numpy(), steps.get(n), classifier,
                                mask, run)
                for n, o, f in zip(output_names, ort_outputs, outputs, strict=True)]

    report = VerifyReport(Path(onnx_path), [list(a.shape) for a in args],
                          compare(free, "free run"), format=fmt,
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
            output_diff("", a.float().cpu().numpy(), f.float().cpu().numpy(), None,
                        False).rel_l2
            for a, f in zip(alt, free, strict=True))

    if forced and pairs:
        with torch.no_grad(), _Recorder(named, pairs, ort_values) as rec:
            forced_out = call.outputs(model, targs)
        report.forced_outputs = compare(forced_out, "forced run")
        report.unmatched_quantizers, report.folded_constants = _split_constant_calls(
            model, call, targs, named, rec.unmatched, free_calls)
        quantizer_of = dict(named)
        for name, calls in rec.calls.items():
            free = free_calls.get(name, [])
            for k, (x_t, _, pair) in enumerate(calls):
                if pair is None:
                    continue
                try:
                    stats = flip_stats(
                        f"{name}#{k}" if len(calls) > 1 else name, pair.q.name,
                        quantizer_of[name], x_t.float().cpu(),
                        torch.from_numpy(ort_values[pair.q.input[0]]).float(),
                        torch.from_numpy(ort_values[pair.dq.output[0]]).float(),
                        free[k][1].float().cpu() if k < len(free) else None)
                except NonFiniteError as err:
                    raise VerifyError(str(err)) from err
                report.quantizers.append(stats)
    return report


def _nonfinite(values: np.ndarray) -> int:
    if not np.issubdtype(values.dtype, np.floating):
        return 0
    return int(values.size - np.isfinite(values).sum())


def _check_inputs(feeds: dict[str, np.ndarray]) -> None:
    for name, value in feeds.items():
        bad = _nonfinite(value)
        if bad:
            raise VerifyError(f"input {name!r} holds {bad} NaN/Inf values of {value.size}: "
                              "compare on finite inputs")


def _check_model(model: nn.Module) -> None:
    """NaN/Inf weights or amax make every comparison meaningless: name the first one
    (:func:`export.onnx_export.non_finite_tensors` decides, the export's own check)."""
    bad = non_finite_tensors(model, disabled_quantizers=True)
    if not bad:
        return
    name, parameters = bad[0], dict(model.named_parameters())
    if name in parameters:
        t = parameters[name].detach()
        raise VerifyError(f"the PyTorch model's parameter {name!r} holds "
                          f"{int((~torch.isfinite(t)).sum())} NaN/Inf values of {t.numel()}: "
                          "fix or re-create the model first")
    t = model.get_buffer(name).detach()
    count, nan = int((~torch.isfinite(t)).sum()), int(torch.isnan(t).sum())
    what = "NaN" if count == nan else "NaN/Inf"
    raise VerifyError(f"the PyTorch model's buffer {name!r} holds {count} {what} values "
                      f"of {t.numel()}: fix or re-calibrate the model first")


def _check_constants(consts: dict[str, np.ndarray], file: str) -> None:
    """A NaN weight in the file (an infinite constant can be a mask: only NaN counts)."""
    for name, value in consts.items():
        if np.issubdtype(value.dtype, np.floating) and np.isnan(value).any():
            raise VerifyError(f"{file}: constant {name!r} holds {int(np.isnan(value).sum())} "
                              f"NaN values of {value.size}: the ONNX file is broken")


def _compare_output(name: str, ort: np.ndarray, ours: np.ndarray, step: float | None,
                    classifier: bool | None, mask: np.ndarray | None, run: str) -> OutputDiff:
    """:func:`output_diff`, after one clear error where a runtime's output is NaN/Inf
    where the other's is not the same value (equal infinities, a masked score, compare)."""
    for who, value, other in (("PyTorch", ours, ort), ("ONNX Runtime", ort, ours)):
        bad = ~np.isfinite(value)
        if bad.any() and not np.array_equal(value[bad], other[bad], equal_nan=True):
            raise VerifyError(f"output {name!r} ({run}): {who} gives {int(bad.sum())} NaN/Inf "
                              f"values of {value.size}; look for NaN/Inf weights or inputs")
    both = np.isfinite(ours) & np.isfinite(ort)
    if not both.all():
        ours, ort = np.where(both, ours, 0.0), np.where(both, ort, 0.0)
    return output_diff(name, ort, ours, step, classifier, mask)


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
