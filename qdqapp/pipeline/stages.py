"""The stages of ``qdq run``, in order, each a small function over a shared ``Run``.

A stage returns a JSON-able result (recorded in ``state.json``) or raises ``Skip`` with
the reason it does not apply (no labelled data, TensorRT absent, ...). Stages that
change the model save it with ``qdq.save`` to ``quantized.pt``; a resumed run restores
the model from there, so finished stages never run twice and later ones see the same
model.

Evaluation: ``auto`` or ``top1`` (top-1 accuracy in percent) or ``package.module:fn``
with ``fn(model, loader) -> float`` where higher is better, on the data's labelled split;
text data is scored against the FP32 model by ``Run.scorer`` (``qdqapp.evaluate``:
min or mean cosine of mean-pooled embeddings, top-1 agreement for classifiers), and the
stages record every number of it (``scores``) beside the one the sweep and partial
quantization use.

The weight-only formats (w8, w4) quantize weights when the model is prepared and have no
quantizers: calibration, the per-layer SQNR, the sweep, partial quantization and QAT are
skipped with that reason, and the FP32 baseline runs on the float model kept beside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import qdq
from qdqapp.evaluate import ACCURACY, SWEEP_ADVICE, default_max_drop
from qdqapp.flow import Session, leave_uncalibrated_in_float, on_device
from qdqapp.logs import library_chatter
from qdqapp.pipeline.config import RunConfig, RunSettings, RunSpecs
from qdqapp.pipeline.folder import QUANTIZED, RunFolder
from qdqapp.specs import EvalSpec

__all__ = ["Run", "Skip", "STAGES", "Stage", "load_eval", "NO_LABELS"]

log = logging.getLogger("qdq.run")

NO_LABELS = "no labelled data (random inputs)"


class Skip(Exception):
    """The stage does not apply to this run; the message says why."""


def load_eval(spec: EvalSpec, device: torch.device,
              max_batches: int | None) -> Callable[[nn.Module, Iterable], float]:
    """``model, loader -> metric`` for a parsed ``eval``: the function it names, or top-1
    accuracy on at most ``max_batches`` batches."""
    if spec.function is not None:
        return spec.function
    from qdqapp.evaluate import top1_accuracy

    def top1(model: nn.Module, loader: Iterable) -> float:
        return top1_accuracy(model, loader, device=device, max_batches=max_batches)

    return top1


@dataclass
class Run:
    """What every stage works on: the parsed run, its folder, the model and data, and the
    metric."""

    specs: RunSpecs
    folder: RunFolder
    session: Session
    eval_fn: Callable[[nn.Module, Iterable], float] | None
    progress: bool = True
    #: text data: the ``TextMetric`` behind ``eval_fn`` (every number of its last call)
    scorer: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> RunConfig:
        """The keys as given (normalised), for what records them."""
        return self.specs.config

    @property
    def settings(self) -> RunSettings:
        return self.specs.settings

    @property
    def calibrators(self) -> tuple[str, ...]:
        """What the calibrate stage tries (checked against the format before the run)."""
        return self.settings.calibrators

    @property
    def model(self) -> nn.Module:
        return self.session.prepared.model

    @property
    def choice(self):
        """The format (:class:`qdqapp.formats.FormatChoice`)."""
        return self.session.choice

    @contextlib.contextmanager
    def float_model(self):
        """The FP32 model: the model with its quantizers off, or for a weight-only format
        the float model it was made from (Skip when there is none at hand)."""
        model = self.session.float_model()
        if model is None:
            raise Skip(f"no float model at hand: the model came from a {self.choice.name} "
                       "quantized-model file, whose weights are integer codes")
        if model is self.model:
            with qdq.disable_quantization(model):
                yield model
        else:
            yield model

    def skip_if_weight_only(self, what: str) -> None:
        if self.choice.weight_only:
            raise Skip(f"{self.choice.name} is weight-only: {what}")

    @property
    def device(self) -> torch.device:
        return self.session.prepared.device

    @property
    def example(self):
        """One input on the model's device: a tensor, or a dict for a text model."""
        return on_device(self.session.prepared.example, self.device)

    @property
    def calib(self) -> Iterable[torch.Tensor]:
        return self.session.source.calib()

    @property
    def eval_loader(self) -> Iterable | None:
        return self.session.source.eval() if self.eval_fn is not None else None

    @property
    def metric_name(self) -> str | None:
        if self.eval_fn is None:
            return None
        if self.scorer is not None:
            return self.scorer.name
        return (ACCURACY if self.specs.eval.function is None
                else f"{self.specs.eval.name} (higher is better)")

    @property
    def max_drop(self) -> float:
        """The allowed drop from FP32: as configured, else the metric's default."""
        return (self.settings.max_drop if self.settings.max_drop is not None
                else default_max_drop(self.metric_name))

    def metric_info(self) -> dict[str, Any]:
        """What the reports need to name and print the metric (kept in state.json)."""
        name = self.metric_name
        return {"name": name, "key": self.scorer.key if self.scorer is not None
                else self.specs.eval.name, "max_drop": self.max_drop,
                "digits": 4 if name and "cosine" in name else 2}

    def scores(self) -> dict[str, Any]:
        """The other numbers of the last evaluation (text: min and mean cosine)."""
        return {"scores": self.scorer.last} if self.scorer is not None else {}

    def evaluate(self, model: nn.Module | None = None) -> float:
        if self.eval_fn is None:
            raise Skip(NO_LABELS)
        value = float(self.eval_fn(model or self.model, self.eval_loader))
        if math.isnan(value):
            raise ValueError("the evaluation returned NaN")
        return value

    def save_model(self, **metadata: Any) -> None:
        """The model as it is now, as a quantized-model file (what a resumed run restores)."""
        self.session.save(self.folder.path(QUANTIZED), **metadata)


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
    if run.eval_fn is None:
        raise Skip(NO_LABELS)


