"""``qdq build``: a TensorRT engine from a Q/DQ ONNX file, its layer precisions, its speed."""

from __future__ import annotations

import argparse
from pathlib import Path

from qdqapp.cli import CliError, register
from qdqapp.models import parse_shape

EPILOG = """examples:
  qdq build r18.onnx --engine r18.engine --shapes 1,3,224,224:32,3,224,224:64,3,224,224
  qdq build r18.onnx --engine r18.engine --fp16-pass --timing-cache trt.cache --inspect
  qdq build r18.onnx --engine r18.engine --compare-fp16 r18_fp32.onnx --bench-shape 32,3,224,224

Needs TensorRT 10 or 11 (pip install tensorrt polygraphy) and an NVIDIA GPU.
On TensorRT 11 networks are strongly typed: --fp16-pass casts the float part of the graph
to fp16 first (Q/DQ stay fp32), so float layers run in FP16.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("onnx", help="Q/DQ ONNX file")
    p.add_argument("--engine", required=True, help="engine file to write")
    p.add_argument("--shapes", metavar="MIN:OPT:MAX",
                   help="dynamic batch profile, e.g. 1,3,224,224:32,3,224,224:64,3,224,224")
    p.add_argument("--fp16-pass", action="store_true",
                   help="convert the float part of the graph to fp16 before building")
    typing = p.add_mutually_exclusive_group()
    typing.add_argument("--strongly-typed", dest="strongly_typed", action="store_true",
                        default=None, help="strongly typed network (default on TensorRT 11)")
    typing.add_argument("--weakly-typed", dest="strongly_typed", action="store_false",
                        help="INT8+FP16 builder flags (TensorRT 10 only)")
    p.add_argument("--timing-cache", help="timing cache file to read and update")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="workspace limit (GiB)")
    p.add_argument("--inspect", action="store_true", help="print the per-layer precision table")
    p.add_argument("--bench-shape", help="benchmark the engine on inputs of this shape")
    p.add_argument("--compare-fp16", metavar="FP32_ONNX",
                   help="also build an FP16 engine from this float ONNX and time both")


def run(args: argparse.Namespace) -> int:
    from export import (
        BuildError,
        TensorRTUnavailable,
        build_engine,
        compare_engines,
        inspect_engine,
        to_fp16,
    )

    shapes = [None, None, None]
    if args.shapes:
        parts = args.shapes.split(":")
        if len(parts) != 3:
            raise CliError(f"--shapes {args.shapes!r}: expected MIN:OPT:MAX")
        shapes = [parse_shape(s) for s in parts]
    if not Path(args.onnx).is_file():
        raise CliError(f"ONNX file {args.onnx}: no such file")
    source = Path(args.onnx)
    try:
        if args.fp16_pass:
            source = to_fp16(source, Path(args.engine).with_suffix(".fp16.onnx"))
        kwargs = dict(strongly_typed=args.strongly_typed, min_shape=shapes[0],
                      opt_shape=shapes[1], max_shape=shapes[2],
                      timing_cache=args.timing_cache,
                      workspace=int(args.workspace_gb * (1 << 30)))
        engine = build_engine(source, args.engine, **kwargs)
        print(f"wrote {engine}")
        if args.inspect:
            print(inspect_engine(engine))
        if args.bench_shape or args.compare_fp16:
            shape = parse_shape(args.bench_shape) if args.bench_shape else shapes[1]
            engines = {}
            if args.compare_fp16:
                fp16_engine = Path(args.engine).with_suffix(".fp16.engine")
                engines["FP16"] = build_engine(args.compare_fp16, fp16_engine, **kwargs)
            engines["INT8"] = engine
            print(compare_engines(engines, shape))
    except (TensorRTUnavailable, BuildError) as err:
        raise CliError(str(err)) from err
    return 0


register("build", "build, inspect and time a TensorRT engine from a Q/DQ ONNX file",
         add_arguments, run, EPILOG)
