"""Branches a model takes only in training (googlenet's and inception's auxiliary heads)
survive apply_rules: torch.fx traces one mode, so such a part stays module-level."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import qdq
from qdq.rules import apply_rules
from qdq.rules.trace import mode_only_modules, trace_parts


class TrainOnlyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.aux = nn.Sequential(nn.Flatten(), nn.LazyLinear(2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x):
        y = self.body(x)
        if self.training:
            return self.head(y), self.aux(y)
        return self.head(y)


def test_a_training_only_module_keeps_its_parent_module_level():
    model = TrainOnlyHead()
    model(torch.zeros(1, 3, 5, 5))  # materialise the lazy layer
    model.eval()
    parts = {p.path: p for p in trace_parts(model)}
    assert parts[""].graph_module is None and "calls aux only in training" in parts[""].error
    assert parts["aux"].graph_module is not None  # traced in the mode it runs in
    graph = torch.fx.Tracer().trace(model)
    assert mode_only_modules(model, graph) == ["aux"]
    assert all(not m.training for m in model.modules())  # modes put back


def test_googlenet_aux_heads_return_quantized_in_train_mode(rng):
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True,
                                         num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64, generator=rng)
    with pytest.warns(UserWarning, match=r"\(root\) \(calls aux1, aux2 only in training"):
        ruled = apply_rules(model, x)
    assert ruled.qdq_rules_report.changes["concat"] == 9  # the inception blocks still trace
    assert "aux1.fc2.weight" in ruled.state_dict()
    aux_quantizers = [n for n, q in qdq.quantizers(ruled)
                      if n.startswith(("aux1.", "aux2.")) and q.is_enabled]
    assert any(n.startswith("aux1.fc2.") for n in aux_quantizers)
    assert any(n.startswith("aux2.conv.") for n in aux_quantizers)
    ruled.train()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no amax yet: dynamic quantization
        torch.manual_seed(1)
        out = ruled(x)
        torch.manual_seed(1)
        with qdq.disable_quantization(ruled):
            plain = ruled(x)
    assert len(out) == 3 and all(o.shape == (2, 5) for o in out)  # logits, aux2, aux1
    assert not torch.equal(out.aux_logits1, plain.aux_logits1)  # the aux head is quantized
    assert not torch.equal(out.aux_logits2, plain.aux_logits2)
    ruled.eval()
    with torch.no_grad():
        assert ruled(x).shape == (2, 5)
