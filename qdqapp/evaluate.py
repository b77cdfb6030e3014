"""Metrics a sweep can use as ``eval_fn``: top-1 accuracy, and agreement with FP32.

Example::

    eval_fn = lambda m: top1_accuracy(m, test_loader, max_batches=20)
    report = sensitivity.sweep(model, eval_fn)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sensitivity.batches import (
    ForwardFn,
    default_forward,
    model_device,
    split_labels,
    take,
    to_device,
)
from sensitivity.errors import SensitivityError

__all__ = ["top1_accuracy", "labelled_by_model", "evaluation", "ACCURACY", "AGREEMENT"]

ACCURACY = "top-1 accuracy (%)"
AGREEMENT = "top-1 agreement with FP32 (%)"


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "out"):
        value = output.get(key) if isinstance(output, dict) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise SensitivityError(f"cannot find logits in a model output of type "
                           f"{type(output).__name__}")


def top1_accuracy(model: nn.Module, data: Iterable, device: torch.device | str | None = None,
                  max_batches: int | None = None, forward_fn: ForwardFn | None = None
                  ) -> float:
    """Percent (0-100) of samples whose arg-max logit equals the label.

    ``data`` yields ``(inputs, labels)`` tuples or dicts with a label key. The model runs
    in eval mode without gradients; its mode is restored afterwards.
    """
    target = torch.device(device) if device is not None else model_device(model)
    forward = forward_fn or default_forward
    was_training = model.training
    correct = total = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in take(data, max_batches):
                batch = to_device(batch, target)
                labels = split_labels(batch)
                logits = _logits(forward(model, batch))
                correct += int((logits.argmax(dim=-1) == labels).sum())
                total += int(labels.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise SensitivityError("evaluation data is empty: the iterable gave no sample")
    return 100.0 * correct / total


def labelled_by_model(model: nn.Module, inputs: Iterable[torch.Tensor],
                      device: torch.device | str | None = None) -> list[tuple[torch.Tensor,
                                                                              torch.Tensor]]:
    """``(inputs, labels)`` batches whose labels are ``model``'s own FP32 predictions.

    With no labelled data at hand (random inputs, an unlabelled image folder),
    ``top1_accuracy`` on these batches measures top-1 agreement with the float model:
    100 for FP32 by construction, and the quantized model's drop below it.
    """
    from qdq.replace import disable_quantization

    target = torch.device(device) if device is not None else model_device(model)
    out = []
    was_training = model.training
    try:
        model.eval()
        with disable_quantization(model), torch.no_grad():
            for x in inputs:
                x = to_device(x, target)
                out.append((x, _logits(model(x)).argmax(dim=-1)))
    finally:
        model.train(was_training)
    return out


def evaluation(source, model: nn.Module, device: torch.device | str | None = None,
               agreement: bool = False):
    """``(eval_fn(model) -> metric, metric name)`` for a data source.

    Labelled data gives top-1 accuracy on its evaluation split; data without labels
    (random inputs), or ``agreement=True``, gives top-1 agreement with ``model`` in FP32
    on its evaluation inputs. A sweep evaluates once per layer, so the batches are kept in
    memory when that is cheap (in-memory data, or ``--eval-batches`` set); image files
    are read again each time otherwise.
    """
    if source.labelled and not agreement:
        batches = source.eval()
        if source.in_memory or source.opts.eval_batches is not None:
            batches = list(batches)
        name = ACCURACY
    else:
        batches = labelled_by_model(model, source.eval_inputs(), device)
        name = AGREEMENT
    return (lambda m: top1_accuracy(m, batches, device)), name
