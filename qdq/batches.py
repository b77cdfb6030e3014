"""How a batch of any shape reaches a model: tensors, (inputs, labels) tuples, dicts.

The one place that decides which part of a batch is the model input: the data-driven
weight methods (:mod:`qdq.gptq`, :mod:`qdq.awq`) feed calibration batches with it, and
:mod:`sensitivity.batches` builds calibration and evaluation on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["LABEL_KEYS", "BatchError", "to_device", "feed_batch"]

#: Dict keys treated as labels (never passed to the model).
LABEL_KEYS = ("label", "labels", "target", "targets", "y")


class BatchError(TypeError):
    """A batch this module cannot feed to a model."""


def to_device(batch: Any, device: torch.device | None) -> Any:
    """Move every tensor inside ``batch`` (nested lists, tuples, dicts) to ``device``."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def feed_batch(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on the input part of ``batch``.

    ========================  ===============================
    batch                     call
    ========================  ===============================
    tensor                    ``model(batch)``
    (inputs, labels, ...)     ``model(inputs)``
    dict                      ``model(**batch without labels)``
    ========================  ===============================
    """
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if k not in LABEL_KEYS})
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise BatchError("a batch is an empty tuple: nothing to feed the model")
        return model(batch[0])
    raise BatchError(
        f"cannot feed a batch of type {type(batch).__name__} to the model: use tensors, "
        "(inputs, labels) tuples or dicts, or pass forward_fn(model, batch)"
    )
