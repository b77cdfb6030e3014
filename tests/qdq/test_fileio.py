import os
import stat
from functools import partial

import pytest
import torch

from qdq.fileio import atomic_write


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_text_bytes_and_writer_land_whole(tmp_path):
    atomic_write(tmp_path / "a.txt", "héllo")
    atomic_write(tmp_path / "b.bin", b"\x00\x01")
    atomic_write(tmp_path / "c.pt", partial(torch.save, {"w": torch.arange(3)}))
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.pt"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "t.txt", "x")
        atomic_write(tmp_path / "w.pt", partial(torch.save, {}))
    finally:
        os.umask(old)
    assert _mode(tmp_path / "t.txt") == 0o666 & ~umask
    assert _mode(tmp_path / "w.pt") == 0o666 & ~umask


def test_failed_writer_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_a_folder_is_not_a_file_path(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        atomic_write(tmp_path, "x")


def test_parents_false_refuses_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write(tmp_path / "no" / "x.txt", "x", parents=False)
    assert not (tmp_path / "no").exists()
    atomic_write(tmp_path / "yes" / "x.txt", "x")
    assert (tmp_path / "yes" / "x.txt").read_text() == "x"
