"""qdq.save / qdq.restore: a quantized model rebuilt from its float model, bit for bit."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch import nn

import qdq
from qdq import quant_modules
from qdq.checkpoint import FORMAT, RestoreError, read
from qdq.descriptor import QuantDescriptor
from qdq.nn import QuantMixin
from qdq.rules import apply_rules
from qdqapp.reference import build_reference_model
from tests.conftest import needs_cuda
from tests.qdq.test_custom_layer import GatedBlock, QuantScaledLinear, ScaledLinear


def _calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """Max/histogram calibration by hand (per quantizer, as pytorch-quantization does)."""
    quantizers = [q for _, q in qdq.quantizers(model) if q.is_enabled]
    for q in quantizers:
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        model(x)
    for q in quantizers:
        kwargs = {"method": "percentile", "percentile": 99.9} \
            if type(q.calibrator).__name__ == "HistogramCalibrator" else {}
        q.load_calib_amax(strict=False, **kwargs)
        q.enable_quant()
        q.disable_calib()


def _groups(model: nn.Module) -> list[list[str]]:
    paths: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, qdq.TensorQuantizer):
            paths.setdefault(id(m), []).append(name)
    return sorted(paths.values())


def _roundtrip(model: nn.Module, fresh: nn.Module, x: torch.Tensor, tmp_path) -> nn.Module:
    with torch.no_grad():
        before = model(x)
    path = qdq.save(model, tmp_path / "model.qdq.pt", metadata={"note": "test"})
    restored = qdq.restore(fresh, path).train(model.training)  # restore keeps fresh's mode
    with torch.no_grad():
        after = restored(x)
    assert torch.equal(before, after)
    assert _groups(restored) == _groups(model)
    assert [r.as_dict() for r in qdq.summary_rows(restored)] == \
        [r.as_dict() for r in qdq.summary_rows(model)]
    # the file is plain data: weights_only loading, and the metadata comes back
    assert torch.load(path, weights_only=True)["format"] == FORMAT
    assert read(path)["metadata"] == {"note": "test"}
    return restored


def _torchvision(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


@pytest.mark.parametrize("name, rules, ignore", [
    ("resnet18", True, ["fc"]),
    ("resnet18", False, [re.compile(r"layer4\..*")]),
    ("mobilenet_v3_small", True, None),
])
def test_torchvision_models(tmp_path, name, rules, ignore):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = _torchvision(name)
    qdq.replace_modules(model, ignore=ignore)
    if rules:
        model = apply_rules(model, x[:1])
    _calibrate(model, x)
    restored = _roundtrip(model, torchvision.models.get_model(name, weights=None), x, tmp_path)
    if rules:
        assert restored.qdq_rules_report.folded  # BatchNorm came back folded
        assert not any(isinstance(m, nn.BatchNorm2d) for m in restored.modules())
    if ignore == ["fc"]:
        assert type(restored.fc) is nn.Linear
        assert "fc" in read(tmp_path / "model.qdq.pt")["recipe"]["kept_float"]
    if name == "resnet18" and not rules:
        assert type(restored.layer4[0].conv1) is nn.Conv2d
        assert type(restored.layer3[0].conv1) is qdq.nn.QuantConv2d


def test_reference_model_shared_quantizers_histogram_and_per_channel(tmp_path):
    """Concat and max-pool ties, histogram activations, per-channel weights, a layer
    switched off (partial quantization) and a learned amax all come back."""
    torch.manual_seed(0)
    model = build_reference_model().eval()
    qdq.replace_modules(model, quant_desc_input=QuantDescriptor(calib_method="histogram",
                                                               num_bins=512))
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    model = apply_rules(model, x[:1])
    _calibrate(model, x)
    shared = [g for g in _groups(model) if len(g) > 1]
    assert shared  # the rules tied concat and max-pool neighbours
    model.get_submodule("layer2.conv1.0._input_quantizer").disable()
    model.fc._input_quantizer.init_learn_amax()
    restored = _roundtrip(model, build_reference_model(), x, tmp_path)
    stem = restored.get_submodule("stem.0.0")
    q = stem._input_quantizer
    assert type(q.calibrator).__name__ == "HistogramCalibrator"
    assert q.descriptor.num_bins == 512
    assert stem._weight_quantizer.axis == 0
    assert stem._weight_quantizer.amax.numel() == 32
    assert not restored.get_submodule("layer2.conv1.0._input_quantizer").is_enabled
    assert restored.fc._input_quantizer.learn_amax
    for group in shared:  # one object at every path of a tie
        objects = {id(restored.get_submodule(p)) for p in group}
        assert len(objects) == 1


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.scaled = ScaledLinear(4, 4)
        self.block = GatedBlock()
        self.lstm = nn.LSTM(4, 4)

    def forward(self, x):
        y = self.block(self.scaled(x))
        return self.lstm(y.unsqueeze(0))[0].squeeze(0)


def test_custom_quant_layers_bare_quantizers_and_lstm(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    qdq.replace_modules(model, quant_map={ScaledLinear: QuantScaledLinear})
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    _calibrate(model, x)
    assert isinstance(model.scaled, QuantScaledLinear)
    restored = _roundtrip(model, Net(), x, tmp_path)
    assert isinstance(restored.scaled, QuantScaledLinear)
    assert isinstance(restored.lstm, qdq.nn.QuantLSTM)


def test_model_built_under_initialize_restores_onto_a_float_build(tmp_path):
    with quant_modules.initialize():
        torch.manual_seed(0)
        model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    model = apply_rules(model, x[:1])
    _calibrate(model, x)
    _roundtrip(model, torchvision.models.resnet18(), x, tmp_path)


def test_restored_model_saves_the_same_recipe(tmp_path):
    model = _torchvision("resnet18")
    x = torch.randn(1, 3, 32, 32)
    model = apply_rules(model, x)
    _calibrate(model, x)
    first = qdq.save(model, tmp_path / "a.pt")
    again = qdq.save(qdq.restore(torchvision.models.resnet18().eval(), first), tmp_path / "b.pt")
    assert read(first)["recipe"] == read(again)["recipe"]


def test_errors_name_the_file(tmp_path):
    model = _torchvision("resnet18")
    qdq.replace_modules(model)
    path = qdq.save(model, tmp_path / "r18.pt")
    with pytest.raises(RestoreError, match=r"r18.pt does not fit the model: .*layer1\.2"):
        qdq.restore(torchvision.models.resnet34(), path)
    with pytest.raises(RestoreError, match="r18.pt does not fit the model"):
        qdq.restore(torchvision.models.resnet18(num_classes=3), path)
    plain = tmp_path / "plain.pt"
    torch.save(torchvision.models.resnet18().state_dict(), plain)
    with pytest.raises(RestoreError, match="plain.pt: not a qdq quantized-model file"):
        qdq.restore(torchvision.models.resnet18(), plain)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(RestoreError, match="garbage.pt: cannot be read"):
        qdq.restore(torchvision.models.resnet18(), garbage)
    with pytest.raises(RestoreError, match="missing.pt: no such file"):
        qdq.restore(torchvision.models.resnet18(), tmp_path / "missing.pt")


def test_unknown_quant_class_is_named(tmp_path):
    class Odd(nn.Linear):
        pass

    class QuantOdd(Odd, QuantMixin):
        pass

    model = nn.Sequential(Odd(2, 2))
    qdq.replace_modules(model, quant_map={Odd: QuantOdd})
    path = qdq.save(model, tmp_path / "odd.pt")
    blob = torch.load(path, weights_only=True)
    blob["recipe"]["twins"][0][1] = "elsewhere.QuantOdd"
    torch.save(blob, path)
    with pytest.raises(RestoreError, match="elsewhere.QuantOdd in the file, a class this "
                                           "process has not defined"):
        qdq.restore(nn.Sequential(Odd(2, 2)), path)


def test_metadata_must_be_plain(tmp_path):
    with pytest.raises(TypeError, match="JSON-able"):
        qdq.save(nn.Linear(2, 2), tmp_path / "x.pt", metadata={"t": torch.zeros(1)})
    assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------- every format
def test_fp8_quantizers_come_back_as_fp8(tmp_path):
    """FP8 E4M3 descriptors (num_bits (4, 3)), histogram-mse amax and rule-placed shared
    quantizers: the same outputs, and the file says fp8."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    model = _torchvision("resnet18")
    qdq.replace_modules(model, quant_desc_input=QuantDescriptor(calib_method="histogram"))
    model = apply_rules(model, x[:1])
    qdq.set_format(model, "fp8")
    _calibrate(model, x)
    restored = _roundtrip(model, torchvision.models.resnet18(), x, tmp_path)
    recipe = read(tmp_path / "model.qdq.pt")["recipe"]
    assert recipe["format"] == "fp8" == qdq.format_of(restored)
    assert {tuple(e["descriptor"]["num_bits"]) for e in recipe["quantizers"]} == {(4, 3)}
    assert all(q.is_fp8 and q.num_bits == (4, 3) for _, q in qdq.quantizers(restored))
    pairs = list(zip(qdq.quantizers(model), qdq.quantizers(restored), strict=True))
    assert all((a.amax is None and b.amax is None) or torch.equal(a.amax, b.amax)
               for (_, a), (_, b) in pairs)
    assert sum(a.amax is not None for (_, a), _ in pairs) > 20


