"""Every command's flags, parsed once at the edge into frozen specs the flow trusts.

- ``ModelSpec`` (:func:`parse_model`): ``MODEL``, ``--checkpoint`` (read here),
  ``--rules``, ``--ignore``, ``--seed``, ``--device``, ``--smoothquant``,
  ``--smoothquant-alpha``, and its ``FormatSpec``;
- ``FormatSpec`` (:func:`parse_format`): ``--format``, ``--block-size``,
  ``--weight-method``, and the format a quantized-model ``--checkpoint`` holds;
- ``DataSpec`` (:func:`parse_data`): ``--data``, ``--batch-size``, ``--calib-batches``,
  ``--eval-batches``, ``--image-size`` (and ``--seed``);
- ``EvalSpec`` (:func:`parse_eval`): ``--eval``, ``--agreement``;
- calibrator names (:func:`parse_calibrators`, :func:`parse_calibrator`);
- ``OutputSpec`` (``parse_output`` in :mod:`qdqapp.outputs`): ``--out``, ``--force``.

``qdq run`` adds ``RunSettings`` (:mod:`qdqapp.pipeline.config`), parsed by the same
functions from its flags and config file. Each command calls the parse functions once, in
``qdqapp.cli``, before any work; each checks what needs no model (names, ranges, files,
flags that contradict each other) and raises one :class:`~qdqapp.errors.CliError` naming
the flag (or the config key and file). The flow and the stages take the specs and never
read the text again. What only the built model can tell (``--ignore`` and ``--layers``
names, an input shape it does not take) is checked by the flow right after building it,
still before any output is written.

Example::

    model = parse_model("torchvision:resnet18", format="fp8")
    data = parse_data("random:8x3x224x224", model=model, calib_batches=4)
    session = Session.open(model, data)          # qdqapp.flow
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdqapp.calibrators import calibrator_settings
from qdqapp.errors import FLAGS, CliError, Names, first_line
from qdqapp.evaluate import EVALS, check_eval
from qdqapp.formats import FormatChoice, check_calibrators, format_choice
from qdqapp.models import (
    Checkpoint,
    ExampleShape,
    ModelKind,
    build_from,
    check_kind,
    parse_model_spec,
    read_checkpoint,
)
from qdqapp.sources import DataKind, DataOptions, DataSource, parse_data_spec

__all__ = ["ModelSpec", "FormatSpec", "DataSpec", "EvalSpec", "parse_model", "parse_format",
           "parse_data", "parse_eval", "parse_calibrators", "parse_calibrator",
           "restored_from", "integer", "number", "boolean", "name_list", "EVALS"]

#: the format a command makes, with its options (:class:`qdqapp.formats.FormatChoice`)
FormatSpec = FormatChoice
#: ``--format``, ``--block-size``, ``--weight-method`` (and a quantized-model file's own)
parse_format = format_choice


# ----------------------------------------------------------------- values
def integer(value: Any, name: str, low: int | None = None, *,
            optional: bool = False) -> int | None:
    """An integer setting (not a bool, not a float) of at least ``low``."""
    if value is None and optional:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or (low is not None and value < low):
        want = {0: "a non-negative integer", 1: "a positive integer"}.get(
            low, "an integer" if low is None else f"an integer >= {low}")
        raise CliError(f"{name}: expected {want}, got {value!r}")
    return value


def number(value: Any, name: str, low: float | None = None, *, above: bool = False,
           optional: bool = False) -> float | None:
    """A finite number of at least ``low`` (more than ``low`` with ``above``); a numeric
    string (YAML reads ``1e-4`` as one) is taken."""
    if value is None and optional:
        return None
    result = float("nan")
    if not isinstance(value, bool):
        try:
            result = float(value)
        except (TypeError, ValueError):
            pass
    if not math.isfinite(result) or (low is not None and (result <= low if above
                                                         else result < low)):
        if low == 0:
            want = "a positive number" if above else "a non-negative number"
        elif low is None:
            want = "a finite number"
        else:
            want = f"a number {'>' if above else '>='} {low:g}"
        raise CliError(f"{name}: expected {want}, got {value!r}")
    return result


def boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise CliError(f"{name}: expected true or false, got {value!r}")
    return value


def name_list(value: Any, name: str, *, optional: bool = False) -> tuple[str, ...] | None:
    """A list of names, or one comma-separated string of them."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise CliError(f"{name}: expected a list of names, got {value!r}")
    return tuple(v.strip() for v in value if v.strip())


