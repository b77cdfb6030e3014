"""``TensorQuantizer.calibrated_by``: every table names the search behind each amax.

The bug this guards: activations calibrated with percentile or mse through histograms
were listed as ``max`` (the calibrator their descriptor asks for, which comes back after
the call) in ``qdq.summary`` and in ``calibration.json``.
"""

from __future__ import annotations

import torch

import qdq
from qdq.calib import calibrate_weights, choice_name, parse_choice
from qdq.descriptor import QuantDescriptor
from qdq.quantizer import TensorQuantizer, load_calib_amaxes
from sensitivity import calibrate
from tests.sensitivity.models import float_model, make_data


def _fed(desc: QuantDescriptor) -> TensorQuantizer:
    q = TensorQuantizer(desc)
    q.disable_quant()
    q.enable_calib()
    q(torch.randn(4096, generator=torch.Generator().manual_seed(0)))
    q.disable_calib()
    return q


def test_choice_name_inverts_parse_choice():
    for name in ("max", "entropy", "mse", "percentile-99.99", "percentile-99.9",
                 "percentile-100"):
        method, kwargs = parse_choice(name)
        assert choice_name(method, **kwargs) == name
    assert choice_name("percentile") == "percentile-99.99"   # the search's default


def test_each_search_is_named_on_the_quantizer():
    hist = QuantDescriptor(calib_method="histogram")
    q = _fed(hist)
    assert q.calibrated_by is None
    for method, kwargs, name in [("entropy", {}, "entropy"), (None, {}, "entropy"),
                                 ("mse", {}, "mse"), ("percentile", {}, "percentile-99.99"),
                                 ("percentile", {"percentile": 99.9}, "percentile-99.9"),
                                 ("max", {}, "max")]:
        q.load_calib_amax(method, **kwargs)
        assert q.calibrated_by == name, (method, kwargs)
    assert _fed(QuantDescriptor()).calibrated_by is None
    maxed = _fed(QuantDescriptor())
    maxed.load_calib_amax()
    assert maxed.calibrated_by == "max"
    fp8 = _fed(QuantDescriptor(num_bits=(4, 3), calib_method="histogram"))
    fp8.load_calib_amax()
    assert fp8.calibrated_by == "mse"                          # FP8's default search
    q.load_calib_amax("percentile", percentile=99.9)
    q.init_learn_amax()
    assert q.calibrated_by == "percentile-99.9+learned"
    q.amax = 2.0
    assert q.calibrated_by == "set"
    q.reset_amax()
    assert q.calibrated_by is None


def test_batched_searches_and_weight_calibration_name_theirs():
    qs = [_fed(QuantDescriptor(calib_method="histogram")), _fed(QuantDescriptor())]
    load_calib_amaxes(qs, "percentile", percentile=99.5)
    assert [q.calibrated_by for q in qs] == ["percentile-99.5", "max"]
    model = float_model()
    qdq.replace_modules(model)
    calibrate_weights(model, method="mse")
    assert {q.calibrated_by for n, q in qdq.quantizers(model) if "weight" in n} == {"mse"}


def test_summary_names_percentile_not_max_and_survives_save_restore(tmp_path):
    """The reproduction: descriptors say max, the call calibrates activations with
    histograms and percentile-99.9; the table must say percentile-99.9 for them."""
    model = float_model()
    qdq.replace_modules(model)
    calibrate(model, make_data(64, seed=1), method="histogram", amax_method="percentile",
              percentile=99.9, progress=False)
    rows = qdq.summary_rows(model)
    assert {r.calibrator for r in rows if r.role == "input"} == {"percentile-99.9"}
    assert {r.calibrator for r in rows if r.role == "weight"} == {"max"}
    assert all(q.descriptor.calib_method == "max" for _, q in qdq.quantizers(model))
    table = qdq.summary(model)
    assert "percentile-99.9" in table.splitlines()[2]
    path = tmp_path / "m.qdq.pt"
    qdq.save(model, path)
    restored = qdq.restore(float_model(), path)
    assert [r.calibrator for r in qdq.summary_rows(restored)] == [r.calibrator for r in rows]
    # a file that did not record it (written before the field existed) says so
    blob = torch.load(path, weights_only=True)
    for entry in blob["recipe"]["quantizers"]:
        entry.pop("calibrated_by", None)
    torch.save(blob, path)
    older = qdq.restore(float_model(), path)
    assert {r.calibrator for r in qdq.summary_rows(older)} == {"unknown"}
    fresh = float_model()
    qdq.replace_modules(fresh)
    assert {r.calibrator for r in qdq.summary_rows(fresh)} == {"(max)"}  # not run yet
