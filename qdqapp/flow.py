"""The one model-preparation flow every command uses.

::

    float model (ModelSpec: MODEL, --seed)  ->  --checkpoint
        quantized-model file:  qdq.restore (its own twins, rules, ties and amax)
        float state_dict:      loaded strictly
    -> the model runs once on an example input (a bad shape fails here, in one line)
    -> --ignore names checked (close matches suggested)
    -> int8, fp8:  quant twins (qdq.replace_modules, --ignore kept float)
                   -> placement rules (qdq.rules.apply_rules; on unless --no-rules)
    -> --format (qdqapp.formats.apply_format_step): fp8 re-describes every quantizer;
       w8/w4 turn the float model's Linear/Conv/LSTM/Embedding weights into integer codes
    -> SmoothQuant (--smoothquant, int8 and fp8: sensitivity.smoothquant on the
       calibration batches)
    -> calibrate (--calibrator), modules never called left in float, by name; nothing
       for w8/w4

The flow takes the specs the command parsed from its flags (:mod:`qdqapp.specs`: every
flag checked there, before any work) and trusts them. The example input is one sample of
the data: a tensor, or for a text model (``hf:DIR`` with ``text:FILE``) a dict of token
ids and attention mask, which the rules, the export, the ONNX Runtime check and
``qdq.save`` all take as keyword inputs. :func:`prepare_model` does everything up to
SmoothQuant, before any output is written; :meth:`Session.open` opens the data, prepares
the model on one of its inputs and adds SmoothQuant; :func:`calibrate_model` does the last
step. ``run``, ``calibrate``, ``sensitivity``, ``export``, ``verify`` and ``summary`` all
go through here, so the same flags build the same model everywhere. What torch.fx and
the libraries below say while the model is loaded and traced is one line on the console
(:func:`qdqapp.logs.library_chatter`; ``--debug`` shows all of it).
"""

from __future__ import annotations

import copy
import difflib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import qdq
from qdqapp.calibrators import calibrator_settings
from qdqapp.errors import CliError, first_line
from qdqapp.formats import FormatChoice, apply_format_step
from qdqapp.logs import library_chatter
from qdqapp.models import Checkpoint, ExampleShape, load_float_weights
from qdqapp.specs import DataSpec, ModelSpec

__all__ = ["Prepared", "Session", "prepare_model", "calibrate_model", "smooth",
           "leave_uncalibrated_in_float", "check_layer_names", "check_names",
           "example_from_shape", "shape_of", "on_device"]

log = logging.getLogger("qdqapp")


Example = torch.Tensor | dict[str, torch.Tensor]


@dataclass
class Prepared:
    model: nn.Module
    device: torch.device
    checkpoint: Checkpoint | None
    example: Example | None
    choice: FormatChoice = field(default_factory=FormatChoice)
    #: the float model before its weights were quantized (weight-only formats made here)
    float_model: nn.Module | None = None
    #: the SmoothQuant step's report (``--smoothquant``), None when it did not run
    smoothquant: Any = None

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


def example_from_shape(shape: ExampleShape | list | dict) -> Example:
    """A placeholder input of a recorded shape: zeros, or for keyword token inputs ones
    (token id 1 and a mask that attends everywhere)."""
    if isinstance(shape, dict):
        return {k: torch.ones(tuple(v), dtype=torch.long) for k, v in shape.items()}
    return torch.zeros(tuple(shape))


def shape_of(example: Example) -> list[int] | dict[str, list[int]]:
    """What ``qdq.save``'s metadata records as ``input_shape``."""
    if isinstance(example, dict):
        return {k: list(v.shape) for k, v in example.items()}
    return list(example.shape)


def on_device(example: Example, device: torch.device) -> Example:
    if isinstance(example, dict):
        return {k: v.to(device) for k, v in example.items()}
    return example.to(device)


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


def _dry_run(model: nn.Module, example: Example, spec: str, data: str | None) -> None:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad(), qdq.disable_quantization(model):
            if isinstance(example, dict):
                model(**on_device(example, device))
            else:
                model(example.to(device))
    except Exception as err:  # noqa: BLE001 - any failure here means the input does not fit
        source = f" from --data {data}" if data else ""
        raise CliError(f"model {spec} does not run on inputs of shape "
                       f"{shape_of(example)}{source}: {first_line(err)}") from err


