"""pytorch-quantization's calibrator behaviours that scripts rely on: error classes that
are also its built-ins, the ignored grow_method, the numpy histogram layout
(``torch_hist=False``), pytorch-quantization's attribute names, and ``calibrate_weights``."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from qdq.calib import (
    AmaxShapeError,
    CalibrationError,
    HistogramCalibrator,
    MaxCalibrator,
    NumpyHistogramCalibrator,
    PerTensorOnlyError,
    UnknownMethodError,
    calib_method_of,
    calibrate_weights,
    compute_amaxes,
)
from qdq.calib.amax_search import mse_bins
from qdq.calib.numpy_layout import mse_bin_on_centres
from qdq.descriptor import QuantDescriptor
from qdq.fp8 import fp8_histogram_amax
from qdq.nn import QuantConv2d, QuantConvTranspose2d, QuantLinear
from tests.qdq import calib_reference as ref

# ------------------------------------------------------------------ error classes


def test_shape_change_is_also_a_runtime_error():
    calib = MaxCalibrator(axis=1)
    calib.collect(torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="shape changed") as info:
        calib.collect(torch.ones(2, 5))
    assert isinstance(info.value, AmaxShapeError)
    assert isinstance(info.value, CalibrationError)


def test_unknown_amax_method_is_also_a_type_error():
    calib = HistogramCalibrator()
    calib.collect(torch.arange(10.0))
    with pytest.raises(TypeError, match="unknown amax method 'kl'"):
        calib.compute_amax("kl")
    with pytest.raises(UnknownMethodError):
        compute_amaxes([calib], "kl")


def test_per_channel_histogram_is_also_not_implemented():
    with pytest.raises(NotImplementedError, match="per tensor") as info:
        HistogramCalibrator(8, 0, False)
    assert isinstance(info.value, PerTensorOnlyError)


@pytest.mark.parametrize("bad", [-10, 0, 200])
def test_percentile_out_of_range_says_range(bad):
    calib = HistogramCalibrator()
    calib.collect(torch.arange(100.0))
    with pytest.raises(ValueError, match=r"range \(0, 100\].*" + str(bad)):
        calib.compute_amax("percentile", percentile=bad)


# ------------------------------------------------------------------ grow_method


def test_grow_method_other_than_append_is_ignored_with_a_warning():
    data = [torch.tensor([0.0, 4.0, 4.0, 1.0]), torch.tensor([0.5, 4.0, 9.0])]
    plain = HistogramCalibrator(num_bins=256)
    with pytest.warns(UserWarning, match="grow_method='stretch' is ignored"):
        stretched = HistogramCalibrator(num_bins=256, grow_method="stretch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        appended = HistogramCalibrator(num_bins=256, grow_method="append")
    for calib in (plain, stretched, appended):
        for batch in data:
            calib.collect(batch)
    assert torch.equal(stretched.counts, plain.counts)
    assert torch.equal(appended.counts, plain.counts)
    assert plain.counts.numel() > 256                      # the second batch appended bins


# --------------------------------------------- pytorch-quantization's attribute names


def test_torch_layout_shows_counts_and_float32_edges_under_pq_names():
    calib = HistogramCalibrator(num_bins=8)
    assert calib._calib_hist is None and calib._calib_bin_edges is None
    calib.collect(torch.tensor([0.0, 1.0, 3.0, 8.0]))
    assert calib._calib_hist.tolist() == [1, 1, 0, 1, 0, 0, 0, 1]
    assert calib._calib_bin_edges.dtype == torch.float32
    assert calib._calib_bin_edges.tolist() == list(range(9))
    calib.collect(torch.tensor([10.5]))                    # grows to 11 bins of width 1
    assert calib._calib_hist.numel() == 11
    assert calib._calib_bin_edges.tolist() == list(range(12))


def test_torch_layout_edges_of_zeros_only():
    calib = HistogramCalibrator(num_bins=4)
    calib.collect(torch.zeros(5))
    assert calib._calib_hist.tolist() == [5, 0, 0, 0]
    assert calib._calib_bin_edges.tolist() == [0.0] * 5


# ------------------------------------------------------------------ numpy layout


def test_torch_hist_false_builds_the_numpy_layout():
    calib = HistogramCalibrator(8, None, False, num_bins=16, torch_hist=False)
    assert isinstance(calib, NumpyHistogramCalibrator)
    assert isinstance(calib, HistogramCalibrator)
    assert calib_method_of(calib) == "histogram"
    assert "torch_hist=False" in repr(calib)
    assert type(copy.deepcopy(calib)) is NumpyHistogramCalibrator
    assert type(HistogramCalibrator(torch_hist=True)) is HistogramCalibrator


def test_numpy_layout_bins_min_to_max_then_appends_and_drops_below():
    calib = HistogramCalibrator(num_bins=4, torch_hist=False)
    calib.collect(torch.tensor([0.5, -1.25, 2.5, 2.25]))  # |x| over [0.5, 2.5], width 0.5
    assert calib._calib_bin_edges.tolist() == [0.5, 1.0, 1.5, 2.0, 2.5]
    assert calib._calib_hist.tolist() == [1, 1, 0, 2]    # the last bin holds its right edge
    calib.collect(torch.tensor([0.25, 1.0, 3.2]))        # 0.25 < first edge: left out
    assert calib._calib_bin_edges.tolist() == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    assert calib._calib_hist.tolist() == [1, 2, 0, 2, 0, 1]
    assert calib._calib_hist.dtype == np.int64
    assert float(calib.max) == pytest.approx(3.2)


def test_numpy_layout_widens_a_constant_first_batch_as_numpy_does():
    calib = HistogramCalibrator(num_bins=4, torch_hist=False)
    calib.collect(torch.full((3,), 2.0))
    assert calib._calib_bin_edges.tolist() == [1.5, 1.75, 2.0, 2.25, 2.5]
    assert calib._calib_hist.tolist() == [0, 0, 3, 0]


def test_numpy_layout_skips_zeros_and_empty_batches():
    calib = HistogramCalibrator(num_bins=4, skip_zeros=True, torch_hist=False)
    calib.collect(torch.zeros(6))                          # nothing left: no layout yet
    assert calib.counts is None
    calib.collect(torch.tensor([0.0, 1.0, 0.0, 5.0]))
    assert calib._calib_bin_edges.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert int(calib.counts.sum()) == 2
    calib.collect(torch.empty(0))
    assert int(calib.counts.sum()) == 2


def test_numpy_layout_agrees_with_torch_layout_when_the_minimum_is_zero():
    # values on a 1/64 grid, never on a bin edge: both layouts must bin them alike
    g = torch.Generator().manual_seed(3)
    first = (torch.randint(0, 640, (500,), generator=g) * 2 + 1) / 128.0
    first[7] = 0.0
    first[11] = 10.0
    later = (torch.randint(0, 1000, (500,), generator=g) * 2 + 1) / 128.0
    later[3] = 0.0
    torch_calib = HistogramCalibrator(num_bins=40)
    np_calib = HistogramCalibrator(num_bins=40, torch_hist=False)
    for batch in (first, later, first):
        torch_calib.collect(batch)
        np_calib.collect(batch)
        assert np_calib._calib_hist.tolist() == torch_calib._calib_hist.tolist()
        np.testing.assert_allclose(np_calib._calib_bin_edges,
                                   torch_calib._calib_bin_edges.numpy(), rtol=1e-6)
    assert torch_calib.counts.numel() > 40                # the later batch grew both


def test_numpy_layout_growth_cap_merges_and_keeps_every_count():
    big = torch.tensor([0.0, 1.0, 300.0])
    calib = HistogramCalibrator(num_bins=16, torch_hist=False, max_bins=64)
    calib.collect(torch.tensor([0.0, 0.5, 1.0]))
    calib.collect(big)
    edges = calib._calib_bin_edges
    assert calib._calib_hist.size == edges.size - 1 <= 64
    assert int(calib.counts.sum()) == 6
    assert edges[-1] >= 300.0
    widths = np.diff(edges)
    np.testing.assert_allclose(widths, widths[0], rtol=1e-4)
    # below the cap nothing merges: bins of the first width up to 300
    uncapped = HistogramCalibrator(num_bins=16, torch_hist=False, max_bins=4800)
    uncapped.collect(torch.tensor([0.0, 0.5, 1.0]))
    uncapped.collect(big)
    assert uncapped._calib_hist.size == 4800
    assert float(uncapped.bin_width) == pytest.approx(1 / 16)


def _numpy_calibrator(seed: int = 0, num_bins: int = 512, **kw) -> NumpyHistogramCalibrator:
    g = torch.Generator().manual_seed(seed)
    calib = HistogramCalibrator(num_bins=num_bins, torch_hist=False, **kw)
    calib.collect(torch.randn(4000, generator=g).abs() + 0.3)   # first edge near 0.3
    calib.collect((torch.randn(4000, generator=g) * 1.7).abs())  # grows
    return calib


@pytest.mark.parametrize("unsigned", [False, True])
def test_numpy_layout_entropy_and_percentile_read_off_its_edges(unsigned):
    calib = _numpy_calibrator(unsigned=unsigned)
    edges, counts = calib._calib_bin_edges, calib._calib_hist.tolist()
    assert edges[0] > 0.29
    chosen, _ = ref.entropy_bin(counts, unsigned=unsigned)
    assert float(calib.compute_amax("entropy")) == pytest.approx(float(edges[chosen]), abs=0)
    for p in (90.0, 99.9):
        b = ref.percentile_bin(counts, p)
        assert float(calib.compute_amax("percentile", percentile=p)) == float(edges[b])


def _brute_mse(counts, centres, num_bits=8, unsigned=False, start_bin=128):
    """Every candidate's error with an explicit fake quantization of every centre."""
    qmax = 2 ** (num_bits - 1 + int(unsigned)) - 1
    c, x = np.asarray(counts, np.float64), np.asarray(centres, np.float64)
    errors = []
    for i in range(start_bin, len(x)):
        scale = qmax / x[i]
        fq = np.clip(np.round(x * scale), 0 if unsigned else -qmax, qmax) / scale
        errors.append(float(((fq - x) ** 2) @ c))
    return start_bin + int(np.argmin(errors))


