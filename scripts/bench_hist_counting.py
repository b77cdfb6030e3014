"""Histogram counting on the CPU, side by side in one run: ``count_cpu`` (what
HistogramCalibrator uses: int16 indices, ``bincount`` in parts on
``torch.get_num_threads()`` threads) against one ``bincount`` on one thread and
``index_add_``.

Whole-model histogram collection on torchvision ResNet-50 (random weights, 4 batches of
8 smooth random 224x224 images, every input quantizer a HistogramCalibrator), each way
interleaved with the plain FP32 forward, best of ``--repeats``; all ways give the same
counts (checked).

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
from qdq.calib.binning import count_cpu
from sensitivity.calibrate import collected_statistics


def one_bincount(flat: torch.Tensor, scale: float, num_bins: int) -> torch.Tensor:
    index = (flat * scale).to(torch.int16 if num_bins < 1 << 15 else torch.int32).abs_()
    counts = torch.bincount(index, minlength=num_bins + 1)
    counts[num_bins - 1] += counts[num_bins]
    return counts[:num_bins]


def index_add(flat: torch.Tensor, scale: float, num_bins: int) -> torch.Tensor:
    index = (flat * scale).to(torch.int32).abs_().clamp_(max=num_bins - 1)
    ones = torch.ones((), dtype=torch.int64).expand(index.numel())
    return torch.zeros(num_bins, dtype=torch.int64).index_add_(0, index, ones)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    float_model = torchvision.models.resnet50().eval()
    with quant_modules.initialize():
        quant_model = torchvision.models.resnet50()
    quant_model.load_state_dict(float_model.state_dict(), strict=False)
    quant_model.eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.nn.functional.interpolate(torch.randn(8, 3, 28, 28, generator=g), size=224,
                                            mode="bilinear").clamp(-2.5, 2.5)
            for _ in range(4)]
    ways = {"count_cpu": count_cpu, "one bincount": one_bincount, "index_add_": index_add}

    def plain() -> None:
        with torch.no_grad():
            for x in data:
                float_model(x)

    def collect() -> list[torch.Tensor]:
        with collected_statistics(quant_model, data, method="histogram",
                                  progress=False) as stats:
            return [q.calibrator.counts.clone() for _, q in stats.named
                    if isinstance(q.calibrator, HistogramCalibrator)]

    plain()
    counts = {}
    try:
        for name, fn in ways.items():      # warm-up, and the counts to compare
            histogram.count_cpu = fn
            counts[name] = collect()
        first = next(iter(counts.values()))
        assert all(torch.equal(a, b) for c in counts.values() for a, b in zip(first, c,
                                                                                strict=True))
        times: dict[str, list[float]] = {"FP32 forward": [], **{name: [] for name in ways}}
        for _ in range(args.repeats):
            for name in times:
                if name in ways:
                    histogram.count_cpu = ways[name]
                start = time.perf_counter()
                plain() if name == "FP32 forward" else collect()
                times[name].append(time.perf_counter() - start)
    finally:
        histogram.count_cpu = count_cpu
    base = min(times["FP32 forward"])
    print(f"torch {torch.__version__}, {args.threads} threads, best of {args.repeats}; "
          f"same counts every way")
    for name, runs in times.items():
        label = name if name == "FP32 forward" else f"collection, {name}"
        print(f"  {label:<32} {min(runs):7.3f} s   / FP32 = {min(runs) / base:.2f}   "
              f"(runs: {', '.join(f'{t:.2f}' for t in runs)})")


if __name__ == "__main__":
    main()
