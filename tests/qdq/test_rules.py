"""Placement rules on fx graphs: what gets quantized, what is shared, and that ties hold."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import qdq
from qdq.nn import QuantAdd, QuantConcat, QuantMatMul
from qdq.rules import RULES, QuantMultiheadAttention, apply_rules, register_rule, unregister_rule


def _calibrate(model: nn.Module, *inputs: torch.Tensor) -> None:
    qs = [q for _, q in qdq.quantizers(model) if q.is_enabled]
    for q in qs:
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        model(*inputs)
    for q in qs:
        q.load_calib_amax()
        q.disable_calib()
        q.enable_quant()


def _of_type(model: nn.Module, cls: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, cls)]


class Block(nn.Module):
    """conv-bn-relu-conv-bn plus identity, the residual unit of ResNet."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + x)


def test_residual_add_quantizes_identity_only(rng):
    x = torch.randn(2, 4, 8, 8, generator=rng)
    model = apply_rules(Block().eval(), x)
    (add,) = _of_type(model, QuantAdd)
    assert not add._input_quantizer.is_enabled       # conv side: float, fused by TensorRT
    assert add._other_quantizer.is_enabled           # identity side
    assert add._other_quantizer.placed_by in ("residual_add", "same_tensor")
    # the identity tensor is also conv1's input: one quantizer reads it
    assert add._other_quantizer is model.conv1._input_quantizer
    assert model.qdq_rules_report.changes["residual_add"] == 1
    assert sorted(model.qdq_rules_report.folded) == ["bn1", "bn2"]


