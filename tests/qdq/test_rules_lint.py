"""The export lint finds placement warnings on torchvision models with module-level
insertion only, and none once ``qdq.rules.apply_rules`` has run; the rewritten model
still matches ONNX Runtime.

Random weights, calibrated (max) on random data. Small inputs where the model allows
(ViT needs 224). Most models take tens of seconds to export on two cores: those are
marked slow; resnet18 and mobilenet_v2 always run.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

import qdq
from export import check_qdq, to_onnx, verify
from qdq.rules import apply_rules

FAST = ["resnet18", "mobilenet_v2"]
SLOW = ["resnet50", "mobilenet_v3_large", "efficientnet_b0", "densenet121", "googlenet",
        "vit_b_16", "swin_t"]
#: models whose module-level placement the lint already accepts (see BENCHMARKS.md):
#: DenseNet's concats are left unquantized by insertion and its pools feed no quantizer
#: directly, so there is nothing for the lint to flag before the rules either.
#: Swin's attention (F.linear on qkv.weight, both matmuls) is quantized by its attention
#: twin, which module-level insertion already uses; Swin has no conv residual.
CLEAN_BEFORE = {"densenet121", "swin_t"}


def _build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(num_classes=10, **kwargs).eval()
    size = 224 if name.startswith("vit") else 64
    return model, torch.randn(2, 3, size, size)


def _calibrate(model: torch.nn.Module, x: torch.Tensor) -> None:
    qs = [q for _, q in qdq.quantizers(model) if q.is_enabled]
    for q in qs:
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        model(x)
    for q in qs:
        q.load_calib_amax()
        q.disable_calib()
        q.enable_quant()


def _placement_warnings(model, x, path) -> list:
    _calibrate(model, x)
    # opset 14 for the float attention of torchvision's ViT before the rules
    # (scaled_dot_product_attention has no opset-13 export); the rules' twin exports at 13
    to_onnx(model, x, path, opset=14 if "vit" in path.name else 13)
    findings = check_qdq(path)
    assert [f for f in findings if f.severity == "error"] == []
    return [f for f in findings if f.severity == "warning"]


@pytest.mark.parametrize("name", FAST + [pytest.param(n, marks=pytest.mark.slow)
                                         for n in SLOW])
def test_rules_clear_placement_warnings(name, tmp_path):
    model, x = _build(name)
    qdq.replace_modules(model)
    before_model = model
    before = _placement_warnings(model, x, tmp_path / f"{name}_before.onnx")

    model, x = _build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every model here traces: no fallback warning
        ruled = apply_rules(model, x)
    after = _placement_warnings(ruled, x, tmp_path / f"{name}_after.onnx")

    enabled = {n: len({id(q) for _, q in qdq.quantizers(m) if q.is_enabled})
               for n, m in (("before", before_model), ("after", ruled))}
    # one line per model for BENCHMARKS.md (shown with pytest -s)
    print(f"\n[rules-lint] {name}: placement warnings {len(before)} -> {len(after)}; "
          f"enabled quantizers {enabled['before']} -> {enabled['after']}")
    assert after == [], "\n".join(map(str, after))
    if name in CLEAN_BEFORE:
        assert before == []
    else:
        assert len(before) > 0


def test_resnet18_with_rules_matches_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    model = apply_rules(model, x)
    _calibrate(model, x)
    path = tmp_path / "resnet18_rules.onnx"
    result = to_onnx(model, x, path)
    assert result.quantize_nodes > 0
    report = verify(model, path, torch.randn(4, 3, 32, 32))
    assert report.ok(), str(report)
