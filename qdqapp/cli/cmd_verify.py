"""``qdq verify``: ONNX Runtime against PyTorch on the same inputs, with a flip analysis."""

from __future__ import annotations

import argparse
from pathlib import Path

from qdqapp.cli import CliError, register
from qdqapp.cli.cmd_export import add_shared_arguments, build_quantized, parse_quantized
from qdqapp.onnx_check import CHECK_ROWS, check_inputs, check_onnx
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
seeded random inputs of the recorded input shape (text models need --data); 'qdq run'
checks the same batch with the same function, so both give the same verdict. The
forced run feeds PyTorch ONNX Runtime's quantized activations, so rounding flips cannot
cascade; exit status 1 when Q/DQ differ on identical input, a code differs where no
rounding boundary lies within float noise of PyTorch's value (on the format's own grid:
FP8's step shrinks near zero, so float noise can cross several codes there), or the
forced outputs differ by more than --rel-l2. Text encoders are scored by the cosine of
mean-pooled embeddings; NaN/Inf weights or inputs are one error naming the tensor.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_shared_arguments(p)
    p.add_argument("onnx", help="the exported ONNX file")
    p.add_argument("--batch", type=int, default=CHECK_ROWS,
                   help=f"rows of the input batch (default {CHECK_ROWS}, as qdq run checks; "
                        "at most what --data gives)")
    p.add_argument("--rel-l2", type=float, default=1e-3,
                   help="tolerance for the forced outputs (default 1e-3)")
    p.add_argument("--noise-floor", action="store_true",
                   help="also run PyTorch against itself with oneDNN/cuDNN off")


def run(args: argparse.Namespace) -> int:
    if not Path(args.onnx).is_file():
        raise CliError(f"ONNX file {args.onnx}: no such file")
    if args.batch < 1:
        raise CliError(f"--batch {args.batch}: expected a positive number of rows")
    number(args.rel_l2, "--rel-l2", 0, above=True)
    specs = parse_quantized(args, sentences="the sentences to compare on")
    session = build_quantized(specs, progress=not args.quiet)
    check = check_onnx(session.model, args.onnx, check_inputs(session, args.batch, args.seed),
                       session.prepared.device, rel_l2=args.rel_l2,
                       noise_floor=args.noise_floor)
    print(check.text())
    return 0 if check.ok else 1


register("verify", "compare an ONNX file in ONNX Runtime with the PyTorch model",
         add_arguments, run, EPILOG)
