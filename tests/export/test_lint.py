"""check_qdq on small hand-built ONNX graphs (each rule firing and not) and on exports."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import check_qdq, to_onnx
from export.lint import RULES, LintError, format_findings
from tests.export.conftest import quantized_torchvision


def _init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def build(*, opset=13, x_scale=0.05, x_zp=None, x_axis_scales=None, w_axis=0,
          w_scale=None, drop_dq=False, float_weight=False, conv_op="Conv", residual=None,
          pool=None, concat=None, w_codes=None) -> onnx.ModelProto:
    """X -> Q/DQ -> Conv(DQ(W)) -> Y, with one knob per rule to break it.

    ``w_codes`` stores the weight as integer codes behind one DequantizeLinear, as the
    weight-only formats do: ``(bits, block_size)``, ``bits`` 4 or 8, ``block_size`` None
    for one scale per output channel."""
    rng = np.random.default_rng(0)
    x_zp = np.int8(0) if x_zp is None else x_zp
    inits, nodes, extra = [], [], []
    c_out = 3
    shape_w = [c_out, 3, 3, 3] if conv_op == "Conv" else [3, c_out, 3, 3]
    w = rng.standard_normal(shape_w).astype(np.float32)
    ch_axis = 0 if conv_op == "Conv" else 1
    w_scale = (np.abs(w).max(axis=tuple(i for i in range(4) if i != ch_axis)) / 127
               if w_scale is None else w_scale).astype(np.float32)
    inits += [_init("W", w), _init("w_scale", w_scale),
              _init("w_zp", np.zeros(w_scale.shape, np.int8))]
    xs = np.float32(x_scale) if x_axis_scales is None else np.asarray(x_axis_scales, np.float32)
    zp = x_zp if x_axis_scales is None else np.zeros(xs.shape, np.int8)
    inits += [_init("x_scale", xs), _init("x_zp", zp)]
    x_axis = [] if x_axis_scales is None else [helper.make_attribute("axis", 1)]
    q = helper.make_node("QuantizeLinear", ["X", "x_scale", "x_zp"], ["xq"], name="q_x")
    dq = helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="dq_x")
    q.attribute.extend(x_axis)
    dq.attribute.extend(x_axis)
    nodes += [q] if drop_dq else [q, dq]
    conv_in = "xq_cast" if drop_dq else "xd"
    if drop_dq:
        nodes.append(helper.make_node("Cast", ["xq"], ["xq_cast"], to=TensorProto.FLOAT))
    if float_weight:
        weight = "W"
    elif w_codes is not None:
        weight = _weight_codes(w, *w_codes, inits, nodes)
    else:
        nodes += [helper.make_node("QuantizeLinear", ["W", "w_scale", "w_zp"], ["wq"],
                                   name="q_w", axis=w_axis),
                  helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["wd"],
                                   name="dq_w", axis=w_axis)]
        weight = "wd"
    nodes.append(helper.make_node(conv_op, [conv_in, weight], ["conv"], name="conv",
                                  pads=[1, 1, 1, 1]))
    out = "conv"
    if residual is not None:  # "quantized" or "float" identity input
        if residual == "quantized":
            nodes.append(helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"],
                                          ["skip"], name="dq_skip"))
        nodes.append(helper.make_node("Add", [out, "skip" if residual == "quantized" else "X"],
                                      ["sum"], name="add"))
        out = "sum"
    if pool is not None:  # scale of the Q after the MaxPool
        nodes += [helper.make_node("MaxPool", ["xd"], ["pooled"], name="maxpool",
                                   kernel_shape=[1, 1]),
                  helper.make_node("QuantizeLinear", ["pooled", "p_scale", "x_zp"], ["pq"],
                                   name="q_pool"),
                  helper.make_node("DequantizeLinear", ["pq", "p_scale", "x_zp"], ["pd"],
                                   name="dq_pool")]
        inits.append(_init("p_scale", np.float32(pool)))
        extra.append("pd")
    if concat is not None:  # second input: "other-scale" or "float"
        if concat == "other-scale":
            inits.append(_init("c_scale", np.float32(x_scale * 2)))
            nodes += [helper.make_node("QuantizeLinear", ["X", "c_scale", "x_zp"], ["cq"],
                                       name="q_c"),
                      helper.make_node("DequantizeLinear", ["cq", "c_scale", "x_zp"], ["cd"],
                                       name="dq_c")]
            second = "cd"
        else:
            second = "X" if concat == "float" else "xd"
        nodes.append(helper.make_node("Concat", ["xd", second], ["cat"], name="concat", axis=1))
        inits.append(_init("cat_w", np.ones([c_out, 6, 1, 1], np.float32)))
        nodes += [helper.make_node("QuantizeLinear", ["cat", "x_scale", "x_zp"], ["catq"],
                                   name="q_cat"),
                  helper.make_node("DequantizeLinear", ["catq", "x_scale", "x_zp"], ["catd"],
                                   name="dq_cat")]
        out_cat = "catd"
        inits += [_init("cw_scale", np.full([c_out], 1 / 127, np.float32)),
                  _init("cw_zp", np.zeros([c_out], np.int8))]
        nodes += [helper.make_node("QuantizeLinear", ["cat_w", "cw_scale", "cw_zp"], ["cwq"],
                                   name="q_cw", axis=0),
                  helper.make_node("DequantizeLinear", ["cwq", "cw_scale", "cw_zp"], ["cwd"],
                                   name="dq_cw", axis=0),
                  helper.make_node("Conv", [out_cat, "cwd"], ["cat_conv"], name="cat_conv")]
        extra.append("cat_conv")
    graph = helper.make_graph(
        nodes, "lint_case", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, 3, 8, 8]) for o in [out, *extra]],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _weight_codes(w: np.ndarray, bits: int, block: int | None, inits: list,
                  nodes: list) -> str:
    """``W`` as int4/int8 codes -> DequantizeLinear (per output channel or in blocks of
    ``block`` along the input axis 1); returns the dequantized tensor's name."""
    from export.formats import int4_initializer

    qmax = 7 if bits == 4 else 127
    if block:  # one scale per block of inputs at each output channel and kernel position
        blocks = w.reshape(w.shape[0], w.shape[1] // block, block, *w.shape[2:])
        scale = (np.abs(blocks).max(axis=2) / qmax).astype(np.float32)
        per_weight = np.repeat(scale, block, axis=1)
    else:
        scale = (np.abs(w).max(axis=(1, 2, 3)) / qmax).astype(np.float32)
        per_weight = scale.reshape(-1, 1, 1, 1)
    codes = np.clip(np.round(w / per_weight), -qmax - 1, qmax).astype(np.int8)
    inits.append(int4_initializer("w_codes", codes) if bits == 4 else _init("w_codes", codes))
    inits.append(_init("wc_scale", scale))
    dq = helper.make_node("DequantizeLinear", ["w_codes", "wc_scale"], ["wcd"],
                          name="dq_w_codes", axis=1 if block else 0,
                          **({"block_size": block} if block else {}))
    nodes.append(dq)
    return "wcd"


CASES = {
    # rule: (knobs that make it fire)
    "opset": dict(opset=10, w_axis=0, x_axis_scales=None),
    "zero-point": dict(x_zp=np.int8(3)),
    "scale": dict(x_scale=0.0),
    "per-axis-activation": dict(x_axis_scales=[0.1, 0.2, 0.3]),
    "weight-axis": dict(w_axis=1, w_scale=np.full([3], 0.01, np.float32)),
    "q-without-dq": dict(drop_dq=True),
    "float-input": dict(float_weight=True),
    "int4-conv": dict(opset=21, w_codes=(4, None)),
    "residual-add": dict(residual="float"),
    "shared-scale": dict(pool=0.1),
}


def _rules(model) -> set[str]:
    return {f.rule for f in check_qdq(model)}


def test_clean_graph_has_no_findings_and_runs():
    model = build(residual="quantized", pool=0.05, concat="same")
    onnx.checker.check_model(model)
    assert check_qdq(model) == [], format_findings(check_qdq(model))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sess.run(None, {"X": np.zeros([1, 3, 8, 8], np.float32)})


def test_every_rule_has_a_case():
    assert set(CASES) == set(RULES)


@pytest.mark.parametrize("rule", sorted(CASES))
def test_rule_fires(rule):
    findings = check_qdq(build(**CASES[rule]))
    hits = [f for f in findings if f.rule == rule]
    assert hits, format_findings(findings)
    assert hits[0].severity == RULES[rule][0]
    assert hits[0].node and hits[0].message


def test_conv_transpose_weight_axis():
    assert "weight-axis" not in _rules(build(conv_op="ConvTranspose", w_axis=1))
    assert "weight-axis" in _rules(build(conv_op="ConvTranspose", w_axis=0,
                                         w_scale=np.full([3], 0.01, np.float32)))


def test_unsigned_and_missing_zero_point():
    model = build(x_zp=np.uint8(0))
    assert any("uint8" in f.message for f in check_qdq(model))


@pytest.mark.parametrize("codes, fires", [((4, None), "INT4"), ((4, 3), "INT4"),
                                          ((8, 3), "block-wise"), ((8, None), None)])
def test_int4_and_block_weights_of_a_conv(codes, fires):
    """TensorRT has no INT4 or block-wise convolution: the Conv is named; an INT8
    per-channel weight is not this rule's business. ONNX Runtime runs every case."""
    model = build(opset=21, w_codes=codes)
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sess.run(None, {"X": np.zeros([1, 3, 8, 8], np.float32)})
    hits = [f for f in check_qdq(model) if f.rule == "int4-conv"]
    if fires is None:
        assert hits == []
        return
    assert [(f.node, f.severity) for f in hits] == [("conv", "error")]
    assert hits[0].message.startswith(f"{fires} weight from 'dq_w_codes'")
    assert "Conv" in hits[0].message


def test_concat_scales():
    assert "shared-scale" in _rules(build(concat="other-scale"))
    assert any("mixes quantized and float" in f.message
               for f in check_qdq(build(concat="float")))
    assert "shared-scale" not in _rules(build(concat="same"))


def test_bad_files(tmp_path):
    with pytest.raises(LintError, match="no such file"):
        check_qdq(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_text("not an onnx model at all")
    with pytest.raises(LintError, match="bad.onnx"):
        check_qdq(bad)
    with pytest.raises(LintError, match="unknown lint rule"):
        check_qdq(build(), rules=["no-such-rule"])


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_exported_torchvision_models(name, tmp_path):
    """Exports have no errors; the residual adds (identity not quantized) are flagged."""
    model, inputs = quantized_torchvision(name, 32)
    to_onnx(model, inputs[:1], tmp_path / "m.onnx", fold_bn=False)
    findings = check_qdq(tmp_path / "m.onnx")
    assert not [f for f in findings if f.severity == "error"], format_findings(findings)
    adds = {f.node for f in findings if f.rule == "residual-add"}
    assert len(adds) == (8 if name == "resnet18" else 10)
    assert not [f for f in findings if f.rule == "float-input"]


def test_int8_weight_export_lints_clean(tmp_path):
    model, inputs = quantized_torchvision("resnet18", 32)
    to_onnx(model, inputs[:1], tmp_path / "m.onnx", fold_bn=False, int8_weights=True)
    assert not [f for f in check_qdq(tmp_path / "m.onnx") if f.severity == "error"]


def test_placement_rules_make_resnet18_lint_clean(tmp_path):
    """With qdq.rules placing Q/DQ (residual inputs quantized), nothing is left to flag."""
    import torch
    import torchvision

    from qdq.rules import apply_rules
    from tests.export.conftest import calibrate

    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    model = apply_rules(torchvision.models.resnet18().eval(), x[:1])
    calibrate(model, x)
    to_onnx(model, x[:1], tmp_path / "placed.onnx")
    assert check_qdq(tmp_path / "placed.onnx") == []


def test_int4_weight_only_export_names_its_convs_not_its_linear(tmp_path):
    """qdq.weight_only(bits=4) puts INT4 blocks on every Conv and Linear; ONNX Runtime
    runs them all, TensorRT only the Gemm: each Conv is an error, the Gemm is not."""
    import torch
    from torch import nn

    import qdq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).eval()
    qdq.weight_only(model, bits=4, block_size=8)
    to_onnx(model, torch.randn(1, 8, 4, 4), tmp_path / "w4.onnx")
    findings = check_qdq(tmp_path / "w4.onnx")
    graph = onnx.load(str(tmp_path / "w4.onnx")).graph
    convs = {n.name for n in graph.node if n.op_type == "Conv"}
    flagged = [f for f in findings if f.rule == "int4-conv"]
    assert {f.node for f in flagged} == convs and len(convs) == 2
    assert all(f.severity == "error" for f in flagged)
    assert not any("Gemm" in f.node or "MatMul" in f.node for f in flagged)
