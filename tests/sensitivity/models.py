"""Small real models and data for the sensitivity tests (trained in about a second)."""

from __future__ import annotations

import os

import torch
from torch import nn

import qdq
from sensitivity.calibrate import calibrate

CLASSES = 4
SIZE = 12


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, CLASSES)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = self.pool(x).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def make_data(n: int, seed: int, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Noisy copies of one fixed template per class: separable, yet not trivially so."""
    templates = torch.randn(CLASSES, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    x = templates[labels] + 1.2 * torch.randn(n, 1, SIZE, SIZE, generator=gen)
    return [(x[i:i + batch], labels[i:i + batch]) for i in range(0, n, batch)]


_TRAINED: dict[str, torch.Tensor] | None = None


def trained_state() -> dict[str, torch.Tensor]:
    """Weights of TinyNet after a short, seeded training run (cached per process)."""
    global _TRAINED
    if _TRAINED is None:
        torch.manual_seed(0)
        model = TinyNet()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(3):
            for x, y in make_data(512, seed=1):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        _TRAINED = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return _TRAINED


#: Subprocesses (CLI, distributed workers) load the weights from this file if it is set,
#: instead of training again.
WEIGHTS_ENV = "QDQ_TEST_TINYNET"


def float_model() -> TinyNet:
    model = TinyNet()
    path = os.environ.get(WEIGHTS_ENV)
    state = torch.load(path, weights_only=True) if path else trained_state()
    model.load_state_dict(state)
    return model.eval()


def save_weights(path) -> str:
    torch.save(trained_state(), path)
    return str(path)


def build() -> TinyNet:
    """Factory for the CLI tests (``tests.sensitivity.models:build``)."""
    return float_model()


def quantized_model(calib_seed: int = 2) -> TinyNet:
    model = float_model()
    qdq.replace_modules(model)
    calibrate(model, make_data(128, seed=calib_seed), progress=False)
    return model
