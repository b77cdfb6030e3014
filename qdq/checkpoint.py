"""``save`` / ``restore``: a quantized model in one file, rebuilt exactly from its float model.

A ``state_dict`` of a quantized model cannot be loaded into a freshly built float model:
the quant twins, the folded BatchNorm, the quantizers the placement rules added and the
ones they tied together are not there. The file written by :func:`save` holds, next to
the state (weights and amax), the *recipe* that rebuilds that structure:

==============  ================================================================
``modules``     every module path with its type (the structure restore must reach)
``twins``       module paths swapped for quant twins (layers and attention modules,
                however they were swapped): quant class and float class
``kept_float``  paths of layers that have a quant twin but stayed float (the ignore
                list in effect)
``rules``       each ``apply_rules`` call: where, which rules, the example inputs'
                shapes/dtypes (positional or keyword, lists, tuples and dicts with
                their structure: :mod:`qdq.rules.spec`), the quantizers already off,
                the traced parts kept module-level; ``folded`` BatchNorms
``quantizers``  one entry per quantizer object: every path it sits at (shared
                quantizers have several), its ``QuantDescriptor`` (``num_bits``
                ``[4, 3]`` for FP8 E4M3), calibrator kind, switches,
                ``learn_amax``, the rule that placed it and ``calibrated_by``
                (how its amax was found; absent when not known)
``weight_only`` every weight-only layer (:mod:`qdq.nn.weight_only`): its path, class,
                float class, ``bits`` (8 or 4), ``block_size``, the dtype of
                each quantized weight, the ``method`` that chose the codes (mse,
                awq, gptq, awq+gptq; absent: max) and ``input_scale: True`` when
                it holds an AWQ input scale; the int8 codes (4-bit ones one per byte), fp32
                scales and input scales are state (GPTQ and AWQ need no data to
                restore)
``format``      :func:`qdq.formats.format_of` of the saved model (int8, fp8, w8,
                w4, float or mixed)
==============  ================================================================

:func:`restore` replays it on the float model: quant twins and weight-only layers at the
recorded paths, BatchNorm -> Identity where it was folded, the placement rules with
inputs of the recorded shapes, then one quantizer per recorded entry at all of its paths. It checks
that the structure equals the recorded one and loads the state strictly, so the outputs
are bit-identical to the saved model's. The file holds only tensors and plain Python
values and is read with ``torch.load(weights_only=True)``.

Example::

    qdq.save(model, "resnet18.qdq.pt", metadata={"calibrator": "percentile-99.99"})
    ...
    model = qdq.restore(torchvision.models.resnet18(), "resnet18.qdq.pt")
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from qdq.calib import HistogramCalibrator, MaxCalibrator
from qdq.descriptor import QuantDescriptor
from qdq.fileio import atomic_write
from qdq.formats import format_of
from qdq.layer_kinds import twin_class
from qdq.nn.attention import QuantAttentionMixin, attention_twin_of
from qdq.nn.mixin import QuantInputMixin
from qdq.nn.weight_only import WEIGHT_ONLY_TWINS, QuantizedWeight, WeightOnlyLayer
from qdq.quantizer import TensorQuantizer
from qdq.replace import name_quantizers, quantizer_paths

__all__ = ["save", "restore", "read", "load_plain", "is_quantized_model_file", "RestoreError",
           "recorded_format", "FORMAT", "VERSION"]

FORMAT = "qdq.quantized_model"
#: version 2 added ``weight_only`` and ``format`` (its entries' ``method`` and
#: ``input_scale`` came later, optional: an older reader restores GPTQ files as they are
#: and refuses AWQ input scales as unexpected state); version 1 files (Q/DQ quantizers
#: only) are still read
VERSION = 2
_READABLE = (1, 2)

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CALIBRATORS = {"MaxCalibrator": MaxCalibrator, "HistogramCalibrator": HistogramCalibrator}


class RestoreError(ValueError):
    """The file cannot be read, or its recipe does not fit the model; names the file."""


# ------------------------------------------------------------------ type names
def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _kind(module: nn.Module) -> str:
    """A module's type as recorded; every traced GraphModule counts as one kind."""
    if isinstance(module, fx.GraphModule):
        return "torch.fx.GraphModule"
    return _type_name(type(module))


def _float_class(quant_cls: type) -> type | None:
    """The float layer a quant class stands in for (``None`` for rule-made modules)."""
    declared = getattr(quant_cls, "_float_cls", None)
    if declared is not None:
        return declared
    for base in quant_cls.__mro__[1:]:
        if (issubclass(base, nn.Module) and base is not nn.Module
                and not issubclass(base, QuantInputMixin)):
            return base
    return None


