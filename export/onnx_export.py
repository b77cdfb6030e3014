"""``to_onnx``: a quantized model to an ONNX file with QuantizeLinear/DequantizeLinear.

Every enabled quantizer becomes Q -> DQ (fp32 scale ``amax/127``, int8 zero point 0,
``axis`` for per-channel weights); disabled quantizers leave no node. FP8 quantizers
become Q/DQ-19 with a float8e4m3fn zero point (scale ``amax/448``); weight-only layers
become an integer initializer feeding one DequantizeLinear (:mod:`export.formats`). The
opset defaults to the lowest the model's format allows (INT8 and W8 13, FP8 19, W4 21).
The export runs on a copy of the model, so the caller's model is never changed:

1. refuse uncalibrated enabled quantizers, listing them by name;
2. fold BatchNorm into the conv before it (``qdq.rules.fold_batchnorm``), so the graph
   holds ``DQ(weight) -> Conv`` and no BatchNormalization behind a quantized conv;
3. trace with the TorchScript exporter (``dynamo=False``, the path that turns torch's
   fake-quant ops into Q/DQ at opset 13 on torch 2.4-2.14), or the dynamo exporter on
   request;
4. fold the constant scale arithmetic (``Clip``/``Div`` on amax) into plain initializers,
   so every Q/DQ reads a constant scale;
5. lower weight-only placeholders to DequantizeLinear (INT4 packed two per byte), and
   optionally store Q/DQ weights as int8 (or float8) initializers feeding DQ (about 4x
   smaller);
6. check the model and move it into place atomically: a failed export leaves no file.

Decoders (Hugging Face causal LMs) are exported without their KV cache: the copy's
``config.use_cache`` is set to False (said in ``ExportResult.notes``), and asking for the
cache (``use_cache=True`` among the keyword inputs) is refused by name. Attention that
still calls ``F.scaled_dot_product_attention`` in float (no quant twin) needs opset 14:
the default opset is raised to it, and said.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.overrides import TorchFunctionMode

from export import formats as onnx_formats
from qdq import quantizers
from qdq.fileio import atomic_write
from qdq.formats import FORMATS, format_of
from qdq.nn.weight_only import QuantizedWeight
from qdq.quant_modules import enable_onnx_export
from qdq.quantizer import TensorQuantizer

__all__ = ["ExportError", "ExportResult", "KeywordPlan", "dynamo_exporter_available",
           "fold_constants", "flat_outputs", "keyword_args", "keyword_plan",
           "non_finite_tensors", "to_onnx", "uncalibrated_quantizers"]


class ExportError(RuntimeError):
    """The model cannot be exported as asked; the message names what is at fault."""


@dataclass
class ExportResult:
    path: Path
    opset: int
    input_names: list[str]
    output_names: list[str]
    quantize_nodes: int
    dequantize_nodes: int
    folded_batchnorms: list[str] = field(default_factory=list)
    bytes: int = 0
    #: the model's format (``qdq.formats.format_of``): int8, fp8, w8, w4, float or mixed
    format: str = "int8"
    #: the file's size with the weights stored quantized put back to fp32 (estimated from
    #: the initializers; equals ``bytes`` when no weight is stored quantized)
    fp32_bytes: int = 0
    #: what the export decided on its own (the opset it raised, the cache it left out)
    notes: list[str] = field(default_factory=list)
    #: BatchNorm the model came with already folded (when its weights were quantized, or
    #: by the placement rules; ``qdq.rules.fold.folded_before``)
    folded_before: list[str] = field(default_factory=list)

    @property
    def compression(self) -> float:
        """How many times smaller than the same graph with fp32 weights."""
        return self.fp32_bytes / self.bytes if self.bytes else 1.0

    def __str__(self) -> str:
        title = FORMATS[self.format].title if self.format in FORMATS else self.format
        size = f"{self.bytes / 1e6:.2f} MB"
        if self.fp32_bytes > self.bytes:
            size += f", {self.compression:.1f}x smaller than FP32"
        text = (f"{self.path} ({title}, opset {self.opset}, {self.quantize_nodes} Q / "
                f"{self.dequantize_nodes} DQ, {size}, {self.batchnorm_text()})")
        return "; ".join([text, *self.notes])

    def batchnorm_text(self) -> str:
        """What happened to BatchNorm: folded now, already folded in the model, or none."""
        now, before = len(self.folded_batchnorms), len(self.folded_before)
        if now and before:
            return f"{now} BatchNorm folded, {before} already folded in the model"
        if before:
            return f"BatchNorm already folded in the model ({before})"
        return f"{now} BatchNorm folded" if now else "no BatchNorm folded"


def uncalibrated_quantizers(model: nn.Module) -> list[str]:
    """Names of enabled, quantizing quantizers that have no amax."""
    return [name for name, q in quantizers(model) if q.is_quant_enabled and q.amax is None]


def non_finite_tensors(model: nn.Module, disabled_quantizers: bool = False) -> list[str]:
    """State names (``layer1.0.conv1.weight``, ``fc._input_quantizer._amax``) holding NaN
    or infinity: parameters, quantizers' state and BatchNorm statistics. Other buffers are
    only refused for NaN (some models keep ``-inf`` attention masks). A disabled
    quantizer's state counts only with ``disabled_quantizers`` (it never reaches a graph)."""
    owners = dict(model.named_modules())
    bad = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        owner = owners.get(name.rpartition(".")[0])
        if not t.is_floating_point() or (isinstance(owner, TensorQuantizer)
                                          and not owner.is_quant_enabled
                                          and not disabled_quantizers):
            continue
        strict = isinstance(t, nn.Parameter) or isinstance(
            owner, (TensorQuantizer, QuantizedWeight, nn.modules.batchnorm._NormBase))
        t = t.detach()
        if not bool((torch.isfinite(t) if strict else ~torch.isnan(t)).all()):
            bad.append(name)
    return bad


