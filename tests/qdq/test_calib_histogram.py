"""HistogramCalibrator: exact counts, range growth, all_reduce, amax methods, quantizer use."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qdq.calib import CalibrationError, HistogramCalibrator
from qdq.calib.amax_search import entropy_amax, mse_amax, percentile_amax
from qdq.calib.histogram import AMAX_METHODS
from qdq.descriptor import QuantDescriptor
from qdq.quantizer import QuantizerError, TensorQuantizer
from tests.conftest import needs_cuda


def _numpy_counts(calib: HistogramCalibrator, data: list[torch.Tensor]) -> np.ndarray:
    """numpy.histogram of |x| on the calibrator's own edges (last edge open like ours)."""
    values = np.concatenate([d.detach().double().abs().reshape(-1).numpy() for d in data])
    if calib.skip_zeros:
        values = values[values != 0]
    edges = calib.bin_edges().numpy()
    counts, _ = np.histogram(values, bins=edges)
    # numpy closes the last bin on the right; no value reaches R, so nothing moves.
    assert not (values >= edges[-1]).any()
    return counts


def _collect(data, **kw) -> HistogramCalibrator:
    calib = HistogramCalibrator(**kw)
    for d in data:
        calib.collect(d)
    return calib


# ------------------------------------------------------------------ counts


def test_counts_are_exact_int64_and_match_numpy():
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(3, 50, 40, generator=g) * 2.5 for _ in range(3)]
    calib = _collect(data)
    assert calib.counts.dtype == torch.int64
    assert calib.counts.shape == (2048,)
    np.testing.assert_array_equal(calib.counts.numpy(), _numpy_counts(calib, data))
    assert int(calib.counts.sum()) == sum(d.numel() for d in data)


def test_range_is_the_smallest_power_of_two_above_the_max():
    calib = _collect([torch.tensor([0.1, -3.0, 2.0])])
    assert calib.bin_width * calib.num_bins == 4.0
    calib = _collect([torch.tensor([4.0])])   # exactly a power of two: R must exceed it
    assert calib.bin_width * calib.num_bins == 8.0
    assert int(calib.counts[1024]) == 1


@pytest.mark.parametrize("scales", [(0.01, 1.0, 300.0), (5.0, 0.001, 5e4), (1e-30, 1e30)])
def test_range_growth_keeps_every_count_and_equals_one_shot_binning(scales):
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(5000, generator=g) * s for s in scales]
    grown = _collect(data)
    one_shot = _collect([torch.cat(data)])
    assert int(grown.counts.sum()) == 5000 * len(scales)
    assert torch.equal(grown.counts, one_shot.counts)
    assert grown.bin_width == one_shot.bin_width
    assert float(grown.max) == float(torch.cat(data).abs().max())
    np.testing.assert_array_equal(grown.counts.numpy(), _numpy_counts(grown, data))


@settings(max_examples=30, deadline=None)
@given(
    batches=st.lists(
        st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=60),
        min_size=1, max_size=5),
    num_bins=st.sampled_from([16, 128, 2048]),
)
def test_growth_matches_one_shot_on_arbitrary_batches(batches, num_bins):
    data = [torch.tensor(b, dtype=torch.float32) for b in batches]
    grown = _collect(data, num_bins=num_bins)
    one_shot = _collect([torch.cat(data)], num_bins=num_bins)
    assert torch.equal(grown.counts, one_shot.counts)
    assert int(grown.counts.sum()) == sum(len(b) for b in batches)
    np.testing.assert_array_equal(grown.counts.numpy(), _numpy_counts(grown, data))


def test_skip_zeros_drops_exact_zeros_only():
    x = torch.tensor([0.0, -0.0, 0.0, 1e-9, 0.5, -0.5, 3.0])
    kept = _collect([x], skip_zeros=True)
    assert int(kept.counts.sum()) == 4
    assert int(kept.counts[0]) == 1           # 1e-9 stays, in bin 0
    np.testing.assert_array_equal(kept.counts.numpy(), _numpy_counts(kept, [x]))
    assert int(_collect([x]).counts.sum()) == 7


def test_zeros_first_then_data_takes_the_data_range():
    calib = _collect([torch.zeros(100), torch.full((10,), 0.3)])
    assert calib.bin_width * calib.num_bins == 0.5
    assert int(calib.counts[0]) == 100 and int(calib.counts.sum()) == 110


def test_half_precision_inputs_are_binned_like_float32():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        low = x.to(dtype)
        calib = _collect([low])
        assert torch.equal(calib.counts, _collect([low.float()]).counts), dtype


def test_reset_forgets_everything():
    calib = _collect([torch.randn(100)])
    calib.reset()
    assert calib.counts is None and calib.compute_amax("entropy") is None
    calib.collect(torch.tensor([0.25]))
    assert int(calib.counts.sum()) == 1


