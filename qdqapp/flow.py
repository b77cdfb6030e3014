"""The one model-preparation flow every command uses.

::

    float model (spec, --seed)  ->  --checkpoint
        quantized-model file:  qdq.restore (its own twins, rules, ties and amax)
        float state_dict:      loaded strictly
    -> the model runs once on an example input (a bad shape fails here, in one line)
    -> --ignore names checked (close matches suggested)
    -> int8, fp8:  quant twins (qdq.replace_modules, --ignore kept float)
                   -> placement rules (qdq.rules.apply_rules; on unless --no-rules)
    -> --format (qdqapp.formats.apply_format_step): fp8 re-describes every quantizer;
       w8/w4 turn the float model's Linear/Conv/LSTM weights into integer codes
    -> calibrate (--calibrator), modules never called left in float, by name; nothing
       for w8/w4

:func:`check_model_options` refuses bad flags (a format, its options, calibrators that do
not suit it) before anything is built; :func:`prepare_model` does everything up to
calibration, before any output is written; :func:`calibrate_model` does the last step.
``run``, ``calibrate``, ``sensitivity``, ``export``, ``verify`` and ``summary`` all go
through here, so the same flags build the same model everywhere.
"""

from __future__ import annotations

import copy
import difflib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import qdq
from qdqapp.calibrators import calibrator_settings
from qdqapp.errors import CliError, first_line
from qdqapp.formats import FormatChoice, apply_format_step, check_calibrators, format_choice
from qdqapp.models import (
    Checkpoint,
    build_model,
    check_model_spec,
    example_shape,
    load_float_weights,
    read_checkpoint,
)

__all__ = ["ModelOptions", "Prepared", "Session", "check_model_options", "prepare_model",
           "calibrate_model", "leave_uncalibrated_in_float", "resolve_device",
           "check_layer_names", "check_names"]

log = logging.getLogger("qdqapp")


@dataclass
class ModelOptions:
    """What builds the quantized model: the same on every command."""

    spec: str
    checkpoint: str | None = None
    rules: bool = True
    ignore: list[str] = field(default_factory=list)
    seed: int = 0
    device: str | None = None
    #: --format (None: int8, or the format of a quantized-model --checkpoint), and the
    #: weight-only formats' --block-size and --weight-amax (None: per channel, max)
    format: str | None = None
    block_size: int | None = None
    weight_amax: str | None = None


@dataclass
class Prepared:
    model: nn.Module
    device: torch.device
    checkpoint: Checkpoint | None
    example: torch.Tensor | None
    choice: FormatChoice = field(default_factory=FormatChoice)
    #: the float model before its weights were quantized (weight-only formats made here)
    float_model: nn.Module | None = None

    @property
    def restored(self) -> bool:
        """Built from a quantized-model file (its amax came with it)."""
        return self.checkpoint is not None and self.checkpoint.quantized

    @property
    def metadata(self) -> dict[str, Any]:
        return (self.checkpoint.metadata or {}) if self.restored else {}

    def uncalibrated(self) -> list[str]:
        return [n for n, q in qdq.quantizers(self.model) if q.is_quant_enabled
                and q.amax is None]


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CliError(f"--device {name!r}: {first_line(err)}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name}: no CUDA device here")
    return device


def check_model_options(opts: ModelOptions, calibrators: Sequence[str] = (),
                        calibrator_flag: str = "--calibrator") -> Checkpoint | None:
    """The cheap checks (spec, format, checkpoint file, flags that contradict them, the
    ``calibrators`` the command will use), before work."""
    check_model_spec(opts.spec)
    format_choice(opts)  # the flags alone, before the file is read
    resolve_device(opts.device)
    ckpt = read_checkpoint(opts.checkpoint) if opts.checkpoint is not None else None
    if ckpt is not None and ckpt.quantized and opts.ignore:
        raise CliError(f"--ignore: {ckpt.path} is a quantized-model file, whose layers are "
                       "already chosen; --ignore applies when quantizing a float model")
    check_calibrators(format_choice(opts, ckpt), calibrators, calibrator_flag)
    return ckpt


