"""sweep(): baselines, ranking, resume, failures, report files, shared quantizers."""

import csv
import json
import math

import pytest
import torch
from torch import nn

import qdq
from qdqapp.evaluate import top1_accuracy
from sensitivity import SensitivityError, SensitivityReport, find_layers, sweep
from sensitivity.sweep import read_rows
from tests.sensitivity.conftest import sabotage

LAYERS = ["conv1", "conv2", "pool", "fc1", "fc2"]


def _states(model):
    return [(n, q.get_state()) for n, q in qdq.quantizers(model)]


def test_layers_are_named_exactly_and_toggle_together(qmodel):
    layers = find_layers(qmodel)
    assert [layer.name for layer in layers] == LAYERS
    conv2 = layers[1]
    assert conv2.quantizer_names == ("conv2._input_quantizer", "conv2._weight_quantizer")


@pytest.mark.parametrize("mode", ["leave-one-out", "one-at-a-time"])
def test_sabotaged_layer_ranks_first(qmodel, eval_fn, mode):
    sabotage(qmodel, "fc1")
    before = _states(qmodel)
    int8 = eval_fn(qmodel)
    with qdq.disable_quantization(qmodel):
        fp32 = eval_fn(qmodel)
    report = sweep(qmodel, eval_fn, mode=mode, progress=False)
    assert _states(qmodel) == before
    assert report.fp32 == fp32 and report.int8 == int8 and report.drop > 5
    ranked = report.ranked()
    assert ranked[0].layer == "fc1" and ranked[0].sensitivity > 5
    assert [r.layer for r in report.rows] == LAYERS
    # each row's metric is what that configuration really measures
    fc1 = qmodel.fc1
    if mode == "leave-one-out":
        with qdq.disable_quantization(fc1):
            assert ranked[0].metric == eval_fn(qmodel)
    else:
        with qdq.disable_quantization(qmodel), qdq.enable_quantization(fc1):
            assert ranked[0].metric == eval_fn(qmodel)


def test_layer_subset_and_unknown_name(qmodel, eval_fn):
    report = sweep(qmodel, eval_fn, layers=["fc2", "conv1"], progress=False)
    assert [r.layer for r in report.rows] == ["fc2", "conv1"]
    with pytest.raises(SensitivityError, match=r"layer 'conv3' does not exist.*conv1"):
        sweep(qmodel, eval_fn, layers=["conv3"], progress=False)


class _Stop(KeyboardInterrupt):
    pass


def test_interrupted_sweep_resumes_without_remeasuring(qmodel, eval_fn, tmp_path):
    rows = tmp_path / "rows.jsonl"
    calls = []

    def dying(m):
        if len(calls) == 4:
            raise _Stop
        calls.append(1)
        return eval_fn(m)

    with pytest.raises(_Stop):
        sweep(qmodel, dying, resume=rows, progress=False)
    saved = read_rows(rows)
    assert saved[0]["kind"] == "meta" and len(saved) == 1 + 4  # meta + 2 baselines + 2 layers
    # a crash in the middle of writing a line leaves half a line: it is ignored
    with open(rows, "a") as fh:
        fh.write('{"task": "fc1", "metr')
    counted = []
    report = sweep(qmodel, lambda m: counted.append(1) or eval_fn(m), resume=rows,
                   progress=False)
    assert len(counted) == len(LAYERS) + 2 - 4
    full = sweep(qmodel, eval_fn, progress=False)
    assert [(r.layer, r.metric) for r in report.ranked()] == \
        [(r.layer, r.metric) for r in full.ranked()]
    tasks = [r["task"] for r in read_rows(rows) if "task" in r]
    assert sorted(tasks) == sorted(["fp32", "int8", *LAYERS])
    with pytest.raises(SensitivityError, match="holds a leave-one-out sweep"):
        sweep(qmodel, eval_fn, mode="one-at-a-time", resume=rows, progress=False)


@pytest.mark.parametrize("failure", ["raise", "nan"])
def test_failing_layer_is_marked_and_the_sweep_goes_on(qmodel, eval_fn, failure, tmp_path):
    def flaky(m):
        if not m.conv2._input_quantizer.is_enabled and m.fc1._input_quantizer.is_enabled:
            if failure == "raise":
                raise RuntimeError("out of memory")
            return float("nan")
        return eval_fn(m)

    report = sweep(qmodel, flaky, resume=tmp_path / "rows.jsonl", progress=False)
    bad = {r.layer: r for r in report.rows if not r.ok}
    assert list(bad) == ["conv2"]
    assert ("RuntimeError: out of memory" if failure == "raise" else "returned nan") \
        in bad["conv2"].error
    assert all(r.metric is not None for r in report.rows if r.layer != "conv2")
    assert report.ranked()[-1].layer == "conv2"
    # a failed row is measured again on resume
    again = sweep(qmodel, eval_fn, resume=tmp_path / "rows.jsonl", progress=False)
    assert not again.failed


