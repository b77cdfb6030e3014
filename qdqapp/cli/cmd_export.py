"""``qdq export``: quantize, calibrate (or load a calibrated checkpoint) and write Q/DQ ONNX."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qdqapp.cli import CliError, register
from qdqapp.models import load_model, parse_shape, read_state_dict

EPILOG = """examples:
  qdq export torchvision:resnet18 --calib random --shape 8,3,224,224 --out resnet18.onnx
  qdq export torchvision:mobilenet_v2 --calib random --int8-weights --out mnv2.onnx
  qdq export torchvision:resnet18 --rules --calib random --lint --out resnet18_placed.onnx
  qdq export mypkg.models:build_net --checkpoint calibrated.pt --out net.onnx
  qdq export torchvision:resnet18 --calib random --fp16-out resnet18_fp16.onnx --out r.onnx

A checkpoint is a state_dict of the float model or of the quantized model (with the
quantizers' _amax entries, e.g. saved after calibration or QAT). Without amax values,
pass --calib random to calibrate on random data of --shape.
"""


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options that rebuild the quantized model (shared with ``qdq verify``)."""
    p.add_argument("model", help="torchvision:NAME, package.module:factory or reference")
    p.add_argument("--checkpoint", help="state_dict of the float or the quantized model")
    p.add_argument("--shape", default="1,3,224,224",
                   help="input shape for calibration and tracing (default 1,3,224,224)")
    p.add_argument("--calib", choices=["none", "random"], default="none",
                   help="calibrate on random data of --shape (default: none, the checkpoint "
                        "must hold amax)")
    p.add_argument("--calib-batches", type=int, default=2, metavar="N",
                   help="random batches for --calib random (default 2)")
    p.add_argument("--ignore", action="append", default=[],
                   help="module name to keep in float (repeatable)")
    p.add_argument("--rules", action="store_true",
                   help="apply the TensorRT placement rules (qdq.rules.apply_rules): fold BN, "
                        "quantize residual inputs, share concat/maxpool scales")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for random weights and random calibration data (default 0)")


def prepare_model(args: argparse.Namespace) -> torch.nn.Module:
    """Float model -> quant twins -> checkpoint -> optional random calibration, eval mode."""
    import qdq

    torch.manual_seed(args.seed)
    model = load_model(args.model).eval()
    qdq.replace_modules(model, ignore=args.ignore or None)
    if args.checkpoint:
        _load_checkpoint(model, Path(args.checkpoint), args.model)
    if args.rules:
        from qdq.rules import apply_rules

        model = apply_rules(model, torch.zeros(parse_shape(args.shape))).eval()
    if args.calib == "random":
        shape = parse_shape(args.shape)
        gen = torch.Generator().manual_seed(args.seed)
        for _, q in qdq.quantizers(model):
            q.calibrator.reset()
            q.disable_quant()
            q.enable_calib()
        with torch.no_grad():
            for _ in range(max(1, args.calib_batches)):
                try:
                    model(torch.randn(shape, generator=gen))
                except Exception as err:  # noqa: BLE001 - one line naming the shape
                    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                    raise CliError(f"the model does not run on inputs of shape "
                                   f"{list(shape)} (--shape): {first}") from err
        for _, q in qdq.quantizers(model):
            q.load_calib_amax(strict=False)
            q.enable_quant()
            q.disable_calib()
    return model


def _load_checkpoint(model: torch.nn.Module, path: Path, spec: str) -> None:
    result = model.load_state_dict(read_state_dict(path), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_amax")]
    if missing or result.unexpected_keys:
        shown = (missing + list(result.unexpected_keys))[:3]
        raise CliError(f"checkpoint {path} does not fit {spec}: "
                       f"{len(missing)} missing and {len(result.unexpected_keys)} unexpected "
                       f"keys, e.g. {shown}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=13, help="ONNX opset (default 13)")
    p.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm unfolded")
    p.add_argument("--int8-weights", action="store_true",
                   help="store weights as int8 initializers -> DQ (about 4x smaller)")
    p.add_argument("--static-batch", action="store_true", help="do not mark dim 0 dynamic")
    p.add_argument("--dynamo", action="store_true",
                   help="use torch's dynamo exporter (static shapes, opset 18+)")
    p.add_argument("--fp16-out", help="also write an fp16 copy (Q/DQ kept fp32) here")
    p.add_argument("--lint", action="store_true", help="print lint findings after export")


def run(args: argparse.Namespace) -> int:
    from export import ExportError, check_qdq, format_findings, to_fp16, to_onnx

    model = prepare_model(args)
    example = torch.randn(parse_shape(args.shape), generator=torch.Generator().manual_seed(1))
    try:
        result = to_onnx(model, example, args.out, opset=args.opset,
                         dynamic_batch=not args.static_batch and not args.dynamo,
                         fold_bn=not args.no_fold_bn, int8_weights=args.int8_weights,
                         dynamo=args.dynamo)
    except ExportError as err:
        hint = (" (pass --calib random or a calibrated checkpoint)"
                if "have no amax" in str(err) else "")
        raise CliError(f"{err}{hint}") from err
    print(f"wrote {result}")
    if args.fp16_out:
        print(f"wrote {to_fp16(result.path, args.fp16_out)} (fp16, Q/DQ in fp32)")
    if args.lint:
        print(format_findings(check_qdq(result.path)))
    return 0


register("export", "quantize a model and write an opset-13 Q/DQ ONNX file", add_arguments,
         run, EPILOG)
