"""``qdq run``: the whole job into one run folder (see ``qdqapp.pipeline``)."""

from __future__ import annotations

import argparse
import dataclasses

from qdqapp.cli import CliError, register
from qdqapp.cli.options import (
    CHECKPOINT_HELP,
    DATA_HELP,
    EVAL_HELP,
    MODEL_HELP,
    SMOOTHQUANT_ALPHA_HELP,
    SMOOTHQUANT_HELP,
    add_force_option,
    add_format_options,
)

EPILOG = """examples:
  qdq run                                    # the Fashion-MNIST reference demo
  qdq run --model torchvision:resnet18 --data random:8x3x224x224 --out runs/r18
  qdq run --config run.yaml --max-drop 0.5   # flags override the config file
  qdq run --model mypkg.nets:build --checkpoint net.pt --data imagefolder:/data/imagenet \\
          --eval mypkg.nets:evaluate --qat-epochs 1
  qdq run --model reference --checkpoint runs/calib/quantized.pt --calibrator max
  qdq run --format fp8 --out runs/fp8        # FP8 E4M3 (entropy is not compared)
  qdq run --format w4 --block-size 32 --ignore stem.0.0 --out runs/w4
  qdq run --model hf:minilm --data text:sentences/ --smoothquant --out runs/minilm
      # text:DIR: DIR/calib.txt calibrates, DIR/test.txt scores (min cosine vs FP32)

--checkpoint takes a float state_dict or a quantized-model file (qdq calibrate writes
one); the run keeps its model as quantized.pt after every stage that changes it.
--format w8/w4 quantize weights only: calibration, the per-layer SQNR, the sweep, partial
quantization and QAT are skipped (the report says why); the summary names the format, the
ONNX file's size and how much smaller it is than with FP32 weights.

A re-run with the same --out skips the stages that finished; --restart starts over
and deletes only the files the earlier run wrote. The folder is marked as a run's: other
commands refuse to write into it, and qdq run refuses another command's folder, unless
--force. Every flag and config key is checked before any work or file.
Config files (YAML or TOML) use the same keys as the flags, e.g.:
  model: torchvision:resnet50
  data: imagefolder:/data/imagenet
  calibrators: [max, entropy, percentile-99.99, mse]
  max_drop: 0.5
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qdqapp.calibrators import DEFAULT_COMPARISON
    from qdqapp.pipeline import RunConfig

    defaults = RunConfig()
    p.add_argument("--config", help="YAML or TOML file with the same keys as the flags")
    p.add_argument("--restart", action="store_true", help="discard an earlier run in --out")
    add_force_option(p)
    p.add_argument("--out", help=f"run folder (default {defaults.out})")
    p.add_argument("--model", help=f"{MODEL_HELP} (default {defaults.model})")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--data", help=f"{DATA_HELP} (default {defaults.data})")
    p.add_argument("--eval", help=f"{EVAL_HELP}; or package.module:fn(model, loader) -> "
                   "float")
    p.add_argument("--batch-size", type=int, help=f"default {defaults.batch_size}")
    p.add_argument("--calib-batches", type=int, help=f"default {defaults.calib_batches}")
    p.add_argument("--eval-batches", type=int, help="evaluate on this many batches only")
    p.add_argument("--image-size", type=int, help="image folders: centre crop size "
                   f"(default {defaults.image_size})")
    add_format_options(p)
    p.add_argument("--calibrators", help="comma-separated list to compare (default "
                   f"{','.join(DEFAULT_COMPARISON)}; fp8 without entropy)")
    p.add_argument("--calibrator", help="use this calibrator, skip the comparison")
    p.add_argument("--rules", action=argparse.BooleanOptionalAction, default=None,
                   help="TensorRT placement rules (default on; --no-rules to skip)")
    p.add_argument("--ignore", action="append", metavar="NAME",
                   help="module path kept in float (repeatable)")
    p.add_argument("--sweep", help="leave-one-out, one-at-a-time or none")
    p.add_argument("--max-drop", type=float, help="allowed metric drop from FP32 (default "
                   "0.3 for percentages, 0.005 for cosines)")
    p.add_argument("--qat-epochs", type=int, help="QAT fine-tune epochs (default 0: no QAT)")
    p.add_argument("--qat-lr", type=float, help=f"default {defaults.qat_lr}")
    p.add_argument("--qat-steps", type=int, help="at most this many training steps per QAT "
                   "epoch (default: the whole training split)")
    p.add_argument("--int8-weights", action="store_const", const=True,
                   help="store weights as int8 (FP8: float8e4m3fn) initializers in the "
                        "ONNX file (w8/w4 always store integer weights)")
    p.add_argument("--no-tensorrt", dest="tensorrt", action="store_const", const=False,
                   help="skip the TensorRT stage even when TensorRT is installed")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--smoothquant", action="store_const", const=True, help=SMOOTHQUANT_HELP)
    p.add_argument("--smoothquant-alpha", metavar="auto|FLOAT", help=SMOOTHQUANT_ALPHA_HELP)
    p.add_argument("--seed", type=int, help="seed for random weights, random data, "
                   f"shuffling and QAT (default {defaults.seed})")


def run(args: argparse.Namespace) -> int:
    from qdqapp.pipeline import RunConfig, load_config, run_pipeline

    keys = {f.name for f in dataclasses.fields(RunConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in keys}
    specs = load_config(args.config, force=args.force, **overrides)  # ConfigError: 2
    result = run_pipeline(specs, restart=args.restart, progress=not args.quiet)
    if not result.ok:
        raise CliError("FAILED: " + "; ".join(result.failed_checks), code=1)
    return 0


register("run", "the whole job: quantize, calibrate, sweep, export, check", add_arguments,
         run, EPILOG)
