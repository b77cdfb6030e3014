"""Tracing with torch.fx, part by part.

A model that does not trace as a whole (data-dependent control flow, calls fx cannot
follow) is split: each child is traced on its own, recursively, so only the smallest
parts that fail are left to module-level handling. Callers get the traced parts and the
names of the parts that failed, with the reason, to warn about.

fx runs ``forward`` once, with the module's current ``self.training``: a branch taken
only in the other mode is not in the graph, and the traced module has no such branch
(inception_v3's ``AuxLogits``, googlenet's ``aux1``/``aux2``, run only in training).
Replacing such a part with its graph would drop those modules from the model and QAT
would train without them, so a part whose trace in the other mode calls modules the
first trace does not is handled like one that does not trace: its children are traced
instead and the part's own ``forward`` keeps running, in either mode, with the quant
twins' module-level quantizers.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import fx, nn

from qdq.nn.attention import QuantAttentionMixin
from qdq.nn.mixin import QuantInputMixin
from qdq.quantizer import TensorQuantizer

__all__ = ["QdqTracer", "TracedPart", "trace_parts", "module_path", "is_quant_leaf",
           "mode_only_modules", "single_call_modules", "single_call_readers"]


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

    def proxy(self, node: fx.Node) -> fx.Proxy:
        # only splits get their own class: fx's Proxy finds ``a, b = proxy`` unpacking
        # from the calling frame, which an override in between would hide
        return _SplitProxy(node, self) if _pieces(node) is not None else super().proxy(node)


class _SplitProxy(fx.Proxy):
    """A Proxy that can be iterated when it is the result of a split into a known number of
    pieces: ``list(x.chunk(2, 1))`` (YOLO's C2f blocks) or ``x.split([a, b], 1)`` would
    otherwise stop the trace ("Proxy object cannot be iterated"). The pieces are
    ``getitem`` nodes; a wrong count (a tensor too small for its chunks) changes the float
    function, which the rules' check catches."""

    def __iter__(self):
        return iter([self[i] for i in range(_pieces(self.node))])

    def __len__(self) -> int:  # list() asks first
        return _pieces(self.node)


def _pieces(node: fx.Node) -> int | None:
    """How many tensors a ``chunk``/``split``/``tensor_split`` node returns, when its
    arguments say so without the tensor's shape."""
    if node.op == "call_method" and node.target in ("chunk", "split", "tensor_split"):
        kind, args, kwargs = node.target, node.args[1:], node.kwargs
    elif node.op == "call_function" and node.target in (torch.chunk, torch.split,
                                                        torch.tensor_split):
        kind, args, kwargs = node.target.__name__, node.args[1:], node.kwargs
    else:
        return None
    first = args[0] if args else kwargs.get(
        {"chunk": "chunks", "split": "split_size_or_sections"}.get(kind, "sections"))
    if kind == "chunk" and isinstance(first, int):
        return first
    if kind == "split" and isinstance(first, (list, tuple)):
        return len(first)
    if kind == "tensor_split":
        if isinstance(first, int):
            return first
        if isinstance(first, (list, tuple)):
            return len(first) + 1
    return None


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
                prefix: str = "", training: bool | None = None) -> Iterator[TracedPart]:
    """Yield a traced part for ``model`` or, if it fails, for its children (recursively).

    Parts that fail and have no children to fall back on are yielded with
    ``graph_module=None`` and the error text. Quantizers, quant twins and attention
    twins are never parts: they are single nodes of their parent's graph and nothing
    inside them is for the rules to rewrite. ``training`` traces in that mode instead
    of the module's own (modes are put back after): the children that a parent calls
    only in the other mode are traced in the mode they run in.
    """
    if prefix and is_quant_leaf(model):
        return
    if isinstance(model, (nn.ModuleList, nn.ModuleDict)):  # containers: no forward
        for name, child in model.named_children():
            if _has_children(child):
                yield from trace_parts(child, tracer_cls, module_path(prefix, name),
                                       training)
        return
    try:
        graph = _trace(model, tracer_cls, training)
        gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    except Exception as err:  # noqa: BLE001 - fx raises many kinds; we report and fall back
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        yield from _children_instead(model, tracer_cls, prefix,
                                     f"{type(err).__name__}: {first_line[:80]}", training)
        return
    mode = model.training if training is None else training
    other_mode = mode_only_modules(model, graph, tracer_cls, mode)
    if other_mode:
        yield from _children_instead(
            model, tracer_cls, prefix,
            f"calls {', '.join(other_mode[:3])} only in {'eval' if mode else 'training'} "
            "mode, which one trace drops", mode, flip=set(other_mode))
        return
    yield TracedPart(prefix, model, gm)


def _trace(model: nn.Module, tracer_cls: type[fx.Tracer], training: bool | None) -> fx.Graph:
    """``model`` traced in mode ``training`` (None: as it is); every module's mode is put
    back."""
    if training is None or training == model.training and \
            all(m.training == training for m in model.modules()):
        return tracer_cls().trace(model)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train(training)
        return tracer_cls().trace(model)
    finally:
        for m, was in modes:
            m.training = was


def _children_instead(model: nn.Module, tracer_cls: type[fx.Tracer], prefix: str,
                      error: str, training: bool | None,
                      flip: set[str] = frozenset()) -> Iterator[TracedPart]:
    """``model`` as a failed part, then its children as parts (those in ``flip`` traced in
    the other mode than ``training``, the one their parent calls them in)."""
    yield TracedPart(prefix, model, None, error)
    for name, child in model.named_children():
        if _has_children(child):
            mode = training
            if name in flip:
                mode = not (model.training if training is None else training)
            yield from trace_parts(child, tracer_cls, module_path(prefix, name), mode)


def _reached(graph: fx.Graph) -> tuple[set[str], set[str]]:
    """The module and attribute targets of ``graph``, and every prefix of them."""
    targets = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
    prefixes = {t.rsplit(".", i)[0] for t in targets for i in range(t.count(".") + 1)}
    return targets, prefixes


def _unreached(model: nn.Module, graph: fx.Graph) -> list[str]:
    """Outermost submodules holding parameters or buffers that ``graph`` never uses."""
    targets, prefixes = _reached(graph)

    def used(path: str) -> bool:
        parts = path.split(".")
        return path in prefixes or any(".".join(parts[:i]) in targets
                                       for i in range(1, len(parts)))

    holding = {p for p, m in model.named_modules()
               if p and next(chain(m.parameters(), m.buffers()), None) is not None}
    unused = {p for p in holding if not used(p)}
    return [p for p in sorted(unused) if p.rpartition(".")[0] not in unused]


def mode_only_modules(model: nn.Module, graph: fx.Graph,
                      tracer_cls: type[fx.Tracer] = QdqTracer,
                      training: bool | None = None) -> list[str]:
    """Submodules that ``model``'s forward calls only in the mode it was not traced in
    (``graph`` is its trace in mode ``training``, None: its own mode): traced again in
    the other mode when the first trace leaves modules unused. Modes are put back."""
    unused = _unreached(model, graph)
    if not unused:
        return []
    try:
        other = _trace(model, tracer_cls,
                       not (model.training if training is None else training))
    except Exception:  # noqa: BLE001 - no second trace: nothing known to be dropped
        return []
    now_unused = set(_unreached(model, other))
    return [p for p in unused if p not in now_unused]



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