def _weight_state(model: nn.Module) -> dict[str, tuple]:
    return {name: (m.bits, m.block_size, m.dtype, m.codes, m.scale)
            for name, m in model.named_modules()
            if isinstance(m, qdq.nn.weight_only.QuantizedWeight)}


class Seq(nn.Module):
    """Conv (BatchNorm folded), an LSTM and a Linear: every weight-only kind."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm1d(16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).transpose(1, 2)
        return self.head(self.lstm(y)[0][:, -1])


@pytest.mark.parametrize("build, x, bits, block_size, ignore, fmt", [
    (lambda: _torchvision("resnet18"), torch.randn(2, 3, 32, 32), 8, None, None, "w8"),
    (lambda: _torchvision("resnet18"), torch.randn(2, 3, 32, 32), 4, 64, ["conv1"], "w4"),
    (build_reference_model, torch.randn(4, 1, 28, 28), 4, None, None, "w4"),
    (Seq, torch.randn(3, 8, 6), 4, 8, None, "w4"),
    (Seq, torch.randn(3, 8, 6), 8, 4, None, "w8"),
], ids=["resnet18-w8", "resnet18-w4-block64", "reference-w4-per-channel", "seq-w4-block8",
        "seq-w8-block4"])
def test_weight_only_layers_come_back_bit_for_bit(tmp_path, build, x, bits, block_size,
                                                  ignore, fmt):
    """int8 and int4 codes, scales, block size and dtype of every quantized weight, the
    folded BatchNorm's bias and the layers kept float: the same outputs, the same state."""
    torch.manual_seed(0)
    model = build().eval()
    if isinstance(model, Seq):  # BatchNorm statistics worth folding
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    qdq.weight_only(model, bits=bits, block_size=block_size, ignore=ignore)
    torch.manual_seed(1)  # another float model: its weights must not matter
    restored = _roundtrip(model, build().eval(), x, tmp_path)
    assert qdq.format_of(restored) == fmt == read(tmp_path / "model.qdq.pt")["recipe"]["format"]
    saved, back = _weight_state(model), _weight_state(restored)
    assert saved.keys() == back.keys() and saved
    for name, (b, block, dtype, codes, scale) in saved.items():
        b2, block2, dtype2, codes2, scale2 = back[name]
        assert (b2, block2, dtype2) == (b, block, dtype)
        assert torch.equal(codes2, codes) and torch.equal(scale2, scale)
        assert codes.dtype == torch.int8
        if bits == 4:
            assert -8 <= int(codes.min()) and int(codes.max()) <= 7
    assert not any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in restored.modules())
    if ignore:
        assert type(restored.get_submodule(ignore[0])) is nn.Conv2d


