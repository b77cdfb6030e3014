"""``qdq build``: a TensorRT engine from a Q/DQ ONNX file, its layer precisions, its speed."""

from __future__ import annotations

import argparse
from pathlib import Path

from qdqapp.cli import CliError, register
from qdqapp.cli.options import add_force_option
from qdqapp.models import parse_shape
from qdqapp.outputs import NewFiles, parse_output
from qdqapp.specs import number

EPILOG = """examples:
  qdq build r18.onnx                         # writes r18.engine
  qdq build r18.onnx r18.engine --shapes 1,3,224,224:32,3,224,224:64,3,224,224
  qdq build r18.onnx r18.engine --fp16-pass --timing-cache trt.cache --inspect
  qdq build r18.onnx r18.engine --compare-fp16 r18_fp32.onnx --bench-shape 32,3,224,224

Needs TensorRT 10 or 11 (pip install tensorrt polygraphy) and an NVIDIA GPU.
On TensorRT 11 networks are strongly typed: --fp16-pass casts the float part of the graph
to fp16 first (Q/DQ stay fp32), so float layers run in FP16.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("onnx", help="Q/DQ ONNX file")
    p.add_argument("engine", nargs="?",
                   help="engine file to write (default: the ONNX file's name with .engine)")
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
    add_force_option(p)


def run(args: argparse.Namespace) -> int:
    from export import BuildError, TensorRTUnavailable

    shapes = [None, None, None]
    if args.shapes:
        parts = args.shapes.split(":")
        if len(parts) != 3:
            raise CliError(f"--shapes {args.shapes!r}: expected MIN:OPT:MAX")
        shapes = [parse_shape(s) for s in parts]
    source = Path(args.onnx)
    if not source.is_file():
        raise CliError(f"ONNX file {source}: no such file")
    engine = parse_output(args.engine or source.with_suffix(".engine"), "build", folder=False,
                          what="engine", force=args.force).path
    bench_shape = parse_shape(args.bench_shape) if args.bench_shape else shapes[1]
    if args.compare_fp16 and not Path(args.compare_fp16).is_file():
        raise CliError(f"--compare-fp16 {args.compare_fp16}: no such file")
    number(args.workspace_gb, "--workspace-gb", 0, above=True)
    fp16_onnx = engine.with_suffix(".fp16.onnx") if args.fp16_pass else None
    fp16_engine = engine.with_suffix(".fp16.engine") if args.compare_fp16 else None
    for path, why in ((fp16_onnx, "--fp16-pass"), (fp16_engine, "--compare-fp16")):
        if path is not None:
            parse_output(path, "build", folder=False, what=f"{why} writes", force=args.force)
    try:
        with NewFiles([engine, fp16_onnx, fp16_engine]):
            _build(args, source, engine, fp16_onnx, fp16_engine, shapes, bench_shape)
    except (TensorRTUnavailable, BuildError) as err:
        raise CliError(str(err)) from err
    return 0


def _build(args: argparse.Namespace, source: Path, engine: Path, fp16_onnx: Path | None,
           fp16_engine: Path | None, shapes: list, bench_shape) -> None:
    from export import build_engine, compare_engines, inspect_engine, to_fp16

    if fp16_onnx is not None:
        source = to_fp16(source, fp16_onnx)
    kwargs = dict(strongly_typed=args.strongly_typed, min_shape=shapes[0],
                  opt_shape=shapes[1], max_shape=shapes[2], timing_cache=args.timing_cache,
                  workspace=int(args.workspace_gb * (1 << 30)))
    built = build_engine(source, engine, **kwargs)
    print(f"wrote {built}")
    if args.inspect:
        print(inspect_engine(built))
    if args.bench_shape or args.compare_fp16:
        engines = {}
        if fp16_engine is not None:
            engines["FP16"] = build_engine(args.compare_fp16, fp16_engine, **kwargs)
        engines["INT8"] = built
        print(compare_engines(engines, bench_shape))


register("build", "build, inspect and time a TensorRT engine from a Q/DQ ONNX file",
         add_arguments, run, EPILOG)
