"""``qdq sensitivity``: calibrate, sweep every layer, and write a report folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qdqapp.cli import CliError, register
from qdqapp.cli.cmd_calibrate import (
    add_model_arguments,
    calibrate_model,
    eval_function,
    prepare_model,
    write_text,
)

EPILOG = """examples:
  qdq sensitivity reference --data fashion-mnist --out runs/sens
  qdq sensitivity reference --data fashion-mnist --mode one-at-a-time --proxy \\
      --max-drop 0.5 --out runs/sens
  qdq sensitivity torchvision:resnet18 --data random:16x3x32x32 --eval-batches 4 --out runs/r18
  torchrun --nproc-per-node 4 -m qdqapp.cli sensitivity reference --data fashion-mnist \\
      --out runs/sens          # layers shared out over the ranks

writes into --out: report.md, sensitivity.png (ranked bar chart), sensitivity.csv,
sensitivity.json, rows.jsonl, skip_layers.txt, calibration.json, and proxy.md/json with
--proxy. Measurements stream into rows.jsonl as they finish: run the same command
again after an interruption and it resumes (--fresh starts over).
With random data (no labels) the metric is top-1 agreement with the FP32 model.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--mode", choices=["leave-one-out", "one-at-a-time"],
                   default="leave-one-out")
    p.add_argument("--layers", help="comma-separated exact layer names (default: all)")
    p.add_argument("--eval-batches", type=int, default=None, metavar="N",
                   help="evaluation batches per measurement (default: all)")
    p.add_argument("--agreement", action="store_true",
                   help="score by top-1 agreement with FP32 even when labels exist")
    p.add_argument("--proxy", action="store_true",
                   help="also rank layers by output SQNR (one pass, no labels) and report "
                        "its rank correlation with the sweep")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--max-drop", type=float,
                      help="keep the most sensitive layers in float until the measured "
                           "drop from FP32 is at most this")
    goal.add_argument("--target", type=float, help="as --max-drop, for an absolute metric")
    goal.add_argument("--top-k", type=int, help="keep exactly the K most sensitive in float")
    p.add_argument("--fresh", action="store_true", help="delete rows.jsonl and start over")


def run(args: argparse.Namespace) -> int:
    import sensitivity
    from qdqapp.sources import load_data

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress_file = out / "rows.jsonl"
    if args.fresh:
        progress_file.unlink(missing_ok=True)
    model, device = prepare_model(args)
    summary = calibrate_model(args, model, device)
    write_text(out / "calibration.json", json.dumps(summary.to_dict(), indent=1) + "\n")
    eval_fn, name = eval_function(args, model, device)
    layers = [n.strip() for n in args.layers.split(",") if n.strip()] if args.layers else None
    if layers == []:
        raise CliError("--layers is empty")
    report = sensitivity.sweep(model, eval_fn, mode=args.mode, layers=layers,
                               progress=not args.quiet, resume=progress_file,
                               metric_name=name)
    if args.proxy:
        data = load_data(args.data, "calib", args.batch_size, args.calib_batches,
                         args.image_size)
        proxy = sensitivity.proxy_ranking(model, data, num_batches=args.calib_batches,
                                          layers=layers, device=device,
                                          progress=not args.quiet)
        exact = {r.layer: r.sensitivity for r in report.rows if r.ok}
        proxy.extra["spearman_with_sweep"] = sensitivity.spearman(proxy.scores(), exact)
        proxy.write(out)
        print(f"proxy: {proxy.seconds:.1f} s, Spearman with the sweep "
              f"{proxy.extra['spearman_with_sweep']:.3f}")
    if args.max_drop is not None or args.target is not None or args.top_k is not None:
        result = sensitivity.partial_quantize(model, report, eval_fn, max_drop=args.max_drop,
                                              target=args.target, top_k=args.top_k)
        print(f"partial quantization: {result}")
    report.write(out)
    print(report)
    print(f"wrote {out}")
    return 0


register("sensitivity", "per-layer sensitivity sweep and report folder", add_arguments, run,
         EPILOG)
