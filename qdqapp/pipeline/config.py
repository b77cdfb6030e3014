"""``RunConfig``: every knob of ``qdq run``, loadable from YAML or TOML.

A config file and the command-line flags use the same keys (flags spell ``_`` as ``-``);
flags override the file. Unknown keys and bad values are refused with the key named, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdqapp.calibrators import check_calibrator
from qdqapp.errors import CliError
from qdqapp.flow import smoothquant_alpha
from qdqapp.formats import FormatChoice, check_calibrators, check_format_options

__all__ = ["RunConfig", "ConfigError", "load_config"]

SWEEP_MODES = ("leave-one-out", "one-at-a-time", "none")


class ConfigError(ValueError):
    """A config file or flag holds a bad key or value; the message names it."""


@dataclass
class RunConfig:
    """What ``qdq run`` does. Defaults give the Fashion-MNIST reference demo."""

    out: str = "runs/latest"
    model: str = "reference"
    checkpoint: str | None = None
    data: str = "fashion-mnist"
    #: auto, top1, min-cosine, mean-cosine (qdqapp.evaluate) or package.module:function
    eval: str = "auto"
    batch_size: int = 256
    calib_batches: int = 8
    eval_batches: int | None = None
    image_size: int = 224
    #: int8, fp8, w8 or w4 (None: int8, or the format of a quantized-model checkpoint)
    format: str | None = None
    block_size: int | None = None
    weight_method: str | None = None
    #: compared in the calibrate stage (None: every default the format can use)
    calibrators: list[str] | None = None
    calibrator: str | None = None
    rules: bool = True
    ignore: list[str] = field(default_factory=list)
    sweep: str = "leave-one-out"
    #: allowed drop from FP32; None: 0.3 for percentages, 0.005 for cosines
    max_drop: float | None = None
    qat_epochs: int = 0
    qat_lr: float = 1e-4
    qat_steps: int | None = None
    #: None: the lowest the format allows (INT8 and W8 13, FP8 19, W4 and blocks 21)
    opset: int | None = None
    int8_weights: bool = False
    tensorrt: bool = True
    device: str | None = None
    seed: int = 0
    smoothquant: bool = False
    smoothquant_alpha: str | float = "auto"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("calibrators", "ignore"):
                if value is None and f.name == "calibrators":
                    continue
                if isinstance(value, str):
                    value = [v.strip() for v in value.split(",") if v.strip()]
                if not isinstance(value, (list, tuple)) or not all(
                        isinstance(v, str) for v in value):
                    raise ConfigError(f"{f.name}: expected a list of names, got {value!r}")
                setattr(self, f.name, list(value))
        for name in ("batch_size", "calib_batches", "image_size", "opset", "seed",
                     "qat_epochs"):
            value = getattr(self, name)
            if value is None and name == "opset":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}: expected a non-negative integer, got {value!r}")
        if self.batch_size == 0 or self.calib_batches == 0 or self.image_size == 0:
            raise ConfigError("batch_size, calib_batches and image_size must be at least 1")
        for name in ("eval_batches", "qat_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
        if self.sweep not in SWEEP_MODES:
            raise ConfigError(f"sweep: {self.sweep!r} is not one of {', '.join(SWEEP_MODES)}")
        for name in [*(self.calibrators or []),
                     *([self.calibrator] if self.calibrator else [])]:
            try:
                check_calibrator(name)
            except CliError as err:
                raise ConfigError(f"calibrator {name!r}: {err}") from None
        if self.calibrators is not None and not self.calibrators and not self.calibrator:
            raise ConfigError("calibrators: the list is empty and no calibrator is set")
        self._check_format()
        if self.max_drop is not None and (isinstance(self.max_drop, bool) or not isinstance(
                self.max_drop, (int, float)) or self.max_drop < 0):
            raise ConfigError(f"max_drop: expected a non-negative number, got "
                              f"{self.max_drop!r}")
        if not isinstance(self.smoothquant, bool):
            raise ConfigError(f"smoothquant: expected true or false, got {self.smoothquant!r}")
        try:
            self.smoothquant_alpha = smoothquant_alpha(self.smoothquant_alpha)
        except CliError as err:
            raise ConfigError(f"smoothquant_alpha: {err}") from None
        if self.opset is not None and self.opset < 13:
            raise ConfigError(f"opset: {self.opset} is too old; Q/DQ export needs 13 or newer")

    def _check_format(self) -> None:
        """The format, its options and the flags that must suit it (a quantized-model
        checkpoint's own format is checked when the file is read)."""
        try:
            check_format_options(self.format, self.block_size, self.weight_method)
            if self.format is None:
                return
            choice = FormatChoice(self.format, self.block_size, self.weight_method or "max")
            if self.calibrator:
                check_calibrators(choice, [self.calibrator], "calibrator", default=None)
            if self.calibrators:
                check_calibrators(choice, self.calibrators, "calibrators", default=None)
        except CliError as err:
            raise ConfigError(str(err)) from None
        if choice.weight_only and self.qat_epochs:
            raise ConfigError(f"qat_epochs: QAT trains fake-quantized float weights; "
                              f"{choice.name} layers hold integer codes")
        if self.opset is not None and self.opset < choice.min_opset:
            raise ConfigError(f"opset: {choice.title} needs opset {choice.min_opset} or "
                              "newer (leave it out for the lowest it allows)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """The keys that change results (not where they go or how they are printed)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("out", "device")}

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config {path}: no such file")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            raise ConfigError(f"config {path}: expected a .yaml, .yml or .toml file")
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any parser error becomes one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"config {path}: cannot be parsed ({first})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a table of keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """Config from ``path`` (YAML or TOML), then ``overrides`` that are not None."""
    data: dict[str, Any] = _read(Path(path)) if path else {}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    if "weight_amax" in data and "weight_method" not in data:  # its old name
        data["weight_method"] = data.pop("weight_amax")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config {path}: unknown key {unknown[0]!r} (known keys: "
                          f"{', '.join(sorted(known))})")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig(**data)
    except TypeError as err:
        raise ConfigError(str(err)) from err
