"""Output folders: created on entry, emptied of what a failed command wrote."""

import pytest

from qdqapp.outputs import OutputFolder


def test_a_failure_removes_new_files_and_created_folders(tmp_path):
    with pytest.raises(RuntimeError), OutputFolder(tmp_path / "a" / "b") as out:
        (out / "half.json").write_text("{")
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_earlier_files_and_resume_state_survive_a_failure(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    keep = ("rows.jsonl", "sweep.json")
    with pytest.raises(RuntimeError), OutputFolder(tmp_path, keep=keep) as out:
        (out / "sweep.json").write_text("{}")
        raise RuntimeError("failed before the first measurement")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    with pytest.raises(RuntimeError), OutputFolder(tmp_path, keep=keep) as out:
        (out / "sweep.json").write_text("{}")
        (out / "rows.jsonl").write_text('{"layer": "conv1"}\n')
        (out / "report.md").write_text("half")
        raise RuntimeError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt", "rows.jsonl",
                                                           "sweep.json"]


def test_success_keeps_everything(tmp_path):
    with OutputFolder(tmp_path / "new") as out:
        (out / "a.txt").write_text("a")
    assert (tmp_path / "new" / "a.txt").read_text() == "a"
