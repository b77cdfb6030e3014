"""Histogram calibration on torchvision ResNet-50, measured side by side in one run.

(a) Collection: the FP32 forward pass of the float model against the same batches through
    the quantized model with every quantizer calibrating (inputs: HistogramCalibrator,
    weights: MaxCalibrator), runs interleaved, best of ``--repeats``.
(b) amax searches: entropy, mse and percentile over all input quantizers, each one batched
    call (``qdq.calib.compute_amaxes``), best of three.
(c) Parity: for every quantizer, how many bins qdq's amax lies from the plain reference of
    pytorch-quantization's algorithm (tests/qdq/calib_reference.py, Python loops) on the
    same histogram, for entropy, percentile and mse.
(d) modelopt 0.47 (``--modelopt-python``, run as a subprocess in its own environment): its
    collection ratio on the same model and batches, its search times, and, on qdq's
    histograms, the bins between its entropy/percentile amax (pytorch-quantization's code,
    copied into modelopt) and qdq's.

Usage::

    PYTHONPATH=. python scripts/bench_calib.py                  # CPU, 2 threads
    PYTHONPATH=. python scripts/bench_calib.py --no-modelopt --reference-limit 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torchvision

METHODS = ("entropy", "mse", "percentile")
PERCENTILE = 99.99


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _interleaved(plain, calibrate, repeats: int, device: torch.device):
    plain()
    calibrate()                        # warm-up (allocator, kernels, scratch buffers)
    fp32, calib = [], []
    for _ in range(repeats):
        fp32.append(_timed(plain, device))
        calib.append(_timed(calibrate, device))
    return fp32, calib


def _forward_all(model, data) -> None:
    with torch.no_grad():
        for x in data:
            model(x)


def _runs(values) -> str:
    return ", ".join(f"{t:.2f}" for t in values)


# --------------------------------------------------------------------------- qdq


def _qdq_model(device: torch.device):
    from qdq import quant_modules
    from qdq.descriptor import QuantDescriptor
    from qdq.nn.registry import QUANT_TWINS
    from qdq.replace import name_quantizers

    torch.manual_seed(0)
    float_model = torchvision.models.resnet50().eval().to(device)
    saved = {}
    try:
        for cls in QUANT_TWINS.values():
            if hasattr(cls, "set_default_quant_desc_input"):
                saved[cls] = cls.default_quant_desc_input
                cls.set_default_quant_desc_input(QuantDescriptor(calib_method="histogram"))
        with quant_modules.initialize():
            quant_model = torchvision.models.resnet50()
    finally:
        for cls, old in saved.items():
            cls.default_quant_desc_input = old
    quant_model.load_state_dict(float_model.state_dict(), strict=False)
    quant_model.eval().to(device)
    name_quantizers(quant_model)
    return float_model, quant_model


def _reference_bins(job):
    """One quantizer's reference bins: (entropy edge, percentile bin, mse centre)."""
    from tests.qdq import calib_reference as ref

    counts = job
    return (ref.entropy_bin(counts)[0], ref.percentile_bin(counts, PERCENTILE),
            ref.mse_bin(counts)[0])


def _whole(bins: float) -> str:
    """A difference in bins as a whole number (it is one up to float32 rounding)."""
    return f"{round(bins) + 0:d}" if abs(bins - round(bins)) < 1e-3 else f"{bins:.3f}"


