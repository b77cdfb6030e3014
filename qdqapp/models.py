"""Model specs: one grammar, one registry of kinds, used by every command.

=============================  =====================================================
spec                           model
=============================  =====================================================
``reference``                  the Fashion-MNIST reference CNN, trained weights shipped
``torchvision:NAME``           a torchvision architecture, random weights (nothing is
                               downloaded; segmentation/detection backbones too)
``hf:DIR`` or ``hf:minilm``     a local Hugging Face transformers folder (weights and
                               tokenizer; ``minilm``: the shipped all-MiniLM-L6-v2);
                               it takes ``--data text:FILE`` (:mod:`qdqapp.hf`)
``package.module:factory``     any importable callable returning an ``nn.Module``
=============================  =====================================================

A spec is ``KIND[:ARG]``; a kind is one :func:`register_model_kind` entry, so a new
source of models is one more entry. Random weights come from
``--seed``, drawn in a forked RNG so the process's own generator is left alone.

``--checkpoint`` takes a float ``state_dict`` (also under a ``"state_dict"`` key) or a
quantized-model file written by ``qdq.save``; :func:`read_checkpoint` tells them apart.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdqapp.errors import CliError, first_line
from qdqapp.registry import Registry

__all__ = ["ModelKind", "MODEL_KINDS", "register_model_kind", "parse_model_spec",
           "check_kind", "build_model", "build_from", "read_checkpoint", "Checkpoint",
           "load_float_weights", "parse_shape", "ExampleShape"]


@dataclass(frozen=True)
class ModelKind:
    """How one kind of spec becomes a float model.

    ``build(arg)`` returns the model (random parts drawn from torch's global RNG, which
    the caller seeds); ``check(arg)`` refuses a bad spec cheaply, before anything is
    built; ``example(arg)`` is the input shape (batch 1) the model takes when the data
    does not say (a dict of shapes for keyword token inputs), or None. ``tokenizer(arg)``,
    for text models only, gives the tokenizer text data is encoded with.
    """

    name: str
    grammar: str
    build: Callable[[str], nn.Module]
    check: Callable[[str], None]
    example: Callable[[str], ExampleShape | None]
    tokenizer: Callable[[str], Any] | None = None

    @property
    def takes_text(self) -> bool:
        return self.tokenizer is not None


#: an input shape, or the shapes of keyword inputs (token ids and mask of a text model)
ExampleShape = tuple[int, ...] | dict[str, tuple[int, ...]]

#: kind name -> entry; the fallback for ``package.module:factory`` is kind "python"
MODEL_KINDS: Registry[ModelKind] = Registry("model kind")
register_model_kind = MODEL_KINDS.register


def parse_model_spec(spec: str) -> tuple[ModelKind, str]:
    """``"torchvision:resnet18"`` -> (the torchvision kind, ``"resnet18"``)."""
    kind, sep, arg = spec.partition(":")
    if kind in MODEL_KINDS and kind != "python":
        return MODEL_KINDS[kind], arg
    if sep and kind and arg:
        return MODEL_KINDS["python"], spec
    raise CliError(f"model {spec!r}: expected {MODEL_KINDS.grammar()}")


def check_kind(kind: ModelKind, arg: str, spec: str) -> None:
    """Refuse, cheaply, a spec of ``kind`` that cannot work (before anything is built)."""
    try:
        kind.check(arg)
    except CliError as err:
        raise CliError(f"model {spec!r}: {err}") from None


def build_from(kind: ModelKind, arg: str, seed: int, spec: str) -> nn.Module:
    """The float model of a checked spec in eval mode, its random weights drawn from
    ``seed`` in a forked RNG (the process's own generator is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = kind.build(arg)
        except CliError as err:
            raise CliError(f"model {spec!r}: {err}") from None
    if not isinstance(model, nn.Module):
        raise CliError(f"model {spec!r}: the factory returned {type(model).__name__}, "
                       "not an nn.Module")
    return model.eval()


def build_model(spec: str, seed: int = 0) -> nn.Module:
    """The float model of the spec text ``spec`` (checked here), from ``seed``; the
    commands build through :class:`qdqapp.specs.ModelSpec` instead."""
    kind, arg = parse_model_spec(spec)
    check_kind(kind, arg, spec)
    return build_from(kind, arg, seed, spec)


# ----------------------------------------------------------------- the kinds
def _nothing_to_check(arg: str) -> None:
    return None


def _build_reference(arg: str) -> nn.Module:
    from qdqapp.reference import ReferenceCheckpointError, load_reference_model

    try:
        return load_reference_model()
    except ReferenceCheckpointError as err:
        raise CliError(str(err)) from err


def _check_reference(arg: str) -> None:
    if arg:
        raise CliError("'reference' takes no argument")


register_model_kind(ModelKind("reference", "reference", _build_reference, _check_reference,
                              lambda arg: (1, 1, 28, 28)))


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models()


def _check_torchvision(name: str) -> None:
    import difflib

    names = _torchvision_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CliError(f"torchvision has no model {name!r}{hint}")


def _build_torchvision(name: str) -> nn.Module:
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    extra: dict[str, Any] = {}
    params = inspect.signature(builder).parameters
    if "weights_backbone" in params:
        extra["weights_backbone"] = None  # segmentation/detection: no backbone download
    if name in ("googlenet", "inception_v3"):
        extra["init_weights"] = True  # the default changes; say which one we want
    return builder(weights=None, **extra)


def _torchvision_example(name: str) -> tuple[int, ...]:
    return (1, 3, 299, 299) if name == "inception_v3" else (1, 3, 224, 224)


register_model_kind(ModelKind("torchvision", "torchvision:NAME", _build_torchvision,
                              _check_torchvision, _torchvision_example))


def _hf(call: Callable[..., Any]) -> Callable[[str], Any]:
    """A :mod:`qdqapp.hf` function of the folder ``hf:ARG`` names; its errors as CliError."""
    def run(arg: str) -> Any:
        from qdqapp.hf import HFError, model_folder

        try:
            return call(model_folder(arg))
        except HFError as err:
            raise CliError(str(err)) from err
    return run


def _hf_check(folder) -> None:
    from qdqapp.hf import check_model_folder

    check_model_folder(folder)


def _hf_build(folder) -> nn.Module:
    from qdqapp.hf import load_model

    return load_model(folder)


def _hf_tokenizer(folder) -> Any:
    from qdqapp.hf import load_tokenizer

    return load_tokenizer(folder)


#: token ids and attention mask of one short sentence, when no text data says more
HF_EXAMPLE = {"input_ids": (1, 8), "attention_mask": (1, 8)}

register_model_kind(ModelKind("hf", "hf:DIR", _hf(_hf_build), _hf(_hf_check),
                              lambda arg: dict(HF_EXAMPLE), tokenizer=_hf(_hf_tokenizer)))


def _factory(spec: str) -> Callable[[], Any]:
    source, _, name = spec.rpartition(":")
    try:
        module = importlib.import_module(source)
    except ImportError as err:
        raise CliError(f"cannot import {source!r} ({first_line(err)})") from err
    factory = getattr(module, name, None)
    if not callable(factory):
        raise CliError(f"{source} has no callable {name!r}")
    return factory


def _check_python(spec: str) -> None:
    _factory(spec)


register_model_kind(ModelKind("python", "package.module:factory",
                              lambda spec: _factory(spec)(), _check_python, lambda spec: None))


# ----------------------------------------------------------------- checkpoints
@dataclass
class Checkpoint:
    """A ``--checkpoint`` file: a quantized-model file (``quantized``) or float weights."""

    path: Path
    quantized: bool
    state_dict: dict[str, torch.Tensor] | None = None
    metadata: dict[str, Any] | None = None
    #: a quantized-model file's format (int8, fp8, w8, w4, mixed or float)
    format: str | None = None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read ``path`` once (``weights_only``); a missing, unreadable or foreign file is one
    CliError naming it."""
    from qdq.checkpoint import FORMAT, RestoreError, load_plain, read, recorded_format

    path = Path(path)
    try:
        blob = load_plain(path)
        if isinstance(blob, dict) and blob.get("format") == FORMAT:
            blob = read(path)  # its version checked
    except RestoreError as err:
        raise CliError(f"checkpoint {err}") from err
    if isinstance(blob, dict) and blob.get("format") == FORMAT:
        return Checkpoint(path, True, metadata=blob.get("metadata") or {},
                          format=recorded_format(blob))
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor)
                                             for v in blob.values()):
        raise CliError(f"checkpoint {path}: neither a state_dict nor a quantized-model file "
                       "(qdq calibrate writes one)")
    return Checkpoint(path, False, state_dict=blob)


def load_float_weights(model: nn.Module, checkpoint: Checkpoint, spec: str) -> None:
    """Load a float state_dict strictly; a misfit is one line with the first keys."""
    try:
        result = model.load_state_dict(checkpoint.state_dict, strict=False)
    except RuntimeError as err:  # shapes differ
        detail = [ln.strip() for ln in str(err).splitlines() if ln.strip()][-1]
        raise CliError(f"checkpoint {checkpoint.path} does not fit {spec}: {detail}") from err
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        shown = (missing + unexpected)[:3]
        hint = (" (amax keys: a quantized state_dict; use the quantized-model file "
                "qdq calibrate writes)" if any(k.endswith("_amax") for k in unexpected)
                else "")
        raise CliError(f"checkpoint {checkpoint.path} does not fit {spec}: {len(missing)} "
                       f"missing and {len(unexpected)} unexpected keys, e.g. {shown}{hint}")


def parse_shape(text: str, what: str = "input shape") -> tuple[int, ...]:
    """``"1,3,224,224"`` or ``"1x3x224x224"`` -> ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError as err:
        raise CliError(f"{what} {text!r}: expected integers like 1x3x224x224") from err
    if not shape or any(d <= 0 for d in shape):
        raise CliError(f"{what} {text!r}: every dimension must be positive")
    return shape
