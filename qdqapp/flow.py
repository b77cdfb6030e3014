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
       w8/w4 turn the float model's Linear/Conv/LSTM/Embedding weights into integer codes
    -> SmoothQuant (--smoothquant, int8 and fp8: sensitivity.smoothquant on the
       calibration batches)
    -> calibrate (--calibrator), modules never called left in float, by name; nothing
       for w8/w4

The example input is one sample of the data: a tensor, or for a text model (``hf:DIR``
with ``text:FILE``) a dict of token ids and attention mask, which the rules, the export,
the ONNX Runtime check and ``qdq.save`` all take as keyword inputs.
:func:`check_model_options` refuses bad flags (a format, its options, calibrators that do
not suit it) before anything is built; :func:`prepare_model` does everything up to
SmoothQuant, before any output is written; :meth:`Session.open` adds SmoothQuant,
:func:`calibrate_model` does the last step.
``run``, ``calibrate``, ``sensitivity``, ``export``, ``verify`` and ``summary`` all go
through here, so the same flags build the same model everywhere.
"""

from __future__ import annotations

import copy
import difflib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

import qdq
from qdqapp.calibrators import calibrator_settings
from qdqapp.errors import CliError, first_line
from qdqapp.formats import (
    DATA_METHODS,
    FormatChoice,
    apply_format_step,
    check_calibrators,
    format_choice,
)
from qdqapp.models import (
    Checkpoint,
    ExampleShape,
    build_model,
    check_model_spec,
    example_shape,
    load_float_weights,
    model_tokenizer,
    parse_model_spec,
    read_checkpoint,
)

__all__ = ["ModelOptions", "Prepared", "Session", "check_model_options", "prepare_model",
           "calibrate_model", "smooth", "leave_uncalibrated_in_float", "resolve_device",
           "check_layer_names", "check_names", "check_pairing", "smoothquant_alpha",
           "example_from_shape", "shape_of", "on_device"]

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
    #: weight-only formats' --block-size and --weight-method (None: per channel, max)
    format: str | None = None
    block_size: int | None = None
    weight_method: str | None = None
    smoothquant: bool = False
    smoothquant_alpha: str | float = "auto"


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


def smoothquant_alpha(value: str | float) -> str | float:
    """``--smoothquant-alpha``: ``auto`` (searched per layer) or a number in [0, 1]."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        alpha = float("nan")
    if isinstance(value, bool) or not 0.0 <= alpha <= 1.0:
        raise CliError(f"--smoothquant-alpha {value!r}: expected 'auto' or a number in "
                       "[0, 1]")
    return alpha


def check_model_options(opts: ModelOptions, calibrators: Sequence[str] = (),
                        calibrator_flag: str = "--calibrator") -> Checkpoint | None:
    """The cheap checks (spec, format, checkpoint file, flags that contradict them, the
    ``calibrators`` the command will use), before work."""
    check_model_spec(opts.spec)
    flags = format_choice(opts)  # the flags alone, before the file is read
    resolve_device(opts.device)
    smoothquant_alpha(opts.smoothquant_alpha)
    if opts.smoothquant and flags.weight_only:
        raise CliError(f"--smoothquant: --format {opts.format} quantizes weights only, and "
                       "SmoothQuant moves activation range into the weights, which only "
                       "makes them harder to quantize; leave --smoothquant out")
    ckpt = read_checkpoint(opts.checkpoint) if opts.checkpoint is not None else None
    if ckpt is not None and ckpt.quantized and opts.ignore:
        raise CliError(f"--ignore: {ckpt.path} is a quantized-model file, whose layers are "
                       "already chosen; --ignore applies when quantizing a float model")
    if ckpt is not None and ckpt.quantized and opts.smoothquant:
        done = "already smoothed" if (ckpt.metadata or {}).get("smoothquant") else "not smoothed"
        raise CliError(f"--smoothquant: {ckpt.path} is a quantized-model file ({done}); "
                       "--smoothquant applies when quantizing a float model")
    check_calibrators(format_choice(opts, ckpt), calibrators, calibrator_flag)
    return ckpt


def check_pairing(model_spec: str, data_spec: str) -> None:
    """Text data goes with a text model (one with a tokenizer), and only with one."""
    from qdqapp.sources import parse_data_spec

    kind, _ = parse_model_spec(model_spec)
    data_kind, _ = parse_data_spec(data_spec)
    if data_kind.text and not kind.takes_text:
        raise CliError(f"data {data_spec!r} is text, which needs a model with a tokenizer "
                       f"(hf:DIR); model {model_spec!r} has none")
    if kind.takes_text and not data_kind.text:
        raise CliError(f"model {model_spec!r} takes text: use --data text:FILE (one sentence "
                       f"per line), not {data_spec!r}")


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


def prepare_model(opts: ModelOptions, example: Example | None = None,
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
        example = example_from_shape(shape) if shape else None
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
                inputs = example if isinstance(example, dict) or example is None \
                    else (example,)
                model = apply_rules(model, inputs)
            for w in caught:
                log.info("%s", w.message)
    if not choice.needs_data:  # awq/gptq: Session.open runs the step on the data
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
             checkpoint: Checkpoint | None = None, origin: ModelOptions | None = None,
             progress: bool = True) -> Session:
        """Check, open the data (text: tokenised with the model's tokenizer), prepare the
        model on one of its inputs, and smooth it with ``--smoothquant``."""
        from qdqapp.sources import DataOptions, check_data_spec, open_data

        if data_spec is not None:
            check_data_spec(data_spec)
            check_pairing(opts.spec, data_spec)
        elif opts.smoothquant:
            raise CliError("--smoothquant needs --data: it measures the activations on the "
                           "calibration batches")
        elif opts.weight_method in DATA_METHODS and not opts.checkpoint:
            raise CliError(f"--weight-method {opts.weight_method} needs --data: it quantizes "
                           "the weights from the calibration batches")
        if checkpoint is None:
            checkpoint = check_model_options(opts)
        source = None
        if data_spec is not None:
            data_opts = data_opts or DataOptions()
            if parse_model_spec(opts.spec)[0].takes_text:
                data_opts = replace(data_opts, tokenizer=model_tokenizer(opts.spec))
            source = open_data(data_spec, data_opts)
        example = source.example() if source is not None else None
        prepared = prepare_model(opts, example, data_spec, checkpoint)
        if prepared.choice.needs_data:
            apply_format_step(prepared.model, prepared.choice, opts.ignore,
                              batches=[on_device(b, prepared.device) for b in source.calib()])
        if opts.smoothquant:
            prepared.smoothquant = smooth(prepared, source.calib(),
                                          smoothquant_alpha(opts.smoothquant_alpha), progress)
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
                     "input_shape": shape_of(example) if example is not None else None})
        if not self.prepared.restored:
            meta.update(self.prepared.choice.as_dict())
        if self.prepared.smoothquant is not None:
            meta["smoothquant"] = {"alpha": smoothquant_alpha(self.opts.smoothquant_alpha),
                                   **self.prepared.smoothquant.to_dict()}
        if self.data_spec is not None:
            meta["data"] = self.data_spec
        meta.update(extra)
        return meta

    def save(self, path, **extra: Any):
        """Write the quantized-model file (``qdq.save``) with :meth:`metadata`."""
        return qdq.save(self.prepared.model, path, metadata=self.metadata(**extra))
