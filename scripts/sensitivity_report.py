"""Full sensitivity report of the Fashion-MNIST reference model, on real data.

Steps: load the trained reference CNN -> TensorRT placement rules (BN folding, residual
add, shared concat/max-pool scales) -> compare calibrators on training images and keep
the best -> leave-one-out sweep of every layer on test images (resumable) -> proxy
ranking (per-layer SQNR) and its Spearman rank correlation with the sweep -> partial
quantization to a measured target -> report folder.

    PYTHONPATH=. python scripts/sensitivity_report.py --out runs/sensitivity_report

Rerunning the same command after an interruption resumes the sweep from rows.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import qdq
import sensitivity
from qdqapp.data import fashion_mnist_loader
from qdqapp.evaluate import top1_accuracy
from qdqapp.reference import load_reference_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="reference state_dict (default: the shipped one)")
    p.add_argument("--out", type=Path, default=Path("runs/sensitivity_report"))
    p.add_argument("--calib-samples", type=int, default=2048)
    p.add_argument("--eval-samples", type=int, default=10_000, help="test images per eval")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--proxy-batches", type=int, default=4)
    p.add_argument("--mode", choices=["leave-one-out", "one-at-a-time"],
                   default="leave-one-out")
    p.add_argument("--methods", default=",".join(sensitivity.compare.DEFAULT_METHODS),
                   help="calibrators to compare (comma-separated)")
    p.add_argument("--metric", choices=["top1", "logit-mse"], default="top1",
                   help="top-1 accuracy, or the mean squared difference of the logits from "
                   "the FP32 model's: continuous, so per-layer differences stand out of the "
                   "noise of a few images changing class")
    p.add_argument("--max-drop", type=float, default=0.3,
                   help="top-1 points allowed below FP32 for partial quantization")
    p.add_argument("--fresh", action="store_true", help="start the sweep over")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    model = load_reference_model(args.checkpoint).to(device).eval()
    calib = fashion_mnist_loader("train", batch_size=args.batch_size, shuffle=True,
                                 limit=None, seed=0)
    calib = [b for _, b in zip(range(max(1, args.calib_samples // args.batch_size)), calib,
                               strict=False)]
    test = list(fashion_mnist_loader("test", batch_size=args.batch_size, shuffle=False,
                                     limit=args.eval_samples))
    test = [(x.to(device), y.to(device)) for x, y in test]

    if args.metric == "top1":
        metric_name, higher_is_better = "top-1 accuracy (%)", True

        def eval_fn(m):
            return top1_accuracy(m, test, device)
    else:
        metric_name, higher_is_better = "logit MSE vs FP32", False
        with torch.no_grad():
            reference = [model(x) for x, _ in test]

        def eval_fn(m):
            m.eval()
            with torch.no_grad():
                err = sum(float(((m(x) - ref) ** 2).sum()) for (x, _), ref in zip(
                    test, reference, strict=True))
            return err / sum(ref.numel() for ref in reference)

    example = (calib[0][0][:2].to(device),)
    try:
        from qdq.rules import apply_rules
    except ImportError:  # placement rules not installed: plain insertion
        apply_rules = None
    if apply_rules is not None:
        model = apply_rules(model, example).to(device).eval()
    else:
        qdq.replace_modules(model)
    qdq.name_quantizers(model)

    start = time.perf_counter()
    table = sensitivity.compare_calibrators(
        model, calib, eval_fn, methods=args.methods.split(","), device=device,
        metric_name=metric_name, higher_is_better=higher_is_better)
    timings["compare_calibrators"] = time.perf_counter() - start
    table.write(out)
    print(table.markdown())

    rows_file = out / "rows.jsonl"
    if args.fresh:
        rows_file.unlink(missing_ok=True)
    start = time.perf_counter()
    report = sensitivity.sweep(model, eval_fn, mode=args.mode, resume=rows_file,
                               metric_name=metric_name, higher_is_better=higher_is_better)
    timings["sweep"] = time.perf_counter() - start

    start = time.perf_counter()
    proxy = sensitivity.proxy_ranking(model, calib, num_batches=args.proxy_batches,
                                      device=device)
    timings["proxy"] = time.perf_counter() - start
    exact = {r.layer: r.sensitivity for r in report.rows if r.ok}
    rho = sensitivity.spearman(proxy.scores(), exact)
    proxy.extra["spearman_with_sweep"] = rho
    proxy.write(out)

    partial = None
    if args.metric == "top1":  # a drop in MSE units would mean nothing to a reader
        start = time.perf_counter()
        partial = sensitivity.partial_quantize(model, report, eval_fn, max_drop=args.max_drop)
        timings["partial_quantize"] = time.perf_counter() - start
    report.write(out)

    summary = {
        "calibrator": table.best, "fp32": report.fp32, "int8": report.int8,
        "layers": len(report.rows), "eval_samples": sum(len(y) for _, y in test),
        "metric": metric_name, "spearman_proxy_vs_sweep": rho,
        "skip": partial.skip if partial else None,
        "partial_metric": partial.metric if partial else None,
        "target": partial.target if partial else None,
        "met": partial.met if partial else None, "seconds": timings,
        "top5_sweep": report.ranked_layers()[:5], "top5_proxy": proxy.ranking()[:5],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(report)
    print(f"calibrator kept: {table.best}")
    print(f"{metric_name}: FP32 {report.fp32:.4g}  INT8 {report.int8:.4g}  "
          f"({len(report.rows)} layers)")
    print(f"proxy vs sweep Spearman rank correlation: {rho:.3f} "
          f"(proxy {timings['proxy']:.1f} s, sweep {timings['sweep']:.1f} s)")
    if partial is not None:
        print(f"partial quantization: {partial}; skip {partial.skip}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
