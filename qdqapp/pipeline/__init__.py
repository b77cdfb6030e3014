"""``qdq run``: the whole job, from a float model to a checked Q/DQ ONNX file (and a
TensorRT engine where TensorRT is installed), written into one run folder.

The pipeline sits on top of the three packages, like the rest of the CLI, and is usable
from Python::

    from qdqapp.pipeline import RunConfig, run_pipeline
    result = run_pipeline(RunConfig(model="torchvision:resnet18", data="random:8x3x224x224"))

Stages (see ``stages.py``): quantize + placement rules, FP32 baseline, calibrator
comparison and calibration, INT8 accuracy, per-layer SQNR, sensitivity sweep, partial
quantization, optional QAT, ONNX export, Q/DQ lint, ONNX Runtime check, TensorRT.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import qdq
from qdqapp.pipeline.config import ConfigError, RunConfig, load_config
from qdqapp.pipeline.folder import RunFolder
from qdqapp.pipeline.inputs import load_eval, load_inputs
from qdqapp.pipeline.report import summary_table, write_report
from qdqapp.pipeline.stages import STAGES, Run, Skip

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


def _build(config: RunConfig, example: torch.Tensor, device: torch.device) -> torch.nn.Module:
    from qdqapp.models import load_model

    model = load_model(config.model, config.checkpoint).eval()
    qdq.replace_modules(model, ignore=config.ignore or None)
    if config.rules:
        from qdq.rules import apply_rules

        model = apply_rules(model, (example,))
    qdq.name_quantizers(model)
    return model.to(device).eval()


def _apply_skip_list(run: Run) -> None:
    skip = run.folder.result("partial").get("skip_layers") or []
    if skip:
        from sensitivity.layers import find_layers, select_layers

        for layer in select_layers(find_layers(run.model), skip):
            layer.disable()


def _failed_checks(folder: RunFolder) -> list[str]:
    failed = []
    lint = folder.result("lint")
    if lint.get("errors"):
        failed.append(f"lint found {lint['errors']} errors")
    check = folder.result("onnx_check")
    if check and not check.get("ok", True):
        failed.append("ONNX Runtime disagrees with PyTorch")
    return failed


def run_pipeline(config: RunConfig, restart: bool = False,
                 progress: bool = True) -> RunResult:
    """Run every stage that has not finished yet in ``config.out``."""
    folder = RunFolder(config.out, config.fingerprint(), restart=restart)
    handler = folder.log_handler()
    logging.getLogger("qdq").addHandler(handler)
    try:
        return _run(config, folder, progress)
    finally:
        logging.getLogger("qdq").removeHandler(handler)
        handler.close()


def _run(config: RunConfig, folder: RunFolder, progress: bool) -> RunResult:
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    inputs = load_inputs(config.data, config.batch_size, config.calib_batches, config.seed,
                         config.input_shape)
    eval_fn = load_eval(config.eval, device, config.eval_batches) if inputs.eval_loader else None
    folder.write_text("config.json", config.dumps() + "\n")
    log.info("qdq run: %s on %s -> %s", config.model, inputs.description, folder.root)
    model = _build(config, inputs.example, device)
    run = Run(config=config, folder=folder, model=model, example=inputs.example,
              calib=inputs.calib, eval_loader=inputs.eval_loader, eval_fn=eval_fn,
              device=device, data_description=inputs.description, progress=progress)
    run.extra["train_loader"] = inputs.train_loader
    if folder.load_model_state(run.model):
        log.info("resumed: loaded %s", folder.path("model_state.pt"))
        _apply_skip_list(run)
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
    write_report(folder, config, run.data_description)
    failed = _failed_checks(folder)
    print(summary_table(folder))
    return RunResult(folder=folder.root, results=folder.results(),
                     statuses={s.name: folder.status(s.name) for s in STAGES},
                     failed_checks=failed)
