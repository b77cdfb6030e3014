"""The stages of ``qdq run``, in order, each a small function over a shared ``Run``.

A stage returns a JSON-able result (recorded in ``state.json``) or raises ``Skip`` with
the reason it does not apply (no evaluation data, TensorRT absent, ...). Stages that
change the model save its state (amax included) to ``model_state.pt``; a resumed run
rebuilds the model from its spec, loads that state and re-applies the skip list, so
finished stages never run twice.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import qdq
from qdqapp.pipeline.config import RunConfig
from qdqapp.pipeline.folder import RunFolder

__all__ = ["Run", "Skip", "STAGES", "Stage"]

log = logging.getLogger("qdq.run")


class Skip(Exception):
    """The stage does not apply to this run; the message says why."""


@dataclass
class Run:
    config: RunConfig
    folder: RunFolder
    model: nn.Module
    example: torch.Tensor
    calib: Iterable[torch.Tensor]
    eval_loader: Iterable | None
    eval_fn: Callable[[nn.Module, Iterable], float] | None
    device: torch.device
    data_description: str
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def evaluate(self, model: nn.Module | None = None) -> float:
        if self.eval_fn is None or self.eval_loader is None:
            raise Skip("no evaluation data (random inputs)")
        value = float(self.eval_fn(model or self.model, self.eval_loader))
        if math.isnan(value):
            raise ValueError("the evaluation returned NaN")
        return value


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    fn: Callable[[Run], dict[str, Any]]


STAGES: list[Stage] = []


def stage(name: str, title: str):
    def register(fn: Callable[[Run], dict[str, Any]]):
        STAGES.append(Stage(name, title, fn))
        return fn
    return register


def _require_eval(run: Run) -> None:
    if run.eval_fn is None or run.eval_loader is None:
        raise Skip("no evaluation data (random inputs)")


@stage("fp32", "FP32 baseline")
def fp32(run: Run) -> dict[str, Any]:
    _require_eval(run)
    with qdq.disable_quantization(run.model):
        return {"metric": run.evaluate()}


def _calibrator_spec(name: str) -> tuple[str, dict[str, Any]]:
    """``percentile-99.99`` -> ("percentile", {"percentile": 99.99})."""
    if name.startswith("percentile-"):
        return "percentile", {"percentile": float(name.split("-", 1)[1])}
    return name, {}


@stage("calibrate", "calibrate (compare calibrators, keep the best)")
def calibrate(run: Run) -> dict[str, Any]:
    import sensitivity

    cfg = run.config
    names = [cfg.calibrator] if cfg.calibrator else cfg.calibrators
    if len(names) > 1 and run.eval_fn is not None and run.eval_loader is not None:
        comparison = sensitivity.compare_calibrators(
            run.model, run.calib, run.evaluate, methods=names, device=run.device,
            progress=run.progress)
        comparison.write(run.folder.root)
        rows = [{"method": r.method, "metric": r.metric, "seconds": round(r.seconds, 2),
                 "error": r.error} for r in comparison.rows]
        _plot_calibrators(run, rows, comparison.best)
        result = {"method": comparison.best, "comparison": rows}
    else:
        method, kwargs = _calibrator_spec(names[0])
        uses_hist = method != "max"
        sensitivity.calibrate(run.model, run.calib, method="histogram" if uses_hist else "max",
                              amax_method=method if uses_hist else None,
                              device=run.device, progress=run.progress, **kwargs)
        result = {"method": names[0], "comparison": []}
    run.folder.save_model_state(run.model)
    return result


@stage("int8", "INT8 accuracy (all layers quantized)")
def int8(run: Run) -> dict[str, Any]:
    _require_eval(run)
    return {"metric": run.evaluate()}


@stage("layers", "per-layer amax and quantization SQNR")
def layers(run: Run) -> dict[str, Any]:
    import sensitivity

    ranking = sensitivity.proxy_ranking(run.model, run.calib, device=run.device,
                                        progress=run.progress)
    ranking.write(run.folder.root)
    rows = ranking.to_dict()["rows"]
    amax = [r.as_dict() for r in qdq.summary_rows(run.model)]
    _plot_layers(run, rows, amax)
    return {"proxy": rows, "quantizers": len(amax)}


@stage("sweep", "per-layer sensitivity sweep")
def sweep(run: Run) -> dict[str, Any]:
    import sensitivity

    _require_eval(run)
    if run.config.sweep == "none":
        raise Skip("sweep disabled (sweep: none)")
    folder = run.folder.path("sensitivity")
    folder.mkdir(exist_ok=True)
    report = sensitivity.sweep(run.model, run.evaluate, mode=run.config.sweep,
                               resume=folder / "rows.jsonl", progress=run.progress)
    report.write(folder)
    run.extra["report"] = report
    ranked = [{"layer": r.layer, "metric": r.metric, "delta": r.delta, "status": r.status}
              for r in report.ranked()]
    return {"folder": "sensitivity", "fp32": report.fp32, "int8": report.int8,
            "ranked": ranked[:10]}


@stage("partial", "partial quantization to the target drop")
def partial(run: Run) -> dict[str, Any]:
    import sensitivity

    _require_eval(run)
    fp32_metric = run.folder.result("fp32")["metric"]
    int8_metric = run.folder.result("int8")["metric"]
    target = fp32_metric - run.config.max_drop
    report = run.extra.get("report")
    if report is None and run.folder.status("sweep") == "done":
        report = sensitivity.SensitivityReport.load(run.folder.path("sensitivity"))
    if int8_metric >= target or report is None:
        skip: list[str] = []
        metric = int8_metric
        why = ("already within the target" if int8_metric >= target
               else "no sensitivity report (sweep skipped)")
    else:
        result = sensitivity.partial_quantize(run.model, report, run.evaluate, target=target)
        skip, metric = list(result.skip), float(result.metric)
        why = ("returned the most sensitive layers to float" if result.met else
               "could not reach the target even with every measured layer in float")
        report.write(run.folder.path("sensitivity"))
        run.folder.save_model_state(run.model)
    run.folder.write_text("skip_layers.txt", "".join(f"{name}\n" for name in skip))
    return {"skip_layers": skip, "metric": metric, "target": target, "why": why}


@stage("qat", "QAT fine-tune")
def qat(run: Run) -> dict[str, Any]:
    if run.config.qat_epochs <= 0:
        raise Skip("not asked for (qat_epochs: 0)")
    _require_eval(run)
    from qdq.qat import finetune

    train = run.extra.get("train_loader")
    if train is None:
        raise Skip("the data source has no labelled training split (use fashion-mnist or "
                   "an image folder)")
    result = finetune(run.model, train, run.evaluate, epochs=run.config.qat_epochs,
                      lr=run.config.qat_lr, max_steps_per_epoch=run.config.qat_steps,
                      device=run.device,
                      checkpoint=run.folder.path("qat_best.pt"), progress=run.progress)
    run.folder.save_model_state(run.model)
    return {"metric": float(result.best_score), "epochs": run.config.qat_epochs,
            "best_epoch": result.best_epoch,
            "history": [list(h) for h in result.history]}


@stage("export", "export ONNX (opset 13, Q/DQ)")
def export_onnx(run: Run) -> dict[str, Any]:
    import export

    result = export.to_onnx(run.model, run.example.to(run.device), run.folder.path("model.onnx"),
                            opset=run.config.opset, int8_weights=run.config.int8_weights)
    rules = getattr(run.model, "qdq_rules_report", None)  # BN folded there already
    return {"file": "model.onnx", "quantize_nodes": result.quantize_nodes,
            "dequantize_nodes": result.dequantize_nodes, "bytes": result.bytes,
            "folded_batchnorms": len(result.folded_batchnorms)
            + (len(rules.folded) if rules else 0),
            "rules": {k: v for k, v in rules.changes.items() if v} if rules else None}


@stage("lint", "Q/DQ lint")
def lint(run: Run) -> dict[str, Any]:
    import export

    findings = export.check_qdq(run.folder.path("model.onnx"))
    rows = [dataclasses.asdict(f) for f in findings]
    run.folder.write_json("lint.json", rows)
    errors = sum(r["severity"] == "error" for r in rows)
    return {"errors": errors, "warnings": len(rows) - errors, "findings": rows[:20]}


@stage("onnx_check", "ONNX Runtime check")
def onnx_check(run: Run) -> dict[str, Any]:
    import export

    batch = next(iter(run.calib))[:64].to(run.device)
    report = export.verify(run.model, run.folder.path("model.onnx"), batch)
    run.folder.write_text("onnx_check.txt", str(report) + "\n")
    result = {"rel_l2": report.rel_l2, "max_abs": report.max_abs,
              "top1_agreement": None if report.top1 is None else 100 * report.top1,
              "forced_rel_l2": report.forced_rel_l2, "rounding_flips": report.flips,
              "only_boundary_flips": report.only_boundary_flips, "ok": report.ok()}
    if run.eval_loader is not None and run.config.eval == "top1":
        result["ort_metric"] = _onnx_top1(run.folder.path("model.onnx"), run.eval_loader,
                                          run.config.eval_batches)
    run.folder.write_json("onnx_check.json", result)
    return result


def _onnx_top1(path, loader: Iterable, max_batches: int | None) -> float:
    """Top-1 accuracy (percent) of the exported file in ONNX Runtime (CPU)."""
    import itertools

    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = total = 0
    for x, y in itertools.islice(loader, max_batches):
        logits = session.run(None, {name: x.numpy().astype(np.float32)})[0]
        correct += int((logits.argmax(1) == y.numpy()).sum())
        total += len(y)
    return 100.0 * correct / max(total, 1)


@stage("tensorrt", "TensorRT engine build, inspection and benchmark")
def tensorrt(run: Run) -> dict[str, Any]:
    import export

    if not run.config.tensorrt:
        raise Skip("disabled (tensorrt: false)")
    if not export.tensorrt_available():
        raise Skip("TensorRT is not installed (pip install tensorrt polygraphy)")
    onnx_path = run.folder.path("model.onnx")
    sample = tuple(run.example.shape[1:])
    batch = run.config.batch_size
    profile = {"min_shape": (1, *sample), "opt_shape": (batch, *sample),
               "max_shape": (batch, *sample)}
    cache = run.folder.path("timing.cache")
    int8_engine = export.build_engine(onnx_path, run.folder.path("model.engine"),
                                      timing_cache=cache, **profile)
    # the FP16 baseline: the same model with every quantizer off
    fp16_onnx = run.folder.path("model_fp32.onnx")
    with qdq.disable_quantization(run.model):
        export.to_onnx(run.model, run.example.to(run.device), fp16_onnx, opset=run.config.opset)
    fp16_engine = export.build_engine(fp16_onnx, run.folder.path("model_fp16.engine"),
                                      timing_cache=cache, **profile)
    inspection = export.inspect_engine(int8_engine)
    fp16_bench = export.benchmark_engine(fp16_engine, (batch, *sample), name="FP16")
    int8_bench = export.benchmark_engine(int8_engine, (batch, *sample), name="INT8")
    text = "\n".join([inspection.table(), "", fp16_bench.line(), int8_bench.line()])
    run.folder.write_text("engine.txt", text + "\n")
    return {"engine": "model.engine", "int8_fraction": inspection.int8_fraction,
            "heavy_int8_fraction": inspection.heavy_int8_fraction,
            "reformat_layers": len(inspection.reformat_layers),
            "latency_ms_p50": int8_bench.p50_ms, "fp16_latency_ms_p50": fp16_bench.p50_ms,
            "speedup_vs_fp16": fp16_bench.p50_ms / int8_bench.p50_ms}


def _plot_calibrators(run: Run, rows: list[dict[str, Any]], best: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    values = [r["metric"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    colors = ["tab:green" if n == best else "tab:blue" for n in names]
    ax.barh(names, values, color=colors)
    fp32_metric = run.folder.result("fp32").get("metric")
    if fp32_metric is not None:
        ax.axvline(fp32_metric, color="black", linestyle="--", label=f"FP32 {fp32_metric:.2f}")
        ax.legend(loc="lower right")
    low = min(values + ([fp32_metric] if fp32_metric is not None else []))
    high = max(values + ([fp32_metric] if fp32_metric is not None else []))
    ax.set_xlim(low - max(1.0, 0.2 * (high - low)), high + 0.2 * max(1.0, high - low))
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("metric (higher is better)")
    ax.set_title(f"Calibrators (best: {best})")
    fig.tight_layout()
    fig.savefig(run.folder.path("calibrators.png"), dpi=110)
    plt.close(fig)


def _plot_layers(run: Run, proxy: list[dict[str, Any]], amax: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not proxy:
        return
    names = [r["layer"] for r in proxy]
    sqnr = [r["sqnr_db"] if r["sqnr_db"] is not None else float("nan") for r in proxy]
    inputs = {r["module"]: r for r in amax if r["role"] == "input"}
    amax_vals = [inputs.get(n, {}).get("amax_max") or float("nan") for n in names]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 0.28 * len(names) + 1.5), sharey=True)
    a1.barh(names, sqnr, color="tab:blue")
    a1.set_xlabel("quantization SQNR of the layer output (dB, higher is safer)")
    a2.barh(names, amax_vals, color="tab:orange")
    a2.set_xlabel("input amax")
    a1.invert_yaxis()
    fig.suptitle("Per layer: SQNR and input range")
    fig.tight_layout()
    fig.savefig(run.folder.path("layers.png"), dpi=110)
    plt.close(fig)
