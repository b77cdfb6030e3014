"""BatchNorm folding: outputs unchanged, BN gone, weight amax consistent."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import qdq
from qdq.rules import fold_batchnorm


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial statistics, so a wrong fold shows in the outputs."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.2)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=gen))
                m.bias.data.copy_(torch.randn(n, generator=gen) * 0.3)


def _bns(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_resnet18_outputs_unchanged(rng):
    model = torchvision.models.resnet18(num_classes=10)
    _randomise_bn(model, rng)
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=rng)
    with torch.no_grad():
        before = model(x)
    bns = _bns(model)
    folded = fold_batchnorm(model, x)
    assert sorted(folded) == sorted(bns)
    assert _bns(model) == []
    assert isinstance(model.bn1, nn.Identity)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.up2 = nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(4, affine=False)
        self.conv = nn.Conv1d(4, 5, 1, bias=False)
        self.bn3 = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5, 3)
        self.bn4 = nn.BatchNorm1d(3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.up1(x)))
        x = self.bn2(self.up2(x))
        x = self.bn3(self.conv(x.flatten(2)))
        return self.bn4(self.fc(x.mean(-1)))


def test_conv_transpose_grouped_no_bias_and_linear(rng):
    model = _Decoder()
    _randomise_bn(model, rng)
    model.eval()
    x = torch.randn(2, 8, 5, 5, generator=rng)
    with torch.no_grad():
        before = model(x)
    folded = fold_batchnorm(model)
    assert folded == ["bn1", "bn2", "bn3", "bn4"]
    assert model.up2.bias is not None and model.conv.bias is not None
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def _calibrate_weights(model: nn.Module) -> None:
    for _, q in qdq.quantizers(model):
        if "_weight_quantizer" in q.name:
            q.disable_quant()
            q.enable_calib()
        else:
            q.disable()
    for m in model.modules():
        if hasattr(m, "_weight_quantizer"):
            m._weight_quantizer(m.weight)
    for _, q in qdq.quantizers(model):
        if "_weight_quantizer" in q.name:
            q.load_calib_amax()
            q.disable_calib()
            q.enable_quant()


@pytest.mark.parametrize("per_tensor", [False, True])
def test_weight_amax_follows_folded_weight(rng, per_tensor):
    model = _Decoder()
    _randomise_bn(model, rng)
    model.eval()
    desc = qdq.QuantDescriptor(axis=None) if per_tensor else None
    qdq.replace_modules(model, quant_desc_weight=desc)
    if not per_tensor:  # ConvTranspose keeps its own axis-1 default
        for layer in (model.up1, model.up2):
            layer._weight_quantizer = qdq.TensorQuantizer(qdq.QuantDescriptor(axis=1))
        qdq.name_quantizers(model)
    _calibrate_weights(model)
    assert fold_batchnorm(model) == ["bn1", "bn2", "bn3", "bn4"]
    assert isinstance(model.up1, qdq.nn.QuantConvTranspose2d)
    for layer in (model.up1, model.up2, model.conv, model.fc):
        q = layer._weight_quantizer
        w = layer.weight.detach().abs()
        if q.axis is None:
            expected = w.amax()
        else:
            dims = [d for d in range(w.dim()) if d != q.axis]
            expected = torch.amax(w, dim=dims, keepdim=True)
        torch.testing.assert_close(q.amax, expected.reshape(q.amax.shape), rtol=1e-5,
                                   atol=1e-7)


def test_amax_rescaled_not_recomputed(rng):
    """A clipped per-channel amax keeps its clipping ratio after folding."""
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    model = nn.Sequential(conv, bn).eval()
    _randomise_bn(model, rng)
    qdq.replace_modules(model)
    _calibrate_weights(model)
    q = model[0]._weight_quantizer
    q.amax = q.amax * 0.5
    assert fold_batchnorm(model) == ["1"]
    w = model[0].weight.detach().abs()
    torch.testing.assert_close(q.amax, 0.5 * torch.amax(w, dim=(1, 2, 3), keepdim=True))


def test_shared_output_and_training_mode_left_alone(rng):
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # conv output has a second consumer

    model = Both().eval()
    assert fold_batchnorm(model) == []
    train = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    with pytest.warns(UserWarning, match="training mode.*1"):
        assert fold_batchnorm(train) == []


class _Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace this module's forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            y = y * 2
        return self.block(y)


def test_untraceable_part_warns_and_children_still_fold(rng):
    model = _Branchy().eval()
    _randomise_bn(model, rng)
    x = torch.randn(1, 3, 6, 6, generator=rng)
    with torch.no_grad():
        before = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded = fold_batchnorm(model, x)
    assert folded == ["block.1"]
    messages = " ".join(str(w.message) for w in caught)
    assert "cannot trace" in messages and "(root)" in messages and "bn" in messages
    assert isinstance(model.bn, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