# ----------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelSpec:
    """What builds the quantized model, the same on every command: the model kind and its
    argument (``MODEL``), the ``--checkpoint`` file as read, the format, and how the model
    is quantized. Built by :func:`parse_model`."""

    spec: str
    kind: ModelKind = field(repr=False, compare=False)
    arg: str = ""
    format: FormatChoice = field(default_factory=FormatChoice)
    checkpoint: Checkpoint | None = field(default=None, repr=False, compare=False)
    rules: bool = True
    ignore: tuple[str, ...] = ()
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    smoothquant: bool = False
    #: ``"auto"`` (searched per layer) or one alpha in [0, 1]
    smoothquant_alpha: str | float = "auto"

    @property
    def takes_text(self) -> bool:
        """A text model (``hf:DIR``): its data is sentences, tokenised by :meth:`tokenizer`."""
        return self.kind.takes_text

    @property
    def restores(self) -> bool:
        """Built from a quantized-model file (quantizers, rules and amax come with it)."""
        return self.checkpoint is not None and self.checkpoint.quantized

    def build(self) -> nn.Module:
        """The float model in eval mode, its random weights drawn from ``seed``."""
        return build_from(self.kind, self.arg, self.seed, self.spec)

    def example_shape(self) -> ExampleShape | None:
        """The input shape (batch 1) the model takes when no data says, or None."""
        return self.kind.example(self.arg)

    def tokenizer(self) -> Any:
        """The tokenizer text data is encoded with (text models only)."""
        try:
            return self.kind.tokenizer(self.arg)
        except CliError as err:
            raise CliError(f"model {self.spec!r}: {err}") from None


