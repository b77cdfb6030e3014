"""``apply_rules``: fold BatchNorm, trace, run the placement rules, tie shared quantizers."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from qdq.nn.mixin import QuantInputMixin
from qdq.replace import disable_quantization, name_quantizers, quantizers, replace_modules
from qdq.rules import placement  # noqa: F401 - registers the rules
from qdq.rules.attention import swap_attention_twins
from qdq.rules.check import (
    TOLERANCE,
    Call,
    FloatReference,
    float64_copy,
    float_outputs,
    placeholder_args,
    record_calls,
)
from qdq.rules.fold import BATCHNORM, fold_batchnorm
from qdq.rules.registry import RULES, RuleContext
from qdq.rules.spec import input_spec
from qdq.rules.trace import trace_parts
from qdq.rules.undo import Snapshot

__all__ = ["apply_rules", "RulesReport", "RulesError"]


@dataclass
class RulesReport:
    """What :func:`apply_rules` did, kept on the returned model as ``qdq_rules_report``."""

    folded: list[str] = field(default_factory=list)
    changes: dict[str, int] = field(default_factory=dict)
    untraced: list[str] = field(default_factory=list)
    reverted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: what ``qdq.save`` records to replay the call: the rules run, the example inputs'
    #: shapes and dtypes (positional and keyword), the quantizers that were already off
    #: and the traced parts that were kept module-level
    rules: list[str] = field(default_factory=list)
    inputs: list[dict | None] = field(default_factory=list)
    keywords: dict[str, dict | None] = field(default_factory=dict)
    disabled: list[str] = field(default_factory=list)
    reverted_parts: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"folded BatchNorm: {len(self.folded)}"]
        lines += [f"{name}: {count}" for name, count in self.changes.items()]
        lines += [f"left with module-level quantizers: {u}" for u in self.untraced]
        lines += [f"kept module-level (rewrite changed the float function): {u}"
                  for u in self.reverted]
        lines += self.notes
        return "\n".join(lines)


class RulesError(RuntimeError):
    """The rules could not keep the model's float function; the message says where."""


def _shape_prop(gm: fx.GraphModule, call: Call | None) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    if call is None:
        return
    args = placeholder_args(gm, call)
    if args is None:
        return
    try:
        with torch.no_grad(), disable_quantization(gm):
            ShapeProp(gm).propagate(*args)
    except Exception as err:  # noqa: BLE001 - shapes only sharpen the rules
        warnings.warn(f"apply_rules: shape propagation failed ({err}); rules fall back to "
                      "symbolic checks", stacklevel=4)


def _install(model: nn.Module, path: str, gm: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, gm)


def _part_changed(gm: nn.Module, reference: FloatReference | None) -> str | None:
    """Why the rewritten part computes something else in float than it did, or None."""
    if reference is None:
        return None  # not reached by the example inputs: nothing to compare
    try:
        output = float_outputs(gm, reference.call)
    except Exception as err:  # noqa: BLE001 - a failing rewrite is reverted, not raised
        return f"fails on the example inputs: {type(err).__name__}: {str(err)[:120]}"
    why = reference.mismatch(output)
    if why is None and reference.exact is not None:
        why = reference.exact_mismatch(float64_copy(gm))  # same weights: exact in float64
    return why


