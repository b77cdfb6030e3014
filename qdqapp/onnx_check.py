"""The ONNX Runtime check that ``qdq verify`` and ``qdq run``'s ``onnx_check`` stage share.

Both take the same fixed batch (:func:`check_inputs`: the first calibration batch, at most
:data:`CHECK_ROWS` rows; without data, seeded random inputs of the recorded shape), run
:func:`export.verify` on it and judge with :meth:`export.VerifyReport.ok`, through
:func:`check_onnx`: the same files get the same verdict, the same text and the same
numbers from both. The verdict rests on the forced run only (exact Q/DQ, flips that float
noise explains on each format's grid, forced outputs within ``rel_l2``), which does not
grow with the batch, so another batch or batch size does not change it either.

Example::

    check = check_onnx(session.model, "model.onnx", check_inputs(session),
                       session.prepared.device)
    print(check.text())
    assert check.ok
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from qdqapp.errors import CliError
from qdqapp.flow import on_device

__all__ = ["CHECK_ROWS", "OK_LINE", "OnnxCheck", "check_inputs", "check_onnx"]

#: rows of the fixed batch both commands compare on
CHECK_ROWS = 64
#: the line that ends a passing check
OK_LINE = "OK: same function up to rounding-boundary flips (float noise)"


def check_inputs(session, rows: int = CHECK_ROWS, seed: int = 0):
    """The batch to compare on: the data's fixed check batch (the same in every process),
    or seeded random inputs of the example's shape when there is no data."""
    if rows < 1:
        raise CliError(f"--batch {rows}: expected a positive number of rows")
    if session.source is not None:
        return session.source.check_batch(rows)
    example = session.prepared.example
    if isinstance(example, dict):
        raise CliError("a text model needs --data text:FILE for the sentences to compare on")
    shape = (rows, *example.shape[1:])
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class OnnxCheck:
    """An :class:`export.VerifyReport` and the tolerance it is judged with."""

    report: Any  # export.VerifyReport
    rel_l2: float = 1e-3

    @property
    def ok(self) -> bool:
        return self.report.ok(self.rel_l2)

    def verdict_line(self) -> str:
        """``OK: ...`` or ``MISMATCH: <what failed>``."""
        if self.ok:
            return OK_LINE
        return "MISMATCH: " + "; ".join(self.report.problems(self.rel_l2))

    def text(self) -> str:
        return f"{self.report}\n{self.verdict_line()}"

    def result(self) -> dict[str, Any]:
        """The numbers a run records (``onnx_check.json``)."""
        r = self.report
        cosine = None if r.cosine is None else {"min": r.cosine, "mean": r.cosine_mean}
        return {"rel_l2": r.rel_l2, "max_abs": r.max_abs,
                "top1_agreement": None if r.top1 is None else 100 * r.top1,
                "embedding_cosine": cosine, "forced_rel_l2": r.forced_rel_l2,
                "rounding_flips": r.flips, "only_boundary_flips": r.only_boundary_flips,
                "rows": r.shapes[0][0] if r.shapes and r.shapes[0] else None,
                "ok": self.ok, "verdict": self.verdict_line()}


def check_onnx(model: torch.nn.Module, onnx_path: str | os.PathLike, inputs,
               device: torch.device, *, rel_l2: float = 1e-3,
               noise_floor: bool = False) -> OnnxCheck:
    """:func:`export.verify` of ``model`` against ``onnx_path`` on ``inputs``; a check that
    cannot run (a bad file, NaN weights) is one :class:`CliError` naming the cause."""
    from export import VerifyError, verify

    if not rel_l2 > 0:
        raise CliError(f"--rel-l2 {rel_l2}: expected a positive tolerance")
    try:
        report = verify(model, onnx_path, on_device(inputs, device), noise_floor=noise_floor)
    except VerifyError as err:
        raise CliError(str(err)) from err
    return OnnxCheck(report, rel_l2)
