"""calibrate(): amax from real batches, every batch form, state restored, bad input; the
descriptor decides the calibrator, and an override is undone on exit."""

import pytest
import torch

import qdq
import qdq.calib.amax_search as amax_search
from qdq.calib import HistogramCalibrator, MaxCalibrator
from qdq.descriptor import QuantDescriptor
from sensitivity import SensitivityError, calibrate
from tests.sensitivity.models import float_model, make_data

HIST = QuantDescriptor(calib_method="histogram")


def _fresh(input_desc=None):
    model = float_model()
    qdq.replace_modules(model, quant_desc_input=input_desc)
    return model


def _calibrators(model):
    return [(n, q.descriptor, q.calibrator) for n, q in qdq.quantizers(model)]


def _states(model):
    return [(n, q.get_state()) for n, q in qdq.quantizers(model)]


def test_max_calibration_matches_the_data_and_restores_state():
    model = _fresh().train()
    before = _states(model)
    data = make_data(96, seed=5)
    summary = calibrate(model, data, progress=False)
    x = torch.cat([b[0] for b in data])
    assert float(model.conv1._input_quantizer.amax) == pytest.approx(float(x.abs().max()))
    w = model.conv2.weight.detach().abs().amax(dim=(1, 2, 3))
    torch.testing.assert_close(model.conv2._weight_quantizer.amax.flatten(), w)
    # fc1 sees conv2's ReLU output through the pool: recompute it in float
    with torch.no_grad(), qdq.disable_quantization(model):
        feats = [torch.relu(model.conv2(torch.relu(model.conv1(b)))).mean((2, 3))
                 for b, _ in data]
    assert float(model.fc1._input_quantizer.amax) == pytest.approx(
        float(torch.cat(feats).abs().max()), rel=1e-5)
    assert model.training and _states(model) == before
    assert summary.num_batches == len(data) and summary.num_samples == 96
    assert len(summary.quantizers) == len(list(qdq.quantizers(model))) == 9
    assert not summary.uncalibrated
    assert "conv1._input_quantizer" in str(summary)


def test_num_batches_and_dict_batches_with_forward_fn():
    model = _fresh()
    seen = []

    def batches():
        for i, (x, y) in enumerate(make_data(128, seed=6)):
            seen.append(i)
            yield {"image": x, "label": y}

    calls = []

    def forward_fn(m, batch):
        calls.append(batch["image"].shape[0])
        return m(batch["image"])

    summary = calibrate(model, batches(), num_batches=2, forward_fn=forward_fn, progress=False)
    assert summary.num_batches == 2 and calls == [32, 32] and seen == [0, 1]
    first_two = torch.cat([x for x, _ in make_data(128, seed=6)[:2]])
    assert float(model.conv1._input_quantizer.amax) == pytest.approx(
        float(first_two.abs().max()))


def test_plain_tensor_batches():
    model = _fresh()
    summary = calibrate(model, [x for x, _ in make_data(64, seed=8)], progress=False)
    assert summary.num_samples == 64
    assert all(q.amax is not None for _, q in qdq.quantizers(model))


def test_exception_mid_run_restores_mode_and_quantizers():
    model = _fresh().train()
    before = _states(model)

    def broken():
        yield make_data(32, seed=1)[0]
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        calibrate(model, broken(), progress=False)
    assert model.training and _states(model) == before


def test_quantizer_that_sees_no_data_is_reported():
    model = _fresh()
    extra = qdq.TensorQuantizer()
    model.unused = extra  # never called in forward
    qdq.name_quantizers(model)
    summary = calibrate(model, make_data(32, seed=1), progress=False)
    assert summary.uncalibrated == ["unused"] and extra.amax is None


@pytest.mark.parametrize("kwargs, message", [
    ({"data": []}, "calibration data is empty"),
    ({"method": "minmax"}, "calibration method 'minmax' is unknown"),
    ({"method": "max", "amax_method": "entropy"}, "amax method 'entropy' does not exist"),
    ({"num_batches": 0}, "num_batches must be at least 1"),
])
def test_bad_input(kwargs, message):
    args = {"data": make_data(32, seed=1), **kwargs}
    with pytest.raises(SensitivityError, match=message):
        calibrate(_fresh(), progress=False, **args)


