"""What a layer is, decided in one place for every part of qdq that swaps or reports layers.

A twin table maps float classes to quant classes. A layer matches its own class, or the
nearest base class in the table when its class only changes how the layer is *built*:
torchvision's ``Conv3DSimple`` and ``nn.MultiheadAttention``'s
``NonDynamicallyQuantizableLinear`` define ``__init__`` and nothing their base's
``forward`` calls, so a Conv3d/Linear twin computes what they compute. A subclass that
overrides ``forward`` (or any other method of its base) would lose its own code in a twin:
it stays float, and :func:`float_layers` says so.

:func:`float_layers` names every layer with weights that a model computes in float, with
the reason: ignored, no twin for the class, a subclass with its own code, run by its
parent's functional code, quantizers switched off, or float by design (normalization,
embedding tables). ``replace_modules`` warns about the unexpected ones and
:func:`qdq.summary` lists them all.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

__all__ = ["twin_class", "overridden", "FloatLayer", "float_layers", "warn_float_layers",
           "FloatLayersWarning"]

#: Class attributes a subclass may redefine without changing what the layer computes.
_BUILD_ONLY = frozenset({
    "__init__", "__module__", "__qualname__", "__doc__", "__annotations__", "__dict__",
    "__weakref__", "__firstlineno__", "__static_attributes__", "__constants__",
    "__parameters__", "__orig_bases__", "extra_repr", "__repr__", "reset_parameters",
    "_reset_parameters", "__setstate__",
})

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_TABLES = (nn.Embedding, nn.EmbeddingBag)


class FloatLayersWarning(UserWarning):
    """Layers with weights that stay float for a reason the user may not expect."""


def overridden(cls: type, base: type) -> list[str]:
    """Members of ``base`` that ``cls`` (a subclass) or a class between them redefines,
    other than how the layer is built: what a twin of ``base`` would not run."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is base:
            break
        names.update(n for n in vars(klass) if n not in _BUILD_ONLY
                     and any(n in vars(b) for b in base.__mro__ if b is not object))
    return sorted(names)


def _nearest_base(cls: type, table: Mapping[type, type]) -> type | None:
    return next((base for base in cls.__mro__[1:] if base in table), None)


def twin_class(layer: nn.Module | type, table: Mapping[type, type]) -> type | None:
    """The twin ``table`` gives ``layer`` (an instance or a class): its own class's, or its
    nearest tabled base's when the subclass computes what the base does (None otherwise)."""
    cls = layer if isinstance(layer, type) else type(layer)
    if cls in table:
        return table[cls]
    base = _nearest_base(cls, table)
    if base is None or overridden(cls, base):
        return None
    return table[base]


@dataclass(frozen=True)
class FloatLayer:
    """A layer whose weights stay float: its path, class name and why."""

    name: str
    kind: str
    reason: str
    expected: bool  # float by design or by the user's choice (no warning)

    def __str__(self) -> str:
        return f"{self.name} ({self.kind}): {self.reason}"


def _own_weights(module: nn.Module) -> bool:
    """A layer's weights: a matrix (or conv kernel) parameter of its own whose name says
    weight. Position embeddings, class tokens and bias tables are not layers."""
    if isinstance(module, _NORMS):
        return True
    return any(p is not None and p.dim() >= 2 and "weight" in name
               for name, p in module._parameters.items())


def _named_attention(module: nn.Module) -> bool:
    from qdq.nn.attention import attention_twin_of

    return (type(module).__name__.endswith("Attention")
            and not isinstance(module, nn.MultiheadAttention)
            and attention_twin_of(type(module)) is None)


def _own_attention_code(module: nn.Module) -> bool:
    """An attention module (by class name) that is no twin, has no registered twin and
    holds neither a twin nor another such module (the innermost one is named): its
    matrix products run in its own, unquantized code (DeBERTa's disentangled attention)."""
    from qdq.nn.attention import QuantAttentionMixin

    if not _named_attention(module):
        return False
    inner = [m for m in module.modules() if m is not module]
    return not any(isinstance(m, QuantAttentionMixin) or _named_attention(m) for m in inner)


def _quantized(module: nn.Module) -> bool:
    from qdq.nn.attention import QuantAttentionMixin
    from qdq.nn.mixin import QuantInputMixin
    from qdq.nn.weight_only import QuantizedWeight, WeightOnlyLayer
    from qdq.quantizer import TensorQuantizer

    return isinstance(module, (QuantInputMixin, QuantAttentionMixin, WeightOnlyLayer,
                               QuantizedWeight, TensorQuantizer))


