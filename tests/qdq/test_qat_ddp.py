"""scripts/qat_finetune.py under torchrun: 2 CPU processes with gloo, on real data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qdqapp.data import DEFAULT_ROOT, ENV_VAR

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT)

needs_data = pytest.mark.skipif(not (DATA / "train-images-idx3-ubyte.gz").is_file(),
                                reason="dataset-fashion-mnist is not installed")


@pytest.mark.xdist_group("gloo")  # process groups one at a time (see Makefile)
@pytest.mark.slow
@needs_data
def test_two_gloo_ranks_keep_identical_amax_and_write_the_checkpoint_once(tmp_path):
    from qdq import qat
    from qdq.replace import replace_modules
    from qdqapp.reference import build_reference_model

    torch.manual_seed(0)
    start = tmp_path / "float.pt"
    torch.save(build_reference_model().state_dict(), start)
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(ROOT / "scripts" / "qat_finetune.py"), "--device", "cpu", "--threads", "1",
           "--checkpoint", str(start), "--limit-train", "512", "--limit-test", "200",
           "--batch-size", "64", "--calib-batches", "2", "--epochs", "1", "--lr", "0.01",
           "--learn-amax", "--dump-amax", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rank0 = json.loads((out / "amax_rank0.json").read_text())
    rank1 = json.loads((out / "amax_rank1.json").read_text())
    writes0, writes1 = rank0.pop("checkpoint_writes"), rank1.pop("checkpoint_writes")
    assert writes0 == 1 and writes1 == 0  # only rank 0 writes
    assert len(rank0) > 10 and rank0 == rank1  # bit-identical amax on both ranks
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and set(results["ptq"]) == {"max"}
    assert 0.0 <= results["qat"] <= 100.0
    # The checkpoint rebuilds the model with its learned (per-tensor) amax as Parameters.
    model = build_reference_model()
    replace_modules(model)
    assert qat.load_checkpoint(model, out / "qat_best.pt")["epoch"] == 1
    assert model.layer1.conv1[0]._input_quantizer.learn_amax
    assert model.layer1.conv1[0]._input_quantizer.amax.tolist() == rank0[
        "layer1.conv1.0._input_quantizer"]
    assert sorted(p.name for p in out.iterdir()) == [
        "amax_rank0.json", "amax_rank1.json", "qat_best.pt", "qat_best.pt.state",
        "results.json"]
