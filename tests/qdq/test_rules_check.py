"""apply_rules never changes what a model computes in float: parts that would are reverted."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import qdq
import sensitivity
from qdq.nn import QuantAdd
from qdq.rules import RulesError, apply_rules, register_rule, unregister_rule
from qdq.rules.check import Call, mismatch


class NoneBranch(nn.Module):
    """fx traces ``bias is None`` as False (a Proxy is not None): the traced graph then
    fails when the call passes None."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, bias=None):
        y = self.conv(x)
        if bias is not None:
            y = y + bias
        return y + x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = NoneBranch()
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent: the root does not trace, its children do
            return x
        return self.head(self.inner(x))


def test_part_that_changes_is_reverted_with_one_warning(rng):
    model = Outer().eval()
    x = torch.randn(2, 3, 5, 5, generator=rng)
    with torch.no_grad():
        reference = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ruled = apply_rules(model, x)
    reverted = [str(w.message) for w in caught if "change the float function" in str(w.message)]
    assert len(reverted) == 1 and "inner (fails on the example inputs" in reverted[0]
    assert ruled.qdq_rules_report.reverted[0].startswith("inner")
    assert isinstance(ruled.inner, NoneBranch)  # module-level quantizers, no QuantAdd
    assert not any(isinstance(m, QuantAdd) for m in ruled.modules())
    with torch.no_grad(), qdq.disable_quantization(ruled):
        torch.testing.assert_close(ruled(x), reference, rtol=0, atol=0)
    sensitivity.calibrate(ruled, [x], progress=False)
    assert ruled(x).shape == reference.shape


def test_traced_with_the_branch_taken_keeps_the_rules(rng):
    """The same part, called with a tensor where it was traced with one, is rewritten."""
    model = NoneBranch().eval()
    x = torch.randn(2, 3, 5, 5, generator=rng)
    ruled = apply_rules(model, (x, torch.ones(1)))
    assert ruled.qdq_rules_report.reverted == []
    assert sum(isinstance(m, QuantAdd) for m in ruled.modules()) == 1


def test_hf_bert_runs_through_rules_calibration_and_keeps_float(rng):
    transformers = pytest.importorskip("transformers", reason="transformers not installed "
                                       "(pip install 'qdq[hf]')")
    config = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification._from_config(
        config, attn_implementation="eager").eval()
    ids = torch.randint(3, 60, (3, 7), generator=rng)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 5:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        reference = model(**inputs).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ruled = apply_rules(model, inputs)
    assert any(r.startswith("bert.embeddings") for r in ruled.qdq_rules_report.reverted)
    with torch.no_grad(), qdq.disable_quantization(ruled):
        torch.testing.assert_close(ruled(**inputs).logits, reference, rtol=1e-5, atol=1e-6)
    summary = sensitivity.calibrate(ruled, [inputs], progress=False)
    assert summary.uncalibrated == []
    names = {r.name for r in qdq.summary_rows(ruled)}
    assert "bert.encoder.layer.0.attention.self.qk._input_quantizer" in names
    assert "classifier._input_quantizer" in names


def test_rule_that_edits_shared_weights_raises(rng):
    model = NoneBranch().eval()
    x = torch.randn(1, 3, 4, 4, generator=rng)

    @register_rule("scale_conv")
    def _scale(ctx):
        with torch.no_grad():
            ctx.gm.conv.weight.mul_(2.0)  # a shared module: reverting the part cannot undo it
        return 1

    try:
        with pytest.raises(RulesError, match="changed what the model computes"), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_rules(model, (x, torch.zeros(1)), rules=["scale_conv"])
    finally:
        unregister_rule("scale_conv")


def test_mismatch_and_call():
    a = {"x": torch.ones(2), "n": None, "t": (torch.arange(3),)}
    assert mismatch(a, {"x": torch.ones(2) + 1e-7, "n": None, "t": (torch.arange(3),)}) is None
    assert "max difference" in mismatch(a, {"x": torch.ones(2) * 1.01, "n": None,
                                            "t": (torch.arange(3),)})
    assert "integer" in mismatch(a, {"x": torch.ones(2), "n": None, "t": (torch.arange(3) + 1,)})
    assert "structure" in mismatch(a, {"x": torch.ones(2)})
    assert Call.of(None) is None
    assert Call.of(torch.ones(1)).args[0].shape == (1,)
    assert Call.of({"a": 1}).kwargs == {"a": 1}
