"""The fused (Triton) fake-quant path gives the eager path's numbers bit for bit.

On CUDA the kernels run compiled (``needs_cuda``); everywhere else the same kernels run
in Triton's interpreter on CPU tensors, in a subprocess (the interpreter is chosen when
Triton is imported), against the CPU eager path.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from qdq.kernels import FAKE_QUANT_BACKENDS, resolve_backend
from qdq.quantizer import TensorQuantizer
from qdq.tensor_quant import fake_quant

ROOT = Path(__file__).resolve().parents[2]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (so -0.0 != 0.0), NaN matching NaN whatever its payload."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = a.isnan(), b.isnan()
    view = {4: torch.int32, 2: torch.int16}[a.element_size()]
    bits_a = a.contiguous().view(view).masked_fill(nan_a.contiguous(), 0)
    bits_b = b.contiguous().view(view).masked_fill(nan_b.contiguous(), 0)
    return torch.equal(nan_a, nan_b) and torch.equal(bits_a, bits_b)


def _cases(device):
    g = torch.Generator().manual_seed(0)
    amax = torch.tensor(2.5)
    scale = (amax / 127).item()
    special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 2.5, -2.5,
                            2.6, -2.6, 0.5 * scale, -0.5 * scale, 1.5 * scale, -2.5 * scale,
                            -0.2 * scale, 126.5 * scale, -127.5 * scale, -128.5 * scale])
    base = torch.randn(5000, generator=g) * 2
    yield "fp32 per-tensor", torch.cat([base, special]), amax, {}
    yield "bf16 per-tensor", torch.cat([base, special]).bfloat16(), amax, {}
    yield "fp16 per-tensor", torch.cat([base, special]).half(), amax, {}
    yield "narrow range", base, amax, {"narrow_range": True}
    yield "unsigned", base.abs(), amax, {"unsigned": True}
    yield "4 bits", base, amax, {"num_bits": 4}
    yield "tiny amax", base * 1e-9, torch.tensor(0.0), {}
    w = torch.randn(6, 5, 3, 3, generator=g)
    w_amax = w.abs().amax(dim=(1, 2, 3), keepdim=True) * 0.8
    w_amax[2] = 0.0  # a dead channel
    yield "per-channel axis 0", w, w_amax, {}
    yield "per-channel axis 1", w, w.abs().amax(dim=(0, 2, 3), keepdim=True) * 0.7, {}
    act = torch.randn(3, 8, 7, 5, generator=g).bfloat16()
    yield "channels_last bf16", act.contiguous(memory_format=torch.channels_last), amax, {}
    yield "per-channel fp32 rows", torch.randn(4, 33, generator=g), torch.rand(4, 1) + 0.5, {}


def run_cases(device: str) -> int:
    """Compare the fused and eager paths forward and backward; raise on any difference."""
    from qdq.kernels.fake_quant import fused_fake_tensor_quant, fused_supported, triton_available

    checked = 0
    for name, x, amax, kw in _cases(device):
        x = x.to(device)
        amax = amax.to(device)
        interpret = device == "cpu"
        assert fused_supported(x, amax, interpret=interpret), name
        xe = x.detach().clone().requires_grad_(True)
        xf = x.detach().clone().requires_grad_(True)
        if x.dim() == 4 and not x.is_contiguous():
            xe = x.detach().clone(memory_format=torch.channels_last).requires_grad_(True)
            xf = x.detach().clone(memory_format=torch.channels_last).requires_grad_(True)
        out_e = fake_quant(xe, amax, **kw)
        out_f = fused_fake_tensor_quant(xf, amax, **kw)
        assert out_f.dtype == out_e.dtype and out_f.stride() == x.stride(), name
        assert _same_bits(out_e, out_f), f"{name}: forward differs"
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
        grad[..., :3] = torch.tensor([-1.0, float("inf"), float("nan")]).to(x.dtype)
        out_e.backward(grad.to(device))
        out_f.backward(grad.to(device))
        assert _same_bits(xe.grad, xf.grad), f"{name}: gradient differs"
        assert not torch.equal(xf.grad.isfinite(), torch.ones_like(xf.grad, dtype=torch.bool))
        checked += 1
    # A kernel that failed to build would have switched itself off and let the eager path
    # answer: make sure the kernels really ran.
    assert triton_available(), "the fused kernels were disabled during the run"
    print(f"fused == eager for {checked} cases")
    return checked


NO_WRITE_BACK = 3  # exit code of the subprocess when the interpreter cannot be used


@pytest.mark.slow
def test_fused_kernels_match_eager_bit_for_bit_in_the_triton_interpreter():
    triton = pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    code = ("import sys; from tests.qdq.triton_probe import interpreter_writes_back; "
            "from tests.qdq.test_qat_fused import run_cases; "
            f"sys.exit({NO_WRITE_BACK}) if not interpreter_writes_back() else run_cases('cpu')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode == NO_WRITE_BACK:
        pytest.skip(f"Triton {triton.__version__}'s interpreter does not write kernel results "
                    "back to CPU tensors")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fused == eager for 11 cases" in proc.stdout


@needs_cuda
def test_fused_kernels_match_eager_bit_for_bit_on_cuda():
    pytest.importorskip("triton")
    assert run_cases("cuda") == 11


@needs_cuda
def test_quantized_conv_training_step_is_identical_with_both_backends():
    pytest.importorskip("triton")
    from qdq.replace import quantizers, replace_modules

    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 3), nn.Flatten(), nn.Linear(8 * 10 * 10, 10))
        replace_modules(m)
        for _, q in quantizers(m):
            q.disable_quant()
            q.enable_calib()
        with torch.no_grad():
            m(torch.randn(8, 3, 12, 12))
        for _, q in quantizers(m):
            q.load_calib_amax()
            q.disable_calib()
            q.enable_quant()
        return m.cuda()

    x = torch.randn(4, 3, 12, 12, device="cuda")
    grads = {}
    for backend in ("eager", "fused"):
        m = make()
        for _, q in quantizers(m):
            q.backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x)
        out.float().sum().backward()
        grads[backend] = (out, [p.grad for p in m.parameters()])
    assert torch.equal(grads["eager"][0], grads["fused"][0])
    for a, b in zip(grads["eager"][1], grads["fused"][1], strict=True):
        assert torch.equal(a, b)
    from qdq.kernels.fake_quant import triton_available

    assert triton_available()


def test_auto_backend_uses_eager_on_cpu_and_names_are_checked():
    x = torch.randn(8)
    assert resolve_backend("auto", x) is FAKE_QUANT_BACKENDS["eager"]
    assert resolve_backend("fused", x) is FAKE_QUANT_BACKENDS["fused"]
    with pytest.raises(ValueError, match="fake-quant backend 'cuda'"):
        resolve_backend("cuda", x)
    q = TensorQuantizer()
    q.amax = 1.0
    q.backend = "fused"  # no Triton launch on CPU tensors: the eager numbers come back
    assert torch.equal(q(x), fake_quant(x, torch.tensor(1.0)))
    q.backend = "nope"
    with pytest.raises(ValueError, match="nope"):
        q(x)


def test_learnable_amax_keeps_its_gradient_with_the_fused_backend():
    from qdq.kernels.fake_quant import fused_fake_tensor_quant

    amax = torch.tensor(1.0, requires_grad=True)
    x = torch.randn(64) * 2
    fused_fake_tensor_quant(x, amax).sum().backward()
    assert amax.grad is not None and amax.grad.abs() > 0
