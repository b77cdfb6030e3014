"""How qdq's fake-quant arithmetic compares with pytorch-quantization's and with ONNX
Runtime's, measured on the same tensors in one run.

qdq computes ``round(x / s) * s`` with the step size ``s = amax / 127`` (ONNX
QuantizeLinear / DequantizeLinear); pytorch-quantization computes
``round(x * k) / k`` with ``k = 127 / amax``. For each case the script prints the share of
outputs that differ from pytorch-quantization's formula, the largest difference in ulps
where both chose the same integer code, the share of codes that differ (rounding flips at
exact .5 boundaries), and the share of outputs that differ from ONNX Runtime.

Usage::

    PYTHONPATH=. python scripts/pq_arithmetic.py
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from qdq.tensor_quant import fake_tensor_quant, scale_from_amax, tensor_quant


def ort_qdq(x: np.ndarray, step: np.ndarray) -> np.ndarray:
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(step.astype(np.float32), "s"),
         numpy_helper.from_array(np.array(0, dtype=np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def pq_formula(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = 127.0 / amax
    q = torch.clamp(torch.round(x * k), -127, 127)
    return q, q / k


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of the last place (same sign assumed)."""
    if a.numel() == 0:
        return 0
    ai = a.numpy().view(np.int32).astype(np.int64)
    bi = b.numpy().view(np.int32).astype(np.int64)
    return int(np.abs(ai - bi).max())


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    cases = {
        "gaussian, amax = max|x|": (torch.randn(1_000_000, generator=gen), 1.0),
        "gaussian, amax = 0.5 max|x|": (torch.randn(1_000_000, generator=gen), 0.5),
        "uniform [0, 1), amax 0.7": (torch.rand(1_000_000, generator=gen), None),
        "ReLU of gaussian * 6": (torch.relu(torch.randn(1_000_000, generator=gen)) * 6, 1.0),
    }
    print(f"{'case':30s} {'vs pq: outputs':>15s} {'ulp (same code)':>16s} {'codes':>8s} "
          f"{'vs ORT: outputs':>16s}")
    for label, (x, frac) in cases.items():
        amax = torch.tensor(0.7) if frac is None else x.abs().max() * frac
        ours = fake_tensor_quant(x, amax)
        q_ours, _ = tensor_quant(x, amax)
        q_pq, out_pq = pq_formula(x, amax)
        out_ort = torch.from_numpy(ort_qdq(x.numpy(), scale_from_amax(amax).numpy()))
        # ORT runs the full int8 range; qdq's narrow default only moves -128 to -127 steps
        ours_full = fake_tensor_quant(x, amax, narrow_range=False)
        print(f"{label:30s} {float((ours != out_pq).float().mean()):15.2%} "
              f"{ulps(ours[q_ours == q_pq], out_pq[q_ours == q_pq]):16d} "
              f"{float((q_ours != q_pq).float().mean()):8.4%} "
              f"{float((ours_full != out_ort).float().mean()):16.2%}")


if __name__ == "__main__":
    main()
