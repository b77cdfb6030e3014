"""Why entropy calibration loses accuracy on the reference model, and what skip_zeros changes.

For every activation quantizer of the Fashion-MNIST reference model (module-level
insertion, histogram calibration on training batches): the share of exact zeros in its
input, its amax from max and from entropy calibration, and the test top-1 when only that
quantizer goes back from its entropy amax to its max amax. Then entropy with
``skip_zeros=True`` next to the other methods.

    PYTHONPATH=. python scripts/entropy_zeros.py --threads 2
"""

from __future__ import annotations

import argparse
import sys

import torch

import sensitivity
from qdq.descriptor import QuantDescriptor
from qdq.replace import quantizers, replace_modules
from sensitivity.data import fashion_mnist_loader
from sensitivity.reference import load_reference_model


@torch.no_grad()
def top1(model, loader) -> float:
    model.eval()
    right = total = 0
    for x, y in loader:
        right += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * right / total


def calibrated(checkpoint, calib, batches: int, amax_method: str, skip_zeros: bool):
    model = load_reference_model(checkpoint)
    replace_modules(model, quant_desc_input=QuantDescriptor(calib_method="histogram",
                                                            skip_zeros=skip_zeros))
    sensitivity.calibrate(model, calib, num_batches=batches, method="histogram",
                          amax_method=amax_method, progress=False)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="default: the shipped reference")
    p.add_argument("--calib-batches", type=int, default=16, help="training batches of 128")
    p.add_argument("--test-samples", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    calib = fashion_mnist_loader("train", 128, shuffle=False)
    test = fashion_mnist_loader("test", 1000, shuffle=False, limit=args.test_samples)
    model = calibrated(args.checkpoint, calib, args.calib_batches, "entropy", False)
    inputs = [(n, q) for n, q in quantizers(model)
              if getattr(q.calibrator, "counts", None) is not None]
    entropy = {n: q.amax.clone() for n, q in inputs}
    maxed = {n: q.calibrator.compute_amax("max") for n, q in inputs}
    base = top1(model, test)
    print(f"entropy, zeros counted: top-1 {base:.2f}")
    print(f"{'quantizer':<38} {'zeros':>6} {'max amax':>9} {'entropy':>8} "
          f"{'top-1 with this one at max':>27}")
    for name, q in inputs:
        counts = q.calibrator.counts
        zeros = float(counts[0]) / float(counts.sum())  # bin 0: exact zeros and tiny values
        q.amax = maxed[name]
        score = top1(model, test)
        q.amax = entropy[name]
        print(f"{name:<38} {zeros:>6.0%} {float(maxed[name]):>9.3f} "
              f"{float(entropy[name]):>8.3f} {score:>27.2f}")

    print("\nwhole model, one calibration each:")
    for method, skip in [("max", False), ("entropy", False), ("entropy", True),
                         ("percentile", False), ("mse", False)]:
        model = calibrated(args.checkpoint, calib, args.calib_batches, method, skip)
        label = method + (", skip_zeros" if skip else "")
        print(f"  {label:<22} top-1 {top1(model, test):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
