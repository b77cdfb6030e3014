"""``qdq sensitivity``: sweep every layer of the quantized model and write a report
folder (and the partially quantized model when a goal is given)."""

from __future__ import annotations

import argparse
import json

from qdq.fileio import atomic_write
from qdqapp.calibrators import check_calibrator
from qdqapp.cli import CliError, register
from qdqapp.cli.cmd_calibrate import QUANTIZED, calibration_record
from qdqapp.cli.options import (
    add_calibrator_option,
    add_data_options,
    add_model_options,
    data_options,
    model_options,
)
from qdqapp.flow import Session, calibrate_model, check_layer_names, check_model_options
from qdqapp.formats import format_choice
from qdqapp.outputs import OutputFolder, check_output_folder

EPILOG = f"""examples:
  qdq sensitivity reference --data fashion-mnist --out runs/sens
  qdq sensitivity reference --checkpoint runs/calib/quantized.pt --data fashion-mnist \\
      --mode one-at-a-time --proxy --max-drop 0.5 --out runs/sens
  qdq sensitivity torchvision:resnet18 --checkpoint resnet18_float.pt \\
      --data imagefolder:/data/imagenet --eval-batches 20 --out runs/r18
  qdq sensitivity hf:minilm --data text:sentences.txt --smoothquant --eval mean-cosine \\
      --max-drop 0.002 --out runs/minilm_sens
  torchrun --nproc-per-node 4 -m qdqapp.cli sensitivity reference --data fashion-mnist \\
      --out runs/sens          # layers shared out over the ranks

writes into --out: report.md, sensitivity.png (ranked bar chart), sensitivity.csv,
sensitivity.json, rows.jsonl, sweep.json, skip_layers.txt, calibration.json, proxy.md/json
with --proxy, and with --max-drop/--target/--top-k {QUANTIZED} (the model with those
layers kept in float). A quantized-model --checkpoint is swept as it is (no calibration).
Measurements stream into rows.jsonl as they finish: run the same command again after an
interruption and it resumes; sweep.json records what built the model and the data, and a
resume with other options is refused (--fresh starts over).
With random data (no labels) the metric is top-1 agreement with the FP32 model; with text
the min cosine of mean-pooled sentence embeddings vs FP32 (--eval mean-cosine: the mean).
Random weights (torchvision:NAME without --checkpoint) or random data only show that the
command runs: such a model predicts about one class for every input, so no layer moves
the metric. When the metric cannot tell the layers apart (every layer the same within one
sample, or FP32 predicting one class for 90% of the inputs or more), the output,
report.md, sensitivity.json and the chart say so, and what to do.
--smoothquant also writes smoothquant.txt/json.
--format fp8 sweeps FP8 quantizers; w8/w4 have no quantizers to sweep and are refused.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_data_options(p, evaluation=True)
    p.add_argument("--out", required=True, help="folder for the report (created)")
    add_calibrator_option(p)
    p.add_argument("--mode", choices=["leave-one-out", "one-at-a-time"],
                   default="leave-one-out")
    p.add_argument("--layers", help="comma-separated exact layer names (default: all)")
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


_RESUME_KEYS = ("model", "checkpoint", "rules", "ignore", "seed", "data", "batch_size",
                "calib_batches", "image_size", "eval_batches", "calibrator", "agreement",
                "mode", "format", "eval", "smoothquant", "smoothquant_alpha")


def _check_resume(out, args: argparse.Namespace) -> dict:
    """What the rows in ``rows.jsonl`` were measured with; a resume must match it."""
    current = {k: getattr(args, k) for k in _RESUME_KEYS}
    rows, record = out / "rows.jsonl", out / "sweep.json"
    if args.fresh or not rows.is_file() or rows.stat().st_size == 0:
        return current
    saved = json.loads(record.read_text()) if record.is_file() else {}
    changed = sorted(k for k in current if saved.get(k) != current[k])
    if changed:
        raise CliError(f"{rows} holds measurements of another model or data (changed: "
                       f"{', '.join(changed)}); pass --fresh to start over or choose another "
                       "--out")
    return current


def run(args: argparse.Namespace) -> int:
    import sensitivity
    from qdqapp.evaluate import SWEEP_ADVICE, check_eval_for, evaluation, metric_check

    out = check_output_folder(args.out)
    check_calibrator(args.calibrator)
    check_eval_for(args.eval, args.model, args.data)
    layers = None
    if args.layers is not None:
        layers = [n.strip() for n in args.layers.split(",") if n.strip()]
        if not layers:
            raise CliError("--layers is empty")
    opts = model_options(args)
    checkpoint = check_model_options(opts, [args.calibrator])
    choice = format_choice(opts, checkpoint)
    if choice.weight_only:
        raise CliError(f"--format {choice.name}: the sweep switches quantizers off one "
                       "layer at a time, and weight-only layers have none; sweep the int8 "
                       "or fp8 model")
    setup = _check_resume(out, args) if out.is_dir() else None
    session = Session.open(opts, args.data, data_options(args), checkpoint,
                           progress=not args.quiet)
    prepared, source = session.prepared, session.source
    check_layer_names(prepared.model, layers)  # before any work: names only
    # the metric, its FP32 reference computed with the quantizers off
    eval_fn, name = evaluation(source, prepared.model, prepared.device, args.agreement,
                               args.eval)
    with OutputFolder(out, keep=("rows.jsonl", "sweep.json")):
        if prepared.smoothquant is not None:
            prepared.smoothquant.write(out)
        progress_file = out / "rows.jsonl"
        if args.fresh:
            progress_file.unlink(missing_ok=True)
        atomic_write(out / "sweep.json", json.dumps(setup or _check_resume(out, args),
                                                    indent=1) + "\n")
        calibrator = session.metadata().get("calibrator") if prepared.restored else None
        if prepared.uncalibrated() or not prepared.restored:
            calibrator = args.calibrator
            summary, left = calibrate_model(prepared, source.calib(), args.calib_batches,
                                            calibrator, progress=not args.quiet)
        else:
            summary, left = None, []
        check_layer_names(prepared.model, layers)
        record = calibration_record(session, calibrator or "from the checkpoint", summary,
                                    left)
        atomic_write(out / "calibration.json", json.dumps(record, indent=1) + "\n")
        check = metric_check(eval_fn, prepared.model)  # can the metric see a layer at all?
        report = sensitivity.sweep(prepared.model, eval_fn, mode=args.mode, layers=layers,
                                   progress=not args.quiet, resume=progress_file,
                                   metric_name=name, resolution=check.resolution)
        report.extra_warnings += check.warnings
        report.advice = SWEEP_ADVICE
        if args.proxy:
            proxy = sensitivity.proxy_ranking(prepared.model, source.calib(),
                                              num_batches=args.calib_batches, layers=layers,
                                              device=prepared.device, progress=not args.quiet)
            exact = {r.layer: r.sensitivity for r in report.rows if r.ok}
            proxy.extra["spearman_with_sweep"] = sensitivity.spearman(proxy.scores(), exact)
            proxy.write(out)
            print(f"proxy: {proxy.seconds:.1f} s, Spearman with the sweep "
                  f"{proxy.extra['spearman_with_sweep']:.3f}")
        if args.max_drop is not None or args.target is not None or args.top_k is not None:
            result = sensitivity.partial_quantize(prepared.model, report, eval_fn,
                                                  max_drop=args.max_drop, target=args.target,
                                                  top_k=args.top_k)
            print(f"partial quantization: {result}")
            session.save(out / QUANTIZED, calibrator=calibrator,
                         skip_layers=list(result.skip))
        report.write(out)
    print(report)
    print(f"wrote {out}")
    return 0


register("sensitivity", "per-layer sensitivity sweep and report folder", add_arguments, run,
         EPILOG)
