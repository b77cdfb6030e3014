"""``qdq run``'s settings: every knob (:class:`RunConfig`), loadable from YAML or TOML,
and parsed once into specs (:class:`RunSpecs`) that the pipeline and its stages trust.

A config file and the command-line flags use the same keys (flags spell ``_`` as ``-``);
flags override the file. :func:`load_config` reads both and parses them with the functions
every command uses (:mod:`qdqapp.specs`, :mod:`qdqapp.outputs`) plus :func:`parse_settings`
for what only ``qdq run`` has, so an unknown key or a bad value is refused before any work,
naming the flag or the key and its file: a typo never silently falls back to a default.

Example::

    specs = load_config("run.yaml", max_drop=0.5)    # RunSpecs; ConfigError when bad
    specs.settings.qat_lr, specs.data.batch_size, specs.model.format.title
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdqapp.errors import FLAGS, CliError, Names
from qdqapp.formats import FormatChoice, default_calibrators
from qdqapp.outputs import OutputSpec, parse_output
from qdqapp.specs import (
    DataSpec,
    EvalSpec,
    ModelSpec,
    boolean,
    integer,
    number,
    parse_calibrator,
    parse_calibrators,
    parse_data,
    parse_eval,
    parse_model,
)

__all__ = ["RunConfig", "RunSettings", "RunSpecs", "ConfigError", "load_config",
           "parse_run", "parse_settings", "SWEEP_MODES"]

SWEEP_MODES = ("leave-one-out", "one-at-a-time", "none")


class ConfigError(CliError, ValueError):
    """A config file or flag holds a bad key or value; the message names it."""


@dataclass
class RunConfig:
    """What ``qdq run`` is asked, key by key, as written (:func:`parse_run` checks it).
    Defaults give the Fashion-MNIST reference demo."""

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """The keys that change results (not where they go or how they are printed)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("out", "device")}

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


@dataclass(frozen=True)
class RunSettings:
    """What only ``qdq run`` has: the calibrators its calibrate stage tries (checked
    against the format; none for weight-only formats), the sweep, the target drop, QAT,
    the export's opset and weights, and the TensorRT stage."""

    calibrators: tuple[str, ...] = ()
    sweep: str = "leave-one-out"
    max_drop: float | None = None
    qat_epochs: int = 0
    qat_lr: float = 1e-4
    qat_steps: int | None = None
    opset: int | None = None
    int8_weights: bool = False
    tensorrt: bool = True


@dataclass(frozen=True)
class RunSpecs:
    """A ``qdq run`` parsed: ``config`` keeps the keys (normalised: lists, numbers) for
    ``config.json``, the resume check and the report; the specs are what the run uses."""

    config: RunConfig
    model: ModelSpec
    data: DataSpec
    eval: EvalSpec
    out: OutputSpec
    settings: RunSettings


def _newest_opset() -> int:
    import onnx

    return int(onnx.defs.onnx_opset_version())