# ------------------------------------------------------------------ amax


def test_compute_amax_uses_the_searches_on_its_histogram():
    g = torch.Generator().manual_seed(4)
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    x[0] = 9.0 * (1 + torch.rand(1, generator=g))
    calib = _collect([x])
    counts, width = calib.counts, calib.bin_width
    expected = {
        "entropy": entropy_amax(counts, width),
        "mse": mse_amax(counts, width),
        "percentile": percentile_amax(counts, width, 99.9),
    }
    for method, value in expected.items():
        got = calib.compute_amax(method, percentile=99.9)
        assert got.dtype == torch.float32 and got.dim() == 0
        assert float(got) == min(float(value), float(calib.max)), method
    assert float(calib.compute_amax("max")) == float(x.abs().max())
    assert 1.0 < float(calib.compute_amax("entropy")) < float(x.abs().max())


def test_percentile_argument_is_honoured():
    calib = _collect([torch.randn(100_000, generator=torch.Generator().manual_seed(5))])
    values = [float(calib.compute_amax("percentile", percentile=p))
              for p in (99.0, 99.9, 99.99, 99.999)]
    assert values == sorted(values) and len(set(values)) == 4
    assert abs(values[0] - 2.576) < 0.05


def test_percentile_100_is_the_exact_max():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(6))
    calib = _collect([x])
    assert float(calib.compute_amax("percentile", percentile=100)) == float(x.abs().max())


def test_all_zero_data_gives_zero_amax():
    calib = _collect([torch.zeros(10)])
    for method in AMAX_METHODS:
        assert float(calib.compute_amax(method)) == 0.0


def test_unknown_method_lists_the_valid_ones():
    calib = _collect([torch.randn(10)])
    calib.owner = "layer1.conv._input_quantizer"
    with pytest.raises(CalibrationError, match="layer1.conv._input_quantizer") as info:
        calib.compute_amax("kl")
    for method in AMAX_METHODS:
        assert method in str(info.value)


def test_no_data_gives_none():
    assert HistogramCalibrator().compute_amax("mse") is None


def test_per_channel_is_refused():
    with pytest.raises(CalibrationError, match="per tensor"):
        HistogramCalibrator(axis=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_cpu_data_raises_naming_the_quantizer(bad):
    calib = HistogramCalibrator()
    calib.owner = "fc._input_quantizer"
    with pytest.raises(CalibrationError, match=r"fc\._input_quantizer.*non-finite"):
        calib.collect(torch.tensor([1.0, bad]))


# ------------------------------------------------------------------ quantizer


@pytest.mark.parametrize("method", ["entropy", "percentile", "mse", "max"])
def test_quantizer_end_to_end(method):
    q = TensorQuantizer(QuantDescriptor(calib_method="histogram"))
    assert isinstance(q.calibrator, HistogramCalibrator)
    q.disable_quant()
    q.enable_calib()
    g = torch.Generator().manual_seed(7)
    batches = [torch.randn(16, 64, generator=g) for _ in range(3)]
    for b in batches:
        q(b)
    q.load_calib_amax(method, percentile=99.99)
    q.disable_calib()
    q.enable_quant()
    expected = q.calibrator.compute_amax(method, percentile=99.99)
    assert torch.equal(q.amax, expected)
    out = q(batches[0])
    assert out.shape == batches[0].shape
    assert float((out - batches[0]).abs().max()) > 0   # really quantized
    assert float(q.amax) <= float(torch.cat(batches).abs().max())


def test_quantizer_default_method_is_entropy_and_percentile_is_positional():
    q = TensorQuantizer(QuantDescriptor(calib_method="histogram"))
    q.disable_quant()
    q.enable_calib()
    q(torch.randn(4096, generator=torch.Generator().manual_seed(8)))
    q.load_calib_amax()
    assert torch.equal(q.amax, q.calibrator.compute_amax("entropy"))
    q.load_calib_amax("percentile", percentile=99.0)
    assert torch.equal(q.amax, q.calibrator.compute_amax("percentile", percentile=99.0))


def test_quantizer_without_data():
    q = TensorQuantizer(QuantDescriptor(calib_method="histogram", name="head"))
    with pytest.raises(QuantizerError, match="head.*no data"):
        q.load_calib_amax("entropy")
    q.amax = 2.0
    q.load_calib_amax("entropy", strict=False)
    assert float(q.amax) == 2.0


def test_quantizer_unknown_method_names_the_quantizer():
    q = TensorQuantizer(QuantDescriptor(calib_method="histogram", name="stem"))
    q.enable_calib()
    q.disable_quant()
    q(torch.randn(10))
    with pytest.raises(CalibrationError, match="stem.*entropy, percentile, mse, max"):
        q.load_calib_amax("histogram")


def test_quantizer_nan_names_the_quantizer():
    q = TensorQuantizer(QuantDescriptor(calib_method="histogram", name="blk.act"))
    q.enable_calib()
    q.disable_quant()
    with pytest.raises(CalibrationError, match=r"blk\.act"):
        q(torch.tensor([0.0, float("nan")]))


def test_quant_conv_model_calibrates_with_histograms():
    from qdq import nn as quant_nn

    torch.manual_seed(0)
    desc = QuantDescriptor(calib_method="histogram", skip_zeros=True)
    model = torch.nn.Sequential(
        quant_nn.QuantConv2d(3, 8, 3, quant_desc_input=desc), torch.nn.ReLU(),
        quant_nn.QuantConv2d(8, 4, 3, quant_desc_input=desc),
    ).eval()
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    inputs = [m._input_quantizer for m in model if hasattr(m, "_input_quantizer")]
    seen = []
    model[2].register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    for q in quantizers:
        q.disable_quant()
        q.enable_calib()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 16, 16, generator=g))
    for q in quantizers:
        q.load_calib_amax("percentile", percentile=99.9) if q in inputs else q.load_calib_amax()
        q.disable_calib()
        q.enable_quant()
    assert all(q.amax is not None for q in quantizers)
    # skip_zeros: the ReLU output's zeros never reach the second histogram.
    second = inputs[1].calibrator
    relu_out = torch.cat([s.reshape(-1) for s in seen])
    assert 0 < int((relu_out == 0).sum())
    assert int(second.counts.sum()) == int((relu_out != 0).sum())
    np.testing.assert_array_equal(second.counts.numpy(), _numpy_counts(second, seen))


