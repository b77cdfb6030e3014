"""HistogramCalibrator: pytorch-quantization's layout counted exactly (against the plain
collector of tests/qdq/calib_reference.py), growth and its cap, amax, all_reduce."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qdq.calib import CalibrationError, HistogramCalibrator, compute_amaxes
from qdq.descriptor import QuantDescriptor
from qdq.quantizer import QuantizerError, TensorQuantizer
from tests.conftest import needs_cuda
from tests.qdq import calib_reference as ref


def _collect(data, **kw) -> HistogramCalibrator:
    calib = HistogramCalibrator(**kw)
    for d in data:
        calib.collect(d)
    return calib


def _growing(seed: int = 0, scales=(1.0, 2.7, 1.9), shape=(4, 3000)) -> list[torch.Tensor]:
    """Three batches, the range growing in the second."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * s for s in scales]


def _same_as_reference(calib: HistogramCalibrator, data, **kw) -> None:
    counts, width = ref.collect([d.float() for d in data], **kw)
    assert calib.counts.tolist() == counts
    assert calib.bin_width == pytest.approx(width, rel=1e-12)


# ------------------------------------------------------------------ layout and counts


@pytest.mark.parametrize("scales", [(1.0, 2.7, 1.9), (1.0, 1.0, 1.0), (0.5, 3.0, 9.0),
                                    (2.0, 0.1, 2.0001)])
def test_three_batches_give_the_described_histogram(scales):
    data = _growing(1, scales)
    calib = _collect(data)
    _same_as_reference(calib, data)
    assert calib.counts.dtype == torch.int64
    assert int(calib.counts.sum()) == sum(d.numel() for d in data)
    first = float(data[0].abs().max())
    assert calib.bin_width == pytest.approx(first / 2048)     # width from the first batch
    assert calib.counts.numel() >= 2048
    assert float(calib.max) == float(torch.cat(data).abs().max())


def test_first_batch_covers_zero_to_its_max_in_num_bins():
    x = torch.tensor([0.0, 0.25, -1.0, 0.5, 1.0])
    calib = _collect([x], num_bins=8)
    assert calib.bin_width == 1 / 8 and calib.counts.tolist() == [1, 0, 1, 0, 1, 0, 0, 2]


def test_a_later_batch_appends_bins_of_the_same_width():
    calib = _collect([torch.tensor([1.0]), torch.tensor([1.3])], num_bins=8)
    assert calib.bin_width == 1 / 8
    assert calib.counts.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1]   # ceil(1.3 * 8) bins


def test_a_batch_that_repeats_the_first_max_adds_no_bin():
    """Clipped inputs (e.g. images clamped to [-2.5, 2.5]) reach the same max every batch."""
    data = [torch.linspace(-2.5, 2.5, 1001) for _ in range(3)]
    calib = _collect(data)
    assert calib.counts.numel() == 2048
    _same_as_reference(calib, data)


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32).filter(
    lambda v: v == 0 or abs(v) > 1e-30), min_size=1, max_size=50), min_size=1, max_size=4),
       num_bins=st.sampled_from([8, 128, 2048]), skip_zeros=st.booleans())
def test_arbitrary_batches_match_the_described_collector(batches, num_bins, skip_zeros):
    data = [torch.tensor(b, dtype=torch.float32) for b in batches]
    calib = _collect(data, num_bins=num_bins, skip_zeros=skip_zeros)
    counts, width = ref.collect(data, num_bins=num_bins, skip_zeros=skip_zeros)
    got = [] if calib.counts is None else calib.counts.tolist()
    if not counts:           # nothing but zeros with skip_zeros: nothing counted
        assert calib.counts is None or int(calib.counts.sum()) == 0
        return
    assert got == counts
    assert calib.bin_width == (None if width is None else pytest.approx(width, rel=1e-12))


def test_growth_past_the_cap_merges_neighbours():
    data = _growing(2, (1.0, 5.0, 40.0))
    calib = _collect(data, num_bins=128, max_bins=1024)
    _same_as_reference(calib, data, num_bins=128, max_bins=1024)
    assert calib.counts.numel() <= 1024
    assert int(calib.counts.sum()) == sum(d.numel() for d in data)
    assert calib.bin_width == pytest.approx(float(data[0].abs().max()) / 128 * 8)


