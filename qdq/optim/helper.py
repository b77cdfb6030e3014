"""Parameter selection for QAT optimizers, by regular expressions on parameter names.

Names and behaviour follow pytorch-quantization's ``optim.helper``: a pattern matches a
parameter when ``re.search`` finds it in the parameter's name.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["match_parameters", "group_parameters", "freeze_parameters",
           "quant_weight_inplace"]

log = logging.getLogger(__name__)


def match_parameters(model: nn.Module, patterns: Sequence[str]) -> Iterator[nn.Parameter]:
    """Yield each parameter whose name any of ``patterns`` matches, once per matching
    pattern (pytorch-quantization's behaviour: overlapping patterns yield twice)."""
    for name, param in model.named_parameters():
        for pattern in patterns:
            if re.search(pattern, name):
                yield param


def group_parameters(model: nn.Module, patterns_list: Sequence[Sequence[str]],
                     lrs: Sequence[float] | None = None,
                     momentums: Sequence[float] | None = None,
                     weight_decays: Sequence[float] | None = None) -> list[dict]:
    """Optimizer parameter groups, one per list of patterns, with optional per-group
    ``lr``, ``momentum`` and ``weight_decay``. The pattern lists should not overlap."""
    groups = []
    for patterns in patterns_list:
        if not isinstance(patterns, list):
            raise TypeError("group_parameters: patterns_list must be list of list of patterns, "
                            f"got an item of type {type(patterns).__name__}")
        groups.append({"params": match_parameters(model, patterns)})
    for key, values in (("lr", lrs), ("momentum", momentums), ("weight_decay", weight_decays)):
        if values is None:
            continue
        if len(values) != len(patterns_list):
            raise TypeError(f"group_parameters: the number of {key} values must match the "
                            f"number of pattern lists ({len(values)} vs {len(patterns_list)})")
        for group, value in zip(groups, values, strict=True):
            group[key] = value
    return groups


def freeze_parameters(model: nn.Module, patterns: Sequence[str]) -> None:
    """``requires_grad = False`` on every parameter whose name a pattern matches."""
    for name, param in model.named_parameters():
        if any(re.search(pattern, name) for pattern in patterns):
            log.info("freezing %s", name)
            param.requires_grad = False


def quant_weight_inplace(model: nn.Module) -> None:
    """Overwrite each quant layer's weight with its quantized weight (relax-and-round
    style training); the layer's weight quantizer decides how."""
    for name, module in model.named_modules():
        quantizer = getattr(module, "_weight_quantizer", None)
        if quantizer is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if not quantizer.fake_quant:
            log.warning("%s: in-place integer quantization; the weight now holds integers",
                        name)
        with torch.no_grad():
            module.weight.copy_(quantizer(module.weight))
