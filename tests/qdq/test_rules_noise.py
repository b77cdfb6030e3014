"""The rules' float check measures against the model's own fp32 rounding, and a failed
apply_rules leaves the model exactly as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import qdq
from qdq.rules import RulesError, apply_rules, register_rule, unregister_rule
from qdq.rules.check import (
    Call,
    FloatReference,
    float_outputs,
    mismatch,
    noise_mismatch,
)


def _data_statistics(model: nn.Module, shape: tuple, seed: int = 0) -> nn.Module:
    """BatchNorm running statistics from data (a few train-mode passes, cumulative
    average), not the 0/1 defaults: what makes deep nets' folding move fp32 outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*shape, generator=g))
    return model.eval()


def _deep(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet152":
        model = torchvision.models.resnet152(weights=None, num_classes=10)
    else:
        model = torchvision.models.segmentation.fcn_resnet50(
            weights=None, weights_backbone=None, num_classes=3, aux_loss=False)
    return _data_statistics(model, (2, 3, 64, 64))


@pytest.mark.parametrize("name", ["resnet152", "fcn_resnet50"])
def test_deep_batchnorm_nets_pass_and_stay_within_their_own_noise(name, rng):
    model = _deep(name)
    x = torch.randn(1, 3, 64, 64, generator=rng)
    call = Call.of(x)
    reference = FloatReference.of(model, call)  # fp32 and float64 outputs of the original
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing reverted, nothing left untraced
        ruled = apply_rules(model, x)
    assert len(ruled.qdq_rules_report.folded) > 50
    assert ruled.qdq_rules_report.changes["residual_add"] > 0
    output = float_outputs(ruled, call)
    assert noise_mismatch(reference.outputs, reference.exact, output) is None
    if name == "resnet152":  # a fixed 1e-4 of the largest value refuses plain rounding
        assert mismatch(reference.outputs, output) is not None


class Stack(nn.Module):
    """Conv-BN-ReLU with a residual add: small, so fp32 rounding is ~1e-7."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))) + x)


def _stack() -> nn.Module:
    torch.manual_seed(0)
    return _data_statistics(Stack(), (4, 3, 6, 6))


def _nudge(scale: float):
    """A rule that multiplies the part's output by ``scale``: computes something else."""

    def rule(ctx):
        out = next(n for n in ctx.gm.graph.nodes if n.op == "output")
        value = out.args[0]
        with ctx.gm.graph.inserting_before(out):
            scaled = ctx.gm.graph.call_function(torch.mul, (value, scale))
        out.args = (scaled,)
        return 1

    return rule


@pytest.mark.parametrize("scale", [1.01, 1 + 2e-5, 1 + 1e-9])
def test_a_rewrite_that_computes_something_else_is_refused(scale, rng):
    """Far beyond the noise, just beyond a fixed 1e-4's reach, and below fp32 rounding
    (caught by the float64 run of the rewrite): the part is kept as it was."""
    model = _stack()
    x = torch.randn(2, 3, 6, 6, generator=rng)
    with torch.no_grad():
        before = model(x)
    register_rule("nudge")(_nudge(scale))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ruled = apply_rules(model, x, rules=["residual_add", "nudge"])
    finally:
        unregister_rule("nudge")
    assert ruled.qdq_rules_report.reverted_parts == [""]
    assert any("change the float function" in str(w.message) for w in caught)
    where = "the float64 run" if scale == 1 + 1e-9 else "the outputs"
    assert where in ruled.qdq_rules_report.reverted[0]
    with torch.no_grad(), qdq.disable_quantization(ruled):
        torch.testing.assert_close(ruled(x), before, rtol=1e-6, atol=1e-6)


def _state(model: nn.Module) -> tuple:
    return ([(n, type(m), m) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [(n, p) for n, p in model.named_parameters()])


def _assert_unchanged(model: nn.Module, saved: tuple) -> None:
    modules, state, params = saved
    assert [(n, type(m), m) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert [(n, p) for n, p in model.named_parameters()] == params  # same objects
    assert not any(isinstance(m, qdq.TensorQuantizer) for m in model.modules())
    assert isinstance(model.bn, nn.BatchNorm2d) and model.conv.bias is not None
    assert not hasattr(model, "qdq_rules_report")


@pytest.mark.parametrize("failure", ["rules_error", "exception"])
def test_a_failed_apply_rules_leaves_the_model_as_it_was(failure, rng):
    model = _stack()
    x = torch.randn(2, 3, 6, 6, generator=rng)
    saved = _state(model)
    with torch.no_grad():
        before = model(x)

    @register_rule("breaks")
    def _breaks(ctx):
        if failure == "exception":
            raise ValueError("rule failed")
        with torch.no_grad():
            ctx.gm.head.weight.mul_(2.0)  # shared with the model: reverting cannot undo it
        return 1

    try:
        expected = RulesError if failure == "rules_error" else ValueError
        with pytest.raises(expected), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_rules(model, x, rules=["residual_add", "same_tensor", "breaks"])
    finally:
        unregister_rule("breaks")
    _assert_unchanged(model, saved)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    ruled = apply_rules(model, x)  # and it can be used as if nothing happened
    assert ruled.qdq_rules_report.folded == ["bn"]


def test_noise_mismatch_bounds():
    exact = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    ref = (exact + torch.tensor([0.0, 1e-3, 0.0], dtype=torch.float64)).float()
    assert noise_mismatch(ref, exact, ref + 5e-3) is None  # within 10x the noise 1e-3
    assert "differ from float64" in noise_mismatch(ref, exact, ref + 2e-2)
    assert "structure" in noise_mismatch((ref,), (exact,), (ref, ref))
    exact_ref = exact.float()  # no noise at all: the floor (16 eps) still allows rounding
    assert noise_mismatch(exact_ref, exact, exact_ref + 2e-7) is None
    assert noise_mismatch(exact_ref, exact, exact_ref + 1e-4) is not None
    assert noise_mismatch(ref, exact, exact + 1e-9, exact_run=True) is not None
    assert noise_mismatch(ref, exact, exact + 1e-15, exact_run=True) is None


def test_without_a_float64_run_the_fixed_tolerance_applies(rng):
    class Float32Only(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) @ torch.eye(4)  # float32 eye: no float64 run

    model = Float32Only().eval()
    x = torch.randn(1, 3, 4, 4, generator=rng)
    ruled = apply_rules(model, x)
    assert ruled.qdq_rules_report.changes["matmul"] == 1
    assert any("does not run as a float64 copy" in n for n in ruled.qdq_rules_report.notes)