def prepare_model(spec: ModelSpec, example: Example | None = None,
                  data: str | None = None) -> Prepared:
    """Build the quantized model (everything before calibration), on its device.

    ``example`` is one input (batch 1) from the data; without it the input shape a
    quantized-model file recorded, or the model kind's usual one, is used when there is
    one. ``data`` names the data spec in messages.
    """
    checkpoint, choice = spec.checkpoint, spec.format
    with library_chatter("loading the model", transformers=spec.takes_text):
        model = spec.build()
    if example is None:
        shape = ((checkpoint.metadata or {}).get("input_shape") if checkpoint else None) \
            or spec.example_shape()
        example = example_from_shape(shape) if shape else None
    if spec.restores:
        try:
            model = qdq.restore(model, checkpoint.path)
        except qdq.RestoreError as err:
            raise CliError(f"checkpoint {err}") from err
        if example is not None:
            _dry_run(model, example, spec.spec, data)
        return Prepared(model.to(spec.device).eval(), spec.device, checkpoint, example, choice)
    if checkpoint is not None:
        load_float_weights(model, checkpoint, spec.spec)
    if example is not None:
        _dry_run(model, example, spec.spec, data)
    check_names(model, list(spec.ignore), "--ignore")
    float_model = None
    if choice.weight_only:
        float_model = copy.deepcopy(model)  # the FP32 reference; the step changes weights
    else:
        qdq.replace_modules(model, ignore=list(spec.ignore) or None)
        if spec.rules:
            from qdq.rules import apply_rules

            inputs = example if isinstance(example, dict) or example is None else (example,)
            with library_chatter("tracing for the placement rules", ours="torch.fx"):
                model = apply_rules(model, inputs)
    if not choice.needs_data:  # awq/gptq: Session.open runs the step on the data
        apply_format_step(model, choice, list(spec.ignore))
    if float_model is not None:
        float_model.to(spec.device).eval()
    return Prepared(model.to(spec.device).eval(), spec.device, checkpoint, example, choice,
                    float_model)


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


def smooth(prepared: Prepared, batches, alpha: str | float, progress: bool = True):
    """The SmoothQuant step: after quantizers and rules, before calibration. Returns the
    per-layer ``SmoothQuantReport`` (the float outputs are checked unchanged there)."""
    import sensitivity
    from sensitivity.errors import SensitivityError

    try:
        report = sensitivity.smoothquant(prepared.model, batches, alpha=alpha,
                                         progress=progress)
    except SensitivityError as err:
        raise CliError(f"--smoothquant: {err}") from err
    log.info("%s", report.headline())
    return report


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
    """A command's model and data, from the specs its flags were parsed into: the data is
    opened, then the model is prepared on one of its inputs. Nothing is written before
    :meth:`open` returns."""

    spec: ModelSpec
    data: DataSpec | None
    source: Any
    prepared: Prepared
    #: what built the float model first, when ``spec`` now restores it from a file (a
    #: resumed run): the float baseline of a weight-only model is built from it
    origin: ModelSpec | None = None

    @classmethod
    def open(cls, spec: ModelSpec, data: DataSpec | None = None,
             origin: ModelSpec | None = None, progress: bool = True) -> Session:
        """Open the data (text: tokenised with the model's tokenizer), prepare the model
        on one of its inputs, and smooth it with ``--smoothquant``."""
        source = None
        if data is not None:
            with library_chatter("loading the tokenizer", transformers=spec.takes_text):
                tokenizer = spec.tokenizer() if spec.takes_text else None
            source = data.open(tokenizer)
        example = source.example() if source is not None else None
        prepared = prepare_model(spec, example, data.spec if data is not None else None)
        if prepared.choice.needs_data:
            apply_format_step(prepared.model, prepared.choice, list(spec.ignore),
                              batches=[on_device(b, prepared.device) for b in source.calib()])
        if spec.smoothquant:
            prepared.smoothquant = smooth(prepared, source.calib(), spec.smoothquant_alpha,
                                          progress)
        return cls(spec, data, source, prepared, origin)

    @property
    def model(self) -> nn.Module:
        return self.prepared.model

    @property
    def choice(self) -> FormatChoice:
        return self.prepared.choice

    @property
    def data_spec(self) -> str | None:
        """The ``--data`` text, as files record it."""
        return self.data.spec if self.data is not None else None

    def float_model(self) -> nn.Module | None:
        """The float model the quantized one was made from, for FP32 baselines: the same
        model with its quantizers off (enter ``qdq.disable_quantization`` on it) for Q/DQ
        formats; for weight-only formats the copy kept before the weights were quantized,
        or the float model built again from ``origin`` (a resumed run); None when the
        model came from a weight-only quantized-model file."""
        prepared = self.prepared
        if not prepared.choice.weight_only:
            return prepared.model
        if prepared.float_model is None and self.origin is not None \
                and not self.origin.restores:
            origin = self.origin
            with library_chatter("loading the model", transformers=origin.takes_text):
                model = origin.build()
            if origin.checkpoint is not None:
                load_float_weights(model, origin.checkpoint, origin.spec)
            prepared.float_model = model.to(prepared.device).eval()
        return prepared.float_model

    def metadata(self, **extra: Any) -> dict[str, Any]:
        """What the quantized-model file records about how it was made."""
        example = self.prepared.example
        meta = dict(self.prepared.metadata)  # a restored file's history carries over
        meta.update({"model": self.spec.spec, "seed": self.spec.seed,
                     "rules": self.spec.rules if not self.prepared.restored
                     else meta.get("rules"),
                     "input_shape": shape_of(example) if example is not None else None})
        if not self.prepared.restored:
            meta.update(self.prepared.choice.as_dict())
        if self.prepared.smoothquant is not None:
            meta["smoothquant"] = {"alpha": self.spec.smoothquant_alpha,
                                   **self.prepared.smoothquant.to_dict()}
        if self.data is not None:
            meta["data"] = self.data.spec
        meta.update(extra)
        return meta

    def save(self, path, **extra: Any):
        """Write the quantized-model file (``qdq.save``) with :meth:`metadata`."""
        return qdq.save(self.prepared.model, path, metadata=self.metadata(**extra))
