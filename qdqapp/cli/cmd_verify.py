"""``qdq verify``: ONNX Runtime against PyTorch on the same inputs, with a flip analysis."""

from __future__ import annotations

import argparse

import torch

from qdqapp.cli import CliError, register
from qdqapp.cli.cmd_export import add_model_arguments, prepare_model
from qdqapp.models import parse_shape

EPILOG = """examples:
  qdq export torchvision:resnet18 --calib random --shape 8,3,64,64 --out r18.onnx
  qdq verify torchvision:resnet18 r18.onnx --calib random --shape 8,3,64,64 --batch 64
  qdq verify mypkg.models:net net.onnx --checkpoint calibrated.pt --shape 1,3,32,32

Give the same model options as to 'qdq export' (model, checkpoint, --calib, --shape,
--seed, --ignore) so the same quantized model is rebuilt. The forced run feeds PyTorch
ONNX Runtime's quantized activations, so rounding flips cannot cascade; exit status 1
when Q/DQ differ on identical input, a difference is not a one-step flip at a rounding
boundary, or the forced outputs differ by more than --rel-l2.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("onnx", help="the exported ONNX file")
    p.add_argument("--batch", type=int, default=64, help="batch of random inputs (default 64)")
    p.add_argument("--rel-l2", type=float, default=1e-3,
                   help="tolerance for the forced outputs (default 1e-3)")
    p.add_argument("--noise-floor", action="store_true",
                   help="also run PyTorch against itself with oneDNN/cuDNN off")


def run(args: argparse.Namespace) -> int:
    from export import VerifyError, verify

    model = prepare_model(args)
    shape = (args.batch, *parse_shape(args.shape)[1:])
    inputs = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed + 2))
    try:
        report = verify(model, args.onnx, inputs, noise_floor=args.noise_floor)
    except VerifyError as err:
        raise CliError(str(err)) from err
    print(report)
    ok = report.ok(args.rel_l2)
    print("OK: same function up to rounding-boundary flips" if ok else "MISMATCH")
    return 0 if ok else 1


register("verify", "compare an ONNX file in ONNX Runtime with the PyTorch model",
         add_arguments, run, EPILOG)
