"""qdq.provenance: what every report records about where it came from."""

from __future__ import annotations

import datetime
import sys

import pytest
import torch

import qdq
from qdq.provenance import command_line, provenance, provenance_line, recording_command
from tests.conftest import needs_cuda


def test_the_record_names_date_version_command_machine_and_device():
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    made = provenance()
    date = datetime.datetime.fromisoformat(made["date"].replace("Z", "+00:00"))
    assert before <= date <= datetime.datetime.now(datetime.timezone.utc)
    assert made["qdq"] == qdq.__version__ and made["torch"] == str(torch.__version__)
    assert made["device"] == "cpu" and made["host"] and "Python" in made["platform"]
    assert made["command"] == command_line()
    assert all(type(v) is str for v in made.values())
    line = provenance_line(made)
    assert line.startswith(f"Made {made['date']} by `") and f"qdq {qdq.__version__}" in line
    assert provenance_line(None) == ""


def test_the_cli_command_is_recorded_and_put_back_after_an_error():
    outside = command_line()
    assert outside.startswith("python ") and sys.argv[0] in outside
    with pytest.raises(RuntimeError), recording_command(["qdq", "run", "--out", "my runs"]):
        assert command_line() == "qdq run --out 'my runs'"   # pasteable: quoted
        assert provenance()["command"] == "qdq run --out 'my runs'"
        raise RuntimeError("a failed command")
    assert command_line() == outside


@needs_cuda
def test_a_cuda_device_is_named_with_its_card():
    made = provenance(torch.device("cuda"))
    assert made["device"].startswith("cuda:0 (") and torch.cuda.get_device_name(0) in \
        made["device"]
