"""``--format``: what the model becomes, checked before any work, and the one flow step
that makes it so.

============  =====================================================================
``int8``      quant twins, placement rules, INT8 quantizers; calibrated (the default)
``fp8``       the same, then every quantizer re-described as FP8 E4M3; calibrated with
              max, mse or percentile-P (entropy searches INT8's 128 even levels)
``w8``        Linear/Conv/LSTM/Embedding weights as int8 codes per output channel (or per block
              of ``--block-size`` inputs); activations float; nothing calibrated
``w4``        the same with int4 codes
============  =====================================================================

``--block-size B`` and ``--weight-method`` (max, mse, awq, gptq, awq+gptq) belong to
``w8``/``w4``; the data-driven methods learn from the calibration batches and need
``--data``. A
quantized-model ``--checkpoint`` carries its format: ``--format`` may repeat it, not
change it.

Example::

    choice = format_choice("w4", block_size=32)
    choice.title          # 'INT4 weight-only (block 32, amax max)'
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

import qdq
from qdq.blockwise import AMAX_METHODS
from qdq.formats import (
    FORMATS,
    WEIGHT_METHODS,
    Format,
    indivisible_weights,
    weight_only_candidates,
)
from qdq.fp8 import FP8_AMAX_METHODS
from qdq.layer_kinds import twin_class
from qdq.nn.weight_only import WEIGHT_ONLY_TWINS
from qdqapp.calibrators import DEFAULT_COMPARISON, calibrator_settings
from qdqapp.errors import FLAGS, CliError, Names

#: ``--weight-method`` values that run on the calibration batches (the others, the amax
#: searches, need no data)
DATA_METHODS = tuple(m for m in WEIGHT_METHODS if m not in AMAX_METHODS)

__all__ = ["WEIGHT_METHODS", "DATA_METHODS", "FormatChoice", "format_choice",
           "check_format_options", "check_calibrators",
           "default_calibrators", "apply_format_step", "weight_only_rows",
           "weight_only_table", "size_text", "DEFAULT_FORMAT"]

DEFAULT_FORMAT = "int8"
_NAMES = ", ".join(FORMATS)


@dataclass(frozen=True)
class FormatChoice:
    """The format a command makes (or found in a quantized-model file), with its options.

    ``name`` is a :data:`qdq.FORMATS` name, or ``"mixed"``/``"float"`` for a file holding
    such a model (nothing is then applied; it is used as it is). For a file, the weight-only
    options come from its metadata when it recorded them (``weight_method`` None otherwise;
    files written before ``--weight-method`` recorded it as ``weight_amax``).
    """

    name: str = DEFAULT_FORMAT
    block_size: int | None = None
    weight_method: str | None = "max"
    from_file: bool = False

    @property
    def format(self) -> Format | None:
        return FORMATS.get(self.name)

    @property
    def weight_only(self) -> bool:
        return self.format is not None and self.format.weight_only

    @property
    def title(self) -> str:
        """``INT8 Q/DQ``, ``INT4 weight-only (block 32, amax max)``, ..."""
        if self.format is None:
            return f"{self.name} (as found in the file)"
        if not self.weight_only or self.weight_method is None:
            return self.format.title
        how = "per channel" if self.block_size is None else f"block {self.block_size}"
        method = (self.weight_method.upper() if self.weight_method in DATA_METHODS
                  else f"amax {self.weight_method}")
        return f"{self.format.title} ({how}, {method})"

    @property
    def needs_data(self) -> bool:
        """The weights are quantized from calibration batches (``--weight-method`` awq,
        gptq), so the format step waits for the data."""
        return (self.weight_only and not self.from_file
                and self.weight_method in DATA_METHODS)

    @property
    def short(self) -> str:
        """``INT8``, ``FP8``, ``W8``, ``W4``: the word tables put before "metric"."""
        return self.name.upper()

    @property
    def min_opset(self) -> int:
        """The lowest ONNX opset the format needs (blocks need DequantizeLinear-21)."""
        if self.format is None:
            return 13
        return 21 if self.weight_only and self.block_size else self.format.min_opset

    def as_dict(self) -> dict:
        out = {"format": self.name, "format_title": self.title}
        if self.weight_only and self.weight_method is not None:
            out.update(block_size=self.block_size, weight_method=self.weight_method)
        return out


def check_format_options(name: str | None, block_size: int | None = None,
                         weight_method: str | None = None, names: Names = FLAGS) -> None:
    """The checks that need no model: a known name, options that belong to it."""
    if name is not None and (not isinstance(name, str) or name not in FORMATS):
        raise CliError(f"{names('format')} {name!r}: unknown format; choose one of {_NAMES}")
    if block_size is not None and (isinstance(block_size, bool)
                                   or not isinstance(block_size, int) or block_size < 1):
        raise CliError(f"{names('block_size')} {block_size!r}: expected a positive integer")
    if weight_method is not None and weight_method not in WEIGHT_METHODS:
        raise CliError(f"{names('weight_method')} {weight_method!r}: choose one of "
                       f"{', '.join(WEIGHT_METHODS)}")
    weight_only = name is not None and FORMATS[name].weight_only
    for key, value in (("block_size", block_size), ("weight_method", weight_method)):
        if value is not None and not weight_only:
            raise CliError(f"{names(key)} applies to the weight-only formats (--format w8 "
                           f"or w4), not to {name or DEFAULT_FORMAT}")


def format_choice(name: str | None = None, block_size: int | None = None,
                  weight_method: str | None = None, checkpoint=None,
                  names: Names = FLAGS) -> FormatChoice:
    """``--format``, ``--block-size``, ``--weight-method`` and the ``--checkpoint`` read
    (a :class:`qdqapp.models.Checkpoint`), as one checked :class:`FormatChoice`."""
    check_format_options(name, block_size, weight_method, names)
    if checkpoint is not None and checkpoint.quantized:
        found = checkpoint.format or DEFAULT_FORMAT
        if name is not None and name != found:
            raise CliError(f"{names('format')} {name}: {checkpoint.path} holds a model in "
                           f"format {found} (a quantized-model file keeps the format it was "
                           "made in); omit --format, or quantize the float model")
        for key, value in (("block_size", block_size), ("weight_method", weight_method)):
            if value is not None:
                raise CliError(f"{names(key)}: the weights of {checkpoint.path} are already "
                               "quantized; it applies when quantizing a float model")
        meta = checkpoint.metadata or {}
        method = meta.get("weight_method", meta.get("weight_amax"))
        recorded = meta.get("format") == found and method is not None
        return FormatChoice(found, meta.get("block_size") if recorded else None,
                            method if recorded else None, from_file=True)
    return FormatChoice(name or DEFAULT_FORMAT, block_size, weight_method or "max")


def default_calibrators(choice: FormatChoice) -> list[str]:
    """What ``qdq run`` compares unless told: every default the format can use."""
    if choice.weight_only:
        return []
    return [name for name in DEFAULT_COMPARISON if _fits(choice, name)]


def _fits(choice: FormatChoice, calibrator: str) -> bool:
    if choice.name != "fp8":
        return True
    amax_method = calibrator_settings(calibrator)["amax_method"]
    return amax_method is None or amax_method in FP8_AMAX_METHODS


def check_calibrators(choice: FormatChoice, names: Iterable[str], flag: str = "--calibrator",
                      default: str | None = "max") -> None:
    """Each calibrator asked for must suit the format: none for weight-only formats (only
    ``default``, which is never used there), no entropy for FP8."""
    for name in names:
        if choice.weight_only and name != default:
            raise CliError(f"{flag} {name}: {choice.name} is weight-only, nothing is "
                           "calibrated (how the weights are quantized: --weight-method)")
        if not _fits(choice, name):
            raise CliError(f"{flag} {name}: FP8 E4M3 calibrates with max, mse or "
                           "percentile-P; entropy searches INT8's 128 even levels, not the "
                           "E4M3 grid")


def _block_size_hint(model: nn.Module, choice: FormatChoice, ignore: list[str]) -> str | None:
    """One line when ``--block-size`` does not divide some layer's input dimension: the
    first weights at fault, and ``--ignore`` flags for every layer at fault (complete, so
    they can be pasted as they are)."""
    ignore = list(ignore) or None
    bad = indivisible_weights(model, choice.block_size, ignore)
    if not bad:
        return None
    layers = list(dict.fromkeys(layer for layer, _, _ in bad))
    shown = ", ".join(f"{layer}.{w} ({dim})" for layer, w, dim in bad[:6])
    more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
    ignores = " ".join(f"--ignore {layer}" for layer in layers)
    common = math.gcd(*(int(w.shape[1]) for _, layer in weight_only_candidates(model, ignore)
                        for w in twin_class(layer, WEIGHT_ONLY_TWINS).weights_of(layer).values()))
    other = f" (--block-size {common} divides every layer)" if common > 1 else ""
    which = "that layer" if len(layers) == 1 else f"those {len(layers)} layers"
    return (f"--block-size {choice.block_size} does not divide the input dimension of "
            f"{shown}{more}; keep {which} in float ({ignores}), or choose another block "
            f"size{other}, or leave --block-size out (one scale per output channel)")


def apply_format_step(model: nn.Module, choice: FormatChoice, ignore: list[str],
                      batches=None) -> None:
    """The flow's format step, in place. ``int8``/``fp8``: on the model with its quantizers
    (after the placement rules, before calibration) every quantizer takes the format.
    ``w8``/``w4``: on the float model, Linear/Conv/LSTM/Embedding weights (except ``ignore``) become
    integer codes, BatchNorm folded first; a block size that does not divide some layer's
    input dimension is one CliError naming them. ``batches`` (calibration inputs) feed
    the data-driven weight methods (:attr:`FormatChoice.needs_data`)."""
    fmt = choice.format
    if fmt is None:
        return
    if not choice.weight_only:
        if any(True for _ in qdq.quantizers(model)):
            qdq.set_format(model, fmt)
        return
    hint = _block_size_hint(model, choice, ignore)
    if hint is not None:
        raise CliError(hint)
    if choice.needs_data and batches is None:
        raise CliError(f"--weight-method {choice.weight_method} needs --data: it quantizes "
                       "the weights from the calibration batches")
    try:
        qdq.weight_only(model, bits=fmt.weight_bits, block_size=choice.block_size,
                        ignore=list(ignore) or None, method=choice.weight_method,
                        batches=batches if choice.needs_data else None)
    except qdq.formats.FormatError as err:
        raise CliError(f"--weight-method {choice.weight_method}: {err}") from err


def weight_only_rows(model: nn.Module) -> list[dict]:
    """One row per quantized weight: where, bits, block size, shape, scales, codes range."""
    from qdq.nn.weight_only import QuantizedWeight

    rows = []
    for name, w in model.named_modules():
        if isinstance(w, QuantizedWeight):
            rows.append({"name": name, "bits": w.bits, "block_size": w.block_size,
                         "shape": list(w.codes.shape), "scales": w.scale.numel(),
                         "codes_min": int(w.codes.min()), "codes_max": int(w.codes.max())})
    return rows


def weight_only_table(model: nn.Module) -> str:
    """:func:`weight_only_rows` as a text table (what ``summary`` and ``calibrate`` print)."""
    rows = weight_only_rows(model)
    if not rows:
        return "(no weight-only layers)"
    header = ["weight", "bits", "block", "shape", "scales", "codes"]
    table = [[r["name"], str(r["bits"]), "channel" if r["block_size"] is None
              else str(r["block_size"]), "x".join(map(str, r["shape"])), str(r["scales"]),
              f"[{r['codes_min']}, {r['codes_max']}]"] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    return "\n".join(line.rstrip() for line in lines)


def size_text(size: int, fp32_size: int) -> str:
    """``0.10 MB, 7.0x smaller than with FP32 weights`` for an ONNX file of ``size`` bytes
    that would take ``fp32_size`` with its quantized weights in fp32."""
    text = f"{size / 1e6:.2f} MB"
    compression = fp32_size / size if size else 1.0
    if compression > 1.005:
        return f"{text}, {compression:.1f}x smaller than with FP32 weights"
    return f"{text}, weights stored in FP32 (--int8-weights stores them quantized)"