def _bins_of(amax: torch.Tensor, width: float, method: str) -> float:
    value = float(amax) / width
    return value - 0.5 if method == "mse" else value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference-limit", type=int, default=None,
                    help="compare only the first N quantizers with the plain reference")
    ap.add_argument("--reference-jobs", type=int, default=2)
    ap.add_argument("--modelopt-python", default=".venv-modelopt/bin/python")
    ap.add_argument("--no-modelopt", action="store_true")
    ap.add_argument("--modelopt-worker", choices=["collect", "search"], help=argparse.SUPPRESS)
    ap.add_argument("--histograms", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.modelopt_worker:
        _modelopt_worker(args)
        return

    from qdq.calib import HistogramCalibrator, compute_amaxes
    from qdq.replace import quantizers

    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {args.threads} threads, "
          f"{args.batches} batches of {args.batch_size}x3x224x224, load average at start "
          f"{os.getloadavg()[0]:.2f}")
    float_model, quant_model = _qdq_model(device)
    all_q = [q for _, q in quantizers(quant_model)]
    inputs = [(n, q) for n, q in quantizers(quant_model)
              if isinstance(q.calibrator, HistogramCalibrator)]
    data = _batches(args.batches, args.batch_size, device)

    def calibrate() -> None:
        for q in all_q:
            q.calibrator.reset()
            q.disable_quant()
            q.enable_calib()
        _forward_all(quant_model, data)

    fp32, calib = _interleaved(lambda: _forward_all(float_model, data), calibrate,
                               args.repeats, device)
    ratio = min(calib) / min(fp32)
    print(f"\n(a) collection, {len(inputs)} histogram + {len(all_q) - len(inputs)} max "
          f"quantizers, best of {args.repeats}")
    print(f"    FP32 forward          {min(fp32):8.3f} s   (runs: {_runs(fp32)})")
    print(f"    histogram collection  {min(calib):8.3f} s   (runs: {_runs(calib)})")
    print(f"    ratio collection / FP32 = {ratio:.2f}")

    calibs = [q.calibrator for _, q in inputs]
    bins = [c.counts.numel() for c in calibs]
    print(f"\n(b) amax search, one batched call over {len(inputs)} histograms of "
          f"{min(bins)}-{max(bins)} bins, best of 3")
    found = {}
    for method in METHODS:
        opts = {"percentile": PERCENTILE} if method == "percentile" else {}
        times = []
        for _ in range(3):
            start = time.perf_counter()
            found[method] = compute_amaxes(calibs, method, **opts)
            times.append(time.perf_counter() - start)
        print(f"    {method:<11} {min(times):7.3f} s   (runs: "
              f"{', '.join(f'{t:.3f}' for t in times)})")

    limit = len(inputs) if args.reference_limit is None else args.reference_limit
    print(f"\n(c) amax - plain reference of pytorch-quantization's algorithm, in bins "
          f"({limit} quantizers)")
    jobs = [c.counts.cpu().tolist() for c in calibs[:limit]]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.reference_jobs, mp_context=get_context("spawn")) as pool:
        reference = list(pool.map(_reference_bins, jobs))
    print(f"    (reference searches took {time.perf_counter() - start:.0f} s on "
          f"{args.reference_jobs} processes)")
    print(f"    {'quantizer':<42}{'bins':>6}{'entropy':>9}{'percentile':>12}{'mse':>6}")
    worst = dict.fromkeys(METHODS, 0.0)
    for k, ((name, _), calib, ref_bins) in enumerate(zip(inputs, calibs, reference,
                                                         strict=False)):
        width = calib.bin_width
        diffs = {}
        for method, ref_bin in zip(("entropy", "percentile", "mse"), ref_bins, strict=True):
            diffs[method] = _bins_of(found[method][k], width, method) - ref_bin
            worst[method] = max(worst[method], abs(diffs[method]))
        print(f"    {name:<42}{calib.counts.numel():>6}{_whole(diffs['entropy']):>9}"
              f"{_whole(diffs['percentile']):>12}{_whole(diffs['mse']):>6}")
    print("    max |difference| in bins: " + ", ".join(f"{m} {worst[m]:.3g}" for m in METHODS)
          + " (float32 amax over the bin width: 0 up to rounding)")

    if not args.no_modelopt:
        _modelopt_side(args, inputs, calibs, found)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


# --------------------------------------------------------------------------- modelopt


