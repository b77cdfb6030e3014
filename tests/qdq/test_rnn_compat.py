"""QuantLSTM / QuantLSTMCell in pytorch-quantization's layout: one quantizer on
``cat(x_t, h_{t-1})`` and one on ``cat(weight_ih, weight_hh)`` per layer and direction."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import qdq
from qdq import QuantDescriptor, quantizers
from qdq.nn import QUANT_TWINS
from qdq.nn.rnn import QuantizerGroup, QuantLSTM, QuantLSTMCell
from qdq.quantizer import TensorQuantizer
from qdq.tensor_quant import fake_quant

dynamic_ok = pytest.mark.filterwarnings("ignore:.*no amax")


def _calibrate(module: nn.Module, *inputs) -> None:
    for _, q in quantizers(module):
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        module(*inputs)
    for _, q in quantizers(module):
        q.load_calib_amax()
        q.enable_quant()
        q.disable_calib()


def _calibrating(module: nn.Module) -> None:
    """Quantizers that collect but do not quantize: the twin runs its own recurrence and
    its numbers must be torch's."""
    for _, q in quantizers(module):
        q.disable_quant()
        q.enable_calib()


def _native(ref: nn.Module, *args):
    """torch's native CPU kernel (oneDNN off), whose summation order ours follows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TF32")
        with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
            return ref(*args)


def _fused_fq(a: torch.Tensor, b: torch.Tensor, amax) -> tuple[torch.Tensor, torch.Tensor]:
    """``cat(a, b, 1)`` fake-quantized with one amax, split back."""
    q = fake_quant(torch.cat([a, b], 1), amax, 8)
    return q[:, :a.shape[1]], q[:, a.shape[1]:]


def _reference_layer(x, h, c, w_ih, w_hh, b_ih, b_hh, in_amax, w_amax):
    """One forward layer by hand: torch's LSTMCell on operands quantized as pq fuses them;
    ``in_amax=None`` is the dynamic amax of each step's fused tensor."""
    wq_ih, wq_hh = _fused_fq(w_ih, w_hh, w_amax)
    cell = nn.LSTMCell(w_ih.shape[1], w_hh.shape[1], bias=b_ih is not None)
    with torch.no_grad():
        cell.weight_ih.copy_(wq_ih)
        cell.weight_hh.copy_(wq_hh)
        if b_ih is not None:
            cell.bias_ih.copy_(b_ih)
            cell.bias_hh.copy_(b_hh)
        outs = []
        for x_t in x:
            amax = in_amax if in_amax is not None else torch.cat([x_t, h], 1).abs().max()
            xq, hq = _fused_fq(x_t, h, amax)
            h, c = cell(xq, (hq, c))
            outs.append(h)
    return torch.stack(outs), h, c


# ------------------------------------------------------------------------ layout
def test_lstm_quantizers_are_one_input_and_one_weight_per_layer_and_direction():
    m = QuantLSTM(5, 6, num_layers=2, bidirectional=True)
    names = {n for n, mod in m.named_modules() if isinstance(mod, TensorQuantizer)}
    assert names == {f"_{role}_quantizers.{i}" for role in ("input", "weight") for i in range(4)}
    assert all(q.axis is None for q in m._input_quantizers)
    assert all(q.axis == 0 for q in m._weight_quantizers)
    # amax unknown: the state_dict is nn.LSTM's, so float checkpoints load both ways
    float_keys = set(nn.LSTM(5, 6, num_layers=2, bidirectional=True).state_dict())
    assert set(m.state_dict()) == float_keys

    x = torch.randn(3, 2, 5)
    _calibrate(m, x)
    state = m.state_dict()
    assert set(state) - float_keys == {
        f"_{role}_quantizers.{i}._amax" for role in ("input", "weight") for i in range(4)}
    for i, suffix in enumerate(["_l0", "_l0_reverse", "_l1", "_l1_reverse"]):
        assert state[f"_input_quantizers.{i}._amax"].shape == ()
        fused = torch.cat([state[f"weight_ih{suffix}"], state[f"weight_hh{suffix}"]], 1)
        assert torch.equal(state[f"_weight_quantizers.{i}._amax"],
                           fused.abs().amax(1, keepdim=True))  # (4 * hidden, 1)


def test_cell_state_dict_keys_and_amax_shapes():
    cell = QuantLSTMCell(4, 3)
    assert set(cell.state_dict()) == set(nn.LSTMCell(4, 3).state_dict())
    x, h = torch.randn(5, 4), torch.randn(5, 3)
    _calibrate(cell, x, (h, torch.randn(5, 3)))
    state = cell.state_dict()
    assert torch.equal(state["_input_quantizer._amax"], torch.cat([x, h], 1).abs().max())
    fused = torch.cat([cell.weight_ih, cell.weight_hh], 1).detach()
    assert torch.equal(state["_weight_quantizer._amax"], fused.abs().amax(1, keepdim=True))
    assert not hasattr(cell, "_input_quantizers")


