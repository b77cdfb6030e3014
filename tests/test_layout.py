"""The architecture the layout promises: qdq imports neither sensitivity nor export, and
sensitivity and export do not import each other."""

import subprocess
import sys

import pytest

CHECK = """
import sys, importlib, pkgutil
import {pkg}
for info in pkgutil.walk_packages({pkg}.__path__, "{pkg}."):
    if info.name.startswith("qdq.cli"):
        continue  # the CLI sits on top and may import everything
    importlib.import_module(info.name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in {forbidden})
print(bad)
assert not bad, bad
"""


@pytest.mark.parametrize("pkg, forbidden", [
    ("qdq", {"sensitivity", "export"}),
    ("sensitivity", {"export"}),
    ("export", {"sensitivity"}),
])
def test_layering(pkg, forbidden):
    code = CHECK.format(pkg=pkg, forbidden=forbidden)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