def check_names(model: nn.Module, names: list[str], what: str) -> None:
    """Every name must be a module path of ``model``; close matches are suggested."""
    known = [n for n, _ in model.named_modules() if n]
    known_set = set(known)
    for name in names:
        if name not in known_set:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CliError(f"{what} {name!r}: the model has no module of that name{hint}")


def check_layer_names(model: nn.Module, layers: list[str] | None) -> None:
    """``--layers``: each name must be a layer with an enabled quantizer."""
    if layers is None:
        return
    from sensitivity.errors import SensitivityError
    from sensitivity.layers import find_layers, select_layers

    try:
        select_layers(find_layers(model), layers)
    except SensitivityError as err:
        raise CliError(f"--layers: {err}") from err


def _dry_run(model: nn.Module, example: torch.Tensor, spec: str, data: str | None) -> None:
    try:
        with torch.no_grad(), qdq.disable_quantization(model):
            model(example.to(next((p.device for p in model.parameters()),
                                  example.device)))
    except Exception as err:  # noqa: BLE001 - any failure here means the input does not fit
        source = f" from --data {data}" if data else ""
        raise CliError(f"model {spec} does not run on inputs of shape "
                       f"{list(example.shape)}{source}: {first_line(err)}") from err


def prepare_model(opts: ModelOptions, example: torch.Tensor | None = None,
                  data: str | None = None, checkpoint: Checkpoint | None = None
                  ) -> Prepared:
    """Build the quantized model (everything before calibration), on its device.

    ``example`` is one input (batch 1) from the data; without it the model kind's usual
    input shape is used, when it has one. ``data`` names the data spec in messages.
    """
    device = resolve_device(opts.device)
    if checkpoint is None and opts.checkpoint is not None:
        checkpoint = check_model_options(opts)
    choice = format_choice(opts, checkpoint)
    model = build_model(opts.spec, opts.seed)
    if example is None:
        shape = ((checkpoint.metadata or {}).get("input_shape") if checkpoint else None) \
            or example_shape(opts.spec)
        example = torch.zeros(shape) if shape else None
    if checkpoint is not None and checkpoint.quantized:
        try:
            model = qdq.restore(model, checkpoint.path)
        except qdq.RestoreError as err:
            raise CliError(f"checkpoint {err}") from err
        if example is not None:
            _dry_run(model, example, opts.spec, data)
        return Prepared(model.to(device).eval(), device, checkpoint, example, choice)
    if checkpoint is not None:
        load_float_weights(model, checkpoint, opts.spec)
    if example is not None:
        _dry_run(model, example, opts.spec, data)
    check_names(model, opts.ignore, "--ignore")
    float_model = None
    if choice.weight_only:
        float_model = copy.deepcopy(model)  # the FP32 reference; the step changes weights
    else:
        qdq.replace_modules(model, ignore=list(opts.ignore) or None)
        if opts.rules:
            from qdq.rules import apply_rules

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = apply_rules(model, (example,) if example is not None else None)
            for w in caught:
                log.info("%s", w.message)
    apply_format_step(model, choice, opts.ignore)
    if float_model is not None:
        float_model.to(device).eval()
    return Prepared(model.to(device).eval(), device, checkpoint, example, choice, float_model)


def leave_uncalibrated_in_float(model: nn.Module) -> list[str]:
    """Switch off every enabled quantizer without amax; returns their modules' names.

    They belong to modules the calibration data never reached (googlenet's auxiliary
    heads in eval mode, a branch the inputs do not take): left in float, said once.
    """
    owners: list[str] = []
    for name, q in qdq.quantizers(model):
        if q.is_quant_enabled and q.amax is None:
            q.disable()
            owner = name.rpartition(".")[0] or "(root)"
            if owner not in owners:
                owners.append(owner)
    if owners:
        log.warning("left in float, never called during calibration: %s", ", ".join(owners))
    return owners