def test_pq_layout_checkpoint_loads_strictly_and_quantizes_as_recorded():
    torch.manual_seed(0)
    ref = nn.LSTM(4, 3, num_layers=2)
    state = dict(ref.state_dict())
    in_amax = [torch.tensor(2.5), torch.tensor(0.8)]
    w_amax = []
    for i in range(2):
        fused = torch.cat([state[f"weight_ih_l{i}"], state[f"weight_hh_l{i}"]], 1)
        w_amax.append(fused.abs().amax(1, keepdim=True) * 0.9)  # clips a little
        state[f"_input_quantizers.{i}._amax"] = in_amax[i]
        state[f"_weight_quantizers.{i}._amax"] = w_amax[i]
    m = QuantLSTM(4, 3, num_layers=2)
    m.load_state_dict(state)  # strict
    for i in range(2):
        assert torch.equal(m._input_quantizers[i].amax, in_amax[i])
        assert torch.equal(m._weight_quantizers[i].amax, w_amax[i])

    x = torch.randn(6, 2, 4)
    with torch.no_grad():
        out, (h_n, c_n) = m(x)
    layer_in = x
    for i in range(2):
        zeros = torch.zeros(2, 3)
        layer_in, h, c = _reference_layer(
            layer_in, zeros, zeros, state[f"weight_ih_l{i}"], state[f"weight_hh_l{i}"],
            state[f"bias_ih_l{i}"], state[f"bias_hh_l{i}"], in_amax[i], w_amax[i])
        torch.testing.assert_close(h_n[i], h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c_n[i], c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, layer_in, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, ref(x)[0], atol=1e-4)  # it did quantize


@dynamic_ok
def test_without_amax_each_step_uses_the_max_of_the_fused_operands():
    torch.manual_seed(1)
    m = QuantLSTM(5, 4, bias=False)
    x, h0, c0 = torch.randn(4, 3, 5), torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    with torch.no_grad():
        out, (h_n, c_n) = m(x, (h0, c0))
    w_ih, w_hh = m.weight_ih_l0.detach(), m.weight_hh_l0.detach()
    w_amax = torch.cat([w_ih, w_hh], 1).abs().amax(1, keepdim=True)
    expected, h, c = _reference_layer(x, h0[0], c0[0], w_ih, w_hh, None, None, None, w_amax)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_n[0], h, rtol=1e-5, atol=1e-6)
    assert "_input_quantizers.0._amax" not in m.state_dict()  # dynamic stores nothing