def _nan_initializers(onnx_model: onnx.ModelProto) -> list[str]:
    """Initializers of the written graph holding NaN, each with the node reading it
    (BatchNorm folding makes them out of a negative variance). Infinity is legal there:
    attention masks fold into ``-inf`` constants."""
    readers = {i: n.name or n.op_type for n in onnx_model.graph.node for i in n.input}
    bad = []
    for init in onnx_model.graph.initializer:
        if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                  onnx.TensorProto.DOUBLE):
            continue
        if np.isnan(numpy_helper.to_array(init)).any():
            bad.append(f"{init.name} (read by {readers.get(init.name, 'no node')})")
    return bad


def _refuse_non_finite(names: list[str], where: str) -> None:
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5
                                        else "")
        raise ExportError(f"{len(names)} tensor(s) {where} hold NaN or infinity (a corrupted "
                          f"checkpoint or a diverged run?); nothing was written: {shown}")


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ExportError(f"example_inputs must be a tensor or a tuple of tensors, "
                      f"got {type(example_inputs).__name__}")


class _PositionalOnly(nn.Module):
    """Calls the model with exactly the traced tensors.

    The TorchScript exporter fills unspecified ``forward`` parameters from their defaults
    and traces them as tensors: ``TransformerEncoderLayer(is_causal=False)`` then fails
    with "is_causal must be bool, not Tensor". Behind this wrapper the defaults stay Python
    values.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model(*args)


def _needs_wrapper(model: nn.Module, n_args: int) -> bool:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) > n_args or any(p.kind == p.KEYWORD_ONLY for p in params)


def _fold(model: nn.Module, args: tuple) -> list[str]:
    from qdq.quantizer import QuantizerError
    from qdq.rules import fold_batchnorm

    try:
        return [str(item) for item in fold_batchnorm(model, args)]
    except QuantizerError as err:  # a folded weight's amax: NaN out of a negative variance
        raise ExportError(f"folding BatchNorm gave a weight that cannot be quantized ({err}); "
                          "check the BatchNorm statistics (running_var must be >= 0); "
                          "nothing was written") from err


#: Ops that may be evaluated ahead of time when every input is a constant. The scale
#: ``clamp_min(amax, eps) / 127`` comes out of the TorchScript exporter as Clip and Div on
#: the amax initializer; folding them leaves each Q/DQ with a plain scale initializer, which
#: TensorRT and the lint read directly. QuantizeLinear is never folded (weights keep Q/DQ).
_FOLDABLE = frozenset({"Constant", "Identity", "Clip", "Div", "Mul", "Add", "Sub", "Reshape",
                       "Cast", "Unsqueeze", "Squeeze", "Max", "Min", "Abs", "Sqrt",
                       "Transpose", "Shape", "Gather", "Concat"})


def fold_constants(model: onnx.ModelProto) -> int:
    """Evaluate foldable nodes whose inputs are all constants; returns how many went."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    opsets = list(model.opset_import)
    keep, folded = [], 0
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if (node.op_type in _FOLDABLE and node.domain in ("", "ai.onnx")
                and all(i in values for i in inputs)
                and not any(o in outputs for o in node.output)):
            single = onnx.helper.make_model(
                onnx.helper.make_graph(
                    [node], "fold",
                    [onnx.helper.make_tensor_value_info(i, onnx.TensorProto.UNDEFINED, None)
                     for i in dict.fromkeys(inputs)],
                    [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                     for o in node.output]),
                opset_imports=opsets)
            try:
                results = ReferenceEvaluator(single).run(None, {i: values[i] for i in inputs})
            except Exception:  # noqa: BLE001 - leave anything the evaluator cannot run
                keep.append(node)
                continue
            for name, value in zip(node.output, results, strict=True):
                values[name] = np.asarray(value)
                graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
            folded += 1
            continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input} | outputs
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    return folded


