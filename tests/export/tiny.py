"""A small CNN with BatchNorm and a residual add, importable as a CLI model factory
(``tests.export.tiny:small_cnn``), so CLI tests run in seconds."""

from __future__ import annotations

from torch import nn


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = (self.bn(self.conv(x)) + x).relu()
        return self.fc(self.pool(x).flatten(1))


def small_cnn() -> nn.Module:
    return SmallCNN()