def _modelopt_side(args, inputs, calibs, found) -> None:
    python = Path(args.modelopt_python)
    print(f"\n(d) modelopt ({python})")
    if not python.exists():
        print("    not found: pass --modelopt-python, or --no-modelopt")
        return
    common = [str(python), __file__, "--threads", str(args.threads), "--batches",
              str(args.batches), "--batch-size", str(args.batch_size), "--repeats",
              str(args.repeats)]
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run(common + ["--modelopt-worker", "collect"], capture_output=True,
                         text=True, env=env, check=False)
    result = _last_json(out)
    if result is None:
        print("    collection run failed:\n" + out.stderr[-2000:])
    else:
        print(f"    FP32 forward {result['fp32']:.3f} s, collection {result['calib']:.3f} s, "
              f"ratio collection / FP32 = {result['calib'] / result['fp32']:.2f} "
              f"({result['histograms']} histogram quantizers)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "histograms.npz"
        arrays = {}
        for k, c in enumerate(calibs):
            arrays[f"counts{k}"] = c.counts.cpu().numpy()
            arrays[f"edges{k}"] = c.bin_edges().cpu().numpy()
        np.savez(path, **arrays)
        out = subprocess.run(common + ["--modelopt-worker", "search", "--histograms", str(path)],
                             capture_output=True, text=True, env=env, check=False)
    result = _last_json(out)
    if result is None:
        print("    search run failed:\n" + out.stderr[-2000:])
        return
    print(f"    searches over the same {len(calibs)} histograms (one compute_amax per "
          "quantizer):")
    for method in METHODS:
        print(f"      {method:<11} {result['seconds'][method]:8.2f} s")
    for method in ("entropy", "percentile"):
        diffs = [float(ours) / c.bin_width - theirs / c.bin_width
                 for ours, theirs, c in zip(found[method], result["amax"][method], calibs,
                                            strict=True)]
        print(f"    qdq - modelopt {method} amax, in bins: max |diff| "
              f"{max(abs(d) for d in diffs):.3f} over {len(diffs)} quantizers")


def _last_json(out: subprocess.CompletedProcess):
    for line in reversed(out.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def _modelopt_worker(args) -> None:
    """Runs in modelopt's environment (no qdq); prints one JSON line."""
    import copy
    import warnings

    warnings.filterwarnings("ignore")
    if args.modelopt_worker == "search":
        from modelopt.torch.quantization.calib import histogram as mo_hist

        data = np.load(args.histograms)
        count = len([k for k in data.files if k.startswith("counts")])
        seconds, amax = {}, {m: [] for m in METHODS}
        for method in METHODS:
            start = time.perf_counter()
            for k in range(count):
                counts, edges = data[f"counts{k}"].copy(), data[f"edges{k}"]
                if method == "entropy":
                    value = mo_hist._compute_amax_entropy(counts, edges, 8, False)
                elif method == "mse":
                    value = mo_hist._compute_amax_mse(counts, edges, 8, False)
                else:
                    value = mo_hist._compute_amax_percentile(counts, edges, PERCENTILE)
                amax[method].append(float(value))
            seconds[method] = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "amax": amax}))
        return

    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.model_calib import enable_stats_collection
    from modelopt.torch.quantization.nn import TensorQuantizer

    torch.manual_seed(0)
    float_model = torchvision.models.resnet50().eval()
    model = copy.deepcopy(float_model)
    cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*input_quantizer":
            entry["cfg"] = {**entry["cfg"], "calibrator": "histogram"}
    cfg["algorithm"] = None
    model = mtq.quantize(model, cfg)
    data = _batches(args.batches, args.batch_size, torch.device("cpu"))
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]

    def calibrate() -> None:
        for q in quantizers:
            if q._calibrator is not None:
                q._calibrator.reset()
        enable_stats_collection(model)
        _forward_all(model, data)

    fp32, calib = _interleaved(lambda: _forward_all(float_model, data), calibrate,
                               args.repeats, torch.device("cpu"))
    histograms = sum(type(q._calibrator).__name__ == "HistogramCalibrator" and not q._disabled
                     for q in quantizers)
    print(json.dumps({"fp32": min(fp32), "calib": min(calib), "histograms": histograms}))


if __name__ == "__main__":
    sys.exit(main())