# ------------------------------------------------------------------ all_reduce


def _rank_data(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    scale = (0.7, 40.0)[rank]          # ranks disagree on the range
    return [torch.randn(3000, generator=g) * scale, torch.randn(500, generator=g) * 0.01]


def _all_reduce_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        both = _collect(_rank_data(rank))
        only_rank0 = _collect(_rank_data(rank) if rank == 0 else [])
        zeros_on_1 = _collect(_rank_data(rank)[:1] if rank == 0 else [torch.zeros(77)])
        for calib in (both, only_rank0, zeros_on_1):
            calib.all_reduce()
        torch.save({name: (c.counts, c.bin_width, c.max) for name, c in
                    (("both", both), ("only_rank0", only_rank0), ("zeros_on_1", zeros_on_1))},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two fresh Python processes importing torch
def test_all_reduce_across_two_gloo_processes_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
             join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    expected = {
        "both": _collect(_rank_data(0) + _rank_data(1)),
        "only_rank0": _collect(_rank_data(0)),
        "zeros_on_1": _collect(_rank_data(0)[:1] + [torch.zeros(77)]),
    }
    for name, calib in expected.items():
        for rank, result in enumerate(results):
            counts, width, vmax = result[name]
            assert torch.equal(counts, calib.counts), (name, rank)
            assert width == calib.bin_width, (name, rank)
            assert float(vmax) == float(calib.max), (name, rank)


# ------------------------------------------------------------------ CUDA


@needs_cuda
def test_cuda_collection_has_no_host_sync_and_matches_cpu():
    g = torch.Generator().manual_seed(11)
    data = [torch.randn(64, 1000, generator=g) * s for s in (0.5, 3.0, 0.01, 70.0)]
    gpu = HistogramCalibrator(skip_zeros=True)
    cuda_data = [d.cuda() for d in data]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for d in cuda_data:
            gpu.collect(d)
            gpu.collect(torch.relu(d))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu = _collect([t for d in data for t in (d, torch.relu(d))], skip_zeros=True)
    assert torch.equal(gpu.counts.cpu(), cpu.counts)
    assert gpu.bin_width == cpu.bin_width
    for method in AMAX_METHODS:
        assert float(gpu.compute_amax(method)) == pytest.approx(
            float(cpu.compute_amax(method)), abs=cpu.bin_width), method


@needs_cuda
def test_cuda_nan_surfaces_at_compute_amax():
    calib = HistogramCalibrator()
    calib.collect(torch.tensor([1.0, float("nan"), 2.0], device="cuda"))
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        calib.compute_amax("entropy")


def test_float64_beyond_float32_range_is_refused():
    calib = HistogramCalibrator()
    calib.owner = "big"
    with pytest.raises(CalibrationError, match="big.*float32 range"):
        calib.collect(torch.tensor([1.0, 1e300], dtype=torch.float64))


def test_pytorch_quantization_constructor_keywords_are_accepted():
    calib = HistogramCalibrator(8, None, False, num_bins=512, grow_method="append",
                                skip_zeros=True, torch_hist=True)
    calib.collect(torch.tensor([0.0, 1.0, 2.0]))
    assert calib.num_bins == 512 and int(calib.counts.sum()) == 2
