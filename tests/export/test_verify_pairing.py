"""verify pairs quantizer calls with Q nodes one to one.

torchvision ConvNeXt with random weights has a layer scale of 1e-6, so its blocks leave
the residual stream almost unchanged: the dwconv inputs of one stage are near-identical
tensors whose amaxes differ in the last bit. Matched by input alone, two calls took the
same Q node and the check reported thousands of false Q/DQ mismatches. Matched by the
closest input, a block's call took its neighbour's node (torch 2.4 then reported flips
"NOT explained"): the fx GraphModule's scopes are leaf names (``/block.0/_input_quantizer_3``),
so calls pair with nodes in graph order, the order the exporter traced them in.
"""

from __future__ import annotations

import onnx
import pytest
import torch
import torchvision

import sensitivity
from export import to_onnx, verify
from export.verify import activation_qdq_pairs
from qdq.rules import apply_rules


@pytest.mark.slow
def test_convnext_calls_get_their_own_q_nodes(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    model = apply_rules(model, x)
    sensitivity.calibrate(model, [x], progress=False)
    path = tmp_path / "convnext.onnx"
    to_onnx(model, x, path)
    report = verify(model, path, torch.randn(2, 3, 32, 32))
    nodes = [q.node for q in report.quantizers]
    assert len(nodes) == len(set(nodes))
    order = {q.name: i for i, (q, _) in enumerate(activation_qdq_pairs(onnx.load(path).graph))}
    assert [order[n] for n in nodes] == sorted(order[n] for n in nodes)
    assert report.qdq_mismatches == 0
    assert report.ok(), str(report)