def _quant_classes() -> dict[str, type]:
    """Every quant class defined in this process, by qualified name."""
    import qdq.rules  # noqa: F401 - defines the classes the placement rules create

    found: dict[str, type] = {}
    stack = [QuantInputMixin]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            found.setdefault(_type_name(sub), sub)
            stack.append(sub)
    return found


# ----------------------------------------------------------------------- save
def _quantizer_entries(model: nn.Module) -> list[dict[str, Any]]:
    entries = []
    for q, paths in quantizer_paths(model):
        calibrator = q.calibrator
        entries.append({
            "paths": paths,
            "descriptor": q.descriptor.to_dict(),
            "calibrator": None if calibrator is None else type(calibrator).__name__,
            "switches": list(q.get_state()),
            "learn_amax": q.learn_amax,
            "placed_by": q.placed_by,
            **({"calibrated_by": q.calibrated_by} if q.calibrated_by is not None else {}),
        })
    return entries


def _weight_only_entries(model: nn.Module) -> list[dict[str, Any]]:
    out = []
    for path, layer in model.named_modules():
        if not isinstance(layer, WeightOnlyLayer):
            continue
        weights = {name: w for name, w in layer.named_modules()
                   if isinstance(w, QuantizedWeight)}
        kinds = {(w.bits, w.block_size) for w in weights.values()}
        if len(kinds) != 1:
            raise ValueError(f"save: weight-only layer '{path}' holds weights of several "
                             f"bit widths or block sizes {sorted(kinds, key=str)}")
        bits, block_size = kinds.pop()
        entry = {"path": path, "layer": _type_name(type(layer)),
                 "float": _type_name(getattr(layer, "_from_cls", None) or layer._float_cls),
                 "bits": bits,
                 "block_size": block_size,
                 "dtypes": {name: str(w.dtype).removeprefix("torch.")
                            for name, w in weights.items()}}
        method = getattr(layer, "method", "max")
        if method != "max":  # absent: max, so round-to-nearest files stay as they were
            entry["method"] = method
        if getattr(layer, "input_scale", None) is not None:
            entry["input_scale"] = True
        out.append(entry)
    return out


def _rules_entries(model: nn.Module) -> list[dict[str, Any]]:
    out = []
    for path, module in model.named_modules():
        report = getattr(module, "qdq_rules_report", None)
        if report is None:
            continue
        out.append({"path": path, "rules": list(getattr(report, "rules", [])),
                    "inputs": list(getattr(report, "inputs", [])),
                    "keywords": dict(getattr(report, "keywords", {})),
                    "disabled": list(getattr(report, "disabled", [])),
                    "reverted": list(getattr(report, "reverted_parts", [])),
                    "folded": list(report.folded)})
    return out


def recipe_of(model: nn.Module) -> dict[str, Any]:
    """The recipe :func:`save` writes (plain Python values only)."""
    from qdq.nn.registry import QUANT_TWINS

    modules, twins, kept_float = [], [], []
    for path, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            continue
        modules.append([path, _kind(module)])
        if isinstance(module, (QuantInputMixin, QuantAttentionMixin)):
            float_cls = getattr(module, "_from_cls", None) or _float_class(type(module))
            twins.append([path, _type_name(type(module)),
                          None if float_cls is None else _type_name(float_cls)])
        elif path and twin_class(module, QUANT_TWINS) is not None:
            kept_float.append(path)
    return {"modules": modules, "twins": twins, "kept_float": kept_float,
            "rules": _rules_entries(model), "quantizers": _quantizer_entries(model),
            "weight_only": _weight_only_entries(model), "format": format_of(model),
            "training": model.training}


def save(model: nn.Module, path: str | os.PathLike, *,
         metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (quantized, calibrated or not) with its recipe to ``path``.

    ``metadata`` is any JSON-able dict kept with it (how it was calibrated, on which
    data, the model spec): :func:`read` gives it back. The write is atomic.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(model).__name__}")
    metadata = dict(metadata or {})
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as err:
        raise TypeError(f"save: metadata must be JSON-able ({err})") from err
    blob = {
        "format": FORMAT, "version": VERSION,
        "recipe": recipe_of(model),
        "metadata": metadata,
        "state_dict": {k: v.detach().to("cpu", copy=True)
                       for k, v in model.state_dict().items()},
    }
    return atomic_write(path, partial(torch.save, blob))