def test_residual_add_forms(rng):
    class Forms(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (nn.Conv2d(3, 3, 1) for _ in range(3))

        def forward(self, x):
            y = torch.add(x, self.a(x))          # identity first
            y = y.add(F.relu(self.b(y)))         # through ReLU, method form
            z = self.c(y)
            z += y                               # in place
            return z + 1.0                       # a scalar: left alone

    x = torch.randn(1, 3, 5, 5, generator=rng)
    model = apply_rules(Forms().eval(), x)
    adds = _of_type(model, QuantAdd)
    assert len(adds) == 3
    assert adds[0]._input_quantizer.is_enabled and not adds[0]._other_quantizer.is_enabled
    assert not adds[1]._other_quantizer.is_enabled and adds[1]._input_quantizer.is_enabled
    assert not adds[2]._input_quantizer.is_enabled and adds[2]._other_quantizer.is_enabled


def test_add_without_conv_left_alone(rng):
    class Plain(nn.Module):
        def forward(self, x, y):
            return x + y

    x = torch.randn(2, 3)
    model = apply_rules(Plain(), (x, x))
    assert _of_type(model, QuantAdd) == []


class CatPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.c = nn.Conv2d(8, 4, 1)
        self.d = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.c(y) + self.d(self.pool(y)).repeat_interleave(2, -1).repeat_interleave(2, -2)


def test_concat_and_maxpool_share_one_quantizer(rng):
    x = torch.randn(2, 3, 8, 8, generator=rng)
    model = apply_rules(CatPool().eval(), x)
    (cat,) = _of_type(model, QuantConcat)
    q = cat._input_quantizer
    assert model.c._input_quantizer is q       # reads the concat output
    assert model.pool._input_quantizer is q    # max pool input is the concat output
    assert model.d._input_quantizer is q       # max pool output
    assert q.placed_by == "concat_shared"
    row = next(r for r in qdq.summary_rows(model) if r.placed_by == "concat_shared")
    assert len(row.shared_with) == 3
    assert "concat_shared" in qdq.summary(model)
    # a tie holds through calibration: one amax, the max over every tensor it saw
    _calibrate(model, x)
    with torch.no_grad(), qdq.disable_quantization(model):
        branch = torch.cat([torch.relu(model.a(x)), torch.relu(model.b(x))], 1)
    torch.testing.assert_close(q.amax, branch.abs().max())


def test_ties_survive_state_dict_deepcopy_and_learned_amax(rng):
    x = torch.randn(2, 3, 8, 8, generator=rng)
    model = apply_rules(CatPool().eval(), x)
    _calibrate(model, x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = apply_rules(CatPool().eval(), x)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    (cat,) = _of_type(fresh, QuantConcat)
    assert fresh.d._input_quantizer is cat._input_quantizer
    torch.testing.assert_close(cat._input_quantizer.amax,
                               _of_type(model, QuantConcat)[0]._input_quantizer.amax)
    twin = copy.deepcopy(fresh)
    assert twin.d._input_quantizer is _of_type(twin, QuantConcat)[0]._input_quantizer
    # QAT with learned ranges: the shared amax is one Parameter
    cat._input_quantizer.init_learn_amax()
    shared = [p for n, p in fresh.named_parameters() if n.endswith("_amax")]
    assert len(shared) == 1
    fresh.train()
    out = fresh(x).sum()
    out.backward()
    assert shared[0].grad is not None


def test_matmul_becomes_quant_matmul(rng):
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 8)

        def forward(self, x):
            q = self.q(x)
            scores = torch.softmax(q @ x.transpose(1, 2), -1)
            return torch.bmm(scores, x) + torch.matmul(x, x.transpose(1, 2)).mean()

    x = torch.randn(2, 5, 8, generator=rng)
    model = Attn().eval()
    with torch.no_grad():
        ref = model(x)
    model = apply_rules(model, x)
    mms = _of_type(model, QuantMatMul)
    assert len(mms) == 3
    assert all(m._input_quantizer.placed_by in ("matmul", "same_tensor") for m in mms)
    with torch.no_grad(), qdq.disable_quantization(model):
        torch.testing.assert_close(model(x), ref)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_twin_matches_float(rng, batch_first):
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 7, 16, generator=rng)
    mem = torch.randn(3, 5, 16, generator=rng)
    mask = torch.rand(7, 7, generator=rng) > 0.7
    mask.fill_diagonal_(False)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, -2:] = True
    single = x[0]
    if not batch_first:
        x, mem = x.transpose(0, 1), mem.transpose(0, 1)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    twin = QuantMultiheadAttention.from_float(mha)
    with torch.no_grad(), qdq.disable_quantization(twin):
        for args, kw in [((x, x, x), {"attn_mask": mask}),
                         ((x, mem, mem), {"key_padding_mask": pad}),
                         ((x, x, x), {"is_causal": True, "attn_mask": causal}),
                         ((single, single, single), {})]:
            want_out, want_w = mha(*args, **kw)
            got_out, got_w = twin(*args, **kw)
            torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-5)
    assert set(twin.state_dict()) >= set(mha.state_dict())


def test_vit_attention_swapped_and_self_attention_keys_off(rng):
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16,
        mlp_dim=32, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32, generator=rng)
    with torch.no_grad():
        ref = model(x)
    model = apply_rules(model, x)
    (att,) = _of_type(model, QuantMultiheadAttention)
    assert not att._key_quantizer.is_enabled and not att._value_quantizer.is_enabled
    assert att.qk._input_quantizer.is_enabled and att.av._other_quantizer.is_enabled
    assert len(_of_type(model, QuantConcat)) == 1  # class token + patches
    with torch.no_grad(), qdq.disable_quantization(model):
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    _calibrate(model, x)
    assert not [n for n, q in qdq.quantizers(model) if q.is_quant_enabled and q.amax is None]


