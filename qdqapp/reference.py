"""The Fashion-MNIST reference CNN: small, but with every pattern placement rules care about.

It has residual adds (an identity shortcut and a strided 1x1-conv shortcut), a concat of
two conv branches, BatchNorm after every conv, ReLU, max pooling and global average
pooling, so calibration, sensitivity, the TensorRT rules and export are exercised on a
real trained network in seconds on a CPU. About 120k parameters and 10M multiply-adds per
image; the shipped checkpoint scores 90.86% on the test set (BENCHMARKS.md).

The trained checkpoint ships inside the package (``qdqapp/assets/fmnist_resnet.pt``,
a float ``state_dict``), so demos and tests never retrain::

    model = load_reference_model()        # eval mode, on the CPU
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["DEFAULT_CHECKPOINT", "ReferenceNet", "build_reference_model",
           "load_reference_model", "ReferenceCheckpointError"]

DEFAULT_CHECKPOINT = Path(__file__).with_name("assets") / "fmnist_resnet.pt"


class ReferenceCheckpointError(RuntimeError):
    """The checkpoint is missing, unreadable or made for another model."""


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN with a residual add; a strided 1x1 conv+BN shortcut when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv_bn(cout, cout, 3)
        self.shortcut = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.conv2(self.relu1(self.conv1(x)))
        return self.relu2(out + identity)


class ConcatBlock(nn.Module):
    """A 3x3 and a 1x1 conv branch side by side, concatenated along channels."""

    def __init__(self, cin: int, branch: int) -> None:
        super().__init__()
        self.wide = nn.Sequential(_conv_bn(cin, branch, 3), nn.ReLU(inplace=True))
        self.narrow = nn.Sequential(_conv_bn(cin, branch, 1), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.wide(x), self.narrow(x)], dim=1)


class ReferenceNet(nn.Module):
    """28x28 -> stem (32) -> maxpool -> residual (32) -> concat (64) -> strided residual
    (96, 7x7) -> global average pool -> linear (10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(1, 32, 3), nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(2)
        self.layer1 = BasicBlock(32, 32)
        self.mix = ConcatBlock(32, 32)
        self.layer2 = BasicBlock(64, 96, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(96, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        x = self.layer2(self.mix(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_reference_model(num_classes: int = 10) -> ReferenceNet:
    """A freshly initialised reference network (float, train mode)."""
    return ReferenceNet(num_classes)


def load_reference_model(checkpoint: str | os.PathLike | None = None,
                         map_location: str | torch.device = "cpu") -> ReferenceNet:
    """The reference network with trained weights, in eval mode.

    ``checkpoint`` defaults to the one shipped with the package; any float ``state_dict``
    of :class:`ReferenceNet` (optionally under a ``"state_dict"`` key) is accepted.
    """
    path = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    if not path.is_file():
        hint = (" (train one with scripts/train_reference.py)" if checkpoint is None else "")
        raise ReferenceCheckpointError(f"reference checkpoint {path}: no such file{hint}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - every unreadable file gets one message
        raise ReferenceCheckpointError(
            f"reference checkpoint {path}: cannot be read ({str(err).splitlines()[0]})"
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ReferenceCheckpointError(
            f"reference checkpoint {path}: holds a {type(state).__name__}, not a state_dict")
    model = build_reference_model()
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ReferenceCheckpointError(
            f"reference checkpoint {path} does not fit ReferenceNet: "
            f"{str(err).splitlines()[0]}") from err
    return model.eval()
