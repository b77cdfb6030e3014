"""Entropy calibration and ReLU zeros: the KL search with bin 0 as counted and levelled.

For every activation quantizer of the Fashion-MNIST reference model (module-level
insertion, histogram calibration on training batches): the share of its input in bin 0
(the exact zeros of a ReLU, and values below one bin width), and amax from max, from the
entropy search on the histogram as counted and from the entropy search as
pytorch-quantization runs it (bin 0 levelled to bin 1). Then test top-1 of the whole model
for each way, next to the other methods, and with entropy everywhere but the model's
input (left at max), or on the input alone.

    PYTHONPATH=. python scripts/entropy_zeros.py --threads 2
"""

from __future__ import annotations

import argparse
import sys

import torch

import sensitivity
from qdq.calib.amax_search import KL_TIE_TOL, entropy_divergences
from qdq.descriptor import QuantDescriptor
from qdq.replace import quantizers, replace_modules
from qdqapp.data import fashion_mnist_loader
from qdqapp.reference import load_reference_model


@torch.no_grad()
def top1(model, loader) -> float:
    model.eval()
    right = total = 0
    for x, y in loader:
        right += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * right / total


def calibrated(checkpoint, calib, batches: int, amax_method: str, skip_zeros: bool = False):
    model = load_reference_model(checkpoint)
    replace_modules(model, quant_desc_input=QuantDescriptor(calib_method="histogram",
                                                            skip_zeros=skip_zeros))
    sensitivity.calibrate(model, calib, num_batches=batches, method="histogram",
                          amax_method=amax_method, progress=False)
    return model


def entropy_as_counted(counts: torch.Tensor, width: float) -> torch.Tensor:
    """The KL search on the histogram as collected, zero spike included (last argmin)."""
    cand, kl = entropy_divergences(counts, level_zero=False)
    ties = (kl <= kl.min() + KL_TIE_TOL).nonzero()
    return torch.tensor(float(cand[int(ties.max())]) * width)


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
    model = calibrated(args.checkpoint, calib, args.calib_batches, "entropy")
    inputs = [(n, q) for n, q in quantizers(model)
              if getattr(q.calibrator, "counts", None) is not None]
    levelled = {n: q.amax.clone() for n, q in inputs}
    counted, maxed = {}, {}
    print(f"{'quantizer':<38} {'bin 0':>6} {'max':>7} {'entropy, counted':>17} "
          f"{'entropy':>8}")
    for name, q in inputs:
        c = q.calibrator
        maxed[name] = c.compute_amax("max")
        counted[name] = entropy_as_counted(c.counts, c.bin_width)
        share = float(c.counts[0]) / float(c.counts.sum())
        print(f"{name:<38} {share:>6.0%} {float(maxed[name]):>7.3f} "
              f"{float(counted[name]):>17.3f} {float(levelled[name]):>8.3f}")

    first = inputs[0][0]                     # the model's input (the image)
    print("\nwhole model, test top-1:")
    for label, amax in [("entropy, bin 0 as counted", counted),
                        ("entropy (bin 0 levelled)", levelled),
                        ("entropy, input at max", {**levelled, first: maxed[first]}),
                        ("entropy on the input only", {**maxed, first: levelled[first]})]:
        for name, q in inputs:
            q.amax = amax[name]
        print(f"  {label:<28} {top1(model, test):.2f}")
    for method, skip in [("entropy", True), ("max", False), ("percentile", False),
                         ("mse", False)]:
        other = calibrated(args.checkpoint, calib, args.calib_batches, method, skip)
        label = method + (", skip_zeros" if skip else "")
        print(f"  {label:<28} {top1(other, test):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
