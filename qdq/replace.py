"""Manual insertion and the model walker: replace layers with quant twins, name and
toggle quantizers.

Every other part of qdq that needs "all quantizers of a model" calls
:func:`quantizers` here, so naming and traversal rules live in one place.

Example::

    replaced = replace_modules(model, ignore=["fc", re.compile(r"layer4\\..*")])
    with disable_quantization(model.layer1):
        ...                                  # layer1 runs in float here
    print(summary(model))
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

from qdq.descriptor import QuantDescriptor
from qdq.layer_kinds import twin_class, warn_float_layers
from qdq.nn.attention import attention_twin_of
from qdq.nn.mixin import QuantInputMixin, QuantMixin
from qdq.nn.registry import QUANT_TWINS, quant_twin_of
from qdq.quantizer import TensorQuantizer

__all__ = [
    "Replacement", "replace_modules", "quantizers", "name_quantizers",
    "disable_quantization", "enable_quantization", "IgnoreRule", "quantizer_paths",
]

IgnoreRule = str | re.Pattern | Callable[[str, nn.Module], bool]


@dataclass(frozen=True)
class Replacement:
    name: str
    float_type: str
    quant_type: str


def _ignore_predicate(ignore) -> Callable[[str, nn.Module], bool]:
    if ignore is None:
        return lambda name, module: False
    rules = ignore if isinstance(ignore, (list, tuple, set)) else [ignore]
    checks: list[Callable[[str, nn.Module], bool]] = []
    for rule in rules:
        if isinstance(rule, str):
            checks.append(lambda name, module, r=rule: name == r)
        elif isinstance(rule, re.Pattern):
            checks.append(lambda name, module, r=rule: r.fullmatch(name) is not None)
        elif callable(rule):
            checks.append(rule)
        else:
            raise TypeError(f"ignore rule must be a name, a compiled regex or a callable, "
                            f"got {type(rule).__name__}")
    return lambda name, module: any(check(name, module) for check in checks)


def replace_modules(model: nn.Module, ignore=None,
                    quant_map: dict[type[nn.Module], type[nn.Module]] | None = None,
                    quant_desc_input: QuantDescriptor | None = None,
                    quant_desc_weight: QuantDescriptor | None = None) -> list[Replacement]:
    """Swap every float layer that has a quant twin for that twin, in place.

    Args:
        model: the model; its submodules are replaced in place (the root itself too is
            never replaced: wrap it if it is a bare layer).
        ignore: exact module names (``"layer1.0.conv1"``, never a substring match),
            compiled regexes (full match), or ``callable(name, module) -> bool``; one
            rule or a list. An ignored module keeps its float children too.
        quant_map: float class -> quant class, overriding the registry per class.
            Registered attention classes (:mod:`qdq.nn.attention`) get their twins too,
            so their matmuls and functional linears are quantized.
        quant_desc_input / quant_desc_weight: descriptors instead of the classes' defaults.

    A layer matches its class's twin, or a base class's when it only changes how the
    layer is built (:mod:`qdq.layer_kinds`). One :class:`~qdq.layer_kinds.FloatLayersWarning`
    names the layers with weights left float for a reason you may not expect (a subclass
    with its own ``forward``, a class without a twin); :func:`qdq.float_layers` lists
    every float layer with its reason.

    Returns the replacements made, in model order.
    """
    is_ignored = _ignore_predicate(ignore)
    table = dict(QUANT_TWINS)
    table.update(quant_map or {})
    done: list[Replacement] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}{child_name}"
            if is_ignored(name, child):
                continue
            quant_cls = (twin_class(child, table) or quant_twin_of(type(child))  # by path
                         or attention_twin_of(type(child)))
            if quant_cls is not None and not isinstance(child, QuantInputMixin):
                descs = {"quant_desc_input": quant_desc_input}
                if issubclass(quant_cls, QuantMixin):
                    descs["quant_desc_weight"] = quant_desc_weight
                twin = quant_cls.from_float(child, **descs)
                setattr(parent, child_name, twin)
                done.append(Replacement(name, type(child).__name__, quant_cls.__name__))
                child = twin
            if type(child) is nn.MultiheadAttention:
                continue  # its own code uses out_proj's weight; apply_rules quantizes both
            visit(child, name + ".")

    visit(model, "")
    name_quantizers(model)
    warn_float_layers(model, ignore)
    return done


def quantizers(model: nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    """``(name, quantizer)`` for every distinct quantizer, under its first name."""
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            yield name, module


def quantizer_paths(model: nn.Module) -> list[tuple[TensorQuantizer, list[str]]]:
    """Every distinct quantizer with all the module paths it sits at (a shared quantizer
    has several), in model order."""
    found: dict[int, tuple[TensorQuantizer, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, TensorQuantizer):
            found.setdefault(id(module), (module, []))[1].append(name)
    return list(found.values())


def name_quantizers(model: nn.Module) -> None:
    """Give each quantizer its module path, so errors and reports can name it."""
    for name, q in quantizers(model):
        q.name = name or q.name


class _Toggle:
    """Switch every quantizer under ``module`` on or off; restore on exit.

    Usable as a context manager (restores the previous states, also after an
    exception) or with ``.apply()`` (permanent).
    """

    _enable: bool

    def __init__(self, module: nn.Module) -> None:
        self._quantizers = [q for _, q in quantizers(module)]
        self._saved: list[tuple[bool, bool, bool]] | None = None

    def apply(self) -> None:
        for q in self._quantizers:
            q.enable() if self._enable else q.disable()

    def __enter__(self):
        self._saved = [q.get_state() for q in self._quantizers]
        self.apply()
        return self

    def __exit__(self, *exc) -> None:
        for q, state in zip(self._quantizers, self._saved or [], strict=True):
            q.set_state(state)


class disable_quantization(_Toggle):  # noqa: N801 - used like a function
    """Run ``module`` in float: ``with disable_quantization(m): ...`` or ``.apply()``."""

    _enable = False


class enable_quantization(_Toggle):  # noqa: N801
    """Switch quantizers back on: ``with enable_quantization(m): ...`` or ``.apply()``."""

    _enable = True
