"""``qdq lint``: check a Q/DQ ONNX file against what TensorRT accepts and fuses."""

from __future__ import annotations

import argparse
import json

from qdqapp.cli import CliError, register

EPILOG = """examples:
  qdq lint resnet18.onnx
  qdq lint model.onnx --rule scale --rule zero-point
  qdq lint model.onnx --json > findings.json

Exit status: 0 without errors (warnings allowed), 1 with errors, 2 for bad input.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("onnx", help="ONNX file to check")
    p.add_argument("--rule", action="append", help="run only this rule (repeatable)")
    p.add_argument("--json", action="store_true", help="print findings as JSON")
    p.add_argument("--errors-only", action="store_true", help="leave warnings out")


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from export import LintError, check_qdq, format_findings

    try:
        findings = check_qdq(args.onnx, rules=args.rule)
    except LintError as err:
        raise CliError(str(err)) from err
    if args.errors_only:
        findings = [f for f in findings if f.severity == "error"]
    if args.json:
        print(json.dumps([asdict(f) for f in findings], indent=1))
    else:
        print(format_findings(findings))
    return 1 if any(f.severity == "error" for f in findings) else 0


register("lint", "check Q/DQ placement in an ONNX file (TensorRT rules)", add_arguments, run,
         EPILOG)