def test_a_restored_weight_only_model_saves_the_same_recipe(tmp_path):
    torch.manual_seed(0)
    model = Seq().eval()
    qdq.weight_only(model, bits=4, block_size=8, ignore=["head"])
    first = qdq.save(model, tmp_path / "a.pt")
    again = qdq.save(qdq.restore(Seq().eval(), first), tmp_path / "b.pt")
    assert read(first)["recipe"] == read(again)["recipe"]
    assert read(first)["recipe"]["weight_only"][0] == {
        "path": "conv", "layer": "qdq.nn.weight_only.WeightOnlyConv1d",
        "float": "torch.nn.modules.conv.Conv1d", "bits": 4, "block_size": 8,
        "dtypes": {"weight_q": "float32"}}


def test_weight_only_misfits_are_named(tmp_path):
    torch.manual_seed(0)
    model = Seq().eval()
    qdq.weight_only(model, bits=4, block_size=8)
    path = qdq.save(model, tmp_path / "seq.pt")

    class Other(Seq):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 16, 3)

    with pytest.raises(RestoreError, match=r"seq.pt does not fit the model: 'conv' is a "
                                           r"WeightOnlyConv1d made from a Conv1d in the file, "
                                           r"a torch.nn.modules.conv.Conv2d in the model"):
        qdq.restore(Other().eval(), path)

    class Narrow(Seq):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(12, 16, 3, padding=1, bias=False)

    with pytest.raises(RestoreError, match=r"'conv': .*block_size 8 does not divide its input "
                                           r"dimension 12"):
        qdq.restore(Narrow().eval(), path)


