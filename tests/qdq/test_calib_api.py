"""The calibration API says what it does: one registry of names, per-channel amax along its
axis, errors that name the quantizer and the fix, no keyword accepted and ignored."""

from __future__ import annotations

import pytest
import torch

from qdq.calib import (
    AMAX_METHODS,
    CALIBRATORS,
    CalibrationError,
    HistogramCalibrator,
    MaxCalibrator,
    build_calibrator,
    calib_method_of,
    check_amax_method,
    parse_choice,
)
from qdq.descriptor import CALIB_METHODS, QuantDescriptor
from qdq.quantizer import QuantizerError, TensorQuantizer, load_calib_amaxes
from qdq.tensor_quant import fake_quant

# ------------------------------------------------------------------ registry


def test_one_table_of_names():
    assert tuple(CALIBRATORS) == CALIB_METHODS == ("max", "histogram")
    assert AMAX_METHODS == {"max": ("max",), "histogram": ("entropy", "percentile", "mse", "max")}
    for name, cls in CALIBRATORS.items():
        calib = build_calibrator(QuantDescriptor(calib_method=name), "fc._input_quantizer")
        assert type(calib) is cls and calib.owner == "fc._input_quantizer"
        assert calib_method_of(calib) == name and cls.amax_methods == AMAX_METHODS[name]
    with pytest.raises(ValueError, match="calib_method"):
        QuantDescriptor(calib_method="entropy")


def test_build_calibrator_follows_the_descriptor():
    desc = QuantDescriptor(calib_method="histogram", num_bits=6, unsigned=True, num_bins=512,
                           skip_zeros=True)
    calib = build_calibrator(desc)
    assert (calib.num_bits, calib.unsigned, calib.num_bins, calib.skip_zeros) == \
        (6, True, 512, True)
    with pytest.raises(CalibrationError, match="conv.w: the histogram calibrator is per tensor"):
        build_calibrator(QuantDescriptor(calib_method="histogram", axis=0), "conv.w")


def test_amax_methods_and_choices():
    assert check_amax_method("histogram", None) == "entropy"
    assert check_amax_method("max", None) == "max"
    with pytest.raises(CalibrationError, match="'mse' does not exist for the max"):
        check_amax_method("max", "mse")
    assert parse_choice("mse") == ("mse", {})
    assert parse_choice("percentile-99.99") == ("percentile", {"percentile": 99.99})
    for bad in ("percentile-0", "percentile-x", "kl", "percentile"):
        with pytest.raises(CalibrationError, match="unknown"):
            parse_choice(bad)


# ------------------------------------------------------------------ per-channel amax


@pytest.mark.parametrize("shape, axis", [((3, 5), 0), ((4, 2, 3, 3), 0), ((2, 4, 3, 3), 1),
                                         ((6, 4, 4), -1)])
def test_descriptor_amax_list_applies_along_its_axis(shape, axis):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * 3
    channels = shape[axis]
    amax = [0.5 + k for k in range(channels)]
    q = TensorQuantizer(QuantDescriptor(axis=axis, amax=amax))
    scale = torch.tensor(amax) / 127
    expected = torch.fake_quantize_per_channel_affine(
        x, scale, torch.zeros(channels, dtype=torch.int32), axis % x.dim(), -128, 127)
    assert torch.equal(q(x), expected)


def test_descriptor_amax_list_must_match_the_channels():
    q = TensorQuantizer(QuantDescriptor(axis=0, amax=[1.0, 2.0], name="fc.w"))
    with pytest.raises(QuantizerError, match="fc.w: amax has 2 values but axis 0 .* 3"):
        q(torch.randn(3, 4))
    with pytest.raises(QuantizerError, match="one quantization axis"):
        TensorQuantizer(QuantDescriptor(axis=(0, 1), amax=[1.0, 2.0]))
    # without an axis a list broadcasts against the input as it is (pytorch-quantization)
    q = TensorQuantizer(QuantDescriptor(amax=[1.0, 2.0]))
    x = torch.tensor([[0.5, 0.5], [3.0, 3.0]])
    assert torch.equal(q(x), fake_quant(x, torch.tensor([1.0, 2.0])))


# ------------------------------------------------------------------ quantizer errors


