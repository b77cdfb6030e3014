"""The options every command spells the same way, and their one parse into specs
(:mod:`qdqapp.specs`): the model (``MODEL``, ``--checkpoint``, ``--format`` with
``--block-size`` and ``--weight-method``, ``--no-rules``, ``--ignore``, ``--seed``,
``--device``, ``--smoothquant``), the data (``--data`` and how much of it), ``--eval``,
the calibrator and ``--force``."""

from __future__ import annotations

import argparse

from qdqapp.calibrators import DEFAULT_COMPARISON
from qdqapp.sources import DataOptions
from qdqapp.specs import (
    DataSpec,
    EvalSpec,
    ModelSpec,
    parse_data,
    parse_eval,
    parse_model,
)

__all__ = ["add_model_options", "add_format_options", "add_data_options",
           "add_calibrator_option", "add_force_option", "model_spec", "data_spec",
           "eval_spec", "MODEL_HELP", "DATA_HELP", "CHECKPOINT_HELP", "SMOOTHQUANT_HELP",
           "SMOOTHQUANT_ALPHA_HELP", "EVAL_HELP", "FORCE_HELP"]

MODEL_HELP = ("reference, torchvision:NAME, hf:DIR (a local transformers folder; hf:minilm "
              "the shipped all-MiniLM-L6-v2) or package.module:factory")
DATA_HELP = ("fashion-mnist[:ROOT], imagefolder:DIR (or DIR), random:NxCxHxW (a batch "
             "shape), or text:FILE (one sentence per line, for hf: models; text:DIR takes "
             "DIR/calib.txt and DIR/test.txt)")
SMOOTHQUANT_HELP = ("SmoothQuant after inserting quantizers and before calibrating: move "
                    "activation outliers of every quantized Linear into its weights, exact "
                    "in float; needs --data")
SMOOTHQUANT_ALPHA_HELP = ("'auto' (default: searched per layer on the calibration batches) "
                          "or one alpha in [0, 1] for every layer")
EVAL_HELP = ("metric (higher is better): auto (default: top1 for images and text "
             "classifiers, min-cosine for text encoders), top1, min-cosine or mean-cosine "
             "(text encoders: cosine of mean-pooled embeddings vs FP32, the lowest or the "
             "mean over the sentences)")
FORCE_HELP = ("write into a folder another qdq command owns (or replace a file in one); "
              "without it that is refused before any work")
CHECKPOINT_HELP = ("a quantized-model file (written by qdq calibrate, qdq run or qdq.save: "
                   "quantizers, rules and amax come from it) or a float state_dict")


def add_model_options(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--rules", action=argparse.BooleanOptionalAction, default=True,
                   help="TensorRT placement rules: fold BatchNorm, quantize residual "
                        "inputs, share concat/max-pool scales (default on; --no-rules "
                        "to skip)")
    p.add_argument("--ignore", action="append", default=[], metavar="NAME",
                   help="module path kept in float (repeatable)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for random weights and random data (default 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--smoothquant", action="store_true", help=SMOOTHQUANT_HELP)
    p.add_argument("--smoothquant-alpha", default="auto", metavar="auto|FLOAT",
                   help=SMOOTHQUANT_ALPHA_HELP)
    add_format_options(p)


def add_format_options(p: argparse.ArgumentParser) -> None:
    """``--format`` and the weight-only formats' options (``run`` and every model command)."""
    p.add_argument("--format", metavar="NAME",
                   help="int8 (Q/DQ, default), fp8 (FP8 E4M3 Q/DQ, TensorRT on compute "
                        "capability >= 8.9), w8 or w4 (INT8/INT4 weight-only, activations "
                        "float, nothing calibrated); a quantized-model --checkpoint keeps "
                        "its own")
    p.add_argument("--block-size", type=int, metavar="B",
                   help="w8/w4: one scale per B inputs of each output channel (B must "
                        "divide every quantized layer's input dimension; default: one "
                        "scale per output channel)")
    p.add_argument("--weight-method", "--weight-amax", dest="weight_method", metavar="METHOD",
                   help="w8/w4: how the weights are quantized: max (default: each channel's "
                        "or block's largest |w|), mse (the best of 11 clip ratios of it), "
                        "awq (activation-aware scales) or gptq (second-order error "
                        "compensation); awq and gptq learn from the calibration batches "
                        "(--data). --weight-amax is its old name")


def add_data_options(p: argparse.ArgumentParser, required: bool = True,
                     evaluation: bool = False, data_help: str | None = None) -> None:
    defaults = DataOptions()
    p.add_argument("--data", required=required, help=data_help or DATA_HELP)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help=f"batch size for data read from files (default {defaults.batch_size})")
    p.add_argument("--calib-batches", type=int, default=defaults.calib_batches, metavar="N",
                   help=f"calibration batches (default {defaults.calib_batches})")
    p.add_argument("--image-size", type=int, default=defaults.image_size,
                   help=f"image folders: centre crop size (default {defaults.image_size}, "
                        "resized to 8/7 of it first)")
    if evaluation:
        p.add_argument("--eval-batches", type=int, metavar="N",
                       help="evaluation batches per measurement (default: all)")
        p.add_argument("--agreement", action="store_true",
                       help="score by top-1 agreement with FP32 even when labels exist")
        p.add_argument("--eval", default="auto", metavar="NAME", help=EVAL_HELP)


def add_calibrator_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibrator", default="max", metavar="NAME",
                   help="max, entropy, mse or percentile-P, e.g. percentile-99.99 "
                        f"(default max; --compare tries {', '.join(DEFAULT_COMPARISON)})")


def add_force_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help=FORCE_HELP)


def model_spec(args: argparse.Namespace, spec: str | None = None) -> ModelSpec:
    """The model flags, parsed (:func:`qdqapp.specs.parse_model`)."""
    return parse_model(spec or args.model, checkpoint=args.checkpoint, rules=args.rules,
                       ignore=args.ignore or [], seed=args.seed, device=args.device,
                       smoothquant=args.smoothquant,
                       smoothquant_alpha=args.smoothquant_alpha, format=args.format,
                       block_size=args.block_size, weight_method=args.weight_method)


def data_spec(args: argparse.Namespace, model: ModelSpec,
              spec: str | None = None) -> DataSpec | None:
    """``--data`` and its sizes, parsed (:func:`qdqapp.specs.parse_data`); ``spec``
    stands in for a missing ``--data``."""
    return parse_data(spec if spec is not None else args.data, model=model,
                      batch_size=args.batch_size, calib_batches=args.calib_batches,
                      eval_batches=getattr(args, "eval_batches", None),
                      image_size=args.image_size)


def eval_spec(args: argparse.Namespace, model: ModelSpec, data: DataSpec | None) -> EvalSpec:
    """``--eval`` and ``--agreement``, parsed (:func:`qdqapp.specs.parse_eval`)."""
    return parse_eval(args.eval, model=model, data=data, agreement=args.agreement)
