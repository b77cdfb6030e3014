"""Quant twins of LSTM and LSTMCell, in pytorch-quantization's quantizer layout.

An int8 LSTM step runs one GEMM on fused operands, ``[x_t, h_{t-1}] @ [W_ih, W_hh]^T``,
so each layer and direction owns two quantizers, exactly as pytorch-quantization has
them (its checkpoints load, its numbers are ours):

* an input quantizer on ``cat(x_t, h_{t-1}, dim=1)`` at every time step (per tensor by
  default: one amax, shape ``()``, shared by the input and the hidden state);
* a weight quantizer on ``cat(weight_ih, weight_hh, dim=1)`` (per gate row by default:
  amax shape ``(4 * hidden_size, 1)``). Biases stay float.

``QuantLSTMCell`` holds them as ``_input_quantizer`` / ``_weight_quantizer``. ``QuantLSTM``
holds the ModuleLists ``_input_quantizers`` / ``_weight_quantizers``, one entry per layer and
direction at index ``layer * num_directions + direction`` (state_dict keys
``_input_quantizers.0._amax``, ...); its ``_input_quantizer`` / ``_weight_quantizer`` are
:class:`QuantizerGroup` views, so ``lstm._input_quantizer.disable()`` reaches every layer.

cuDNN's and oneDNN's fused LSTMs cannot take fake-quantized operands, so the twins run the
recurrence themselves, in the order of torch's native CPU kernel (bit for bit equal to it
with oneDNN off). Where every quantizer passes its input through (off, or neither
quantizing nor calibrating) they call torch's own forward, so a disabled twin is
``nn.LSTM`` / ``nn.LSTMCell`` exactly. ``batch_first``, ``bidirectional``, stacked layers,
inter-layer dropout, unbatched input and ``PackedSequence`` (sorted or not) behave as in
torch. ``proj_size`` is not supported.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from qdq.descriptor import QuantDescriptor
from qdq.nn.mixin import QuantMixin, _check_desc
from qdq.nn.registry import register_quant_twin
from qdq.quantizer import TensorQuantizer

__all__ = ["QuantLSTM", "QuantLSTMCell", "QuantizerGroup", "quant_lstm_cell", "LSTM", "LSTMCell"]

_State = tuple[torch.Tensor, torch.Tensor]


class QuantizerGroup:
    """Several quantizers behind the one name that other quant layers use.

    pytorch-quantization's QuantLSTM only has the per-layer lists, but scripts address
    every quant layer as ``m._input_quantizer``; here that reaches all layers and
    directions. A method call runs on every member (returning ``None``, or the list of
    results when there are any); reading an attribute gives the members' common value and
    raises ``ValueError`` where they differ (index the group then); assigning an attribute
    sets it on every member. It is a view, not a module: ``state_dict`` and
    ``named_modules`` see the members at their list paths only.
    """

    __slots__ = ("_members",)

    def __init__(self, members: Sequence[TensorQuantizer]) -> None:
        object.__setattr__(self, "_members", tuple(members))

    def __iter__(self) -> Iterator[TensorQuantizer]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __getitem__(self, index: int) -> TensorQuantizer:
        return self._members[index]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        values = [getattr(q, name) for q in self._members]
        if values and all(inspect.ismethod(v) for v in values):
            def fan_out(*args: Any, **kwargs: Any) -> Any:
                results = [v(*args, **kwargs) for v in values]
                return None if all(r is None for r in results) else results
            fan_out.__name__ = name
            return fan_out
        first = values[0]
        if all(_same(first, v) for v in values[1:]):
            return first
        raise ValueError(f"'{name}' differs between the {len(values)} quantizers of this "
                         "group; index it (group[i]) or the module's quantizer list")

    def __setattr__(self, name: str, value: Any) -> None:
        for q in self._members:
            setattr(q, name, value)

    def __repr__(self) -> str:
        inner = "\n".join(f"  ({i}): {q!r}" for i, q in enumerate(self._members))
        return f"QuantizerGroup(\n{inner}\n)"


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and bool(torch.equal(a.detach().cpu(), b.detach().cpu())))
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def _passes_through(q: TensorQuantizer | None) -> bool:
    """True where ``q`` returns its input untouched: off, or neither quantizing,
    calibrating nor clipping, and no pre-quantization scale (which applies even when off)."""
    if q is None:
        return True
    if getattr(q, "pre_quant_scale", None) is not None:
        return False
    return not (q.is_quant_enabled or q.is_calib_enabled
                or (q.is_enabled and getattr(q, "_if_clip", False)))


def _elementwise(q: TensorQuantizer | None) -> bool:
    """True where ``q`` acts on each element alone with one fixed range, so quantizing
    ``x`` and ``h`` apart equals quantizing ``cat(x, h)``. Not so while calibrating (the
    calibrator must see every step's fused tensor), with a dynamic amax (taken over the
    fused tensor), per-channel amax or a pre-quantization scale (both span its columns)."""
    if _passes_through(q):
        return True
    if q.is_calib_enabled or getattr(q, "pre_quant_scale", None) is not None:
        return False
    amax = q.amax
    return amax is not None and amax.numel() == 1


def _gates_to_state(gates: torch.Tensor, c: torch.Tensor) -> _State:
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _quantized_weights(weight_quantizer: TensorQuantizer | None, w_ih: torch.Tensor,
                       w_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w_ih`` and ``w_hh`` quantized as one ``cat(w_ih, w_hh, dim=1)`` (one amax per gate
    row covers both halves, as pytorch-quantization computes it)."""
    if _passes_through(weight_quantizer):
        return w_ih, w_hh
    w = weight_quantizer(torch.cat([w_ih, w_hh], dim=1))
    return w[:, :w_ih.shape[1]], w[:, w_ih.shape[1]:]