@stage("fp32", "FP32 baseline")
def fp32(run: Run) -> dict[str, Any]:
    _require_eval(run)
    with run.float_model() as model:
        return {"metric": run.evaluate(model), **run.scores()}


@stage("calibrate", "calibrate (compare calibrators, keep the best)")
def calibrate(run: Run) -> dict[str, Any]:
    import sensitivity

    if run.choice.weight_only:
        run.save_model()
        raise Skip(f"{run.choice.name} is weight-only: the weights were quantized from the "
                   f"float model ({run.choice.title}), nothing to calibrate")
    names = list(run.calibrators)
    if len(names) > 1 and run.eval_fn is not None:
        comparison = sensitivity.compare_calibrators(
            run.model, run.calib, run.evaluate, methods=names,
            num_batches=run.specs.data.calib_batches, device=run.device,
            progress=run.progress, metric_name=run.metric_name or "metric")
        comparison.write(run.folder.root)
        rows = [{"method": r.method, "metric": r.metric, "seconds": round(r.seconds, 2),
                 "error": r.error} for r in comparison.rows]
        _plot_calibrators(run, rows, comparison.best)
        left = leave_uncalibrated_in_float(run.model)
        result = {"method": comparison.best, "comparison": rows}
    else:
        from qdqapp.flow import calibrate_model

        _, left = calibrate_model(run.session.prepared, run.calib,
                                  run.specs.data.calib_batches, names[0],
                                  progress=run.progress)
        result = {"method": names[0], "comparison": []}
    result["left_in_float"] = left
    run.save_model(calibrator=result["method"])
    return result


@stage("int8", "accuracy in the format (all layers quantized)")
def int8(run: Run) -> dict[str, Any]:
    _require_eval(run)
    return {"metric": run.evaluate(), **run.scores()}


@stage("layers", "per-layer amax and quantization SQNR")
def layers(run: Run) -> dict[str, Any]:
    import sensitivity

    run.skip_if_weight_only("no quantizers to measure layer by layer")
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

    run.skip_if_weight_only("no quantizers to switch off layer by layer")
    _require_eval(run)
    if run.settings.sweep == "none":
        raise Skip("sweep disabled (sweep: none)")
    folder = run.folder.path("sensitivity")
    folder.mkdir(exist_ok=True)
    check = _metric_check(run)
    report = sensitivity.sweep(run.model, run.evaluate, mode=run.settings.sweep,
                               resume=folder / "rows.jsonl", progress=run.progress,
                               metric_name=run.metric_name, resolution=check.resolution)
    report.extra_warnings += check.warnings
    report.advice = SWEEP_ADVICE
    report.write(folder)
    run.extra["report"] = report
    ranked = [{"layer": r.layer, "metric": r.metric, "delta": r.delta, "status": r.status}
              for r in report.ranked()]
    return {"folder": "sensitivity", "fp32": report.fp32, "int8": report.int8,
            "ranked": ranked[:10], "warnings": report.warnings}


def _metric_check(run: Run):
    """Whether the run's metric can tell layers apart (``qdqapp.evaluate.metric_check``)
    on the FP32 model; a function of the user's is taken as it is."""
    from qdqapp.evaluate import MetricCheck, metric_check

    if run.scorer is None and run.config.eval not in ("top1", "auto"):
        return MetricCheck()
    with run.float_model() as model:
        return metric_check(run.scorer, model, None if run.scorer else run.eval_loader,
                            run.device, run.config.eval_batches)


