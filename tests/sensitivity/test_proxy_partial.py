"""proxy_ranking() and partial_quantize() on a small trained CNN."""

import json
import math
import random

import pytest
import torch

import qdq
from sensitivity import SensitivityError, partial_quantize, proxy_ranking, spearman, sweep
from tests.sensitivity.conftest import sabotage
from tests.sensitivity.models import make_data


def _states(model):
    return [(n, q.get_state()) for n, q in qdq.quantizers(model)]


def test_proxy_finds_the_sabotaged_layer_and_measures_real_sqnr(qmodel, tmp_path):
    sabotage(qmodel, "conv2")
    before = _states(qmodel)
    data = make_data(64, seed=4)
    proxy = proxy_ranking(qmodel, data, num_batches=2, progress=False)
    assert _states(qmodel) == before
    assert proxy.ranking()[0] == "conv2" and proxy.num_batches == 2
    # fc2's SQNR, recomputed by hand from the same inputs
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        h = qmodel.pool(torch.relu(qmodel.conv2(torch.relu(qmodel.conv1(x))))).flatten(1)
        h = torch.relu(qmodel.fc1(h))
        y_q = qmodel.fc2(h)
        with qdq.disable_quantization(qmodel.fc2):
            y_f = qmodel.fc2(h)
    expected = 10 * math.log10(float((y_f.double() ** 2).sum())
                               / float(((y_q - y_f).double() ** 2).sum()))
    row = {r.layer: r for r in proxy.rows}["fc2"]
    assert row.sqnr_db == pytest.approx(expected, rel=1e-6)
    assert row.mse == pytest.approx(float(((y_q - y_f).double() ** 2).mean()), rel=1e-6)
    out = proxy.write(tmp_path)
    assert (out / "proxy.json").is_file() and "`conv2`" in (out / "proxy.md").read_text()
    assert json.loads((out / "proxy.json").read_text())["provenance"]["device"] == "cpu"
    assert (out / "proxy.md").read_text().splitlines()[-1].startswith("Made ")


def test_proxy_agrees_with_the_sweep_on_a_clear_case(qmodel, eval_fn):
    sabotage(qmodel, "fc1", 0.05)
    sabotage(qmodel, "conv1", 0.2)
    report = sweep(qmodel, eval_fn, progress=False)
    proxy = proxy_ranking(qmodel, make_data(64, seed=4), progress=False)
    exact = {r.layer: r.sensitivity for r in report.rows}
    assert spearman(proxy.scores(), exact) > 0
    assert proxy.ranking()[0] in ("fc1", "conv1")


def test_proxy_bad_input(qmodel):
    with pytest.raises(SensitivityError, match="proxy data is empty"):
        proxy_ranking(qmodel, [], progress=False)
    with pytest.raises(SensitivityError, match="layer 'nope'"):
        proxy_ranking(qmodel, make_data(32, seed=4), layers=["nope"], progress=False)


def test_spearman():
    rng = random.Random(0)
    a = {f"l{i}": rng.random() for i in range(20)}
    b = {k: v + 0.3 * rng.random() for k, v in a.items()}
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, {k: -v for k, v in a.items()}) == pytest.approx(-1.0)
    # without ties it equals 1 - 6 sum d^2 / (n (n^2 - 1))
    order_a = sorted(a, key=a.get)
    order_b = sorted(b, key=b.get)
    d2 = sum((order_a.index(k) - order_b.index(k)) ** 2 for k in a)
    n = len(a)
    assert spearman(a, b) == pytest.approx(1 - 6 * d2 / (n * (n * n - 1)))
    assert spearman({"x": 1, "y": 1, "z": 2}, {"x": 1, "y": 2, "z": 3}) == \
        pytest.approx(math.sqrt(3) / 2)


def test_partial_quantize_meets_a_measured_target(qmodel, eval_fn, tmp_path):
    sabotage(qmodel, "fc1")
    report = sweep(qmodel, eval_fn, progress=False)
    result = partial_quantize(qmodel, report, eval_fn, max_drop=3.0)
    assert result.met and result.skip[0] == "fc1"
    assert result.metric >= report.fp32 - 3.0
    assert result.metric == eval_fn(qmodel)  # the model is left as measured
    assert not qmodel.fc1._input_quantizer.is_enabled
    assert result.history[0] == (0, report.int8) and len(result.history) == len(result.skip) + 1
    report.write(tmp_path)
    skip = (tmp_path / "skip_layers.txt").read_text().splitlines()
    assert skip[0].startswith("# measured") and skip[1:] == result.skip


def test_partial_quantize_top_k_and_unreachable_target(qmodel, eval_fn):
    sabotage(qmodel, "conv2")
    report = sweep(qmodel, eval_fn, progress=False)
    result = partial_quantize(qmodel, report, eval_fn, top_k=1)
    assert result.skip == ["conv2"] and result.metric == eval_fn(qmodel)
    qdq.enable_quantization(qmodel).apply()
    result = partial_quantize(qmodel, report, eval_fn, target=101.0)
    assert not result.met and len(result.skip) == len(report.rows)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of max_drop, target, top_k"),
    ({"max_drop": 1.0, "top_k": 2}, "exactly one of"),
    ({"max_drop": -1.0}, "max_drop must not be negative"),
])
def test_partial_quantize_bad_input(qmodel, eval_fn, kwargs, message):
    report = sweep(qmodel, eval_fn, layers=["fc2"], progress=False)
    with pytest.raises(SensitivityError, match=message):
        partial_quantize(qmodel, report, eval_fn, **kwargs)