def test_numpy_layout_mse_uses_the_true_centres():
    calib = _numpy_calibrator(seed=1)
    edges = calib._calib_bin_edges
    centres = (edges[1:] + edges[:-1]) / np.float32(2)
    best = _brute_mse(calib._calib_hist, centres)
    assert float(calib.compute_amax("mse")) == float(centres[best])
    # and it is not the closed form's answer, which ignores the offset of the edges
    offset_free = (int(mse_bins([calib.counts])[0]) + 0.5) * calib.bin_width
    assert float(calib.compute_amax("mse")) != pytest.approx(offset_free, rel=1e-6)


@pytest.mark.parametrize("num_bits,unsigned", [(8, False), (4, True), (6, False)])
def test_mse_on_centres_equals_brute_force_and_closed_form(num_bits, unsigned):
    g = torch.Generator().manual_seed(num_bits)
    counts = torch.randint(0, 40, (400,), generator=g) * (torch.rand(400, generator=g) > 0.3)
    uniform = (torch.arange(400, dtype=torch.float64) + 0.5) * 0.02
    shifted = uniform + 0.41
    for centres in (uniform, shifted):
        got = mse_bin_on_centres(counts, centres, num_bits=num_bits, unsigned=unsigned)
        assert got == _brute_mse(counts.numpy(), centres.numpy(), num_bits, unsigned)
    closed = int(mse_bins([counts], num_bits=num_bits, unsigned=unsigned)[0])
    assert mse_bin_on_centres(counts, uniform, num_bits=num_bits, unsigned=unsigned) == closed


