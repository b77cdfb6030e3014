"""Weight-only embedding tables: the layer against a plain per-row rounding loop, the
walker's choices, the ONNX graph (Gather of the integer rows, then DequantizeLinear) run by
ONNX Runtime against PyTorch, the lint, save/restore and file sizes."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import qdq
from export import check_qdq, to_onnx, verify
from export.formats import onnx_format, uses_int4, weight_bytes
from qdq.blockwise import quantize_weight
from qdq.formats import FormatError, indivisible_weights, weight_only
from qdq.nn.weight_only import WEIGHT_ONLY_TWINS
from qdq.nn.weight_only_embedding import WeightOnlyEmbedding
from tests.qdq.test_weight_only import plain_quantize


class Tagger(nn.Module):
    """A token embedding and a linear head: the smallest model with a lookup table."""

    def __init__(self, vocab: int = 40, dim: int = 32, classes: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


class Lookup(nn.Module):
    def __init__(self, emb: nn.Module) -> None:
        super().__init__()
        self.emb = emb

    def forward(self, ids):
        return self.emb(ids)


def _ids(rng, shape=(3, 9), vocab: int = 40) -> torch.Tensor:
    ids = torch.randint(0, vocab, shape, generator=rng)
    ids[0, :2] = 0  # padding tokens
    return ids


def _ort(path, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})


def _nodes(path, op: str) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op]


# -------------------------------------------------------------------------- the layer
def test_nn_embedding_has_a_weight_only_twin():
    assert WEIGHT_ONLY_TWINS[nn.Embedding] is WeightOnlyEmbedding


@pytest.mark.parametrize("bits, block", [(8, None), (4, None), (4, 8), (8, 16)])
def test_lookups_equal_a_plain_per_row_dequantization(rng, bits, block):
    float_emb = nn.Embedding(40, 32, padding_idx=3)
    float_emb.weight.data[7].zero_()  # a dead row still gets a positive scale
    layer = WeightOnlyEmbedding.from_float(float_emb, bits=bits, block_size=block)
    codes, scales = plain_quantize(float_emb.weight.detach().numpy(), bits, block)
    if block is None:
        assert layer.weight_q.scale.shape == (40,)  # one scale per row (token)
        table = codes.astype(np.float32) * scales[:, None]
    else:
        assert layer.weight_q.scale.shape == (40, 32 // block)  # blocks along the row
        table = codes.astype(np.float32) * np.repeat(scales, block, axis=1)
    assert np.array_equal(layer.weight_q.codes.numpy().astype(np.int64), codes)
    ids = _ids(rng)
    with torch.no_grad():
        out = layer(ids)
    assert out.dtype == torch.float32 and out.shape == (3, 9, 32)
    assert np.array_equal(out.numpy(), table[ids.numpy()])
    assert not np.any(table[7]) and not np.any(out.numpy()[ids.numpy() == 7])
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1


def test_padding_idx_is_kept_and_its_zero_row_stays_exactly_zero(rng):
    float_emb = nn.Embedding(20, 16, padding_idx=-1)  # torch stores 19
    layer = WeightOnlyEmbedding.from_float(float_emb, bits=4)
    assert layer.padding_idx == 19 and "padding_idx=19" in repr(layer)
    ids = torch.tensor([[19, 2, 19, 5]])
    with torch.no_grad():
        out = layer(ids)
    assert torch.equal(out[0, 0], torch.zeros(16)) and torch.equal(out[0, 2], torch.zeros(16))
    assert torch.equal(layer.weight_q.codes[19], torch.zeros(16, dtype=torch.int8))
    assert (layer.num_embeddings, layer.embedding_dim) == (20, 16)
    assert torch.equal(layer.weight, layer.weight_q())


def test_max_norm_is_refused_and_such_a_layer_can_stay_float():
    model = Tagger()
    model.emb.max_norm = 1.0
    with pytest.raises(ValueError, match="max_norm"):
        weight_only(copy.deepcopy(model), bits=8)
    done = weight_only(model, bits=8, ignore=["emb"])
    assert [r.name for r in done] == ["head"] and type(model.emb) is nn.Embedding


def test_weight_only_replaces_embeddings_with_the_other_layers(rng):
    torch.manual_seed(0)
    model = Tagger().eval()
    ids = _ids(rng)
    with torch.no_grad():
        before = model(ids)
    done = weight_only(model, bits=4, block_size=16)
    assert [(r.name, r.quant_type) for r in done] == [("emb", "WeightOnlyEmbedding"),
                                                      ("head", "WeightOnlyLinear")]
    assert qdq.format_of(model) == "w4"
    with torch.no_grad():
        after = model(ids)
    assert torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), 0) > 0.99
    # the mse clip search applies to tables as to any weight
    table = nn.Embedding(40, 32)
    layer = WeightOnlyEmbedding.from_float(table, bits=4, amax_method="mse")
    codes, scale = quantize_weight(table.weight, 4, None, "mse")
    assert torch.equal(layer.weight_q.codes, codes) and torch.equal(layer.weight_q.scale, scale)
    # a block size that does not divide the embedding dimension names the table
    other = Tagger(dim=24)
    assert indivisible_weights(other, 16) == [("emb", "weight", 24), ("head", "weight", 24)]
    with pytest.raises(FormatError, match=r"emb\.weight \(24\)"):
        weight_only(other, bits=4, block_size=16)


# ------------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("bits, block", [(8, None), (8, 8), (4, None), (4, 16)])
def test_onnx_gathers_integer_rows_then_dequantizes_equal_to_pytorch(rng, tmp_path, bits,
                                                                     block):
    model = Lookup(nn.Embedding(40, 32, padding_idx=0))
    weight_only(model, bits=bits, block_size=block, embedding_bits=None)  # tables as bits
    path = tmp_path / "emb.onnx"
    opset = 21 if bits == 8 and block is None else None  # W8 per row would pick opset 13
    result = to_onnx(model, _ids(rng), path, opset=opset)
    assert result.opset == 21
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops == (["Cast"] if bits == 4 else []) + ["Gather", "Gather", "DequantizeLinear"]
    (dq,) = _nodes(path, "DequantizeLinear")
    gathers = {n.output[0]: n for n in _nodes(path, "Gather")}
    assert set(dq.input[:2]) == set(gathers)  # rows and their scales, both gathered
    attrs = {a.name: a.i for a in dq.attribute}
    assert attrs == {"axis": -1, "block_size": block or 32}
    inits = {i.name: i for i in proto.graph.initializer}
    assert inits["emb.weight_q.codes"].data_type == (onnx.TensorProto.INT4 if bits == 4
                                                     else onnx.TensorProto.INT8)
    assert list(inits["emb.weight_q.scale"].dims) == [40, 32 // (block or 32)]
    assert onnx_format(proto) == f"w{bits}" and uses_int4(proto) == (bits == 4)
    ids = _ids(torch.Generator().manual_seed(5), (6, 9))
    with torch.no_grad():
        ours = model(ids).numpy()
    (theirs,) = _ort(path, {"input": ids})
    assert np.array_equal(theirs, ours)  # bit for bit
    report = verify(model, path, ids)
    assert report.ok() and report.weight_mismatches == 0 and not report.unmatched_weights
    assert report.weights[0].elements == 6 * 9 * 32  # the rows looked up
    assert check_qdq(path) == []  # scales gathered from a constant table count as constant


@pytest.mark.parametrize("bits, block, opset", [(8, None, None), (4, 16, None)])
def test_whole_table_dequantize_then_gather_where_asked_or_below_opset_21(
        rng, tmp_path, bits, block, opset):
    model = Lookup(nn.Embedding(40, 32))
    weight_only(model, bits=bits, block_size=block, embedding_bits=None)
    path = tmp_path / "emb.onnx"
    result = to_onnx(model, _ids(rng), path, opset=opset, gather_first=False)
    assert result.opset == (13 if bits == 8 else 21)
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["DequantizeLinear",
                                                                   "Gather"]
    ids = _ids(torch.Generator().manual_seed(5), (6, 9))
    with torch.no_grad():
        ours = model(ids).numpy()
    assert np.array_equal(_ort(path, {"input": ids})[0], ours)
    assert check_qdq(path) == []
    assert verify(model, path, ids).ok()


def test_embedding_and_linear_model_in_onnx_runtime(rng, tmp_path):
    torch.manual_seed(1)
    model = Tagger().eval()
    weight_only(model, bits=4, block_size=16)
    path = tmp_path / "tagger.onnx"
    to_onnx(model, _ids(rng), path)
    proto = onnx.load(str(path))
    (emb_dq,) = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                 and n.name.startswith("/emb/")]
    proto.graph.output.append(onnx.ValueInfoProto(name=emb_dq.output[0]))
    ids = _ids(torch.Generator().manual_seed(2), (4, 9))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, rows = sess.run(None, {"input": ids.numpy()})
    with torch.no_grad():
        assert np.array_equal(rows, model.emb(ids).numpy())  # the lookup: bit for bit
        assert np.allclose(logits, model(ids).numpy(), rtol=0, atol=1e-6)  # matmul order
    report = verify(model, path, ids)
    assert report.ok() and len(report.weights) == 2 and report.weight_mismatches == 0
    assert check_qdq(path) == []


def test_sizes_count_the_table(rng, tmp_path):
    torch.manual_seed(0)
    float_model = Lookup(nn.Embedding(400, 64)).eval()
    ids = _ids(rng, vocab=400)
    fp32 = to_onnx(float_model, ids, tmp_path / "fp32.onnx")
    sizes = {}
    for bits in (8, 4):
        model = copy.deepcopy(float_model)
        weight_only(model, bits=bits, block_size=None if bits == 8 else 32, embedding_bits=None)
        result = to_onnx(model, ids, tmp_path / f"w{bits}.onnx")
        stored, as_fp32 = weight_bytes(onnx.load(str(tmp_path / f"w{bits}.onnx")))
        assert as_fp32 == 400 * 64 * 4
        # codes, fp32 scales, and int8 zero points for the whole-table DQ of opset 13 (the
        # gathered rows of opset 21 need none)
        assert stored == {8: 400 * 64 + 4 * 400 + 400, 4: 400 * 64 // 2 + 4 * 400 * 2}[bits]
        assert result.fp32_bytes == pytest.approx(fp32.bytes, rel=0.01)
        sizes[bits] = result.bytes
    assert fp32.bytes / sizes[8] > 3.5 and fp32.bytes / sizes[4] > 5.5


# ------------------------------------------------------------------------ save/restore
def test_save_restore_round_trips_bit_for_bit(rng, tmp_path):
    torch.manual_seed(3)
    model = Tagger().eval()
    weight_only(model, bits=4, block_size=8, embedding_bits=4)
    path = qdq.save(model, tmp_path / "tagger.qdq.pt")
    restored = qdq.restore(Tagger().eval(), path)
    assert type(restored.emb) is WeightOnlyEmbedding and restored.emb.padding_idx == 0
    blob = qdq.checkpoint.read(path)
    assert qdq.checkpoint.recorded_format(blob) == "w4"
    (entry,) = [e for e in blob["recipe"]["weight_only"] if e["path"] == "emb"]
    assert entry["layer"].endswith("WeightOnlyEmbedding") and entry["block_size"] == 8
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    ids = _ids(rng)
    with torch.no_grad():
        assert torch.equal(restored(ids), model(ids))


# --------------------------------------------------------------------- a Hugging Face BERT
def _tiny_bert(seed: int):
    transformers = pytest.importorskip("transformers", reason="transformers not installed "
                                       "(pip install -e '.[hf]')")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=64, attn_implementation="eager")
    return transformers.BertModel(config).eval()


def test_tiny_bert_w4_with_its_embedding_tables(tmp_path):
    """Word, position and token-type tables become INT4 and dequantize after the lookup;
    ONNX Runtime matches PyTorch, every weight bit for bit, and the file shrinks with them."""
    float_model = _tiny_bert(0)
    ids = torch.randint(1, 500, (2, 11), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "token_type_ids": (torch.arange(11) > 5).long().expand(2, 11).contiguous()}
    fp32 = to_onnx(float_model, batch, tmp_path / "fp32.onnx")
    linear_only = copy.deepcopy(float_model)
    weight_only(linear_only, bits=4, block_size=32,
                ignore=lambda name, m: isinstance(m, nn.Embedding))
    before = to_onnx(linear_only, batch, tmp_path / "linear.onnx")
    model = copy.deepcopy(float_model)
    done = weight_only(model, bits=4, block_size=32, embedding_bits=4)
    tables = sorted(r.name for r in done if r.quant_type == "WeightOnlyEmbedding")
    assert tables == ["embeddings.position_embeddings", "embeddings.token_type_embeddings",
                      "embeddings.word_embeddings"]
    path = tmp_path / "w4.onnx"
    result = to_onnx(model, batch, path)
    proto = onnx.load(str(path))
    dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    made_by = {o: n for n in proto.graph.node for o in n.output}
    assert sum(dq.input[0] in made_by and made_by[dq.input[0]].op_type == "Gather"
               for dq in dqs) == 3
    report = verify(model, path, batch)
    assert report.ok() and report.weight_mismatches == 0 and not report.unmatched_weights
    assert len(report.weights) == 3 + 2 * 6 + 1  # tables, 6 Linear per layer, pooler
    findings = check_qdq(path)  # only the float attention matmuls of any weight-only BERT
    assert {f.rule for f in findings} == {"float-input"}
    assert all("/attention/self/MatMul" in f.node for f in findings)
    # the tables hold most of this model's weights: they are what the file shrinks by
    # (measured: 1.9x with the Linear layers only, 3.5x with the tables too; biases,
    # LayerNorms and the graph itself weigh a lot in a model this small)
    assert fp32.bytes / result.bytes > 3 and fp32.bytes / result.bytes > \
        1.6 * fp32.bytes / before.bytes
    assert result.fp32_bytes == pytest.approx(fp32.bytes, rel=0.05)
    restored = qdq.restore(_tiny_bert(7), qdq.save(model, tmp_path / "w4.qdq.pt"))
    with torch.no_grad():
        assert torch.equal(restored(**batch).last_hidden_state,
                           model(**batch).last_hidden_state)


def test_tables_are_int8_by_default_in_both_weight_only_formats(rng, tmp_path):
    """A table is looked up, not multiplied: INT8 by default, also in INT4 models, whose
    format stays w4 (in PyTorch and in the ONNX graph) with their tables INT8."""
    torch.manual_seed(0)
    model = Tagger().eval()
    weight_only(model, bits=4, block_size=16)
    assert model.emb.weight_q.bits == 8 and model.head.weight_q.bits == 4
    assert qdq.format_of(model) == "w4"
    path = tmp_path / "t.onnx"
    to_onnx(model, _ids(rng), path)
    proto = onnx.load(str(path))
    assert onnx_format(proto) == "w4" and uses_int4(proto)
    assert verify(model, path, _ids(rng)).ok()
    assert model.emb.weight_q.block_size is None  # INT8 tables: one scale per row
    restored = qdq.restore(Tagger().eval(), qdq.save(model, tmp_path / "t.qdq.pt"))
    assert restored.emb.weight_q.bits == 8 and qdq.format_of(restored) == "w4"
    ids = _ids(rng)
    with torch.no_grad():
        assert torch.equal(restored(ids), model(ids))
    with pytest.raises(FormatError, match="embedding_bits"):
        weight_only(Tagger(), bits=4, embedding_bits=3)
    alone = Lookup(nn.Embedding(40, 32)).eval()
    weight_only(alone, bits=4)
    assert qdq.format_of(alone) == "w8"  # only tables: they decide
