"""all-MiniLM-L6-v2 weight-only INT4, qdq and NVIDIA modelopt side by side in one run, and
SmoothQuant's time next to modelopt's.

One table: side, method, block, min cosine, mean cosine, seconds. Every Linear's weight is
quantized INT4 block-wise (activations float); the score is the cosine of mean-pooled
sentence embeddings against FP32 over the test sentences (``qdqapp/assets/text/test.txt``),
calibration on ``calib.txt``; ``seconds`` is the wall time of the quantize call only.

- modelopt rows come from ``scripts/modelopt_minilm.py`` run as a subprocess with the
  Python of its own environment (``--modelopt-python``; transformers is lent from this
  environment, appended after its own packages): max, mse, awq_lite (INT4_AWQ_CFG),
  awq_clip, awq_full and GPTQ where that modelopt has it;
- qdq rows come from ``qdq_rows`` of ``scripts/minilm_weight_methods.py`` when that file
  has it; otherwise only max and mse, through ``qdq.weight_only(..., amax_method=...)``
  (the script says which).

SmoothQuant (INT8, every Linear): ``sensitivity.smoothquant`` (alpha searched per layer)
against modelopt's INT8_SMOOTHQUANT_CFG (one alpha), each timed ``--repeats`` times in
this run, with the same thread count. modelopt's number is its whole ``mtq.quantize``
(quantizer insertion, max calibration, smoothing), so qdq's is given both alone and with
the same work around it (``replace_modules`` + ``smoothquant`` + max calibration). Each
side's min cosine after SmoothQuant + max calibration is printed too.
``--compare-smoothquant FILE`` also times another version of ``smoothquant`` (for example
the last commit's: ``git show HEAD:sensitivity/smoothquant.py > /tmp/old_sq.py``).

modelopt's environment, apart from the project's (never one of its dependencies)::

    python3 -m venv .venv-modelopt
    .venv-modelopt/bin/pip install torch==2.14.1 nvidia-modelopt requests huggingface_hub

Usage::

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python scripts/bench_weight_methods.py \\
        --modelopt-python .venv-modelopt/bin/python --threads 1
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import os
import site
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import qdq
import sensitivity
from qdq.rules import attention_matmuls
from qdqapp.hf import (
    ASSETS,
    TextAgreement,
    load_text_model,
    minilm_folder,
    read_sentences,
    text_batches,
)

MODELOPT_METHODS = ["max", "mse", "awq_lite", "awq_clip", "awq_full", "gptq"]


@dataclass
class Row:
    side: str
    method: str
    block: int
    min_cosine: float
    mean_cosine: float
    seconds: float


# ------------------------------------------------------------------------ modelopt
def run_modelopt(python: str, folder: Path, calib, test, **job) -> dict:
    """modelopt's results for ``job`` (the optional keys of ``scripts/modelopt_minilm.py``:
    embeddings by name, ``seconds``, ``smoothquant_seconds``, ``versions``)."""
    with tempfile.TemporaryDirectory(prefix="qdq-modelopt-") as scratch:
        src, dst = Path(scratch) / "in.pt", Path(scratch) / "out.pt"
        torch.save({"folder": str(folder), "calib": calib, "test": test, "percentiles": [],
                    "timings": True, **job}, src)
        script = Path(__file__).resolve().parent / "modelopt_minilm.py"
        subprocess.run([os.path.abspath(python), str(script), str(src), str(dst),
                        site.getsitepackages()[0]], check=True, cwd=scratch)
        return torch.load(dst, weights_only=True)


def modelopt_rows(found: dict, metric: TextAgreement) -> list[Row]:
    rows = []
    for name, seconds in found["seconds"].items():
        if not name.startswith("w4_b"):
            continue
        block, method = name[len("w4_b"):].split("_", 1)
        score = metric.score_rows(found[name])
        rows.append(Row("modelopt", method, int(block), score.min_cosine, score.mean_cosine,
                        seconds))
    return rows


# ----------------------------------------------------------------------------- qdq
def _weight_methods_module():
    """``scripts/minilm_weight_methods.py`` if it is there and has ``qdq_rows``."""
    path = Path(__file__).resolve().parent / "minilm_weight_methods.py"
    if not path.exists():
        return None, f"{path.name} does not exist"
    spec = importlib.util.spec_from_file_location("minilm_weight_methods", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    if not callable(getattr(module, "qdq_rows", None)):
        return None, f"{path.name} has no qdq_rows"
    return module, None


def _block_of(fmt: str) -> int | None:
    """``"W4 b128"`` -> 128; None for any other format."""
    parts = fmt.split()
    if len(parts) == 2 and parts[0] == "W4" and parts[1].startswith("b"):
        return int(parts[1][1:])
    return None


def qdq_weight_rows(text, calib, test, metric: TextAgreement, blocks, methods=None
                    ) -> tuple[list[Row], str]:
    """qdq's rows for ``blocks`` (and ``methods``, by their labels there; None: all)."""
    module, why = _weight_methods_module()
    if module is not None:
        params = list(inspect.signature(module.qdq_rows).parameters)
        if params[:3] == ["float_model", "calib", "metric"] and "formats" in params:
            options = {"int8": False} if "int8" in params else {}
            if methods and "methods" in params:
                options["methods"] = list(methods)
            found = module.qdq_rows(text.model, calib, metric,
                                    formats=[f"W4 b{b}" for b in blocks], **options)
            rows = [Row("qdq", r.method, _block_of(r.format), r.min_cosine, r.mean_cosine,
                        r.seconds) for r in found if _block_of(r.format) in blocks]
            return rows, "qdq rows: qdq_rows of scripts/minilm_weight_methods.py"
        if params[:4] == ["text", "calib", "test", "blocks"]:
            found = module.qdq_rows(text, calib, test, list(blocks))
            rows = [Row("qdq", r.method, int(r.block), r.min_cosine, r.mean_cosine,
                        r.seconds) for r in found]
            return rows, "qdq rows: qdq_rows of scripts/minilm_weight_methods.py"
        why = f"its qdq_rows{inspect.signature(module.qdq_rows)} is not a known signature"
    rows = []
    for block in blocks:
        for method in [m for m in ("max", "mse") if not methods or m in methods]:
            model = copy.deepcopy(text.model).eval()
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qdq.weight_only(model, 4, block, amax_method=method, progress=False)
            seconds = time.perf_counter() - start
            score = metric.score(model)
            rows.append(Row("qdq", method, block, score.min_cosine, score.mean_cosine,
                            seconds))
    return rows, (f"qdq rows: max and mse only, through qdq.weight_only ({why})")


