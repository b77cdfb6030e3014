"""Output folders belong to the command that wrote them; names the file system allows
work, longer ones are refused before any work; a full disk is one line naming the file;
the quantized-model file is the same bytes every time."""

from __future__ import annotations

import os
import subprocess
import sys

from qdqapp.outputs import MARKER, owner_of
from tests.qdqapp.cli import ROOT, qdq

TINY = "tests.qdqapp.models:tiny_cnn"
DATA = ["--data", "random:2x3x16x16", "--calib-batches", "1"]
RUN = ["run", "--model", TINY, *DATA, "--calibrator", "max", "--sweep", "none"]


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}


def _refused(result, message: str) -> None:
    assert result.code == 2, result.err
    assert result.error_lines == [result.error_lines[-1]], result.err  # one line
    assert result.error_lines[-1].startswith("qdq: error: ") and message in result.err


def test_run_refuses_a_calibrate_folder_unless_forced(tmp_path):
    """qdq run into a calibrate folder used to replace the user's quantized.pt, exit 0."""
    folder = tmp_path / "cal"
    assert qdq("calibrate", TINY, *DATA, "--out", folder, "--quiet").code == 0
    assert owner_of(folder) == "calibrate" and (folder / MARKER).is_file()
    before = _snapshot(folder)
    _refused(qdq(*RUN, "--out", folder),
             f"--out {folder}: a qdq calibrate folder; qdq run would replace or break its "
             "files (pass --force")
    _refused(qdq("sensitivity", TINY, *DATA, "--out", folder), "a qdq calibrate folder")
    assert _snapshot(folder) == before
    forced = qdq(*RUN, "--out", folder, "--force", "--quiet")
    assert forced.code == 0, forced.err[-2000:]
    assert owner_of(folder) == "run" and (folder / "model.onnx").is_file()


def test_a_run_folder_keeps_its_files_and_its_resume(tmp_path):
    """qdq calibrate into a run folder used to break the run's resume."""
    run = tmp_path / "run"
    assert qdq(*RUN, "--out", run, "--quiet").code == 0
    before = _snapshot(run)
    _refused(qdq("calibrate", TINY, *DATA, "--out", run), "a qdq run folder")
    _refused(qdq("sensitivity", TINY, *DATA, "--out", run / "sensitivity"),
             "a qdq run folder")
    _refused(qdq("export", TINY, "--checkpoint", run / "quantized.pt", "--out",
                 run / "model.onnx"), "the file belongs to the qdq run folder")
    _refused(qdq(*RUN, "--out", run, "--qat-lr", "-1"), "--qat-lr: expected a positive")
    assert _snapshot(run) == before
    # a new file beside the run's is no harm, and the run leaves it alone
    extra = qdq("export", TINY, "--checkpoint", run / "quantized.pt", "--out",
                run / "mine.onnx", "--quiet")
    assert extra.code == 0, extra.err
    again = qdq(*RUN, "--out", run)
    assert again.code == 0 and "export ONNX (Q/DQ, the lowest opset the format allows): " \
        "done earlier" in again.err
    restarted = qdq(*RUN, "--out", run, "--restart", "--quiet")
    assert restarted.code == 0 and (run / "mine.onnx").is_file()


def test_folders_written_before_the_marker_are_known_by_their_files(tmp_path):
    folder = tmp_path / "cal"
    assert qdq("calibrate", TINY, *DATA, "--out", folder, "--quiet").code == 0
    (folder / MARKER).unlink()
    assert owner_of(folder) == "calibrate"
    _refused(qdq(*RUN, "--out", folder), "a qdq calibrate folder")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's folder belongs to no one")
    assert owner_of(tmp_path / "mine") is None


def test_the_quantized_model_file_is_the_same_bytes_every_time(tmp_path):
    """Its zip root used to be the random temporary file name."""
    for name in ("a", "b", "a"):  # "a" twice: the same command again into its own folder
        result = qdq("calibrate", TINY, *DATA, "--out", tmp_path / name, "--quiet")
        assert result.code == 0, result.err
    first, second = ((tmp_path / n / "quantized.pt").read_bytes() for n in ("a", "b"))
    assert first == second


def test_the_longest_legal_name_works_and_a_longer_one_is_refused_first(tmp_path):
    """A legal 255-character name used to be refused after the work (the temporary file's
    name was longer)."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    onnx_file = tmp_path / ("m" * (limit - 5) + ".onnx")
    result = qdq("export", TINY, *DATA, "--out", onnx_file, "--quiet")
    assert result.code == 0, result.err
    assert onnx_file.is_file() and len(onnx_file.name) == limit
    folder = tmp_path / ("c" * limit)
    assert qdq("calibrate", TINY, *DATA, "--out", folder, "--quiet").code == 0
    assert (folder / "quantized.pt").is_file()
    before = sorted(p.name for p in tmp_path.iterdir())
    too_long = tmp_path / ("m" * (limit - 4) + ".onnx")
    _refused(qdq("export", TINY, *DATA, "--out", too_long),
             f"is {limit + 1} bytes long; this file system allows at most {limit}")
    _refused(qdq("run", "--out", tmp_path / "x" / ("r" * (limit + 1))),
             "this file system allows at most")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path):
    """A file-size limit (ulimit -f) stands in for a full disk: the JSON files fit under
    8 kB, the quantized-model file does not. The error used to be torch's internal text
    naming no file."""
    out = tmp_path / "cal"
    code = ("import resource, sys; "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (8000, resource.RLIM_INFINITY)); "
            "from qdqapp.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "calibrate", TINY, *DATA, "--out",
                           str(out), "--quiet"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"qdq: error: cannot write {out / 'quantized.pt'}: the file reached the file-size "
        "limit (ulimit -f) (8000 bytes); nothing was written"]
    assert not out.exists()