@dynamic_ok
def test_cell_quantizes_the_fused_operands():
    torch.manual_seed(2)
    cell = QuantLSTMCell(6, 5, quant_desc_weight=QuantDescriptor(num_bits=8, axis=1))
    x, h, c = torch.randn(4, 6), torch.randn(4, 5), torch.randn(4, 5)
    with torch.no_grad():
        h1, c1 = cell(x, (h, c))
    w_ih, w_hh = cell.weight_ih.detach(), cell.weight_hh.detach()
    w_amax = torch.cat([w_ih, w_hh], 1).abs().amax(0, keepdim=True)  # axis 1: per column
    expected = _reference_layer(x[None], h, c, w_ih, w_hh, cell.bias_ih.detach(),
                                cell.bias_hh.detach(), None, w_amax)
    torch.testing.assert_close(h1, expected[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c1, expected[2], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ disabling
def test_disabling_the_single_names_reaches_every_layer():
    torch.manual_seed(3)
    ref = nn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True)
    m = QuantLSTM.from_float(ref)
    x = torch.randn(2, 4, 5)
    _calibrate(m, x)
    group = m._input_quantizer
    assert isinstance(group, QuantizerGroup) and m.input_quantizer[3] is m._input_quantizers[3]
    assert len(group) == 4 and list(m._weight_quantizer) == list(m._weight_quantizers)
    assert group.num_bits == 8 and group.is_enabled
    with pytest.raises(ValueError, match="differs"):
        _ = group.amax  # one per layer: index the list
    group.placed_by = "test"
    assert {q.placed_by for q in m._input_quantizers} == {"test"}

    m._input_quantizer.disable()
    assert not any(q.is_enabled for q in m._input_quantizers)
    assert all(q.is_enabled for q in m._weight_quantizers)
    m._weight_quantizer.disable()
    with torch.no_grad():
        for a, b in zip(m(x), ref(x), strict=True):
            a, b = (a, b) if isinstance(a, torch.Tensor) else (torch.stack(a), torch.stack(b))
            assert torch.equal(a, b)  # torch's own kernel when nothing quantizes
    m._input_quantizer.enable()
    assert all(q.is_enabled for q in m._input_quantizers)


def test_disabled_cell_equals_torch_batched_and_unbatched():
    torch.manual_seed(4)
    ref = nn.LSTMCell(3, 4)
    cell = QuantLSTMCell.from_float(ref)
    cell._input_quantizer.disable()
    cell._weight_quantizer.disable()
    x, hx = torch.randn(2, 3), (torch.randn(2, 4), torch.randn(2, 4))
    for a, b in zip(cell(x, hx), ref(x, hx), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(cell(x[0]), ref(x[0]), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------- the recurrence itself
@pytest.mark.parametrize("bias, batch_first, bidirectional, layers", [
    (True, False, False, 1), (False, True, False, 2), (True, False, True, 2),
    (True, True, True, 1),
])
def test_recurrence_equals_torch_native_kernel(bias, batch_first, bidirectional, layers):
    torch.manual_seed(5)
    ref = nn.LSTM(5, 7, num_layers=layers, bias=bias, batch_first=batch_first,
                  bidirectional=bidirectional)
    m = QuantLSTM.from_float(ref)
    _calibrating(m)
    d = 2 if bidirectional else 1
    x = torch.randn(3, 4, 5)
    hx = (torch.randn(layers * d, 3 if batch_first else 4, 7),
          torch.randn(layers * d, 3 if batch_first else 4, 7))
    for args in ((x, hx), (x,), (x[0],)):  # given state, zero state, unbatched
        with torch.no_grad():
            out, (h, c) = m(*args)
        ref_out, (ref_h, ref_c) = _native(ref, *args)
        torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h, ref_h, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(c, ref_c, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequence_unsorted(bidirectional):
    torch.manual_seed(6)
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=bidirectional, batch_first=True)
    m = QuantLSTM.from_float(ref)
    _calibrating(m)
    x = torch.randn(4, 5, 3)
    packed = pack_padded_sequence(x, torch.tensor([2, 5, 1, 3]), batch_first=True,
                                  enforce_sorted=False)
    d = 2 if bidirectional else 1
    hx = (torch.randn(2 * d, 4, 4), torch.randn(2 * d, 4, 4))
    with torch.no_grad():
        out, (h, c) = m(packed, hx)
    ref_out, (ref_h, ref_c) = _native(ref, packed, hx)
    assert torch.equal(out.batch_sizes, ref_out.batch_sizes)
    assert torch.equal(out.unsorted_indices, ref_out.unsorted_indices)
    torch.testing.assert_close(out.data, ref_out.data, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h, ref_h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c, ref_c, rtol=1e-6, atol=1e-6)


def test_calibration_sees_every_fused_step():
    torch.manual_seed(7)
    m = QuantLSTM(3, 4)
    x, h0 = torch.randn(5, 2, 3), torch.randn(1, 2, 4) * 3
    _calibrate(m, x, (h0, torch.zeros(1, 2, 4)))
    m._input_quantizer.disable()
    m._weight_quantizer.disable()
    with torch.no_grad():
        out, _ = m(x, (h0, torch.zeros(1, 2, 4)))
    # step t reads cat(x_t, h_{t-1}): x, h0 and every output but the last
    seen = torch.cat([x.flatten(), h0.flatten(), out[:-1].flatten()])
    assert torch.equal(m._input_quantizers[0].amax, seen.abs().max())


def test_dropout_between_layers_as_torch():
    torch.manual_seed(8)
    ref = nn.LSTM(3, 4, num_layers=2, dropout=1.0)  # p=1: deterministic zeros between layers
    m = QuantLSTM.from_float(ref)
    _calibrating(m)
    x = torch.randn(3, 2, 3)
    for train in (True, False):
        ref.train(train)
        m.train(train)
        with torch.no_grad():
            out, (h, _) = m(x)
        ref_out, (ref_h, _) = _native(ref, x)
        torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h, ref_h, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------- training, misc
def test_gradients_flow_to_inputs_weights_and_learned_amax():
    torch.manual_seed(9)
    m = QuantLSTM(4, 5, num_layers=2, bidirectional=True)
    x = torch.randn(3, 2, 4)
    _calibrate(m, x)
    m._input_quantizers[0].init_learn_amax()
    x.requires_grad_(True)
    out, (h, c) = m(x)
    (out.square().sum() + h.sum() + c.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not name.startswith("_"):
            assert p.grad.abs().sum() > 0, name
    assert m._input_quantizers[0].amax.grad is not None


def test_from_float_shares_parameters_and_registry():
    assert QUANT_TWINS[nn.LSTM] is QuantLSTM and QUANT_TWINS[nn.LSTMCell] is QuantLSTMCell
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    twin = QuantLSTM.from_float(ref, quant_desc_input=QuantDescriptor(num_bits=6))
    for name, p in ref.named_parameters():
        assert twin.get_parameter(name) is p
    assert twin._input_quantizer.num_bits == 6 and len(twin._weight_quantizers) == 4
    with pytest.raises(ValueError, match="proj_size"):
        QuantLSTM(3, 4, proj_size=2)


def test_summary_names_the_layer_quantizers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = QuantLSTM(3, 4, num_layers=2)

        def forward(self, x):
            return self.lstm(x)[0]

    rows = qdq.summary_rows(Net())
    assert {(r.module, r.role) for r in rows} == {
        ("lstm", f"{role}[{i}]") for role in ("input", "weight") for i in range(2)}
