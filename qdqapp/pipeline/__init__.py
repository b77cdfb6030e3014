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
folder is touched.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdqapp.errors import CliError
from qdqapp.evaluate import EVALS, check_eval_for, text_evaluation
from qdqapp.flow import ModelOptions, Session, check_model_options
from qdqapp.formats import check_calibrators, default_calibrators, format_choice
from qdqapp.pipeline.config import ConfigError, RunConfig, load_config
from qdqapp.pipeline.folder import QUANTIZED, RunFolder
from qdqapp.pipeline.report import failed_checks, summary_table, write_report
from qdqapp.pipeline.stages import STAGES, Run, Skip, load_eval
from qdqapp.sources import DataOptions, check_data_spec, parse_data_spec

__all__ = ["RunConfig", "ConfigError", "load_config", "run_pipeline", "RunResult"]

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


def _model_options(config: RunConfig) -> ModelOptions:
    return ModelOptions(spec=config.model, checkpoint=config.checkpoint, rules=config.rules,
                        ignore=list(config.ignore), seed=config.seed, device=config.device,
                        format=config.format, block_size=config.block_size,
                        weight_method=config.weight_method, smoothquant=config.smoothquant,
                        smoothquant_alpha=config.smoothquant_alpha)


def _calibrators(config: RunConfig, opts: ModelOptions, checkpoint) -> list[str]:
    """The calibrators the calibrate stage tries, checked against the format."""
    choice = format_choice(opts, checkpoint)
    if config.calibrator:
        names, key = [config.calibrator], "calibrator"
    else:
        names, key = config.calibrators or default_calibrators(choice), "calibrators"
    check_calibrators(choice, names, key, default=None)
    return names


def _open_session(config: RunConfig, folder: RunFolder,
                  progress: bool) -> tuple[Session, list[str]]:
    """The model and data, checked; a resumed run restores the model from the folder."""
    check_data_spec(config.data)
    if config.eval in EVALS:
        check_eval_for(config.eval, config.model, config.data)
    elif parse_data_spec(config.data)[0].text:
        raise CliError(f"eval {config.eval!r}: text data is scored against the FP32 model "
                       f"by {', '.join(EVALS)}")
    opts = _model_options(config)
    checkpoint = check_model_options(opts)
    calibrators = _calibrators(config, opts, checkpoint)
    data = DataOptions(batch_size=config.batch_size, calib_batches=config.calib_batches,
                       eval_batches=config.eval_batches, image_size=config.image_size,
                       seed=config.seed)
    saved = folder.path(QUANTIZED)
    origin = None
    if folder.resuming and saved.is_file():  # smoothed and placed already
        origin = opts
        opts = dataclasses.replace(opts, checkpoint=str(saved), ignore=[], block_size=None,
                                   weight_method=None, smoothquant=False)
        checkpoint = None
    return Session.open(opts, config.data, data, checkpoint, origin=origin,
                        progress=progress), calibrators


def run_pipeline(config: RunConfig, restart: bool = False,
                 progress: bool = True) -> RunResult:
    """Run every stage that has not finished yet in ``config.out``."""
    folder = RunFolder(config.out, config.fingerprint(), restart=restart)
    session, calibrators = _open_session(config, folder, progress)
    scorer = None
    if session.source.text:  # scored against the model's own FP32 outputs
        reference = session.float_model()
        if reference is None:
            raise CliError(f"{config.model}: no FP32 model to score the text against; the "
                           f"model came from a {session.choice.name} quantized-model file, "
                           "whose weights are integer codes (start from the float model)")
        scorer = text_evaluation(session.source, reference, config.eval)
        eval_fn = scorer.of_loader
    else:
        eval_fn = load_eval(config.eval, session.prepared.device, config.eval_batches)
        if not session.source.labelled:
            eval_fn = None  # no labels: the accuracy stages are skipped, saying why
    folder.open()
    handler = folder.log_handler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        result, table = _run(config, folder, session, eval_fn, scorer, calibrators,
                             progress)
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


def _run(config: RunConfig, folder: RunFolder, session: Session, eval_fn, scorer,
         calibrators: list[str], progress: bool) -> tuple[RunResult, str]:
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
    run = Run(config=config, folder=folder, session=session, eval_fn=eval_fn,
              calibrators=calibrators, progress=progress, scorer=scorer)
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
