"""``apply_rules``: fold BatchNorm, trace, run the placement rules, tie shared quantizers."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from qdq.nn.mixin import QuantInputMixin
from qdq.replace import disable_quantization, name_quantizers, quantizers, replace_modules
from qdq.rules import placement  # noqa: F401 - registers the rules
from qdq.rules.fold import _as_tuple, fold_batchnorm
from qdq.rules.registry import RULES, RuleContext
from qdq.rules.trace import trace_parts

__all__ = ["apply_rules", "RulesReport"]


@dataclass
class RulesReport:
    """What :func:`apply_rules` did, kept on the returned model as ``qdq_rules_report``."""

    folded: list[str] = field(default_factory=list)
    changes: dict[str, int] = field(default_factory=dict)
    untraced: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: what ``qdq.save`` records to replay the call: the rules run, the example inputs'
    #: shapes and dtypes, and the quantizers that were already off
    rules: list[str] = field(default_factory=list)
    inputs: list[dict | None] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"folded BatchNorm: {len(self.folded)}"]
        lines += [f"{name}: {count}" for name, count in self.changes.items()]
        lines += [f"left with module-level quantizers: {u}" for u in self.untraced]
        lines += self.notes
        return "\n".join(lines)


def _shape_prop(gm: fx.GraphModule, args: tuple) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    if not args:
        return
    try:
        with torch.no_grad(), disable_quantization(gm):
            ShapeProp(gm).propagate(*args)
    except Exception as err:  # noqa: BLE001 - shapes only sharpen the rules
        warnings.warn(f"apply_rules: shape propagation failed ({err}); rules fall back to "
                      "symbolic checks", stacklevel=3)


def _input_spec(arg) -> dict | None:
    if isinstance(arg, torch.Tensor):
        return {"shape": list(arg.shape), "dtype": str(arg.dtype).removeprefix("torch.")}
    return None


def _install(model: nn.Module, path: str, gm: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, gm)


def apply_rules(model: nn.Module, example_inputs=None, rules: list[str] | None = None,
                insert: bool = True) -> nn.Module:
    """Place and tie Q/DQ the way TensorRT fuses them; returns the model to use.

    Steps: fold BatchNorm (:func:`fold_batchnorm`); insert quantizers with
    :func:`qdq.replace_modules` if the model has none yet (``insert=False`` to skip);
    trace with torch.fx (parts that do not trace keep their module-level quantizers and
    are named in a warning); run the registered rules (all, or the names in ``rules``);
    tie shared quantizers into one object each.

    The model is changed in place where it can be (folding, quantizer ties, rewritten
    untraceable parts' children), but a traced root comes back as a new
    ``fx.GraphModule`` holding the same submodules: always use the returned module.
    ``example_inputs`` (a tensor or tuple) enables shape checks; the model should be in
    eval mode. What was done is in ``returned.qdq_rules_report``.
    """
    names = list(RULES) if rules is None else list(rules)
    unknown = [n for n in names if n not in RULES]
    if unknown:
        raise ValueError(f"unknown placement rule(s) {unknown}; registered: {list(RULES)}")
    args = _as_tuple(example_inputs)
    disabled = [name for name, q in quantizers(model) if not q.is_enabled]
    report = RulesReport(folded=fold_batchnorm(model, example_inputs), rules=names,
                         inputs=[_input_spec(a) for a in args], disabled=disabled)
    if insert and not any(isinstance(m, QuantInputMixin) for m in model.modules()):
        replace_modules(model)
    result = model
    for part in trace_parts(model):
        if part.graph_module is None:
            report.untraced.append(f"{part.path or '(root)'} ({part.error})")
            continue
        gm = part.graph_module
        if not part.path:
            _shape_prop(gm, args)
        ctx = RuleContext(gm, part.path)
        for name in names:
            count = RULES[name](ctx)
            report.changes[name] = report.changes.get(name, 0) + count
        ctx.apply_ties()
        gm.graph.lint()
        gm.recompile()
        report.notes.extend(ctx.notes)
        if part.path:
            _install(model, part.path, gm)
        else:
            result = gm
    if report.untraced:
        warnings.warn("apply_rules: parts that torch.fx cannot trace keep module-level "
                      "quantizers only (no residual/concat/shared-scale rules): "
                      + "; ".join(report.untraced), stacklevel=2)
    name_quantizers(result)
    for _, q in quantizers(result):
        if q.placed_by is None:
            q.placed_by = "module"  # inserted with its layer, not moved by a rule
    result.qdq_rules_report = report
    return result
