"""Every family of the zoo (``tests/zoo.py``), light rows: quantize, rules, calibrate,
export, lint, verify, save/restore, and no layer left float without a reason. The heavy
rows (resnet152, segmentation, inception) run in ``scripts/zoo_table.py``."""

from __future__ import annotations

import pytest

from tests.zoo import ZOO, run_row

pytest.importorskip("transformers")

LIGHT = [row for row in ZOO if not row.heavy]


@pytest.mark.parametrize("row", LIGHT, ids=[row.name for row in LIGHT])
def test_zoo_row(tmp_path, row):
    result = run_row(row, tmp_path)
    assert result["quantizers"] > 0
    assert result["lint_errors"] == 0, result["findings"]
    assert result["unexplained_findings"] == []
    assert result["verify"], result["verdict"]
    assert result["restore"]
    assert result["unexplained_float"] == []
