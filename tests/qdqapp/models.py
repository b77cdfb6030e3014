"""Small models and functions the CLI tests load by spec (``tests.qdqapp.models:NAME``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv-bn-relu, a residual block and a linear head: rules, folding, export in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_cnn() -> nn.Module:
    return TinyCNN()


class ExportsSomethingElse(TinyCNN):
    """Runs differently while exported: ONNX Runtime must disagree with PyTorch."""

    def forward(self, x):
        out = super().forward(x)
        return out + 5.0 if torch.onnx.is_in_onnx_export() else out


def exports_something_else() -> nn.Module:
    return ExportsSomethingElse()


def broken_eval(model: nn.Module, loader) -> float:
    raise RuntimeError("this evaluation always fails")


class WithAuxHead(TinyCNN):
    """An auxiliary head used only in training, as googlenet/inception have: calibration
    (eval mode) never calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(8, 4)

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            return out, self.aux(torch.flatten(x.mean((2, 3), keepdim=True), 1)[:, :8])
        return out


def with_aux_head() -> nn.Module:
    return WithAuxHead()