@stage("partial", "partial quantization to the target drop")
def partial(run: Run) -> dict[str, Any]:
    import sensitivity

    run.skip_if_weight_only("no sweep to choose layers to keep in float")
    _require_eval(run)
    fp32_metric = run.folder.result("fp32")["metric"]
    int8_metric = run.folder.result("int8")["metric"]
    target = fp32_metric - run.max_drop
    report = run.extra.get("report")
    if report is None and run.folder.status("sweep") == "done":
        report = sensitivity.SensitivityReport.load(run.folder.path("sensitivity"))
    history: list[list[Any]] = []
    scores = {"scores": run.folder.result("int8").get("scores")} if run.scorer else {}
    if int8_metric >= target or report is None:
        skip: list[str] = []
        metric = int8_metric
        why = ("already within the target" if int8_metric >= target
               else "no sensitivity report (sweep skipped)")
    else:
        result = sensitivity.partial_quantize(run.model, report, run.evaluate, target=target)
        skip, metric = list(result.skip), float(result.metric)
        scores = run.scores()  # the last evaluation is the model as it is left
        order = [r.layer for r in report.ranked() if r.ok]
        history = [[n, value, order[n - 1] if n else None] for n, value in result.history]
        why = ("returned the most sensitive layers to float" if result.met else
               "could not reach the target even with every measured layer in float")
        report.write(run.folder.path("sensitivity"))
        run.save_model(skip_layers=skip)
    run.folder.write_text("skip_layers.txt", "".join(f"{name}\n" for name in skip))
    return {"skip_layers": skip, "metric": metric, "target": target, "why": why,
            "history": history, **scores}


@stage("qat", "QAT fine-tune")
def qat(run: Run) -> dict[str, Any]:
    settings = run.settings
    if settings.qat_epochs <= 0:
        raise Skip("not asked for (qat_epochs: 0)")
    run.skip_if_weight_only("its layers hold integer codes, QAT trains float weights")
    _require_eval(run)
    from qdq.qat import finetune

    train = run.session.source.train()
    if train is None:
        raise Skip("the data source has no labelled training split (use fashion-mnist or "
                   "an image folder)")
    with torch.random.fork_rng(devices=[]):  # dropout etc. repeat with the run's seed
        torch.manual_seed(run.specs.model.seed)
        result = finetune(run.model, train, run.evaluate, epochs=settings.qat_epochs,
                          lr=settings.qat_lr, max_steps_per_epoch=settings.qat_steps,
                          device=run.device,
                          checkpoint=run.folder.path("qat_best.pt"), progress=run.progress)
    run.save_model(qat_epochs=settings.qat_epochs)
    return {"metric": float(result.best_score), "epochs": settings.qat_epochs,
            "best_epoch": result.best_epoch,
            "history": [list(h) for h in result.history]}


