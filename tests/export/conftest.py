"""Shared set-up for the export tests: real torchvision models, quantized and calibrated."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import qdq


def calibrate(model: nn.Module, data: torch.Tensor, batches: int = 1) -> nn.Module:
    """Max-calibrate every quantizer of ``model`` on ``data`` and switch them to quantize."""
    for _, q in qdq.quantizers(model):
        q.calibrator.reset()
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        for chunk in data.chunk(batches):
            model(chunk)
    for _, q in qdq.quantizers(model):
        q.load_calib_amax(strict=False)
        q.enable_quant()
        q.disable_calib()
    return model


def settle_batchnorm(model: nn.Module, data: torch.Tensor) -> None:
    """Give BatchNorm running statistics from ``data`` (random weights otherwise leave
    them at mean 0 / var 1, which makes activations vanish in deep nets like MobileNet)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        model(data)
    model.eval()


def quantized_torchvision(name: str, size: int, seed: int = 0, settle: bool = False):
    """(model, inputs): ``name`` with random weights, quantized, calibrated on random data."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None).eval()
    calib = torch.randn(16, 3, size, size, generator=gen)
    if settle:
        settle_batchnorm(model, calib)
    qdq.replace_modules(model)
    calibrate(model, calib)
    inputs = torch.randn(64, 3, size, size, generator=gen)
    return model, inputs


@pytest.fixture(scope="session")
def resnet18_onnx(tmp_path_factory):
    """The resnet18 of the ORT mismatch report: exported with fold_bn=False."""
    from export import to_onnx

    model, inputs = quantized_torchvision("resnet18", 64)
    path = tmp_path_factory.mktemp("r18") / "resnet18.onnx"
    to_onnx(model, inputs[:1], path, fold_bn=False)
    return model, inputs, path
