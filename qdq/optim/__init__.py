"""Optimizer helpers for quantization-aware training (``qdq.optim.helper``)."""

from qdq.optim import helper
from qdq.optim.helper import (
    freeze_parameters,
    group_parameters,
    match_parameters,
    quant_weight_inplace,
)

__all__ = ["helper", "match_parameters", "group_parameters", "freeze_parameters",
           "quant_weight_inplace"]
