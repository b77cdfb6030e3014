"""``qdq verify``: ONNX Runtime against PyTorch on the same inputs, with a flip analysis."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qdqapp.cli import CliError, register
from qdqapp.cli.cmd_export import add_shared_arguments, build_quantized, parse_quantized
from qdqapp.flow import on_device
from qdqapp.specs import number

EPILOG = """examples:
  qdq verify torchvision:resnet18 r18.onnx --checkpoint runs/r18/quantized.pt
  qdq verify torchvision:resnet18 r18.onnx --data random:8x3x64x64 --seed 3 --batch 16
  qdq verify reference ref.onnx --checkpoint runs/calib/quantized.pt --data fashion-mnist
  qdq verify hf:minilm minilm.onnx --checkpoint runs/minilm/quantized.pt \\
      --data text:sentences.txt

Give the model options 'qdq export' was given (a quantized-model --checkpoint, or the
same --data, --seed, --ignore, --no-rules and --calibrator) so the same quantized model
is rebuilt. The inputs are a fixed batch: the first calibration batch of --data, or
seeded random inputs of the recorded input shape (text models need --data). The forced
run feeds PyTorch ONNX Runtime's quantized activations, so rounding flips cannot
cascade; exit status 1 when Q/DQ differ on identical input, a difference is not a
one-step flip at a rounding boundary, or the forced outputs differ by more than --rel-l2.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_shared_arguments(p)
    p.add_argument("onnx", help="the exported ONNX file")
    p.add_argument("--batch", type=int, default=64,
                   help="rows of the input batch (default 64; at most what --data gives)")
    p.add_argument("--rel-l2", type=float, default=1e-3,
                   help="tolerance for the forced outputs (default 1e-3)")
    p.add_argument("--noise-floor", action="store_true",
                   help="also run PyTorch against itself with oneDNN/cuDNN off")


def run(args: argparse.Namespace) -> int:
    from export import VerifyError, verify

    if not Path(args.onnx).is_file():
        raise CliError(f"ONNX file {args.onnx}: no such file")
    if args.batch < 1:
        raise CliError(f"--batch {args.batch}: expected a positive number of rows")
    number(args.rel_l2, "--rel-l2", 0)
    specs = parse_quantized(args, sentences="the sentences to compare on")
    session = build_quantized(specs, progress=not args.quiet)
    example = session.prepared.example
    if session.source is not None:
        inputs = session.source.check_batch(args.batch)
    else:
        shape = (args.batch, *example.shape[1:])
        inputs = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    try:
        report = verify(session.model, args.onnx, on_device(inputs, session.prepared.device),
                        noise_floor=args.noise_floor)
    except VerifyError as err:
        raise CliError(str(err)) from err
    print(report)
    ok = report.ok(args.rel_l2)
    print("OK: same function up to rounding-boundary flips" if ok else "MISMATCH")
    return 0 if ok else 1


register("verify", "compare an ONNX file in ONNX Runtime with the PyTorch model",
         add_arguments, run, EPILOG)
