"""Weight-only INT8/INT4: codes and scales against plain loops written from the definition,
the layers against their float originals, and the walker's choices and refusals."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn

import qdq
from qdq.blockwise import MSE_CLIP_RATIOS, dequantize_weight, quantize_weight, weight_amax
from qdq.formats import FormatError, indivisible_weights, weight_only
from qdq.nn.weight_only import (
    WeightOnlyConv2d,
    WeightOnlyLinear,
    WeightOnlyLSTM,
)


def round_half_even(v: float) -> int:
    low = int(np.floor(v))
    frac = v - low
    if frac > 0.5 or (frac == 0.5 and low % 2 == 1):
        return low + 1
    return low


def plain_quantize(w: np.ndarray, bits: int, block: int | None):
    """Loop over rows (and kernel positions) and blocks: amax = max |w| of the block,
    scale = amax / (2^(b-1) - 1) in fp32, code = round half to even of w / scale,
    saturated to [-2^(b-1), 2^(b-1) - 1]."""
    qmax = 2 ** (bits - 1) - 1
    out, inputs = w.shape[0], w.shape[1]
    flat = w.reshape(out, inputs, -1)
    codes = np.zeros(flat.shape, np.int64)
    if block is None:
        scales = np.zeros(out, np.float32)
        for o in range(out):
            scale = np.float32(max(np.float32(np.abs(flat[o]).max()), 2.0 ** -24)
                               / np.float32(qmax))
            scales[o] = scale
            for i in range(inputs):
                for k in range(flat.shape[2]):
                    q = round_half_even(float(np.float32(flat[o, i, k]) / scale))
                    codes[o, i, k] = min(max(q, -qmax - 1), qmax)
        return codes.reshape(w.shape), scales
    scales = np.zeros((out, inputs // block, flat.shape[2]), np.float32)
    for o in range(out):
        for b in range(inputs // block):
            for k in range(flat.shape[2]):
                part = flat[o, b * block:(b + 1) * block, k]
                scale = np.float32(max(np.float32(np.abs(part).max()), 2.0 ** -24)
                                   / np.float32(qmax))
                scales[o, b, k] = scale
                for j in range(block):
                    q = round_half_even(float(np.float32(part[j]) / scale))
                    codes[o, b * block + j, k] = min(max(q, -qmax - 1), qmax)
    return codes.reshape(w.shape), scales.reshape(out, inputs // block, *w.shape[2:])


@pytest.mark.parametrize("shape, bits, block", [
    ((6, 64), 4, 32), ((5, 48), 4, 16), ((4, 8, 3, 3), 4, 4), ((7, 40), 8, None),
    ((4, 6, 3, 3), 8, None), ((6, 64), 4, None), ((3, 32), 8, 8),
])
def test_codes_and_scales_equal_a_plain_rounding_loop(rng, shape, bits, block):
    w = torch.randn(shape, generator=rng)
    w[0].zero_()  # a dead row still gets a positive scale
    codes, scale = quantize_weight(w, bits, block)
    plain_codes, plain_scale = plain_quantize(w.numpy(), bits, block)
    assert codes.dtype == torch.int8
    assert np.array_equal(codes.numpy().astype(np.int64), plain_codes)
    assert np.array_equal(scale.numpy(), plain_scale)
    repeat = 1 if block is None else block
    expanded = (plain_scale.reshape(shape[0], *([1] * (len(shape) - 1))) if block is None
                else np.repeat(plain_scale, repeat, axis=1))
    assert np.array_equal(dequantize_weight(codes, scale, block).numpy(),
                          plain_codes.astype(np.float32) * expanded)
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1


def test_ties_round_to_even(rng):
    w = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -1.5, 3.5, -7.0]])
    codes, scale = quantize_weight(w, 4, 8)
    assert scale.item() == 1.0
    assert codes.tolist() == [[7, 0, 2, 2, 0, -2, 4, -7]]


def test_mse_amax_equals_a_plain_search_over_ratios(rng):
    w = torch.randn(4, 64, generator=rng)
    w[1, 3] = 9.0  # an outlier: clipping it would cost more than the rounding it saves
    amax = weight_amax(w, 4, 16, "mse")
    qmax = 7
    for o in range(4):
        for b in range(4):
            part = w[o, b * 16:(b + 1) * 16].double().numpy()
            top = np.float32(np.abs(part).max())
            best, best_err = None, None
            for ratio in MSE_CLIP_RATIOS:
                a = np.float32(top * np.float32(ratio))
                scale = np.float32(a / np.float32(qmax))
                err = sum((x - scale * min(max(round_half_even(float(np.float32(x) / scale)),
                                               -8), 7)) ** 2 for x in part)
                if best_err is None or err < best_err * (1 - 1e-6):
                    best, best_err = a, err
            assert amax[o, b].item() == pytest.approx(float(best), rel=1e-6)
    largest = weight_amax(w, 4, 16, "max")
    assert amax[1, 0] == largest[1, 0]
    assert (amax < largest).sum() >= 4  # but most Gaussian blocks gain from clipping


def test_bad_arguments_are_refused(rng):
    with pytest.raises(ValueError, match="does not divide its input dimension 48"):
        quantize_weight(torch.randn(4, 48, generator=rng), 4, 32)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_weight(torch.randn(4, 48, generator=rng), 3)
    with pytest.raises(ValueError, match="amax method 'entropy'"):
        weight_amax(torch.randn(4, 48, generator=rng), 4, None, "entropy")


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.lstm = nn.LSTM(16, 32, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).flatten(2).transpose(1, 2)
        out, _ = self.lstm(y)
        return self.head(out[:, -1])


def mixed(seed: int = 0) -> Mixed:
    torch.manual_seed(seed)
    model = Mixed()
    model.bn.running_mean.uniform_(-0.2, 0.2)
    model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("bits, block", [(8, None), (4, 8), (4, None)])
def test_weight_only_layers_compute_the_float_layers_on_dequantized_weights(bits, block):
    model = mixed()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 8, 4, 4)
    done = weight_only(model, bits=bits, block_size=block)
    assert [(r.name, r.quant_type) for r in done] == [
        ("conv", "WeightOnlyConv2d"), ("lstm", "WeightOnlyLSTM"), ("head", "WeightOnlyLinear")]
    assert isinstance(model.bn, nn.Identity)  # folded first
    assert qdq.format_of(model) == ("w8" if bits == 8 else "w4")
    # the float model with its (folded) weights replaced by the dequantized ones
    qdq.rules.fold_batchnorm(reference)
    with torch.no_grad():
        reference.conv.weight.copy_(model.conv.weight)
        for name, qw in model.lstm.weights.items():
            getattr(reference.lstm, name).copy_(qw())
        reference.head.weight.copy_(model.head.weight)
        assert torch.equal(model(x), reference(x))
    # and the quantization error stays within what the format allows
    fresh = mixed()
    with torch.no_grad():
        rel = (model(x) - fresh(x)).norm() / fresh(x).norm()
    assert rel < (0.02 if bits == 8 else 0.2)


def test_lstm_unbatched_and_given_state():
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 5, batch_first=False).eval()
    layer = WeightOnlyLSTM.from_float(lstm, bits=8)
    float_twin = copy.deepcopy(lstm)
    with torch.no_grad():
        for name, qw in layer.weights.items():
            getattr(float_twin, name).copy_(qw())
        x = torch.randn(7, 6)
        h = (torch.randn(1, 5), torch.randn(1, 5))
        ours, (h1, c1) = layer(x, h)
        theirs, (h2, c2) = float_twin(x, h)
    assert torch.equal(ours, theirs) and torch.equal(h1, h2) and torch.equal(c1, c2)


def test_conv_padding_modes_and_groups():
    torch.manual_seed(0)
    for conv in (nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", groups=2),
                 nn.Conv2d(4, 6, 3, padding="same", dilation=2)):
        layer = WeightOnlyConv2d.from_float(conv.eval(), bits=8)
        with torch.no_grad():
            conv.weight.copy_(layer.weight)
            x = torch.randn(2, conv.in_channels, 9, 9)
            assert torch.equal(layer(x), conv(x))


def test_ignore_and_state_dict_round_trip():
    model = mixed()
    weight_only(model, bits=4, block_size=8, ignore=["head", re.compile(r"lst.")])
    assert isinstance(model.head, nn.Linear) and isinstance(model.lstm, nn.LSTM)
    assert isinstance(model.conv, WeightOnlyConv2d)
    state = model.state_dict()
    assert state["conv.weight_q.codes"].dtype == torch.int8
    other = mixed(seed=1)
    weight_only(other, bits=4, block_size=8, ignore=["head", "lstm"])
    other.load_state_dict(state)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


def test_a_block_size_that_does_not_divide_changes_nothing():
    model = mixed()
    before = copy.deepcopy(model.state_dict())
    # conv: 8 inputs; lstm layer 0: 16 and 32, layer 1: 64 and 32; head 64
    with pytest.raises(FormatError, match=r"block_size 16 does not divide the input "
                                          r"dimension of 1 weight\(s\): conv.weight \(8\)"):
        weight_only(model, bits=4, block_size=16)
    assert type(model.conv) is nn.Conv2d and isinstance(model.bn, nn.BatchNorm2d)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert indivisible_weights(model, 16) == [("conv", "weight", 8)]
    assert indivisible_weights(model, 64) == [
        ("conv", "weight", 8), ("lstm", "weight_ih_l0", 16), ("lstm", "weight_hh_l0", 32),
        ("lstm", "weight_ih_l0_reverse", 16), ("lstm", "weight_hh_l0_reverse", 32),
        ("lstm", "weight_hh_l1", 32), ("lstm", "weight_hh_l1_reverse", 32)]
    weight_only(model, bits=4, block_size=16, ignore=["conv"])  # the fix the message names
    assert isinstance(model.head, WeightOnlyLinear) and model.head.weight_q.block_size == 16


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 2}, "bits must be one of"),
    ({"bits": 4, "block_size": 0}, "block_size must be None or a positive int"),
    ({"bits": 8, "amax_method": "percentile"}, "amax_method 'percentile'"),
    ({"bits": 4, "clip_ratios": (1.2,)}, "clip_ratios"),
])
def test_bad_weight_only_arguments(kwargs, match):
    model = mixed()
    with pytest.raises(FormatError, match=match):
        weight_only(model, **kwargs)
    assert type(model.head) is nn.Linear


def test_apply_format_dispatches_by_name():
    model = mixed()
    qdq.apply_format(model, "w4", block_size=8)
    assert qdq.format_of(model) == "w4"
    assert qdq.get_format("W8").min_opset == 13 and qdq.get_format("w4").min_opset == 21
    assert [f.name for f in qdq.FORMATS.values()] == ["int8", "fp8", "w8", "w4"]
    assert qdq.format_of(mixed()) == "float"
