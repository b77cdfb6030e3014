"""Two real CPU processes on the gloo backend: calibration and sweep across ranks."""

import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import qdq
from qdqapp.evaluate import top1_accuracy
from sensitivity.calibrate import calibrate
from sensitivity.sweep import read_rows, sweep
from tests.sensitivity.models import WEIGHTS_ENV, float_model, make_data, save_weights

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with gloo")

WORLD = 2


def _worker(rank: int, init: str, out: str, task: str) -> None:
    torch.set_num_threads(1)
    os.environ[WEIGHTS_ENV] = os.path.join(out, "tinynet.pt")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        model = float_model()
        qdq.replace_modules(model)
        result = {}
        if task == "calibrate":
            summary = calibrate(model, make_data(64, seed=10 + rank), progress=False)
            result["world"] = summary.world_size
            result["samples"] = summary.num_samples
            hist = float_model()
            qdq.replace_modules(hist)
            calibrate(hist, make_data(64, seed=10 + rank), method="histogram",
                      amax_method="percentile", percentile=99.9, progress=False)
            result["hist"] = {n: q.amax.flatten().tolist() for n, q in qdq.quantizers(hist)}
        else:
            calibrate(model, make_data(64, seed=10), progress=False)  # same data everywhere
            data = make_data(128, seed=3, batch=64)
            calls = []

            def eval_fn(m):
                calls.append(1)
                return top1_accuracy(m, data)

            report = sweep(model, eval_fn, resume=os.path.join(out, "rows.jsonl"),
                           progress=False)
            result["report"] = report.to_dict()
            result["calls"] = len(calls)
        result["amax"] = {n: q.amax.flatten().tolist() for n, q in qdq.quantizers(model)}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
            json.dump(result, fh)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, task):
    init = f"file://{tmp_path / 'rendezvous'}"
    save_weights(tmp_path / "tinynet.pt")
    mp.spawn(_worker, args=(init, str(tmp_path), task), nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.xdist_group("gloo")  # process groups one at a time (see Makefile)
@pytest.mark.slow
def test_calibration_gives_identical_amax_on_every_rank(tmp_path):
    ranks = _spawn(tmp_path, "calibrate")
    assert ranks[0]["amax"] == ranks[1]["amax"]
    assert ranks[0]["world"] == 2 and ranks[0]["samples"] == 128  # summed over ranks
    # and equal to one process calibrating on both ranks' data
    model = float_model()
    qdq.replace_modules(model)
    calibrate(model, make_data(64, seed=10) + make_data(64, seed=11), progress=False)
    single = {n: q.amax.flatten().tolist() for n, q in qdq.quantizers(model)}
    assert single.keys() == ranks[0]["amax"].keys()
    for name, values in single.items():
        assert ranks[0]["amax"][name] == pytest.approx(values, rel=1e-6), name
    # histograms are summed: percentile amax as if one process saw all the data, the
    # ranks' first batches together as its first batch (which fixes the bin width)
    assert ranks[0]["hist"] == ranks[1]["hist"]
    hist = float_model()
    qdq.replace_modules(hist)
    (x0, y0), rest0 = make_data(64, seed=10)[0], make_data(64, seed=10)[1:]
    (x1, y1), rest1 = make_data(64, seed=11)[0], make_data(64, seed=11)[1:]
    first = (torch.cat([x0, x1]), torch.cat([y0, y1]))
    calibrate(hist, [first, *rest0, *rest1], method="histogram",
              amax_method="percentile", percentile=99.9, progress=False)
    for name, q in qdq.quantizers(hist):
        assert ranks[0]["hist"][name] == pytest.approx(q.amax.flatten().tolist(), rel=1e-6), \
            name


@pytest.mark.xdist_group("gloo")  # process groups one at a time (see Makefile)
@pytest.mark.slow
def test_sweep_shards_layers_and_gathers_every_row(tmp_path):
    ranks = _spawn(tmp_path, "sweep")
    a, b = ranks[0]["report"], ranks[1]["report"]
    tasks = 2 + len(a["rows"])
    a.pop("seconds"), b.pop("seconds")  # each rank's own wall time
    assert a == b and len(a["rows"]) == 5 and not [r for r in a["rows"] if r["status"] != "ok"]
    assert ranks[0]["calls"] + ranks[1]["calls"] == tasks
    assert ranks[0]["calls"] == (tasks + 1) // 2 and ranks[1]["calls"] == tasks // 2
    # rank 0 merged the rows file; the per-rank files are gone
    merged = [r["task"] for r in read_rows(tmp_path / "rows.jsonl") if "task" in r]
    assert sorted(merged) == sorted(["fp32", "int8", *(r["layer"] for r in a["rows"])])
    assert not list(tmp_path.glob("rows.rank*.jsonl"))
    # the same metrics as one process measures
    model = float_model()
    qdq.replace_modules(model)
    calibrate(model, make_data(64, seed=10), progress=False)
    data = make_data(128, seed=3, batch=64)
    single = sweep(model, lambda m: top1_accuracy(m, data), progress=False).to_dict()
    assert [(r["layer"], r["metric"]) for r in single["rows"]] == \
        [(r["layer"], r["metric"]) for r in a["rows"]]
    assert (single["fp32"], single["int8"]) == (a["fp32"], a["int8"])