def test_no_enabled_quantizers():
    with pytest.raises(SensitivityError, match="no enabled quantizers"):
        calibrate(float_model(), make_data(32, seed=1), progress=False)
    for amax_method in ("percentile", "mse", "entropy"):  # not "does not exist for max"
        with pytest.raises(SensitivityError, match=r"no enabled quantizers.*replace_modules"):
            calibrate(float_model(), make_data(32, seed=1), amax_method=amax_method,
                      progress=False)
    model = _fresh()
    qdq.disable_quantization(model).apply()
    with pytest.raises(SensitivityError, match="no enabled quantizers"):
        calibrate(model, make_data(32, seed=1), progress=False)


@pytest.mark.parametrize("amax_method", ["entropy", "percentile", "mse", "max"])
def test_histogram_override_is_undone_and_equals_histogram_descriptors(amax_method):
    data = make_data(128, seed=5)
    model = _fresh()
    before = _calibrators(model)
    summary = calibrate(model, data, method="histogram", amax_method=amax_method,
                        percentile=99.0, progress=False)
    # every quantizer has its own descriptor and calibrator back
    after = _calibrators(model)
    assert [(n, d, id(c)) for n, d, c in after] == [(n, d, id(c)) for n, d, c in before]
    assert isinstance(model.conv1._input_quantizer.calibrator, MaxCalibrator)
    assert model.conv1._input_quantizer.descriptor.calib_method == "max"
    assert summary.method == "histogram+max" and summary.amax_method == amax_method
    # the same amax as a model whose descriptors ask for histograms
    hist = _fresh(HIST)
    calibrate(hist, data, amax_method=amax_method, percentile=99.0, progress=False)
    assert isinstance(hist.conv1._input_quantizer.calibrator, HistogramCalibrator)
    for (name, q), (_, h) in zip(qdq.quantizers(model), qdq.quantizers(hist), strict=True):
        assert torch.equal(q.amax, h.amax), name
    x = torch.cat([b[0] for b in data])
    amax = float(model.conv1._input_quantizer.amax)
    assert 0 < amax <= float(x.abs().max())
    if amax_method == "percentile":
        # 99 % of |x| lies below amax, up to one bin (the left edge of the bin reaching it)
        width = float(x.abs().max()) / 2048
        assert float((x.abs() <= amax + width).float().mean()) >= 0.99
    # weights keep their per-channel max
    w = model.conv1.weight.detach().abs().amax(dim=(1, 2, 3))
    torch.testing.assert_close(model.conv1._weight_quantizer.amax.flatten(), w)


def test_descriptors_decide_by_default():
    data = make_data(64, seed=3)
    model = _fresh(HIST)
    summary = calibrate(model, data, progress=False)
    assert summary.method == "histogram+max" and summary.amax_method == "entropy"
    q = model.fc1._input_quantizer
    assert isinstance(q.calibrator, HistogramCalibrator)
    assert torch.equal(q.amax, q.calibrator.compute_amax("entropy"))
    plain = _fresh()
    assert calibrate(plain, data, progress=False).method == "max"


def test_override_is_undone_after_an_exception():
    model = _fresh()
    before = _calibrators(model)

    def broken():
        yield make_data(32, seed=1)[0]
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        calibrate(model, broken(), method="histogram", progress=False)
    after = _calibrators(model)
    assert [(n, d, id(c)) for n, d, c in after] == [(n, d, id(c)) for n, d, c in before]


def test_histograms_of_a_model_are_searched_in_one_call(monkeypatch):
    calls = []
    search = amax_search.search_amax

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return search(*args, **kwargs)

    monkeypatch.setattr("qdq.calib.histogram.search_amax", counting)
    model = _fresh(HIST)
    calibrate(model, make_data(64, seed=2), amax_method="mse", progress=False)
    inputs = [q for _, q in qdq.quantizers(model) if q.axis is None]
    assert calls == [len(inputs)] and len(inputs) > 2


def test_amax_method_without_histograms_fails_before_any_data_runs():
    consumed = []

    def data():
        for batch in make_data(32, seed=1):
            consumed.append(1)
            yield batch

    with pytest.raises(SensitivityError, match="amax method 'mse' does not exist for the max"):
        calibrate(_fresh(), data(), amax_method="mse", progress=False)
    assert consumed == []
