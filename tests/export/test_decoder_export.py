"""Causal LMs end to end: quantize (INT8 with SmoothQuant, FP8, W4), export without the KV
cache at the default opset, ONNX Runtime equal to PyTorch, save and restore."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import numpy_helper

import qdq
import sensitivity
from export import ExportError, check_qdq, to_onnx, verify
from qdq.formats import set_format, weight_only
from tests.hf_tiny import tiny_gpt2, tiny_llama

pytest.importorskip("transformers", reason="transformers not installed (pip install 'qdq[hf]')")
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")


def batch(rng, n: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (n, length), generator=rng)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def quantize(model, fmt: str, rng):
    calib = [batch(rng, 4, 8)]
    if fmt == "w4":
        weight_only(model, bits=4, block_size=16, progress=False)
        return model
    qdq.replace_modules(model)
    if fmt == "fp8":
        set_format(model, "fp8")
    else:
        sensitivity.smoothquant(model, calib, progress=False)
    sensitivity.calibrate(model, calib, progress=False)
    return model


def assert_restores(model, make, path):
    qdq.save(model, path)
    back = qdq.restore(make(), path)
    mine, theirs = model.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    inputs = {"input_ids": torch.arange(10).view(2, 5)}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, back(**inputs).logits)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_tiny_llama_int8_exports_at_opset_13_and_matches(impl, rng, tmp_path):
    model = quantize(tiny_llama(impl), "int8", rng)
    path = tmp_path / "llama.onnx"
    result = to_onnx(model, batch(rng), path)
    assert result.opset == 13 and result.output_names == ["logits"]
    assert result.notes == ["use_cache=False: exported without the KV cache (one full-sequence "
                            "pass)"]
    assert model.config.use_cache is True  # only the export copy changed
    graph = onnx.load(str(path)).graph
    matmul_q = [n for n in graph.node if n.op_type == "QuantizeLinear"
                and ("/qk/" in n.name or "/av/" in n.name)]
    assert len(matmul_q) == 2 * 2 * 2  # two layers, two products, both operands
    assert result.quantize_nodes == 2 * (7 * 2 + 4) + 2  # 7 Linears and 2 products a layer
    assert [f for f in check_qdq(path) if f.severity == "error"] == []
    report = verify(model, path, batch(rng, 3, 9))  # another batch and sequence length
    assert report.ok(), str(report)
    assert report.forced_rel_l2 == 0.0 and report.qdq_mismatches == 0
    assert_restores(model, lambda: tiny_llama(impl), tmp_path / "llama.pt")


@pytest.mark.parametrize("fmt, opset", [("fp8", 19), ("w4", 21)])
def test_tiny_llama_other_formats(fmt, opset, rng, tmp_path):
    model = quantize(tiny_llama(), fmt, rng)
    path = tmp_path / f"{fmt}.onnx"
    result = to_onnx(model, batch(rng), path)
    assert result.opset == opset and result.format == fmt
    report = verify(model, path, batch(rng, 3, 9))
    assert report.ok(), str(report)
    assert_restores(model, tiny_llama, tmp_path / f"{fmt}.pt")


def test_gpt2_conv1d_exports_as_gemm_with_per_channel_weights(rng, tmp_path):
    model = tiny_gpt2()
    qdq.replace_modules(model)
    sensitivity.calibrate(model, [batch(rng, 4, 8)], progress=False)
    path = tmp_path / "gpt2.onnx"
    result = to_onnx(model, batch(rng), path)
    assert result.opset == 13
    graph = onnx.load(str(path)).graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 8  # c_attn, c_proj, c_fc, c_proj in two blocks
    for gemm in gemms:
        dq = producer[gemm.input[1]]
        assert dq.op_type == "DequantizeLinear"
        assert next(a.i for a in dq.attribute if a.name == "axis") == 1
        assert consts[dq.input[1]].size == consts[gemm.input[2]].size  # one scale per output
        assert producer[gemm.input[0]].op_type == "DequantizeLinear"
    assert sum("/qk/" in n.name or "/av/" in n.name for n in graph.node
               if n.op_type == "QuantizeLinear") == 8
    assert [f for f in check_qdq(path) if f.severity == "error"] == []
    report = verify(model, path, batch(rng, 3, 9))
    assert report.ok(), str(report)
    assert report.forced_rel_l2 == 0.0
    assert_restores(model, tiny_gpt2, tmp_path / "gpt2.pt")


def test_use_cache_true_is_refused_by_name(rng, tmp_path):
    model = tiny_gpt2()
    path = tmp_path / "gpt2.onnx"
    with pytest.raises(ExportError, match=r"use_cache=True: .*use_cache=False"):
        to_onnx(model, {**batch(rng), "use_cache": True}, path)
    assert not list(tmp_path.iterdir())
    result = to_onnx(model, {**batch(rng), "use_cache": False}, path)
    assert result.input_names == ["input_ids", "attention_mask"]
    assert result.output_names == ["logits"]


def test_float_sdpa_raises_the_default_opset_and_says_so(rng, tmp_path):
    """A float model with SDPA attention: opset 14 chosen and said; opset 13 asked for is
    refused by name (the quantized twins spell SDPA out, so they stay at 13)."""
    model = tiny_llama("sdpa")
    with pytest.raises(ExportError, match=r"opset 13: .*scaled_dot_product_attention.*>= 14"):
        to_onnx(model, batch(rng), tmp_path / "float13.onnx", opset=13)
    assert not list(tmp_path.iterdir())
    result = to_onnx(model, batch(rng), tmp_path / "float.onnx")
    assert result.opset == 14
    assert any(n.startswith("opset 14: the model makes 2 float scaled_dot_product_attention")
               for n in result.notes)
    assert "opset 14" in str(result)
    report = verify(model, tmp_path / "float.onnx", batch(rng, 3, 9))
    assert report.ok() and report.rel_l2 < 1e-5, str(report)
