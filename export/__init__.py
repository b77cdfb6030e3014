"""export: a quantized PyTorch model to Q/DQ ONNX, checked, and on to TensorRT.

::

    from export import to_onnx, check_qdq, verify
    to_onnx(model, torch.randn(1, 3, 224, 224), "model.onnx")
    findings = check_qdq("model.onnx")
    print(verify(model, "model.onnx", batch))
"""

from export.engine_report import EngineReport, LayerInfo, parse_engine_json
from export.fp16 import convert_to_fp16, to_fp16
from export.lint import Finding, LintError, check_qdq, format_findings
from export.onnx_export import ExportError, ExportResult, fold_constants, to_onnx
from export.tensorrt import (
    BenchmarkResult,
    BuildError,
    TensorRTUnavailable,
    benchmark_engine,
    build_engine,
    compare_engines,
    inspect_engine,
    tensorrt_available,
)
from export.verify import VerifyError, VerifyReport, verify

__all__ = [
    "EngineReport", "LayerInfo", "parse_engine_json",
    "BenchmarkResult", "BuildError", "TensorRTUnavailable", "benchmark_engine", "build_engine",
    "compare_engines", "inspect_engine", "tensorrt_available",
    "convert_to_fp16", "to_fp16",
    "Finding", "LintError", "check_qdq", "format_findings",
    "ExportError", "ExportResult", "fold_constants", "to_onnx",
    "VerifyError", "VerifyReport", "verify",
]
