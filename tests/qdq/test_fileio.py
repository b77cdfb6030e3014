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


def test_the_same_object_saved_twice_gives_the_same_bytes(tmp_path):
    """torch.save names the zip archive's root after the file: the temporary file has the
    final name, so nothing random gets into the file."""
    import zipfile

    state = {"w": torch.arange(6.0).reshape(2, 3), "meta": {"seed": 0}}
    for folder in ("a", "b"):
        atomic_write(tmp_path / folder / "quantized.pt", partial(torch.save, state))
    first, second = ((tmp_path / f / "quantized.pt").read_bytes() for f in ("a", "b"))
    assert first == second
    roots = {n.split("/")[0] for n in zipfile.ZipFile(tmp_path / "a" / "quantized.pt").namelist()}
    assert roots == {"quantized"}


def test_a_name_of_the_longest_legal_length_is_written(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    name = "n" * (limit - 3) + ".pt"
    atomic_write(tmp_path / name, partial(torch.save, {"w": torch.ones(2)}))
    atomic_write(tmp_path / (name[:-3] + ".js"), "{}")
    assert sorted(len(p.name) for p in tmp_path.iterdir()) == [limit, limit]


FULL = """
import resource, sys
from functools import partial
import torch
from qdq.fileio import atomic_write
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
atomic_write(sys.argv[1], {writer})
"""


@pytest.mark.parametrize("writer", ["partial(torch.save, torch.ones(100_000))",
                                    "b'x' * 200_000"], ids=["torch.save", "bytes"])
def test_running_out_of_space_names_the_file_and_leaves_nothing(tmp_path, writer):
    """A file-size limit stands in for a full disk: the write fails past 100 kB."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    target = tmp_path / "out" / "model.pt"
    target.parent.mkdir()
    done = subprocess.run([sys.executable, "-c", FULL.format(writer=writer), str(target)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("qdq.fileio.DiskFullError: cannot write ") and str(target) in last
    assert "file-size limit (ulimit -f) (100000 bytes); nothing was written" in last
    assert list(target.parent.iterdir()) == []
