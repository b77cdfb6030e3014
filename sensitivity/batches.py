"""How a batch of any shape reaches a model: tensors, (inputs, labels) tuples, dicts.

Calibration and evaluation accept any iterable of batches. These helpers are the single
place that decides which part of a batch is the model input and which is the label, so
every tool treats a data loader the same way; ``forward_fn`` overrides the input side
for models with their own call signature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import torch
from torch import nn

from qdq.batches import LABEL_KEYS, BatchError, feed_batch, to_device
from sensitivity.errors import SensitivityError

__all__ = ["LABEL_KEYS", "to_device", "default_forward", "split_labels", "model_device",
           "take", "ForwardFn"]

ForwardFn = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on the input part of ``batch`` (:func:`qdq.batches.feed_batch`: a
    tensor, the first item of a tuple, a dict's non-label keys as keywords)."""
    try:
        return feed_batch(model, batch)
    except BatchError as err:
        raise SensitivityError(str(err)) from None


def split_labels(batch: Any) -> Any:
    """The labels of a batch: the second item of a tuple, or a label key of a dict."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        for key in LABEL_KEYS:
            if key in batch:
                return batch[key]
    raise SensitivityError(
        f"a batch of type {type(batch).__name__} carries no labels: accuracy needs "
        f"(inputs, labels) tuples or dicts with one of the keys {LABEL_KEYS}"
    )


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (or buffers) live; CPU for a model without either."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        if t.numel():
            return t.device
    return torch.device("cpu")


def take(data: Iterable, num_batches: int | None) -> Iterator:
    """The first ``num_batches`` batches of ``data`` (all of them for None)."""
    if num_batches is not None and num_batches < 1:
        raise SensitivityError(f"num_batches must be at least 1, got {num_batches}")
    return iter(data) if num_batches is None else islice(data, num_batches)


def batch_size(batch: Any) -> int:
    """Samples in a batch (leading dim of its first tensor); 1 if it holds none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, torch.Tensor):
                return batch_size(item)
    return 1
