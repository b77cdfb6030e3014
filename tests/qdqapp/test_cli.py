"""The qdq command, run as users run it: in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import qdqapp.cli as qdq_cli


def qdq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qdqapp.cli", *args], capture_output=True,
                          text=True, timeout=300)


COMMANDS = sorted(p.stem[4:] for p in Path(qdq_cli.__file__).parent.glob("cmd_*.py"))


def test_help_lists_commands():
    out = qdq("--help")
    assert out.returncode == 0 and all(command in out.stdout for command in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command):
    out = qdq(command, "--help")
    assert out.returncode == 0, out.stderr
    assert "example" in out.stdout.lower() and f"qdq {command}" in out.stdout
    assert "--quiet" in out.stdout and "--debug" in out.stdout


def test_summary_calibrated_json():
    out = qdq("summary", "torchvision:resnet18", "--calibrate", "1", "--input-shape",
              "1,3,32,32", "--json", "--ignore", "fc")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert rows[0]["module"] == "conv1" and rows[0]["amax_max"] > 0
    assert not any(r["module"] == "fc" for r in rows)


@pytest.mark.parametrize("args, message", [
    (("summary", "torchvision:not_a_model"), "torchvision has no model 'not_a_model'"),
    (("summary", "resnet18"), "expected 'torchvision:NAME'"),
    (("summary", "no_such_pkg.mod:fn"), "cannot import 'no_such_pkg.mod'"),
    (("summary", "torchvision:resnet18", "--checkpoint", "/nonexistent.pt"), "no such file"),
    (("summary", "torchvision:resnet18", "--calibrate", "1", "--input-shape", "1,a"),
     "expected integers"),
])
def test_bad_input_is_one_line_with_exit_2(args, message):
    out = qdq(*args)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line, no traceback
    assert message in out.stderr


def test_foreign_checkpoint(tmp_path):
    import torch

    path = tmp_path / "foreign.pt"
    torch.save({"some.weight": torch.zeros(2)}, path)
    out = qdq("summary", "torchvision:resnet18", "--checkpoint", str(path))
    assert out.returncode == 2 and "does not fit torchvision:resnet18" in out.stderr
    path.write_bytes(b"not a checkpoint")
    out = qdq("summary", "torchvision:resnet18", "--checkpoint", str(path))
    assert out.returncode == 2 and "cannot be read" in out.stderr
