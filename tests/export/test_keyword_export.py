"""to_onnx and verify with keyword (dict) inputs, as Hugging Face models take them."""

from __future__ import annotations

import warnings

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import qdq
import sensitivity
from export import ExportError, check_qdq, to_onnx, verify
from qdq.rules import apply_rules


class KeywordNet(nn.Module):
    """Token ids and a mask in, a dict out (like a transformers encoder)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask=None, extra=None):
        h = self.proj(self.embed(input_ids))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        pooled = h.sum(1) / h.shape[1]
        return {"last_hidden_state": h, "pooled": self.head(pooled), "nothing": extra}


def _batch(n, length, rng):
    ids = torch.randint(0, 30, (n, length), generator=rng)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_keyword_inputs_named_axes_and_ort(tmp_path, rng):
    model = KeywordNet().eval()
    qdq.replace_modules(model)
    sensitivity.calibrate(model, [_batch(4, 6, rng)], progress=False)
    path = tmp_path / "kw.onnx"
    result = to_onnx(model, _batch(2, 6, rng), path)
    assert result.input_names == ["input_ids", "attention_mask"]
    assert result.output_names == ["last_hidden_state", "pooled"]  # None field skipped
    graph = onnx.load(str(path)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
                    "last_hidden_state": ["batch", "sequence", 8], "pooled": ["batch", 3]}
    other = _batch(3, 9, rng)  # another batch size and sequence length
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in other.items()})
    with torch.no_grad():
        want = model(**other)
    torch.testing.assert_close(torch.from_numpy(got[1]), want["pooled"], rtol=1e-4, atol=1e-4)
    report = verify(model, path, other)
    assert report.ok() and report.shapes == [[3, 9], [3, 9]]
    assert [o.name for o in report.outputs] == ["last_hidden_state", "pooled"]
    assert [f for f in check_qdq(path) if f.severity == "error"] == []


def test_keyword_input_errors(tmp_path, rng):
    model = KeywordNet().eval()
    with pytest.raises(ExportError, match="dict of tensors"):
        to_onnx(model, {"input_ids": [1, 2]}, tmp_path / "bad.onnx")
    with pytest.raises(ExportError, match="does not run"):
        to_onnx(model, {"input_ids": torch.zeros(2, 3, dtype=torch.long), "wrong": torch.ones(1)},
                tmp_path / "bad.onnx")
    assert not list(tmp_path.iterdir())


def test_bert_exports_with_dynamic_batch_and_sequence(tmp_path, rng):
    transformers = pytest.importorskip("transformers", reason="transformers not installed "
                                       "(pip install 'qdq[hf]')")
    config = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    model = transformers.BertModel._from_config(config, attn_implementation="eager").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = apply_rules(model, _batch(2, 6, rng) | {"input_ids": torch.randint(
            3, 30, (2, 6), generator=rng)})
    sensitivity.calibrate(model, [_batch(4, 8, rng), _batch(4, 5, rng)], progress=False)
    path = tmp_path / "bert.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = to_onnx(model, _batch(2, 6, rng), path)
    assert result.output_names == ["last_hidden_state", "pooler_output"]
    matmul_q = [n for n in onnx.load(str(path)).graph.node
                if n.op_type == "QuantizeLinear" and ("/qk/" in n.name or "/av/" in n.name)]
    assert len(matmul_q) == 2 * 2 * 2  # two layers, two matmuls, both operands
    findings = check_qdq(path)
    assert findings == [], findings
    report = verify(model, path, _batch(3, 11, rng))
    assert report.ok(), str(report)
    assert report.rel_l2 < 1e-3


def test_weight_only_keyword_model_verifies_its_weights(tmp_path, rng):
    """Behind the keyword wrapper the initializers are named ``model.<module>...``: verify
    still pairs every weight DequantizeLinear with its layer (the embedding table's too,
    gathered rows against the same rows of the table)."""
    model = KeywordNet().eval()
    qdq.weight_only(model, bits=4, block_size=8)
    path = tmp_path / "w4.onnx"
    to_onnx(model, _batch(2, 6, rng), path)
    inits = {i.name for i in onnx.load(str(path)).graph.initializer}
    assert "model.proj.weight_q.codes" in inits  # the wrapper's prefix
    report = verify(model, path, _batch(3, 5, rng))
    assert not report.unmatched_weights and len(report.weights) == 3
    assert report.weight_mismatches == 0 and report.ok(), str(report)
    assert report.verdict() == "same (3 weights equal)"