def _weights_to_int8(model: onnx.ModelProto) -> None:
    """Replace ``initializer(fp32) -> QuantizeLinear`` with an int8 initializer."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    keep = []
    for node in graph.node:
        if (node.op_type == "QuantizeLinear" and node.input[0] in inits
                and node.input[1] in inits and consumers.get(node.input[0]) == 1):
            w = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
            scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            zp_array = (numpy_helper.to_array(inits[node.input[2]])
                        if len(node.input) > 2 and node.input[2] in inits else None)
            if zp_array is not None and onnx_formats.is_fp8_dtype(zp_array):
                if scale.ndim == 1 and scale.size > 1:
                    shape = [1] * w.ndim
                    shape[axis % w.ndim] = -1
                    scale = scale.reshape(shape)
                graph.initializer.remove(inits.pop(node.input[0]))
                graph.initializer.append(onnx_formats.fp8_initializer(
                    node.output[0], onnx_formats.fp8_weight_codes(w, scale)))
                continue
            zp = zp_array.astype(np.float32) if zp_array is not None else np.float32(0)
            if scale.ndim == 1 and scale.size > 1:
                shape = [1] * w.ndim
                shape[axis % w.ndim] = -1
                scale = scale.reshape(shape)
                zp = zp.reshape(shape) if zp.size > 1 else zp
            # the same arithmetic as QuantizeLinear: divide, round half to even, saturate
            q = np.clip(np.rint(w / scale) + zp, -128, 127).astype(np.int8)
            graph.initializer.remove(inits.pop(node.input[0]))
            graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
            continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def to_onnx(model: nn.Module, example_inputs, path: str | os.PathLike, *,
            opset: int | None = None,
            dynamic_batch: bool = True, input_names: list[str] | None = None,
            output_names: list[str] | None = None, fold_bn: bool = True,
            int8_weights: bool = False, dynamo: bool = False,
            gather_first: bool = True) -> ExportResult:
    """Export ``model`` (quantized, calibrated) to ``path``.

    Args:
        example_inputs: a tensor or tuple of tensors the model is traced with, or a dict
            of keyword tensors (``{"input_ids": ..., "attention_mask": ...}``), as
            calibration takes them: see :func:`keyword_plan`.
        opset: ONNX opset; default and minimum: 13 (per-channel Q/DQ), 19 with FP8
            quantizers, 21 with INT4 or block-wise weights.
        dynamic_batch: mark dim 0 of every input and output as dynamic (and, for
            keyword inputs, the sequence axis of token inputs).
        fold_bn: fold BatchNorm into the preceding conv (on a copy) before export.
        int8_weights: store weights as int8 initializers -> DQ instead of fp32 -> Q -> DQ
            (float8e4m3fn initializers for FP8 weight quantizers). Weight-only layers
            always store their integer weights.
        dynamo: use torch's dynamo exporter (it picks its own opset, 18 or newer; static
            shapes only).
        gather_first: weight-only embedding tables at opset >= 21: Gather the integer rows
            and their scales, then dequantize only those (False: dequantize the whole
            table, then Gather; constant scales, as TensorRT documents them).

    Example::

        result = to_onnx(model, torch.randn(1, 3, 224, 224), "model.onnx")
    """
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be an nn.Module, got {type(model).__name__}")
    fmt = format_of(model)
    needed, why = _needed_opset(model)
    opset_given = opset is not None
    if opset is None:
        opset = needed
    if opset < needed:
        raise ExportError(f"opset {opset}: {why} needs opset >= {needed}")
    path = Path(path)
    if not path.parent.exists():
        raise ExportError(f"output folder {path.parent} does not exist")
    if not path.parent.is_dir():
        raise ExportError(f"output folder {path.parent} is not a folder")
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"output folder {path.parent} is not writable")
    keywords = isinstance(example_inputs, Mapping)
    if keywords:
        example_inputs = _without_use_cache(example_inputs)
    args = keyword_args(example_inputs) if keywords else _as_tuple(example_inputs)
    if dynamo and not dynamo_exporter_available():
        raise ExportError(f"the dynamo exporter needs torch 2.5 or newer "
                          f"(torch.onnx.export(dynamo=True, dynamic_shapes=...)); this is "
                          f"torch {torch.__version__}: use dynamo=False")
    if dynamo and fmt not in ("int8", "float"):
        raise ExportError(f"the dynamo exporter writes INT8 Q/DQ only; export this {fmt} "
                          "model with the TorchScript exporter (dynamo=False)")
    if dynamo and dynamic_batch:
        # torch.export traces with fake tensors, and torch (2.14) has no fake-tensor kernel
        # for fake_quantize_*_affine with tensor qparams once a dimension is symbolic.
        raise ExportError(f"the dynamo exporter cannot trace fake-quant ops with a dynamic "
                          f"batch on torch {torch.__version__}: pass dynamic_batch=False "
                          f"(static shapes) or use the TorchScript exporter (dynamo=False)")
    missing = uncalibrated_quantizers(model)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8
                                          else "")
        raise ExportError(f"{len(missing)} enabled quantizers have no calibrated amax (in "
                          f"PyTorch they quantize with each input's own amax; ONNX and "
                          f"TensorRT need a fixed one): calibrate them or disable them: {shown}")

    _refuse_non_finite(non_finite_tensors(model), "of the model")
    from qdq.rules.fold import folded_before

    earlier = folded_before(model)
    work = copy.deepcopy(model).eval()
    notes = _export_without_cache(work)
    if fmt == "float":  # nothing quantized: say so rather than write a float file silently
        notes.append("float model: no enabled quantizer and no quantized weight, the file "
                     "has no Q/DQ (insert them with qdq.replace_modules or qdq.weight_only)")
        warnings.warn(f"to_onnx: {notes[-1]}", stacklevel=2)
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    spy = _FloatSdpaCalls()
    if keywords:
        with spy:
            plan = keyword_plan(work, dict(zip(example_inputs, args, strict=True)), fold_bn,
                                input_names, output_names, dynamic_batch)
        traced, folded = plan.module, plan.folded
        input_names, output_names, dynamic_axes = plan.input_names, plan.output_names, \
            plan.dynamic_axes
    else:
        folded = _fold(work, args) if fold_bn else []
        try:
            with torch.no_grad(), spy:
                outputs = work(*args)
        except Exception as err:
            raise ExportError(f"the model does not run on the example inputs: {err}") from err
        input_names = input_names or [f"input{i}" if len(args) > 1 else "input"
                                      for i in range(len(args))]
        # every tensor the exporter flattens out of tuples and dicts (an FPN's feature
        # maps, a detector's heads) gets a name: dict keys, or output0, output1 ...
        # (a name starting with a digit, an FPN's "0", is refused by the exporter)
        output_names = output_names or [f"output{name}" if name[:1].isdigit() else name
                                        for name, _ in flat_outputs(outputs)]
        dynamic_axes = ({name: {0: "batch"} for name in [*input_names, *output_names]}
                        if dynamic_batch else None)
        traced = _PositionalOnly(work) if _needs_wrapper(work, len(args)) else work
    if spy.calls and not dynamo and opset < SDPA_OPSET:
        what = (f"{spy.calls} float scaled_dot_product_attention call(s) (attention without "
                f"a quant twin), which the exporter spells from opset {SDPA_OPSET} on")
        if opset_given:
            raise ExportError(f"opset {opset}: the model makes {what}; pass opset >= "
                              f"{SDPA_OPSET} or quantize that attention "
                              "(qdq.nn.register_attention)")
        opset = SDPA_OPSET
        notes.append(f"opset {SDPA_OPSET}: the model makes {what}")
    # The exporter writes its raw graph to a scratch folder; only the checked,
    # post-processed model reaches ``path``, in one atomic write.
    with tempfile.TemporaryDirectory(prefix="qdq-export-") as scratch:
        raw = Path(scratch) / path.name
        try:
            if dynamo:
                with _torch_fake_quant_ops():
                    program = torch.onnx.export(
                        traced, args, dynamo=True, input_names=input_names,
                        output_names=output_names, verbose=False,
                        dynamic_shapes=_dynamo_shapes(args) if dynamic_batch else None)
                program.save(str(raw))
            else:
                explicit = spy.calls and _OLD_SDPA_EXPORT
                with _ExplicitSdpa() if explicit else contextlib.nullcontext():
                    torch.onnx.export(
                        traced, args, str(raw), dynamo=False,
                        opset_version=min(opset, onnx_formats.TORCHSCRIPT_MAX_OPSET),
                        input_names=input_names, output_names=output_names,
                        dynamic_axes=dynamic_axes, do_constant_folding=True)
        except ExportError:
            raise
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError(f"torch.onnx.export failed: {first}") from err
        onnx_model = onnx.load(str(raw))
    fold_constants(onnx_model)
    _refuse_non_finite(_nan_initializers(onnx_model), "of the exported graph")
    if int8_weights:
        _weights_to_int8(onnx_model)
    onnx_model = onnx_formats.set_opset(onnx_model, opset)
    onnx_formats.lower_weight_dq(onnx_model, gather_first=gather_first)
    onnx.checker.check_model(onnx_model)
    atomic_write(path, lambda tmp: onnx.save(onnx_model, str(tmp)), parents=False)
    ops = [n.op_type for n in onnx_model.graph.node]
    opset_used = next((o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")),
                      opset)
    size = path.stat().st_size
    stored, fp32 = onnx_formats.weight_bytes(onnx_model)
    return ExportResult(path=path, opset=opset_used, input_names=input_names,
                        output_names=output_names, quantize_nodes=ops.count("QuantizeLinear"),
                        dequantize_nodes=ops.count("DequantizeLinear"),
                        folded_batchnorms=folded, bytes=size, format=fmt,
                        fp32_bytes=size - stored + fp32, notes=notes,
                        folded_before=earlier)


def _needed_opset(model: nn.Module) -> tuple[int, str]:
    """The lowest opset ``model``'s quantization needs, and why."""
    weights = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    if any(w.bits == 4 or w.block_size for w in weights):
        return 21, "INT4 or block-wise weights (DequantizeLinear-21)"
    if any(q.is_fp8 and q.is_quant_enabled for _, q in quantizers(model)):
        return 19, "FP8 E4M3 Q/DQ (float8e4m3fn)"
    return 13, "Q/DQ with per-channel weights"


