"""Layers as the sensitivity tools see them: the modules that own quantizers.

A *layer* is a module with at least one enabled ``TensorQuantizer`` as a direct child
(or inside a ``ModuleList``/``ModuleDict`` attribute such as an LSTM's per-layer
``_input_quantizers``). It is named by its exact module path, and all its quantizers toggle
together: keeping ``layer1.0.conv1`` in float switches off its input *and* weight
quantizers.

A quantizer shared by several modules (a concat or a max-pool sharing one scale with its
neighbours, as the TensorRT placement rules arrange) cannot be switched off for one of
them alone, so modules that share a quantizer form one layer, named by the first of
them; every member name resolves to it.

Quantizers that are disabled when the layers are listed (e.g. the conv branch of a
residual add, which the placement rules switch off) are not part of any layer: the tools
measure the placement that will be deployed.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from qdq.quantizer import TensorQuantizer
from sensitivity.errors import SensitivityError

__all__ = ["Layer", "find_layers", "select_layers", "disable_layers", "enabled_quantizers",
           "saved_states", "ROOT_NAME"]

#: How the root module is named when it owns quantizers itself.
ROOT_NAME = "<model>"

_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


@dataclass(eq=False)
class Layer:
    """One toggle unit: ``name`` (first member), every member module path, its quantizers."""

    name: str
    members: tuple[str, ...]
    quantizer_names: tuple[str, ...]
    quantizers: tuple[TensorQuantizer, ...] = field(repr=False)
    modules: tuple[nn.Module, ...] = field(repr=False, default=())

    def disable(self) -> None:
        for q in self.quantizers:
            q.disable()

    def enable(self) -> None:
        for q in self.quantizers:
            q.enable()


def enabled_quantizers(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    """``(first name, quantizer)`` for every distinct enabled quantizer, in model order."""
    seen: set[int] = set()
    out = []
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer) and module.is_enabled and id(module) not in seen:
            seen.add(id(module))
            out.append((name, module))
    return out


def _owner_path(model: nn.Module, path: str) -> str:
    """The module path that owns the quantizer at ``path`` (skipping list/dict wrappers)."""
    parts = path.split(".")[:-1]
    while parts:
        owner = model.get_submodule(".".join(parts))
        if not isinstance(owner, _CONTAINERS):
            break
        parts.pop()
    return ".".join(parts)


def find_layers(model: nn.Module) -> list[Layer]:
    """Every layer of ``model`` with an enabled quantizer, in model order."""
    owners: dict[str, list[tuple[str, TensorQuantizer]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, TensorQuantizer) and module.is_enabled and path:
            owners.setdefault(_owner_path(model, path), []).append((path, module))
    # Modules sharing a quantizer object become one layer, rooted at the earliest.
    index = {name: i for i, name in enumerate(owners)}
    parent = {name: name for name in owners}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    first_owner: dict[int, str] = {}
    for owner, entries in owners.items():
        for _, q in entries:
            a, b = root(owner), root(first_owner.setdefault(id(q), owner))
            if a != b:
                keep, drop = (a, b) if index[a] < index[b] else (b, a)
                parent[drop] = keep
    groups: dict[str, list[str]] = {}
    for owner in owners:
        groups.setdefault(root(owner), []).append(owner)
    layers = []
    for members in groups.values():
        members.sort(key=index.__getitem__)
        seen: set[int] = set()
        qs, qnames = [], []
        for owner in members:
            for path, q in owners[owner]:
                if id(q) not in seen:
                    seen.add(id(q))
                    qs.append(q)
                    qnames.append(path)
        names = tuple(m or ROOT_NAME for m in members)
        mods = tuple(model.get_submodule(m) for m in members)
        layers.append(Layer(names[0], names, tuple(qnames), tuple(qs), mods))
    layers.sort(key=lambda layer: index["" if layer.name == ROOT_NAME else layer.name])
    return layers


def select_layers(layers: Sequence[Layer], names: Iterable[str] | None) -> list[Layer]:
    """The layers named in ``names`` (any member name works), in the order given.

    An unknown name raises one ``SensitivityError`` that names it and suggests close ones.
    """
    if names is None:
        return list(layers)
    if isinstance(names, str):
        names = [names]
    by_name = {member: layer for layer in layers for member in layer.members}
    chosen: list[Layer] = []
    for name in names:
        layer = by_name.get(name)
        if layer is None:
            close = difflib.get_close_matches(name, list(by_name), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise SensitivityError(
                f"layer {name!r} does not exist or owns no enabled quantizer "
                f"({len(by_name)} layers known){hint}"
            )
        if layer not in chosen:
            chosen.append(layer)
    return chosen


def disable_layers(model: nn.Module, names: Iterable[str]) -> list[Layer]:
    """Keep the named layers in float (a skip list): all their quantizers off."""
    layers = select_layers(find_layers(model), list(names))
    for layer in layers:
        layer.disable()
    return layers


@contextmanager
def saved_states(quantizers: Iterable[TensorQuantizer]) -> Iterator[None]:
    """Restore every quantizer's (disabled, quant, calib) switches on exit, always."""
    saved = [(q, q.get_state()) for q in quantizers]
    try:
        yield
    finally:
        for q, state in saved:
            q.set_state(state)