def test_failing_baseline_raises_naming_it(qmodel, eval_fn):
    def no_float(m):
        if not m.conv1._input_quantizer.is_enabled and not m.fc2._input_quantizer.is_enabled:
            raise ValueError("bad")
        return eval_fn(m)

    with pytest.raises(SensitivityError, match=r"FP32 baseline failed \(eval_fn raised "
                                               r"ValueError: bad\)"):
        sweep(qmodel, no_float, progress=False)


def test_no_quantizers(eval_fn):
    from tests.sensitivity.models import float_model

    with pytest.raises(SensitivityError, match="no enabled quantizers"):
        sweep(float_model(), eval_fn, progress=False)


def test_report_files(qmodel, eval_fn, tmp_path):
    sabotage(qmodel, "conv2")
    report = sweep(qmodel, eval_fn, progress=False)
    out = report.write(tmp_path / "report")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["report.md", "rows.jsonl", "sensitivity.csv", "sensitivity.json",
                     "sensitivity.png", "skip_layers.txt"]
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(out / "sensitivity.png")
    assert img.shape[0] > 100 and img.shape[1] > 500
    table = list(csv.DictReader((out / "sensitivity.csv").open()))
    assert [r["layer"] for r in table] == [r.layer for r in report.ranked()]
    assert table[0]["layer"] == "conv2"
    loaded = SensitivityReport.load(out)
    assert loaded.to_dict() == json.loads(json.dumps(report.to_dict()))
    md = (out / "report.md").read_text()
    assert "| 1 | `conv2` |" in md and f"{report.fp32:.4f}" in md
    # a sweep that ranks something: no warning; every report says where it came from
    assert report.warnings == [] and "Warning" not in md and "WARNING" not in str(report)
    made = loaded.provenance
    assert made["qdq"] == qdq.__version__ and made["torch"] == torch.__version__
    assert made["device"] == "cpu" and made["date"].endswith("Z") and made["command"]
    assert all(type(v) is str for v in made.values())   # plain values: torch.load reads them
    assert f"with qdq {qdq.__version__}, torch {torch.__version__}" in md.splitlines()[-1]
    assert report.quantized == "INT8" and "| INT8 (all quantizers on) |" in md
    skip = [line for line in (out / "skip_layers.txt").read_text().splitlines()
            if not line.startswith("#")]
    assert skip[0] == "conv2"
    # rows.jsonl is the sweep's record: resuming from it measures nothing again
    assert len(read_rows(out / "rows.jsonl")) == 1 + 2 + len(LAYERS)
    calls = []
    again = sweep(qmodel, lambda m: calls.append(1) or eval_fn(m), resume=out / "rows.jsonl",
                  progress=False)
    assert calls == [] and again.ranked_layers() == report.ranked_layers()


def test_a_sweep_that_cannot_tell_layers_apart_says_so(tmp_path):
    """What ``qdq sensitivity --help``'s random-weights example did: the FP32 model puts
    every input in one class, so every layer measures 100% agreement and the ranking is
    noise. The report leads with a warning, everywhere it is shown."""
    from qdqapp.evaluate import labelled_by_model
    from tests.sensitivity.models import float_model, make_data

    model = float_model()
    with torch.no_grad():
        model.fc2.bias.copy_(torch.tensor([1e4, 0.0, 0.0, 0.0]))  # always class 0
    qdq.replace_modules(model)
    from sensitivity import calibrate

    calibrate(model, make_data(64, seed=2), progress=False)
    batches = labelled_by_model(model, [x for x, _ in make_data(64, seed=3)])
    report = sweep(model, lambda m: top1_accuracy(m, batches), progress=False,
                   resolution=100 / 64, metric_name="agreement (%)")
    assert {r.metric for r in report.rows} == {100.0} == {report.fp32, report.int8}
    assert report.warnings == [
        "the metric cannot tell the layers apart: all 5 layers measure agreement (%) "
        "100.0000, as do FP32 and INT8 (the metric's resolution is 1.5625), so their order "
        "is noise"]
    report.extra_warnings.append("the FP32 model predicts class 0 for every input")
    out = report.write(tmp_path)
    md = (out / "report.md").read_text()
    assert md.splitlines()[2].startswith("> **Warning:** the metric cannot tell the layers")
    assert "> **Warning:** the FP32 model predicts class 0" in md
    assert "> **What to do:** measure a model with trained weights" in md
    assert json.loads((out / "sensitivity.json").read_text())["warnings"] == report.warnings
    assert SensitivityReport.load(out).warnings == report.warnings
    assert str(report).splitlines()[-3].startswith("WARNING: the metric cannot tell")