def _reason(name: str, module: nn.Module, parent: nn.Module | None,
            is_ignored: Callable[[str, nn.Module], bool],
            weight_only: bool = False) -> tuple[str, bool] | None:
    """Why ``module`` is float, and whether that is expected; None when it is quantized
    or has nothing to quantize."""
    from qdq.nn.attention import attention_twin_of
    from qdq.nn.mixin import QuantInputMixin
    from qdq.nn.registry import QUANT_TWINS, quant_twin_of
    from qdq.nn.weight_only import WEIGHT_ONLY_TWINS

    if isinstance(module, QuantInputMixin):
        quantizers = [q for q in module.children() if hasattr(q, "is_quant_enabled")]
        if quantizers and not any(q.is_quant_enabled for q in quantizers):
            return "its quantizers are switched off (partial quantization)", True
        return None
    if not _quantized(module) and is_ignored(name, module):
        return "ignored (the ignore list)", True
    if not _quantized(module) and _own_attention_code(module):
        if weight_only:
            return "attention matmuls: a weight-only format keeps activations float", True
        return (f"{type(module).__name__} computes q @ k^T and attn @ v in its own code, "
                "which no twin covers: both products stay float (register one: "
                "qdq.nn.register_attention)"), False
    if _quantized(module) or not _own_weights(module) and not isinstance(
            module, nn.MultiheadAttention) and attention_twin_of(type(module)) is None:
        return None
    cls = type(module)
    if isinstance(parent, nn.MultiheadAttention):
        return ("its weight is read by nn.MultiheadAttention's own code, which never calls "
                "it: quantized with its parent"), True
    if isinstance(module, nn.MultiheadAttention):
        return ("nn.MultiheadAttention computes its projections in its own code: "
                "apply_rules gives it a Q/DQ twin (projections and both matmuls) where "
                "torch.fx traces the module calling it; weight-only formats keep it "
                "float"), True
    if attention_twin_of(cls) is not None and weight_only:
        return "attention matmuls: a weight-only format keeps activations float", True
    if attention_twin_of(cls) is not None:
        return "an attention module with a registered twin that was not swapped in", False
    if isinstance(module, _NORMS):
        return ("normalization: float in TensorRT (BatchNorm folds into the layer before "
                "it with the placement rules)"), True
    if isinstance(module, _TABLES):
        return ("an embedding table: a lookup, float in Q/DQ formats (weight_only "
                "quantizes tables)"), True
    if weight_only and twin_class(cls, WEIGHT_ONLY_TWINS) is None:
        return (f"no weight-only twin for {cls.__name__}: its weights stay float "
                "(qdq.nn.weight_only.register_weight_only)"), False
    if not weight_only and quant_twin_of(cls) is not None:  # by import path (GPT-2 Conv1D)
        return ("it has a quant twin but was not swapped (kept by an ignore rule, or "
                "added after quantization)"), True
    for table in ((WEIGHT_ONLY_TWINS,) if weight_only else (QUANT_TWINS, WEIGHT_ONLY_TWINS)):
        base = cls if cls in table else _nearest_base(cls, table)
        if base is None:
            continue
        changed = overridden(cls, base)
        if changed:
            return (f"a subclass of {base.__name__} with its own "
                    f"{', '.join(changed)}: a twin would not run that code (register a "
                    "twin for the class: qdq.nn.registry.register_quant_twin)"), False
        return ("it has a quant twin but was not swapped (kept by an ignore rule, or "
                "added after quantization)"), True
    return (f"no quant twin for {cls.__name__}: its weights stay float (register one: "
            "qdq.nn.registry.register_quant_twin)"), False


def float_layers(model: nn.Module, ignore=None) -> list[FloatLayer]:
    """Every layer of ``model`` whose weights are computed in float, with the reason, in
    model order. ``ignore`` takes :func:`qdq.replace_modules`'s ignore rules, to say
    which layers were left float by them."""
    from qdq.nn.weight_only import WeightOnlyLayer
    from qdq.replace import _ignore_predicate

    is_ignored = _ignore_predicate(ignore)
    weight_only = any(isinstance(m, WeightOnlyLayer) for m in model.modules())
    found: list[FloatLayer] = []

    def visit(parent: nn.Module | None, module: nn.Module, name: str) -> None:
        why = _reason(name, module, parent, is_ignored, weight_only) if name else None
        if why is not None:
            found.append(FloatLayer(name, type(module).__name__, why[0], why[1]))
            if is_ignored(name, module):
                return  # an ignored module keeps its float children: one line says it
        for child_name, child in module.named_children():
            visit(module, child, f"{name}.{child_name}" if name else child_name)

    visit(None, model, "")
    return found


def warn_float_layers(model: nn.Module, ignore=None, stacklevel: int = 3) -> list[FloatLayer]:
    """One :class:`FloatLayersWarning` naming the layers left float unexpectedly (a
    subclass with its own code, a class without a twin); returns them."""
    surprising = [f for f in float_layers(model, ignore) if not f.expected]
    if surprising:
        shown = "; ".join(map(str, surprising[:6]))
        more = f"; and {len(surprising) - 6} more (qdq.float_layers lists them)" \
            if len(surprising) > 6 else ""
        warnings.warn(f"{len(surprising)} layer(s) with weights stay float: {shown}{more}",
                      FloatLayersWarning, stacklevel=stacklevel)
    return surprising
