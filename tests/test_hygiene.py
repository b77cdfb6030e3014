"""Library functions have no process-wide side effects: no printing, no seeding of the
global random generators, no matplotlib backend switch or pyplot state. (The application
package and scripts may do these things; qdq, sensitivity and export may not.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("qdq", "sensitivity", "export")
FORBIDDEN_CALLS = {"print", "torch.manual_seed", "torch.cuda.manual_seed",
                   "torch.cuda.manual_seed_all", "random.seed", "np.random.seed",
                   "numpy.random.seed", "matplotlib.use"}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _offences(path: Path) -> list[str]:
    """``"LINE what"`` for every forbidden call or pyplot import in one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _dotted(node.func) in FORBIDDEN_CALLS:
            found.append((node.lineno, f"{_dotted(node.func)}()"))
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{a.name}" for a in node.names]
            found += [(node.lineno, f"import {n}") for n in names
                      if n.startswith("matplotlib.pyplot")]
    return [f"{line} {what}" for line, what in sorted(found)]


@pytest.mark.parametrize("package", LIBRARIES)
def test_no_printing_seeding_or_pyplot_in_library_code(package):
    offences = [f"{path.relative_to(ROOT)}:{o}"
                 for path in sorted((ROOT / package).rglob("*.py")) for o in _offences(path)]
    assert offences == []


def test_the_check_sees_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nimport matplotlib.pyplot as plt\n"
                   "def f():\n    torch.manual_seed(0)\n    print('x')\n"
                   "    g = torch.Generator().manual_seed(0)\n")
    assert _offences(bad) == ["2 import matplotlib.pyplot", "4 torch.manual_seed()",
                              "5 print()"]
