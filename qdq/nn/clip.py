"""``Clip``: clamp to a range that may be learned (PACT-style), pytorch-quantization's
``nn.Clip``.

The gradient of the clipped input passes only strictly inside the range; the bounds
collect the gradient of the values they clipped, as TensorFlow's ``clip_by_value`` and
PACT define it. Learnable bounds are scalars.
"""

from __future__ import annotations

import torch
from torch import nn

from qdq.clipping import clip

__all__ = ["Clip"]


def _bound(value, learn: bool, which: str):
    if not learn:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # as in pytorch-quantization: a learnable range starts from a Python number
        raise ValueError(f"Clip: a learnable {which} must be scalar (a Python float), got "
                         f"{type(value).__name__}")
    return nn.Parameter(torch.tensor(float(value)))


class Clip(nn.Module):
    """Clamp the input to ``[clip_value_min, clip_value_max]``.

    Args:
        clip_value_min, clip_value_max: numbers or tensors (broadcast to the input).
        learn_min, learn_max: make that bound a trainable scalar Parameter, initialized
            from the value given.
    """

    def __init__(self, clip_value_min, clip_value_max, learn_min: bool = False,
                 learn_max: bool = False) -> None:
        super().__init__()
        self.clip_value_min = _bound(clip_value_min, learn_min, "clip_value_min")
        self.clip_value_max = _bound(clip_value_max, learn_max, "clip_value_max")

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return clip(inputs, self.clip_value_min, self.clip_value_max)

    def extra_repr(self) -> str:
        def text(v):
            return f"{float(v):g}" if torch.as_tensor(v).numel() == 1 else "tensor"
        return f"min={text(self.clip_value_min)}, max={text(self.clip_value_max)}"
