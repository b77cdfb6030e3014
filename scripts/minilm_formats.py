"""all-MiniLM-L6-v2 in every format, side by side in one run: INT8, FP8 E4M3, W8, W4.

For each format: the min and mean cosine of mean-pooled sentence embeddings against FP32
over the test sentences (``qdqapp/assets/text/test.txt``; calibration on ``calib.txt``),
the size of the exported ONNX file (and how many times smaller than the FP32 file), and
ONNX Runtime (CPU) on that file: its cosine against FP32 and against the PyTorch model
it was exported from (free run), and the verdict of ``export.verify`` on one batch
(forced run: identical Q/DQ on identical input, only one-step flips at rounding
boundaries; weight-only: every weight DequantizeLinear equal to PyTorch's weight).

Q/DQ rows quantize every Linear (inputs per tensor, weights per output channel; the
attention matmuls stay float, as in the INT8 headline of BENCHMARKS.md) and store the
weights as int8 / float8 initializers. Weight-only rows quantize the weights of every
Linear and the three embedding tables (word, position, token type: one scale per row, or
blocks along the row; in ONNX the integer rows are gathered, then dequantized), unless the
label says "Linear only"; LayerNorms and activations stay float.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/minilm_formats.py --out runs/minilm_formats
    # any local transformers folder and sentence files:
    PYTHONPATH=. python scripts/minilm_formats.py --folder DIR --calib A.txt --test B.txt
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import export
import qdq
import sensitivity
from export.verify import ort_session
from qdq.fileio import atomic_write
from qdq.rules import attention_matmuls
from qdqapp.hf import (
    ASSETS,
    TextAgreement,
    load_text_model,
    minilm_folder,
    onnx_sentence_outputs,
    read_sentences,
    sentence_outputs,
    text_batches,
)

Builder = Callable[[nn.Module, list], nn.Module]


# ---------------------------------------------------------------------------- formats
def qdq_format(name: str, method: str, amax_method: str | None, smooth: bool) -> Builder:
    """Quantizers on every Linear (attention matmuls off), in ``name`` (int8 or fp8)."""
    def build(model: nn.Module, calib: list) -> nn.Module:
        qdq.replace_modules(model)
        for _, mm in attention_matmuls(model):
            mm._input_quantizer.disable()
            mm._other_quantizer.disable()
        qdq.set_format(model, name)
        if smooth:
            sensitivity.smoothquant(model, calib, progress=False)
        sensitivity.calibrate(model, calib, method=method, amax_method=amax_method,
                              progress=False)
        return model

    return build


def weight_only_format(bits: int, block: int | None = None, tables: bool = True) -> Builder:
    """Weight-only on every Linear, and on the embedding tables unless ``tables=False``."""
    def build(model: nn.Module, calib: list) -> nn.Module:
        ignore = None if tables else (lambda name, m: isinstance(m, nn.Embedding))
        qdq.weight_only(model, bits=bits, block_size=block, ignore=ignore)
        return model

    return build


#: (label, builder or None for FP32, store Q/DQ weights as int8 / float8 initializers)
FORMATS: list[tuple[str, Builder | None, bool]] = [
    ("FP32", None, False),
    ("INT8 Q/DQ, SmoothQuant + max", qdq_format("int8", "max", None, True), True),
    ("INT8 Q/DQ, percentile 99.99 (no SmoothQuant)",
     qdq_format("int8", "histogram", "percentile", False), True),
    ("FP8 E4M3 Q/DQ, max", qdq_format("fp8", "max", None, False), True),
    ("FP8 E4M3 Q/DQ, histogram mse", qdq_format("fp8", "histogram", "mse", False), True),
    ("FP8 E4M3 Q/DQ, SmoothQuant + max", qdq_format("fp8", "max", None, True), True),
    ("W8 (per channel)", weight_only_format(8), False),
    ("W8 (per channel, Linear only)", weight_only_format(8, tables=False), False),
    ("W4 (block 128)", weight_only_format(4, 128), False),
    ("W4 (block 128, Linear only)", weight_only_format(4, 128, tables=False), False),
    ("W4 (block 64)", weight_only_format(4, 64), False),
    ("W4 (block 32)", weight_only_format(4, 32), False),
]


# ---------------------------------------------------------------------------- running
@dataclass
class Row:
    label: str
    format: str
    onnx_bytes: int
    min_cosine: float
    mean_cosine: float
    ort_min_cosine: float
    ort_mean_cosine: float
    ort_vs_torch_min: float
    verdict: str
    seconds: float


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def run_format(label: str, build: Builder | None, store: bool, float_model: nn.Module,
               calib: list, test: list, metric: TextAgreement, folder: Path,
               threads: int | None) -> Row:
    start = time.perf_counter()
    model = copy.deepcopy(float_model).eval()
    if build is not None:
        model = build(model, calib).eval()
    score = metric.score(model)
    slug = "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")
    path = folder / f"{slug}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's tracer warnings on transformers
        result = export.to_onnx(model, test[0], path, int8_weights=store)
    ort_rows = onnx_sentence_outputs(ort_session(path, threads), test)
    ort = metric.score_rows(ort_rows)
    vs_torch = cosine(ort_rows, sentence_outputs(model, test))
    report = export.verify(model, path, test[1], threads=threads)
    return Row(label, qdq.format_of(model), result.bytes, score.min_cosine, score.mean_cosine,
               ort.min_cosine, ort.mean_cosine, float(vs_torch.min()), report.verdict(),
               time.perf_counter() - start)


def table(rows: list[Row]) -> str:
    fp32 = rows[0].onnx_bytes
    lines = ["| format | ONNX MB | x smaller | min cosine | mean cosine | ORT min | ORT mean "
             "| ORT vs PyTorch min | export.verify |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.label} | {r.onnx_bytes / 1e6:.1f} | {fp32 / r.onnx_bytes:.2f} | "
                     f"{r.min_cosine:.4f} | {r.mean_cosine:.4f} | {r.ort_min_cosine:.4f} | "
                     f"{r.ort_mean_cosine:.4f} | {r.ort_vs_torch_min:.5f} | {r.verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/minilm_formats")
    p.add_argument("--folder", help="a transformers folder (default: the shipped MiniLM)")
    p.add_argument("--calib", default=str(ASSETS / "calib.txt"))
    p.add_argument("--test", default=str(ASSETS / "test.txt"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", nargs="*", help="labels (prefixes) of the formats to run")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    text = load_text_model(args.folder or minilm_folder())
    calib = text_batches(text.tokenizer, read_sentences(args.calib), args.batch_size)
    test = text_batches(text.tokenizer, read_sentences(args.test), args.batch_size)
    metric = TextAgreement(text.model, test)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"{sum(len(b['input_ids']) for b in calib)} calibration / {metric.sentences} test "
          "sentences", file=sys.stderr)
    chosen = [f for f in FORMATS if not args.only or f[0] == "FP32"
              or any(f[0].startswith(o) for o in args.only)]
    rows = []
    for label, build, store in chosen:
        row = run_format(label, build, store, text.model, calib, test, metric, out,
                         args.threads)
        print(f"  {row.label:<46} min {row.min_cosine:.4f} mean {row.mean_cosine:.4f} "
              f"ORT min {row.ort_min_cosine:.4f}  {row.onnx_bytes / 1e6:6.1f} MB  "
              f"{row.seconds:6.1f} s", file=sys.stderr, flush=True)
        rows.append(row)
    text_table = table(rows)
    print(text_table)
    print(f"\n{time.perf_counter() - start:.0f} s", file=sys.stderr)
    atomic_write(out / "table.md", text_table + "\n")
    atomic_write(out / "results.json", json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
