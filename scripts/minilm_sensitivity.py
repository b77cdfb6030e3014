"""all-MiniLM-L6-v2: which layers hurt in INT8, and the partial-quantization curve.

For three set-ups, each calibrated on ``qdqapp/assets/text/calib.txt`` and scored by the
min cosine of mean-pooled sentence embeddings against FP32 on ``test.txt``:

- ``linears-p99.99``: every Linear in INT8, percentile 99.99 calibration (the best plain
  calibration), no SmoothQuant;
- ``linears-smoothquant-max``: every Linear, SmoothQuant (alpha per layer) then max;
- ``attention-smoothquant-max``: the same with both attention matmuls quantized too.

For each: a leave-one-out ``sensitivity.sweep`` (report, CSV and bar chart written under
``--out/<setup>/``), then the curve "layers kept in float vs min cosine": the most
sensitive layers go back to float one by one (measured after each), up to ``--max-float``
layers. Prints the curves and how many float layers each needs for ``--target``. Sweep
rows go to ``--out/<setup>/rows.jsonl`` as they are measured; a rerun resumes from them.

Usage::

    PYTHONPATH=. python scripts/minilm_sensitivity.py --out runs/minilm_sensitivity
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import qdq
import sensitivity
from qdq.fileio import atomic_write
from qdq.rules import attention_matmuls
from qdqapp.hf import (
    ASSETS,
    TextAgreement,
    load_text_model,
    minilm_folder,
    read_sentences,
    text_batches,
)
from sensitivity.layers import find_layers, select_layers

SETUPS = {
    "linears-p99.99": {"smooth": False, "attention": False,
                       "calib": {"method": "histogram", "amax_method": "percentile",
                                 "percentile": 99.99}},
    "linears-smoothquant-max": {"smooth": True, "attention": False,
                                "calib": {"method": "max"}},
    "attention-smoothquant-max": {"smooth": True, "attention": True,
                                  "calib": {"method": "max"}},
}


def build(float_model, calib, smooth: bool, attention: bool, calib_args: dict):
    model = copy.deepcopy(float_model)
    qdq.replace_modules(model)
    if not attention:
        for _, mm in attention_matmuls(model):
            mm._input_quantizer.disable()
            mm._other_quantizer.disable()
    if smooth:
        sensitivity.smoothquant(model, calib, progress=False)
    sensitivity.calibrate(model, calib, progress=False, **calib_args)
    return model


def curve(model, report, metric, max_float: int) -> list[tuple[int, float, str]]:
    """(layers in float, min cosine, the layer just returned to float), most sensitive first."""
    order = [r.layer for r in report.ranked() if r.ok][:max_float]
    layers = select_layers(find_layers(model), order)
    points = [(0, metric(model), "-")]
    try:
        for k, layer in enumerate(layers, start=1):
            layer.disable()
            points.append((k, metric(model), layer.name))
    finally:
        for layer in layers:
            layer.enable()
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/minilm_sensitivity")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-float", type=int, default=8)
    parser.add_argument("--target", type=float, default=0.995)
    parser.add_argument("--setups", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    start = time.perf_counter()
    text = load_text_model(minilm_folder())
    calib = text_batches(text.tokenizer, read_sentences(ASSETS / "calib.txt"), batch_size=16)
    test = text_batches(text.tokenizer, read_sentences(ASSETS / "test.txt"), batch_size=16)
    metric = TextAgreement(text.model, test)
    results = {}
    for name in args.setups:
        setup = SETUPS[name]
        model = build(text.model, calib, setup["smooth"], setup["attention"], setup["calib"])
        rows = out / name / "rows.jsonl"
        rows.parent.mkdir(parents=True, exist_ok=True)
        report = sensitivity.sweep(model, metric, mode="leave-one-out", progress=False,
                                   metric_name="min cosine", resume=rows)
        report.write(out / name)
        points = curve(model, report, metric, args.max_float)
        needed = next((k for k, value, _ in points if value >= args.target), None)
        results[name] = {"curve": points, "float_layers_for_target": needed,
                         "top": [(r.layer, r.metric) for r in report.ranked()[:8]]}
        print(f"\n{name}: full INT8 min cosine {points[0][1]:.4f}; "
              f"{needed if needed is not None else f'> {args.max_float}'} layers in float "
              f"for >= {args.target}", flush=True)
        print("  most sensitive (min cosine with that layer in float): " + ", ".join(
            f"{layer} {value:.4f}" for layer, value in results[name]["top"][:5]))
        for k, value, layer in points:
            print(f"  {k:>2} in float  {value:.4f}  (+ {layer})")
    atomic_write(out / "curves.json", json.dumps(results, indent=1))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
