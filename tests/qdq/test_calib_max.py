"""MaxCalibrator's one-pass min/max reduction equals abs-then-amax on every axis choice."""

from __future__ import annotations

import pytest
import torch

from qdq.calib import CalibrationError, MaxCalibrator


def _reference(batches, axis):
    dims = tuple(range(batches[0].dim()))
    if axis is None:
        return torch.stack([b.float().abs().max() for b in batches]).max()
    kept = axis if isinstance(axis, tuple) else (axis,)
    kept = tuple(a % batches[0].dim() for a in kept)
    reduced = tuple(d for d in dims if d not in kept)
    per = [torch.amax(b.float().abs(), dim=reduced, keepdim=True) for b in batches]
    return torch.stack(per).amax(0)


@pytest.mark.parametrize("axis", [None, 0, 1, -1, (0, 2), (1, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_running_amax_matches_abs_amax(axis, dtype):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 5, 6, 3, generator=g) * s).to(dtype) for s in (1.0, 3.0, 0.5)]
    calib = MaxCalibrator(axis=axis)
    for b in batches:
        calib.collect(b)
    amax = calib.compute_amax()
    expected = _reference(batches, axis)
    assert amax.dtype == torch.float32
    assert amax.shape == expected.shape
    assert torch.equal(amax, expected)


def test_negative_extremes_count():
    calib = MaxCalibrator(axis=0)
    calib.collect(torch.tensor([[-5.0, 1.0], [2.0, -0.5]]))
    assert calib.compute_amax().reshape(-1).tolist() == [5.0, 2.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("axis", [None, 0])
def test_non_finite_raises_naming_the_quantizer(bad, axis):
    calib = MaxCalibrator(axis=axis)
    calib.owner = "conv1._weight_quantizer"
    x = torch.ones(3, 4)
    x[1, 2] = bad
    with pytest.raises(CalibrationError, match=r"conv1\._weight_quantizer.*non-finite"):
        calib.collect(x)


def test_unsigned_rejects_negative_values():
    calib = MaxCalibrator(unsigned=True)
    calib.owner = "relu_out"
    with pytest.raises(CalibrationError, match="relu_out.*negative.*-2"):
        calib.collect(torch.tensor([1.0, -2.0]))
