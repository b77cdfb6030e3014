"""TensorRT: build an engine from a Q/DQ ONNX file, inspect its layer precisions, time it.

Explicit quantization only (the Q/DQ nodes say what runs in INT8; no calibrator).

* TensorRT 10.x: either the INT8 + FP16 builder flags (weakly typed: TensorRT may pick
  FP16 for float layers) or a strongly typed network.
* TensorRT 11.x: strongly typed only (``BuilderFlag.INT8/FP16`` are gone): layer types
  come from the graph, so run :func:`export.fp16.to_fp16` first for FP16 float layers.
* FP8 Q/DQ (``qdq.formats`` "fp8") builds only on GPUs of compute capability 8.9 (Ada)
  or newer (Hopper 9.0, Blackwell): :func:`build_engine` checks the GPU before anything
  else and says so. INT4 weight-only DequantizeLinear runs in Gemm/MatMul layers.

TensorRT is optional. Without it every entry point raises :class:`TensorRTUnavailable`
naming what to install; :func:`tensorrt_available` says whether it is there.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from export.engine_report import EngineReport, parse_engine_json
from qdq.fileio import atomic_write

__all__ = ["TensorRTUnavailable", "BuildError", "tensorrt_available", "build_engine",
           "inspect_engine", "benchmark_engine", "BenchmarkResult", "compare_engines",
           "INSTALL_HINT", "FP8_MIN_CAPABILITY", "fp8_device_problem", "fp8_problem_here"]

INSTALL_HINT = ("TensorRT is not installed: on a machine with an NVIDIA GPU run "
                "`pip install tensorrt polygraphy` (or `pip install 'qdq[tensorrt]'`)")


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a CUDA device) is missing; the message says what to install."""


class BuildError(RuntimeError):
    """TensorRT could not parse or build the network; the message names the cause."""


def _trt():
    try:
        import tensorrt as trt
    except ImportError as err:
        raise TensorRTUnavailable(INSTALL_HINT) from err
    return trt


def tensorrt_available() -> bool:
    try:
        _trt()
    except TensorRTUnavailable:
        return False
    return True


#: TensorRT builds FP8 layers on compute capability 8.9 (Ada) and newer.
FP8_MIN_CAPABILITY = (8, 9)


def fp8_device_problem(capability: tuple[int, int] | None, device: str = "the GPU"
                       ) -> str | None:
    """Why an FP8 engine cannot be built on a device of ``capability`` (None: no CUDA
    device), or None when it can."""
    need = ".".join(map(str, FP8_MIN_CAPABILITY))
    if capability is None:
        return (f"the ONNX model has FP8 E4M3 Q/DQ; TensorRT builds FP8 on NVIDIA GPUs of "
                f"compute capability >= {need} (Ada, Hopper or newer) and no CUDA device is "
                "visible")
    if tuple(capability) < FP8_MIN_CAPABILITY:
        have = ".".join(map(str, capability))
        return (f"the ONNX model has FP8 E4M3 Q/DQ; TensorRT builds FP8 on compute "
                f"capability >= {need} (Ada, Hopper or newer), and {device} is {have}: "
                "export INT8 instead (qdq.formats.set_format(model, 'int8'))")
    return None


def _low_precision(onnx_path: Path) -> tuple[bool, bool]:
    """(FP8 Q/DQ, INT4 weights) in the graph; BuildError when FP8 cannot build here."""
    from export.formats import uses_fp8, uses_int4
    from export.onnx_io import load_onnx

    proto = load_onnx(onnx_path, error=BuildError)
    if not uses_fp8(proto):
        return False, uses_int4(proto)
    problem = fp8_problem_here()
    if problem:
        raise BuildError(problem)
    return True, uses_int4(proto)


def fp8_problem_here() -> str | None:
    """:func:`fp8_device_problem` for the current CUDA device (or for none)."""
    import torch

    if not torch.cuda.is_available():
        return fp8_device_problem(None)
    index = torch.cuda.current_device()
    return fp8_device_problem(torch.cuda.get_device_capability(index),
                              torch.cuda.get_device_name(index))