def _quantized_operands(input_quantizer: TensorQuantizer | None, x: torch.Tensor,
                        h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``h`` quantized as one ``cat(x, h, dim=1)``."""
    if _passes_through(input_quantizer):
        return x, h
    xh = input_quantizer(torch.cat([x, h], dim=1))
    return xh[:, :x.shape[1]], xh[:, x.shape[1]:]


def quant_lstm_cell(input: torch.Tensor, hx: _State, w_ih: torch.Tensor, w_hh: torch.Tensor,
                    b_ih: torch.Tensor | None = None, b_hh: torch.Tensor | None = None,
                    input_quantizer: TensorQuantizer | None = None,
                    weight_quantizer: TensorQuantizer | None = None) -> _State:
    """One LSTM step on batched ``input`` ``(batch, in)`` with ``hx = (h, c)``:
    ``input_quantizer`` reads ``cat(input, h)``, ``weight_quantizer`` ``cat(w_ih, w_hh)``,
    biases stay float. Returns ``(h', c')``.

    The gates are summed as torch's own cell sums them (``W_hh h + b_hh + W_ih x + b_ih``),
    so with the quantizers off the result is torch's to the last bit or nearly so."""
    x, h = _quantized_operands(input_quantizer, input, hx[0])
    w_ih, w_hh = _quantized_weights(weight_quantizer, w_ih, w_hh)
    return _gates_to_state(F.linear(h, w_hh, b_hh) + F.linear(x, w_ih, b_ih), hx[1])


def _run_direction(data: torch.Tensor, batch_sizes: Sequence[int], hx: _State,
                   weights: Sequence[torch.Tensor | None], input_quantizer: TensorQuantizer,
                   weight_quantizer: TensorQuantizer, reverse: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer, one direction over time-major flat ``data``: step ``t`` is the next
    ``batch_sizes[t]`` rows (a PackedSequence's layout; a padded batch has every size
    equal). Rows past a step's size are sequences that have ended (forward) or not yet
    started (reverse) and keep their state. Returns ``(outputs, h_n, c_n)``."""
    w_ih, w_hh, b_ih, b_hh = weights
    w_ih, w_hh = _quantized_weights(weight_quantizer, w_ih, w_hh)  # once, not every step
    h, c = hx
    offsets = [0]
    for size in batch_sizes[:-1]:
        offsets.append(offsets[-1] + size)
    # Where quantizing x and h apart gives the fused numbers, every step's input
    # projection is one GEMM (torch's CPU LSTM does the same).
    projected = F.linear(input_quantizer(data), w_ih, b_ih) if _elementwise(
        input_quantizer) else None
    outputs: list[torch.Tensor | None] = [None] * len(batch_sizes)
    steps = range(len(batch_sizes) - 1, -1, -1) if reverse else range(len(batch_sizes))
    for t in steps:
        size, start = batch_sizes[t], offsets[t]
        h_t, c_t = (h, c) if size == h.shape[0] else (h[:size], c[:size])
        if projected is not None:
            x_proj = projected[start:start + size]
            h_q = input_quantizer(h_t)
        else:
            x_q, h_q = _quantized_operands(input_quantizer, data[start:start + size], h_t)
            x_proj = F.linear(x_q, w_ih, b_ih)
        h_t, c_t = _gates_to_state(F.linear(h_q, w_hh, b_hh) + x_proj, c_t)
        outputs[t] = h_t
        if size == h.shape[0]:
            h, c = h_t, c_t
        else:
            h, c = torch.cat([h_t, h[size:]]), torch.cat([c_t, c[size:]])
    return torch.cat(outputs), h, c


@register_quant_twin(nn.LSTMCell)
class QuantLSTMCell(QuantMixin, nn.LSTMCell):
    """``nn.LSTMCell`` with ``_input_quantizer`` on ``cat(input, h)`` and
    ``_weight_quantizer`` on ``cat(weight_ih, weight_hh)``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *,
                 quant_desc_input: QuantDescriptor | None = None,
                 quant_desc_weight: QuantDescriptor | None = None, **kwargs: Any) -> None:
        super().__init__(input_size, hidden_size, bias, **kwargs)
        self.init_quantizer(quant_desc_input, quant_desc_weight)

    def forward(self, input: torch.Tensor, hx: _State | None = None) -> _State:
        if input.dim() not in (1, 2):
            raise ValueError(f"QuantLSTMCell: Expected input to be 1D or 2D, got "
                             f"{input.dim()}D instead")
        if hx is not None and any(v.dim() != input.dim() for v in hx):
            raise ValueError(f"QuantLSTMCell: Expected hx and cx to be {input.dim()}D like "
                             f"the input, got {[v.dim() for v in hx]}")
        if _passes_through(self._input_quantizer) and _passes_through(self._weight_quantizer):
            return nn.LSTMCell.forward(self, input, hx)  # torch's own kernel, bit for bit
        unbatched = input.dim() == 1
        if unbatched:
            input = input.unsqueeze(0)
            hx = None if hx is None else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        if input.shape[1] != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.shape[1]}, "
                               f"expected {self.input_size}")
        if hx is None:
            zeros = input.new_zeros(input.shape[0], self.hidden_size)
            hx = (zeros, zeros)
        for label, v in zip(("[0]", "[1]"), hx, strict=True):
            if v.shape != (input.shape[0], self.hidden_size):
                raise RuntimeError(f"hidden{label} has shape {tuple(v.shape)}, expected "
                                   f"{(input.shape[0], self.hidden_size)}")
        h, c = quant_lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih,
                               self.bias_hh, self._input_quantizer, self._weight_quantizer)
        return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)


