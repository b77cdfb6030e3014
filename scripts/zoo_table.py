"""Run every row of the model zoo (``tests/zoo.py``, the heavy rows included) through the
whole workflow and print the markdown table kept in BENCHMARKS.md.

    python scripts/zoo_table.py [ROW ...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.zoo import ZOO, run_row  # noqa: E402


def main(names: list[str]) -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [r for r in ZOO if not names or r.name in names]
    print("| row | family | quantizers | untraced parts | Q nodes | lint (errors/warnings) "
          "| verify | restore bit-exact | float layers (unexplained) | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failed = 0
    for row in rows:
        with tempfile.TemporaryDirectory() as folder:
            try:
                r = run_row(row, Path(folder))
            except Exception as err:  # noqa: BLE001 - a row that fails is a table cell
                failed += 1
                print(f"| {row.name} | {row.family} | failed: {type(err).__name__}: "
                      f"{str(err).splitlines()[0][:120]} |||||||| ")
                continue
        ok = r["verify"] and r["restore"] and not r["lint_errors"] and not r["unexplained_float"]
        failed += not ok
        print(f"| {r['row']} | {r['family']} | {r['quantizers']} | {r['untraced']} | "
              f"{r['q_nodes']} | {r['lint_errors']}/{r['lint_warnings']} | "
              f"{'yes' if r['verify'] else 'NO'}: {r['verdict']} | "
              f"{'yes' if r['restore'] else 'NO'} | {r['float_layers']} "
              f"({len(r['unexplained_float'])}) | {r['seconds']:.1f} |", flush=True)
        for finding in r["findings"]:
            print(f"|  | lint: {finding} |||||||||")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