class _Up(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        small = self.a(F.max_pool2d(x, 2))
        up = F.interpolate(small, scale_factor=2.0, mode=self.mode)
        return self.b(torch.cat([up, x], 1)) + F.interpolate(self.a(x)[..., ::2, ::2],
                                                              scale_factor=2.0, mode=self.mode)


def test_bilinear_resize_output_is_quantized_after_it_only(rng):
    x = torch.randn(1, 3, 8, 8, generator=rng)
    model = apply_rules(_Up("bilinear").eval(), x)
    assert len(_of_type(model, QuantConcat)) == 1 and len(_of_type(model, QuantAdd)) == 1
    assert not [n for n, _ in model.named_modules() if "resize_quantizer" in n]


def test_functional_max_pool_becomes_a_tied_quant_max_pool(rng):
    class Reduce(nn.Module):
        """inception's reduction block: a concat whose output a functional pool reads."""

        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 4, 1)
            self.c = nn.Conv2d(8, 4, 3, stride=2)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            return torch.cat([self.c(y), F.max_pool2d(y, kernel_size=3, stride=2)], 1)

    x = torch.randn(1, 3, 9, 9, generator=rng)
    float_model = Reduce().eval()
    with torch.no_grad():
        before = float_model(x)
    model = apply_rules(copy.deepcopy(float_model), x)
    pools = _of_type(model, qdq.nn.QuantMaxPool2d)
    assert len(pools) == 1 and pools[0].kernel_size == 3 and pools[0].stride == 2
    assert model.qdq_rules_report.changes["maxpool"] == 1
    first_cat = _of_type(model, QuantConcat)[0]
    assert pools[0]._input_quantizer is first_cat._input_quantizer  # one scale through
    with torch.no_grad(), qdq.disable_quantization(model):
        assert torch.equal(model(x), before)


def test_nearest_resize_shares_the_scale_of_its_concat_and_add(rng):
    """Nearest upsampling commutes with Q/DQ: the concat's (and the residual identity's)
    quantizer also reads the upsample's input, one object at both places."""
    x = torch.randn(1, 3, 8, 8, generator=rng)
    float_model = _Up("nearest").eval()
    with torch.no_grad():
        before = float_model(x)
    model = apply_rules(copy.deepcopy(float_model), x)
    assert len(_of_type(model, QuantConcat)) == 1 and len(_of_type(model, QuantAdd)) == 1
    resize_quantizers = [n for n, _ in model.named_modules(remove_duplicate=False)
                         if "resize_quantizer" in n]
    assert len(resize_quantizers) == 2
    cat = _of_type(model, QuantConcat)[0]
    assert any(model.get_submodule(n) is cat._input_quantizer for n in resize_quantizers)
    with torch.no_grad(), qdq.disable_quantization(model):
        assert torch.allclose(model(x), before, atol=1e-6)


def test_outputs_unchanged_resnet18_and_untraced_part_warns(rng):
    class Gate(nn.Module):
        """Data-dependent branch: fx cannot trace it."""

        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body(x) if x.mean() > -10 else x

    model = Gate(torchvision.models.resnet18(num_classes=5)).eval()
    x = torch.randn(2, 3, 32, 32, generator=rng)
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = apply_rules(model, x)
    assert out is model  # the root did not trace; its child was rewritten in place
    assert any("(root)" in str(w.message) and "cannot trace" in str(w.message)
               for w in caught)
    assert isinstance(model.body, torch.fx.GraphModule)
    assert len(_of_type(model, QuantAdd)) == 8
    with torch.no_grad(), qdq.disable_quantization(model):
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


def test_rule_registry(rng):
    with pytest.raises(ValueError, match="unknown placement rule"):
        apply_rules(Block().eval(), None, rules=["nope"])
    seen = []

    @register_rule("count_nodes")
    def _count(ctx):
        seen.append(len(ctx.gm.graph.nodes))
        return 0

    try:
        assert list(RULES)[-1] == "count_nodes"
        model = apply_rules(Block().eval(), rules=["count_nodes"])
        assert seen and _of_type(model, QuantAdd) == []
    finally:
        unregister_rule("count_nodes")
    with pytest.raises(ValueError, match="already registered"):
        register_rule("concat")(lambda ctx: 0)