#: the first opset at which the TorchScript exporter spells aten::scaled_dot_product_attention
SDPA_OPSET = 14


#: torch 2.4's TorchScript exporter fails on ``scaled_dot_product_attention`` with a
#: float ``scale`` (as transformers passes it): such calls are written out as
#: MatMul/Softmax there, which is what newer exporters emit for them anyway.
_OLD_SDPA_EXPORT = tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 5)


class _ExplicitSdpa(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` computed as scores -> mask -> softmax -> matmul
    (float; rows masked throughout give zeros, as torch does)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            from qdq.nn.attention import sdpa_math

            return sdpa_math(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class _FloatSdpaCalls(TorchFunctionMode):
    """Counts ``F.scaled_dot_product_attention`` calls that reach torch (attention twins
    spell theirs out as MatMul/Softmax, which opset 13 has)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


_CACHE_HINT = ("a decoder's KV cache is no ONNX output: export with use_cache=False (leave "
               "use_cache out and to_onnx turns it off for the export)")


def _without_use_cache(inputs: Mapping) -> Mapping:
    """The keyword inputs without a ``use_cache`` that is off; one that is on is refused."""
    if "use_cache" not in inputs:
        return inputs
    value = inputs["use_cache"]
    on = bool(value.any()) if isinstance(value, torch.Tensor) else bool(value)
    if on:
        raise ExportError(f"use_cache=True: {_CACHE_HINT}; nothing was written")
    return {k: v for k, v in inputs.items() if k != "use_cache"}


def _export_without_cache(work: nn.Module) -> list[str]:
    """Turn the export copy's KV cache off (Hugging Face ``config.use_cache``); a note when
    that changes what a generative model returns."""
    config = getattr(work, "config", None)
    if getattr(config, "use_cache", None) is not True:
        return []
    config.use_cache = False
    can_generate = getattr(work, "can_generate", None)
    if callable(can_generate) and can_generate():
        return ["use_cache=False: exported without the KV cache (one full-sequence pass)"]
    return []


def _is_kv_cache(value) -> bool:
    """A transformers ``Cache`` (DynamicCache, EncoderDecoderCache, ...), by class name."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers")
               for c in type(value).__mro__)


def _torch_fake_quant_ops():
    """Make quantizers call torch's fake-quant ops, which the dynamo exporter maps to Q/DQ
    (it does not set ``is_in_onnx_export``); restored whatever happens."""
    return enable_onnx_export()


def dynamo_exporter_available() -> bool:
    """Whether this torch's ``torch.onnx.export`` takes ``dynamo=True`` with
    ``dynamic_shapes`` (torch 2.5 and newer)."""
    return "dynamic_shapes" in inspect.signature(torch.onnx.export).parameters


def _dynamo_shapes(args: tuple):
    batch = torch.export.Dim("batch")
    return tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)


# ----------------------------------------------------------------------- keyword inputs
# Hugging Face models take keyword tensors (input_ids, attention_mask, ...) and return a
# dict-like ModelOutput. ONNX graphs take and give flat, named tensors, so the export
# runs a wrapper that maps positional tensors to the keywords and flattens the outputs.


def keyword_args(inputs: Mapping) -> tuple:
    """The tensors of a keyword-input dict, in its order; one error for anything else."""
    bad = [k for k, v in inputs.items() if not isinstance(v, torch.Tensor)]
    if not inputs or bad:
        raise ExportError("keyword example_inputs must be a non-empty dict of tensors"
                          + (f"; not tensors: {bad}" if bad else ""))
    return tuple(inputs.values())


def flat_outputs(outputs, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor in a model's outputs, in order.

    Dict and ModelOutput fields are named by their keys (``last_hidden_state``), nested
    ones joined with dots; tuple items by position (``output0`` at the top level). None
    fields are skipped, as ONNX has no optional outputs, and so is a decoder's KV cache
    (a transformers ``Cache``): :func:`to_onnx` exports with ``use_cache=False``, and
    :func:`export.verify` compares the outputs the graph has.
    """
    if isinstance(outputs, torch.Tensor):
        return [(prefix or "output", outputs)]
    if _is_kv_cache(outputs):
        return []
    if isinstance(outputs, Mapping):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in outputs.items()]
    elif isinstance(outputs, (tuple, list)):
        items = [(f"{prefix}.{i}" if prefix else f"output{i}", v)
                 for i, v in enumerate(outputs)]
    elif outputs is None:
        return []
    else:
        raise ExportError(f"model output {prefix or 'output'} is a {type(outputs).__name__}, "
                          "not a tensor, tuple or dict")
    return [pair for name, value in items for pair in flat_outputs(value, name)]


class _KeywordCall(nn.Module):
    """``forward(*tensors)`` -> ``model(**dict(zip(names, tensors)))``, outputs flattened."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *tensors):
        outputs = self.model(**dict(zip(self.names, tensors, strict=True)))
        return tuple(t for _, t in flat_outputs(outputs))


@dataclass
class KeywordPlan:
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]] | None
    folded: list[str]


def _token_input(t: torch.Tensor) -> bool:
    """Token ids and masks: integer or bool ``[batch, sequence]`` tensors."""
    return t.dim() == 2 and not t.is_floating_point() and not t.is_complex()


def keyword_plan(model: nn.Module, inputs: dict[str, torch.Tensor], fold_bn: bool,
                 input_names: list[str] | None, output_names: list[str] | None,
                 dynamic_batch: bool) -> KeywordPlan:
    """How to export a keyword-input model (``model`` is the export copy, in eval mode).

    ONNX inputs are named after the dict keys and outputs after the output fields. With
    ``dynamic_batch``, dim 0 of everything is ``batch``; integer ``[batch, sequence]``
    inputs (token ids, attention masks) get a dynamic ``sequence`` axis too, and so does
    every output dim that is neither the first nor the last and has the example's sequence
    length (``last_hidden_state`` ``[batch, sequence, hidden]``).
    """
    names = list(inputs)
    if input_names is not None and len(input_names) != len(names):
        raise ExportError(f"input_names has {len(input_names)} names for {len(names)} inputs")
    folded = _fold(model, inputs) if fold_bn else []
    try:
        with torch.no_grad():
            outputs = flat_outputs(model(**inputs))
    except ExportError:
        raise
    except Exception as err:
        raise ExportError(f"the model does not run on the example inputs: {err}") from err
    if not outputs:
        raise ExportError("the model returns no tensor")
    in_names = list(input_names or names)
    out_names = list(output_names or [name for name, _ in outputs])
    if len(out_names) != len(outputs):
        raise ExportError(f"output_names has {len(out_names)} names for {len(outputs)} "
                          "outputs")
    axes = None
    if dynamic_batch:
        sequences = {int(t.shape[1]) for t in inputs.values() if _token_input(t)}
        axes = {}
        for name, t in zip(in_names, inputs.values(), strict=True):
            axes[name] = {0: "batch", 1: "sequence"} if _token_input(t) else {0: "batch"}
        for name, (_, t) in zip(out_names, outputs, strict=True):
            dims = {0: "batch"} if t.dim() else {}
            dims.update({d: "sequence" for d in range(1, t.dim() - 1)
                         if int(t.shape[d]) in sequences})
            axes[name] = dims
    return KeywordPlan(_KeywordCall(model, names), in_names, out_names, axes, folded)
