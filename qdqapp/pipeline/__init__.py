"""``qdq run``: the whole job, from a float model to a checked Q/DQ ONNX file (and a
TensorRT engine where TensorRT is installed), written into one run folder.

The pipeline uses the same data specs and model-preparation flow as every other command
(:mod:`qdqapp.sources`, :mod:`qdqapp.flow`) and is usable from Python::

    from qdqapp.pipeline import RunConfig, run_pipeline
    result = run_pipeline(RunConfig(model="torchvision:resnet18", data="random:8x3x224x224"))

Stages (see ``stages.py``): FP32 baseline, calibrator comparison and calibration, accuracy
in the format (``--format``: int8, fp8, w8, w4), per-layer SQNR, sensitivity sweep, partial
quantization, optional QAT, ONNX export, Q/DQ lint, ONNX Runtime check, TensorRT. The
weight-only formats skip what has no meaning for them (calibrators, calibration, the
per-layer SQNR, the sweep and partial quantization, QAT), each with its reason. Text models
(``hf:DIR`` with ``text:FILE``) are scored against their FP32 outputs (``eval``: min or
mean cosine of mean-pooled embeddings, top-1 agreement for classifiers); ``smoothquant``
smooths the model before calibration and writes its per-layer report into the folder. The
model after each stage that changes it is kept as ``quantized.pt`` (``qdq.save``); a re-run
restores it from there and skips the finished stages. Everything is checked before the
folder is touched: the keys are parsed once into :class:`RunSpecs`
(:mod:`qdqapp.pipeline.config`), which the stages trust.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdqapp.errors import CliError
from qdqapp.evaluate import text_evaluation
from qdqapp.flow import Session
from qdqapp.pipeline.config import (
    ConfigError,
    RunConfig,
    RunSettings,
    RunSpecs,
    load_config,
    parse_run,
)
from qdqapp.pipeline.folder import QUANTIZED, RunFolder
from qdqapp.pipeline.report import failed_checks, summary_table, write_report
from qdqapp.pipeline.stages import STAGES, Run, Skip, load_eval
from qdqapp.specs import restored_from

__all__ = ["RunConfig", "RunSpecs", "RunSettings", "ConfigError", "load_config",
           "parse_run", "run_pipeline", "RunResult"]

log = logging.getLogger("qdq.run")


@dataclass
class RunResult:
    folder: Path
    results: dict[str, dict[str, Any]]
    statuses: dict[str, str]
    failed_checks: list[str]

    @property
    def ok(self) -> bool:
        return not self.failed_checks


def _open_session(specs: RunSpecs, folder: RunFolder, progress: bool) -> Session:
    """The model and data; a resumed run restores the model from the folder."""
    model, origin = specs.model, None
    saved = folder.path(QUANTIZED)
    if folder.resuming and saved.is_file():  # smoothed and placed already
        model, origin = restored_from(specs.model, saved), specs.model
    return Session.open(model, specs.data, origin=origin, progress=progress)


def run_pipeline(config: RunConfig | RunSpecs, restart: bool = False,
                 progress: bool = True) -> RunResult:
    """Run every stage that has not finished yet in the run folder (a
    :class:`RunConfig` is parsed first: :func:`parse_run`)."""
    specs = config if isinstance(config, RunSpecs) else parse_run(config)
    folder = RunFolder(specs.out, specs.config.fingerprint(), restart=restart)
    session = _open_session(specs, folder, progress)
    scorer = None
    if session.source.text:  # scored against the model's own FP32 outputs
        reference = session.float_model()
        if reference is None:
            raise CliError(f"{specs.model.spec}: no FP32 model to score the text against; "
                           f"the model came from a {session.choice.name} quantized-model "
                           "file, whose weights are integer codes (start from the float "
                           "model)")
        scorer = text_evaluation(session.source, reference, specs.eval.name)
        eval_fn = scorer.of_loader
    else:
        eval_fn = load_eval(specs.eval, session.prepared.device, specs.data.eval_batches)
        if not session.source.labelled:
            eval_fn = None  # no labels: the accuracy stages are skipped, saying why
    folder.open()
    handler = folder.log_handler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        result, table = _run(specs, folder, session, eval_fn, scorer, progress)
        print(table)
        handler.emit(logging.makeLogRecord({"msg": table, "levelno": logging.INFO,
                                            "levelname": "INFO"}))
        return result
    except BaseException:
        handler.close()
        root.removeHandler(handler)
        folder.discard()
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


def _run(specs: RunSpecs, folder: RunFolder, session: Session, eval_fn, scorer,
         progress: bool) -> tuple[RunResult, str]:
    config = specs.config
    folder.write_text("config.json", config.dumps() + "\n")
    source = session.source
    log.info("qdq run: %s on %s -> %s (%s)", config.model, source.description, folder.root,
             session.choice.title)
    if session.prepared.restored:
        log.info("resumed: restored %s", session.prepared.checkpoint.path)
    smoothed = session.prepared.smoothquant
    if smoothed is not None:
        smoothed.write(folder.root)
        log.info("%s (smoothquant.txt)", smoothed.headline())
    run = Run(specs=specs, folder=folder, session=session, eval_fn=eval_fn,
              progress=progress, scorer=scorer)
    folder.state["metric"] = run.metric_info()
    total = len(STAGES)
    for i, st in enumerate(STAGES, 1):
        if folder.done(st.name):
            log.info("[%d/%d] %s: %s earlier", i, total, st.title, folder.status(st.name))
            continue
        log.info("[%d/%d] %s", i, total, st.title)
        start = time.perf_counter()
        try:
            result = st.fn(run)
            status = "done"
        except Skip as why:
            result, status = {"reason": str(why)}, "skipped"
            log.info("    skipped: %s", why)
        folder.mark(st.name, status, result, time.perf_counter() - start)
    write_report(folder, config, source.description, session.choice,
                 session.prepared.device)
    folder.save_state()
    result = RunResult(folder=folder.root, results=folder.results(),
                       statuses={s.name: folder.status(s.name) for s in STAGES},
                       failed_checks=failed_checks(folder))
    return result, summary_table(folder, session.choice)
