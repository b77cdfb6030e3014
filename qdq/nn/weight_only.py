"""Weight-only quantized layers: integer weights, float activations.

The ``quantize_dynamic`` workflow of torch.ao, exported as Q/DQ: each weight is held as
int8 codes and fp32 scales (:mod:`qdq.blockwise`) in a :class:`QuantizedWeight`, which
returns the dequantized float weight when called. The layer then runs in float on float
inputs. In ONNX the weight becomes an integer initializer feeding one DequantizeLinear
(no QuantizeLinear, no activation quantizer), so the file stores 1 byte (INT8) or half a
byte (INT4) per weight.

These are not subclasses of the float layers on purpose: BatchNorm folding and the quant
twin walkers must not mistake them for float layers whose ``weight`` they may rewrite.
``weight`` is a read-only property giving the dequantized weight.

Example::

    layer = WeightOnlyLinear.from_float(nn.Linear(256, 64), bits=4, block_size=128)
    y = layer(torch.randn(8, 256))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qdq.blockwise import MSE_CLIP_RATIOS, dequantize_weight, quantize_weight

__all__ = ["QuantizedWeight", "WeightOnlyLinear", "WeightOnlyConv1d", "WeightOnlyConv2d",
           "WeightOnlyConv3d", "WeightOnlyLSTM", "WEIGHT_ONLY_TWINS", "WeightOnlyLayer",
           "register_weight_only"]

#: float module class -> weight-only class
WEIGHT_ONLY_TWINS: dict[type[nn.Module], type[WeightOnlyLayer]] = {}

#: ONNX domain of the placeholder node the exporter writes for a quantized weight; the ONNX
#: side (``export``) turns it into a standard DequantizeLinear.
WEIGHT_DQ_DOMAIN = "qdq.weight_only"
WEIGHT_DQ_OP = "WeightDQ"


def register_weight_only(float_cls: type[nn.Module]):
    """Class decorator: the weight-only layer that replaces ``float_cls``."""

    def deco(cls: type[WeightOnlyLayer]) -> type[WeightOnlyLayer]:
        WEIGHT_ONLY_TWINS[float_cls] = cls
        cls._float_cls = float_cls
        return cls

    return deco


class _WeightDQ(torch.autograd.Function):
    """Dequantization that the TorchScript exporter writes as one placeholder node."""

    @staticmethod
    def forward(ctx, codes, scale, bits, block_size):
        return dequantize_weight(codes, scale, block_size or None)

    @staticmethod
    def symbolic(g, codes, scale, bits, block_size):
        out = g.op(f"{WEIGHT_DQ_DOMAIN}::{WEIGHT_DQ_OP}", codes, scale, bits_i=bits,
                   block_size_i=block_size)
        return out.setType(scale.type().with_dtype(torch.float32)
                           .with_sizes(codes.type().sizes()))


class QuantizedWeight(nn.Module):
    """One weight as int8 codes (buffer ``codes``) and fp32 scales (buffer ``scale``).

    Calling it returns the float weight ``codes * scale`` in the dtype the float layer had.
    4-bit codes are held one per int8 in memory; the ONNX file packs two per byte.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bits: int,
                 block_size: int | None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale.float())
        self.bits = int(bits)
        self.block_size = block_size
        self.dtype = dtype

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int, block_size: int | None = None,
                    amax_method: str = "max",
                    clip_ratios: tuple[float, ...] = MSE_CLIP_RATIOS) -> QuantizedWeight:
        codes, scale = quantize_weight(weight, bits, block_size, amax_method, clip_ratios)
        return cls(codes, scale, bits, block_size, weight.dtype)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def forward(self) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            w = _WeightDQ.apply(self.codes, self.scale, self.bits, self.block_size or 0)
        else:
            w = dequantize_weight(self.codes, self.scale, self.block_size)
        return w if self.dtype == torch.float32 else w.to(self.dtype)

    def extra_repr(self) -> str:
        how = "per channel" if self.block_size is None else f"block {self.block_size}"
        return f"int{self.bits} {how}, shape {tuple(self.codes.shape)}"


def _note_source(layer: nn.Module, float_layer: nn.Module | None) -> None:
    """A subclass of the float class (:mod:`qdq.layer_kinds`): qdq.save records it."""
    if float_layer is not None and type(float_layer) is not layer._float_cls:
        layer._from_cls = type(float_layer)


