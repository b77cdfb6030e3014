"""A one-line Triton kernel that tells whether the interpreter can be trusted here.

Triton 3.0's interpreter (torch 2.4) runs kernels on CPU tensors but never writes their
results back; later versions do. Imported only in the interpreter subprocess of
``test_qat_fused``.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _iota(ptr, BLOCK: tl.constexpr):
    tl.store(ptr + tl.arange(0, BLOCK), tl.arange(0, BLOCK).to(tl.float32))


def interpreter_writes_back() -> bool:
    out = torch.zeros(8)
    _iota[(1,)](out, BLOCK=8)
    return torch.equal(out, torch.arange(8.0))