def test_mse_on_centres_names_a_start_bin_past_the_histogram():
    with pytest.raises(CalibrationError, match="fc.*start_bin=128.*100 bins"):
        mse_bin_on_centres(torch.ones(100, dtype=torch.int64),
                           torch.arange(100, dtype=torch.float64), name="fc")


def test_compute_amaxes_mixes_both_layouts():
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(3000, generator=g) for _ in range(2)]
    torch_calib, np_calib = HistogramCalibrator(), HistogramCalibrator(torch_hist=False)
    for b in batches:
        torch_calib.collect(b)
        np_calib.collect(b)
    together = compute_amaxes([torch_calib, np_calib], "percentile", percentile=99.0)
    assert torch.equal(together[0], torch_calib.compute_amax("percentile", percentile=99.0))
    assert torch.equal(together[1], np_calib.compute_amax("percentile", percentile=99.0))
    assert float(np_calib.compute_amax("max")) == float(torch.cat(batches).abs().max())


def test_numpy_layout_checks_its_data_and_refuses_what_it_cannot_do():
    calib = HistogramCalibrator(unsigned=True, torch_hist=False)
    calib.owner = "relu_out"
    with pytest.raises(CalibrationError, match="relu_out.*negative"):
        calib.collect(torch.tensor([1.0, -2.0]))
    calib = HistogramCalibrator(torch_hist=False)
    calib.owner = "fc._input_quantizer"
    with pytest.raises(CalibrationError, match=r"fc\._input_quantizer.*non-finite"):
        calib.collect(torch.tensor([1.0, float("nan")]))
    with pytest.raises(CalibrationError, match="fix_range"):
        calib.fix_range(1.0)
    with pytest.raises(CalibrationError, match="torch_hist=True"):
        calib.all_reduce()
    assert calib.compute_amax("entropy") is None
    calib.collect(torch.zeros(4))
    assert float(calib.compute_amax("mse")) == 0.0      # zeros only: amax 0, as torch's