class WeightOnlyLayer(nn.Module):
    """Common part of the layers with one weight (``weight_q``) and an optional bias: the
    float class they replace and how they are built from one.

    ``method`` names how the codes were chosen (``"max"``, ``"mse"``, ``"awq"``,
    ``"gptq"``, ``"awq+gptq"``); it is a record for reports and checkpoints, the codes and
    scales alone define the layer. AWQ layers may hold ``input_scale``, one factor per
    input channel multiplied into the input first (exported as one ``Mul``): the
    ``1/s`` of activation-aware scaling where no preceding op could absorb it.
    """

    _float_cls: type[nn.Module]
    #: the input dimension ``input_scale`` applies to: -1 (last, Linear) or 1 (Conv)
    _input_channel_dim = -1

    def __init__(self, weight_q: QuantizedWeight, bias: nn.Parameter | None,
                 float_layer: nn.Module) -> None:
        super().__init__()
        self.weight_q = weight_q
        self.bias = bias
        self.method = "max"
        self.register_buffer("input_scale", None)
        _note_source(self, float_layer)

    @classmethod
    def from_quantized(cls, module: nn.Module, weight_q: QuantizedWeight, method: str,
                       input_scale: torch.Tensor | None = None) -> WeightOnlyLayer:
        """The layer for ``module`` with codes and scales chosen elsewhere (GPTQ, AWQ)."""
        layer = cls(weight_q, module.bias, module)
        layer.method = method
        layer.set_input_scale(input_scale)
        return layer

    def set_input_scale(self, scale: torch.Tensor | None) -> None:
        """Multiply the input by ``scale`` (one fp32 factor per input channel) first;
        ``None`` removes it."""
        if scale is None:
            self.input_scale = None
            return
        channels = self.weight_q.shape[1] * getattr(self, "groups", 1)
        if scale.dim() != 1 or scale.numel() != channels:
            raise ValueError(f"input_scale must have one value per input channel ({channels}),"
                             f" got shape {tuple(scale.shape)}")
        self.input_scale = scale.detach().float().to(self.weight_q.codes.device).clone()

    def _prescale(self, input: torch.Tensor) -> torch.Tensor:
        if self.input_scale is None:
            return input
        scale = self.input_scale.to(input.dtype)
        if self._input_channel_dim == 1:  # [C, 1, ..] broadcasts over (N,) C, spatial
            scale = scale.reshape(-1, *([1] * len(self.kernel_size)))
        return input * scale

    @classmethod
    def weights_of(cls, module: nn.Module) -> dict[str, torch.Tensor]:
        """The float layer's weights that get quantized, by attribute name."""
        return {"weight": module.weight}

    @classmethod
    def from_float(cls, module: nn.Module, bits: int = 8, block_size: int | None = None,
                   amax_method: str = "max",
                   clip_ratios: tuple[float, ...] = MSE_CLIP_RATIOS) -> WeightOnlyLayer:
        weight_q = QuantizedWeight.from_weight(module.weight, bits, block_size, amax_method,
                                               clip_ratios)
        layer = cls(weight_q, module.bias, module)
        layer.method = amax_method
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (read only)."""
        return self.weight_q()


@register_weight_only(nn.Linear)
class WeightOnlyLinear(WeightOnlyLayer):
    def __init__(self, weight_q: QuantizedWeight, bias: nn.Parameter | None,
                 float_layer: nn.Module | None = None) -> None:
        super().__init__(weight_q, bias, float_layer)
        self.out_features, self.in_features = weight_q.shape

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(self._prescale(input), self.weight_q(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
               "groups", "padding_mode", "_reversed_padding_repeated_twice")


class _WeightOnlyConvNd(WeightOnlyLayer):
    _dims: int
    _input_channel_dim = 1

    def __init__(self, weight_q: QuantizedWeight, bias: nn.Parameter | None,
                 float_layer: nn.Module) -> None:
        super().__init__(weight_q, bias, float_layer)
        for attr in _CONV_ATTRS:
            setattr(self, attr, getattr(float_layer, attr))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        conv = _CONV_FN[self._dims]
        input = self._prescale(input)
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return conv(input, self.weight_q(), self.bias, self.stride, padding, self.dilation,
                    self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}")


@register_weight_only(nn.Conv1d)
class WeightOnlyConv1d(_WeightOnlyConvNd):
    _dims = 1


@register_weight_only(nn.Conv2d)
class WeightOnlyConv2d(_WeightOnlyConvNd):
    _dims = 2


@register_weight_only(nn.Conv3d)
class WeightOnlyConv3d(_WeightOnlyConvNd):
    _dims = 3


@register_weight_only(nn.LSTM)
class WeightOnlyLSTM(WeightOnlyLayer):
    """``nn.LSTM`` with quantized ``weight_ih_l*`` / ``weight_hh_l*`` (biases stay float).

    Runs torch's own LSTM kernel on the dequantized weights, so the ONNX graph keeps one
    LSTM node. Tensor inputs only (no PackedSequence), no ``proj_size``.
    """

    _CONFIG = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
               "bidirectional")

    def __init__(self, lstm: nn.LSTM, weights: dict[str, QuantizedWeight]) -> None:
        nn.Module.__init__(self)
        self.method = "max"
        _note_source(self, lstm)
        for attr in self._CONFIG:
            setattr(self, attr, getattr(lstm, attr))
        self._flat_names = list(lstm._flat_weights_names)
        self.weights = nn.ModuleDict(weights)
        for name in self._flat_names:
            if name not in weights:
                setattr(self, name, getattr(lstm, name))

    @classmethod
    def weights_of(cls, module: nn.Module) -> dict[str, torch.Tensor]:
        return {name: getattr(module, name) for name in module._flat_weights_names
                if name.startswith("weight_")}

    @classmethod
    def from_float(cls, module, bits=8, block_size=None, amax_method="max",
                   clip_ratios=MSE_CLIP_RATIOS):
        if getattr(module, "proj_size", 0):
            raise ValueError("weight-only LSTM does not support proj_size")
        weights = {name: QuantizedWeight.from_weight(w, bits, block_size, amax_method,
                                                     clip_ratios)
                   for name, w in cls.weights_of(module).items()}
        layer = cls(module, weights)
        layer.method = amax_method
        return layer

    def _flat_weights(self) -> list[torch.Tensor]:
        return [self.weights[n]() if n in self.weights else getattr(self, n)
                for n in self._flat_names]

    def forward(self, input, hx=None):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"WeightOnlyLSTM takes a tensor input, got {type(input).__name__}")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
        directions = 2 if self.bidirectional else 1
        if hx is None:
            zeros = input.new_zeros(self.num_layers * directions, input.shape[batch_dim],
                                    self.hidden_size)
            hx = (zeros, zeros)
        elif not batched:
            hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        out, h, c = torch.lstm(input, hx, self._flat_weights(), self.bias, self.num_layers,
                               float(self.dropout), self.training, self.bidirectional,
                               self.batch_first)
        if not batched:
            return out.squeeze(batch_dim), (h.squeeze(1), c.squeeze(1))
        return out, (h, c)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"batch_first={self.batch_first}, bidirectional={self.bidirectional}")