def test_version_1_files_are_still_read(tmp_path):
    """Files written before weight-only layers had a recipe entry (Q/DQ models only)."""
    model = _torchvision("resnet18")
    x = torch.randn(1, 3, 32, 32)
    model = apply_rules(model, x)
    _calibrate(model, x)
    path = qdq.save(model, tmp_path / "v1.pt")
    blob = torch.load(path, weights_only=True)
    blob["version"] = 1
    del blob["recipe"]["weight_only"], blob["recipe"]["format"]
    torch.save(blob, path)
    restored = qdq.restore(torchvision.models.resnet18(), path)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
    blob["version"] = 3
    torch.save(blob, path)
    with pytest.raises(RestoreError, match="version 3; this qdq reads versions 1, 2"):
        qdq.restore(torchvision.models.resnet18(), path)


@needs_cuda
@pytest.mark.parametrize("fmt", ["int8", "fp8", "w4"])
def test_restore_onto_a_model_on_the_gpu(tmp_path, fmt):
    model = _torchvision("resnet18")
    x = torch.randn(2, 3, 32, 32)
    if fmt == "w4":
        qdq.weight_only(model, bits=4, block_size=64, ignore=["conv1"])
    else:
        model = apply_rules(model, x[:1])
        qdq.set_format(model, fmt)
        _calibrate(model, x)
    path = qdq.save(model.cuda(), tmp_path / "gpu.pt")
    with torch.no_grad():
        before = model(x.cuda())
    restored = qdq.restore(torchvision.models.resnet18().cuda(), path)
    assert qdq.format_of(restored) == fmt
    assert all(t.is_cuda for t in restored.state_dict().values())
    with torch.no_grad():
        assert torch.equal(restored(x.cuda()), before)


def _tiny_bert(seed: int):
    transformers = pytest.importorskip("transformers", reason="transformers not installed "
                                       "(pip install -e '.[hf]')")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=32, attn_implementation="eager")
    return transformers.BertModel(config).eval()


def test_transformer_with_keyword_inputs_attention_twins_and_smoothquant(tmp_path):
    """A Hugging Face model: rules run on keyword inputs (recorded and replayed), the
    attention twins come back, and SmoothQuant's folded LayerNorms and Mul scales are
    state that the file carries."""
    import sensitivity

    model = _tiny_bert(0)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    qdq.replace_modules(model)
    model = apply_rules(model, batch)
    sensitivity.smoothquant(model, [batch], progress=False)
    quantizers = [q for _, q in qdq.quantizers(model) if q.is_enabled]
    for q in quantizers:
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        model(**batch)
    for q in quantizers:
        q.load_calib_amax(strict=False)
        q.enable_quant()
        q.disable_calib()
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    path = qdq.save(model, tmp_path / "bert.qdq.pt")
    restored = qdq.restore(_tiny_bert(5), path)
    with torch.no_grad():
        after = restored(**batch).last_hidden_state
    assert torch.equal(before, after)
    assert _groups(restored) == _groups(model)
    assert sorted(type(m).__name__ for m in restored.modules()) == \
        sorted(type(m).__name__ for m in model.modules())