def test_large_batches_count_in_parts_like_one_count():
    """From 2^20 values on and with two torch threads, the CPU count runs in parts on two
    threads; an odd size splits unevenly. numpy bins the same way on its own."""
    g = torch.Generator().manual_seed(8)
    x = torch.relu(torch.randn(2 ** 20 + 3, generator=g)) * 3.0
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        calib = _collect([x])
    finally:
        torch.set_num_threads(old)
    a = np.abs(x.numpy())
    scale = np.float32(2048) / np.float32(a.max())
    index = np.minimum(np.trunc(a * scale).astype(np.int64), 2047)
    assert calib.counts.tolist() == np.bincount(index, minlength=2048).tolist()


@pytest.mark.parametrize("kw", [{}, {"skip_zeros": True}, {"num_bins": 64, "max_bins": 256}])
def test_the_no_sync_device_path_counts_like_the_cpu_path(kw):
    """The GPU path (fixed-size counts, range and growth as device tensors) run on CPU
    tensors gives the CPU path's histogram."""
    g = torch.Generator().manual_seed(9)
    data = [torch.zeros(50)] + [torch.relu(torch.randn(3000, generator=g)) * s
                                for s in (1.0, 3.5, 0.5, 30.0)]
    device_path = HistogramCalibrator(**kw)
    device_path._init_state(torch.device("cpu"), host_sized=False)
    for d in data:
        device_path.collect(d)
    cpu_path = _collect(data, **kw)
    assert torch.equal(device_path.counts, cpu_path.counts)
    assert device_path.bin_width == cpu_path.bin_width
    assert float(device_path.max) == float(cpu_path.max)
    assert torch.equal(device_path.compute_amax("entropy"), cpu_path.compute_amax("entropy"))


def test_half_precision_and_float64_are_binned_as_float32():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        low = x.to(dtype)
        assert torch.equal(_collect([low]).counts, _collect([low.float()]).counts), dtype


def test_skip_zeros_drops_exact_zeros_only():
    x = torch.tensor([0.0, -0.0, 0.0, 1e-9, 0.5, -0.5, 3.0])
    kept = _collect([x], skip_zeros=True)
    assert int(kept.counts.sum()) == 4 and int(kept.counts[0]) == 1
    _same_as_reference(kept, [x], skip_zeros=True)
    assert int(_collect([x]).counts.sum()) == 7


def test_zeros_before_data_count_in_bin_zero():
    calib = _collect([torch.zeros(100), torch.full((10,), 0.3)], num_bins=16)
    assert calib.bin_width == pytest.approx(0.3 / 16)
    assert int(calib.counts[0]) == 100 and int(calib.counts[15]) == 10


def test_reset_forgets_everything():
    calib = _collect([torch.randn(100)])
    calib.reset()
    assert calib.counts is None and calib.compute_amax("entropy") is None
    calib.collect(torch.tensor([0.25]))
    assert int(calib.counts.sum()) == 1 and calib.bin_width == 0.25 / 2048


def test_fix_range_sets_the_layout_before_data():
    calib = HistogramCalibrator(num_bins=16)
    calib.fix_range(2.0)
    calib.collect(torch.tensor([0.5, 1.0]))
    assert calib.bin_width == 2.0 / 16 and int(calib.counts[4]) == 1
    with pytest.raises(CalibrationError, match="after data"):
        calib.fix_range(3.0)
    with pytest.raises(CalibrationError, match="positive"):
        HistogramCalibrator().fix_range(0.0)


# ------------------------------------------------------------------ amax


@pytest.mark.parametrize("seed, scales, relu", [(4, (1.0, 3.0, 2.0), False),
                                                (5, (1.0, 1.6, 0.8), True),
                                                (6, (0.2, 1.0, 1.0), False)])
def test_whole_calibrator_amax_equals_the_reference_search(seed, scales, relu):
    """Three batches, the range growing in the second: the same histogram as the
    described collector, and the same amax as the reference searches on it."""
    data = _growing(seed, scales)
    data = [torch.relu(d) for d in data] if relu else data
    calib = _collect(data, num_bins=512)
    counts, width = ref.collect(data, num_bins=512)
    assert calib.counts.tolist() == counts
    i, _ = ref.entropy_bin(counts, stride=3)
    assert float(calib.compute_amax("entropy", stride=3)) == pytest.approx(i * width,
                                                                           rel=1e-6)
    b = ref.percentile_bin(counts, 99.9)
    assert float(calib.compute_amax("percentile", percentile=99.9)) == pytest.approx(
        b * width, rel=1e-6)
    i, _ = ref.mse_bin(counts, stride=5)
    assert float(calib.compute_amax("mse", stride=5)) == pytest.approx((i + .5) * width,
                                                                       rel=1e-6)
    assert float(calib.compute_amax("max")) == float(torch.cat(data).abs().max())