# ------------------------------------------------------------------ calibrate_weights


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(QuantConv2d(3, 6, 3), nn.ReLU(), QuantConvTranspose2d(6, 5, 2),
                         nn.Flatten(), QuantLinear(5 * 8 * 8, 7))


def _channels(layer: nn.Module) -> list[torch.Tensor]:
    """The weight's slices along its quantizer's axis."""
    axis = layer.weight_quantizer.axis
    return list(layer.weight.detach().unbind(axis))


def _histogram_amax(values: torch.Tensor, method: str, **kw) -> torch.Tensor:
    calib = HistogramCalibrator(kw.pop("num_bits", 8), None, kw.pop("unsigned", False))
    calib.collect(values)
    return calib.compute_amax(method, **kw)


@pytest.mark.parametrize("method,kw", [("percentile", {"percentile": 99.0}), ("mse", {})])
def test_per_channel_amax_equals_a_histogram_of_each_channel(method, kw):
    model = _model()
    calibrate_weights(model, method=method, perchannel=True, **kw)
    for layer in (model[0], model[2], model[4]):
        amax = layer.weight_quantizer.amax
        expected = torch.stack([_histogram_amax(ch, method, **kw) for ch in _channels(layer)])
        assert torch.equal(amax.reshape(-1), expected)
    assert model[0].weight_quantizer.amax.shape == (6, 1, 1, 1)
    assert model[2].weight_quantizer.amax.shape == (1, 5, 1, 1)     # ConvTranspose: axis 1
    assert model[4].weight_quantizer.amax.shape == (7, 1)


