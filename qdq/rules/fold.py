"""Fold eval-mode BatchNorm into the Conv / ConvTranspose / Linear before it.

TensorRT fuses a BatchNormalization that follows a float conv, but not one that follows
a conv whose weight went through Q/DQ: left unfolded, BN runs as its own layer and the
INT8 engine slows down. Folding first also makes the weight quantizer see the weights
the engine will use. With ``s = gamma / sqrt(running_var + eps)``::

    W' = W * s   (along the output-channel axis)      b' = (b - running_mean) * s + beta

The BN becomes ``nn.Identity`` in place, so module paths and state_dict keys of the
conv stay valid. A conv that is already a quant twin stays one; if its weight quantizer
holds an amax, that amax is brought in line with the folded weight.

Pairs are found on torch.fx graphs (a conv whose only consumer is a BN). Where a part
of the model does not trace, the BNs directly in that part are left as they are and a
warning names them.

The model remembers what was folded (``qdq_folded_batchnorms`` on the module folded, the
placement rules' report, ``qdq.restore``), so a later step, such as an export of a model
folded when its weights were quantized, can say "already folded" rather than "0 folded":
:func:`folded_before` lists them.
"""

from __future__ import annotations

import warnings

import torch
from torch import fx, nn

from qdq.quantizer import TensorQuantizer
from qdq.replace import disable_quantization
from qdq.rules.check import Call, placeholder_args
from qdq.rules.trace import trace_parts

__all__ = ["fold_batchnorm", "fold_pair", "FOLDABLE", "BATCHNORM", "folded_before",
           "record_folded"]

#: the attribute a folded module keeps its folded BatchNorm paths in (relative to it)
_RECORD = "qdq_folded_batchnorms"

_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) + _CONV_TRANSPOSE
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _out_axis(layer: nn.Module) -> int:
    return 1 if isinstance(layer, _CONV_TRANSPOSE) else 0


def _out_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return layer.out_channels


def _bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    return scale


