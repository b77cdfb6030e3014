"""``sweep``: measure what each layer's quantization costs, one evaluation per layer.

Two modes (see :data:`sensitivity.report.MODES`):

- ``leave-one-out``: the deployed INT8 model with one layer back in float; the gain over
  full INT8 is what that layer costs in the real deployment.
- ``one-at-a-time``: the float model with only one layer quantized; the loss against
  FP32 is the layer's cost in isolation.

Quantizers are toggled in place (no copy of the model per layer), so the sweep costs
the evaluations and little else. Every finished row is appended to a JSONL file and
flushed at once; ``resume=path`` skips what that file already holds, so an interrupted
run loses nothing it measured. With ``torch.distributed`` initialised, layers are
shared out over the ranks and the rows gathered, so every rank returns the full report.

Example::

    eval_fn = lambda m: top1_accuracy(m, test_loader)
    report = sensitivity.sweep(model, eval_fn, resume="runs/sens/rows.jsonl")
    report.write("runs/sens")
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from qdq.fileio import atomic_write
from qdq.provenance import provenance
from sensitivity.batches import model_device
from sensitivity.errors import SensitivityError
from sensitivity.layers import Layer, enabled_quantizers, find_layers, saved_states, select_layers
from sensitivity.report import MODES, LayerRow, SensitivityReport, sensitivity_score

__all__ = ["sweep", "measure", "read_rows"]

log = logging.getLogger(__name__)

EvalFn = Callable[[nn.Module], float]
_BASELINES = ("fp32", "int8")


def measure(eval_fn: EvalFn, model: nn.Module) -> tuple[float | None, str | None, float]:
    """``(metric, error, seconds)``: one evaluation; a raise or a NaN becomes an error."""
    start = time.perf_counter()
    try:
        value = eval_fn(model)
        metric = float(value)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - one failing layer must not end the sweep
        return None, f"eval_fn raised {type(err).__name__}: {err}", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if not math.isfinite(metric):
        return None, f"eval_fn returned {metric}", seconds
    return metric, None, seconds


def _dist(group) -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _rank_file(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every complete JSON line of a rows file (a line cut short by a crash is dropped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping an unreadable line", path, number)
    return rows


def _done(paths: Iterable[Path], mode: str) -> dict[str, dict[str, Any]]:
    """Successful rows already on disk, by task name (the last one of a task wins)."""
    done: dict[str, dict[str, Any]] = {}
    for path in paths:
        for row in read_rows(path):
            if row.get("kind") == "meta":
                if row.get("mode") != mode:
                    raise SensitivityError(
                        f"resume file {path} holds a {row.get('mode')} sweep, not {mode}: "
                        "use another file or the same mode"
                    )
                continue
            if row.get("status") == "ok" and "task" in row:
                done[row["task"]] = row
    return done


class _RowLog:
    """Appends one JSON line per finished task and makes it durable before going on."""

    def __init__(self, path: Path | None, meta: dict[str, Any]) -> None:
        self._fh = None
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.exists() or path.stat().st_size == 0
        if not fresh:
            with open(path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                cut = fh.read(1) != b"\n"
        # unbuffered: a failed write leaves nothing pending to land after the cut below
        self._fh = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        if fresh:
            self.write(meta)
        elif cut:
            self._append(b"\n")  # a crash cut the last line short; start on a new one

    def write(self, row: dict[str, Any]) -> None:
        if self._fh is not None:
            self._append((json.dumps(row) + "\n").encode())

    def _append(self, data: bytes) -> None:
        fd = self._fh.fileno()
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            os.ftruncate(fd, start)  # whole lines only: the rows before still resume
            why = ("the file reached the file-size limit (ulimit -f)"
                   if err.errno == errno.EFBIG else "no space left on the device")
            raise SensitivityError(f"cannot write {self._fh.name}: {why}; the rows before "
                                   "this one are kept and resume the sweep") from err

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def sweep(model: nn.Module, eval_fn: EvalFn, mode: str = "leave-one-out",
          layers: Iterable[str] | None = None, progress: bool = True,
          resume: str | Path | None = None, higher_is_better: bool = True,
          metric_name: str = "metric", group=None,
          resolution: float | None = None) -> SensitivityReport:
    """Measure ``eval_fn(model)`` for FP32, full INT8 and once per layer.

    Args:
        model: a calibrated model; its enabled quantizers are the deployed placement.
        eval_fn: ``eval_fn(model) -> float``, e.g. top-1 accuracy on held-out data.
        mode: ``"leave-one-out"`` or ``"one-at-a-time"``.
        layers: exact layer names to measure (default: every layer with a quantizer).
        progress: show a tqdm bar.
        resume: JSONL file; rows are appended as they finish and rows already there are
            not measured again (under ``torch.distributed`` each rank writes
            ``<stem>.rank<N>.jsonl`` beside it and rank 0 merges them into it).
        higher_is_better: False for metrics like loss.
        metric_name: the metric's name in the report.
        group: the ``torch.distributed`` process group to share layers over.
        resolution: the metric's smallest step (``100 / N`` for an accuracy in percent
            over N samples), so the report can tell whether the layers differ by more
            than that (``report.warnings``); None: only identical values count as equal.

    A layer whose evaluation raises or returns NaN gets a failed row; the sweep goes on.
    If a baseline fails there is nothing to compare against, and it raises. When the
    metric cannot tell the layers apart the report says so (``report.warnings``) and the
    warning is logged.
    """
    if mode not in MODES:
        raise SensitivityError(f"sweep mode {mode!r} is unknown; choose one of {list(MODES)}")
    deployed = [q for _, q in enabled_quantizers(model)]
    if not deployed:
        raise SensitivityError("the model has no enabled quantizers: insert and calibrate "
                               "them before a sweep")
    chosen = select_layers(find_layers(model), layers)
    if not chosen:
        raise SensitivityError("no layer to sweep: the layer list is empty")
    rank, world = _dist(group)
    path = Path(resume) if resume is not None else None
    start = time.perf_counter()
    tasks = [*_BASELINES, *(layer.name for layer in chosen)]
    done: dict[str, dict[str, Any]] = {}
    if path is not None:
        siblings = sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))
        done = _done([path, *siblings], mode)
        if done:
            log.info("resuming from %s: %d of %d measurements already done", path,
                     len([t for t in tasks if t in done]), len(tasks))
    if world > 1:
        import torch.distributed as dist

        dist.barrier(group)  # everyone has read the files before anyone appends to them
    pending = [t for t in tasks if t not in done]
    mine = pending[rank::world]
    by_name = {layer.name: layer for layer in chosen}
    meta = {"kind": "meta", "mode": mode, "metric_name": metric_name,
            "layers": [layer.name for layer in chosen]}
    rows_file = path if (path is None or world == 1) else _rank_file(path, rank)
    log_rows = _RowLog(rows_file, meta)
    measured: list[dict[str, Any]] = []
    switch = _Switch(deployed)
    try:
        with saved_states(deployed):
            bar = tqdm(mine, desc=f"sweep {mode}", unit="eval", disable=not progress)
            for task in bar:
                bar.set_postfix_str(task, refresh=False)
                row = _run_task(task, by_name.get(task), switch, mode, eval_fn, model)
                log_rows.write(row)
                measured.append(row)
                if world == 1 and task in _BASELINES and row["status"] != "ok":
                    break  # nothing can be compared without it; _build_report raises
    finally:
        log_rows.close()
    if world > 1:
        measured = _gather(measured, group)
    for row in measured:
        if row["status"] == "ok" or row["task"] not in done:
            done[row["task"]] = row
    report = _build_report(mode, chosen, done, metric_name, higher_is_better, world,
                           time.perf_counter() - start)
    report.quantized = quantized_label(model)
    report.resolution = resolution
    report.provenance = provenance(model_device(model))
    for warning in report.warnings:
        log.warning("sensitivity sweep: %s", warning)
    if path is not None and world > 1:
        _merge_files(path, rank, meta, [done[t] for t in tasks if t in done], group)
    return report


def quantized_label(model: nn.Module) -> str:
    """``INT8`` or ``FP8``: what the model with every quantizer on is called in reports
    (``quantized`` when its quantizers are of several kinds)."""
    from qdq.formats import format_of

    name = format_of(model)
    return name.upper() if name in ("int8", "fp8") else "quantized"


class _Switch:
    """Puts every deployed quantizer on or off, only when they are not so already.

    Each task then toggles one layer and puts it back, so a task costs a handful of
    attribute writes, not a pass over every quantizer of the model.
    """

    def __init__(self, deployed: list) -> None:
        self._deployed = deployed
        self._on: bool | None = None

    def all(self, on: bool) -> None:
        if self._on is not on:
            for q in self._deployed:
                q.enable() if on else q.disable()
            self._on = on


def _run_task(task: str, layer: Layer | None, switch: _Switch, mode: str, eval_fn: EvalFn,
              model: nn.Module) -> dict[str, Any]:
    """Set the quantizers for one task, evaluate, put the layer back."""
    if task == "fp32":
        switch.all(False)
        metric, error, seconds = measure(eval_fn, model)
    elif task == "int8" or mode == "leave-one-out":
        switch.all(True)
        if layer is not None:
            layer.disable()
        try:
            metric, error, seconds = measure(eval_fn, model)
        finally:
            if layer is not None:
                layer.enable()
    else:
        switch.all(False)
        layer.enable()
        try:
            metric, error, seconds = measure(eval_fn, model)
        finally:
            layer.disable()
    row: dict[str, Any] = {"task": task, "metric": metric, "status": "failed" if error
                           else "ok", "error": error, "seconds": seconds}
    if layer is not None:
        row["members"] = list(layer.members)
        row["quantizers"] = list(layer.quantizer_names)
    if error:
        log.warning("%s: %s", task, error)
    return row


def _gather(rows: list[dict[str, Any]], group) -> list[dict[str, Any]]:
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, rows, group=group)
    return [row for part in parts for row in part]


def _build_report(mode: str, chosen: list[Layer], done: dict[str, dict[str, Any]],
                  metric_name: str, higher_is_better: bool, world: int,
                  seconds: float) -> SensitivityReport:
    for base in _BASELINES:
        row = done.get(base)
        if row is None or row["status"] != "ok":
            why = row["error"] if row else "not measured"
            raise SensitivityError(f"the {base.upper()} baseline failed ({why}); "
                                   "no layer can be compared without it")
    fp32, int8 = done["fp32"]["metric"], done["int8"]["metric"]
    rows = []
    for layer in chosen:
        raw = done.get(layer.name)
        if raw is None:
            raw = {"metric": None, "status": "failed", "error": "not measured",
                   "seconds": 0.0}
        row = LayerRow(layer=layer.name, metric=raw["metric"], status=raw["status"],
                       error=raw.get("error"), seconds=raw.get("seconds", 0.0),
                       members=list(layer.members), quantizers=list(layer.quantizer_names))
        if row.ok:
            row.delta, row.sensitivity = sensitivity_score(mode, row.metric, fp32, int8,
                                                           higher_is_better)
        rows.append(row)
    times = [r["seconds"] for r in done.values() if r["status"] == "ok" and r.get("seconds")]
    return SensitivityReport(
        mode=mode, fp32=fp32, int8=int8, rows=rows, metric_name=metric_name,
        higher_is_better=higher_is_better, seconds=seconds,
        eval_seconds=statistics.median(times) if times else 0.0, world_size=world,
    )


def _merge_files(path: Path, rank: int, meta: dict[str, Any], rows: list[dict[str, Any]],
                 group) -> None:
    """Rank 0 writes every row into ``path``; then each rank removes its own file."""
    import torch.distributed as dist

    if rank == 0:
        text = "".join(json.dumps(r) + "\n" for r in [meta, *rows])
        atomic_write(path, text)
    dist.barrier(group)
    _rank_file(path, rank).unlink(missing_ok=True)
