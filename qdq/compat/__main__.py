"""``python -m qdq.compat script.py [args...]``: run a pytorch-quantization script
unchanged, its ``pytorch_quantization`` imports answered by qdq."""

from __future__ import annotations

import os
import runpy
import sys

from qdq.compat import CompatError, install


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(
            "usage: python -m qdq.compat SCRIPT.py [ARGS...]\n"
            "Runs SCRIPT with its pytorch_quantization imports answered by qdq.\n")
        return 0 if argv else 2
    script = argv[0]
    if not os.path.isfile(script):
        sys.stderr.write(f"qdq.compat: no such script: {script}\n")
        return 2
    try:
        install()
    except CompatError as err:
        sys.stderr.write(f"qdq.compat: {err}\n")
        return 2
    # as `python script.py` would: the script's folder first on the path, its own argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    sys.argv = argv
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
