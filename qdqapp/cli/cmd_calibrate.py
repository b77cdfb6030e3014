"""``qdq calibrate``: insert quantizers, calibrate on data, save amax and a summary."""

from __future__ import annotations

import argparse
import json
import logging
from functools import partial
from itertools import islice
from pathlib import Path

import torch

from qdq.fileio import atomic_write
from qdqapp.cli import CliError, register
from qdqapp.models import load_model

log = logging.getLogger("qdqapp.cli")

EPILOG = """examples:
  qdq calibrate torchvision:resnet18 --data random:8x3x32x32 --out runs/calib
  qdq calibrate reference --data fashion-mnist --method histogram --amax-method percentile \\
      --percentile 99.99 --num-batches 16 --out runs/calib
  qdq calibrate reference --data fashion-mnist --compare --out runs/calib
  qdq calibrate mypkg.models:build_net --checkpoint net.pt --data images/ --image-size 224 \\
      --ignore head.fc --out runs/calib

writes into --out: calibration.json and calibration.txt (amax of every quantizer),
calibrated.pt (state_dict with amax; load it into the same quantized model), and with
--compare calibrators.md/json (each amax method evaluated; the best is kept).
"""


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Model, data and calibration options shared with ``qdq sensitivity``."""
    p.add_argument("model", help="torchvision:NAME, package.module:factory or reference")
    p.add_argument("--checkpoint", help="state_dict to load into the float model")
    p.add_argument("--data", required=True,
                   help="fashion-mnist, random:NxCxHxW (batch shape) or an image folder")
    p.add_argument("--out", required=True, help="folder for the results (created)")
    p.add_argument("--ignore", action="append", default=[],
                   help="exact module name to keep in float (repeatable)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224, help="for image folders")
    p.add_argument("--calib-batches", "--num-batches", dest="calib_batches", type=int,
                   default=8, metavar="N", help="calibration batches (default 8)")
    p.add_argument("--method", choices=["max", "histogram"], default="max",
                   help="activation calibrator (weights: per-channel max)")
    p.add_argument("--amax-method", choices=["entropy", "percentile", "mse", "max"],
                   help="amax search for histograms (default entropy)")
    p.add_argument("--percentile", type=float, default=99.99)
    p.add_argument("--no-rules", action="store_true",
                   help="skip BN folding and TensorRT placement rules")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def first_input(data) -> torch.Tensor:
    for batch in data:
        return batch if isinstance(batch, torch.Tensor) else batch[0]
    raise CliError("the data gave no batch")


def prepare_model(args: argparse.Namespace):
    """Float model -> BN folded -> quantizers inserted -> placement rules, on the device."""
    import qdq
    from qdqapp.sources import check_spec

    check_spec(args.data)  # fail on bad data before the model is built
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(args.model, args.checkpoint).eval().to(device)
    rules = None
    if not args.no_rules:
        try:
            import qdq.rules as rules
        except ImportError:
            log.info("qdq.rules is not available: quantizers stay where replace_modules "
                     "puts them")
    example = None
    if rules is not None:
        from qdqapp.sources import load_data

        example = (first_input(load_data(args.data, "calib", args.batch_size, 1,
                                         args.image_size)).to(device),)
        if hasattr(rules, "fold_batchnorm"):
            folded = rules.fold_batchnorm(model, example)
            log.info("folded %d BatchNorm layers", len(folded))
    qdq.replace_modules(model, ignore=args.ignore or None)
    if rules is not None and hasattr(rules, "apply_rules"):
        model = rules.apply_rules(model, example).eval().to(device)
        qdq.name_quantizers(model)
    return model, device


def calibrate_model(args: argparse.Namespace, model, device):
    import sensitivity
    from qdqapp.sources import load_data

    data = load_data(args.data, "calib", args.batch_size, args.calib_batches, args.image_size)
    return sensitivity.calibrate(
        model, data, num_batches=args.calib_batches, method=args.method,
        amax_method=args.amax_method, percentile=args.percentile, device=device,
        progress=not args.quiet,
    )


def eval_function(args: argparse.Namespace, model, device):
    """``(eval_fn, metric name)``: accuracy on labelled data, else agreement with FP32."""
    from qdqapp.evaluate import labelled_by_model, top1_accuracy
    from qdqapp.sources import has_labels, load_data

    limit = args.eval_batches
    data = load_data(args.data, "test", args.batch_size, limit, args.image_size)
    batches = list(islice(data, limit))  # kept in memory: evaluated once per layer
    if args.agreement or not has_labels(args.data):
        batches = labelled_by_model(model, [first_input([b]) for b in batches], device)
        name = "top-1 agreement with FP32 (%)"
    else:
        name = "top-1 accuracy (%)"
    return (lambda m: top1_accuracy(m, batches, device)), name


def write_text(path: Path, text: str) -> None:

    atomic_write(path, text)


def run(args: argparse.Namespace) -> int:

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, device = prepare_model(args)
    if args.compare:
        import sensitivity
        from qdqapp.sources import load_data

        eval_fn, name = eval_function(args, model, device)
        data = load_data(args.data, "calib", args.batch_size, args.calib_batches,
                         args.image_size)
        table = sensitivity.compare_calibrators(
            model, data, eval_fn, num_batches=args.calib_batches, device=device,
            progress=not args.quiet, metric_name=name)
        table.write(out)
        print(table.markdown())
    else:
        summary = calibrate_model(args, model, device)
        write_text(out / "calibration.json", json.dumps(summary.to_dict(), indent=1) + "\n")
        write_text(out / "calibration.txt", str(summary) + "\n")
        print(summary)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(out / "calibrated.pt", partial(torch.save, state))
    print(f"wrote {out}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--compare", action="store_true",
                   help="compare max/entropy/percentile/mse on --data and keep the best")
    p.add_argument("--eval-batches", type=int, default=None, metavar="N",
                   help="evaluation batches for --compare (default: all)")
    p.add_argument("--agreement", action="store_true",
                   help="score --compare by top-1 agreement with FP32 instead of labels")


register("calibrate", "insert quantizers and calibrate them on data", add_arguments, run,
         EPILOG)