def test_compute_amaxes_is_one_search_for_many_calibrators():
    calibs = [_collect(_growing(s, (1.0, 1.0 + s, 2.0))) for s in range(5)]
    calibs.append(HistogramCalibrator())                     # saw nothing
    calibs.append(_collect([torch.zeros(10)]))              # saw only zeros
    calibs.append(_collect(_growing(9), num_bits=6))         # other bits: another group
    for method, opts in [("entropy", {}), ("mse", {"stride": 4}),
                         ("percentile", {"percentile": 99.0}), ("max", {})]:
        together = compute_amaxes(calibs, method, **opts)
        alone = [c.compute_amax(method, **opts) for c in calibs]
        assert together[5] is None and alone[5] is None
        assert float(together[6]) == 0.0
        for a, b in zip(together, alone, strict=True):
            assert (a is None and b is None) or torch.equal(a, b), method


def test_keywords_a_method_does_not_use_are_refused():
    calib = _collect([torch.randn(1000)])
    calib.owner = "fc._input_quantizer"
    with pytest.raises(CalibrationError, match="fc._input_quantizer.*percentile does not apply "
                                               "to the 'entropy'"):
        calib.compute_amax("entropy", percentile=99.9)
    with pytest.raises(CalibrationError, match="start_bin does not apply to the 'max'"):
        calib.compute_amax("max", start_bin=10)


def test_unknown_method_lists_the_valid_ones():
    calib = _collect([torch.randn(10)])
    calib.owner = "layer1.conv._input_quantizer"
    with pytest.raises(CalibrationError, match="layer1.conv._input_quantizer") as info:
        calib.compute_amax("kl")
    for method in HistogramCalibrator.amax_methods:
        assert method in str(info.value)


def test_all_zero_data_gives_zero_amax():
    calib = _collect([torch.zeros(10)])
    for method in HistogramCalibrator.amax_methods:
        assert float(calib.compute_amax(method)) == 0.0


def test_construction_checks():
    with pytest.raises(CalibrationError, match="per tensor"):
        HistogramCalibrator(axis=0)
    # values pytorch-quantization ignores are accepted with a warning that says so
    with pytest.warns(UserWarning, match="grow_method='stretch'"):
        HistogramCalibrator(grow_method="stretch")
    with pytest.raises(CalibrationError, match="max_bins"):
        HistogramCalibrator(num_bins=256, max_bins=100)
    calib = HistogramCalibrator(8, None, False, num_bins=512, grow_method="append",
                                skip_zeros=True, torch_hist=True)
    calib.collect(torch.tensor([0.0, 1.0, 2.0]))
    assert calib.counts.numel() == 512 and int(calib.counts.sum()) == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_cpu_data_raises_naming_the_quantizer(bad):
    calib = HistogramCalibrator()
    calib.owner = "fc._input_quantizer"
    with pytest.raises(CalibrationError, match=r"fc\._input_quantizer.*non-finite"):
        calib.collect(torch.tensor([1.0, bad]))


def test_float64_beyond_float32_range_is_refused():
    calib = HistogramCalibrator()
    calib.owner = "big"
    with pytest.raises(CalibrationError, match="big.*float32 range"):
        calib.collect(torch.tensor([1.0, 1e300], dtype=torch.float64))


def test_unsigned_refuses_negative_values():
    calib = HistogramCalibrator(unsigned=True)
    calib.owner = "relu_out"
    with pytest.raises(CalibrationError, match="relu_out.*negative"):
        calib.collect(torch.tensor([1.0, -2.0]))


# ------------------------------------------------------------------ quantizer


@pytest.mark.parametrize("method", ["entropy", "percentile", "mse", "max"])
def test_quantizer_end_to_end(method):
    q = TensorQuantizer(QuantDescriptor(calib_method="histogram"))
    assert isinstance(q.calibrator, HistogramCalibrator)
    q.disable_quant()
    q.enable_calib()
    batches = _growing(7, (1.0, 2.0, 1.5), (16, 64))
    for b in batches:
        q(b)
    opts = {"percentile": 99.99} if method == "percentile" else {}
    q.load_calib_amax(method, **opts)
    q.disable_calib()
    q.enable_quant()
    assert torch.equal(q.amax, q.calibrator.compute_amax(method, **opts))
    out = q(batches[0])
    assert out.shape == batches[0].shape and float((out - batches[0]).abs().max()) > 0


