"""Quant twins of LSTM and LSTMCell, written as explicit recurrences.

cuDNN's fused LSTM cannot take fake-quantized operands, so the twins compute the gates
themselves: ``gates = Wih_q x_q + b_ih + Whh_q h_q + b_hh``. Every layer and direction owns
four quantizers: input ``x`` and hidden state ``h`` (per tensor), ``weight_ih`` and
``weight_hh`` (per gate row, axis 0). With all quantizers off the result equals
``nn.LSTM`` to float rounding. ``proj_size`` is not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qdq.descriptor import QuantDescriptor
from qdq.nn.mixin import QuantMixin
from qdq.nn.registry import register_quant_twin
from qdq.quantizer import TensorQuantizer

__all__ = ["QuantLSTM", "QuantLSTMCell"]


def _lstm_step(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class _RNNQuantizers(QuantMixin):
    """Builds the four quantizer lists of a recurrent layer from two descriptors."""

    def _build_rnn_quantizers(self, count: int, quant_desc_input: QuantDescriptor | None,
                              quant_desc_weight: QuantDescriptor | None) -> None:
        d_in = quant_desc_input if quant_desc_input is not None else self.default_quant_desc_input
        d_w = (quant_desc_weight if quant_desc_weight is not None
               else self.default_quant_desc_weight)
        self._input_quantizers = nn.ModuleList(TensorQuantizer(d_in) for _ in range(count))
        self._hidden_quantizers = nn.ModuleList(TensorQuantizer(d_in) for _ in range(count))
        self._weight_ih_quantizers = nn.ModuleList(TensorQuantizer(d_w) for _ in range(count))
        self._weight_hh_quantizers = nn.ModuleList(TensorQuantizer(d_w) for _ in range(count))

    # the mixin's single-quantizer names point at the first layer's quantizers
    @property
    def _input_quantizer(self) -> TensorQuantizer:
        return self._input_quantizers[0]

    @property
    def _weight_quantizer(self) -> TensorQuantizer:
        return self._weight_ih_quantizers[0]

    @property
    def input_quantizer(self) -> TensorQuantizer:
        return self._input_quantizers[0]

    @property
    def weight_quantizer(self) -> TensorQuantizer:
        return self._weight_ih_quantizers[0]


@register_quant_twin(nn.LSTMCell)
class QuantLSTMCell(_RNNQuantizers, nn.LSTMCell):
    def __init__(self, *args, quant_desc_input=None, quant_desc_weight=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_quantizer(quant_desc_input, quant_desc_weight)

    def init_quantizer(self, quant_desc_input=None, quant_desc_weight=None) -> None:
        self._build_rnn_quantizers(1, quant_desc_input, quant_desc_weight)

    def forward(self, input, hx=None):
        unbatched = input.dim() == 1
        if unbatched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = input.new_zeros(input.shape[0], self.hidden_size)
            hx = (zeros, zeros)
        elif unbatched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        gates = F.linear(self._input_quantizers[0](input),
                         self._weight_ih_quantizers[0](self.weight_ih), self.bias_ih)
        gates = gates + F.linear(self._hidden_quantizers[0](hx[0]),
                                 self._weight_hh_quantizers[0](self.weight_hh), self.bias_hh)
        h, c = _lstm_step(gates, hx[1])
        return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)


@register_quant_twin(nn.LSTM)
class QuantLSTM(_RNNQuantizers, nn.LSTM):
    def __init__(self, *args, quant_desc_input=None, quant_desc_weight=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.proj_size:
            raise ValueError("QuantLSTM does not support proj_size")
        self.init_quantizer(quant_desc_input, quant_desc_weight)

    def init_quantizer(self, quant_desc_input=None, quant_desc_weight=None) -> None:
        if self.proj_size:
            raise ValueError("QuantLSTM does not support proj_size")
        directions = 2 if self.bidirectional else 1
        self._build_rnn_quantizers(self.num_layers * directions, quant_desc_input,
                                   quant_desc_weight)

    def _param(self, kind: str, layer: int, reverse: bool):
        name = f"{kind}_l{layer}{'_reverse' if reverse else ''}"
        return getattr(self, name) if self.bias or not name.startswith("bias") else None

    def forward(self, input, hx=None):
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else (
            input.transpose(0, 1) if self.batch_first else input)
        steps, batch = x.shape[0], x.shape[1]
        directions = 2 if self.bidirectional else 1
        if hx is None:
            zeros = x.new_zeros(self.num_layers * directions, batch, self.hidden_size)
            hx = (zeros, zeros)
        elif unbatched:
            hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        h_n, c_n = [], []
        layer_in = x
        for layer in range(self.num_layers):
            outputs = []
            for d in range(directions):
                idx = layer * directions + d
                reverse = d == 1
                w_ih = self._weight_ih_quantizers[idx](self._param("weight_ih", layer, reverse))
                w_hh = self._weight_hh_quantizers[idx](self._param("weight_hh", layer, reverse))
                b_hh = self._param("bias_hh", layer, reverse)
                # the input projection of every time step at once
                x_gates = F.linear(self._input_quantizers[idx](layer_in), w_ih,
                                   self._param("bias_ih", layer, reverse))
                h, c = hx[0][idx], hx[1][idx]
                out = [None] * steps
                for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
                    gates = x_gates[t] + F.linear(self._hidden_quantizers[idx](h), w_hh, b_hh)
                    h, c = _lstm_step(gates, c)
                    out[t] = h
                outputs.append(torch.stack(out))
                h_n.append(h)
                c_n.append(c)
            layer_in = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, training=True)
        out = layer_in
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if unbatched:
            return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (out.transpose(0, 1) if self.batch_first else out), (h_n, c_n)
