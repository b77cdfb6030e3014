"""``qdq summary``: build the quantized model and print where its quantizers are."""

from __future__ import annotations

import argparse
import json

from qdqapp.cli import CliError, register
from qdqapp.cli.options import (
    add_calibrator_option,
    add_data_options,
    add_model_options,
    data_spec,
    model_spec,
)
from qdqapp.flow import Session, calibrate_model
from qdqapp.formats import weight_only_rows, weight_only_table
from qdqapp.specs import parse_calibrator

EPILOG = """examples:
  qdq summary torchvision:resnet18
  qdq summary torchvision:resnet18 --rules --ignore fc
  qdq summary torchvision:mobilenet_v2 --no-rules --calibrate --data random:4x3x224x224
  qdq summary reference --checkpoint runs/calib/quantized.pt --json
  qdq summary torchvision:resnet18 --format fp8
  qdq summary reference --format w4 --block-size 32 --ignore stem.0.0
  qdq summary hf:minilm --data text:sentences.txt --smoothquant

The placement rules are on by default, as everywhere: the 'shared' column lists the
module paths that share one quantizer (concat, max-pool, same tensor) and 'rule' the rule
that placed it. A quantized-model --checkpoint shows that model, amax included.
--calibrate calibrates on --data first (random data of the model's usual input shape
when --data is not given; text models need --data). --smoothquant prints its per-layer
report first. With --format w8/w4 the table lists the integer weights (bits, block size,
shape, scales, code range) instead of quantizers.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_data_options(p, required=False,
                     data_help="data for the rules' example input and for --calibrate "
                               "(default: the model's usual input shape, random)")
    p.add_argument("--calibrate", action="store_true",
                   help="calibrate first (on --data, --calib-batches batches), to show amax")
    add_calibrator_option(p)
    p.add_argument("--json", action="store_true", help="print rows as JSON")


def run(args: argparse.Namespace) -> int:
    import qdq

    model = model_spec(args)
    choice = model.format
    calibrator = parse_calibrator(args.calibrator, choice)
    if args.calibrate and choice.weight_only:
        raise CliError(f"--calibrate: {choice.name} is weight-only, nothing is calibrated")
    data = args.data
    if data is None and args.calibrate:
        shape = model.example_shape()
        if not shape or isinstance(shape, dict):
            raise CliError(f"--calibrate: model {model.spec} has no usual input (random "
                           "data cannot stand in for it); pass --data SPEC")
        data = "random:" + "x".join(map(str, shape))
    data = data_spec(args, model, data)
    session = Session.open(model, data, progress=not args.quiet)
    if session.prepared.smoothquant is not None:
        print(session.prepared.smoothquant)
    if args.calibrate:
        calibrate_model(session.prepared, session.source.calib(), data.calib_batches,
                        calibrator, progress=not args.quiet)
    if args.json:
        rows = weight_only_rows(session.model) if choice.weight_only else \
            [r.as_dict() for r in qdq.summary_rows(session.model)]
        print(json.dumps(rows, indent=1))
        return 0
    if choice.weight_only:
        print(weight_only_table(session.model))
    else:
        print(qdq.summary(session.model))
        report = getattr(session.model, "qdq_rules_report", None)
        if report is not None:
            print("placement rules: " + (", ".join(f"{k} {v}" for k, v in
                                                   report.changes.items() if v)
                                         or "nothing to change")
                  + f"; {len(report.folded)} BatchNorm folded")
    print(f"format: {choice.title}")
    return 0


register("summary", "build the quantized model and print a table of its quantizers",
         add_arguments, run, EPILOG)