# ----------------------------------------------------------------------- read
def load_plain(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one clear RestoreError for
    a missing file, a file torch.save did not write, or one holding Python objects."""
    import pickle
    import zipfile

    path = Path(path)
    if path.is_dir():
        raise RestoreError(f"{path}: is a folder, not a file")
    if not path.is_file():
        raise RestoreError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets one message
        if not zipfile.is_zipfile(path):
            why = "not a file torch.save wrote"
        elif isinstance(err, pickle.UnpicklingError):
            why = ("it holds Python objects, which weights_only loading refuses (save a "
                   "state_dict, or use qdq.save)")
        else:
            why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RestoreError(f"{path}: cannot be read ({why})") from err


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The file's contents (``recipe``, ``metadata``, ``state_dict``), loaded with
    ``weights_only=True``; a missing, unreadable or foreign file is one RestoreError."""
    path = Path(path)
    blob = load_plain(path)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise RestoreError(f"{path}: not a qdq quantized-model file (written by qdq.save); "
                           "a plain state_dict is loaded with model.load_state_dict")
    if blob.get("version") not in _READABLE:
        raise RestoreError(f"{path}: quantized-model file version {blob.get('version')!r}; "
                           f"this qdq reads versions {', '.join(map(str, _READABLE))}")
    return blob


def recorded_format(blob: dict[str, Any]) -> str:
    """The format (:func:`qdq.formats.format_of`) of the model in a file :func:`read`
    returned, without rebuilding it. Version 1 files did not record it; their enabled
    quantizers tell (``fp8`` or ``int8``)."""
    recipe = blob["recipe"]
    if "format" in recipe:
        return recipe["format"]
    kinds = {"fp8" if isinstance(e["descriptor"]["num_bits"], (list, tuple)) else "int8"
             for e in recipe["quantizers"] if not e["switches"][0]}
    return kinds.pop() if len(kinds) == 1 else "mixed" if kinds else "float"


def is_quantized_model_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file :func:`save` wrote (False for a plain state_dict)."""
    try:
        read(path)
    except RestoreError:
        return False
    return True


# -------------------------------------------------------------------- restore
def _get(model: nn.Module, path: str) -> nn.Module | None:
    if not path:
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _set(model: nn.Module, path: str, module: nn.Module) -> bool:
    parent_path, _, attr = path.rpartition(".")
    parent = _get(model, parent_path)
    if parent is None:
        return False
    parent._modules[attr] = module
    return True


class _Misfit(Exception):
    """Internal: the recipe does not fit; turned into a RestoreError naming the file."""


def _swap_twins(model: nn.Module, twins: list[list], classes: dict[str, type]) -> None:
    """Quant twins at the recorded paths the float model has; the rest come from rules."""
    for path, quant_name, float_name in twins:
        current = _get(model, path)
        if current is None or _type_name(type(current)) == quant_name:
            continue
        if float_name is None or _type_name(type(current)) != float_name:
            raise _Misfit(f"'{path or '(root)'}' is a {_type_name(type(current))} in the "
                          f"model, the file has a {quant_name} made from "
                          f"{float_name or 'nothing'} there")
        quant_cls = classes.get(quant_name)
        if quant_cls is None:  # attention twins are made per float class, on demand
            made = attention_twin_of(type(current))
            quant_cls = made if made is not None and _type_name(made) == quant_name else None
        if quant_cls is None:
            raise _Misfit(f"'{path}' is a {quant_name} in the file, a class this process "
                          "has not defined: import the module that defines it first")
        if not path:
            raise _Misfit("the root module itself is a quant twin in the file; wrap it")
        _set(model, path, quant_cls.from_float(current))


def _swap_weight_only(model: nn.Module, entries: list[dict],
                      state: dict[str, torch.Tensor]) -> None:
    """Weight-only layers at the recorded paths, their codes and scales shaped as saved
    (the values come with the state)."""
    classes = {_type_name(cls): cls for cls in WEIGHT_ONLY_TWINS.values()}
    for entry in entries:
        path = entry["path"]
        current = _get(model, path)
        if current is not None and _type_name(type(current)) == entry["layer"]:
            continue
        if current is None or _type_name(type(current)) != entry["float"]:
            have = "no module" if current is None else f"a {_type_name(type(current))}"
            raise _Misfit(f"'{path or '(root)'}' is a {_short(entry['layer'])} made from a "
                          f"{_short(entry['float'])} in the file, {have} in the model")
        cls = classes.get(entry["layer"])
        if cls is None:
            raise _Misfit(f"'{path}' is a {entry['layer']} in the file, a class this process "
                          "has not registered (qdq.nn.weight_only.register_weight_only)")
        if not path:
            raise _Misfit("the root module itself is a weight-only layer in the file; wrap it")
        bias = f"{path}.bias"
        if bias in state and "bias" in current._parameters and current.bias is None:
            current.bias = nn.Parameter(torch.zeros_like(state[bias]))  # a folded BatchNorm's
        try:
            layer = cls.from_float(current, entry["bits"], entry["block_size"])
        except ValueError as err:
            raise _Misfit(f"'{path}': {err}") from None
        for name, dtype in entry["dtypes"].items():
            weight = layer.get_submodule(name)
            weight.dtype = getattr(torch, dtype)
        layer.method = entry.get("method", "max")
        if entry.get("input_scale"):  # AWQ's 1/s; the values come with the state
            layer.set_input_scale(torch.ones(state[f"{path}.input_scale"].shape))
        _set(model, path, layer)


def _fold_structure(model: nn.Module, modules: dict[str, str]) -> None:
    """BatchNorm -> Identity where the file has an Identity (the values come later)."""
    from qdq.rules.fold import record_folded

    identity = _type_name(nn.Identity)
    folded = []
    for path, module in list(model.named_modules()):
        if isinstance(module, _BATCHNORM) and modules.get(path) == identity:
            _set(model, path, nn.Identity())
            folded.append(path)
    record_folded(model, folded)


def _device_of(model: nn.Module) -> torch.device:
    return next((t.device for t in [*model.parameters(), *model.buffers()]),
                torch.device("cpu"))


def _replay_rules(model: nn.Module, entries: list[dict]) -> nn.Module:
    from qdq.rules import RULES, apply_rules
    from qdq.rules.spec import example_of

    device = _device_of(model)
    for entry in entries:
        unknown = [r for r in entry["rules"] if r not in RULES]
        if unknown:
            raise _Misfit(f"it was made with the placement rule(s) {unknown}, which this "
                          "process has not registered")
        part = _get(model, entry["path"])
        if part is None:
            raise _Misfit(f"the placement rules ran on '{entry['path']}', which the model "
                          "lacks")
        for name in entry["disabled"]:
            q = _get(part, name)
            if isinstance(q, TensorQuantizer):
                q.disable()
        keywords = entry.get("keywords") or {}
        example = ({k: example_of(s, device) for k, s in keywords.items()} if keywords
                   else tuple(example_of(s, device) for s in entry["inputs"]) or None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the warnings were given when it was made
            placed = apply_rules(part, example, rules=entry["rules"], insert=False,
                                 skip_parts=entry.get("reverted", ()))
        placed.qdq_rules_report.folded = list(entry["folded"])  # folded by _fold_structure
        if entry["path"]:
            _set(model, entry["path"], placed)
        else:
            model = placed
    return model


def _install_quantizers(model: nn.Module, entries: list[dict]) -> list[TensorQuantizer]:
    """One quantizer per recorded entry, at every recorded path (ties come back)."""
    made = []
    for entry in entries:
        q = TensorQuantizer(QuantDescriptor.from_dict(entry["descriptor"]))
        kind = entry.get("calibrator")
        if kind is not None and type(q.calibrator).__name__ != kind:
            desc = q.descriptor
            if kind == "HistogramCalibrator":
                q._calibrator = HistogramCalibrator(desc.num_bits, None, desc.unsigned,
                                                    num_bins=desc.num_bins,
                                                    skip_zeros=desc.skip_zeros)
            elif kind == "MaxCalibrator":
                q._calibrator = MaxCalibrator(desc.num_bits, desc.axis, desc.unsigned)
        q.to(_device_of(model))
        for path in entry["paths"]:
            if not path or not isinstance(_get(model, path), TensorQuantizer):
                raise _Misfit(f"the file has a quantizer at '{path}', the rebuilt model has "
                              "none there")
            _set(model, path, q)
        made.append(q)
    recorded = {p for entry in entries for p in entry["paths"]}
    extra = [n for n, m in model.named_modules(remove_duplicate=False)
             if isinstance(m, TensorQuantizer) and n not in recorded]
    if extra:
        raise _Misfit(f"the rebuilt model has quantizers the file lacks, e.g. '{extra[0]}'")
    return made


def _check_structure(model: nn.Module, modules: list[list]) -> None:
    rebuilt = [[p, _kind(m)] for p, m in model.named_modules()
               if not isinstance(m, TensorQuantizer)]
    if rebuilt == modules:
        return
    have, want = dict(map(tuple, rebuilt)), dict(map(tuple, modules))
    order = [p for p, _ in modules] + [p for p, _ in rebuilt if p not in want]
    for path in order:
        if have.get(path) == want.get(path):
            continue
        name = path or "(root)"
        if path not in have:
            raise _Misfit(f"the file has a {_short(want[path])} at '{name}', the model has no "
                          "such module")
        if path not in want:
            raise _Misfit(f"the model has a {_short(have[path])} at '{name}', the file has no "
                          "such module")
        raise _Misfit(f"'{name}' is a {_short(want[path])} in the file, a "
                      f"{_short(have[path])} in the model")


def _short(kind: str) -> str:
    return kind.rpartition(".")[2]


def _add_missing_biases(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A folded BatchNorm gave its layer a bias; give the float layer one to load into."""
    for key, value in state.items():
        path, _, attr = key.rpartition(".")
        if attr != "bias":
            continue
        module = _get(model, path)
        if module is not None and "bias" in module._parameters \
                and module._parameters["bias"] is None:
            ref = getattr(module, "weight", None)
            module.bias = nn.Parameter(torch.zeros_like(
                value, device=ref.device if ref is not None else value.device,
                dtype=ref.dtype if ref is not None else value.dtype))


def restore(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Turn ``model``, the float model, into the quantized model saved in ``path``, in
    place, and return it (the same object).

    ``model`` is the same architecture, built the usual way (weights do not matter: the
    file's replace them). Custom quant classes must be defined (imported) before the call.
    The rebuild runs on a copy; only when it has succeeded does ``model`` take its place,
    so a file that does not fit raises :class:`RestoreError` (naming the file and the first
    module that differs) and leaves ``model`` exactly as it was. Where the placement rules
    traced the root, ``model`` becomes that ``fx.GraphModule`` (its class changes; it is
    still the object passed in). ``model`` keeps its train/eval mode, as
    ``load_state_dict`` does: call ``.eval()`` for inference. Peak memory is two copies of
    the model.
    """
    path = Path(path)
    blob = read(path)
    if not isinstance(model, nn.Module):
        raise TypeError(f"restore expects an nn.Module, got {type(model).__name__}")
    was_training = model.training
    try:
        work = copy.deepcopy(model)
    except Exception as err:  # noqa: BLE001 - any failure to copy has one meaning here
        raise RestoreError(f"{path}: the model cannot be copied to rebuild it safely "
                           f"(copy.deepcopy: {err})") from err
    rebuilt = _rebuild(work, blob, path)
    rebuilt.train(was_training)
    _become(model, rebuilt)
    return model


def _become(target: nn.Module, source: nn.Module) -> None:
    """``target`` takes ``source``'s class and state: the caller's object is the result."""
    state = source.__dict__
    target.__dict__.clear()
    target.__dict__.update(state)
    target.__class__ = type(source)
    if isinstance(target, fx.GraphModule):
        target.graph.owning_module = target


def _rebuild(model: nn.Module, blob: dict[str, Any], path: Path) -> nn.Module:
    """The recipe replayed on ``model`` (a private copy: it may be left half-changed)."""
    recipe, state = blob["recipe"], blob["state_dict"]
    modules = recipe["modules"]
    try:
        model.eval()
        _swap_twins(model, recipe["twins"], _quant_classes())
        _swap_weight_only(model, recipe.get("weight_only", []), state)
        _fold_structure(model, dict(map(tuple, modules)))
        model = _replay_rules(model, recipe["rules"])
        made = _install_quantizers(model, recipe["quantizers"])
        _check_structure(model, modules)
        _add_missing_biases(model, state)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            shown = (list(result.missing_keys) + list(result.unexpected_keys))[:3]
            raise _Misfit(f"{len(result.missing_keys)} missing and "
                          f"{len(result.unexpected_keys)} unexpected state keys, e.g. {shown}")
    except _Misfit as err:
        raise RestoreError(f"{path} does not fit the model: {err}") from None
    except RuntimeError as err:  # load_state_dict: shapes differ
        first = (str(err).strip().splitlines() or [""])[-1].strip()
        raise RestoreError(f"{path} does not fit the model: {first}") from err
    for q, entry in zip(made, recipe["quantizers"], strict=True):
        q.set_state(tuple(entry["switches"]))
        q.placed_by = entry["placed_by"]
        q.calibrated_by = entry.get("calibrated_by") if q.amax is not None else None
        if entry["learn_amax"] and not q.learn_amax and q.amax is not None:
            q.init_learn_amax()
    name_quantizers(model)
    return model
