"""TensorRT-aware Q/DQ placement on torch.fx graphs.

- :func:`fold_batchnorm`: fold eval-mode BatchNorm into the Conv/ConvTranspose/Linear
  before it, before weights are quantized.
- :func:`apply_rules`: fold, insert quantizers if needed, then run the registered
  placement rules (residual add, functional ops, shared concat/max-pool scales; see
  :mod:`qdq.rules.placement`). Rules live in :data:`RULES`; add one with
  :func:`register_rule`.

Example::

    model = torchvision.models.resnet18().eval()
    model = qdq.rules.apply_rules(model, torch.randn(1, 3, 224, 224))
    print(qdq.summary(model))   # "shared" and "rule" columns show the ties
"""

from qdq.rules.apply import RulesError, RulesReport, apply_rules
from qdq.rules.attention import QuantMultiheadAttention, attention_matmuls
from qdq.rules.fold import fold_batchnorm
from qdq.rules.registry import RULES, RuleContext, register_rule, unregister_rule

__all__ = ["fold_batchnorm", "apply_rules", "RulesReport", "RulesError", "RULES",
           "RuleContext", "register_rule", "unregister_rule", "QuantMultiheadAttention",
           "attention_matmuls"]
