"""``TensorQuantizer``: the fake-quant node placed in a model, a small state machine.

States are three switches that combine freely:

=========  ============  =================================================
``_disabled``  ``_if_calib``  ``_if_quant``   what forward does
=========  ============  =================================================
True       any           any            identity (the quantizer is off)
False      True          False          feed the calibrator, pass x through
False      True          True           feed the calibrator, fake-quantize
False      False         True           fake-quantize with amax
=========  ============  =================================================

amax is a buffer (``_amax``) so it travels with ``state_dict`` and ``.to(device)``. It is
registered only once known (calibrated, set, or loaded from a state_dict), so a float
checkpoint loads strictly into a freshly quantized model, and a calibrated one registers
it on load. With ``learn_amax`` it becomes a Parameter. ``calibrated_by`` says how the
current amax was found (``max``, ``entropy``, ``mse``, ``percentile-99.99``; ``set`` by
hand; ``+learned`` once trained), so tables name the search that ran, not the calibrator
the descriptor asks for.

A quantizer without amax quantizes with the *dynamic* amax of each input (max ``|x|``
over the dimensions other than ``axis``), as pytorch-quantization does; it warns once.
Export needs a calibrated amax: the ONNX path refuses a dynamic quantizer by name.
During ``torch.onnx.export`` the forward pass calls torch's own fake-quantize ops, which
the exporter turns into ``QuantizeLinear``/``DequantizeLinear``; no global flag is needed.
An FP8 quantizer (``num_bits=(4, 3)``, :mod:`qdq.fp8`) exports as Q/DQ-19 with a
float8e4m3fn zero point.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from qdq.calib import HistogramCalibrator, build_calibrator, choice_name, compute_amaxes
from qdq.calib.base import CalibrationError
from qdq.clipping import clip as clip_function
from qdq.descriptor import QuantDescriptor
from qdq.fp8 import fp8_histogram_amax, fp8_qdq_for_export
from qdq.kernels import default_backend, resolve_backend
from qdq.tensor_quant import fake_quant, quant_bounds, scale_from_amax, tensor_quant
from qdq.utils import reduce_amax

__all__ = ["TensorQuantizer", "QuantizerError", "QuantizerStateError", "DynamicAmaxWarning",
           "load_calib_amaxes"]


class QuantizerError(ValueError):
    """A quantizer was used in a way it cannot honour; the message names it."""


class QuantizerStateError(QuantizerError, RuntimeError):
    """A request the quantizer's current state cannot serve (no calibrator, no data, a
    shape change); also a ``RuntimeError``, which pytorch-quantization raised there."""


class DynamicAmaxWarning(UserWarning):
    """A quantizer without amax quantizes with the amax of each input (once per quantizer)."""


class TensorQuantizer(nn.Module):
    """Quantizes the tensor passing through it, as configured by a ``QuantDescriptor``.

    Args:
        quant_desc: the configuration; defaults to 8-bit per-tensor max calibration.
        disabled: start switched off.
        if_quant: fake-quantize when enabled.
        if_clip: clip to ``[-amax, amax]`` before quantizing, with the PACT gradient for a
            learned amax (needs ``learn_amax``; pytorch-quantization's clip stage).
        if_calib: collect calibration statistics when enabled.

    Example::

        >>> q = TensorQuantizer(QuantDescriptor(calib_method="max"))
        >>> q.disable_quant(); q.enable_calib()
        >>> _ = q(torch.randn(4, 8))
        >>> q.load_calib_amax(); q.enable_quant(); q.disable_calib()
    """

    #: Kept for pytorch-quantization scripts, which set it before ONNX export. qdq
    #: detects export by itself; setting it also makes eager mode use torch's ops.
    use_fb_fake_quant = False

    #: Which fake-quant implementation runs in training and eager inference (see
    #: :mod:`qdq.kernels`): ``"auto"`` (fused Triton kernels on CUDA, eager elsewhere),
    #: ``"fused"`` or ``"eager"``. Same numbers either way; set it on the class or on one
    #: quantizer.
    backend: str = default_backend()

    def __init__(
        self,
        quant_desc: QuantDescriptor | None = None,
        disabled: bool = False,
        if_quant: bool = True,
        if_clip: bool = False,
        if_calib: bool = False,
    ) -> None:
        super().__init__()
        desc = quant_desc if quant_desc is not None else QuantDescriptor()
        if if_clip and not desc.learn_amax:
            raise QuantizerError(
                f"{desc.name or 'TensorQuantizer'}: if_clip=True needs "
                "QuantDescriptor(learn_amax=True): the clip stage learns amax")
        self._descriptor = desc
        self._num_bits = desc.num_bits
        self._fp8 = desc.is_fp8
        self._fake_quant = desc.fake_quant
        self._axis = desc.axis
        self._unsigned = desc.unsigned
        self._narrow_range = desc.narrow_range
        self._scale_amax = desc.scale_amax
        self._learn_amax = False
        self._learn_requested = desc.learn_amax
        self._disabled = disabled
        self._if_quant = if_quant
        self._if_clip = if_clip
        self._if_calib = if_calib
        self._name: str | None = desc.name
        self._dynamic_warned = False
        self._last_scale: torch.Tensor | None = None
        self.placed_by: str | None = None  # which rule put this quantizer here (summary)
        #: how the current amax was found: a calibrator choice (``max``, ``entropy``,
        #: ``mse``, ``percentile-99.99``), ``set`` by hand, ``...+learned`` once trained;
        #: None while there is no amax, or when a state_dict brought it without saying
        self.calibrated_by: str | None = None
        # Follows .to(device) so that an amax loaded later lands where the model lives;
        # not persistent, so it never appears in a state_dict.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        if desc.amax is not None:
            self.amax = _descriptor_amax(desc, self.name)
        try:
            self._calibrator = build_calibrator(desc, self.name)
        except CalibrationError as err:
            raise QuantizerError(str(err)) from None
        if desc.learn_amax and desc.amax is not None:
            self.init_learn_amax()

    # ----------------------------------------------------------------- identity
    @property
    def name(self) -> str:
        """The module path of this quantizer once a walker has named it."""
        return self._name or "TensorQuantizer"

    @name.setter
    def name(self, value: str) -> None:
        self._name = value
        if self._calibrator is not None:
            self._calibrator.owner = value

    @property
    def descriptor(self) -> QuantDescriptor:
        return self._descriptor

    @property
    def num_bits(self):
        return self._num_bits

    @num_bits.setter
    def num_bits(self, value) -> None:
        self._descriptor = self._descriptor.replace(num_bits=value)
        self._num_bits = self._descriptor.num_bits
        self._fp8 = self._descriptor.is_fp8

    @property
    def is_fp8(self) -> bool:
        """FP8 E4M3 (``num_bits == (4, 3)``) rather than integer quantization."""
        return self._fp8

    @property
    def axis(self):
        return self._axis

    @property
    def unsigned(self) -> bool:
        return self._unsigned

    @unsigned.setter
    def unsigned(self, value: bool) -> None:
        self._descriptor = self._descriptor.replace(unsigned=bool(value))
        self._unsigned = bool(value)

    @property
    def narrow_range(self) -> bool:
        return self._narrow_range

    @narrow_range.setter
    def narrow_range(self, value: bool) -> None:
        self._descriptor = self._descriptor.replace(narrow_range=bool(value))
        self._narrow_range = bool(value)

    @property
    def fake_quant(self) -> bool:
        return self._fake_quant

    @property
    def learn_amax(self) -> bool:
        return self._learn_amax

    @property
    def scale_amax(self) -> float | None:
        return self._scale_amax

    @property
    def calibrator(self):
        return self._calibrator

    @contextlib.contextmanager
    def calibrating_with(self, calib_method: str) -> Iterator[None]:
        """Inside the block, collect with the calibrator ``calib_method`` names (``"max"``,
        ``"histogram"``): the descriptor and the calibrator switch together, so
        ``descriptor.calib_method`` always names the calibrator in use, and both come back
        on exit, also after an exception. amax loaded inside the block stays."""
        saved = self._descriptor, self._calibrator
        if calib_method != self._descriptor.calib_method:
            desc = self._descriptor.replace(calib_method=calib_method)
            try:
                calib = build_calibrator(desc, self.name)
            except CalibrationError as err:
                raise QuantizerError(str(err)) from None
            self._descriptor, self._calibrator = desc, calib
        try:
            yield
        finally:
            self._descriptor, self._calibrator = saved

    # ------------------------------------------------------------------- state
    @property
    def is_enabled(self) -> bool:
        return not self._disabled

    @property
    def is_quant_enabled(self) -> bool:
        return not self._disabled and self._if_quant

    @property
    def is_calib_enabled(self) -> bool:
        return not self._disabled and self._if_calib

    def enable(self) -> None:
        self._disabled = False

    def disable(self) -> None:
        self._disabled = True

    def enable_quant(self) -> None:
        self._if_quant = True

    def disable_quant(self) -> None:
        self._if_quant = False

    def enable_calib(self) -> None:
        if self._calibrator is None:
            raise QuantizerError(f"{self.name}: has no calibrator")
        self._if_calib = True

    def disable_calib(self) -> None:
        self._if_calib = False

    def enable_clip(self) -> None:
        """Clip to ``[-amax, amax]`` before quantizing (PACT gradient for a learned amax)."""
        if not self._learn_requested:
            raise QuantizerError(f"{self.name}: the clip stage needs learn_amax=True")
        self._if_clip = True

    def disable_clip(self) -> None:
        self._if_clip = False

    def state(self) -> str:
        """One word: off, calib, quant, calib+quant or idle."""
        if self._disabled:
            return "off"
        parts = [p for p, on in (("calib", self._if_calib), ("quant", self._if_quant)) if on]
        return "+".join(parts) or "idle"

    def get_state(self) -> tuple[bool, bool, bool]:
        return (self._disabled, self._if_quant, self._if_calib)

    def set_state(self, state: tuple[bool, bool, bool]) -> None:
        self._disabled, self._if_quant, self._if_calib = state

    # -------------------------------------------------------------------- amax
    @property
    def amax(self) -> torch.Tensor | None:
        """The calibrated (or set, or learned) amax; None while quantization is dynamic."""
        amax = self._parameters.get("_amax")
        return amax if amax is not None else self._buffers.get("_amax")

    @amax.setter
    def amax(self, value) -> None:
        self._set_amax(value)
        self.calibrated_by = None if value is None else "set"

    @property
    def is_dynamic(self) -> bool:
        """True while there is no amax: each input is quantized with its own max |x|."""
        return self.amax is None

    def _set_amax(self, value, allow_zero: bool = False) -> None:
        if value is None:
            self.reset_amax()
            return
        value = torch.as_tensor(value, dtype=torch.float32).detach()
        self._validate_amax(value, allow_zero)
        current = self.amax
        if isinstance(current, nn.Parameter):
            with torch.no_grad():
                if current.shape != value.shape:
                    raise QuantizerStateError(
                        f"{self.name}: cannot reshape a learnable amax "
                        f"{tuple(current.shape)} -> {tuple(value.shape)}"
                    )
                current.copy_(value.to(current.device))
        else:
            device = current.device if current is not None else self._device_anchor.device
            self.register_buffer("_amax", value.to(device).clone())

    def _validate_amax(self, value: torch.Tensor, allow_zero: bool = False) -> None:
        if value.numel() == 0:
            raise QuantizerError(f"{self.name}: amax is empty")
        if not bool(torch.isfinite(value).all()):
            bad = value[~torch.isfinite(value)].flatten()[0].item()
            raise QuantizerError(f"{self.name}: amax must be finite, got {bad}")
        zero_ok = allow_zero or self._axis is not None
        if not zero_ok and value.numel() == 1 and float(value.reshape(())) <= 0:
            raise QuantizerError(f"{self.name}: amax must be positive, got {float(value):g}")
        if bool((value < 0).any()):
            raise QuantizerError(
                f"{self.name}: amax must not be negative, got {value.min().item():g}"
            )

    def reset_amax(self) -> None:
        """Forget amax: back to dynamic quantization (and a fixed, not learned, range)."""
        self._learn_amax = False
        self.calibrated_by = None
        self._parameters.pop("_amax", None)
        self._buffers.pop("_amax", None)

    @property
    def step_size(self) -> torch.Tensor | None:
        """Step size ``amax / qmax`` (``amax / 127`` for 8-bit signed): what ONNX's and
        TensorRT's QuantizeLinear call the scale."""
        amax = self.amax
        if amax is None:
            return None
        if self._scale_amax is not None:
            amax = amax * self._scale_amax
        return scale_from_amax(amax, self._num_bits, self._unsigned, self._narrow_range)

    @property
    def scale(self) -> torch.Tensor | None:
        """pytorch-quantization's scale, ``qmax / amax`` (multiply to quantize): of the
        calibrated amax, or for a dynamic quantizer the last one ``fake_quant=False``
        used; None before either exists. ONNX's scale is :attr:`step_size`."""
        amax = self.amax
        if amax is None:
            return self._last_scale
        _, _, divisor = quant_bounds(self._num_bits, self._unsigned, self._narrow_range)
        if self._scale_amax is not None:
            amax = amax * self._scale_amax
        return divisor / amax.detach().float()

    @property
    def pre_quant_scale(self) -> torch.Tensor | None:
        """A multiplier applied to the input before anything else (SmoothQuant's per-
        channel activation scale); None when not set. Exports as one ``Mul``."""
        return self._buffers.get("_pre_quant_scale")

    @pre_quant_scale.setter
    def pre_quant_scale(self, value) -> None:
        if value is None:
            self._buffers.pop("_pre_quant_scale", None)
            return
        value = torch.as_tensor(value, dtype=torch.float32).detach()
        if not bool(torch.isfinite(value).all()):
            raise QuantizerError(f"{self.name}: pre_quant_scale must be finite")
        current = self.pre_quant_scale
        if current is not None and current.shape != value.shape:
            raise QuantizerStateError(
                f"{self.name}: pre_quant_scale has shape {tuple(current.shape)}; cannot set "
                f"one of shape {tuple(value.shape)} (set None first)")
        device = current.device if current is not None else self._device_anchor.device
        self.register_buffer("_pre_quant_scale", value.to(device).clone())

    @property
    def clip(self) -> _ClipRange:
        """pytorch-quantization's clip stage of a learned amax, read-only:
        ``clip.clip_value_min`` is ``-amax``, ``clip.clip_value_max`` is ``amax``."""
        if not self._learn_requested:
            raise AttributeError(f"{self.name}: only a quantizer with learn_amax=True has a "
                                 "clip stage")
        return _ClipRange(self)

    def load_calib_amax(self, method: str | None = None, strict: bool = True, **kwargs) -> None:
        """Compute amax with the calibrator and store it.

        ``method`` is for the histogram calibrator: ``"entropy"`` (default),
        ``"percentile"`` (``percentile=99.99``), ``"mse"`` (``start_bin``, ``stride``) or
        ``"max"``; FP8 quantizers take ``"mse"`` (their default, on the E4M3 grid),
        ``"percentile"`` or ``"max"``; the max calibrator takes none. With ``strict=False``
        a quantizer that saw no data keeps its amax instead of raising.
        :func:`load_calib_amaxes` does this for many quantizers with one search.
        """
        self._check_calib_request(method, kwargs)
        if isinstance(self._calibrator, HistogramCalibrator) and self._fp8:
            amax = fp8_histogram_amax(self._calibrator, method or "mse", **kwargs)
        elif isinstance(self._calibrator, HistogramCalibrator):
            amax = self._calibrator.compute_amax(method or "entropy", **kwargs)
        else:
            amax = self._calibrator.compute_amax()
        self._store_calib_amax(amax, strict, self._search_name(method, kwargs))

    def _search_name(self, method: str | None, kwargs: dict) -> str:
        """What ``load_calib_amax(method, **kwargs)`` runs, as a calibrator choice name."""
        if not isinstance(self._calibrator, HistogramCalibrator):
            return "max"
        return choice_name(method or ("mse" if self._fp8 else "entropy"), **kwargs)

    def _check_calib_request(self, method: str | None, kwargs: dict) -> None:
        if self._calibrator is None:
            raise QuantizerStateError(f"{self.name}: has no calibrator")
        if isinstance(self._calibrator, HistogramCalibrator):
            return
        if method not in (None, "max") or kwargs:
            asked = repr(method) if method not in (None, "max") else ", ".join(kwargs)
            raise QuantizerError(
                f"{self.name}: load_calib_amax({asked}) needs a histogram calibrator, but "
                f"this quantizer collects with {type(self._calibrator).__name__} "
                f"(calib_method={self._descriptor.calib_method!r}), which only gives max. "
                "Build it with QuantDescriptor(calib_method='histogram') and calibrate "
                "again, or call load_calib_amax() for max")

    def _store_calib_amax(self, amax: torch.Tensor | None, strict: bool,
                          found_by: str | None = None) -> None:
        """Store a calibrated amax; ``found_by`` names the search (``calibrated_by``)."""
        if amax is None:
            if strict:
                raise QuantizerStateError(
                    f"{self.name}: load_calib_amax: the calibrator saw no data (Calibrator "
                    "returned None); run calibration batches with enable_calib() first, or "
                    "pass strict=False to keep the current amax"
                )
            return
        amax = amax.detach().float()
        if not bool(torch.isfinite(amax).all()):
            raise QuantizerError(f"{self.name}: calibrated amax is not finite")
        if self._axis is None and float(amax) <= 0:
            warnings.warn(
                f"{self.name}: every calibration value was 0; amax is 0 and exports the "
                "smallest positive scale", stacklevel=3)
        if isinstance(self.amax, nn.Parameter) and self.amax.shape != amax.shape:
            # a learned per-tensor amax takes the largest of a per-channel calibration
            amax = amax.max().reshape(self.amax.shape)
        self._set_amax(amax, allow_zero=True)
        self.calibrated_by = found_by

    def init_learn_amax(self) -> None:
        """Turn amax into a trainable Parameter (QAT with learned ranges)."""
        amax = self.amax
        if amax is None:
            raise QuantizerStateError(
                f"{self.name}: init_learn_amax needs amax; calibrate first (load_calib_amax)")
        self._buffers.pop("_amax", None)
        self._parameters.pop("_amax", None)
        self._amax = nn.Parameter(amax.detach().clone().float())
        self._learn_amax = True
        self._learn_requested = True
        found = self.calibrated_by
        if found in (None, "set"):
            self.calibrated_by = "learned"
        elif not found.endswith("learned"):
            self.calibrated_by = f"{found}+learned"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        device = self._device_anchor.device
        key = prefix + "_amax"
        clip_keys = (prefix + "clip.clip_value_min", prefix + "clip.clip_value_max")
        from_clip = key not in state_dict and all(k in state_dict for k in clip_keys)
        if from_clip:
            # a pytorch-quantization checkpoint of a learned amax: its clip bounds
            lo, hi = (state_dict[k].detach().float() for k in clip_keys)
            learned = torch.maximum(-lo, hi)
            if isinstance(self.amax, nn.Parameter):
                with torch.no_grad():
                    self.amax.copy_(learned.reshape(self.amax.shape))
            else:
                self._set_amax(learned, allow_zero=True)
                if self._learn_requested:
                    self.init_learn_amax()
        if key in state_dict:
            value = state_dict[key].detach().to(device, torch.float32)
            current = self.amax
            if current is None:
                self.register_buffer("_amax", value.clone())
            elif value.shape != current.shape:
                # a calibrated value of another shape replaces this one, on this device
                if isinstance(current, nn.Parameter):
                    self._amax = nn.Parameter(value.clone())
                else:
                    self.register_buffer("_amax", value.clone())
        pqs_key = prefix + "_pre_quant_scale"
        if pqs_key in state_dict and self.pre_quant_scale is None:
            self.register_buffer("_pre_quant_scale",
                                 state_dict[pqs_key].detach().to(device, torch.float32).clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        for k in clip_keys:
            if k in unexpected_keys:
                unexpected_keys.remove(k)
        if from_clip and key in missing_keys:
            missing_keys.remove(key)

    # ------------------------------------------------------------------ forward
    def _get_amax(self, x: torch.Tensor) -> torch.Tensor:
        """The amax this input is quantized with: the stored one (shaped along ``axis``,
        times ``scale_amax``), or the dynamic max |x| when there is none."""
        amax = self.amax
        if amax is None:
            amax = self._dynamic_amax(x)
        else:
            if amax.device != x.device:
                amax = amax.to(x.device)
            if amax.dim() == 1 and amax.numel() > 1 and self._axis is not None:
                amax = self._along_axis(amax, x)
        if self._scale_amax is not None:
            amax = amax * self._scale_amax
        return amax

    def _dynamic_amax(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            raise QuantizerStateError(
                f"{self.name}: has no calibrated amax; ONNX export and TensorRT need one. "
                "Calibrate (enable_calib, run data, load_calib_amax) or set amax first")
        if not self._dynamic_warned:
            self._dynamic_warned = True
            warnings.warn(f"{self.name}: no amax; quantizing with the amax of each input "
                          "(dynamic). Calibrate before export", DynamicAmaxWarning,
                          stacklevel=4)
        if self._axis is None:
            return reduce_amax(x).float()
        keep = self._axis if isinstance(self._axis, tuple) else (self._axis,)
        keep = {a % x.dim() for a in keep}
        return reduce_amax(x, axis=tuple(i for i in range(x.dim()) if i not in keep)).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre_scale = self.pre_quant_scale
        if pre_scale is not None:
            x = x * pre_scale.to(device=x.device, dtype=x.dtype)
        if self._disabled:
            return x
        if self._if_calib:
            self._calibrator.collect(x)
        if not (self._if_quant or self._if_clip):
            return x
        amax = self._get_amax(x)
        if self._if_clip:
            x = clip_function(x, -amax, amax)
            if not self._if_quant:
                return x
            amax = amax.detach()  # the clip stage carries the amax gradient (PACT)
        if not self._fake_quant:
            q, scale = tensor_quant(x, amax, self._num_bits, self._unsigned, self._narrow_range)
            self._last_scale = scale
            return q
        if torch.onnx.is_in_onnx_export() or type(self).use_fb_fake_quant:
            return self._torch_fake_quant(x, amax)
        if self._fp8:  # the fused kernels are integer-only
            return fake_quant(x, amax, self._num_bits)
        fake = resolve_backend(self.backend, x)
        return fake(x, amax, self._num_bits, self._unsigned, self._narrow_range)

    def _along_axis(self, amax: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A flat per-channel amax (``QuantDescriptor(axis=0, amax=[...])``) shaped to
        broadcast along ``axis`` of ``x`` (calibrated amax already keeps that shape)."""
        axis = (self._axis if isinstance(self._axis, int) else self._axis[0]) % x.dim()
        if x.shape[axis] != amax.numel():
            raise QuantizerError(f"{self.name}: amax has {amax.numel()} values but axis "
                                 f"{axis} of the input has {x.shape[axis]}")
        return _channel_view(amax, x, axis)

    def _torch_fake_quant(self, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        """torch's own fake-quant ops, which the ONNX exporter maps to Q/DQ (opset 13)."""
        if self._fp8:
            axis = None if self._axis is None else (
                (self._axis if isinstance(self._axis, int) else self._axis[0]) % x.dim())
            return fp8_qdq_for_export(x, scale_from_amax(amax, self._num_bits), axis)
        if self._num_bits != 8:
            raise QuantizerError(f"{self.name}: ONNX Q/DQ needs 8 bits, got {self._num_bits}")
        qmin, qmax, _ = quant_bounds(8, self._unsigned, self._narrow_range)
        scale = scale_from_amax(amax, 8, self._unsigned, self._narrow_range)
        dtype = x.dtype
        xf = x.float() if dtype != torch.float32 else x
        if self._narrow_range:
            # The exporter accepts only the full int8 range: clip to -127 steps first
            # (an ONNX Clip), so the graph never produces -128 either.
            lowest = scale * qmin
            if self._axis is not None:
                lowest = _channel_view(lowest, x, self._axis)
            xf = torch.maximum(xf, lowest)
            qmin = -128
        if self._axis is None:
            zp = torch.zeros((), dtype=torch.int32, device=x.device)
            out = torch.fake_quantize_per_tensor_affine(xf, scale.reshape(()), zp, qmin, qmax)
        else:
            axis = self._axis if isinstance(self._axis, int) else self._axis[0]
            axis = axis % x.dim()
            zp = torch.zeros(scale.numel(), dtype=torch.int32, device=x.device)
            out = torch.fake_quantize_per_channel_affine(
                xf, scale.reshape(-1), zp, axis, qmin, qmax
            )
        return out.to(dtype) if dtype != torch.float32 else out

    # --------------------------------------------------------------------- repr
    def _amax_text(self) -> str:
        amax = self.amax
        if amax is None:
            return "amax=dynamic"
        amax = amax.detach()
        if amax.numel() == 1:
            return f"amax={float(amax):.4g}"
        return f"amax=[{amax.min().item():.4g}, {amax.max().item():.4g}]({amax.numel()})"

    def extra_repr(self) -> str:
        bits = ("fp8 e4m3" if self._fp8
                else f"{self._num_bits}bit{' unsigned' if self._unsigned else ''}")
        if self._narrow_range:
            bits += " narrow"
        axis = "per-tensor" if self._axis is None else f"axis={self._axis}"
        calib = type(self._calibrator).__name__ if self._calibrator is not None else "-"
        if self.calibrated_by is not None:
            calib += f"({self.calibrated_by})"
        extra = "".join([" learn_amax" if self._learn_amax else "",
                         f" *{self._scale_amax:g}" if self._scale_amax is not None else "",
                         " pre_quant_scale" if self.pre_quant_scale is not None else "",
                         " clip" if self._if_clip else "",
                         " real" if not self._fake_quant else ""])
        return f"{bits} {axis} {self._amax_text()} calib={calib} state={self.state()}{extra}"

    def __repr__(self) -> str:
        return f"TensorQuantizer({self.extra_repr()})"


class _ClipRange:
    """``quantizer.clip``: the learned range as pytorch-quantization's clip bounds."""

    def __init__(self, quantizer: TensorQuantizer) -> None:
        self._quantizer = quantizer

    @property
    def clip_value_max(self) -> torch.Tensor | None:
        return self._quantizer.amax

    @property
    def clip_value_min(self) -> torch.Tensor | None:
        amax = self._quantizer.amax
        return None if amax is None else -amax


def _channel_view(t: torch.Tensor, x: torch.Tensor, axis) -> torch.Tensor:
    """Reshape a per-channel tensor so it broadcasts along ``axis`` of ``x``."""
    axis = (axis if isinstance(axis, int) else axis[0]) % x.dim()
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _descriptor_amax(desc: QuantDescriptor, name: str) -> torch.Tensor:
    """A descriptor's fixed amax as a tensor: a scalar, or one value per channel of a
    single axis (shaped to that axis when the first input arrives); without an axis a
    list is used as it is, broadcast against the input (pytorch-quantization's rule)."""
    amax = torch.tensor(desc.amax, dtype=torch.float32)
    if amax.dim() == 1 and amax.numel() > 1 and desc.axis is not None:
        axes = desc.axis if isinstance(desc.axis, tuple) else (desc.axis,)
        if len(axes) != 1:
            raise QuantizerError(f"{name}: a list of {amax.numel()} amax values needs one "
                                 f"quantization axis, got axis={desc.axis}")
    return amax


def load_calib_amaxes(quantizers: Iterable[TensorQuantizer], method: str | None = None,
                      strict: bool = True, **kwargs) -> None:
    """``q.load_calib_amax(method, strict, **kwargs)`` for many quantizers, with one
    batched amax search for all their histogram calibrators (max calibrators give their
    max; ``method`` and ``kwargs`` apply to the histograms). Every request is checked before
    any amax changes."""
    quantizers = list(quantizers)
    for q in quantizers:
        if q.calibrator is None:
            raise QuantizerError(f"{q.name}: has no calibrator")
    hist = [q for q in quantizers
            if isinstance(q.calibrator, HistogramCalibrator) and not q._fp8]  # noqa: SLF001
    fp8 = [q for q in quantizers
           if isinstance(q.calibrator, HistogramCalibrator) and q._fp8]  # noqa: SLF001
    if not hist and not fp8 and (method not in (None, "max") or kwargs):
        asked = repr(method) if method not in (None, "max") else ", ".join(kwargs)
        raise QuantizerError(f"load_calib_amaxes({asked}): none of the quantizers has a "
                             "histogram calibrator (QuantDescriptor(calib_method='histogram'))")
    found = dict(zip(map(id, hist), compute_amaxes([q.calibrator for q in hist],
                                                   method or "entropy", **kwargs),
                     strict=True)) if hist else {}
    # FP8 searches the E4M3 grid, one quantizer at a time (its default method is mse)
    found.update({id(q): fp8_histogram_amax(q.calibrator, method or "mse", **kwargs)
                  for q in fp8})
    for q in quantizers:
        amax = found[id(q)] if id(q) in found else q.calibrator.compute_amax()
        q._store_calib_amax(amax, strict, q._search_name(method, kwargs))  # noqa: SLF001
