"""all-MiniLM-L6-v2 in static INT8, side by side in one run: qdq, NVIDIA modelopt, ONNX Runtime.

Every Linear quantized (inputs per tensor, weights per channel) unless a row says
otherwise; the score is the cosine similarity of mean-pooled sentence embeddings against
FP32 over the test sentences (``qdqapp/assets/text/test.txt``), min and mean; calibration
on ``calib.txt``. Rows:

- qdq: max, percentile 99.99 / 99.999, entropy, mse; each without and with SmoothQuant
  (``sensitivity.smoothquant``, alpha searched per layer); the best one again with both
  attention matmuls quantized too;
- ONNX Runtime running the exported Q/DQ model of the best row, against PyTorch;
- modelopt 0.47 (its own environment, ``--modelopt-python``; transformers is lent from
  this environment's site-packages, appended after its own): INT8_DEFAULT_CFG on the
  Linears and unmodified, histogram percentiles, INT8_SMOOTHQUANT_CFG both ways;
- ONNX Runtime ``quantize_dynamic`` (per channel; activation scales computed per batch
  at run time, so not a static TensorRT INT8 graph).

Usage::

    PYTHONPATH=. python scripts/minilm_ptq.py --out runs/minilm_ptq
    PYTHONPATH=. python scripts/minilm_ptq.py --no-modelopt     # qdq and ORT only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import qdq
import sensitivity
from export import to_onnx, verify
from export.verify import ort_session
from qdq.calib import HistogramCalibrator
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
from sensitivity.calibrate import collected_statistics, load_amax

METHODS = {
    "max": {"amax_method": "max"},
    "percentile 99.99": {"amax_method": "percentile", "percentile": 99.99},
    "percentile 99.999": {"amax_method": "percentile", "percentile": 99.999},
    "entropy": {"amax_method": "entropy"},
    "mse": {"amax_method": "mse"},
}
PERCENTILES = [99.9, 99.99, 99.999]


def quantize(model, calib, smooth: bool, keep: contextlib.ExitStack):
    """A quantized copy (every Linear and the attention matmuls), histogram statistics
    collected once; returns the model, its quantizers and the SmoothQuant report. The
    statistics live as long as ``keep`` stays open (every search runs on them)."""
    model = copy.deepcopy(model)
    qdq.replace_modules(model)
    report = sensitivity.smoothquant(model, calib, progress=False) if smooth else None
    stats = keep.enter_context(collected_statistics(model, calib, method="histogram",
                                                    progress=False))
    return model, stats.named, report


def set_attention(model, on: bool) -> None:
    """Both attention matmuls quantized (on) or in float (off)."""
    for _, mm in attention_matmuls(model):
        for q in (mm._input_quantizer, mm._other_quantizer):
            q.enable() if on else q.disable()


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def ort_embeddings(path: Path, batches) -> torch.Tensor:
    return onnx_sentence_outputs(ort_session(path, threads=torch.get_num_threads()), batches)


def run_modelopt(python: str, folder: Path, calib, test) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory(prefix="qdq-modelopt-") as scratch:
        src, dst = Path(scratch) / "in.pt", Path(scratch) / "out.pt"
        torch.save({"folder": str(folder), "calib": calib, "test": test,
                    "percentiles": PERCENTILES}, src)
        script = Path(__file__).resolve().parent / "modelopt_minilm.py"
        subprocess.run([os.path.abspath(python), str(script), str(src), str(dst),
                        site.getsitepackages()[0]], check=True, cwd=scratch)
        return torch.load(dst, weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/minilm_ptq")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modelopt-python", default=".venv-modelopt/bin/python")
    parser.add_argument("--no-modelopt", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    text = load_text_model(minilm_folder())
    calib = text_batches(text.tokenizer, read_sentences(ASSETS / "calib.txt"), batch_size=16)
    test = text_batches(text.tokenizer, read_sentences(ASSETS / "test.txt"), batch_size=16)
    metric = TextAgreement(text.model, test)
    rows: list[tuple[str, float, float]] = []

    def add(name: str, cos: torch.Tensor) -> None:
        rows.append((name, float(cos.min()), float(cos.mean())))
        print(f"{name:<72} min {cos.min():.4f}  mean {cos.mean():.4f}", flush=True)

    def add_score(name: str, score) -> None:
        rows.append((name, score.min_cosine, score.mean_cosine))
        print(f"{name:<72} min {score.min_cosine:.4f}  mean {score.mean_cosine:.4f}",
              flush=True)

    models, best, ours = {}, None, {}
    keep = contextlib.ExitStack()  # the histograms, until the last search
    for smooth in (False, True):
        model, named, report = quantize(text.model, calib, smooth, keep)
        models[smooth] = (model, named)
        set_attention(model, False)
        if report is not None:
            atomic_write(out / "smoothquant.txt", str(report) + "\n")
        for label, kwargs in METHODS.items():
            load_amax(named, **kwargs)
            if not smooth:
                ours[label] = {n.rsplit(".", 1)[0]: (float(q.amax), q.calibrator.bin_width)
                               for n, q in named if n.endswith("._input_quantizer")
                               and isinstance(q.calibrator, HistogramCalibrator)}
            score = metric.score(model)
            add_score(f"qdq, {label}" + (", SmoothQuant" if smooth else ""), score)
            if best is None or score.min_cosine > best[0]:
                best = (score.min_cosine, smooth, label)
    _, smooth, label = best
    tag = f"{label}{', SmoothQuant' if smooth else ''}"
    model, named = models[smooth]
    load_amax(named, **METHODS[label])
    set_attention(model, True)
    add_score(f"qdq, {tag}, attention matmuls too", metric.score(model))
    set_attention(model, False)

    # the best row exported: ONNX Runtime against PyTorch, and against FP32
    path = out / "minilm_int8.onnx"
    to_onnx(model, test[0], path)
    torch_emb = sentence_outputs(model, test)
    ort_emb = ort_embeddings(path, test)
    vs_torch = cosine_rows(ort_emb, torch_emb)
    add(f"ONNX Runtime on the exported qdq model ({tag})",
        cosine_rows(ort_emb, metric.reference))
    check = verify(model, path, test[1])
    print(f"ONNX Runtime vs PyTorch: min cosine {vs_torch.min():.6f} (free run); verify "
          f"same function {check.ok()}, forced run rel L2 {check.forced_rel_l2:.2e}, "
          f"{check.flips} rounding-boundary flips", flush=True)
    keep.close()  # the calibrators the descriptors asked for are back; the amax stays

    # ONNX Runtime dynamic quantization of the FP32 graph
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_path, dyn_path = out / "minilm_fp32.onnx", out / "minilm_dynamic.onnx"
    to_onnx(text.model, test[0], fp32_path)
    atomic_write(dyn_path, lambda tmp: quantize_dynamic(
        str(fp32_path), str(tmp), per_channel=True, weight_type=QuantType.QInt8))
    add("ONNX Runtime quantize_dynamic, per channel (dynamic activations: not static)",
        cosine_rows(ort_embeddings(dyn_path, test), metric.reference))

    if not args.no_modelopt:
        found = run_modelopt(args.modelopt_python, text.folder, calib, test)
        fp32 = found.pop("fp32")
        print(f"modelopt environment FP32 vs ours: min cosine "
              f"{cosine_rows(fp32, metric.reference).min():.6f}", flush=True)
        labels = {
            "int8_default_linear": "modelopt 0.47 INT8_DEFAULT_CFG (max), Linears only",
            "int8_default_unmodified": "modelopt INT8_DEFAULT_CFG unmodified "
                                       "(also quantizes LayerNorm inputs)",
            "int8_smoothquant_linear": "modelopt INT8_SMOOTHQUANT_CFG, Linears only",
            "int8_smoothquant_unmodified": "modelopt INT8_SMOOTHQUANT_CFG unmodified",
        }
        for p in PERCENTILES:
            theirs, mine = found.pop(f"amax_percentile_{p}"), ours.get(f"percentile {p}")
            if mine:
                diff = [abs(mine[k][0] - theirs[k]) / mine[k][1] for k in mine if k in theirs]
                print(f"percentile {p}: amax qdq - modelopt over {len(diff)} Linear inputs: "
                      f"max |diff| {max(diff):.2f} bins, {sum(d > 0.5 for d in diff)} "
                      "differ by a bin or more", flush=True)
        for key, emb in found.items():
            name = labels.get(key, "modelopt " + key.replace("_", " ") + ", Linears only")
            add(name, cosine_rows(emb, metric.reference))

    lines = ["| method | min | mean |", "|---|---|---|"]
    lines += [f"| {n} | {lo:.4f} | {mean:.4f} |" for n, lo, mean in rows]
    table = "\n".join(lines)
    print("\n" + table)
    print(f"\nONNX Runtime vs PyTorch (exported model): min cosine {vs_torch.min():.6f}, "
          f"mean {vs_torch.mean():.6f}; {time.perf_counter() - start:.0f} s")
    atomic_write(out / "table.md", table + "\n")
    atomic_write(out / "results.json", json.dumps(
        {"rows": rows, "ort_vs_torch_min": float(vs_torch.min()),
         "verify_ok": check.ok(), "forced_rel_l2": check.forced_rel_l2,
         "ort_vs_torch_mean": float(vs_torch.mean()),
         "sentences": {"calib": sum(len(b["input_ids"]) for b in calib),
                       "test": sum(len(b["input_ids"]) for b in test)}}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
