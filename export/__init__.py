"""export: a quantized PyTorch model to Q/DQ ONNX, checked, and on to TensorRT.

::

    from export import to_onnx, check_qdq, verify
    to_onnx(model, torch.randn(1, 3, 224, 224), "model.onnx")
    findings = check_qdq("model.onnx")
    print(verify(model, "model.onnx", batch))
"""

from export.lint import Finding, LintError, check_qdq, format_findings
from export.onnx_export import ExportError, ExportResult, fold_constants, to_onnx
from export.verify import VerifyError, VerifyReport, verify

__all__ = [
    "Finding", "LintError", "check_qdq", "format_findings",
    "ExportError", "ExportResult", "fold_constants", "to_onnx",
    "VerifyError", "VerifyReport", "verify",
]