# ---------------------------------------------------------------------- SmoothQuant
def _linears_only(model) -> None:
    """Both attention matmuls float: every Linear quantized, nothing else."""
    for _, mm in attention_matmuls(model):
        mm._input_quantizer.disable()
        mm._other_quantizer.disable()


def time_smoothquant(smoothquant, float_model, calib, metric: TextAgreement | None = None
                     ) -> tuple[float, float, float | None, float | None]:
    """(seconds of ``smoothquant`` alone, seconds of replace_modules + smoothquant + max
    calibration, min cosine, mean cosine) on a fresh copy; scored only with a metric."""
    model = copy.deepcopy(float_model).eval()
    start = time.perf_counter()
    qdq.replace_modules(model)
    _linears_only(model)
    begin = time.perf_counter()
    smoothquant(model, calib, progress=False)
    alone = time.perf_counter() - begin
    sensitivity.calibrate(model, calib, method="max", progress=False)
    whole = time.perf_counter() - start
    if metric is None:
        return alone, whole, None, None
    score = metric.score(model)
    return alone, whole, score.min_cosine, score.mean_cosine


def _load_smoothquant(path: str):
    spec = importlib.util.spec_from_file_location("smoothquant_compared", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.smoothquant


def _seconds(values: list[float]) -> str:
    return (f"median {statistics.median(values):.2f} s (" +
            ", ".join(f"{v:.2f}" for v in values) + ")")


# ---------------------------------------------------------------------------- main
def table(rows: list[Row]) -> str:
    rows = sorted(rows, key=lambda r: (-r.block, r.side != "modelopt", -r.min_cosine))
    lines = ["| side | method | block | min cosine | mean cosine | seconds |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r.side} | {r.method} | {r.block} | {r.min_cosine:.4f} | "
              f"{r.mean_cosine:.4f} | {r.seconds:.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modelopt-python", default=".venv-modelopt/bin/python")
    p.add_argument("--no-modelopt", action="store_true", help="qdq rows and timings only")
    p.add_argument("--blocks", type=int, nargs="+", default=[128, 32])
    p.add_argument("--modelopt-methods", nargs="+", default=MODELOPT_METHODS,
                   choices=MODELOPT_METHODS)
    p.add_argument("--qdq-methods", nargs="+",
                   help="qdq methods by their labels in minilm_weight_methods.py (default all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3,
                   help="SmoothQuant rounds (each times every side once)")
    p.add_argument("--compare-smoothquant", metavar="FILE",
                   help="also time smoothquant() from this file (another version)")
    p.add_argument("--no-weights", action="store_true", help="the SmoothQuant timing only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    text = load_text_model(minilm_folder())
    calib = text_batches(text.tokenizer, read_sentences(ASSETS / "calib.txt"), batch_size=16)
    test = text_batches(text.tokenizer, read_sentences(ASSETS / "test.txt"), batch_size=16)
    metric = TextAgreement(text.model, test)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{sum(len(b['input_ids']) for b in calib)} calibration / {metric.sentences} test "
          "sentences", flush=True)

    # SmoothQuant first, in rounds (qdq, then modelopt in its own process), so that both
    # sides see the machine in the same state
    versions = {"this tree": sensitivity.smoothquant}
    if args.compare_smoothquant:
        versions[args.compare_smoothquant] = _load_smoothquant(args.compare_smoothquant)
    timings = {name: ([], [], None, None) for name in versions}
    theirs: list[float] = []
    found: dict = {}
    for r in range(args.repeats):
        for name, fn in versions.items():
            alone, whole, lo, mean = time_smoothquant(
                fn, text.model, calib, metric if r == args.repeats - 1 else None)
            timings[name][0].append(alone)
            timings[name][1].append(whole)
            if lo is not None:
                timings[name] = (*timings[name][:2], lo, mean)
        if not args.no_modelopt:
            found = run_modelopt(args.modelopt_python, text.folder, calib, test,
                                 suite="smoothquant", smoothquant_repeats=1,
                                 threads=args.threads)
            theirs += found["smoothquant_seconds"]
    sq_found = found

    rows: list[Row] = []
    if not args.no_modelopt and not args.no_weights:
        found = run_modelopt(args.modelopt_python, text.folder, calib, test, suite="weights",
                             blocks=args.blocks, methods=args.modelopt_methods,
                             threads=args.threads)
        rows += modelopt_rows(found, metric)
        for name, err in found.get("errors", {}).items():
            print(f"modelopt {name} failed: {err}")
    note = ""
    if not args.no_weights:
        qdq_rows, note = qdq_weight_rows(text, calib, test, metric, args.blocks,
                                         args.qdq_methods)
        rows += qdq_rows

    if rows:
        print("\n" + table(rows))
        print(note)
    if found:
        print("modelopt environment: " + ", ".join(f"{k} {v}"
                                                  for k, v in found["versions"].items()))
        fp32 = metric.score_rows(found["fp32"])
        print(f"modelopt environment FP32 vs this one: min cosine {fp32.min_cosine:.6f}")

    print("\nSmoothQuant INT8, every Linear, max calibration "
          f"({torch.get_num_threads()} threads, {args.repeats} runs each):")
    for name, (alone, whole, lo, mean) in timings.items():
        print(f"  qdq smoothquant ({name}): {_seconds(alone)}; with replace_modules and "
              f"max calibration {_seconds(whole)}; min cosine {lo:.4f}, mean {mean:.4f}")
    if theirs:
        score = metric.score_rows(sq_found["int8_smoothquant_linear"])
        print(f"  modelopt INT8_SMOOTHQUANT_CFG (mtq.quantize, Linears only): "
              f"{_seconds(theirs)}; min cosine {score.min_cosine:.4f}, "
              f"mean {score.mean_cosine:.4f}")
        ref = statistics.median(theirs)
        for name, (alone, whole, _, _) in timings.items():
            print(f"  ratio qdq ({name}) / modelopt, medians: smoothquant alone "
                  f"{statistics.median(alone) / ref:.2f}x, with the same work around it "
                  f"{statistics.median(whole) / ref:.2f}x")
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
