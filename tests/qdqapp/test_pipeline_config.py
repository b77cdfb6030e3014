"""Run configuration and run folder of ``qdq run``: files, overrides, resume records."""

import json

import pytest

from qdq.fileio import atomic_write
from qdqapp.errors import CliError
from qdqapp.outputs import MARKER
from qdqapp.pipeline.config import ConfigError, RunConfig, load_config, parse_run
from qdqapp.pipeline.folder import RunFolder


def test_yaml_and_toml_give_the_same_config(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "model: torchvision:resnet18\ncalibrators: [max, mse]\nmax-drop: 0.5\n")
    (tmp_path / "run.toml").write_text(
        'model = "torchvision:resnet18"\ncalibrators = ["max", "mse"]\nmax_drop = 0.5\n')
    a, b = load_config(tmp_path / "run.yaml"), load_config(tmp_path / "run.toml")
    assert a == b and a.config.calibrators == ["max", "mse"] and a.config.max_drop == 0.5
    assert a.settings.calibrators == ("max", "mse") and a.settings.max_drop == 0.5


def test_flags_override_the_file(tmp_path):
    (tmp_path / "run.yaml").write_text("model: torchvision:resnet18\nbatch_size: 32\n")
    specs = load_config(tmp_path / "run.yaml", batch_size=8, model=None)
    assert specs.data.batch_size == 8 and specs.model.spec == "torchvision:resnet18"
    assert specs.config.batch_size == 8


@pytest.mark.parametrize("text, message", [
    ("modle: x\n", "unknown key 'modle'"),
    ("batch_size: -1\n", "batch_size (F): expected a positive integer, got -1"),
    ("sweep: sideways\n", "sweep (F) 'sideways': choose one of leave-one-out"),
    ("calibrators: [max, kl]\n", "calibrators (F) 'kl': calibration method 'kl'"),
    ("opset: 11\n", "opset (F) 11: Q/DQ export needs 13 or newer"),
    ("qat_steps: 0\n", "qat_steps (F): expected a positive integer, got 0"),
    ("eval_batches: true\n", "eval_batches (F): expected a positive integer, got True"),
    ("qat_lr: -1\n", "qat_lr (F): expected a positive number, got -1"),
    ("qat_lr: .nan\n", "qat_lr (F): expected a positive number, got nan"),
    ("qat_epochs: -2\n", "qat_epochs (F): expected a non-negative integer, got -2"),
    ("max_drop: -0.5\n", "max_drop (F): expected a non-negative number, got -0.5"),
    ("seed: 1.5\n", "seed (F): expected a non-negative integer, got 1.5"),
    ("tensorrt: 'no'\n", "tensorrt (F): expected true or false, got 'no'"),
    ("- a list\n", "expected a table"),
    ("model: [unclosed\n", "cannot be parsed"),
    ("format: int3\n", "format (F) 'int3': unknown format"),
    ("format: fp8\ncalibrators: [max, entropy]\n", "calibrators (F) entropy: FP8 E4M3"),
    ("format: w8\ncalibrator: mse\n", "calibrator (F) mse: w8 is weight-only"),
    ("format: w4\nopset: 19\n", "opset (F) 19: INT4 weight-only .* needs opset 21"),
    ("format: w8\nblock_size: 32\nopset: 13\n", "needs opset 21"),
    ("block_size: 32\n", "block_size (F) applies to the weight-only formats"),
    ("format: w4\nblock_size: 0\n", "block_size (F) 0: expected a positive integer"),
    ("format: w4\nqat_epochs: 1\n",
     "qat_epochs (F): QAT trains fake-quantized float weights"),
    ("eval: nope\n", "eval (F) 'nope': expected auto, top1, min-cosine, mean-cosine"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    """Each key is named with the file it came from (F), so the user finds the line."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    expected = message.replace("(F)", f"({path})")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert all(part in str(err.value) for part in expected.split(".*")), str(err.value)


def test_a_flag_is_named_as_a_flag_even_with_a_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("batch_size: 8\n")
    with pytest.raises(ConfigError, match="^--qat-lr: expected a positive number, got -1"):
        load_config(path, qat_lr=-1.0)


def test_missing_and_unknown_kind_of_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "run.ini").write_text("x=1")
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml or \.toml"):
        load_config(tmp_path / "run.ini")


def test_format_keys_from_a_file(tmp_path):
    (tmp_path / "run.yaml").write_text("format: w4\nblock-size: 32\nweight_method: mse\n")
    specs = load_config(tmp_path / "run.yaml")
    cfg = specs.config
    assert (cfg.format, cfg.block_size, cfg.weight_method) == ("w4", 32, "mse")
    assert cfg.calibrators is None and cfg.opset is None  # the format's defaults
    assert specs.model.format.title == "INT4 weight-only (block 32, amax mse)"
    assert specs.settings.calibrators == () and specs.settings.opset is None
    assert parse_run(RunConfig(format="fp8", opset=19)).settings.opset == 19


def test_calibrators_from_a_comma_list():
    specs = parse_run(RunConfig(calibrators="max, percentile-99.9"))
    assert specs.config.calibrators == ["max", "percentile-99.9"]
    assert specs.settings.calibrators == ("max", "percentile-99.9")


def test_run_folder_records_and_refuses_a_changed_config(tmp_path):
    cfg = RunConfig(out=str(tmp_path / "run"))
    folder = RunFolder(cfg.out, cfg.fingerprint())
    assert not (tmp_path / "run").exists()  # checking writes nothing
    folder.open().mark("fp32", "done", {"metric": 90.0}, 1.0)
    again = RunFolder(cfg.out, cfg.fingerprint()).open()
    assert again.resuming and again.done("fp32") and again.result("fp32") == {"metric": 90.0}
    changed = RunConfig(out=cfg.out, max_drop=1.0)
    with pytest.raises(CliError, match="changed: max_drop"):
        RunFolder(changed.out, changed.fingerprint())
    fresh = RunFolder(changed.out, changed.fingerprint(), restart=True).open()
    assert not fresh.done("fp32")


def test_restart_deletes_only_the_files_the_run_recorded(tmp_path):
    cfg = RunConfig(out=str(tmp_path))
    (tmp_path / "mine.txt").write_text("a user's file")
    folder = RunFolder(cfg.out, cfg.fingerprint()).open()
    folder.write_text("report.md", "x")
    (tmp_path / "sensitivity").mkdir()
    atomic_write(tmp_path / "sensitivity" / "rows.jsonl", "{}\n")
    folder.mark("fp32", "done", {}, 0.0)
    assert set(json.loads((tmp_path / "state.json").read_text())["files"]) == {
        "report.md", "sensitivity/rows.jsonl", "run.log"}
    RunFolder(cfg.out, cfg.fingerprint(), restart=True).open()
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER, "mine.txt"]


def test_a_run_that_never_finished_a_stage_is_discarded(tmp_path):
    cfg = RunConfig(out=str(tmp_path / "a" / "b"))
    folder = RunFolder(cfg.out, cfg.fingerprint()).open()
    folder.write_text("config.json", "{}")
    folder.discard()
    assert list(tmp_path.iterdir()) == []