def _major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *,
                 fp16: bool = True, strongly_typed: bool | None = None,
                 min_shape: tuple[int, ...] | None = None,
                 opt_shape: tuple[int, ...] | None = None,
                 max_shape: tuple[int, ...] | None = None,
                 timing_cache: str | os.PathLike | None = None,
                 workspace: int = 4 << 30) -> Path:
    """Build ``engine_path`` from ``onnx_path``; returns the engine path.

    Args:
        fp16: (weakly typed only) let float layers run in FP16 next to INT8.
        strongly_typed: default True on TensorRT >= 11 (its only mode), False on 10.x.
        min_shape/opt_shape/max_shape: the profile for a dynamic first input (all three
            or none), e.g. ``(1, 3, 224, 224)``, ``(32, ...)``, ``(64, ...)``.
        timing_cache: file to load tactic timings from and save them to (faster rebuilds).
        workspace: memory pool limit for tactics, in bytes.

    Layer information is kept at DETAILED verbosity, so :func:`inspect_engine` can show
    per-layer precisions. A graph with FP8 Q/DQ needs a GPU of compute capability >= 8.9;
    below that (or without a GPU) one BuildError says so, before TensorRT is loaded.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    # FP8 on a GPU that cannot build it is said first: installing TensorRT would not help
    fp8, int4 = _low_precision(onnx_path) if onnx_path.is_file() else (False, False)
    trt = _trt()
    if not onnx_path.is_file():
        raise BuildError(f"ONNX file {onnx_path}: no such file")
    if not engine_path.parent.is_dir():
        raise BuildError(f"output folder {engine_path.parent} does not exist")
    shapes = (min_shape, opt_shape, max_shape)
    if any(s is not None for s in shapes) and not all(s is not None for s in shapes):
        raise BuildError("give min_shape, opt_shape and max_shape together")
    major = _major(trt)
    if strongly_typed is None:
        strongly_typed = major >= 11
    if major >= 11 and not strongly_typed:
        raise BuildError(f"TensorRT {trt.__version__} builds strongly typed networks only")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if major < 10 and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT cannot parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.INT8)  # explicit Q/DQ decide; no calibrator
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if fp8 and hasattr(trt.BuilderFlag, "FP8"):
            config.set_flag(trt.BuilderFlag.FP8)
        if int4 and hasattr(trt.BuilderFlag, "INT4"):
            config.set_flag(trt.BuilderFlag.INT4)
    if min_shape is not None:
        profile = builder.create_optimization_profile()
        first = network.get_input(0)
        profile.set_shape(first.name, tuple(min_shape), tuple(opt_shape), tuple(max_shape))
        config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        blob = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT failed to build {onnx_path.name} (see its log above)")
    atomic_write(engine_path, bytes(serialized))
    if cache is not None:
        atomic_write(Path(timing_cache), bytes(config.get_timing_cache().serialize()))
    return engine_path


def _load_engine(engine):
    trt = _trt()
    if isinstance(engine, (str, os.PathLike)):
        path = Path(engine)
        if not path.is_file():
            raise BuildError(f"engine file {path}: no such file")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BuildError(f"engine file {path}: TensorRT cannot deserialize it "
                             "(built by another TensorRT version or GPU?)")
    return engine


def inspect_engine(engine) -> EngineReport:
    """Per-layer precision of an engine (object or file) built with DETAILED verbosity."""
    trt = _trt()
    engine = _load_engine(engine)
    inspector = engine.create_engine_inspector()
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    return parse_engine_json(text)


@dataclass
class BenchmarkResult:
    name: str
    batch: int
    p50_ms: float
    p99_ms: float
    mean_ms: float

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch / (self.p50_ms / 1000.0)

    def line(self) -> str:
        return (f"{self.name:<10} batch {self.batch:>4}: p50 {self.p50_ms:.3f} ms, "
                f"p99 {self.p99_ms:.3f} ms, {self.throughput:,.0f} samples/s")


def benchmark_engine(engine, input_shape: tuple[int, ...] | None = None, *,
                     warmup: int = 20, iterations: int = 200,
                     name: str = "engine") -> BenchmarkResult:
    """Time ``engine`` on random inputs with CUDA events; ``input_shape`` sets dynamic dims."""
    trt = _trt()
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("benchmark_engine needs a CUDA device")
    engine = _load_engine(engine)
    context = engine.create_execution_context()
    buffers = {}
    for i in range(engine.num_io_tensors):
        tname = engine.get_tensor_name(i)
        if engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT:
            shape = tuple(engine.get_tensor_shape(tname))
            if any(d < 0 for d in shape):
                if input_shape is None:
                    raise BuildError(f"input {tname} has dynamic shape {shape}: pass input_shape")
                shape = tuple(input_shape)
            context.set_input_shape(tname, shape)
    for i in range(engine.num_io_tensors):
        tname = engine.get_tensor_name(i)
        shape = tuple(context.get_tensor_shape(tname))
        dtype = _torch_dtype(trt, engine.get_tensor_dtype(tname))
        buffers[tname] = torch.randn(shape, device="cuda").to(dtype) if dtype.is_floating_point \
            else torch.zeros(shape, device="cuda", dtype=dtype)
        context.set_tensor_address(tname, buffers[tname].data_ptr())
    stream = torch.cuda.Stream()
    times = []
    with torch.cuda.stream(stream):
        for k in range(warmup + iterations):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            context.execute_async_v3(stream.cuda_stream)
            end.record(stream)
            end.synchronize()
            if k >= warmup:
                times.append(start.elapsed_time(end))
    times.sort()
    first = next(iter(buffers.values()))
    return BenchmarkResult(name, int(first.shape[0]) if first.dim() else 1,
                           statistics.median(times), times[int(0.99 * (len(times) - 1))],
                           statistics.fmean(times))


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int8: torch.int8,
             trt.int32: torch.int32, trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    return table[dtype]


def compare_engines(engines: dict[str, object], input_shape: tuple[int, ...] | None = None,
                    **kwargs) -> str:
    """Benchmark several engines (e.g. ``{"FP16": ..., "INT8": ...}``) side by side."""
    results = [benchmark_engine(e, input_shape, name=n, **kwargs) for n, e in engines.items()]
    base = results[0]
    lines = [r.line() + f"  ({base.p50_ms / r.p50_ms:.2f}x vs {base.name})" for r in results]
    lines.append(time.strftime("measured %Y-%m-%d %H:%M UTC", time.gmtime()))
    return "\n".join(lines)