def _device(name: str | None, label: str) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise CliError(f"{label} {name!r}: {first_line(err)}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"{label} {name}: no CUDA device here")
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise CliError(f"{label} {name}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def _alpha(value: Any, label: str) -> str | float:
    """``--smoothquant-alpha``: ``auto`` (searched per layer) or a number in [0, 1]."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        alpha = float("nan")
    if isinstance(value, bool) or not 0.0 <= alpha <= 1.0:
        raise CliError(f"{label} {value!r}: expected 'auto' or a number in [0, 1]")
    return alpha


def parse_model(spec: str, *, checkpoint: str | Path | None = None, rules: bool = True,
                ignore: list[str] | tuple[str, ...] = (), seed: int = 0, device: str | None = None,
                smoothquant: bool = False, smoothquant_alpha: Any = "auto",
                format: str | None = None, block_size: int | None = None,
                weight_method: str | None = None, names: Names = FLAGS) -> ModelSpec:
    """The model flags as one :class:`ModelSpec`: the spec's kind checked (a torchvision
    name, an importable factory, a transformers folder), the format and its options, the
    ``--checkpoint`` file read once, and the flags that contradict each other refused."""
    if not isinstance(spec, str) or not spec:
        raise CliError(f"{names('model')}: expected a model spec, got {spec!r}")
    kind, arg = parse_model_spec(spec)
    check_kind(kind, arg, spec)
    seed = integer(seed, names("seed"), 0)
    ignore = name_list(ignore, names("ignore"))
    rules = boolean(rules, names("rules"))
    smoothquant = boolean(smoothquant, names("smoothquant"))
    resolved = _device(device, names("device"))
    alpha = _alpha(smoothquant_alpha, names("smoothquant_alpha"))
    flags = format_choice(format, block_size, weight_method, None, names)  # before the file
    if smoothquant and flags.weight_only:
        raise CliError(f"{names('smoothquant')}: {names('format')} {format} quantizes "
                       "weights only, and SmoothQuant moves activation range into the "
                       "weights, which only makes them harder to quantize; leave "
                       f"{names('smoothquant')} out")
    ckpt = None
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, Path)) or not str(checkpoint):
            raise CliError(f"{names('checkpoint')}: expected a file, got {checkpoint!r}")
        ckpt = read_checkpoint(checkpoint)
    if ckpt is not None and ckpt.quantized and ignore:
        raise CliError(f"{names('ignore')}: {ckpt.path} is a quantized-model file, whose "
                       f"layers are already chosen; {names('ignore')} applies when "
                       "quantizing a float model")
    if ckpt is not None and ckpt.quantized and smoothquant:
        done = "already smoothed" if (ckpt.metadata or {}).get("smoothquant") else "not smoothed"
        raise CliError(f"{names('smoothquant')}: {ckpt.path} is a quantized-model file "
                       f"({done}); {names('smoothquant')} applies when quantizing a float "
                       "model")
    choice = format_choice(format, block_size, weight_method, ckpt, names)
    return ModelSpec(spec, kind, arg, choice, ckpt, rules, ignore, seed, resolved,
                     smoothquant, alpha)


def restored_from(model: ModelSpec, path: str | Path) -> ModelSpec:
    """``model`` as a resumed run rebuilds it: from the quantized-model file it saved,
    which already holds the layers, SmoothQuant and the format chosen."""
    ckpt = read_checkpoint(path)
    return dataclasses.replace(model, checkpoint=ckpt, ignore=(), smoothquant=False,
                               format=format_choice(checkpoint=ckpt))


def parse_calibrators(value: Any, fmt: FormatChoice, key: str = "calibrator",
                      names: Names = FLAGS, default: str | None = "max") -> tuple[str, ...]:
    """Calibrator names (one, a list, or a comma-separated string), each known
    (:mod:`qdqapp.calibrators`) and suiting the format; an empty list is refused."""
    label = names(key)
    found = name_list(value, label)
    if not found:
        raise CliError(f"{label}: the list of calibrators is empty")
    for name in found:
        try:
            calibrator_settings(name)
        except CliError as err:
            raise CliError(f"{label} {name!r}: {err}") from None
    check_calibrators(fmt, found, label, default=default)
    return found


def parse_calibrator(value: Any, fmt: FormatChoice, key: str = "calibrator",
                     names: Names = FLAGS, default: str | None = "max") -> str:
    """One calibrator name (:func:`parse_calibrators` of exactly one)."""
    found = parse_calibrators(value, fmt, key, names, default)
    if len(found) != 1:
        raise CliError(f"{names(key)} {value!r}: one calibrator (a list is compared by "
                       f"{names('calibrators')})")
    return found[0]


# ----------------------------------------------------------------- data
@dataclass(frozen=True)
class DataSpec:
    """The data (``--data``: its kind and argument) and how much of it each view gives.
    Built by :func:`parse_data`; :meth:`open` reads it."""

    spec: str
    kind: DataKind = field(repr=False, compare=False)
    arg: str = ""
    batch_size: int = 256
    calib_batches: int = 8
    eval_batches: int | None = None
    image_size: int = 224
    seed: int = 0

    @property
    def text(self) -> bool:
        """Sentences, for a model with a tokenizer."""
        return self.kind.text

    def options(self, tokenizer: Any = None) -> DataOptions:
        return DataOptions(self.batch_size, self.calib_batches, self.eval_batches,
                           self.image_size, self.seed, tokenizer)

    def open(self, tokenizer: Any = None) -> DataSource:
        """The data's views (text: tokenised with ``tokenizer``)."""
        return self.kind.open(self.spec, self.arg, self.options(tokenizer))


def parse_data(spec: str | None, *, model: ModelSpec | None = None, batch_size: int = 256,
               calib_batches: int = 8, eval_batches: int | None = None,
               image_size: int = 224, seed: int | None = None,
               names: Names = FLAGS) -> DataSpec | None:
    """``--data`` and its sizes as one :class:`DataSpec` (None without ``--data``): the
    spec's kind checked cheaply (a folder exists, a sentence file has sentences), every
    size in range, and the data fitting ``model`` (text for a text model, and only for
    one; SmoothQuant and the data-driven weight methods need data)."""
    batch_size = integer(batch_size, names("batch_size"), 1)
    calib_batches = integer(calib_batches, names("calib_batches"), 1)
    eval_batches = integer(eval_batches, names("eval_batches"), 1, optional=True)
    image_size = integer(image_size, names("image_size"), 1)
    if seed is None:
        seed = model.seed if model is not None else 0
    seed = integer(seed, names("seed"), 0)
    if spec is None:
        if model is not None and model.smoothquant:
            raise CliError(f"{names('smoothquant')} needs {names('data')}: it measures the "
                           "activations on the calibration batches")
        if model is not None and model.format.needs_data:
            raise CliError(f"{names('weight_method')} {model.format.weight_method} needs "
                           f"{names('data')}: it quantizes the weights from the "
                           "calibration batches")
        return None
    if not isinstance(spec, str):
        raise CliError(f"{names('data')}: expected a data spec, got {spec!r}")
    kind, arg = parse_data_spec(spec)
    kind.check(arg)
    if model is not None and kind.text and not model.takes_text:
        raise CliError(f"data {spec!r} is text, which needs a model with a tokenizer "
                       f"(hf:DIR); model {model.spec!r} has none")
    if model is not None and model.takes_text and not kind.text:
        raise CliError(f"model {model.spec!r} takes text: use {names('data')} text:FILE "
                       f"(one sentence per line), not {spec!r}")
    return DataSpec(spec, kind, arg, batch_size, calib_batches, eval_batches, image_size,
                    seed)


# ----------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class EvalSpec:
    """The metric (``--eval``): one of :data:`EVALS`, or for ``qdq run`` a function
    ``package.module:fn(model, loader) -> float`` (loaded here, ``function``);
    ``agreement`` scores by top-1 agreement with FP32 even when labels exist."""

    name: str = "auto"
    agreement: bool = False
    function: Callable[..., float] | None = field(default=None, compare=False, repr=False)


def _classifier(model: ModelSpec) -> bool | None:
    """Whether a Hugging Face model has a classification head (from its config); None
    for other kinds, or when the config cannot tell."""
    if model.kind.name != "hf":
        return None
    from qdqapp.hf import HFError, has_classification_head, model_folder

    try:
        return has_classification_head(model_folder(model.arg))
    except HFError:
        return None


def parse_eval(name: Any = "auto", *, model: ModelSpec, data: DataSpec | None,
               agreement: bool = False, custom: bool = False,
               names: Names = FLAGS) -> EvalSpec:
    """``--eval`` checked against the data (cosines are for text) and a text model's head
    (top1 needs logits); with ``custom`` (``qdq run``) a ``package.module:fn`` is
    imported here, so a typo fails before any work."""
    label = names("eval")
    agreement = boolean(agreement, names("agreement"))
    if name in EVALS:
        text = data is not None and data.text
        check_eval(name, text, _classifier(model) if text else None, label)
        return EvalSpec(name, agreement)
    if not custom or not isinstance(name, str):
        raise CliError(f"{label} {name!r}: choose one of {', '.join(EVALS)}")
    if data is not None and data.text:
        raise CliError(f"{label} {name!r}: text data is scored against the FP32 model by "
                       f"{', '.join(EVALS)}")
    source, sep, attr = name.partition(":")
    if not sep or not source or not attr:
        raise CliError(f"{label} {name!r}: expected {', '.join(EVALS[:2])}, "
                       f"{', '.join(EVALS[2:])} (text) or package.module:function")
    try:
        fn = getattr(importlib.import_module(source), attr)
    except (ImportError, AttributeError) as err:
        raise CliError(f"{label} {name!r}: cannot load it ({first_line(err)})") from err
    if not callable(fn):
        raise CliError(f"{label} {name!r}: not callable")
    return EvalSpec(name, agreement, fn)
