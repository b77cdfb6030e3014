"""pytorch-quantization's own test suite, run against qdq through ``qdq.compat`` only.

The suite is not part of this project: point ``--pq-dir`` at the
``tools/pytorch-quantization`` folder of an NVIDIA/TensorRT checkout. The script copies
its ``tests/`` (and ``examples/``, which one test imports) into a temporary folder,
makes the CUDA tests run on the CPU by a few textual substitutions (default tensor type,
``.cuda()``, ``device="cuda"``, ``torch.cuda.device(0)``), adds a ``conftest`` plugin
that calls ``qdq.compat.install()``, runs pytest there and prints pass/fail per file and
in total. Nothing of the suite is added to qdq's behaviour beyond the module-path alias.

Usage::

    PYTHONPATH=. python scripts/pq_suite.py --pq-dir /path/to/TensorRT/tools/pytorch-quantization
    PYTHONPATH=. python scripts/pq_suite.py --pq-dir DIR --failures -- -k tensor_quant  # one file
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

# (pattern, replacement): what moves a CUDA test onto the CPU, nothing else
CPU_REWRITES = [
    (r"torch\.set_default_tensor_type\('torch\.cuda\.FloatTensor'\)",
     "torch.set_default_tensor_type('torch.FloatTensor')"),
    (r"\.cuda\(\)", ".cpu()"),
    (r"device=(['\"])cuda\1", "device='cpu'"),
    (r"\.to\((['\"])cuda\1\)", ".to('cpu')"),
    (r"torch\.cuda\.device\(0\)", "__import__('contextlib').nullcontext()"),
    (r"torch\.load\(VECTOR_FILE\)", "torch.load(VECTOR_FILE, map_location='cpu')"),
]

PLUGIN = '''
import qdq.compat
qdq.compat.install()
'''


def prepare(pq_dir: Path, work: Path) -> Path:
    root = work / "pq"
    for part in ("tests", "examples"):
        if (pq_dir / part).is_dir():
            shutil.copytree(pq_dir / part, root / part)
    for path in (root / "tests").glob("*.py"):
        text = path.read_text()
        for pattern, repl in CPU_REWRITES:
            text = re.sub(pattern, repl, text)
        path.write_text(text)
    (root / "qdq_compat_plugin.py").write_text(PLUGIN)
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pq-dir", type=Path, required=True,
                    help="tools/pytorch-quantization of an NVIDIA/TensorRT checkout")
    ap.add_argument("--failures", action="store_true", help="list every failing test")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    args = ap.parse_args()
    if not (args.pq_dir / "tests").is_dir():
        print(f"pq_suite: {args.pq_dir} has no tests/ folder", file=sys.stderr)
        return 2
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        root = prepare(args.pq_dir, Path(tmp))
        report = Path(tmp) / "junit.xml"
        env_path = f"{repo}:{root}"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "qdq_compat_plugin",
               "-p", "no:cacheprovider", "--continue-on-collection-errors",
               f"--junitxml={report}", "tests", *args.pytest_args]
        subprocess.run(cmd, cwd=root, env={**os.environ, "PYTHONPATH": env_path},
                       stdout=None if args.failures else subprocess.DEVNULL)
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        failing = []
        for case in ET.parse(report).getroot().iter("testcase"):
            file = (case.get("classname") or "").split(".")[1] if "." in (
                case.get("classname") or "") else case.get("classname") or "?"
            kinds = {child.tag for child in case}
            kind = ("failed" if kinds & {"failure", "error"} else
                    "skipped" if "skipped" in kinds else "passed")
            counts[file][kind] += 1
            if kind == "failed":
                failing.append(f"{case.get('classname')}::{case.get('name')}")
    total = collections.Counter()
    print(f"{'file':34s} {'passed':>7s} {'failed':>7s} {'skipped':>8s}")
    for file in sorted(counts):
        c = counts[file]
        total.update(c)
        print(f"{file:34s} {c['passed']:7d} {c['failed']:7d} {c['skipped']:8d}")
    print(f"{'total':34s} {total['passed']:7d} {total['failed']:7d} {total['skipped']:8d}")
    if args.failures:
        print("\n".join(failing))
    print(f"{total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
