"""verify pairs quantizer calls with Q nodes one to one.

torchvision ConvNeXt with random weights has a layer scale of 1e-6, so its blocks leave
the residual stream almost unchanged: the dwconv inputs of one stage are near-identical
tensors whose amaxes differ in the last bit. Matched by input alone, two calls took the
same Q node and the check reported thousands of false Q/DQ mismatches.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import sensitivity
from export import to_onnx, verify
from qdq.rules import apply_rules


@pytest.mark.slow
@pytest.mark.xfail(
    torch.__version__ < "2.5", strict=False,
    reason="torch 2.4's random ConvNeXt: verify pairs stage-5 dwconv calls with a neighbouring "
           "block's Q node (closest input among bit-equal scales), whose quantized input "
           "differs by a step, so flips downstream look unexplained; pairing in graph order "
           "(export/verify.py) fixes it")
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
    assert report.qdq_mismatches == 0
    assert report.ok(), str(report)