def _collected(desc: QuantDescriptor) -> TensorQuantizer:
    q = TensorQuantizer(desc)
    q.disable_quant()
    q.enable_calib()
    q(torch.randn(64, 32, generator=torch.Generator().manual_seed(1)))
    return q


@pytest.mark.parametrize("args, kwargs", [(("percentile",), {}), (("entropy",), {}),
                                          ((), {"percentile": 99.9})])
def test_histogram_request_on_a_max_quantizer_names_it_and_the_fix(args, kwargs):
    q = _collected(QuantDescriptor(name="layer1.conv._input_quantizer"))
    with pytest.raises(QuantizerError) as info:
        q.load_calib_amax(*args, **kwargs)
    text = str(info.value)
    assert text.startswith("layer1.conv._input_quantizer")
    assert "calib_method='histogram'" in text and "load_calib_amax()" in text
    assert q.amax is None                      # nothing was stored
    q.load_calib_amax("max")
    assert q.amax is not None


def test_if_clip_needs_a_learned_amax_not_ignored():
    with pytest.raises(QuantizerError, match="if_clip=True needs.*learn_amax"):
        TensorQuantizer(if_clip=True)
    assert TensorQuantizer(if_clip=False).is_enabled


def test_calibrating_with_switches_descriptor_and_calibrator_together():
    q = _collected(QuantDescriptor(name="act"))
    desc, calib = q.descriptor, q.calibrator
    with q.calibrating_with("histogram"):
        assert q.descriptor.calib_method == "histogram"
        assert isinstance(q.calibrator, HistogramCalibrator) and q.calibrator.owner == "act"
        q(torch.randn(1000))
        q.load_calib_amax("percentile", percentile=99.0)
    assert q.descriptor is desc and q.calibrator is calib
    assert q.amax is not None                  # the amax found inside stays
    with pytest.raises(RuntimeError, match="boom"), q.calibrating_with("histogram"):
        raise RuntimeError("boom")
    assert q.descriptor is desc and q.calibrator is calib
    w = TensorQuantizer(QuantDescriptor(axis=0, name="w"))
    with pytest.raises(QuantizerError, match="w: the histogram calibrator is per tensor"), \
            w.calibrating_with("histogram"):
        pass


def test_load_calib_amaxes_equals_one_quantizer_at_a_time():
    descs = [QuantDescriptor(calib_method="histogram"), QuantDescriptor(),
             QuantDescriptor(calib_method="histogram", num_bits=6), QuantDescriptor(axis=0)]
    batched = [_collected(d) for d in descs]
    single = [_collected(d) for d in descs]
    load_calib_amaxes(batched, "mse", stride=2)
    for q in single:
        if isinstance(q.calibrator, HistogramCalibrator):
            q.load_calib_amax("mse", stride=2)
        else:
            q.load_calib_amax()
    for a, b in zip(batched, single, strict=True):
        assert torch.equal(a.amax, b.amax)
    with pytest.raises(QuantizerError, match="none of the quantizers has a histogram"):
        load_calib_amaxes([_collected(QuantDescriptor())], "percentile")
    empty = TensorQuantizer(QuantDescriptor(calib_method="histogram", name="unused"))
    with pytest.raises(QuantizerError, match="unused.*no data"):
        load_calib_amaxes([empty])
    load_calib_amaxes([empty], strict=False)
    assert empty.amax is None


# ------------------------------------------------------------------ max calibrator


def test_max_calibrator_skips_an_unchanged_repeat_but_not_a_changed_one():
    w = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 0.25]]))
    calib = MaxCalibrator(axis=0, track_amax=True)
    calib.collect(w)
    calib.collect(w)                            # the same weight, unchanged: no pass
    assert calib.compute_amax().flatten().tolist() == [2.0, 0.5]
    with torch.no_grad():
        w[1, 0] = -7.0                          # in place: the version counter moves
    calib.collect(w)
    assert calib.compute_amax().flatten().tolist() == [2.0, 7.0]
    assert len(calib.amaxs) == 3
    with torch.inference_mode():
        x = torch.tensor([3.0, -4.0])
        calib2 = MaxCalibrator()
        calib2.collect(x)
        calib2.collect(x)
        assert float(calib2.compute_amax()) == 4.0
