"""``--format`` through the commands: one quantized-model file per format through calibrate
-> export -> verify -> summary on a small torchvision-like model, and ``qdq run`` per format
on the reference model with a few batches (the weight-only formats skip, with the reason,
what has no meaning for them)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

import qdq
from qdq.checkpoint import read
from qdqapp.data import DEFAULT_ROOT
from tests.qdqapp.cli import listing
from tests.qdqapp.cli import qdq as cli
from tests.qdqapp.models import TinyCNN

TINY = "tests.qdqapp.models:tiny_cnn"
DATA = "random:4x3x16x16"
FAST = ["--batch-size", "64", "--calib-batches", "2", "--eval-batches", "3"]
needs_data = pytest.mark.skipif(not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="dataset-fashion-mnist is not installed")

#: format -> (options, title printed by export, opset)
FORMATS = {
    "int8": ([], "INT8 Q/DQ", 13),
    "fp8": (["--calibrator", "mse"], "FP8 E4M3 Q/DQ", 19),
    "w8": (["--weight-method", "mse"], "INT8 weight-only", 13),
    "w4": (["--block-size", "8", "--ignore", "conv1"], "INT4 weight-only", 21),
}


def _initializer_types(model: onnx.ModelProto) -> dict[str, int]:
    return {i.name: i.data_type for i in model.graph.initializer}


def _zero_point_types(model: onnx.ModelProto) -> set[int]:
    """Element types of the zero points of every Q/DQ node (initializers or Constants)."""
    types = _initializer_types(model)
    for node in model.graph.node:
        if node.op_type == "Constant":
            types[node.output[0]] = node.attribute[0].t.data_type
    return {types[n.input[2]] for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_one_file_per_format_through_the_commands(tmp_path, fmt):
    options, title, opset = FORMATS[fmt]
    cal = tmp_path / "cal"
    out = cli("calibrate", TINY, "--data", DATA, "--calib-batches", "1", "--format", fmt,
              *options, "--out", cal, "--quiet")
    assert out.code == 0, out.err
    quantized = cal / "quantized.pt"
    blob = read(quantized)
    assert blob["recipe"]["format"] == fmt and blob["metadata"]["format"] == fmt
    record = json.loads((cal / "calibration.json").read_text())
    assert record["format"] == fmt
    weight_only = fmt in ("w8", "w4")
    layers = ["conv2", "fc"] if fmt == "w4" else ["conv1", "conv2", "fc"]  # w4: conv1 float
    if weight_only:  # nothing calibrated: the table lists the integer weights
        assert record["quantizers"] == [] and record["calibrator"] is None
        assert [r["name"] for r in record["weights"]] == [f"{n}.weight_q" for n in layers]
        assert {r["block_size"] for r in record["weights"]} == \
            ({8} if fmt == "w4" else {None})
        assert "conv2.weight_q" in (cal / "calibration.txt").read_text()
    else:
        assert all(q["amax_max"] is not None for q in record["quantizers"]
                   if q["state"] != "off")
        assert {q["bits"] if isinstance(q["bits"], int) else tuple(q["bits"])
                for q in record["quantizers"]} == {8 if fmt == "int8" else (4, 3)}

    onnx_path = tmp_path / "model.onnx"
    out = cli("export", TINY, "--checkpoint", quantized, "--out", onnx_path, "--quiet")
    assert out.code == 0, out.err
    assert f"({title}, opset {opset}," in out.out and " MB" in out.out
    size = onnx_path.stat().st_size
    assert f"format: {title}" in out.out and f"; {size / 1e6:.2f} MB, " in out.out
    model = onnx.load(str(onnx_path))
    ops = [n.op_type for n in model.graph.node]
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == opset
    if weight_only:
        assert "QuantizeLinear" not in ops and ops.count("DequantizeLinear") == len(layers)
        assert "x smaller than with FP32 weights" in out.out
        codes = {_initializer_types(model)[n.input[0]] for n in model.graph.node
                 if n.op_type == "DequantizeLinear"}
        assert codes == {TensorProto.INT4 if fmt == "w4" else TensorProto.INT8}
    else:
        assert ops.count("QuantizeLinear") >= 3
        assert _zero_point_types(model) == {TensorProto.FLOAT8E4M3FN if fmt == "fp8"
                                            else TensorProto.INT8}

    out = cli("verify", TINY, onnx_path, "--checkpoint", quantized, "--data", DATA,
              "--batch", "4", "--quiet")
    assert out.code == 0, out.out + out.err
    assert "OK: same function" in out.out

    out = cli("summary", TINY, "--checkpoint", quantized, "--quiet")
    assert out.code == 0, out.err
    assert out.out.rstrip().splitlines()[-1].startswith(f"format: {title}")
    # the file restored by hand: the format, and ONNX Runtime computes the same function
    restored = qdq.restore(TinyCNN().eval(), quantized)
    assert qdq.format_of(restored) == fmt
    if weight_only:
        import onnxruntime as ort

        x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, restored(x).numpy(), rtol=1e-5, atol=1e-5)


def test_block_size_error_suggests_every_layer_to_ignore():
    """The --ignore flags the error suggests are complete: pasted as they are, the same
    command goes through (they used to stop after six layers, "and 1 more")."""
    import re
    import shlex

    args = ["summary", "torchvision:resnet18", "--format", "w4", "--block-size", "128"]
    refused = cli(*args)
    assert refused.code == 2
    flags = re.search(r"in float \((--ignore [^)]*)\)", refused.err).group(1)
    assert shlex.split(flags).count("--ignore") == 7
    assert "--ignore layer2.0.downsample.0" in flags      # the seventh, left out before
    fixed = cli(*args, *shlex.split(flags), "--quiet")
    assert fixed.code == 0, fixed.err


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_data_driven_weight_methods_through_the_commands(tmp_path, method):
    """--weight-method gptq/awq quantize the weights from the calibration batches; the file
    records the method, export and verify need no data for it, summary names it."""
    flags = ["--format", "w4", "--block-size", "8", "--ignore", "conv1",
             "--weight-method", method]
    cal = tmp_path / "cal"
    out = cli("calibrate", TINY, "--data", DATA, "--calib-batches", "2", *flags, "--out", cal,
              "--quiet")
    assert out.code == 0, out.err
    blob = read(cal / "quantized.pt")
    assert blob["metadata"]["weight_method"] == method
    onnx_path = tmp_path / "m.onnx"
    out = cli("export", TINY, "--checkpoint", cal / "quantized.pt", "--out", onnx_path,
              "--quiet")
    assert out.code == 0, out.err
    assert f"INT4 weight-only (block 8, {method.upper()})" in out.out
    out = cli("verify", TINY, onnx_path, "--checkpoint", cal / "quantized.pt", "--data", DATA,
              "--quiet")
    assert out.code == 0 and "OK: same function" in out.out, out.out + out.err
    # the same flags on the float model give the same weights as the file
    direct = tmp_path / "direct.onnx"
    assert cli("export", TINY, "--data", DATA, "--calib-batches", "2", *flags, "--out", direct,
               "--quiet").code == 0
    a, b = ({i.name: numpy_helper.to_array(i) for i in onnx.load(str(p)).graph.initializer}
            for p in (direct, onnx_path))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_the_same_flags_make_the_same_weights_in_export_and_calibrate(tmp_path):
    """export quantizes a float model in the format itself; its integer weights and scales
    equal those of the file calibrate wrote from the same flags."""
    flags = ["--format", "w4", "--block-size", "8", "--ignore", "conv1", "--weight-method",
             "mse", "--seed", "3"]
    direct = tmp_path / "direct.onnx"
    out = cli("export", TINY, "--data", DATA, *flags, "--out", direct, "--quiet")
    assert out.code == 0, out.err
    assert cli("calibrate", TINY, "--data", DATA, *flags, "--out", tmp_path / "cal",
               "--quiet").code == 0
    via_file = tmp_path / "via_file.onnx"
    out = cli("export", TINY, "--checkpoint", tmp_path / "cal" / "quantized.pt", "--out",
              via_file, "--quiet")
    assert out.code == 0, out.err
    a, b = (onnx.load(str(p)) for p in (direct, via_file))
    arrays = [{i.name: numpy_helper.to_array(i) for i in m.graph.initializer} for m in (a, b)]
    assert arrays[0].keys() == arrays[1].keys()
    for name, value in arrays[0].items():
        np.testing.assert_array_equal(value, arrays[1][name], err_msg=name)
    assert any(str(v.dtype) == "int4" for v in arrays[0].values())


def test_sensitivity_sweeps_fp8_quantizers(tmp_path):
    out = cli("sensitivity", TINY, "--data", DATA, "--format", "fp8", "--calibrator",
              "percentile-99.9", "--eval-batches", "1", "--out", tmp_path / "s", "--quiet")
    assert out.code == 0, out.err
    report = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert {"conv1", "conv2", "fc"} <= {r["layer"] for r in report["rows"]}
    record = json.loads((tmp_path / "s" / "calibration.json").read_text())
    assert record["format"] == "fp8"
    assert all(q["bits"] == [4, 3] for q in record["quantizers"])


def _float_top1(batches: int) -> float:
    """Top-1 (%) of the float reference model on the first ``batches`` test batches of 64."""
    import itertools

    from qdqapp.models import build_model
    from qdqapp.sources import DataOptions, open_data

    model = build_model("reference", 0)
    source = open_data("fashion-mnist", DataOptions(batch_size=64, eval_batches=batches))
    correct = total = 0
    with torch.no_grad():
        for x, y in itertools.islice(source.eval(), batches):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


@needs_data
@pytest.mark.parametrize("fmt", ["fp8", "w8", "w4"])
def test_run_per_format_on_the_reference_model(tmp_path, fmt):
    out = tmp_path / fmt
    extra = {"fp8": ["--calibrator", "max", "--sweep", "none"], "w8": [],
             "w4": ["--block-size", "32", "--ignore", "stem.0.0"]}[fmt]
    result = cli("run", "--format", fmt, *extra, *FAST, "--out", out)
    # INT4 conv weights run in ONNX Runtime, not in TensorRT: the lint's errors fail the run
    assert result.code == (1 if fmt == "w4" else 0), result.err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == ("FAILED" if fmt == "w4" else "ok")
    assert summary["format"] == fmt
    if fmt == "w4":
        lint = json.loads((out / "lint.json").read_text())
        convs = {f["node"] for f in lint if f["rule"] == "int4-conv"}
        assert len(convs) == 7 and all(node.endswith("/Conv") for node in convs)
        assert summary["failed_checks"] == ["Q/DQ lint found 7 errors (lint.json)"]
    assert summary["onnx_bytes"] == (out / "model.onnx").stat().st_size
    assert summary["onnx_fp32_bytes"] > 0
    assert summary["compression"] == pytest.approx(
        summary["onnx_fp32_bytes"] / summary["onnx_bytes"], rel=1e-3)
    assert 0 < summary["quantized_metric"] <= 100
    table = result.out
    name = fmt.upper()
    assert f"{name} metric (all layers)" in table and f"final {name} metric" in table
    assert f"model.onnx, opset {summary['onnx_opset']}, " in table
    report = (out / "report.md").read_text()
    assert summary["format_title"] in report.splitlines()[0]
    state = json.loads((out / "state.json").read_text())["stages"]
    if fmt == "fp8":
        assert summary["onnx_opset"] == 19 and summary["calibrator"] == "max"
        assert state["calibrate"]["status"] == "done"
        return
    assert summary["compression"] > (5 if fmt == "w4" else 3)
    assert summary["format_title"] == ("INT8 weight-only (per channel, amax max)" if fmt == "w8"
                                       else "INT4 weight-only (block 32, amax max)")
    for stage in ("calibrate", "layers", "sweep", "partial"):
        assert state[stage]["status"] == "skipped", stage
        assert state[stage]["result"]["reason"].startswith(f"{fmt} is weight-only: "), stage
    assert "## Calibration\n\nskipped: " + fmt + " is weight-only" in report
    assert state["fp32"]["status"] == "done" and state["int8"]["status"] == "done"
    # the FP32 baseline ran on the float model (the same images, counted here by hand)
    assert summary["fp32_metric"] == pytest.approx(_float_top1(3), abs=1e-9)
    check = json.loads((out / "onnx_check.json").read_text())
    assert check["ok"] and check["ort_metric"] == pytest.approx(summary["quantized_metric"])
    from qdqapp.reference import build_reference_model

    restored = qdq.restore(build_reference_model().eval(), out / "quantized.pt")
    assert qdq.format_of(restored) == fmt


@needs_data
def test_a_resumed_weight_only_run_rebuilds_its_float_baseline(tmp_path):
    out = tmp_path / "w8"
    args = ["run", "--format", "w8", *FAST, "--out", out, "--quiet"]
    first = cli(*args)
    assert first.code == 0, first.err[-3000:]
    before = json.loads((out / "summary.json").read_text())
    state_path = out / "state.json"
    state = json.loads(state_path.read_text())
    for name in ("fp32", "int8", "export", "lint", "onnx_check"):
        state["stages"].pop(name)
    state_path.write_text(json.dumps(state))
    again = cli(*args[:-1])
    assert again.code == 0, again.err[-3000:]
    assert f"resumed: restored {out / 'quantized.pt'}" in again.err
    after = json.loads((out / "summary.json").read_text())
    for key in ("fp32_metric", "quantized_metric", "onnx_bytes", "compression",
                "format_title"):
        assert after[key] == before[key], key


def test_run_takes_a_weight_only_file_and_keeps_its_format(tmp_path):
    cal = cli("calibrate", TINY, "--data", DATA, "--format", "w4", "--out", tmp_path / "cal",
              "--quiet")
    assert cal.code == 0, cal.err
    run_dir = tmp_path / "r"
    result = cli("run", "--model", TINY, "--data", DATA, "--checkpoint",
                 tmp_path / "cal" / "quantized.pt", "--out", run_dir, "--quiet")
    assert result.code == 1, result.err[-3000:]   # its two INT4 convs fail the lint
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["format"] == "w4" and summary["onnx_opset"] == 21
    assert summary["failed_checks"] == ["Q/DQ lint found 2 errors (lint.json)"]
    assert "INT4 weight-only (per channel, amax max)" in result.out
    state = json.loads((run_dir / "state.json").read_text())["stages"]
    assert state["calibrate"]["status"] == "skipped"
    # the same file with another --format is refused before anything is written
    refused = cli("run", "--model", TINY, "--data", DATA, "--checkpoint",
                  tmp_path / "cal" / "quantized.pt", "--format", "fp8", "--out",
                  tmp_path / "r2")
    assert refused.code == 2 and "holds a model in format w4" in refused.err
    assert "r2" not in listing(tmp_path)


def test_default_calibrators_suit_the_format():
    from qdqapp.calibrators import DEFAULT_COMPARISON
    from qdqapp.formats import FormatChoice, default_calibrators

    assert default_calibrators(FormatChoice("int8")) == list(DEFAULT_COMPARISON)
    assert default_calibrators(FormatChoice("fp8")) == [
        n for n in DEFAULT_COMPARISON if n != "entropy"]
    assert default_calibrators(FormatChoice("w4", 32)) == []
