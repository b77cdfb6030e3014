"""Histogram calibration speed on torchvision ResNet-50, measured side by side in one run.

(a) Collection: the FP32 forward pass of the float model against the same batches through
    the quantized model with every quantizer calibrating (inputs: HistogramCalibrator,
    weights: MaxCalibrator), runs interleaved, best of ``--repeats``.
(b) amax search: qdq's vectorised ``compute_amax`` for entropy, mse and percentile over all
    input quantizers, against a search that loops over candidate thresholds one at a time
    (written below the way pytorch-quantization and modelopt do it), on the same
    histograms; it also reports how far apart the two amaxes are, in bins.

Usage::

    PYTHONPATH=. python scripts/bench_calib.py                  # CPU, 2 threads
    PYTHONPATH=. python scripts/bench_calib.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time

import numpy as np
import torch
import torchvision
from tqdm import tqdm

from qdq import quant_modules
from qdq.calib import HistogramCalibrator
from qdq.calib.amax_search import entropy_amax, mse_amax
from qdq.descriptor import QuantDescriptor
from qdq.nn.registry import QUANT_TWINS
from qdq.replace import name_quantizers, quantizers
from qdq.tensor_quant import fake_tensor_quant

# --------------------------------------------------------------------------- slow searches
# One candidate threshold per Python iteration, as in pytorch-quantization's
# calib/histogram.py and modelopt's: the baseline the vectorised searches replace.


def _kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    q_total = q.sum()
    if q_total == 0:
        return math.inf
    q = q / q_total
    mask = p > 0
    if (q[mask] == 0).any():
        return math.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def loop_entropy(counts: np.ndarray, edges: np.ndarray, num_bits: int = 8,
                 start_bin: int = 128, stride: int = 1) -> float:
    levels = 1 << (num_bits - 1)
    n = counts.size
    counts = counts.copy()
    if n > 1 and counts[1:].sum() > 0:
        counts[0] = counts[1]   # the zero bin levelled, as pytorch-quantization does
    divergences = []
    candidates = list(range(start_bin, n + 1, stride))
    for i in candidates:
        p = counts[:i].astype(np.float64)
        p[i - 1] += counts[i:].sum()
        nonzero = p != 0
        merge = i // levels
        level_mass = np.zeros(levels)
        for j in range(levels):
            hi = i if j == levels - 1 else (j + 1) * merge
            level_mass[j] = counts[j * merge:hi].sum()
        q = np.zeros(i)
        for j in range(levels):
            lo, hi = j * merge, (i if j == levels - 1 else (j + 1) * merge)
            k = nonzero[lo:hi].sum()
            if k:
                q[lo:hi] = level_mass[j] / k
        q[~nonzero] = 0
        divergences.append(_kl_divergence(p, q))
    divergences = np.array(divergences)
    last = len(divergences) - 1 - int(np.argmin(divergences[::-1]))
    return float(edges[candidates[last]])


def loop_mse(counts: np.ndarray, edges: np.ndarray, num_bits: int = 8,
             start_bin: int = 128, stride: int = 1) -> float:
    centres = torch.from_numpy((edges[:-1] + edges[1:]) / 2)
    weights = torch.from_numpy(counts.astype(np.float64))
    best, best_amax = math.inf, float(edges[-1])
    for i in range(start_bin, counts.size + 1, stride):
        amax = torch.tensor(float(edges[i]), dtype=torch.float64)
        err = float((weights * (centres - fake_tensor_quant(centres, amax, num_bits)) ** 2).sum())
        if err < best:
            best, best_amax = err, float(edges[i])
    return best_amax


def loop_percentile(counts: np.ndarray, edges: np.ndarray, percentile: float = 99.99) -> float:
    cdf = np.cumsum(counts) / counts.sum()
    return float(edges[int(np.searchsorted(cdf, percentile / 100.0)) + 1])


LOOP_SEARCHES = {"entropy": loop_entropy, "mse": loop_mse, "percentile": loop_percentile}
FAST_SEARCHES = {"entropy": entropy_amax, "mse": mse_amax}

# --------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _histogram_inputs(desc: QuantDescriptor):
    """Every quant twin's default input descriptor is ``desc`` inside the block."""
    saved = {}
    try:
        for cls in QUANT_TWINS.values():
            if hasattr(cls, "set_default_quant_desc_input"):
                saved[cls] = cls.default_quant_desc_input
                cls.set_default_quant_desc_input(desc)
        yield
    finally:
        for cls, old in saved.items():
            cls.default_quant_desc_input = old


