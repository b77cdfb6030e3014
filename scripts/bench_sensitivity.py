"""Overhead of the per-layer sweep: its wall time against the evaluations it must run.

A sweep of L layers runs L + 2 evaluations (FP32 and INT8 baselines first). Everything
beyond those is overhead: toggling quantizers, writing and flushing a JSONL row per layer,
bookkeeping. This script times one evaluation on its own (median of several, taken before
and after the sweep), runs a real leave-one-out sweep with a resume file, and prints

    overhead  = sweep time / ((L + 2) x one evaluation)
    per layer = sweep time / (L x one evaluation)   (the two baselines counted as cost)
    loop cost = sweep wall time - wall time spent inside eval_fn
    no-op     = a whole sweep with an eval_fn that returns at once: the loop alone

each with wall-clock time and with this process's CPU time. On a machine shared with
other jobs, wall time swings with their load; CPU time does not, so it is the number to
trust there (they agree on an idle machine).

Usage::

    PYTHONPATH=. python scripts/bench_sensitivity.py --model resnet50 --input 8x3x32x32
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import qdq
import sensitivity
from qdqapp.evaluate import labelled_by_model, top1_accuracy
from qdqapp.models import parse_shape


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50", help="torchvision architecture")
    p.add_argument("--input", default="8x3x32x32", help="batch shape")
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timings of one evaluation")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = parse_shape(args.input, "--input")
    model = torchvision.models.get_model(args.model, weights=None, num_classes=10).eval()
    qdq.replace_modules(model)
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(shape, generator=gen) for _ in range(2)]
    sensitivity.calibrate(model, calib, progress=False)
    data = labelled_by_model(model, [torch.randn(shape, generator=gen)
                                     for _ in range(args.eval_batches)])

    inside = [0.0]

    def eval_fn(m):
        start = time.perf_counter()
        try:
            return top1_accuracy(m, data)
        finally:
            inside[0] += time.perf_counter() - start

    def time_one() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        top1_accuracy(model, data)
        return time.perf_counter() - wall, time.process_time() - cpu

    eval_fn(model)  # warm-up
    singles = [time_one() for _ in range(args.repeats)]
    inside[0] = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = time.perf_counter(), time.process_time()
        report = sensitivity.sweep(model, eval_fn, resume=Path(tmp) / "rows.jsonl",
                                   progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    singles += [time_one() for _ in range(args.repeats)]
    one_wall = statistics.median(s[0] for s in singles)
    one_cpu = statistics.median(s[1] for s in singles)
    layers = len(report.rows)
    print(f"model {args.model}, batch {shape}, {args.eval_batches} eval batches, "
          f"torch threads {torch.get_num_threads()}")
    print(f"layers {layers}, evaluations in the sweep {layers + 2}")
    print(f"one evaluation: wall median {one_wall * 1e3:.1f} ms (min "
          f"{min(s[0] for s in singles) * 1e3:.1f}, max {max(s[0] for s in singles) * 1e3:.1f},"
          f" n={len(singles)}); CPU median {one_cpu * 1e3:.1f} ms")
    print(f"sweep: wall {wall:.2f} s, CPU {cpu:.2f} s")
    for label, total, one in (("wall", wall, one_wall), ("CPU ", cpu, one_cpu)):
        print(f"{label} overhead  = sweep / ((layers + 2) x one eval) = "
              f"{total / ((layers + 2) * one):.3f}")
        print(f"{label} per layer = sweep / (layers x one eval)       = "
              f"{total / (layers * one):.3f}")
    print(f"loop cost outside eval_fn: {wall - inside[0]:.3f} s "
          f"({(wall - inside[0]) / (layers + 2) * 1e3:.2f} ms per evaluation)")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        sensitivity.sweep(model, lambda m: 1.0, resume=Path(tmp) / "rows.jsonl",
                          progress=False)
        noop = time.perf_counter() - start
    print(f"no-op sweep (loop + JSONL rows with fsync, no evaluation): {noop * 1e3:.1f} ms "
          f"= {noop / (layers + 2) * 1e3:.2f} ms per evaluation")


if __name__ == "__main__":
    main()
