"""Formats side by side: FP32, INT8 Q/DQ, FP8 E4M3 Q/DQ, INT8 and INT4 weight-only.

For each format, in one run: the ONNX file size (and how many times smaller than the FP32
file), the accuracy (Fashion-MNIST reference model, real test set) or the agreement with
the FP32 model (a torchvision model with random weights, BatchNorm statistics and
calibration from Fashion-MNIST images resized to RGB), and ONNX Runtime against PyTorch:
top-1 agreement and relative L2 of the free run on every evaluated input, and the verdict
of ``export.verify`` on the first batch (forced run: identical Q/DQ, only one-step flips at
rounding boundaries, weight DequantizeLinear equal to PyTorch's weights).

    PYTHONPATH=. python scripts/bench_formats.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import export
import qdq
import sensitivity
from export.verify import ort_session
from qdq.descriptor import QuantDescriptor
from qdq.formats import indivisible_weights
from qdq.rules import apply_rules
from qdqapp.data import fashion_mnist_loader
from qdqapp.reference import load_reference_model


# ---------------------------------------------------------------------------- formats
def qdq_format(name: str, method: str, amax_method: str):
    def build(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
        qdq.replace_modules(model, quant_desc_input=QuantDescriptor(calib_method=method))
        model = apply_rules(model, (calib[0][:2],))
        qdq.set_format(model, name)
        sensitivity.calibrate(model, calib, method=method, amax_method=amax_method,
                              progress=False)
        return model

    return build


def weight_only_format(bits: int, block: int | None = None, amax_method: str = "max"):
    def build(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
        rest = sorted({layer for layer, _, _ in indivisible_weights(model, block)})
        qdq.weight_only(model, bits=bits, block_size=block, ignore=rest,
                        amax_method=amax_method)
        if rest:  # layers the block size does not divide: one scale per output channel
            qdq.weight_only(model, bits=bits, amax_method=amax_method)
        build.per_channel = len(rest)
        return model

    build.per_channel = 0
    return build


#: (label, builder, store Q/DQ weights as int8/float8 initializers)
FORMATS = [
    ("FP32", None, False),
    ("INT8 Q/DQ (percentile 99.99)", qdq_format("int8", "histogram", "percentile"), True),
    ("FP8 E4M3 Q/DQ (max)", qdq_format("fp8", "max", "max"), True),
    ("FP8 E4M3 Q/DQ (histogram mse)", qdq_format("fp8", "histogram", "mse"), True),
    ("W8 (per channel)", weight_only_format(8), False),
    ("W4 (block 128)", weight_only_format(4, 128), False),
    ("W4 (block 128, mse)", weight_only_format(4, 128, "mse"), False),
    ("W4 (block 32)", weight_only_format(4, 32), False),
]


# ---------------------------------------------------------------------------- running
@torch.no_grad()
def torch_logits(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([model(x) for x in batches])


def ort_logits(path: Path, batches: list[torch.Tensor], threads: int | None) -> torch.Tensor:
    session = ort_session(path, threads)
    name = session.get_inputs()[0].name
    return torch.cat([torch.from_numpy(session.run(None, {name: x.numpy()})[0])
                      for x in batches])


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@dataclass
class Row:
    label: str
    onnx_bytes: int
    torch_metric: float
    ort_metric: float
    extra: str
    ort_top1: float
    ort_rel_l2: float
    verdict: str
    seconds: float


def run_format(label, build, store, float_model, calib, batches, labels, reference,
               folder: Path, threads) -> Row:
    start = time.perf_counter()
    model = copy.deepcopy(float_model).eval()
    if build is not None:
        model = build(model, calib).eval()
    logits = torch_logits(model, batches)
    path = folder / f"{label.split(' ')[0].lower()}_{len(list(folder.iterdir()))}.onnx"
    result = export.to_onnx(model, batches[0][:1], path, int8_weights=store)
    ort = ort_logits(path, batches, threads)
    report = export.verify(model, path, batches[0], threads=threads)
    if labels is not None:
        metric = float((logits.argmax(1) == labels).float().mean()) * 100
        ort_metric = float((ort.argmax(1) == labels).float().mean()) * 100
        extra = ""
    else:  # agreement with the FP32 model, and how close the logits stay
        metric = float((logits.argmax(1) == reference.argmax(1)).float().mean()) * 100
        ort_metric = float((ort.argmax(1) == reference.argmax(1)).float().mean()) * 100
        extra = f"{float(F.cosine_similarity(logits, reference).mean()):.4f}"
    if getattr(build, "per_channel", 0):
        label += f" [{build.per_channel} per channel]"
    return Row(label, result.bytes, metric, ort_metric, extra,
               float((ort.argmax(1) == logits.argmax(1)).float().mean()) * 100,
               rel_l2(ort, logits), report.verdict(), time.perf_counter() - start)


def table(rows: list[Row], metric: str, extra: str | None) -> str:
    fp32 = rows[0].onnx_bytes
    head = (f"| format | ONNX MB | x smaller | {metric} PyTorch | {metric} ORT |"
            + (f" {extra} |" if extra else "")
            + " ORT vs PyTorch top-1 | free rel L2 | export.verify |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.onnx_bytes / 1e6:.3f} | {fp32 / r.onnx_bytes:.2f} | "
            f"{r.torch_metric:.2f}% | {r.ort_metric:.2f}% |"
            + (f" {r.extra or '1.0000'} |" if extra else "")
            + f" {r.ort_top1:.2f}% | {r.ort_rel_l2:.1e} | {r.verdict} |")
    return "\n".join(lines)


def run_all(title, float_model, calib, batches, labels, folder, threads, metric, extra):
    reference = torch_logits(float_model, batches)
    rows = []
    for label, build, store in FORMATS:
        row = run_format(label, build, store, float_model, calib, batches, labels, reference,
                         folder, threads)
        print(f"  {row.label:<40} {row.seconds:6.1f} s", file=sys.stderr)
        rows.append(row)
    print(f"\n### {title}\n")
    print(table(rows, metric, extra))


# ----------------------------------------------------------------------------- models
def fmnist_rgb(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False
                         ).expand(-1, 3, -1, -1).contiguous()


def settle_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """BatchNorm running statistics from the data (random weights leave mean 0, var 1)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    with torch.no_grad():
        for x in batches:
            model(x)
    model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--calib-batches", type=int, default=8, help="training batches of 128")
    p.add_argument("--test-samples", type=int, default=10_000)
    p.add_argument("--tv-model", default="resnet18")
    p.add_argument("--tv-size", type=int, default=96)
    p.add_argument("--tv-samples", type=int, default=512)
    p.add_argument("--skip", choices=["reference", "torchvision"], default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", file=sys.stderr)
    train = fashion_mnist_loader("train", 128, shuffle=False)
    calib = [x for _, (x, _) in zip(range(args.calib_batches), train, strict=False)]
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as scratch:
        folder = Path(scratch)
        if args.skip != "reference":
            test = fashion_mnist_loader("test", 1000, shuffle=False, limit=args.test_samples)
            batches, labels = zip(*test, strict=True)
            run_all(f"Fashion-MNIST reference model, {args.test_samples} test images",
                    load_reference_model(), calib, list(batches), torch.cat(labels), folder,
                    args.threads, "top-1", None)
        if args.skip != "torchvision":
            model = torchvision.models.get_model(args.tv_model, weights=None).eval()
            tv_calib = [fmnist_rgb(x[:32], args.tv_size) for x in calib]
            settle_batchnorm(model, tv_calib)
            test = fashion_mnist_loader("test", 64, shuffle=False, limit=args.tv_samples)
            batches = [fmnist_rgb(x, args.tv_size) for x, _ in test]
            run_all(f"{args.tv_model} (random weights, BatchNorm and calibration from "
                    f"Fashion-MNIST at {args.tv_size}x{args.tv_size} RGB), "
                    f"{args.tv_samples} test images", model, tv_calib, batches, None, folder,
                    args.threads, "top-1 = FP32", "cosine to FP32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
