"""The architecture the layout promises, checked at run time (import-linter checks the
source in ``make test``): qdq imports neither sensitivity, export nor the application,
sensitivity and export do not import each other, and none of the three imports qdqapp."""

import subprocess
import sys

import pytest

CHECK = """
import sys, importlib, pkgutil
import {pkg}
for info in pkgutil.walk_packages({pkg}.__path__, "{pkg}."):
    importlib.import_module(info.name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in {forbidden})
print(bad)
assert not bad, bad
"""


@pytest.mark.parametrize("pkg, forbidden", [
    ("qdq", {"sensitivity", "export", "qdqapp"}),
    ("sensitivity", {"export", "qdqapp"}),
    ("export", {"sensitivity", "qdqapp"}),
])
def test_layering(pkg, forbidden):
    code = CHECK.format(pkg=pkg, forbidden=forbidden)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
