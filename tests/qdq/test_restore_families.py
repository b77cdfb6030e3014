"""qdq.restore over every model family the suite quantizes, with and without the
placement rules: the argument itself becomes the quantized model (same object, same
train/eval mode), bit-identical to the saved one, and a file that does not fit leaves it
exactly as it was."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer

import qdq
from qdq.rules import apply_rules

transformers = pytest.importorskip("transformers")


def _calibrate(model: nn.Module, run) -> None:
    quantizers = [q for _, q in qdq.quantizers(model) if q.is_enabled]
    for q in quantizers:
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        run(model)
    for q in quantizers:
        q.load_calib_amax(strict=False)
        q.enable_quant()
        q.disable_calib()


def _resnet() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def _swin() -> nn.Module:
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                           window_size=[4, 4], num_classes=5)


def _bert(attn: str):
    def build() -> nn.Module:
        config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64,
                                         max_position_embeddings=32, attn_implementation=attn)
        return transformers.BertModel(config)
    return build


class _Encoder(nn.Module):
    """nn.TransformerEncoder: MultiheadAttention, whose matmuls the rules quantize."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.lstm(x)[0])


def _reference() -> nn.Module:
    from qdqapp.reference import build_reference_model
    return build_reference_model()


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


_IMAGE = _randn(2, 3, 32, 32, seed=1)
_IDS = torch.randint(1, 50, (3, 7), generator=torch.Generator().manual_seed(2))
_MASK = torch.ones_like(_IDS)
_MASK[1, 4:] = 0  # a padded sentence
_MASK[2, :] = 0  # and a row of padding only: every key hidden from every query
_TEXT = {"input_ids": _IDS, "attention_mask": _MASK}

FAMILIES = {
    "resnet18": (_resnet, _IMAGE),
    "mobilenet_v3": (lambda: torchvision.models.mobilenet_v3_small(num_classes=4), _IMAGE),
    "reference": (_reference, _randn(4, 1, 28, 28, seed=3)),
    "transformer-encoder": (_Encoder, _randn(2, 5, 16, seed=4)),
    "lstm": (_Recurrent, _randn(2, 5, 8, seed=5)),
    "swin": (_swin, _IMAGE),
    "bert-eager": (_bert("eager"), _TEXT),
    "bert-sdpa": (_bert("sdpa"), _TEXT),
}


def _structure(model: nn.Module) -> list[tuple[str, str]]:
    """Module paths and types (every traced part counts as one GraphModule type)."""
    return [(n, "GraphModule" if isinstance(m, torch.fx.GraphModule) else type(m).__qualname__)
            for n, m in model.named_modules()]


def _run(batch):
    def run(model):
        out = model(**batch) if isinstance(batch, dict) else model(batch)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    return run


def _quantized(family: str, rules: bool, fmt: str = "int8") -> tuple[nn.Module, object]:
    build, batch = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    run = _run(batch)
    if fmt in ("w8", "w4"):
        qdq.weight_only(model, bits=int(fmt[1]), block_size=8 if fmt == "w4" else None,
                        progress=False)
        return model, run
    qdq.replace_modules(model)
    if fmt == "fp8":
        qdq.set_format(model, "fp8")
    if rules:
        example = {k: v[:1] for k, v in batch.items()} if isinstance(batch, dict) else batch[:1]
        model = apply_rules(model, example)
    _calibrate(model, run)
    return model, run


CASES = [(family, rules, "int8") for family in FAMILIES for rules in (False, True)
         if not (family == "lstm" and rules)]  # torch.fx cannot trace nn.LSTM's packing
CASES += [("bert-sdpa", True, "fp8"), ("swin", True, "fp8"), ("bert-eager", False, "w4"),
          ("resnet18", False, "w8"), ("lstm", False, "w4")]


@pytest.mark.parametrize("family, rules, fmt", CASES,
                         ids=[f"{f}-{'rules' if r else 'replace'}-{fmt}" for f, r, fmt in CASES])
def test_restore_rebuilds_in_place_bit_for_bit(tmp_path, family, rules, fmt):
    model, run = _quantized(family, rules, fmt)
    with torch.no_grad():
        before = run(model)
    assert torch.isfinite(before).all()  # the all-padding row too
    path = qdq.save(model, tmp_path / "model.qdq.pt")

    torch.manual_seed(7)
    fresh = FAMILIES[family][0]()  # built the usual way: training mode, other weights
    assert fresh.training
    restored = qdq.restore(fresh, path)
    assert restored is fresh
    assert fresh.training  # the mode it came in with, as load_state_dict keeps it
    fresh.eval()
    with torch.no_grad():
        after = run(fresh)
    assert torch.equal(before, after)
    ours = sorted(n for n, _ in qdq.quantizers(fresh))
    assert ours == sorted(n for n, _ in qdq.quantizers(model))
    assert qdq.format_of(fresh) == fmt
    assert _structure(fresh) == _structure(model)
    again = qdq.save(fresh, tmp_path / "again.qdq.pt")
    recipe = qdq.checkpoint.read(again)["recipe"]
    first = qdq.checkpoint.read(path)["recipe"]
    assert {k: v for k, v in recipe.items() if k != "training"} == \
        {k: v for k, v in first.items() if k != "training"}


def test_attention_twins_from_replace_modules_alone_come_back():
    """The attention twins replace_modules made (no rules) are recorded as twins."""
    model, _ = _quantized("bert-eager", rules=False)
    recipe = qdq.checkpoint.recipe_of(model)
    twinned = {path for path, _, _ in recipe["twins"]}
    assert "encoder.layer.0.attention.self" in twinned


def test_a_file_that_does_not_fit_leaves_the_argument_as_it_was(tmp_path):
    model, _ = _quantized("resnet18", rules=True)
    path = qdq.save(model, tmp_path / "model.qdq.pt")
    other = torchvision.models.resnet18(num_classes=3)  # the fc differs: fails late
    before = {k: v.clone() for k, v in other.state_dict().items()}
    kinds = [(n, type(m)) for n, m in other.named_modules()]
    with pytest.raises(qdq.RestoreError, match="does not fit"):
        qdq.restore(other, path)
    assert type(other) is torchvision.models.ResNet
    assert [(n, type(m)) for n, m in other.named_modules()] == kinds
    after = other.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert other.training


def test_a_restored_root_is_a_working_graph_module(tmp_path):
    """Where the rules traced the root, the caller's object becomes that GraphModule: it
    runs, recompiles, exports and can be copied."""
    import copy

    model, run = _quantized("resnet18", rules=True)
    path = qdq.save(model, tmp_path / "model.qdq.pt")
    fresh = qdq.restore(_resnet(), path).eval()
    assert isinstance(fresh, torch.fx.GraphModule)
    assert fresh.graph.owning_module is fresh
    fresh.recompile()
    twin = copy.deepcopy(fresh)
    with torch.no_grad():
        assert torch.equal(run(twin), run(model))