@stage("export", "export ONNX (Q/DQ, the lowest opset the format allows)")
def export_onnx(run: Run) -> dict[str, Any]:
    import export

    with library_chatter("exporting to ONNX"):
        result = export.to_onnx(run.model, run.example, run.folder.path("model.onnx"),
                                opset=run.settings.opset,
                                int8_weights=run.settings.int8_weights)
    rules = getattr(run.model, "qdq_rules_report", None)  # BN folded there already
    return {"file": "model.onnx", "format": result.format, "opset": result.opset,
            "quantize_nodes": result.quantize_nodes,
            "dequantize_nodes": result.dequantize_nodes, "bytes": result.bytes,
            "fp32_bytes": result.fp32_bytes, "compression": round(result.compression, 3),
            "folded_batchnorms": len(result.folded_batchnorms) + len(result.folded_before),
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
    """``qdq verify``'s check (``qdqapp.onnx_check``: the same batch, function and
    verdict), then the run's metric computed from ONNX Runtime's outputs."""
    from qdqapp.onnx_check import check_inputs, check_onnx

    check = check_onnx(run.model, run.folder.path("model.onnx"), check_inputs(run.session),
                       run.device)
    run.folder.write_text("onnx_check.txt", check.text() + "\n")
    result = check.result()
    if run.scorer is not None:
        result.update(_onnx_text(run))
    elif run.eval_fn is not None and run.config.eval in ("top1", "auto"):
        result["ort_metric"] = _onnx_top1(run.folder.path("model.onnx"), run.eval_loader,
                                          run.config.eval_batches)
    run.folder.write_json("onnx_check.json", result)
    return result


def _onnx_text(run: Run) -> dict[str, Any]:
    """Text: the exported file in ONNX Runtime on the evaluation sentences, against the
    PyTorch model (cosine per sentence of the pooled outputs) and against FP32 (the
    run's metric, computed from ONNX Runtime's outputs)."""
    from export.verify import ort_session
    from qdqapp.hf import onnx_sentence_outputs, sentence_outputs

    agreement = run.scorer.agreement
    ort_rows = onnx_sentence_outputs(ort_session(run.folder.path("model.onnx")),
                                     agreement.batches)
    torch_rows = sentence_outputs(run.model, agreement.batches)
    cosine = torch.nn.functional.cosine_similarity(ort_rows.double(), torch_rows.double(),
                                                   dim=1)
    ort = agreement.score_rows(ort_rows).as_dict()
    metric = ort[agreement.metric]
    return {"cosine_vs_pytorch": {"min": float(cosine.min()), "mean": float(cosine.mean())},
            "ort_scores": ort, "ort_metric": 100 * metric if run.scorer.key == "top1"
            else metric, "sentences": agreement.sentences}


def _onnx_top1(path, loader: Iterable, max_batches: int | None) -> float:
    """Top-1 accuracy (percent) of the exported file in ONNX Runtime (CPU)."""
    import itertools

    import numpy as np

    from export.verify import ort_session

    session = ort_session(path)   # the one session factory: safe for FP8 graphs too
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

    if not run.settings.tensorrt:
        raise Skip("disabled (tensorrt: false)")
    if not export.tensorrt_available():
        raise Skip("TensorRT is not installed (pip install tensorrt polygraphy)")
    if isinstance(run.example, dict):
        raise Skip("keyword (text) inputs need an optimisation profile per input "
                   "(batch and sequence), which this stage does not build yet")
    if run.choice.name == "fp8":
        from export.tensorrt import fp8_problem_here

        problem = fp8_problem_here()
        if problem:
            raise Skip(problem)
    onnx_path = run.folder.path("model.onnx")
    sample = tuple(run.example.shape[1:])
    batch = run.specs.data.batch_size
    profile = {"min_shape": (1, *sample), "opt_shape": (batch, *sample),
               "max_shape": (batch, *sample)}
    cache = run.folder.path("timing.cache")
    int8_engine = export.build_engine(onnx_path, run.folder.path("model.engine"),
                                      timing_cache=cache, **profile)
    # the FP16 baseline: the same model with every quantizer off
    fp16_onnx = run.folder.path("model_fp32.onnx")
    with run.float_model() as model, library_chatter("exporting the FP32 model to ONNX"):
        export.to_onnx(model, run.example, fp16_onnx, opset=run.settings.opset)
    fp16_engine = export.build_engine(fp16_onnx, run.folder.path("model_fp16.engine"),
                                      timing_cache=cache, **profile)
    inspection = export.inspect_engine(int8_engine)
    fp16_bench = export.benchmark_engine(fp16_engine, (batch, *sample), name="FP16")
    int8_bench = export.benchmark_engine(int8_engine, (batch, *sample), name=run.choice.short)
    text = "\n".join([inspection.table(), "", fp16_bench.line(), int8_bench.line()])
    run.folder.write_text("engine.txt", text + "\n")
    return {"engine": "model.engine", "int8_fraction": inspection.int8_fraction,
            "heavy_int8_fraction": inspection.heavy_int8_fraction,
            "reformat_layers": len(inspection.reformat_layers),
            "latency_ms_p50": int8_bench.p50_ms, "fp16_latency_ms_p50": fp16_bench.p50_ms,
            "speedup_vs_fp16": fp16_bench.p50_ms / int8_bench.p50_ms}


def _save_figure(run: Run, fig, name: str) -> None:
    from qdq.fileio import atomic_write

    atomic_write(run.folder.path(name), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def _plot_calibrators(run: Run, rows: list[dict[str, Any]], best: str) -> None:
    from qdqapp.pipeline.charts import calibrator_figure

    if not any(r["metric"] is not None for r in rows):
        return
    info = run.metric_info()
    fig = calibrator_figure(rows, best, run.folder.result("fp32").get("metric"),
                            info["digits"], info["name"])
    _save_figure(run, fig, "calibrators.png")


def _plot_layers(run: Run, proxy: list[dict[str, Any]], amax: list[dict[str, Any]]) -> None:
    from matplotlib.figure import Figure

    if not proxy:
        return
    names = [r["layer"] for r in proxy]
    sqnr = [r["sqnr_db"] if r["sqnr_db"] is not None else float("nan") for r in proxy]
    inputs = {r["module"]: r for r in amax if r["role"] == "input"}
    amax_vals = [inputs.get(n, {}).get("amax_max") or float("nan") for n in names]
    fig = Figure(figsize=(11, 0.28 * len(names) + 1.5))
    a1, a2 = fig.subplots(1, 2, sharey=True)
    a1.barh(names, sqnr, color="tab:blue")
    a1.set_xlabel("quantization SQNR of the layer output (dB, higher is safer)")
    a2.barh(names, amax_vals, color="tab:orange")
    a2.set_xlabel("input amax")
    a1.invert_yaxis()
    fig.suptitle("Per layer: SQNR and input range")
    fig.tight_layout()
    _save_figure(run, fig, "layers.png")
