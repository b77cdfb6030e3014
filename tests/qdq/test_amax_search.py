"""The batched amax searches pick the same bin as a plain reference of
pytorch-quantization's algorithm (tests/qdq/calib_reference.py), on 31 varied histograms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qdq.calib import CalibrationError
from qdq.calib.amax_search import (
    SEARCHES,
    entropy_bins,
    entropy_divergences,
    mse_bins,
    mse_errors,
    percentile_bins,
    search_amax,
)
from tests.conftest import needs_cuda
from tests.qdq import calib_reference as ref

# ------------------------------------------------------------------ histograms


def _hist(samples: np.ndarray, n: int = 512, top: float | None = None) -> torch.Tensor:
    a = np.abs(samples)
    counts, _ = np.histogram(a, bins=n, range=(0.0, float(a.max()) if top is None else top))
    return torch.from_numpy(counts.astype(np.int64))


def _placed(n: int, where: dict[int, int]) -> torch.Tensor:
    counts = torch.zeros(n, dtype=torch.int64)
    for b, c in where.items():
        counts[b] = c
    return counts


def _cases() -> dict[str, tuple[torch.Tensor, dict]]:
    g = np.random.default_rng(7)
    normal = g.normal(size=100_000)
    gap = np.concatenate([g.uniform(0, 1.5, 20_000), g.uniform(4.01, 4.2, 300)])
    return {
        "gaussian": (_hist(normal), {}),
        "laplace": (_hist(g.laplace(size=100_000)), {}),
        "uniform": (_hist(g.uniform(-1, 1, 50_000)), {}),
        "bimodal": (_hist(np.concatenate([g.normal(0, .1, 60_000), g.normal(3, .2, 2_000)])),
                    {}),
        "student_t2": (_hist(g.standard_t(2, 100_000)), {}),
        "student_t3": (_hist(g.standard_t(3, 100_000)), {}),
        "relu_gaussian": (_hist(np.maximum(normal, 0)), {}),
        "relu_student_t3": (_hist(np.maximum(g.standard_t(3, 100_000), 0)), {}),
        "rare_huge_outliers": (_hist(np.concatenate([normal, [40.0, -38.5, 39.2]])), {}),
        "empty_bins_before_tail": (_hist(gap, 512, 4.2), {}),
        "mass_in_few_bins": (_placed(512, {3: 1000, 40: 7, 41: 3, 200: 2, 511: 1}), {}),
        "single_spike": (_placed(512, {300: 12345}), {}),
        "zero_spike_and_tail": (_placed(400, {0: 50_000, 1: 3, 150: 10, 399: 1}), {}),
        "upper_half_only": (_hist(g.uniform(2.0, 4.0, 30_000), 512, 4.0), {}),
        "fewer_than_128_bins": (_hist(normal, 100), {"start_bin": 10}),
        "40_bins_4_bits": (_hist(g.laplace(size=5_000), 40), {"num_bits": 4, "start_bin": 4}),
        "unsigned_relu": (_hist(np.maximum(normal, 0), 600), {"unsigned": True}),
        "stride_3": (_hist(g.laplace(size=50_000)), {"stride": 3}),
        "stride_7_from_200": (_hist(g.standard_t(3, 50_000)), {"stride": 7, "start_bin": 200}),
        "exponential": (_hist(g.exponential(size=80_000)), {}),
        "lognormal": (_hist(g.lognormal(0, 1, 80_000)), {}),
        "integer_values": (_hist(np.round(normal * 6), 512, 40.0), {}),
        "tiny_total": (_hist(g.normal(size=40), 300), {}),
        "huge_counts": (_hist(normal) * 1_000_000, {}),
        "6_bits": (_hist(g.laplace(size=50_000), 300), {"num_bits": 6, "start_bin": 32}),
        "4_bits_unsigned": (_hist(np.maximum(g.standard_t(3, 50_000), 0), 200),
                            {"num_bits": 4, "unsigned": True, "start_bin": 16}),
        "grown_700_bins": (_hist(np.concatenate([normal, 1.3 * normal[:2000]]), 700), {}),
        "flat": (torch.ones(300, dtype=torch.int64), {}),
        "two_bins": (torch.tensor([5, 3]), {"start_bin": 1}),
        "last_bin_only": (_placed(256, {255: 9}), {}),
        "2048_bins_stride_4": (_hist(g.standard_t(4, 300_000), 2048), {"stride": 4,
                                                                       "start_bin": 1024}),
    }


CASES = _cases()
PERCENTILES = [50.0, 99.0, 99.9, 99.99, 99.999, 100.0]


def test_there_are_at_least_30_histograms():
    assert len(CASES) >= 30


# ------------------------------------------------------------------ entropy


@pytest.mark.parametrize("name", sorted(CASES))
def test_entropy_picks_the_reference_bin(name):
    counts, opts = CASES[name]
    expected, _ = ref.entropy_bin(counts.tolist(), **opts)
    assert int(entropy_bins([counts], **opts)[0]) == expected


@pytest.mark.parametrize("name", ["gaussian", "relu_student_t3", "empty_bins_before_tail",
                                  "mass_in_few_bins", "upper_half_only", "fewer_than_128_bins",
                                  "unsigned_relu", "stride_7_from_200", "last_bin_only"])
def test_entropy_divergences_equal_the_reference(name):
    counts, opts = CASES[name]
    _, expected = ref.entropy_bin(counts.tolist(), **opts)
    cand, kl = entropy_divergences(counts, **opts)
    assert cand.tolist() == sorted(expected)
    want = np.array([expected[i] for i in cand.tolist()])
    got = kl.numpy()
    assert (np.isinf(got) == np.isinf(want)).all()
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-9, atol=1e-13)


def test_entropy_last_bin_empty_with_outliers_is_infinite():
    """P puts the count beyond ``i`` into bin ``i - 1``; Q only fills bins non-empty in the
    histogram, so an empty bin ``i - 1`` with outliers means infinite KL."""
    counts = _placed(300, {5: 100, 6: 50, 200: 4, 299: 1})
    cand, kl = entropy_divergences(counts, start_bin=150)
    by_i = dict(zip(cand.tolist(), kl.tolist(), strict=True))
    assert math.isinf(by_i[150]) and math.isinf(by_i[299])
    assert math.isfinite(by_i[201]) and math.isfinite(by_i[300])


def test_entropy_levels_are_proportional():
    """Bin ``b`` of candidate ``i`` joins level ``floor(b L / i)``: with L = 4 and i = 6
    the levels are bins {0, 1}, {2}, {3, 4}, {5}, so Q spreads bins 3 and 4 evenly."""
    counts = torch.tensor([4, 4, 4, 1, 7, 4])
    _, kl = entropy_divergences(counts, num_bits=3, start_bin=6)
    p = np.array([4, 4, 4, 1, 7, 4]) / 24
    q = np.array([4, 4, 4, 4, 4, 4]) / 24
    assert float(kl[0]) == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-12)


# ------------------------------------------------------------------ percentile


@pytest.mark.parametrize("name", sorted(CASES))
def test_percentile_picks_the_reference_bin(name):
    counts, _ = CASES[name]
    got = percentile_bins([counts] * len(PERCENTILES), percentile=99.99)
    assert int(got[0]) == ref.percentile_bin(counts.tolist(), 99.99)
    for p in PERCENTILES:
        assert int(percentile_bins([counts], percentile=p)[0]) == \
            ref.percentile_bin(counts.tolist(), p), p


def test_percentile_is_the_left_edge_of_the_bin_that_reaches_it():
    counts = torch.tensor([0, 0, 5, 5])
    amax = search_amax("percentile", [counts], [0.5], percentile=50.0)
    assert float(amax[0]) == 1.0      # bin 2 reaches 50 %: its left edge, 2 * 0.5


def test_percentile_rounds_the_running_share_as_pytorch_quantization_does():
    """99.99 % of 100,000 is reached exactly at bin 1688, but the running float sum of
    count / total stays a hair below 0.9999 there: pytorch-quantization picks bin 1696."""
    x = np.abs(np.random.default_rng(0).normal(size=100_000))
    counts = torch.from_numpy(np.histogram(x, 2048)[0])
    exact = int(np.searchsorted(np.cumsum(counts.numpy()), 99_990))
    assert exact == 1688
    assert int(percentile_bins([counts], percentile=99.99)[0]) == \
        ref.percentile_bin(counts.tolist(), 99.99) == 1696


@pytest.mark.parametrize("bad", [0, -1, 100.5, float("nan"), "99", True])
def test_percentile_rejects_bad_values(bad):
    with pytest.raises(CalibrationError, match="percentile"):
        percentile_bins([CASES["uniform"][0]], percentile=bad)


# ------------------------------------------------------------------ mse


@pytest.mark.parametrize("name", sorted(CASES))
def test_mse_picks_the_reference_bin(name):
    counts, opts = CASES[name]
    expected, _ = ref.mse_bin(counts.tolist(), **opts)
    assert int(mse_bins([counts], **opts)[0]) == expected


@pytest.mark.parametrize("name", ["laplace", "unsigned_relu", "mass_in_few_bins",
                                  "zero_spike_and_tail", "6_bits"])
def test_mse_errors_equal_the_reference(name):
    counts, opts = CASES[name]
    _, expected = ref.mse_bin(counts.tolist(), **opts)
    cand, err = mse_errors(counts, **opts)
    assert cand.tolist() == sorted(expected)
    qmax = 2 ** (opts.get("num_bits", 8) - 1 + int(opts.get("unsigned", False))) - 1
    want = np.array([float(expected[i]) for i in cand.tolist()]) / (2 * qmax) ** 2
    np.testing.assert_allclose(err.numpy(), want, rtol=1e-9, atol=1e-9 * want.max())


def test_mse_ties_go_to_the_first_candidate():
    """Everything in bin 0 rounds to 0 at every candidate from 127 on: equal errors."""
    counts = _placed(400, {0: 1000})
    assert int(mse_bins([counts])[0]) == 128


# ------------------------------------------------------------------ batched calls


@pytest.mark.parametrize("method", sorted(SEARCHES))
def test_one_batched_call_equals_one_call_per_histogram(method):
    names = [n for n, (_, opts) in CASES.items() if not opts]
    counts = [CASES[n][0] for n in names]
    widths = [0.01 * (k + 1) for k in range(len(names))]
    opts = {"percentile": 99.9} if method == "percentile" else {}
    together = search_amax(method, counts, widths, **opts)
    alone = torch.cat([search_amax(method, [c], [w], **opts) for c, w in zip(counts, widths,
                                                                           strict=True)])
    assert together.dtype == torch.float32 and together.shape == (len(names),)
    assert torch.equal(together, alone)


def test_search_amax_turns_bins_into_edges_and_centres():
    counts, _ = CASES["laplace"]
    w = 0.003
    i = int(entropy_bins([counts])[0])
    assert float(search_amax("entropy", [counts], [w])[0]) == pytest.approx(i * w, rel=1e-7)
    i = int(mse_bins([counts])[0])
    assert float(search_amax("mse", [counts], [w])[0]) == pytest.approx((i + .5) * w, rel=1e-7)


def test_searches_do_not_change_the_thread_count(monkeypatch):
    def refuse(n):
        raise AssertionError("a search changed torch's thread count")

    monkeypatch.setattr(torch, "set_num_threads", refuse)
    counts = [c for c, opts in CASES.values() if not opts]
    for method in SEARCHES:
        search_amax(method, counts, [1.0] * len(counts))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(counts=st.lists(st.integers(0, 60), min_size=30, max_size=140),
       num_bits=st.sampled_from([3, 4, 5]), unsigned=st.booleans(),
       start_bin=st.integers(1, 29), stride=st.integers(1, 4))
def test_random_histograms_match_the_reference(counts, num_bits, unsigned, start_bin, stride):
    if sum(counts) == 0:
        counts[-1] = 1
    opts = {"num_bits": num_bits, "unsigned": unsigned, "start_bin": start_bin,
            "stride": stride}
    t = torch.tensor(counts)
    assert int(entropy_bins([t], **opts)[0]) == ref.entropy_bin(counts, **opts)[0]
    assert int(mse_bins([t], **opts)[0]) == ref.mse_bin(counts, **opts)[0]


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("method", sorted(SEARCHES))
def test_bad_histograms_are_named(method):
    good = CASES["laplace"][0]
    with pytest.raises(CalibrationError, match="conv2.*empty"):
        search_amax(method, [good, torch.zeros(256, dtype=torch.int64)], [1.0, 1.0],
                    names=["conv1", "conv2"])
    with pytest.raises(CalibrationError, match="histogram 0.*integers"):
        search_amax(method, [torch.ones(256)], [1.0])
    with pytest.raises(CalibrationError, match="1-D"):
        search_amax(method, [torch.ones(2, 256, dtype=torch.int64)], [1.0])
    with pytest.raises(CalibrationError, match="negative"):
        search_amax(method, [torch.tensor([3, -1, 2])], [1.0])


def test_start_bin_past_the_histogram_is_an_error_not_a_crash():
    with pytest.raises(CalibrationError, match="fc.*start_bin=128.*100 bins"):
        search_amax("entropy", [CASES["fewer_than_128_bins"][0]], [1.0], names=["fc"])
    with pytest.raises(CalibrationError, match="start_bin=100.*100 bins"):
        search_amax("mse", [CASES["fewer_than_128_bins"][0]], [1.0], start_bin=100)
    with pytest.raises(CalibrationError, match="stride"):
        search_amax("mse", [CASES["gaussian"][0]], [1.0], stride=0)


def test_unknown_method_and_foreign_options_are_refused():
    counts = [CASES["gaussian"][0]]
    with pytest.raises(CalibrationError, match="unknown amax search 'kl'"):
        search_amax("kl", counts, [1.0])
    with pytest.raises(CalibrationError, match="entropy search takes no percentile"):
        search_amax("entropy", counts, [1.0], percentile=99.0)
    with pytest.raises(CalibrationError, match="2 bin widths"):
        search_amax("mse", counts, [1.0, 2.0])


@needs_cuda
@pytest.mark.parametrize("method", sorted(SEARCHES))
def test_cuda_picks_the_same_bins_as_cpu(method):
    counts = [c for c, opts in CASES.values() if not opts]
    cpu = search_amax(method, counts, [1.0] * len(counts))
    gpu = search_amax(method, [c.cuda() for c in counts], [1.0] * len(counts))
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)
