"""``qdq summary``: insert quantizers into a model and print where they are."""

from __future__ import annotations

import argparse
import json

import torch

from qdqapp.cli import register
from qdqapp.models import load_model, parse_shape

EPILOG = """examples:
  qdq summary torchvision:resnet18
  qdq summary torchvision:mobilenet_v2 --calibrate 2 --input-shape 4,3,224,224
  qdq summary mypkg.models:build_net --checkpoint net.pt --json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="torchvision:NAME, package.module:factory or reference")
    p.add_argument("--checkpoint", help="state_dict to load into the model")
    p.add_argument("--ignore", action="append", default=[],
                   help="exact module name to keep in float (repeatable)")
    p.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="calibrate with N batches of random data first (shows amax)")
    p.add_argument("--input-shape", default="1,3,224,224", help="batch shape for --calibrate")
    p.add_argument("--json", action="store_true", help="print rows as JSON")


def run(args: argparse.Namespace) -> int:
    import qdq

    model = load_model(args.model, args.checkpoint).eval()
    qdq.replace_modules(model, ignore=args.ignore or None)
    if args.calibrate:
        shape = parse_shape(args.input_shape)
        gen = torch.Generator().manual_seed(0)
        for _, q in qdq.quantizers(model):
            q.disable_quant()
            q.enable_calib()
        with torch.no_grad():
            for _ in range(args.calibrate):
                model(torch.randn(shape, generator=gen))
        for _, q in qdq.quantizers(model):
            q.load_calib_amax(strict=False)
            q.enable_quant()
            q.disable_calib()
    if args.json:
        print(json.dumps([r.as_dict() for r in qdq.summary_rows(model)], indent=1))
    else:
        print(qdq.summary(model))
    return 0


register("summary", "insert quantizers and print a table of them", add_arguments, run, EPILOG)
