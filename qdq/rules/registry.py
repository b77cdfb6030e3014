"""The rule registry and the context rules work in.

A rule is a small function ``rule(ctx) -> int`` (how many places it changed) registered
by name with :func:`register_rule`. :func:`qdq.rules.apply_rules` runs the registered
rules in registration order on each traced part of a model. Rules that rewrite the
graph come first; rules that tie quantizers together come after them, and the ties are
applied once all rules have run.

Example (a custom rule)::

    @register_rule("no_quant_before_gelu")
    def _no_gelu(ctx):
        ...
        return changed
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from qdq.quantizer import TensorQuantizer

__all__ = ["RULES", "RuleContext", "register_rule", "unregister_rule"]

Rule = Callable[["RuleContext"], int]

#: name -> rule, in the order they run
RULES: dict[str, Rule] = {}

#: when a quantizer is tied by several rules, the label shown is the first of these
_TIE_PRIORITY = ("concat_shared", "maxpool_shared", "same_tensor")


def register_rule(name: str) -> Callable[[Rule], Rule]:
    """Decorator: add ``rule`` to :data:`RULES` under ``name`` (names are unique)."""

    def deco(rule: Rule) -> Rule:
        if name in RULES and RULES[name] is not rule:
            raise ValueError(f"a placement rule named {name!r} is already registered")
        RULES[name] = rule
        return rule

    return deco


def unregister_rule(name: str) -> Rule:
    return RULES.pop(name)


@dataclass
class RuleContext:
    """One traced part of the model while the rules run on it.

    ``path`` is the part's module path in the whole model (``""`` for the root), used to
    name things in messages. Rules record what they did in ``notes``.
    """

    gm: fx.GraphModule
    path: str = ""
    notes: list[str] = field(default_factory=list)
    _parent: dict[int, int] = field(default_factory=dict)
    _members: dict[int, TensorQuantizer] = field(default_factory=dict)
    _labels: dict[int, set[str]] = field(default_factory=dict)

    # ------------------------------------------------------------ new modules
    def add_module(self, node: fx.Node, stem: str, module: nn.Module) -> str:
        """Add ``module`` to the graph module next to where ``node`` was created."""
        from qdq.rules.graph import owner_path

        owner = owner_path(node)
        base = f"{owner}.{stem}" if owner else stem
        target, i = base, 1
        while _exists(self.gm, target):
            target, i = f"{base}_{i}", i + 1
        device = _device_of(self.gm)
        if device is not None:
            module.to(device)
        self.gm.add_submodule(target, module)
        return target

    def qualify(self, target: str) -> str:
        return f"{self.path}.{target}" if self.path else target

    # ------------------------------------------------------------------- ties
    def _find(self, key: int) -> int:
        while self._parent[key] != key:
            self._parent[key] = self._parent[self._parent[key]]
            key = self._parent[key]
        return key

    def _add(self, q: TensorQuantizer) -> int:
        key = id(q)
        if key not in self._parent:
            self._parent[key] = key
            self._members[key] = q
            self._labels[key] = set()
        return key

    def tie(self, a: TensorQuantizer, b: TensorQuantizer, rule: str) -> bool:
        """Make ``a`` and ``b`` one quantizer (applied by :meth:`apply_ties`)."""
        if not _compatible(a, b):
            self.notes.append(f"{rule}: {a.name} and {b.name} differ in configuration; "
                              "left separate")
            return False
        ra, rb = self._find(self._add(a)), self._find(self._add(b))
        self._labels[ra].add(rule)
        if ra != rb:
            self._parent[rb] = ra
            self._labels[ra] |= self._labels.pop(rb)
        return ra != rb or a is b

    def groups(self) -> list[list[TensorQuantizer]]:
        out: dict[int, list[TensorQuantizer]] = {}
        for key, q in self._members.items():
            out.setdefault(self._find(key), []).append(q)
        return [g for g in out.values() if len(g) > 1]

    def apply_ties(self) -> int:
        """Replace every quantizer of a group by the group's first member."""
        replace: dict[int, TensorQuantizer] = {}
        for group in self.groups():
            keeper = group[0]
            labels = self._labels[self._find(id(keeper))]
            keeper.placed_by = next((r for r in _TIE_PRIORITY if r in labels),
                                    keeper.placed_by or sorted(labels)[0])
            _merge_amax(keeper, group[1:])
            for q in group[1:]:
                replace[id(q)] = keeper
        if not replace:
            return 0
        for module in self.gm.modules():
            for attr, child in list(module._modules.items()):
                if child is not None and id(child) in replace:
                    module._modules[attr] = replace[id(child)]
        return len(replace)


def _exists(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_submodule(target)
        return True
    except AttributeError:
        return False


def _device_of(gm: nn.Module) -> torch.device | None:
    for t in list(gm.parameters()) + list(gm.buffers()):
        return t.device
    return None


def _compatible(a: TensorQuantizer, b: TensorQuantizer) -> bool:
    return (a.num_bits, a.axis, a.unsigned, a.narrow_range, type(a.calibrator)) == (
        b.num_bits, b.axis, b.unsigned, b.narrow_range, type(b.calibrator))


def _merge_amax(keeper: TensorQuantizer, others: list[TensorQuantizer]) -> None:
    """A group calibrated before tying keeps the largest amax of its members."""
    amaxes = [q.amax for q in [keeper, *others] if q.amax is not None]
    if amaxes:
        merged = torch.stack([a.detach().float().reshape(()).cpu() for a in amaxes]).max()
        keeper._set_amax(merged, allow_zero=True)