@register_quant_twin(nn.LSTM)
class QuantLSTM(QuantMixin, nn.LSTM):
    """``nn.LSTM`` with per layer and direction ``_input_quantizers[i]`` on
    ``cat(x_t, h_{t-1})`` and ``_weight_quantizers[i]`` on ``cat(weight_ih, weight_hh)``,
    ``i = layer * num_directions + direction``."""

    def __init__(self, *args: Any, quant_desc_input: QuantDescriptor | None = None,
                 quant_desc_weight: QuantDescriptor | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.init_quantizer(quant_desc_input, quant_desc_weight)

    def init_quantizer(self, quant_desc_input: QuantDescriptor | None = None,
                       quant_desc_weight: QuantDescriptor | None = None) -> None:
        if self.proj_size:
            raise ValueError("QuantLSTM does not support proj_size")
        d_in = _check_desc(quant_desc_input if quant_desc_input is not None
                           else self.default_quant_desc_input, "quant_desc_input", type(self))
        d_w = _check_desc(quant_desc_weight if quant_desc_weight is not None
                          else self.default_quant_desc_weight, "quant_desc_weight", type(self))
        count = self.num_layers * self._directions
        self._input_quantizers = nn.ModuleList(TensorQuantizer(d_in) for _ in range(count))
        self._weight_quantizers = nn.ModuleList(TensorQuantizer(d_w) for _ in range(count))

    @property
    def _directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def _input_quantizer(self) -> QuantizerGroup:
        return QuantizerGroup(list(self._input_quantizers))

    @property
    def _weight_quantizer(self) -> QuantizerGroup:
        return QuantizerGroup(list(self._weight_quantizers))

    def _weights(self, layer: int, reverse: bool) -> list[torch.Tensor | None]:
        suffix = f"_l{layer}{'_reverse' if reverse else ''}"
        return [getattr(self, f"{kind}{suffix}") if self.bias or kind.startswith("weight")
                else None for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def forward(self, input: torch.Tensor | PackedSequence, hx: _State | None = None
                ) -> tuple[torch.Tensor | PackedSequence, _State]:
        if all(map(_passes_through, (*self._input_quantizers, *self._weight_quantizers))):
            # torch's own kernel (oneDNN / cuDNN), bit for bit and faster
            return nn.LSTM.forward(self, input, hx)
        packed = isinstance(input, PackedSequence)
        if packed:
            data, sizes_t, sorted_indices, unsorted_indices = input
            batch_sizes = sizes_t.tolist()
            batch, unbatched = batch_sizes[0], False
        else:
            sizes_t = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                raise ValueError(f"QuantLSTM: Expected input to be 2D or 3D, got "
                                 f"{input.dim()}D instead")
            unbatched = input.dim() == 2
            if unbatched:  # as torch: a batch of one along the batch dimension
                input = input.unsqueeze(0 if self.batch_first else 1)
            x = input.transpose(0, 1) if self.batch_first else input
            steps, batch = x.shape[0], x.shape[1]
            batch_sizes = [batch] * steps
            data = x.reshape(steps * batch, x.shape[2])
        if hx is None:
            zeros = data.new_zeros(self.num_layers * self._directions, batch, self.hidden_size)
            hx = (zeros, zeros)
        else:
            if unbatched:
                if hx[0].dim() != 2 or hx[1].dim() != 2:
                    raise RuntimeError("For unbatched 2-D input, hx and cx should also be 2-D "
                                       f"but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            elif hx[0].dim() != 3 or hx[1].dim() != 3:
                raise RuntimeError("For batched 3-D input, hx and cx should also be 3-D "
                                   f"but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            if sorted_indices is not None:
                hx = (hx[0].index_select(1, sorted_indices),
                      hx[1].index_select(1, sorted_indices))
        self.check_forward_args(data if packed else input, hx, sizes_t)

        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for d in range(self._directions):
                idx = layer * self._directions + d
                out, h, c = _run_direction(
                    data, batch_sizes, (hx[0][idx], hx[1][idx]), self._weights(layer, d == 1),
                    self._input_quantizers[idx], self._weight_quantizers[idx], reverse=d == 1)
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            data = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                data = F.dropout(data, self.dropout, training=True)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)

        if packed:
            if unsorted_indices is not None:
                h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1,
                                                                                   unsorted_indices)
            return PackedSequence(data, sizes_t, sorted_indices, unsorted_indices), (h_n, c_n)
        out = data.reshape(len(batch_sizes), batch, data.shape[1])
        if unbatched:
            return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (out.transpose(0, 1) if self.batch_first else out), (h_n, c_n)


# pytorch-quantization's short spellings (its quant_rnn module has them too)
LSTM, LSTMCell = QuantLSTM, QuantLSTMCell
