"""A model holding NaN or infinity (a corrupted checkpoint, a diverged run) is refused at
export with the tensors named, and no file is written."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qdq
from export import ExportError, to_onnx
from export.onnx_export import non_finite_tensors
from tests.export.conftest import calibrate
from tests.qdqapp.cli import qdq as qdq_cli

TINY = "tests.qdqapp.models:tiny_cnn"


def _net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).eval()
    qdq.replace_modules(model)
    calibrate(model, torch.randn(4, 3, 8, 8))
    return model


@pytest.mark.parametrize("corrupt, named", [
    (lambda m: m[0].weight.data.__setitem__((0, 0, 0, 0), float("nan")), "0.weight"),
    (lambda m: m[4].bias.data.fill_(float("inf")), "4.bias"),
    (lambda m: m[4]._input_quantizer.amax.fill_(float("inf")), "4._input_quantizer._amax"),
    (lambda m: m[1].running_mean.__setitem__(2, float("nan")), "1.running_mean"),
])
def test_non_finite_state_is_refused_by_name(tmp_path, corrupt, named):
    model = _net()
    corrupt(model)
    assert non_finite_tensors(model) == [named]
    with pytest.raises(ExportError, match=rf"1 tensor\(s\) of the model hold NaN or "
                                          rf"infinity.*{named.replace('.', '[.]')}"):
        to_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_disabled_quantizer_and_an_infinite_mask_buffer_do_not_count(tmp_path):
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("mask", torch.full((4, 4), float("-inf")).triu(1))

        def forward(self, x):
            return torch.softmax(self.fc(x) @ self.fc(x).T + self.mask, -1)

    torch.manual_seed(0)
    model = Masked().eval()
    qdq.replace_modules(model)
    calibrate(model, torch.randn(4, 4))
    model.fc._weight_quantizer.disable()
    model.fc._weight_quantizer.amax.fill_(float("nan"))
    assert non_finite_tensors(model) == []
    to_onnx(model, torch.randn(4, 4), tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").is_file()


@pytest.mark.parametrize("quantized", [True, False])
def test_a_negative_variance_makes_nan_weights_when_folded(tmp_path, quantized):
    """Finite state can fold into NaN: the folded weights and the written graph are
    checked too (a quantized conv's weight amax, a float conv's initializer)."""
    model = _net()
    if not quantized:
        model[0] = nn.Conv2d(3, 4, 3)
    model[1].running_var[1] = -4.0
    assert non_finite_tensors(model) == []
    why = "folding BatchNorm gave a weight that cannot be quantized" if quantized \
        else "of the exported graph hold NaN"
    with pytest.raises(ExportError, match=why):
        to_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def _corrupted(state: dict) -> str:
    name = next(k for k, v in state.items() if k.endswith("conv1.weight"))
    state[name][0].fill_(float("nan"))
    return name


def test_cli_export_of_a_corrupted_float_checkpoint_is_one_error(tmp_path):
    from tests.qdqapp.models import tiny_cnn

    state = tiny_cnn().state_dict()
    name = _corrupted(state)
    torch.save(state, tmp_path / "nan.pt")
    out = qdq_cli("export", TINY, "--checkpoint", tmp_path / "nan.pt",
                  "--data", "random:4x3x8x8", "--out", tmp_path / "m.onnx")
    assert out.code == 2, out.err
    assert len(out.error_lines) == 1, out.err
    module = name.rpartition(".")[0]
    assert module in out.error_lines[0] and "nan" in out.error_lines[0].lower()
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_of_a_corrupted_quantized_checkpoint_is_one_error(tmp_path):
    done = qdq_cli("calibrate", TINY, "--data", "random:4x3x8x8", "--out", tmp_path / "cal")
    assert done.code == 0, done.err
    blob = torch.load(tmp_path / "cal" / "quantized.pt", weights_only=True)
    name = _corrupted(blob["state_dict"])
    torch.save(blob, tmp_path / "nan.pt")
    out = qdq_cli("export", TINY, "--checkpoint", tmp_path / "nan.pt", "--out",
                  tmp_path / "m.onnx")
    assert out.code == 2, out.err
    assert len(out.error_lines) == 1, out.err
    assert name in out.error_lines[0] and "NaN" in out.error_lines[0]
    assert not (tmp_path / "m.onnx").exists()


def test_a_model_without_quantizers_is_exported_with_a_warning_and_a_note(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    with pytest.warns(UserWarning, match="float model: no enabled quantizer"):
        result = to_onnx(model, torch.randn(1, 4), tmp_path / "float.onnx")
    assert result.format == "float" and result.quantize_nodes == 0
    assert "float model" in str(result)
