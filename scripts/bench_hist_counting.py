"""Histogram counting on the CPU: ``bincount`` (what HistogramCalibrator uses) against
``index_add_`` (what it used before), side by side in one run.

Whole-model histogram collection on torchvision ResNet-50 (random weights, 4 batches of
8x3x224x224, every input quantizer a HistogramCalibrator), each way interleaved with the
plain FP32 forward, best of ``--repeats``; both ways give the same counts (checked).

    PYTHONPATH=. python scripts/bench_hist_counting.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

import qdq.calib.histogram as histogram
from qdq import quant_modules
from qdq.calib import HistogramCalibrator
from sensitivity.calibrate import collect_statistics


def index_add_counts(counts: torch.Tensor, scaled: torch.Tensor, num_bins: int) -> None:
    idx = histogram._scratch(scaled.numel(), torch.int32, scaled.device, slot=1)
    idx.copy_(scaled)
    ones = torch.ones((), dtype=torch.int64, device=counts.device).expand(idx.numel())
    counts.index_add_(0, idx, ones)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    float_model = torchvision.models.resnet50().eval()
    with quant_modules.initialize():
        quant_model = torchvision.models.resnet50()
    quant_model.load_state_dict(float_model.state_dict(), strict=False)
    quant_model.eval()
    data = [torch.randn(8, 3, 224, 224) for _ in range(4)]
    ways = {"bincount": histogram._add_counts, "index_add_": index_add_counts}

    def plain() -> None:
        with torch.no_grad():
            for x in data:
                float_model(x)

    def collect() -> list[torch.Tensor]:
        named, _, _ = collect_statistics(quant_model, data, method="histogram",
                                         progress=False)
        return [q.calibrator.counts.clone() for _, q in named
                if isinstance(q.calibrator, HistogramCalibrator)]

    plain()
    counts = {}
    for name, fn in ways.items():   # warm-up, and the counts to compare
        histogram._add_counts = fn
        counts[name] = collect()
    assert all(torch.equal(a, b) for a, b in zip(*counts.values(), strict=True))
    times: dict[str, list[float]] = {"FP32 forward": [], **{name: [] for name in ways}}
    for _ in range(args.repeats):
        for name in times:
            if name in ways:
                histogram._add_counts = ways[name]
            start = time.perf_counter()
            plain() if name == "FP32 forward" else collect()
            times[name].append(time.perf_counter() - start)
    histogram._add_counts = ways["bincount"]
    base = min(times["FP32 forward"])
    print(f"torch {torch.__version__}, {args.threads} threads, best of {args.repeats}; "
          f"same counts both ways")
    for name, runs in times.items():
        label = name if name == "FP32 forward" else f"collection, {name}"
        print(f"  {label:<26} {min(runs):7.3f} s   / FP32 = {min(runs) / base:.2f}   "
              f"(runs: {', '.join(f'{t:.2f}' for t in runs)})")


if __name__ == "__main__":
    main()