def test_max_equals_the_max_calibrator_of_each_quantizer():
    reference, model = _model(1), _model(1)
    for layer in (reference[0], reference[2], reference[4]):
        q = layer.weight_quantizer
        q.disable_quant()
        q.enable_calib()
        q(layer.weight)
        q.load_calib_amax()
    calibrate_weights(model, method="max")
    for ref_layer, layer in zip(reference, model, strict=True):
        if isinstance(layer, (QuantConv2d, QuantConvTranspose2d, QuantLinear)):
            assert torch.equal(layer.weight_quantizer.amax, ref_layer.weight_quantizer.amax)


@pytest.mark.parametrize("method", ["percentile", "mse", "max"])
def test_per_tensor_amax_is_one_value_of_the_whole_weight(method):
    model = _model(2)
    calibrate_weights(model, method=method, perchannel=False)
    for layer in (model[0], model[2], model[4]):
        amax = layer.weight_quantizer.amax
        assert amax.shape == ()
        if method == "max":
            assert float(amax) == float(layer.weight.detach().abs().max())
        else:
            assert torch.equal(amax, _histogram_amax(layer.weight.detach(), method))


def test_mse_follows_each_quantizer_grid():
    torch.manual_seed(4)
    four = QuantLinear(64, 3, quant_desc_weight=QuantDescriptor(num_bits=4, axis=0))
    fp8 = QuantLinear(64, 3, quant_desc_weight=QuantDescriptor(num_bits=(4, 3), axis=0))
    eight = QuantLinear(64, 3)
    calibrate_weights(nn.Sequential(four, fp8, eight), method="mse")
    for ch, amax in zip(four.weight.detach(), four.weight_quantizer.amax.reshape(-1),
                        strict=True):
        assert torch.equal(amax, _histogram_amax(ch, "mse", num_bits=4))
    for ch, amax in zip(fp8.weight.detach(), fp8.weight_quantizer.amax.reshape(-1),
                        strict=True):
        calib = HistogramCalibrator()
        calib.collect(ch)
        assert torch.equal(amax, fp8_histogram_amax(calib, "mse"))
    # a coarser grid clips differently: the 4-bit amax is not the 8-bit one
    four_at_8 = torch.stack([_histogram_amax(ch, "mse") for ch in four.weight.detach()])
    assert not torch.equal(four.weight_quantizer.amax.reshape(-1), four_at_8)


def test_a_channel_of_zeros_gets_amax_zero_and_the_rest_are_calibrated():
    model = _model(5)
    with torch.no_grad():
        model[0].weight[2].zero_()
    calibrate_weights(model, method="percentile")
    amax = model[0].weight_quantizer.amax.reshape(-1)
    assert float(amax[2]) == 0.0
    assert bool((amax[[0, 1, 3, 4, 5]] > 0).all())


def test_calibrated_weights_quantize_within_their_amax():
    model = _model(6)
    calibrate_weights(model, method="percentile", percentile=99.0)
    layer = model[0]
    amax = layer.weight_quantizer.amax
    fq = layer.weight_quantizer(layer.weight.detach())
    assert bool((fq.abs() <= amax + 1e-6).all())
    assert bool((amax < layer.weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True)).any())


def test_bad_requests_change_nothing():
    model = _model(7)
    with pytest.raises(TypeError, match="unknown method 'entropy'"):
        calibrate_weights(model, method="entropy")
    with pytest.raises(ValueError, match="range"):
        calibrate_weights(model, method="percentile", percentile=120)
    with pytest.raises(CalibrationError, match="start_bin=128.*64 bins"):
        calibrate_weights(model, method="mse", num_bins=64)
    assert all(layer.weight_quantizer.amax is None
               for layer in (model[0], model[2], model[4]))


def test_modules_without_a_weight_quantizer_are_left_alone():
    torch.manual_seed(8)
    plain = nn.Linear(4, 4)
    model = nn.Sequential(plain, QuantLinear(4, 2))
    before = plain.weight.detach().clone()
    calibrate_weights(model, method="max")
    assert torch.equal(plain.weight, before)
    assert model[1].weight_quantizer.amax.shape == (2, 1)
