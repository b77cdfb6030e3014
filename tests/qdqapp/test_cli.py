"""The qdq command: help, summary, the seams between commands (build, --compare, --dynamo,
segmentation and auxiliary-head models)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import qdqapp.cli as qdq_cli
from qdqapp.outputs import MARKER, owner_of
from tests.qdqapp.cli import qdq, qdq_process

COMMANDS = sorted(p.stem[4:] for p in Path(qdq_cli.__file__).parent.glob("cmd_*.py"))
TINY = "tests.qdqapp.models:tiny_cnn"


def test_help_lists_commands_in_a_subprocess():
    out = qdq_process("--help")
    assert out.code == 0 and all(command in out.out for command in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command):
    out = qdq(command, "--help")
    assert out.code == 0, out.err
    assert "examples:" in out.out and f"qdq {command}" in out.out
    assert "--quiet" in out.out and "--debug" in out.out


def test_model_commands_spell_the_shared_options_alike():
    for command in ("calibrate", "sensitivity", "export", "verify", "summary"):
        text = qdq(command, "--help").out
        for option in ("--checkpoint", "--no-rules", "--ignore", "--seed", "--data",
                       "--calibrator", "--device"):
            assert option in text, (command, option)
    assert "--no-rules" in qdq("run", "--help").out and "--seed" in qdq("run", "--help").out


def test_summary_calibrated_json_with_ignore():
    out = qdq("summary", "torchvision:resnet18", "--calibrate", "--data", "random:1x3x32x32",
              "--calib-batches", "1", "--json", "--ignore", "fc", "--quiet")
    assert out.code == 0, out.err
    rows = json.loads(out.out)
    assert rows[0]["module"] == "conv1" and rows[0]["amax_max"] > 0
    assert not any(r["module"] == "fc" for r in rows)


def test_summary_shows_the_rules_by_default_and_not_with_no_rules():
    ruled = qdq("summary", TINY, "--rules", "--data", "random:1x3x8x8")
    assert ruled.code == 0, ruled.err
    assert "residual_add" in ruled.out and "placement rules: residual_add 1" in ruled.out
    assert "1 BatchNorm folded" in ruled.out
    assert qdq("summary", TINY, "--data", "random:1x3x8x8").out == ruled.out
    plain = qdq("summary", TINY, "--no-rules", "--data", "random:1x3x8x8")
    assert plain.code == 0 and "residual_add" not in plain.out


def test_segmentation_models_build_without_downloading_a_backbone():
    out = qdq("summary", "torchvision:lraspp_mobilenet_v3_large", "--no-rules", "--json")
    assert out.code == 0, out.err
    assert len(json.loads(out.out)) > 50


def test_modules_never_called_are_left_in_float_by_name(tmp_path):
    """An auxiliary head only used in training: reported, left in float, and the export
    (which used to stop on its missing amax) goes through."""
    out = qdq("calibrate", "tests.qdqapp.models:with_aux_head", "--data", "random:2x3x8x8",
              "--no-rules", "--out", tmp_path / "cal")
    assert out.code == 0, out.err
    assert "left in float, never called during calibration: aux" in out.err
    record = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert record["left_in_float"] == ["aux"]
    onnx = qdq("export", "tests.qdqapp.models:with_aux_head", "--checkpoint",
               tmp_path / "cal" / "quantized.pt", "--out", tmp_path / "m.onnx", "--quiet")
    assert onnx.code == 0, onnx.err


def test_googlenet_auxiliary_heads(tmp_path):
    out = qdq("calibrate", "torchvision:googlenet", "--no-rules", "--data",
              "random:1x3x64x64", "--calib-batches", "1", "--out", tmp_path, "--quiet")
    assert out.code == 0, out.err
    record = json.loads((tmp_path / "calibration.json").read_text())
    assert record["left_in_float"] == ["aux1.conv.conv", "aux1.fc1", "aux1.fc2",
                                       "aux2.conv.conv", "aux2.fc1", "aux2.fc2"]


def test_calibrate_compare_writes_what_its_help_names(tmp_path):
    help_text = qdq("calibrate", "--help").out
    writes, smoothquant = help_text.split("writes")[-1].split("with --smoothquant")
    named = set(re.findall(r"\b(\w+\.(?:json|txt|md|pt))\b", writes))
    smoothquant = smoothquant.split("\n\n")[0]  # its item, up to the next paragraph
    assert set(re.findall(r"\b(\w+\.(?:json|txt))\b", smoothquant)) == {
        "smoothquant.txt", "smoothquant.json"}  # tests/qdqapp/test_hf_cli.py writes them
    out = qdq("calibrate", TINY, "--data", "random:4x3x8x8", "--compare", "--calibrators",
              "max,percentile-99.9,mse", "--out", tmp_path, "--quiet")
    assert out.code == 0, out.err
    assert {p.name for p in tmp_path.iterdir() if p.name != MARKER} == named == {
        "quantized.pt", "calibration.json", "calibration.txt", "calibrators.md",
        "calibrators.json"}
    assert MARKER in help_text and owner_of(tmp_path) == "calibrate"
    table = json.loads((tmp_path / "calibrators.json").read_text())
    assert table["metric_name"] == "top-1 agreement with FP32 (%)"
    assert table["provenance"]["command"].startswith("qdq calibrate ")
    assert "Made " in (tmp_path / "calibrators.md").read_text().splitlines()[-1]
    assert json.loads((tmp_path / "calibration.json").read_text())["calibrator"] == \
        table["best"]


def test_calibration_json_and_table_name_the_search_of_each_amax(tmp_path):
    """Activations calibrated with percentile-99.9 read percentile-99.9, not the max
    their descriptors name; weights read max."""
    out = qdq("calibrate", TINY, "--data", "random:4x3x8x8", "--calibrator", "percentile-99.9",
              "--out", tmp_path, "--quiet")
    assert out.code == 0, out.err
    rows = json.loads((tmp_path / "calibration.json").read_text())["quantizers"]
    calibrated = [r for r in rows if r["amax_max"] is not None]
    assert {r["calibrator"] for r in calibrated if r["role"] != "weight"} == \
        {"percentile-99.9"}
    assert {r["calibrator"] for r in calibrated if r["role"] == "weight"} == {"max"}
    table = (tmp_path / "calibration.txt").read_text()
    assert "percentile-99.9" in table
    made = json.loads((tmp_path / "calibration.json").read_text())["provenance"]
    assert made["command"].startswith("qdq calibrate tests.qdqapp.models:tiny_cnn --data")
    restored = qdq("summary", TINY, "--checkpoint", tmp_path / "quantized.pt", "--json",
                   "--quiet")
    assert [r["calibrator"] for r in json.loads(restored.out)] == [r["calibrator"]
                                                                    for r in rows]
    # the rules folded bn1 when the model was made: export says so, not "0 folded"
    onnx = qdq("export", TINY, "--checkpoint", tmp_path / "quantized.pt", "--out",
               tmp_path / "m.onnx", "--quiet")
    assert onnx.code == 0, onnx.err
    assert "BatchNorm already folded in the model (1))" in onnx.out
    assert "0 BatchNorm folded" not in onnx.out


def test_a_sweep_whose_metric_is_blind_warns_and_the_help_says_so(tmp_path):
    """Random weights put every input in one class (the old ``sensitivity --help``
    example): the command still runs, and its output, report.md and sensitivity.json
    say the metric cannot tell the layers apart, why, and what to do."""
    out = qdq("sensitivity", "tests.qdqapp.models:one_class_cnn", "--data", "random:8x3x8x8",
              "--out", tmp_path, "--quiet")
    assert out.code == 0, out.err
    assert "WARNING: the metric cannot tell the layers apart: all 4 layers measure top-1 " \
           "agreement with FP32 (%) 100.0000, as do FP32 and INT8 (the metric's " \
           "resolution is 1.5625)" in out.out             # 8 batches of 8 random inputs
    assert "WARNING: the FP32 model predicts class 0 for every one of the 64 evaluation " \
           "inputs" in out.out
    assert "what to do: use trained weights" in out.out and "--eval-batches" in out.out
    report = json.loads((tmp_path / "sensitivity.json").read_text())
    assert len(report["warnings"]) == 2 and report["resolution"] == 100 / 64
    assert report["provenance"]["command"].startswith("qdq sensitivity tests.qdqapp.models")
    md = (tmp_path / "report.md").read_text()
    assert md.count("> **Warning:**") == 2 and "> **What to do:** use trained weights" in md
    help_text = " ".join(qdq("sensitivity", "--help").out.split())
    assert "--data random:16x3x32x32 --eval-batches 4" not in help_text
    assert "or random data only show that the command runs" in help_text


def test_export_with_dynamo_keeps_stderr_quiet(tmp_path):
    from export.onnx_export import dynamo_exporter_available

    if not dynamo_exporter_available():
        pytest.skip("the dynamo exporter needs torch 2.5 or newer")
    out = qdq("export", TINY, "--data", "random:1x3x8x8", "--dynamo", "--out",
              tmp_path / "m.onnx")
    assert out.code == 0, out.err
    assert len(out.err.splitlines()) <= 3, out.err  # was hundreds of exporter lines
    assert (tmp_path / "m.onnx").is_file()


def test_build_takes_an_engine_path_or_derives_it(tmp_path):
    from export import tensorrt_available

    if tensorrt_available():
        pytest.skip("TensorRT is installed here: the GPU test suite builds engines")
    import onnx
    from onnx import TensorProto, helper

    onnx_path = tmp_path / "m.onnx"  # a real graph: build_engine reads it before TensorRT
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]),
              str(onnx_path))
    for args in ((onnx_path,), (onnx_path, tmp_path / "x.engine")):
        out = qdq("build", *args)
        assert out.code == 2 and "pip install tensorrt polygraphy" in out.err
        assert "usage" not in out.err  # the positional engine parses
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