def _batches(num: int, size: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random images (upsampled noise, ImageNet-like statistics)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        low = torch.randn(size, 3, 28, 28, generator=g)
        img = torch.nn.functional.interpolate(low, size=224, mode="bilinear",
                                              align_corners=False)
        out.append(img.clamp(-2.5, 2.5).to(device))
    return out


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slow-limit", type=int, default=None,
                    help="run the loop searches on only this many quantizers (and scale up)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {args.threads} threads, "
          f"{args.batches} batches of {args.batch_size}x3x224x224")

    torch.manual_seed(0)
    float_model = torchvision.models.resnet50().eval().to(device)
    with _histogram_inputs(QuantDescriptor(calib_method="histogram")), \
            quant_modules.initialize():
        quant_model = torchvision.models.resnet50()
    quant_model.load_state_dict(float_model.state_dict(), strict=False)
    quant_model.eval().to(device)
    name_quantizers(quant_model)
    all_q = [q for _, q in quantizers(quant_model)]
    inputs = [(n, q) for n, q in quantizers(quant_model)
              if isinstance(q.calibrator, HistogramCalibrator)]
    data = _batches(args.batches, args.batch_size, device)

    def plain() -> None:
        with torch.no_grad():
            for x in data:
                float_model(x)

    def calibrate() -> None:
        for q in all_q:
            q.calibrator.reset()
            q.disable_quant()
            q.enable_calib()
        with torch.no_grad():
            for x in data:
                quant_model(x)

    plain()   # warm-up (allocator, kernels)
    fp32, calib = [], []
    for _ in tqdm(range(args.repeats), desc="collection", leave=False):
        fp32.append(_timed(plain, device))
        calib.append(_timed(calibrate, device))
    fp32_s, calib_s = min(fp32), min(calib)
    print(f"\n(a) collection, {len(inputs)} histogram + {len(all_q) - len(inputs)} max "
          f"quantizers, best of {args.repeats}")
    print(f"    FP32 forward          {fp32_s:8.3f} s   (runs: "
          f"{', '.join(f'{t:.2f}' for t in fp32)})")
    print(f"    histogram collection  {calib_s:8.3f} s   (runs: "
          f"{', '.join(f'{t:.2f}' for t in calib)})")
    print(f"    ratio collection / FP32 = {calib_s / fp32_s:.2f}")

    # (b) amax searches on the histograms just collected.
    print(f"\n(b) amax search over {len(inputs)} input quantizers")
    hists = []
    for _, q in inputs:
        c = q.calibrator
        hists.append((c.counts.cpu().numpy(), c.bin_edges().cpu().numpy(), c))
    limit = len(hists) if args.slow_limit is None else min(args.slow_limit, len(hists))
    print(f"    {'method':<11}{'vectorised':>12}{'loop':>12}{'loop/vectorised':>17}"
          f"{'max |diff| (bins)':>19}")
    for method in ("entropy", "mse", "percentile"):
        def fast_all(method=method):
            return [float(c.compute_amax(method, percentile=99.99)) for _, _, c in hists]

        fast_all()   # warm-up
        fast_s = _timed(fast_all, device)
        start = time.perf_counter()
        loop_amax = [LOOP_SEARCHES[method](counts, edges)
                     for counts, edges, _ in tqdm(hists[:limit], desc=method, leave=False)]
        loop_s = (time.perf_counter() - start) * len(hists) / limit
        diffs = []
        for (_counts, edges, c), slow in zip(hists[:limit], loop_amax, strict=True):
            width = float(edges[1])
            if method in FAST_SEARCHES:
                fast = float(FAST_SEARCHES[method](c.counts, width))
            else:
                fast = float(c.compute_amax(method, percentile=99.99))
                slow = min(slow, float(c.max))
            diffs.append(abs(fast - slow) / width)
        note = "" if limit == len(hists) else f" (x{len(hists) / limit:.1f} from {limit})"
        print(f"    {method:<11}{fast_s:>11.3f}s{loop_s:>11.3f}s{loop_s / fast_s:>16.3g}x"
              f"{max(diffs):>19.1f}{note}")


if __name__ == "__main__":
    main()
