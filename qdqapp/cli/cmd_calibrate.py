"""``qdq calibrate``: build the quantized model, calibrate it on data, write the
quantized-model file every other command reads (for w8/w4 nothing is calibrated: the file
holds the integer weights)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass

from qdq.fileio import atomic_write
from qdqapp.cli import CliError, register
from qdqapp.cli.options import (
    add_calibrator_option,
    add_data_options,
    add_force_option,
    add_model_options,
    data_spec,
    eval_spec,
    model_spec,
)
from qdqapp.flow import Session, calibrate_model, leave_uncalibrated_in_float
from qdqapp.formats import default_calibrators, weight_only_rows, weight_only_table
from qdqapp.outputs import MARKER, OutputFolder, OutputSpec, parse_output
from qdqapp.specs import DataSpec, EvalSpec, ModelSpec, parse_calibrator, parse_calibrators

log = logging.getLogger("qdqapp")

QUANTIZED = "quantized.pt"

EPILOG = f"""examples:
  qdq calibrate torchvision:resnet18 --data random:8x3x32x32 --out runs/calib
  qdq calibrate reference --data fashion-mnist --calibrator percentile-99.99 \\
      --calib-batches 16 --out runs/calib
  qdq calibrate reference --data fashion-mnist --compare --out runs/calib
  qdq calibrate mypkg.models:build_net --checkpoint net.pt --data images/ --image-size 224 \\
      --ignore head.fc --out runs/calib
  qdq calibrate reference --data fashion-mnist --format fp8 --calibrator mse --out runs/fp8
  qdq calibrate reference --data fashion-mnist --format w8 --out runs/w8
  qdq calibrate hf:minilm --data text:sentences.txt --smoothquant --batch-size 16 \\
      --out runs/minilm

writes into --out:
  {QUANTIZED}       the quantized model (quantizers, placement rules, amax, weights):
                      pass it as --checkpoint to export, verify, sensitivity, summary, run
  calibration.json  amax of every quantizer, and how they were calibrated
  calibration.txt   the same as a table
  with --compare also calibrators.md and calibrators.json: each calibrator evaluated on
  --data (accuracy, or top-1 agreement with FP32 without labels, or for text --eval: the
  min or mean cosine of sentence embeddings vs FP32); the best is kept.
  with --smoothquant also smoothquant.txt and smoothquant.json: per layer, the alpha and
  the quantized output error before and after (the file carries the smoothed model).

--format fp8 calibrates with max, mse or percentile-P (mse searches the E4M3 grid); w8/w4
quantize the weights only, so nothing is calibrated: calibration.json and .txt then list
the integer weights (bits, block size, scales).

The folder is marked as qdq calibrate's ({MARKER}): qdq run and sensitivity refuse to
write into it, and export and build to replace a file in it, unless --force; calibrating
into it again replaces these files. Every flag is checked before any work.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_data_options(p, evaluation=True)
    p.add_argument("--out", required=True, help="folder for the results (created)")
    add_calibrator_option(p)
    p.add_argument("--compare", action="store_true",
                   help="evaluate several calibrators on --data and keep the best")
    p.add_argument("--calibrators", metavar="LIST",
                   help="comma-separated calibrators for --compare (default: max, entropy, "
                        "percentile-99.9/99.99/99.999, mse; fp8 without entropy)")
    add_force_option(p)


@dataclass(frozen=True)
class CalibrateSpecs:
    """Everything ``qdq calibrate`` was asked, parsed: ``calibrators`` are the ones
    ``--compare`` tries, or the one ``--calibrator``."""

    model: ModelSpec
    data: DataSpec
    eval: EvalSpec
    out: OutputSpec
    calibrators: tuple[str, ...]
    compare: bool


def parse(args: argparse.Namespace) -> CalibrateSpecs:
    """The flags, checked once, before any work."""
    out = parse_output(args.out, "calibrate", force=args.force)
    model = model_spec(args)
    fmt = model.format
    if args.compare and fmt.weight_only:
        raise CliError(f"--compare: {fmt.name} is weight-only, nothing is calibrated")
    if args.calibrators is not None and not args.compare:
        raise CliError("--calibrators: the list is for --compare; one calibrator is "
                       "--calibrator")
    if args.compare:
        names = parse_calibrators(args.calibrators, fmt, "calibrators") \
            if args.calibrators is not None else tuple(default_calibrators(fmt))
    else:
        names = (parse_calibrator(args.calibrator, fmt),)
    data = data_spec(args, model)
    return CalibrateSpecs(model, data, eval_spec(args, model, data), out, names, args.compare)


def calibration_record(session: Session, calibrator: str, summary=None,
                       left_float: list[str] | None = None) -> dict:
    """What calibration.json holds: how, on what, and every quantizer's amax (its
    ``calibrator``: the search that found it), and where the file came from."""
    import qdq
    from qdq.provenance import provenance

    record = {"provenance": provenance(session.prepared.device),
              "calibrator": calibrator, "data": session.data_spec,
              "left_in_float": left_float or [], **session.choice.as_dict()}
    if summary is not None:
        record.update(num_batches=summary.num_batches, num_samples=summary.num_samples,
                      seconds=round(summary.seconds, 2))
    record["quantizers"] = [r.as_dict() for r in qdq.summary_rows(session.model)]
    if session.choice.weight_only:
        record["weights"] = weight_only_rows(session.model)
    return record


def run(args: argparse.Namespace) -> int:
    import qdq
    import sensitivity
    from qdqapp.evaluate import evaluation

    specs = parse(args)
    progress = not args.quiet
    session = Session.open(specs.model, specs.data, progress=progress)
    prepared, source, choice = session.prepared, session.source, session.choice
    if specs.compare:  # the metric, its FP32 reference computed with the quantizers off
        eval_fn, metric = evaluation(source, prepared.model, prepared.device,
                                     specs.eval.agreement, specs.eval.name)
    with OutputFolder(specs.out) as out:
        if prepared.smoothquant is not None:
            prepared.smoothquant.write(out)
        if specs.compare:
            table = sensitivity.compare_calibrators(
                prepared.model, source.calib(), eval_fn, methods=list(specs.calibrators),
                num_batches=specs.data.calib_batches, device=prepared.device,
                progress=progress, metric_name=metric)
            left = leave_uncalibrated_in_float(prepared.model)
            table.write(out)
            chosen, summary = table.best, None
            print(table.markdown())
        else:
            chosen = None if choice.weight_only else specs.calibrators[0]
            summary, left = calibrate_model(prepared, source.calib(),
                                            specs.data.calib_batches, chosen,
                                            progress=progress)
        record = calibration_record(session, chosen, summary, left)
        atomic_write(out / "calibration.json", json.dumps(record, indent=1) + "\n")
        text = weight_only_table(prepared.model) if choice.weight_only \
            else qdq.summary(prepared.model)
        atomic_write(out / "calibration.txt", text + "\n")
        session.save(out / QUANTIZED, calibrator=chosen)
        print(text)
    print(f"wrote {out}")
    return 0


register("calibrate", "quantize a model, calibrate it on data, write the quantized-model file",
         add_arguments, run, EPILOG)
