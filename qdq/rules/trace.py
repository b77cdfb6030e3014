"""Tracing with torch.fx, part by part.

A model that does not trace as a whole (data-dependent control flow, calls fx cannot
follow) is split: each child is traced on its own, recursively, so only the smallest
parts that fail are left to module-level handling. Callers get the traced parts and the
names of the parts that failed, with the reason, to warn about.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from qdq.nn.attention import QuantAttentionMixin
from qdq.nn.mixin import QuantInputMixin
from qdq.quantizer import TensorQuantizer

__all__ = ["QdqTracer", "TracedPart", "trace_parts", "module_path", "is_quant_leaf",
           "single_call_modules", "single_call_readers"]


class QdqTracer(fx.Tracer):
    """Keeps quantizers and quant twins as single ``call_module`` nodes.

    Their forwards branch on quantizer state, which fx cannot follow, and the rules
    want to see "a QuantConv2d" rather than the ops inside it. Attention twins run their
    float code under a function mode, which only works when they are called as a whole.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_quant_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root: nn.Module | Callable[..., Any],
              concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """The graph, with ``X | None`` argument annotations spelled ``typing.Union``.

        torch 2.4's fx writes a PEP 604 union into the generated code as a global named by
        its text, and asserts when two arguments carry equal but distinct unions (Hugging
        Face BERT's embeddings): the part would not trace. Newer torch spells them this way
        itself, so this changes nothing there.
        """
        graph = super().trace(root, concrete_args)
        for node in graph.nodes:
            node.type = _typing_union(node.type)
        return graph


def _typing_union(annotation: object) -> object:
    """``a | b`` as ``typing.Union[a, b]`` (the same type); anything else unchanged."""
    if isinstance(annotation, types.UnionType):
        args = tuple(_typing_union(a) for a in typing.get_args(annotation))
        return typing.Union[args]  # noqa: UP007 - the typing spelling is the point
    return annotation


def is_quant_leaf(m: nn.Module) -> bool:
    """Quantizers, quant twins and attention twins: one node each in a traced graph."""
    return isinstance(m, (TensorQuantizer, QuantInputMixin, QuantAttentionMixin))


@dataclass
class TracedPart:
    """A traced submodule: its path in the model (``""`` for the root) and its graph."""

    path: str
    module: nn.Module
    graph_module: fx.GraphModule | None
    error: str | None = None

    def qualify(self, target: str) -> str:
        """The model-level path of a target inside this part."""
        return f"{self.path}.{target}" if self.path else target


def module_path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _has_children(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def trace_parts(model: nn.Module, tracer_cls: type[fx.Tracer] = QdqTracer,
                prefix: str = "") -> Iterator[TracedPart]:
    """Yield a traced part for ``model`` or, if it fails, for its children (recursively).

    Parts that fail and have no children to fall back on are yielded with
    ``graph_module=None`` and the error text. Quantizers, quant twins and attention
    twins are never parts: they are single nodes of their parent's graph and nothing
    inside them is for the rules to rewrite.
    """
    if prefix and is_quant_leaf(model):
        return
    if isinstance(model, (nn.ModuleList, nn.ModuleDict)):  # containers: no forward
        for name, child in model.named_children():
            if _has_children(child):
                yield from trace_parts(child, tracer_cls, module_path(prefix, name))
        return
    try:
        graph = tracer_cls().trace(model)
        gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    except Exception as err:  # noqa: BLE001 - fx raises many kinds; we report and fall back
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        yield TracedPart(prefix, model, None, f"{type(err).__name__}: {first_line[:80]}")
        for name, child in model.named_children():
            if _has_children(child):
                yield from trace_parts(child, tracer_cls, module_path(prefix, name))
        return
    yield TracedPart(prefix, model, gm)



def single_call_modules(model: nn.Module, tracer_cls: type[fx.Tracer] = QdqTracer):
    """``(part, calls, node)`` for every module call in the traced parts of ``model`` whose
    module is called exactly once there (``calls``: module target -> times called in that
    part): where rescaling that module's weights changes only this call (SmoothQuant's
    and AWQ's exact folds)."""
    for part in trace_parts(model, tracer_cls):
        gm = part.graph_module
        if gm is None:
            continue
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for node in gm.graph.nodes:
            if node.op == "call_module" and calls[node.target] == 1:
                yield part, calls, node


def single_call_readers(node: fx.Node, calls: dict[str, int], qualify) -> list[str] | None:
    """The qualified paths of the modules that read ``node``'s output, when every user is
    a module called once (``calls``, as :func:`single_call_modules` gives it) with that
    output as its only argument; None otherwise."""
    readers = []
    for user in node.users:
        if user.op != "call_module" or calls.get(user.target) != 1 \
                or user.args != (node,) or user.kwargs:
            return None
        readers.append(qualify(user.target))
    return readers
