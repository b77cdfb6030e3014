"""PTQ accuracy of the Fashion-MNIST reference model with and without the placement rules.

Both variants are calibrated on the same training batches (max calibration) and scored
on the full test set, side by side in one run:

- float: the trained model as loaded;
- PTQ, module-level: ``qdq.replace_modules`` only (BatchNorm unfolded, adds and concats
  in float);
- PTQ, rules: ``qdq.rules.apply_rules`` (BatchNorm folded, residual identity quantized,
  concat/max-pool quantizers shared).

    PYTHONPATH=. python scripts/rules_accuracy.py [--calib-batches 8] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import time

import torch

import qdq
from qdq.rules import apply_rules
from qdqapp.data import fashion_mnist_loader
from qdqapp.evaluate import top1_accuracy
from qdqapp.reference import load_reference_model
from sensitivity import calibrate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--method", default="max", choices=["max", "histogram"])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--seed", type=int, default=0, help="which training batches calibrate")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    calib = fashion_mnist_loader("train", args.batch_size, shuffle=True, seed=args.seed)
    test = fashion_mnist_loader("test", args.batch_size)
    example = next(iter(test))[0][:2]

    results = {}
    start = time.perf_counter()
    results["float"] = top1_accuracy(load_reference_model(args.checkpoint), test)

    plain = load_reference_model(args.checkpoint)
    qdq.replace_modules(plain)
    calibrate(plain, calib, num_batches=args.calib_batches, method=args.method,
              progress=False)
    results["PTQ, module-level"] = top1_accuracy(plain, test)

    ruled = apply_rules(load_reference_model(args.checkpoint), example)
    calibrate(ruled, calib, num_batches=args.calib_batches, method=args.method,
              progress=False)
    results["PTQ, rules"] = top1_accuracy(ruled, test)

    count = {name: sum(q.is_enabled for _, q in qdq.quantizers(m))
             for name, m in (("PTQ, module-level", plain), ("PTQ, rules", ruled))}
    for name, acc in results.items():
        extra = f"  ({count[name]} enabled quantizers)" if name in count else ""
        print(f"{name:<20} top-1 {acc:6.2f}%{extra}")
    diff = results["PTQ, rules"] - results["PTQ, module-level"]
    print(f"rules - module-level: {diff:+.2f} points  "
          f"({time.perf_counter() - start:.0f} s, {args.calib_batches} calibration batches "
          f"of {args.batch_size}, method {args.method}, seed {args.seed})")
    print(ruled.qdq_rules_report)


if __name__ == "__main__":
    main()