def _scale_weight(layer: nn.Module, scale: torch.Tensor) -> None:
    """Multiply the weight by ``scale`` along its output channels (groups included)."""
    w = layer.weight
    if isinstance(layer, _CONV_TRANSPOSE):
        groups = layer.groups
        # weight is [in, out/groups, *k]; output channel g*(out/groups)+j sits at
        # rows of group g, column j
        view = w.view(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
        factor = scale.view(groups, 1, w.shape[1], *([1] * (w.dim() - 2)))
        view.mul_(factor.to(w.dtype))
    else:
        w.mul_(scale.view(-1, *([1] * (w.dim() - 1))).to(w.dtype))


def _refresh_weight_amax(layer: nn.Module, scale: torch.Tensor) -> None:
    """Keep a calibrated weight amax consistent with the folded weight.

    Per-channel amax along the output axis is multiplied by ``|s|``, which equals the
    folded weight's max where the amax was the weight's max and keeps the same clipping
    ratio where it was not. Any other layout (per tensor, another axis, grouped
    ConvTranspose) is recomputed from the folded weight.
    """
    q = getattr(layer, "_weight_quantizer", None)
    if not isinstance(q, TensorQuantizer) or q.amax is None:
        return
    amax = q.amax
    w = layer.weight.detach()
    axis = q.axis
    out_axis = _out_axis(layer)
    groups = getattr(layer, "groups", 1)
    per_out = (isinstance(axis, int) and axis % w.dim() == out_axis
               and amax.numel() == _out_channels(layer)
               and not (out_axis == 1 and groups > 1))
    if per_out:
        new = amax.double() * scale.abs().view(amax.shape).to(amax.device)
    else:
        if axis is None:
            new = w.abs().amax()
        else:
            axes = (axis,) if isinstance(axis, int) else tuple(axis)
            axes = {a % w.dim() for a in axes}
            reduced = [d for d in range(w.dim()) if d not in axes]
            new = torch.amax(w.abs(), dim=reduced, keepdim=True)
        new = new.reshape(amax.shape)
    q._set_amax(new.float(), allow_zero=True)


@torch.no_grad()
def fold_pair(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn`` into ``layer`` in place (``bn`` itself is left untouched)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    if bn.num_features != _out_channels(layer):
        raise ValueError(f"BatchNorm has {bn.num_features} features, the layer before it "
                         f"{_out_channels(layer)} output channels")
    scale = _bn_scale(bn).to(layer.weight.device)
    shift = -bn.running_mean.double().to(scale.device) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double().to(scale.device)
    _scale_weight(layer, scale)
    if layer.bias is None:
        layer.bias = nn.Parameter(shift.to(layer.weight.dtype))
    else:
        layer.bias.copy_((layer.bias.double() * scale + shift).to(layer.bias.dtype))
    _refresh_weight_amax(layer, scale)


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def _linear_ok(node: fx.Node) -> bool:
    """A Linear folds only when its output is ``[N, C]`` (BN1d then normalises C).

    On ``[N, L, C]`` a BatchNorm1d would normalise L, not the Linear's features. Without
    shape information (no example inputs), 2-D is assumed.
    """
    meta = node.meta.get("tensor_meta")
    return meta is None or len(getattr(meta, "shape", (0, 0))) == 2


def _pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(layer target, bn target) pairs where the BN is the layer's only consumer."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), BATCHNORM):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        layer = gm.get_submodule(src.target)
        if not isinstance(layer, FOLDABLE):
            continue
        if isinstance(layer, nn.Linear) and not _linear_ok(src):
            continue
        if calls[node.target] == 1 and calls[src.target] == 1:
            pairs.append((src.target, node.target))
    return pairs


def _propagate_shapes(gm: fx.GraphModule, call: Call) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    args = placeholder_args(gm, call)
    if args is None:
        return
    try:
        with torch.no_grad(), disable_quantization(gm):
            ShapeProp(gm).propagate(*args)
    except Exception as err:  # noqa: BLE001 - shapes are a bonus; folding goes on
        warnings.warn(f"fold_batchnorm: shape propagation failed ({err}); "
                      "Linear+BatchNorm1d pairs are assumed 2-D", stacklevel=3)


def fold_batchnorm(model: nn.Module, example_inputs=None) -> list[str]:
    """Fold every eval-mode BatchNorm that directly follows a Conv/ConvTranspose/Linear.

    In place: the layer's weight and bias are rewritten and the BN is replaced by
    ``nn.Identity``. BNs in training mode are left as they are (their statistics still
    change), with a warning. ``example_inputs`` (a tensor, a tuple of arguments or a dict
    of keyword arguments), when given, lets
    shapes be checked: a Linear followed by BatchNorm1d folds only on 2-D outputs.

    Returns the model paths of the folded BatchNorms.
    """
    call = Call.of(example_inputs)
    folded: list[str] = []
    in_training: list[str] = []
    untraced: list[str] = []
    for part in trace_parts(model):
        if part.graph_module is None:
            direct = [part.qualify(n) for n, m in part.module.named_children()
                      if isinstance(m, BATCHNORM)]
            if direct:
                untraced.append(f"{part.path or '(root)'} ({part.error}): "
                                + ", ".join(direct))
            continue
        if call is not None and not part.path:
            _propagate_shapes(part.graph_module, call)
        for layer_t, bn_t in _pairs(part.graph_module):
            layer_path, bn_path = part.qualify(layer_t), part.qualify(bn_t)
            layer, bn = model.get_submodule(layer_path), model.get_submodule(bn_path)
            if bn.training:
                in_training.append(bn_path)
                continue
            if bn.num_features != _out_channels(layer):
                continue
            fold_pair(layer, bn)
            _set_submodule(model, bn_path, nn.Identity())
            folded.append(bn_path)
    record_folded(model, folded)
    if in_training:
        warnings.warn("fold_batchnorm: BatchNorm in training mode left as is (call "
                      f"model.eval() first): {', '.join(in_training)}", stacklevel=2)
    if untraced:
        warnings.warn("fold_batchnorm: parts that torch.fx cannot trace; their BatchNorm "
                      "layers are left as is: " + "; ".join(untraced), stacklevel=2)
    return folded


def record_folded(model: nn.Module, paths: list[str]) -> None:
    """Remember on ``model`` that the BatchNorms at ``paths`` (relative to it) are folded."""
    if paths:
        known = list(getattr(model, _RECORD, []))
        setattr(model, _RECORD, known + [p for p in paths if p not in known])


def folded_before(model: nn.Module) -> list[str]:
    """Paths of the BatchNorms already folded into the layer before them in ``model``: by
    :func:`fold_batchnorm` (``qdq.weight_only``, the placement rules) or rebuilt folded by
    ``qdq.restore``, in the order they were recorded."""
    found: dict[str, None] = {}
    for prefix, module in model.named_modules():
        report = getattr(module, "qdq_rules_report", None)
        for path in [*getattr(module, _RECORD, []), *getattr(report, "folded", [])]:
            found[f"{prefix}.{path}" if prefix else path] = None
    return list(found)