def test_quantizer_without_data():
    q = TensorQuantizer(QuantDescriptor(calib_method="histogram", name="head"))
    with pytest.raises(QuantizerError, match="head.*no data"):
        q.load_calib_amax("entropy")
    q.amax = 2.0
    q.load_calib_amax("entropy", strict=False)
    assert float(q.amax) == 2.0


def test_quantizer_nan_names_the_quantizer():
    q = TensorQuantizer(QuantDescriptor(calib_method="histogram", name="blk.act"))
    q.enable_calib()
    q.disable_quant()
    with pytest.raises(CalibrationError, match=r"blk\.act"):
        q(torch.tensor([0.0, float("nan")]))


# ------------------------------------------------------------------ all_reduce


def _rank_data(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(3000, generator=g) * (0.7, 40.0)[rank],
            torch.randn(500, generator=g) * 0.01]


def _all_reduce_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        results = {}
        fixed = HistogramCalibrator(max_bins=4096)      # ranks grow differently
        fixed.fix_range(0.5)
        for d in _rank_data(rank):
            fixed.collect(d)
        only_rank0 = HistogramCalibrator()
        if rank == 0:
            only_rank0.fix_range(0.5)
            for d in _rank_data(0):
                only_rank0.collect(d)
        for name, calib in (("fixed", fixed), ("only_rank0", only_rank0)):
            calib.all_reduce()
            results[name] = (calib.counts, calib.bin_width, calib.max)
        unfixed = _collect(_rank_data(rank))
        try:
            unfixed.all_reduce()
        except CalibrationError as err:
            results["unfixed"] = str(err)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.xdist_group("gloo")  # process groups one at a time (see Makefile)
@pytest.mark.slow  # two fresh Python processes importing torch
def test_all_reduce_across_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
             join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    def single(data, **kw):
        calib = HistogramCalibrator(**kw)
        calib.fix_range(0.5)
        for d in data:
            calib.collect(d)
        return calib

    # growth differs (rank 1 needs merging); merging and summing is exact
    both = single(_rank_data(0) + _rank_data(1), max_bins=4096)
    only = single(_rank_data(0))
    for rank, result in enumerate(results):
        for name, expected in (("fixed", both), ("only_rank0", only)):
            counts, width, vmax = result[name]
            assert torch.equal(counts, expected.counts), (name, rank)
            assert width == expected.bin_width and float(vmax) == float(expected.max)
        assert "different histogram ranges" in result["unfixed"]


# ------------------------------------------------------------------ CUDA


@needs_cuda
def test_cuda_collection_has_no_host_sync_and_matches_cpu():
    data = _growing(11, (0.5, 3.0, 0.01)) + _growing(12, (70.0,))
    data = [t for d in data for t in (d, torch.relu(d))]
    gpu = HistogramCalibrator(skip_zeros=True, max_bins=8192)
    cuda_data = [d.cuda() for d in data]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for d in cuda_data:
            gpu.collect(d)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu = _collect(data, skip_zeros=True, max_bins=8192)
    assert torch.equal(gpu.counts.cpu(), cpu.counts)
    assert gpu.bin_width == cpu.bin_width
    for method in HistogramCalibrator.amax_methods:
        assert float(gpu.compute_amax(method)) == float(cpu.compute_amax(method)), method


@needs_cuda
def test_cuda_nan_surfaces_at_compute_amax():
    calib = HistogramCalibrator()
    calib.collect(torch.tensor([1.0, float("nan"), 2.0], device="cuda"))
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        calib.compute_amax("entropy")


def test_numpy_reference_counts_agree_with_numpy_histogram_on_exact_edges():
    """A sanity check of the reference itself: with a power-of-two range the float32
    product is exact, so its counts equal numpy.histogram's."""
    x = np.random.default_rng(0).uniform(-4, 4, 10_000).astype(np.float32)
    x[0] = 4.0
    counts, width = ref.collect([x], num_bins=64)
    expected, _ = np.histogram(np.abs(x), bins=64, range=(0, 4.0))
    assert width == 4.0 / 64 and counts == expected.tolist()
