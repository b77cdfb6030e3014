"""``QuantDescriptor``: how one tensor is quantized, as a small validated value object.

A descriptor is pure configuration. ``TensorQuantizer`` reads it once at construction;
changing a descriptor later changes nothing already built.

Example::

    >>> QuantDescriptor(num_bits=8, axis=0).to_dict()["axis"]
    0
    >>> QuantDescriptor(calib_method="histogram").calib_method
    'histogram'
    >>> QuantDescriptor(num_bits=(4, 3)).is_fp8      # FP8 E4M3, scale amax / 448
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from qdq.calib.registry import CALIBRATORS
from qdq.fp8 import check_fp8_bits, is_fp8

__all__ = ["QuantDescriptor", "ScaledQuantDescriptor", "CALIB_METHODS"]

#: Calibrator names (``qdq.calib.registry.CALIBRATORS``).
CALIB_METHODS = tuple(CALIBRATORS)


@dataclass(frozen=True)
class QuantDescriptor:
    """Configuration of one quantizer.

    Args:
        num_bits: integer width, 2..16 (8 for TensorRT), or ``(4, 3)`` for FP8 E4M3
            (exponent and mantissa bits, NVIDIA's spelling; scale ``amax / 448``, see
            :mod:`qdq.fp8`). FP8 is signed and full range.
        name: optional label, carried into summaries.
        fake_quant: quantize-dequantize (True) or return integer values (False).
        axis: ``None`` for per-tensor; an int or a tuple of ints for the axes that keep
            their own amax (per-channel). Weights of Conv/Linear use 0, ConvTranspose 1.
        amax: a fixed amax instead of calibration: a float, or with one ``axis`` a list
            (or numpy array) of one value per channel along that axis.
        learn_amax: make amax a trainable parameter (QAT). Without ``amax`` the quantizer
            learns from the amax it is given later (calibrate, then ``init_learn_amax()``).
        scale_amax: multiply amax by this factor wherever it is used (a quick way to try
            a tighter or looser range; pytorch-quantization's option).
        unsigned: quantize to [0, 2^b - 1]; inputs must be non-negative.
        narrow_range: use [-(2^(b-1)-1), 2^(b-1)-1] instead of [-2^(b-1), 2^(b-1)-1].
        calib_method: ``"max"`` or ``"histogram"``.
        num_bins: bins of the histogram calibrator.
        skip_zeros: the histogram calibrator ignores exact zeros (e.g. after ReLU), so
            percentile and mse see only the non-zero values.
    """

    num_bits: int | tuple[int, int] = 8
    name: str | None = None
    fake_quant: bool = True
    axis: int | tuple[int, ...] | None = None
    amax: float | tuple[float, ...] | None = None
    learn_amax: bool = False
    unsigned: bool = False
    narrow_range: bool = False
    calib_method: str = "max"
    num_bins: int = 2048
    skip_zeros: bool = False
    scale_amax: float | None = None

    def __post_init__(self) -> None:
        label = f"QuantDescriptor{f' {self.name!r}' if self.name else ''}"
        if self.name is not None and not isinstance(self.name, str):
            raise TypeError(f"QuantDescriptor: name must be a string or None, got "
                            f"{type(self.name).__name__}")
        if is_fp8(self.num_bits):
            object.__setattr__(self, "num_bits", check_fp8_bits(self.num_bits, label))
            if self.unsigned or self.narrow_range:
                raise ValueError(f"{label}: FP8 E4M3 is signed and full range; unsigned and "
                                 "narrow_range do not apply")
        elif isinstance(self.num_bits, bool) or not isinstance(self.num_bits, int):
            raise TypeError(f"{label}: num_bits must be an int, got {self.num_bits!r}")
        elif not 2 <= self.num_bits <= 16:
            raise ValueError(f"{label}: num_bits must be in 2..16, got {self.num_bits}")
        if self.calib_method not in CALIB_METHODS:
            raise ValueError(
                f"{label}: calib_method must be one of {CALIB_METHODS}, got {self.calib_method!r}"
            )
        if isinstance(self.axis, list):
            object.__setattr__(self, "axis", tuple(self.axis))
        if self.axis is not None:
            axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
            if not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
                raise TypeError(f"{label}: axis must be None, an int or ints, got {self.axis!r}")
        if self.amax is not None and hasattr(self.amax, "tolist"):  # numpy array / tensor
            object.__setattr__(self, "amax", self.amax.tolist())
        if isinstance(self.amax, (list, tuple)) and any(isinstance(v, (list, tuple))
                                                        for v in self.amax):
            # a per-channel amax shaped to broadcast ([C, 1, 1, 1]): one value per channel
            flat = torch.tensor(self.amax, dtype=torch.float64)
            if sum(n > 1 for n in flat.shape) > 1:
                raise ValueError(f"{label}: amax of shape {tuple(flat.shape)} varies along "
                                 "more than one axis; give one value per channel of one axis")
            object.__setattr__(self, "amax", flat.reshape(-1).tolist())
        if self.amax is not None and (isinstance(self.amax, (str, bytes, bool))
                                      or not isinstance(self.amax, (int, float, list, tuple))):
            raise TypeError(f"{label}: amax must be float, list or ndarray, got "
                            f"{type(self.amax).__name__}")
        if self.learn_amax and self.axis is not None:
            raise TypeError(f"{label}: axis is ignored and must be None when learn_amax is "
                            f"True (a learned amax is per tensor), got axis={self.axis!r}")
        if self.amax is not None:
            values = self.amax if isinstance(self.amax, (list, tuple)) else (self.amax,)
            # amax is fp32 wherever it is used: store the fp32 values
            values = tuple(float(v) for v in values)
            if all(math.isfinite(v) for v in values):
                values = tuple(torch.tensor(values, dtype=torch.float32).tolist())
            bad = [v for v in values if not (math.isfinite(v) and v > 0)]
            if bad:
                raise ValueError(f"{label}: amax must be positive and finite, got {bad[0]}")
            object.__setattr__(
                self, "amax", values if isinstance(self.amax, (list, tuple)) else values[0]
            )
        if self.unsigned and self.narrow_range:
            raise ValueError(f"{label}: narrow_range applies to signed quantization only")
        if self.scale_amax is not None:
            factor = float(self.scale_amax)
            if not (math.isfinite(factor) and factor > 0):
                raise ValueError(f"{label}: scale_amax must be positive and finite, got "
                                 f"{self.scale_amax!r}")
            object.__setattr__(self, "scale_amax", factor)
        if not isinstance(self.num_bins, int) or self.num_bins < 128:
            raise ValueError(f"{label}: num_bins must be an int >= 128, got {self.num_bins!r}")

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def is_fp8(self) -> bool:
        """FP8 E4M3 (``num_bits=(4, 3)``) rather than integer quantization."""
        return is_fp8(self.num_bits)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (JSON/YAML friendly); ``from_dict`` inverts it exactly."""
        d = asdict(self)
        if isinstance(d["num_bits"], tuple):
            d["num_bits"] = list(d["num_bits"])
        if isinstance(d["axis"], tuple):
            d["axis"] = list(d["axis"])
        if isinstance(d["amax"], tuple):
            d["amax"] = list(d["amax"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantDescriptor:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"QuantDescriptor.from_dict: unknown keys {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> QuantDescriptor:
        return replace(self, **changes)

    def dict(self) -> dict[str, Any]:
        """pytorch-quantization's ``dict()``: ``num_bits``, ``name`` and only the fields
        that differ from their defaults; ``QuantDescriptor(**d.dict()) == d``."""
        full = self.to_dict()
        defaults = QuantDescriptor().to_dict()
        return {k: v for k, v in full.items()
                if k in ("num_bits", "name") or v != defaults[k]}

    def to_yaml(self) -> str:
        """The :meth:`dict` as YAML (pytorch-quantization's ``to_yaml``)."""
        import yaml

        return yaml.safe_dump(self.dict(), width=120)

    @classmethod
    def from_yaml(cls, text: str) -> QuantDescriptor:
        """Inverse of :meth:`to_yaml`."""
        import yaml

        d = yaml.safe_load(text)
        if not isinstance(d, dict):
            raise ValueError(f"QuantDescriptor.from_yaml: expected a mapping, got {text!r}")
        if isinstance(d.get("num_bits"), list):
            d["num_bits"] = tuple(d["num_bits"])
        return cls.from_dict(d)


#: pytorch-quantization exposed a second name for the same class.
ScaledQuantDescriptor = QuantDescriptor

QUANT_DESC_8BIT_PER_TENSOR = QuantDescriptor(num_bits=8)
QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR = QuantDescriptor(num_bits=8, unsigned=True)
QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=0)
QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=0)
QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=0)
QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW = QuantDescriptor(num_bits=8, axis=0)
QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=1)
QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=1)
QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=1)