def parse_settings(config: RunConfig, fmt: FormatChoice, names: Names = FLAGS) -> RunSettings:
    """:class:`RunSettings` from ``config``, every value in range for ``fmt``."""
    if config.sweep not in SWEEP_MODES:
        raise CliError(f"{names('sweep')} {config.sweep!r}: choose one of "
                       f"{', '.join(SWEEP_MODES)}")
    max_drop = number(config.max_drop, names("max_drop"), 0, optional=True)
    qat_epochs = integer(config.qat_epochs, names("qat_epochs"), 0)
    qat_lr = number(config.qat_lr, names("qat_lr"), 0, above=True)
    qat_steps = integer(config.qat_steps, names("qat_steps"), 1, optional=True)
    if fmt.weight_only and qat_epochs:
        raise CliError(f"{names('qat_epochs')}: QAT trains fake-quantized float weights; "
                       f"{fmt.name} layers hold integer codes")
    opset = integer(config.opset, names("opset"), optional=True)
    if opset is not None and not 13 <= opset <= _newest_opset():
        raise CliError(f"{names('opset')} {opset}: Q/DQ export needs 13 or newer, and the "
                       f"installed onnx knows opsets up to {_newest_opset()}")
    if opset is not None and opset < fmt.min_opset:
        raise CliError(f"{names('opset')} {opset}: {fmt.title} needs opset {fmt.min_opset} "
                       "or newer (leave it out for the lowest it allows)")
    compared = None
    if config.calibrators is not None:
        compared = parse_calibrators(config.calibrators, fmt, "calibrators", names,
                                     default=None)
    if config.calibrator is not None:  # one calibrator: no comparison
        calibrators = (parse_calibrator(config.calibrator, fmt, "calibrator", names,
                                        default=None),)
    else:
        calibrators = compared or tuple(default_calibrators(fmt))
    return RunSettings(calibrators, config.sweep, max_drop, qat_epochs, qat_lr, qat_steps,
                       opset, boolean(config.int8_weights, names("int8_weights")),
                       boolean(config.tensorrt, names("tensorrt")))


def parse_run(config: RunConfig, names: Names = FLAGS, force: bool = False) -> RunSpecs:
    """Every key of ``config`` checked, in one pass, into :class:`RunSpecs` (``force``:
    write into another command's folder, ``--force``)."""
    out = parse_output(config.out, "run", what=names("out"), force=force) \
        if isinstance(config.out, (str, Path)) and str(config.out) else None
    if out is None:
        raise CliError(f"{names('out')}: expected a folder, got {config.out!r}")
    model = parse_model(config.model, checkpoint=config.checkpoint, rules=config.rules,
                        ignore=config.ignore if config.ignore is not None else [],
                        seed=config.seed, device=config.device,
                        smoothquant=config.smoothquant,
                        smoothquant_alpha=config.smoothquant_alpha, format=config.format,
                        block_size=config.block_size, weight_method=config.weight_method,
                        names=names)
    settings = parse_settings(config, model.format, names)
    if config.data is None:
        raise CliError(f"{names('data')}: expected a data spec, got None")
    data = parse_data(config.data, model=model, batch_size=config.batch_size,
                      calib_batches=config.calib_batches, eval_batches=config.eval_batches,
                      image_size=config.image_size, names=names)
    evaluation = parse_eval(config.eval, model=model, data=data, custom=True, names=names)
    calibrators = config.calibrators
    if calibrators is not None:
        calibrators = [c.strip() for c in calibrators.split(",") if c.strip()] \
            if isinstance(calibrators, str) else list(calibrators)
    normal = dataclasses.replace(config, ignore=list(model.ignore), calibrators=calibrators,
                                 smoothquant_alpha=model.smoothquant_alpha,
                                 max_drop=settings.max_drop, qat_lr=settings.qat_lr)
    return RunSpecs(normal, model, data, evaluation, out, settings)


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


def load_config(path: str | Path | None = None, *, force: bool = False,
                **overrides: Any) -> RunSpecs:
    """The config in ``path`` (YAML or TOML), then the ``overrides`` (flags) that are not
    None, parsed (:func:`parse_run`); one :class:`ConfigError` naming the key or flag."""
    data: dict[str, Any] = _read(Path(path)) if path else {}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    if "weight_amax" in data and "weight_method" not in data:  # its old name
        data["weight_method"] = data.pop("weight_amax")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config {path}: unknown key {unknown[0]!r} (known keys: "
                          f"{', '.join(sorted(known))})")
    flags = {k: v for k, v in overrides.items() if v is not None}
    names = Names(str(path), set(data) - set(flags)) if path else FLAGS
    data.update(flags)
    try:
        return parse_run(RunConfig(**data), names, force)
    except ConfigError:
        raise
    except CliError as err:
        raise ConfigError(str(err)) from None