def _checked_fold(model: nn.Module, call: Call | None,
                  report_notes: list[str]) -> tuple[list[str], FloatReference | None]:
    """Fold BatchNorm; with example inputs, first take the float reference (fp32 and a
    float64 copy) and fold the float64 copy too, which must keep its outputs to float64
    rounding: in fp32 a deep net's folding moves outputs as much as its rounding does."""
    if call is None:
        return fold_batchnorm(model), None
    copy64 = float64_copy(model)
    reference = FloatReference.of(model, call, copy64=copy64)
    if reference.exact is None:
        report_notes.append("float check: the model does not run as a float64 copy; "
                            f"outputs compared within {TOLERANCE:g} of their largest value")
    elif any(isinstance(m, BATCHNORM) for m in model.modules()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fp32 fold below gives the same warnings
            fold_batchnorm(copy64, call.float64())
        why = reference.exact_mismatch(copy64)
        if why is not None:
            raise RulesError(f"folding BatchNorm changes what the model computes ({why}); "
                             "report it with the model")
    del copy64
    return fold_batchnorm(model, call), reference


def apply_rules(model: nn.Module, example_inputs=None, rules: list[str] | None = None,
                insert: bool = True, skip_parts: Sequence[str] = ()) -> nn.Module:
    """Place and tie Q/DQ the way TensorRT fuses them; returns the model to use.

    Steps: fold BatchNorm (:func:`fold_batchnorm`); insert quantizers with
    :func:`qdq.replace_modules` if the model has none yet (``insert=False`` to skip);
    swap registered attention modules for their twins (:mod:`qdq.nn.attention`); trace
    with torch.fx (parts that do not trace keep their module-level quantizers and are
    named in a warning); run the registered rules (all, or the names in ``rules``); tie
    shared quantizers into one object each.

    With ``example_inputs`` (a tensor, a tuple of arguments or a dict of keyword
    arguments) the rewrite is checked: with every quantizer disabled, each rewritten
    part must give the outputs the part gave before on those inputs, and the whole model
    the outputs the float model gave, up to float rounding: the model's own (its fp32
    outputs against a float64 copy's, times :data:`qdq.rules.check.NOISE_MARGIN`), so
    deep BatchNorm nets whose folding moves fp32 outputs by 1e-3 pass while a rewrite
    that computes something else does not (:mod:`qdq.rules.check`). A part that does not
    (fx traced one branch of an ``if x is None``, say) is put back as it was, with its
    module-level quantizers, and named in one warning; if the whole model still differs,
    :class:`RulesError`. On any error the model is put back exactly as it was (nothing
    folded, swapped or tied): that costs a copy of its tensors in CPU memory, and the
    check a float64 copy of the model, while it runs.
    ``skip_parts`` names traced parts (module paths, ``""`` for the root) to keep
    module-level without trying: ``qdq.restore`` replays the parts that were reverted.

    The model is changed in place where it can be (folding, quantizer ties, rewritten
    untraceable parts' children), but a traced root comes back as a new
    ``fx.GraphModule`` holding the same submodules: always use the returned module.
    The model should be in eval mode. What was done is in ``returned.qdq_rules_report``.
    """
    names = list(RULES) if rules is None else list(rules)
    unknown = [n for n in names if n not in RULES]
    if unknown:
        raise ValueError(f"unknown placement rule(s) {unknown}; registered: {list(RULES)}")
    call = Call.of(example_inputs)
    undo = Snapshot(model)
    try:
        return _apply(model, call, names, insert, set(skip_parts))
    except BaseException:
        undo.restore()
        raise


def _apply(model: nn.Module, call: Call | None, names: list[str], insert: bool,
           skip: set[str]) -> nn.Module:
    disabled = [name for name, q in quantizers(model) if not q.is_enabled]
    notes: list[str] = []
    folded, reference = _checked_fold(model, call, notes)
    report = RulesReport(
        folded=folded, rules=names, disabled=disabled, notes=notes,
        inputs=[input_spec(a) for a in call.args] if call is not None else [],
        keywords={k: input_spec(v) for k, v in call.kwargs.items()} if call is not None
        else {})
    if insert and not any(isinstance(m, QuantInputMixin) for m in model.modules()):
        replace_modules(model)
    swapped = swap_attention_twins(model)
    if swapped:
        report.changes["attention"] = len(swapped)
    parts = []
    for part in trace_parts(model):
        if part.graph_module is None:
            report.untraced.append(f"{part.path or '(root)'} ({part.error})")
        else:
            parts.append(part)
    records = record_calls(model, [p.path for p in parts], call) if call is not None else {}
    result = model
    for part in parts:
        gm = part.graph_module
        if not part.path:
            _shape_prop(gm, call)
        record = records.get(part.path) if part.path not in skip else None
        if record is None:
            part_reference = None
        elif not part.path and not folded and not swapped and reference.exact is not None:
            # the root still computes what the float model did: reuse its float64 run
            part_reference = FloatReference(record[0], record[1], reference.exact)
        else:
            part_reference = FloatReference.of(part.module, record[0], outputs=record[1])
        ctx = RuleContext(gm, part.path)
        for name in names:
            count = RULES[name](ctx)
            report.changes[name] = report.changes.get(name, 0) + count
        ctx.apply_ties()
        gm.graph.lint()
        gm.recompile()
        report.notes.extend(ctx.notes)
        why = ("kept module-level as asked" if part.path in skip
               else _part_changed(gm, part_reference))
        if why is not None:
            report.reverted.append(f"{part.path or '(root)'} ({why})")
            report.reverted_parts.append(part.path)
            continue
        if part.path:
            _install(model, part.path, gm)
        else:
            result = gm
    if report.untraced:
        warnings.warn("apply_rules: parts that torch.fx cannot trace keep module-level "
                      "quantizers only (no residual/concat/shared-scale rules): "
                      + "; ".join(report.untraced), stacklevel=3)
    if report.reverted:
        warnings.warn("apply_rules: traced parts that would change the float function are "
                      "kept module-level: " + "; ".join(report.reverted), stacklevel=3)
    if reference is not None:
        why = reference.mismatch(float_outputs(result, call))
        if why is not None:
            raise RulesError(f"apply_rules changed what the model computes in float ({why}); "
                             "report it with the model: no rewrite should do that")
    name_quantizers(result)
    for _, q in quantizers(result):
        if q.placed_by is None:
            q.placed_by = "module"  # inserted with its layer, not moved by a rule
    result.qdq_rules_report = report
    return result
