"""Flips judged on each format's own grid: verdicts that mean the same on any batch.

FP8 E4M3's grid step shrinks with the value (8 steps per power of two, subnormals of
``2^-9`` scale near zero), so near zero float noise crosses several codes. The model here
makes that happen for real: pre-activations of -7 to -2 put GELU's outputs just below zero,
where torch's ``0.5 x (1 + erf(x / sqrt 2))`` loses digits to cancellation (about 1e-7 to
8e-7 absolute; ONNX Runtime's Erf graph does not lose them), and the FP8 quantizer after
it has amax of about 0.05: its subnormal step (1e-7) is finer than that noise. The rule
must call these flips float noise on every batch and report their margins; a difference
beyond float noise must still fail, for INT8 and FP8 alike.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import qdq
from export import VerifyError, to_onnx, verify
from export.flips import NOISE_REL, Grid, flip_stats
from export.verify import ort_session
from tests.export.conftest import calibrate


class GeluMLP(nn.Module):
    """fc1 -> GELU -> fc2, GELU's inputs between about -7 and -2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 256)
        self.fc2 = nn.Linear(256, 8)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


def _gelu_mlp(fmt: str) -> nn.Module:
    torch.manual_seed(0)
    model = GeluMLP().eval()
    with torch.no_grad():
        model.fc1.weight.normal_(0, 0.5 / 32**0.5)
        model.fc1.bias.fill_(-4.6)
    qdq.replace_modules(model)
    qdq.set_format(model, fmt)
    return calibrate(model, torch.randn(256, 32, generator=torch.Generator().manual_seed(9)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """fmt -> (fmt, model, ONNX path), each built once."""
    made = {}

    def get(fmt: str):
        if fmt not in made:
            model = _gelu_mlp(fmt)
            path = tmp_path_factory.mktemp("gelu") / f"{fmt}.onnx"
            to_onnx(model, torch.randn(1, 32), path)
            made[fmt] = fmt, model, path
        return made[fmt]

    return get


@pytest.fixture(params=["fp8", "int8"])
def gelu_onnx(request, exported):
    return exported(request.param)


BATCHES = [(1, 1), (2, 4), (3, 16), (4, 64), (5, 200)]  # (seed, rows)


def test_the_verdict_is_the_same_on_every_batch(gelu_onnx):
    fmt, model, path = gelu_onnx
    most_codes = 0
    for seed, rows in BATCHES:
        x = torch.randn(rows, 32, generator=torch.Generator().manual_seed(seed))
        report = verify(model, path, x)
        assert report.ok(), str(report)
        assert report.verdict().startswith("same (")
        fc2 = next(q for q in report.quantizers if q.name == "fc2._input_quantizer")
        assert fc2.boundary_only and fc2.unexplained == 0
        assert fc2.max_input_diff <= fc2.noise
        most_codes = max(most_codes, fc2.max_flip_steps)
    if fmt == "fp8":
        # the case a one-code rule called a mismatch: several FP8 codes near zero
        assert most_codes >= 2
    else:
        assert most_codes == 1  # INT8: the noise allowance never reaches a second boundary


def test_fp8_flips_near_zero_are_measured_with_the_local_step(exported):
    _, model, path = exported("fp8")
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(4))
    report = verify(model, path, x)
    fc2 = next(q for q in report.quantizers if q.name == "fc2._input_quantizer")
    worst = fc2.worst
    assert worst is not None and fc2.flips > 0
    # the farthest boundary lies between the two runtimes' values, within the allowance,
    # measured in the local step of the grid there (one of E4M3's powers of two)
    assert worst.margin <= worst.difference * (1 + 1e-3) + 1e-12
    assert worst.margin <= fc2.noise
    assert np.log2(worst.local_step) == round(np.log2(worst.local_step))
    assert worst.margin == pytest.approx(worst.margin_steps * worst.local_step * worst.scale,
                                         rel=1e-9)
    assert worst.allowed_codes >= worst.codes
    assert fc2.noise >= NOISE_REL * float(model.fc2._input_quantizer.amax)
    text = str(report)
    assert "every flip explained by float noise" in text
    assert f"the boundary lies {worst.margin_steps:.3g} local steps ({worst.margin:.3g})" in text
    assert f"ONNX Runtime's value differs by {worst.difference:.3g}" in text
    assert f"allowance {fc2.noise:.3g}" in text
    assert f"local step {Grid('fp8').step_text(worst.local_step)}:" in text
    assert "within 0.5 steps" not in text


# ------------------------------------------------------------ the rule, with an oracle
def _ort_qdq(x: np.ndarray, scale: float, fp8: bool) -> np.ndarray:
    """ONNX Runtime's QuantizeLinear -> DequantizeLinear of ``x``: the oracle."""
    zp_type = TensorProto.FLOAT8E4M3FN if fp8 else TensorProto.INT8
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
         helper.make_tensor("zp", zp_type, [], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    return ort_session(model).run(None, {"x": x})[0]


def _quantizer(fmt: str, amax: float):
    q = qdq.TensorQuantizer(qdq.QuantDescriptor(num_bits=(4, 3) if fmt == "fp8" else 8,
                                                amax=amax))
    return q.eval()


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("relative, explained", [(3e-5, True), (3e-3, False)])
def test_the_rule_on_values_near_zero(fmt, relative, explained):
    """x_ort = x_torch + a fixed difference, relative to amax; ONNX Runtime quantizes it."""
    amax = 2.0
    q = _quantizer(fmt, amax)
    scale = float(q.step_size)
    x_torch = torch.linspace(-0.01, 0.01, 4001)
    x_ort = x_torch + relative * amax
    dq = torch.from_numpy(_ort_qdq(x_ort.numpy(), scale, fmt == "fp8"))
    stats = flip_stats("near_zero", "/Q", q, x_torch, x_ort, dq)
    assert stats.qdq_mismatches == 0  # PyTorch's quantizer == ONNX Runtime's Q/DQ
    assert stats.flips > 0
    assert stats.boundary_only is explained
    if explained and fmt == "fp8":
        # 6e-5 crosses about 7 subnormal steps of 2^-9 * 2/448 = 8.7e-6
        assert stats.max_flip_steps >= 6
    if explained and fmt == "int8":
        assert stats.max_flip_steps == 1
    if not explained:
        assert "x the float noise allowed" in stats.why_not()
        assert stats.why_not().startswith("near_zero: inputs differ by up to 0.006")


def test_a_changed_weight_fails_with_the_reason_in_numbers(gelu_onnx):
    fmt, model, path = gelu_onnx
    import copy

    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.fc1.bias.add_(0.05)
    report = verify(changed, path, torch.randn(16, 32))
    assert not report.ok() and not report.only_boundary_flips
    assert "flips not explained by float noise in 1 quantizer calls" in report.problems()
    text = str(report)
    assert "NOT all explained by float noise" in text
    assert "fc2._input_quantizer: inputs differ by up to" in text
    assert "<- NOT explained" in text


# --------------------------------------------------------------------- names in full
class Deep(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.inner = Deep(depth - 1) if depth else nn.Linear(16, 16)

    def forward(self, x):
        return self.inner(x)


def test_long_quantizer_names_are_printed_in_full(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("a_rather_long_block_name_for_the_encoder_stack", Deep(3))
    model.add_module("head", nn.Linear(16, 4))
    qdq.replace_modules(model)
    x = torch.randn(32, 16)
    calibrate(model, x)
    to_onnx(model, x[:1], tmp_path / "deep.onnx")
    text = str(verify(model, tmp_path / "deep.onnx", x))
    name = ("a_rather_long_block_name_for_the_encoder_stack.inner.inner.inner.inner."
            "_input_quantizer")
    assert len(name) > 80
    assert f"  {name}\n" in text + "\n"
    # the unmatched list too: an amax changed after export has no Q node
    with torch.no_grad():
        q = model.get_submodule(name)
        q.amax = q.amax * 1.5
    report = verify(model, tmp_path / "deep.onnx", x)
    assert report.unmatched_quantizers == [f"{name}#0"]
    assert f"    {name}#0" in str(report)


# --------------------------------------------------------------------------- NaN/Inf
@pytest.fixture
def small_int8(exported):
    return exported("int8")[1:]


def test_nan_weight_is_one_error_naming_it(small_int8):
    import copy

    model, path = small_int8
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.fc1.weight[3, 4] = float("nan")
        broken.fc1.weight[5, 6] = float("inf")
    with pytest.raises(VerifyError, match=r"parameter 'fc1.weight' holds 2 NaN/Inf values"):
        verify(broken, path, torch.randn(4, 32))


def test_nan_input_is_one_error_naming_it(small_int8):
    model, path = small_int8
    x = torch.randn(4, 32)
    x[1, 2] = float("nan")
    name = ort_session(path).get_inputs()[0].name
    with pytest.raises(VerifyError, match=rf"input '{name}' holds 1 NaN/Inf values"):
        verify(model, path, x)


def test_nan_in_the_onnx_file_is_one_error_naming_the_constant(small_int8, tmp_path):
    model, path = small_int8
    proto = onnx.load(str(path))
    init = next(i for i in proto.graph.initializer if i.name.endswith("fc2.bias"))
    values = onnx.numpy_helper.to_array(init).copy()
    values[0] = np.nan
    init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    onnx.save(proto, str(tmp_path / "nan.onnx"))
    with pytest.raises(VerifyError, match=r"nan.onnx: constant '.*fc2.bias' holds 1 NaN"):
        verify(model, tmp_path / "nan.onnx", torch.randn(4, 32))


def test_a_nan_quantizer_input_names_the_quantizer():
    """Finite weights and inputs can still overflow: the quantizer that meets it is named."""
    q = _quantizer("int8", 1.0)
    x = torch.tensor([0.5, float("inf"), -0.25])
    with pytest.raises(ValueError, match=r"quantizer big \(Q node /Q\): PyTorch's input holds "
                                         r"1 non-finite values"):
        flip_stats("big", "/Q", q, x, x.clone(), x.clone())
