"""QAT training-step time against the float step, every fake-quant variant side by side.

Model: a torchvision architecture (random weights), SGD step with bf16 autocast; every
Conv/Linear input and weight fake-quantized (inputs per tensor, weights per channel),
amax calibrated once on the benchmark batch and shared by all variants. Variants:

- ``fp32``: the float model (the baseline the ratios divide by);
- ``torch-cast``: torch's ``fake_quantize_per_{tensor,channel}_affine`` with bf16
  activations cast to fp32 first (what a quantizer built on those ops does);
- ``torch-native``: the same ops on the activations' own dtype, where torch allows it;
- ``qdq-eager``: ``TensorQuantizer.backend = "eager"`` (plain torch ops);
- ``qdq-fused``: ``backend = "fused"`` (Triton kernels; eager on CPUs);
- ``qdq-compiled`` (``--compile``): the whole quantized model through torch.compile.

Steps are timed with CUDA events, variants interleaved round by round, median per step.

    PYTHONPATH=. python scripts/bench_qat_gpu.py --model resnet50 --batch-size 128
    PYTHONPATH=. python scripts/bench_qat_gpu.py --device cpu --model resnet18 \
        --batch-size 2 --image-size 64 --steps 2 --rounds 1   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from qdq.kernels import FAKE_QUANT_BACKENDS
from qdq.replace import quantizers, replace_modules
from qdq.tensor_quant import AMAX_EPS, quant_bounds


def _torch_ops(x, amax, num_bits=8, unsigned=False, narrow_range=False, cast=True):
    """torch's own fake-quant ops, inserted the naive way (no fusion, no dtype care)."""
    qmin, qmax, divisor = quant_bounds(num_bits, unsigned, narrow_range)
    scale = amax.float().clamp_min(AMAX_EPS) / divisor
    xin = x.float() if cast and x.dtype != torch.float32 else x
    if amax.numel() == 1:
        zp = torch.zeros((), dtype=torch.int32, device=x.device)
        out = torch.fake_quantize_per_tensor_affine(xin, scale.reshape(()), zp, qmin, qmax)
    else:
        axis = next(i for i, s in enumerate(amax.shape) if s != 1)
        zp = torch.zeros(scale.numel(), dtype=torch.int32, device=x.device)
        out = torch.fake_quantize_per_channel_affine(xin, scale.reshape(-1), zp, axis, qmin,
                                                     qmax)
    return out.to(x.dtype)


FAKE_QUANT_BACKENDS.setdefault("torch-cast", _torch_ops)
FAKE_QUANT_BACKENDS.setdefault(
    "torch-native", lambda x, amax, *a, **k: _torch_ops(x, amax, *a, cast=False, **k))


def quantized(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Quant twins for every layer; only Conv/Linear quantizers stay on; max-calibrated."""
    model = copy.deepcopy(model)
    replace_modules(model)
    for name, q in quantizers(model):
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if not isinstance(owner, (nn.Conv2d, nn.Linear)):
            q.disable()
    model.eval()
    for _, q in quantizers(model):
        if q.is_enabled:
            q.disable_quant()
            q.enable_calib()
    with torch.no_grad(), _autocast(example.device):
        model(example)
    for _, q in quantizers(model):
        if q.is_enabled:
            q.load_calib_amax()
            q.disable_calib()
            q.enable_quant()
    return model.train()


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


class Variant:
    def __init__(self, name: str, model: nn.Module, device: torch.device) -> None:
        self.name, self.model, self.device = name, model, device
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        self.times: list[float] = []
        self.error: str | None = None
        self.step_fn: Callable = model

    def step(self, x, y) -> None:
        with _autocast(self.device):
            loss = F.cross_entropy(self.step_fn(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def run(self, x, y, steps: int) -> float:
        """Mean ms per step over ``steps`` steps."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            start.record()
            for _ in range(steps):
                self.step(x, y)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / steps
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step(x, y)
        return (time.perf_counter() - t0) * 1000 / steps


def build_variants(args, device) -> list[Variant]:
    torch.manual_seed(0)
    base = torchvision.models.get_model(args.model, weights=None).to(device)
    example = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    qbase = quantized(base, example)
    variants = [Variant("fp32", base, device)]
    for name, backend in (("torch-cast", "torch-cast"), ("torch-native", "torch-native"),
                          ("qdq-eager", "eager"), ("qdq-fused", "fused")):
        model = copy.deepcopy(qbase)
        for _, q in quantizers(model):
            q.backend = backend
        variants.append(Variant(name, model, device))
    if args.compile:
        model = copy.deepcopy(qbase)
        for _, q in quantizers(model):
            q.backend = "eager"
        v = Variant("qdq-compiled", model, device)
        v.step_fn = torch.compile(model)
        variants.append(v)
    return variants


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="add torch.compile of the model")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    variants = build_variants(args, device)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    for v in variants:
        try:
            v.run(x, y, args.warmup)
        except Exception as err:  # noqa: BLE001 - report the variant as failed, keep going
            v.error = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    for _ in range(args.rounds):
        for v in variants:
            if v.error is None:
                v.times.append(v.run(x, y, args.steps))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    print(f"{args.model} batch {args.batch_size} {args.image_size}px bf16 autocast on {name}; "
          f"torch {torch.__version__}, triton {triton_version}; median of {args.rounds} "
          f"rounds x {args.steps} steps")
    base = statistics.median(variants[0].times)
    rows = []
    print(f"{'variant':<14} {'ms/step':>9} {'vs fp32':>8}")
    for v in variants:
        if v.error:
            print(f"{v.name:<14} {'failed':>9}  {v.error}")
            rows.append({"variant": v.name, "error": v.error})
            continue
        ms = statistics.median(v.times)
        print(f"{v.name:<14} {ms:9.2f} {ms / base:7.3f}x")
        rows.append({"variant": v.name, "ms": ms, "ratio": ms / base, "all_ms": v.times})
    if args.json:
        args.json.write_text(json.dumps({"device": name, "args": vars(args) | {
            "json": str(args.json)}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