def calibrate_model(prepared: Prepared, batches, num_batches: int, calibrator: str,
                    progress: bool = True):
    """Calibrate with ``calibrator`` (a name, see :mod:`qdqapp.calibrators`); quantizers
    that saw no data are left in float. Returns the ``CalibrationSummary`` and the names
    of the modules left in float; ``(None, [])`` for a weight-only format, which has
    nothing to calibrate."""
    import sensitivity

    if prepared.choice.weight_only:
        log.info("%s is weight-only: nothing to calibrate", prepared.choice.name)
        return None, []

    settings = calibrator_settings(calibrator)
    summary = sensitivity.calibrate(prepared.model, batches, num_batches=num_batches,
                                    device=prepared.device, progress=progress, **settings)
    return summary, leave_uncalibrated_in_float(prepared.model)


@dataclass
class Session:
    """A command's model and data, checked and built in the one order: data spec, model
    spec and checkpoint (cheap), then the data is opened, then the model is prepared on
    one of its inputs. Nothing is written before :meth:`open` returns."""

    opts: ModelOptions
    data_spec: str | None
    source: Any
    prepared: Prepared
    #: what built the float model first, when ``opts`` now restores it from a file (a
    #: resumed run): the float baseline of a weight-only model is built from it
    origin: ModelOptions | None = None

    @classmethod
    def open(cls, opts: ModelOptions, data_spec: str | None, data_opts=None,
             checkpoint: Checkpoint | None = None,
             origin: ModelOptions | None = None) -> Session:
        from qdqapp.sources import check_data_spec, open_data

        if data_spec is not None:
            check_data_spec(data_spec)
        if checkpoint is None:
            checkpoint = check_model_options(opts)
        source = open_data(data_spec, data_opts) if data_spec is not None else None
        example = source.example() if source is not None else None
        prepared = prepare_model(opts, example, data_spec, checkpoint)
        return cls(opts, data_spec, source, prepared, origin)

    @property
    def model(self) -> nn.Module:
        return self.prepared.model

    @property
    def choice(self) -> FormatChoice:
        return self.prepared.choice

    def float_model(self) -> nn.Module | None:
        """The float model the quantized one was made from, for FP32 baselines: the same
        model with its quantizers off (enter ``qdq.disable_quantization`` on it) for Q/DQ
        formats; for weight-only formats the copy kept before the weights were quantized,
        or the float model built again from ``origin`` (a resumed run); None when the
        model came from a weight-only quantized-model file."""
        prepared = self.prepared
        if not prepared.choice.weight_only:
            return prepared.model
        if prepared.float_model is None and self.origin is not None:
            origin = self.origin
            checkpoint = read_checkpoint(origin.checkpoint) if origin.checkpoint else None
            if checkpoint is None or not checkpoint.quantized:
                model = build_model(origin.spec, origin.seed)
                if checkpoint is not None:
                    load_float_weights(model, checkpoint, origin.spec)
                prepared.float_model = model.to(prepared.device).eval()
        return prepared.float_model

    def metadata(self, **extra: Any) -> dict[str, Any]:
        """What the quantized-model file records about how it was made."""
        example = self.prepared.example
        meta = dict(self.prepared.metadata)  # a restored file's history carries over
        meta.update({"model": self.opts.spec, "seed": self.opts.seed,
                     "rules": self.opts.rules if not self.prepared.restored
                     else meta.get("rules"),
                     "input_shape": list(example.shape) if example is not None else None})
        if not self.prepared.restored:
            meta.update(self.prepared.choice.as_dict())
        if self.data_spec is not None:
            meta["data"] = self.data_spec
        meta.update(extra)
        return meta

    def save(self, path, **extra: Any):
        """Write the quantized-model file (``qdq.save``) with :meth:`metadata`."""
        return qdq.save(self.prepared.model, path, metadata=self.metadata(**extra))
