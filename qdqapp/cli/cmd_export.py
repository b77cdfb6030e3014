"""``qdq export``: the quantized model (from a quantized-model file, or calibrated on
--data) to a Q/DQ ONNX file in its format (INT8 and W8 opset 13, FP8 19, W4 21)."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import warnings
from dataclasses import dataclass

from qdqapp.cli import CliError, register
from qdqapp.cli.options import (
    add_calibrator_option,
    add_data_options,
    add_force_option,
    add_model_options,
    data_spec,
    model_spec,
)
from qdqapp.flow import Session, calibrate_model, on_device
from qdqapp.formats import size_text
from qdqapp.logs import library_chatter
from qdqapp.outputs import NewFiles, OutputSpec, parse_output
from qdqapp.specs import DataSpec, ModelSpec, parse_calibrator

log = logging.getLogger("qdqapp")

EPILOG = """examples:
  qdq calibrate torchvision:resnet18 --data random:8x3x224x224 --out runs/r18
  qdq export torchvision:resnet18 --checkpoint runs/r18/quantized.pt --out resnet18.onnx
  qdq export torchvision:resnet18 --data random:8x3x224x224 --out resnet18.onnx
  qdq export torchvision:mobilenet_v2 --data random:8x3x224x224 --int8-weights --out mnv2.onnx
  qdq export reference --checkpoint runs/calib/quantized.pt --fp16-out ref_fp16.onnx \\
      --lint --out ref.onnx
  qdq export torchvision:resnet18 --data random:8x3x224x224 --format fp8 --out r18_fp8.onnx
  qdq export reference --format w4 --block-size 32 --ignore stem.0.0 --out ref_w4.onnx
  qdq export hf:minilm --checkpoint runs/minilm/quantized.pt --out minilm.onnx

