"""ONNX Runtime (CPU) latency: FP32 resnet18 against its Q/DQ export, side by side in one run.

Random weights (speed does not depend on them); the Q/DQ model is max-calibrated on random
data and exported with BatchNorm folded. ONNX Runtime fuses DQ -> Conv -> Q into integer
kernels at its default optimization level. Prints the median and p90 latency per batch
size and the ratio FP32 / Q/DQ.

    PYTHONPATH=. python scripts/bench_ort.py --threads 2 --batches 1 8 --size 224
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision

import qdq
from export import to_onnx


def build(folder: Path, size: int) -> dict[str, Path]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    example = torch.randn(1, 3, size, size)
    paths = {"FP32": folder / "fp32.onnx", "Q/DQ": folder / "qdq.onnx",
             "Q/DQ int8 weights": folder / "qdq_i8.onnx"}
    with torch.no_grad():
        torch.onnx.export(model, (example,), str(paths["FP32"]), opset_version=13,
                          dynamo=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    qdq.replace_modules(model)
    for _, q in qdq.quantizers(model):
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        model(torch.randn(8, 3, size, size))
    for _, q in qdq.quantizers(model):
        q.load_calib_amax(strict=False)
        q.enable_quant()
        q.disable_calib()
    to_onnx(model, example, paths["Q/DQ"])
    to_onnx(model, example, paths["Q/DQ int8 weights"], int8_weights=True)
    return paths


def time_session(path: Path, x: np.ndarray, threads: int, warmup: int, runs: int) -> list[float]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        sess.run(None, {"input": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, {"input": x})
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {args.threads} threads, "
          f"resnet18 {args.size}x{args.size}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp), args.size)
        sizes = {k: p.stat().st_size / 1e6 for k, p in paths.items()}
        print("file size: " + ", ".join(f"{k} {v:.1f} MB" for k, v in sizes.items()))
        rng = np.random.default_rng(0)
        print(f"{'batch':>5} {'model':<18} {'p50 ms':>8} {'p90 ms':>8} {'FP32/this':>9}")
        for batch in args.batches:
            x = rng.standard_normal((batch, 3, args.size, args.size), dtype=np.float32)
            # interleave the models so background load hits them alike
            results: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(3):
                for name, path in paths.items():
                    results[name] += time_session(path, x, args.threads, args.warmup,
                                                  args.runs // 3)
            base = statistics.median(results["FP32"])
            for name, times in results.items():
                p50 = statistics.median(times)
                p90 = sorted(times)[int(0.9 * (len(times) - 1))]
                print(f"{batch:>5} {name:<18} {p50:>8.2f} {p90:>8.2f} {base / p50:>8.2f}x")


if __name__ == "__main__":
    main()
