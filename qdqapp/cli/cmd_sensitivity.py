"""``qdq sensitivity``: sweep every layer of the quantized model and write a report
folder (and the partially quantized model when a goal is given)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from qdq.fileio import atomic_write
from qdqapp.cli import CliError, register
from qdqapp.cli.cmd_calibrate import QUANTIZED, calibration_record
from qdqapp.cli.options import (
    add_calibrator_option,
    add_data_options,
    add_force_option,
    add_model_options,
    data_spec,
    eval_spec,
    model_spec,
)
from qdqapp.flow import Session, calibrate_model, check_layer_names
from qdqapp.outputs import OutputFolder, OutputSpec, parse_output
from qdqapp.specs import DataSpec, EvalSpec, ModelSpec, integer, number, parse_calibrator

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
Every flag (--top-k at least 1, --max-drop not negative, ...) is checked before any work;
the folder is marked as qdq sensitivity's: other commands refuse to write into it, and it
refuses another command's folder, unless --force.
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
    add_force_option(p)


_RESUME_KEYS = ("model", "checkpoint", "rules", "ignore", "seed", "data", "batch_size",
                "calib_batches", "image_size", "eval_batches", "calibrator", "agreement",
                "mode", "format", "eval", "smoothquant", "smoothquant_alpha")


@dataclass(frozen=True)
class SensitivitySpecs:
    """Everything ``qdq sensitivity`` was asked, parsed; ``record`` is what identifies
    the measurements (``sweep.json``: a resume must match it)."""

    model: ModelSpec
    data: DataSpec
    eval: EvalSpec
    out: OutputSpec
    calibrator: str
    mode: str
    layers: tuple[str, ...] | None
    proxy: bool
    max_drop: float | None
    target: float | None
    top_k: int | None
    fresh: bool
    record: dict[str, Any]

    @property
    def goal(self) -> bool:
        return self.max_drop is not None or self.target is not None or self.top_k is not None


def parse(args: argparse.Namespace) -> SensitivitySpecs:
    """The flags, checked once, before any work (the output folder's earlier
    measurements too: a resume with other settings is refused here)."""
    out = parse_output(args.out, "sensitivity", force=args.force)
    layers = None
    if args.layers is not None:
        layers = tuple(n.strip() for n in args.layers.split(",") if n.strip())
        if not layers:
            raise CliError("--layers is empty")
    max_drop = number(args.max_drop, "--max-drop", 0, optional=True)
    target = number(args.target, "--target", optional=True)
    top_k = integer(args.top_k, "--top-k", 1, optional=True)
    model = model_spec(args)
    calibrator = parse_calibrator(args.calibrator, model.format)
    if model.format.weight_only:
        raise CliError(f"--format {model.format.name}: the sweep switches quantizers off one "
                       "layer at a time, and weight-only layers have none; sweep the int8 "
                       "or fp8 model")
    data = data_spec(args, model)
    evaluation = eval_spec(args, model, data)
    record = {k: getattr(args, k) for k in _RESUME_KEYS}
    if out.path.is_dir():
        _check_resume(out.path, record, args.fresh)
    return SensitivitySpecs(model, data, evaluation, out, calibrator, args.mode, layers,
                            args.proxy, max_drop, target, top_k, args.fresh, record)


def _check_resume(out, record: dict[str, Any], fresh: bool) -> None:
    """The rows in ``rows.jsonl`` were measured with ``sweep.json``; a resume must match."""
    rows, saved_file = out / "rows.jsonl", out / "sweep.json"
    if fresh or not rows.is_file() or rows.stat().st_size == 0:
        return
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
    changed = sorted(k for k in record if saved.get(k) != record[k])
    if changed:
        raise CliError(f"{rows} holds measurements of another model or data (changed: "
                       f"{', '.join(changed)}); pass --fresh to start over or choose another "
                       "--out")


def run(args: argparse.Namespace) -> int:
    import sensitivity
    from qdqapp.evaluate import SWEEP_ADVICE, evaluation, metric_check

    specs = parse(args)
    progress = not args.quiet
    session = Session.open(specs.model, specs.data, progress=progress)
    prepared, source = session.prepared, session.source
    layers = list(specs.layers) if specs.layers is not None else None
    check_layer_names(prepared.model, layers)  # before any work: names only
    # the metric, its FP32 reference computed with the quantizers off
    eval_fn, name = evaluation(source, prepared.model, prepared.device,
                               specs.eval.agreement, specs.eval.name)
    with OutputFolder(specs.out, keep=("rows.jsonl", "sweep.json")) as out:
        if prepared.smoothquant is not None:
            prepared.smoothquant.write(out)
        progress_file = out / "rows.jsonl"
        if specs.fresh:
            progress_file.unlink(missing_ok=True)
        atomic_write(out / "sweep.json", json.dumps(specs.record, indent=1) + "\n")
        calibrator = session.metadata().get("calibrator") if prepared.restored else None
        if prepared.uncalibrated() or not prepared.restored:
            calibrator = specs.calibrator
            summary, left = calibrate_model(prepared, source.calib(),
                                            specs.data.calib_batches, calibrator,
                                            progress=progress)
        else:
            summary, left = None, []
        check_layer_names(prepared.model, layers)
        record = calibration_record(session, calibrator or "from the checkpoint", summary,
                                    left)
        atomic_write(out / "calibration.json", json.dumps(record, indent=1) + "\n")
        check = metric_check(eval_fn, prepared.model)  # can the metric see a layer at all?
        report = sensitivity.sweep(prepared.model, eval_fn, mode=specs.mode, layers=layers,
                                   progress=progress, resume=progress_file,
                                   metric_name=name, resolution=check.resolution)
        report.extra_warnings += check.warnings
        report.advice = SWEEP_ADVICE
        if specs.proxy:
            proxy = sensitivity.proxy_ranking(prepared.model, source.calib(),
                                              num_batches=specs.data.calib_batches,
                                              layers=layers, device=prepared.device,
                                              progress=progress)
            exact = {r.layer: r.sensitivity for r in report.rows if r.ok}
            proxy.extra["spearman_with_sweep"] = sensitivity.spearman(proxy.scores(), exact)
            proxy.write(out)
            print(f"proxy: {proxy.seconds:.1f} s, Spearman with the sweep "
                  f"{proxy.extra['spearman_with_sweep']:.3f}")
        if specs.goal:
            result = sensitivity.partial_quantize(prepared.model, report, eval_fn,
                                                  max_drop=specs.max_drop,
                                                  target=specs.target, top_k=specs.top_k)
            print(f"partial quantization: {result}")
            session.save(out / QUANTIZED, calibrator=calibrator,
                         skip_layers=list(result.skip))
        report.write(out)
    print(report)
    print(f"wrote {out}")
    return 0


register("sensitivity", "per-layer sensitivity sweep and report folder", add_arguments, run,
         EPILOG)
