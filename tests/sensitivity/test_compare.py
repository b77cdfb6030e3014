"""compare_calibrators(): histograms once, every method evaluated, the best kept."""

import pytest

import qdq
from sensitivity import SensitivityError, calibrate, compare_calibrators
from sensitivity.compare import DEFAULT_METHODS, parse_method
from tests.sensitivity.models import float_model, make_data


def _fresh():
    model = float_model()
    qdq.replace_modules(model)
    return model


def test_every_method_is_evaluated_and_the_best_stays_loaded(eval_fn):
    model = _fresh()
    calls = []

    def forward_fn(m, batch):
        calls.append(1)
        return m(batch[0])

    data = make_data(128, seed=5)
    table = compare_calibrators(model, data, eval_fn, forward_fn=forward_fn, progress=False)
    assert len(calls) == len(data)  # the data ran once, not once per method
    assert [r.method for r in table.rows] == list(DEFAULT_METHODS)
    assert all(r.metric is not None and r.error is None for r in table.rows)
    best = max(table.rows, key=lambda r: r.metric)
    assert table.best == best.method
    assert eval_fn(model) == best.metric  # what is loaded is what was measured
    with qdq.disable_quantization(model):
        assert table.fp32 == eval_fn(model)
    # the amax of each method orders as the methods do
    a = {m: table.amax[m]["conv1._input_quantizer"][0] for m in DEFAULT_METHODS}
    assert a["max"] >= a["percentile-99.999"] >= a["percentile-99.99"] >= a["percentile-99.9"]
    x_max = max(float(b[0].abs().max()) for b in data)
    assert a["max"] == pytest.approx(x_max)
    # weights are per-channel max whatever the method
    w = model.conv1.weight.detach().abs().amax(dim=(1, 2, 3))
    assert model.conv1._weight_quantizer.amax.flatten().tolist() == pytest.approx(w.tolist())
    md = table.markdown()
    assert "best (loaded)" in md and "percentile-99.99" in md
    # every quantizer names the search whose amax it holds: the best, max for weights
    found = {n: q.calibrated_by for n, q in qdq.quantizers(model)}
    assert found["conv1._input_quantizer"] == table.best
    assert found["conv1._weight_quantizer"] == "max"


def test_histogram_calibration_equals_the_comparison_row(eval_fn):
    """calibrate(method='histogram', amax_method=...) gives the amax compare measured."""
    data = make_data(128, seed=5)
    table = compare_calibrators(_fresh(), data, eval_fn, methods=["entropy", "mse"],
                                progress=False)
    for method in ("entropy", "mse"):
        model = _fresh()
        calibrate(model, data, method="histogram", amax_method=method, progress=False)
        got = {n: q.amax.flatten().tolist() for n, q in qdq.quantizers(model)}
        for name, values in table.amax[method].items():
            assert got[name] == pytest.approx(values), (method, name)
        assert eval_fn(model) == next(r.metric for r in table.rows if r.method == method)


def test_the_comparison_leaves_every_calibrator_as_it_was(eval_fn):
    model = _fresh()
    before = [(n, q.descriptor, id(q.calibrator)) for n, q in qdq.quantizers(model)]
    compare_calibrators(model, make_data(64, seed=5), eval_fn, methods=["entropy", "max"],
                        progress=False)
    assert [(n, q.descriptor, id(q.calibrator)) for n, q in qdq.quantizers(model)] == before
    assert parse_method("percentile-99.9") == ("percentile", {"percentile": 99.9})
    assert DEFAULT_METHODS == qdq.calib.DEFAULT_CHOICES


def test_bad_input(eval_fn):
    with pytest.raises(SensitivityError, match="calibration method 'percentile-101'"):
        compare_calibrators(_fresh(), make_data(32, seed=5), eval_fn, methods=["percentile-101"])
    with pytest.raises(SensitivityError, match="calibration method 'kl'"):
        parse_method("kl")

    def broken(m):
        raise RuntimeError("no GPU")

    with pytest.raises(SensitivityError, match="every calibration method failed.*no GPU"):
        compare_calibrators(_fresh(), make_data(32, seed=5), broken, methods=["max", "mse"],
                            progress=False)


def test_the_table_prints_percentages_with_two_decimals_and_fractions_with_four():
    from sensitivity.compare import CalibratorComparison, MethodRow

    def table(*values):
        return CalibratorComparison(rows=[MethodRow(f"m{i}", v) for i, v in enumerate(values)],
                               best="m0", fp32=values[0], metric_name="metric")

    assert "| m1 | 91.81 |" in table(91.78, 91.8149).markdown()
    assert "| m1 | 0.9950 |" in table(1.0, 0.99504).markdown()
