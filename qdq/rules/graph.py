"""What the placement rules need to know about fx nodes.

Op families are tables, not if/elif chains: each is a set of ``(op, target)`` keys that
match ``call_function`` targets, ``call_method`` names or ``call_module`` classes.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from qdq.nn.conv import _QuantConvNd, _QuantConvTransposeNd
from qdq.nn.functional import QuantAdd, QuantConcat, QuantMatMul
from qdq.nn.linear import QuantLinear
from qdq.nn.mixin import QuantInputMixin
from qdq.nn.pooling import QuantMaxPool1d, QuantMaxPool2d, QuantMaxPool3d
from qdq.quantizer import TensorQuantizer

__all__ = [
    "ADD", "CAT", "MATMUL", "RESIZE", "TRANSPARENT", "FUSIBLE", "WEIGHTED", "CONV_WEIGHTED",
    "MAXPOOL",
    "Site", "matches", "module_of", "producer", "passes_through", "sites", "owner_path",
    "is_tensor",
]

ADD = {("call_function", operator.add), ("call_function", operator.iadd),
       ("call_function", torch.add), ("call_method", "add"), ("call_method", "add_")}
CAT = {("call_function", torch.cat), ("call_function", torch.concat),
       ("call_function", torch.concatenate)}
MATMUL = {("call_function", torch.matmul), ("call_function", torch.bmm),
          ("call_function", operator.matmul), ("call_method", "matmul"),
          ("call_method", "bmm")}
#: Ops TensorRT cannot run in INT8 or that gain nothing from it: no Q/DQ placed around them.
RESIZE = {("call_function", F.interpolate), ("call_function", F.upsample),
          ("call_function", F.grid_sample), ("call_module", nn.Upsample),
          ("call_module", nn.UpsamplingNearest2d), ("call_module", nn.UpsamplingBilinear2d)}
#: Ops that move or relabel values without changing them: quantizing before or after
#: them is the same, so quantizers on either side describe one tensor.
TRANSPARENT = {
    ("call_module", nn.Identity), ("call_module", nn.Dropout), ("call_module", nn.Dropout1d),
    ("call_module", nn.Dropout2d), ("call_module", nn.Dropout3d),
    ("call_module", nn.Flatten), ("call_module", nn.Unflatten),
    ("call_function", torch.flatten), ("call_function", torch.reshape),
    ("call_function", torch.permute), ("call_function", torch.transpose),
    ("call_function", torch.squeeze), ("call_function", torch.unsqueeze),
    ("call_function", F.dropout),
    ("call_method", "view"), ("call_method", "reshape"), ("call_method", "flatten"),
    ("call_method", "permute"), ("call_method", "transpose"), ("call_method", "contiguous"),
    ("call_method", "squeeze"), ("call_method", "unsqueeze"),
}
#: Ops TensorRT fuses into the conv before them (so a residual add still fuses).
FUSIBLE = TRANSPARENT | {
    ("call_module", nn.BatchNorm1d), ("call_module", nn.BatchNorm2d),
    ("call_module", nn.BatchNorm3d), ("call_module", nn.ReLU), ("call_module", nn.ReLU6),
    ("call_function", F.relu), ("call_function", torch.relu),
    ("call_method", "relu"),
}
WEIGHTED = (_QuantConvNd, _QuantConvTransposeNd, QuantLinear)
#: layers a residual Add fuses into (see ``placement.from_weighted_layer``)
CONV_WEIGHTED = (_QuantConvNd, _QuantConvTransposeNd)
MAXPOOL = (QuantMaxPool1d, QuantMaxPool2d, QuantMaxPool3d)


def _stochastic_depth() -> set:
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # torchvision is a dependency, but keep the rules importable
        return set()
    return {("call_function", stochastic_depth)}


TRANSPARENT |= _stochastic_depth()
FUSIBLE |= _stochastic_depth()


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def matches(gm: fx.GraphModule, node: fx.Node, table: set) -> bool:
    """Whether ``node`` is one of the ops in ``table``."""
    if node.op == "call_module":
        cls = type(gm.get_submodule(node.target))
        return any(op == "call_module" and isinstance(t, type) and issubclass(cls, t)
                   for op, t in table)
    if node.op in ("call_function", "call_method"):
        try:
            return (node.op, node.target) in table
        except TypeError:  # unhashable target
            return False
    return False


def producer(gm: fx.GraphModule, node, table: set = TRANSPARENT):
    """The first node before ``node`` that is not one of ``table`` (first argument)."""
    while isinstance(node, fx.Node) and matches(gm, node, table) and node.args \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def passes_through(gm: fx.GraphModule, node, target: fx.Node,
                   table: set = TRANSPARENT) -> bool:
    return producer(gm, node, table) is target


def owner_path(node: fx.Node) -> str:
    """The module (path inside the traced part) whose forward created ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack), "") if stack else ""


def is_tensor(node) -> bool | None:
    """True/False from shape propagation, None when unknown (no example inputs)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        return True
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return None
    return hasattr(meta, "shape") and getattr(meta, "dtype", None) is not None \
        and meta.dtype.is_floating_point


@dataclass
class Site:
    """One place where a quantizer reads a tensor: ``module.attr`` applied to ``source``."""

    node: fx.Node
    module: nn.Module
    attr: str
    source: fx.Node

    @property
    def quantizer(self) -> TensorQuantizer:
        return getattr(self.module, self.attr)


def _arg_sites(module: nn.Module, node: fx.Node) -> Iterator[tuple[str, object]]:
    args = list(node.args) + list(node.kwargs.values())
    if isinstance(module, QuantConcat):
        tensors = args[0] if args else ()
        for t in tensors if isinstance(tensors, (list, tuple)) else ():
            yield "_input_quantizer", t
    elif isinstance(module, (QuantAdd, QuantMatMul)):
        if len(args) >= 2:
            yield "_input_quantizer", args[0]
            yield "_other_quantizer", args[1]
    elif args:
        yield "_input_quantizer", args[0]
        yield from getattr(module, "extra_input_sites", lambda _n: ())(node)


def sites(gm: fx.GraphModule) -> list[Site]:
    """Every enabled per-tensor input quantizer of the graph, with the tensor it reads."""
    found = []
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        if not isinstance(module, QuantInputMixin):
            continue
        for attr, source in _arg_sites(module, node):
            q = getattr(module, attr, None)
            if (isinstance(source, fx.Node) and isinstance(q, TensorQuantizer)
                    and q.is_enabled and q.axis is None):
                found.append(Site(node, module, attr, source))
    return found