def _report(metrics: list[float], resolution: float | None) -> SensitivityReport:
    """A leave-one-out report at INT8 = 100, FP32 = 99 whose layers measure ``metrics``."""
    from sensitivity.report import LayerRow

    rows = [LayerRow(f"l{i}", m, m - 100.0, m - 100.0) for i, m in enumerate(metrics)]
    return SensitivityReport("leave-one-out", 99.0, 100.0, rows, resolution=resolution)


@pytest.mark.parametrize("metrics, resolution, warns", [
    ([100.0, 100.0, 100.0], None, True),                 # all equal
    ([100.0, 98.4375, 100.0], 1.5625, True),             # one sample apart at most
    ([100.0, 98.4375, 100.0], None, False),              # without the step it counts
    ([100.0, 96.875, 98.4375], 1.5625, False),           # two samples: a ranking
    # the demo: INT8 above FP32, no layer gains in float, the layers still differ
    ([100.0, 99.97, 99.95, 99.99], 0.01, False),
])
def test_layers_within_the_resolution_cannot_be_told_apart(metrics, resolution, warns):
    report = _report(metrics, resolution)
    assert bool(report.warnings) is warns, report.warnings
    if warns:
        assert report.warnings[0].startswith("the metric cannot tell the layers apart: all "
                                             "3 layers measure metric ")
        assert report.warnings[0].endswith("so their order is noise")


class _SharedNet(nn.Module):
    """Two pools that share one quantizer (as a shared-scale placement rule makes)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool_a = nn.MaxPool2d(2)
        self.pool_b = nn.MaxPool2d(2)
        self.fc = nn.Linear(9, 4)

    def forward(self, x):
        a = self.pool_a(self.conv(x))
        b = self.pool_b(torch.relu(self.conv(x)))
        return self.fc(torch.cat([a, b], 1).mean(1).flatten(1))


def test_shared_quantizer_makes_one_layer(tmp_path):
    from sensitivity import calibrate

    torch.manual_seed(0)
    model = _SharedNet().eval()
    qdq.replace_modules(model)
    model.pool_b._input_quantizer = model.pool_a._input_quantizer
    qdq.name_quantizers(model)
    data = [(torch.randn(8, 1, 6, 6), torch.randint(0, 4, (8,))) for _ in range(2)]
    calibrate(model, data, progress=False)
    layers = {layer.name: layer for layer in find_layers(model)}
    assert set(layers) == {"conv", "pool_a", "fc"}
    assert layers["pool_a"].members == ("pool_a", "pool_b")
    assert len(layers["pool_a"].quantizers) == 1
    report = sweep(model, lambda m: top1_accuracy(m, data), layers=["pool_b"], progress=False)
    assert [r.layer for r in report.rows] == ["pool_a"]
    assert report.rows[0].members == ["pool_a", "pool_b"]
    assert math.isfinite(report.rows[0].metric)


def test_an_fp8_model_is_reported_as_fp8(qmodel, eval_fn):
    qdq.set_format(qmodel, "fp8")
    report = sweep(qmodel, eval_fn, progress=False)
    assert report.quantized == "FP8"
    assert "| FP8 (all quantizers on) |" in report.markdown() and "INT8" not in str(report)


FULL_DISK = """
import resource, sys
from qdqapp.evaluate import top1_accuracy
from sensitivity import sweep
from tests.sensitivity.conftest import make_data, quantized_model
data = make_data(256, seed=3, batch=64)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
sweep(quantized_model(), lambda m: top1_accuracy(m, data), resume=sys.argv[1], progress=False)
"""


def test_a_full_disk_names_the_row_log_and_keeps_whole_rows(qmodel, eval_fn, tmp_path):
    """A file-size limit stands in for a full disk: the sweep stops with one error naming
    rows.jsonl, the rows written before stay whole, and a resume finishes the sweep."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    rows = tmp_path / "rows.jsonl"
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(rows), "1200"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sensitivity.errors.SensitivityError: cannot write {rows}: "
                           "the file reached the file-size limit"), done.stderr[-2000:]
    text = rows.read_text()
    assert text.endswith("\n") and 0 < rows.stat().st_size <= 1200
    kept = read_rows(rows)
    assert len(kept) == text.count("\n") >= 2  # meta and at least one measured row
    report = sweep(qmodel, eval_fn, resume=rows, progress=False)
    full = sweep(qmodel, eval_fn, progress=False)
    assert [(r.layer, r.metric) for r in report.ranked()] == \
        [(r.layer, r.metric) for r in full.ranked()]