The model comes from --checkpoint when it is a quantized-model file (qdq calibrate, qdq run
or qdq.save wrote it: quantizers, placement rules and amax included). Otherwise it is built
here (rules on unless --no-rules, SmoothQuant with --smoothquant) in --format and
calibrated on --data with --calibrator (w8/w4 need no calibration: --data only gives the
input shape, which the model may know). The input shape traced is one sample of --data, or
the one recorded in the quantized-model file. Text models (hf:DIR) export input_ids and
attention_mask with dynamic batch and sequence axes. The opset is the lowest the format
allows unless --opset says otherwise; the line printed names the format, the file size and
how much smaller than FP32 weights it is.
"""


def add_shared_arguments(p: argparse.ArgumentParser) -> None:
    """Model and data options (shared with ``qdq verify``, which rebuilds the same model)."""
    add_model_options(p)
    add_data_options(p, required=False,
                     data_help="data to calibrate on when the model has no amax yet, and "
                               "whose sample shape is traced: fashion-mnist, "
                               "imagefolder:DIR, random:NxCxHxW or text:FILE")
    add_calibrator_option(p)


@dataclass(frozen=True)
class QuantizedSpecs:
    """The model export and verify rebuild, and the data that calibrates it (when it has
    no amax yet) and gives its input shape."""

    model: ModelSpec
    data: DataSpec | None
    calibrator: str


def parse_quantized(args: argparse.Namespace, opset: int | None = None,
                    sentences: str | None = None) -> QuantizedSpecs:
    """The model, data and calibrator flags of export and verify, checked; ``opset`` (the
    one asked for) must suit the format; ``sentences``: what a text model needs --data
    for when it must have some."""
    model = model_spec(args)
    calibrator = parse_calibrator(args.calibrator, model.format)
    fmt = model.format
    if sentences is not None and args.data is None and model.takes_text:
        raise CliError(f"model {model.spec} takes text: pass --data text:FILE for "
                       f"{sentences}")
    if opset is not None and opset < fmt.min_opset:
        raise CliError(f"--opset {opset}: {fmt.title} needs opset {fmt.min_opset} or "
                       "newer (leave --opset out for the lowest it allows)")
    if args.data is None and not model.restores and not fmt.weight_only:
        raise CliError("the model has no amax yet: pass --checkpoint QUANTIZED.pt (from "
                       "qdq calibrate) or --data SPEC to calibrate on")
    data = data_spec(args, model)
    if data is None and not model.restores and model.example_shape() is None:
        raise CliError(f"model {model.spec}: no input shape known; pass --data SPEC")
    return QuantizedSpecs(model, data, calibrator)


def build_quantized(specs: QuantizedSpecs, progress: bool = True) -> Session:
    """The model both export and verify use: restored, or prepared and calibrated."""
    session = Session.open(specs.model, specs.data, progress=progress)
    if session.prepared.example is None:
        raise CliError(f"model {specs.model.spec}: no input shape known; pass --data SPEC")
    if session.prepared.uncalibrated():
        if session.source is None:
            raise CliError(f"{len(session.prepared.uncalibrated())} quantizers of "
                           f"{session.prepared.checkpoint.path} have no amax; pass --data "
                           "SPEC to calibrate them")
        calibrate_model(session.prepared, session.source.calib(), specs.data.calib_batches,
                        specs.calibrator, progress=progress)
    return session


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_shared_arguments(p)
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int,
                   help="ONNX opset (default: the lowest the format allows: INT8 and W8 13, "
                        "FP8 19, W4 and blocks 21)")
    p.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm unfolded")
    p.add_argument("--int8-weights", action="store_true",
                   help="store weights as int8 (FP8: float8e4m3fn) initializers -> DQ "
                        "(about 4x smaller; w8/w4 always store integer weights)")
    p.add_argument("--static-batch", action="store_true", help="do not mark dim 0 dynamic")
    p.add_argument("--dynamo", action="store_true",
                   help="use torch's dynamo exporter (static shapes, opset 18+); its "
                        "messages go to the log (--debug shows them)")
    p.add_argument("--fp16-out", help="also write an fp16 copy (Q/DQ kept fp32) here")
    p.add_argument("--lint", action="store_true", help="print lint findings after export")
    add_force_option(p)


@contextlib.contextmanager
def _quiet_exporter(enabled: bool):
    """The dynamo exporter prints progress and raises many warnings: keep them in the log
    at debug level instead of on the terminal."""
    if not enabled:
        yield
        return
    out, err = io.StringIO(), io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            warnings.simplefilter("ignore")
            torch_logs = logging.getLogger("torch")
            saved = torch_logs.level
            torch_logs.setLevel(logging.ERROR)
            try:
                yield
            finally:
                torch_logs.setLevel(saved)
    finally:
        for line in (out.getvalue() + err.getvalue()).splitlines():
            log.debug("exporter: %s", line)


@dataclass(frozen=True)
class ExportSpecs:
    quantized: QuantizedSpecs
    out: OutputSpec
    fp16: OutputSpec | None
    opset: int | None


def parse(args: argparse.Namespace) -> ExportSpecs:
    """The flags, checked once, before any work."""
    out = parse_output(args.out, "export", folder=False, force=args.force)
    fp16 = parse_output(args.fp16_out, "export", folder=False, what="--fp16-out",
                        force=args.force) if args.fp16_out else None
    if fp16 is not None and fp16.path.resolve() == out.path.resolve():
        raise CliError(f"--fp16-out {args.fp16_out}: the same file as --out")
    opset = args.opset
    if opset is not None and not 13 <= opset <= _newest_opset():
        raise CliError(f"--opset {opset}: Q/DQ export needs 13 or newer, and the installed "
                       f"onnx knows opsets up to {_newest_opset()}")
    return ExportSpecs(parse_quantized(args, opset), out, fp16, opset)


def _newest_opset() -> int:
    import onnx

    return int(onnx.defs.onnx_opset_version())


def run(args: argparse.Namespace) -> int:
    from export import ExportError, check_qdq, format_findings, to_fp16, to_onnx

    specs = parse(args)
    session = build_quantized(specs.quantized, progress=not args.quiet)
    example = on_device(session.prepared.example, session.prepared.device)
    out, fp16 = specs.out.path, specs.fp16.path if specs.fp16 is not None else None
    with NewFiles([out, fp16]):
        try:
            with _quiet_exporter(args.dynamo), library_chatter("exporting to ONNX"):
                result = to_onnx(session.model, example, out, opset=specs.opset,
                                 dynamic_batch=not args.static_batch and not args.dynamo,
                                 fold_bn=not args.no_fold_bn, int8_weights=args.int8_weights,
                                 dynamo=args.dynamo)
        except ExportError as err:
            raise CliError(str(err)) from err
        print(f"wrote {result}")
        print(f"format: {session.choice.title}; "
              f"{size_text(result.bytes, result.fp32_bytes)}")
        if fp16 is not None:
            print(f"wrote {to_fp16(result.path, fp16)} (fp16, Q/DQ in fp32)")
    if args.lint:
        print(format_findings(check_qdq(result.path)))
    return 0


register("export", "write the quantized model as a Q/DQ ONNX file", add_arguments,
         run, EPILOG)
