"""The vectorised amax searches agree with slow loop-by-loop references written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qdq.calib import CalibrationError
from qdq.calib.amax_search import (
    AMAX_SEARCHES,
    KL_TIE_TOL,
    entropy_amax,
    entropy_divergences,
    level_zero_bin,
    mse_amax,
    mse_errors,
    percentile_amax,
)
from tests.conftest import needs_cuda

# ------------------------------------------------------------------ references
# Written for clarity, one candidate and one bin at a time, straight from the definitions.


def _candidates(n: int, start_bin: int, stride: int) -> list[int]:
    cands = list(range(min(start_bin, n), n + 1, stride))
    if cands[-1] != n:
        cands.append(n)
    return cands


def _kl(p: list[float], q: list[float]) -> float:
    sp, sq = sum(p), sum(q)
    if sq == 0:
        return math.inf
    total = 0.0
    for pb, qb in zip(p, q, strict=True):
        if pb == 0:
            continue
        if qb == 0:
            return math.inf
        total += (pb / sp) * math.log((pb / sp) / (qb / sq))
    return total


def ref_entropy(counts, width, num_bits=8, unsigned=False, start_bin=128, stride=1,
                level_zero=True):
    """TensorRT's loop: clip into the last bin, merge into levels, expand, KL, last argmin;
    first, bin 0 takes bin 1's count (pytorch-quantization), unless that empties it."""
    counts = [int(c) for c in counts]
    n = len(counts)
    if level_zero and n > 1 and sum(counts[1:]) > 0:
        counts[0] = counts[1]
    levels = 2 ** (num_bits - 1 + int(unsigned))
    divergences = {}
    for i in _candidates(n, start_bin, stride):
        p = counts[:i]
        p[i - 1] += sum(counts[i:])
        merge = max(i // levels, 1)
        q = [0.0] * i
        for j in range(levels):
            lo = min(j * merge, i)
            hi = i if j == levels - 1 else min((j + 1) * merge, i)
            mass = sum(counts[lo:hi])
            nonzero = [b for b in range(lo, hi) if p[b] != 0]
            for b in nonzero:
                q[b] = mass / len(nonzero)
        divergences[i] = _kl(p, q)
    best = min(divergences.values())
    last = max(i for i, d in divergences.items() if d == best)
    return last * width, divergences


def ref_percentile(counts, width, percentile):
    total = sum(int(c) for c in counts)
    running = 0
    for b, c in enumerate(counts):
        running += int(c)
        if running * 100 >= percentile * total:
            return (b + 1) * width
    raise AssertionError("unreachable")


def ref_mse(counts, width, num_bits=8, unsigned=False, start_bin=128, stride=1):
    qmax = 2 ** num_bits - 1 if unsigned else 2 ** (num_bits - 1) - 1
    errors = {}
    for i in _candidates(len(counts), start_bin, stride):
        amax = i * width
        step = amax / qmax
        err = 0.0
        for b, c in enumerate(counts):
            if c == 0:
                continue
            x = (b + 0.5) * width
            level = min(round(x / step), qmax)  # Python's round is half to even
            err += int(c) * (x - level * step) ** 2
        errors[i] = err
    best = min(errors.values())
    first = min(i for i, e in errors.items() if e == best)
    return first * width, errors


# ------------------------------------------------------------------ histograms

N_SMALL = 512


def _hist(samples: np.ndarray, n: int = N_SMALL, top: float | None = None):
    a = np.abs(samples)
    top = float(a.max()) * 1.0001 if top is None else top
    counts, _ = np.histogram(a, bins=n, range=(0.0, top))
    return torch.from_numpy(counts.astype(np.int64)), top / n


def _histograms():
    g = np.random.default_rng(7)
    sparse = np.zeros(N_SMALL, dtype=np.int64)
    sparse[[3, 40, 41, 200, 511]] = [1000, 7, 3, 2, 1]
    spike = np.zeros(N_SMALL, dtype=np.int64)
    spike[300] = 12345
    return {
        "gaussian": _hist(g.normal(size=200_000)),
        "laplace": _hist(g.laplace(size=200_000)),
        "uniform": _hist(g.uniform(-1, 1, size=50_000)),
        "bimodal": _hist(np.concatenate([g.normal(0, 0.1, 100_000), g.normal(3, 0.2, 3_000)])),
        "heavy_tailed": _hist(g.standard_t(2, size=100_000)),
        "relu": _hist(np.maximum(g.normal(size=100_000), 0)),
        "low_half": _hist(g.normal(size=50_000), top=2 * 5.0),
        "sparse": (torch.from_numpy(sparse), 0.01),
        "spike": (torch.from_numpy(spike), 0.5),
    }


HISTOGRAMS = _histograms()


def _close_choice(fast: float, ref: float, width: float, objective: dict, tol: float) -> bool:
    """Same amax within one bin, or an amax whose reference objective ties the optimum."""
    if abs(fast - ref) <= width * (1 + 1e-6):
        return True
    i = round(fast / width)
    best = min(objective.values())
    return i in objective and objective[i] <= best + tol


# ------------------------------------------------------------------ entropy


@pytest.mark.parametrize("name", sorted(HISTOGRAMS))
def test_entropy_matches_reference(name):
    counts, width = HISTOGRAMS[name]
    ref, kl = ref_entropy(counts.tolist(), width, num_bits=6)
    fast = float(entropy_amax(counts, width, num_bits=6))
    assert _close_choice(fast, ref, width, kl, 10 * KL_TIE_TOL), (fast, ref)


def test_entropy_divergences_match_reference_values():
    counts, width = HISTOGRAMS["bimodal"]
    _, kl = ref_entropy(counts.tolist(), width, num_bits=5, start_bin=20, stride=7,
                        level_zero=False)
    cand, fast = entropy_divergences(counts, num_bits=5, start_bin=20, stride=7)
    assert cand.tolist() == sorted(kl)
    np.testing.assert_allclose(fast.numpy(), [kl[i] for i in cand.tolist()], rtol=1e-9,
                               atol=1e-12)


def test_entropy_full_size_int8_gaussian():
    """The real configuration: 2048 bins, 128 levels, candidates 128..2048."""
    g = np.random.default_rng(1)
    counts, width = _hist(g.normal(size=300_000), n=2048)
    ref, kl = ref_entropy(counts.tolist(), width, start_bin=1024, stride=3)
    fast = float(entropy_amax(counts, width, start_bin=1024, stride=3))
    assert _close_choice(fast, ref, width, kl, 10 * KL_TIE_TOL), (fast, ref)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    counts=st.lists(st.integers(0, 50), min_size=40, max_size=160),
    num_bits=st.sampled_from([3, 4, 5]),
    unsigned=st.booleans(),
    start_bin=st.integers(1, 40),
    stride=st.integers(1, 4),
)
def test_entropy_matches_reference_on_random_histograms(counts, num_bits, unsigned,
                                                        start_bin, stride):
    if sum(counts) == 0:
        counts[-1] = 1
    t = torch.tensor(counts, dtype=torch.int64)
    ref, kl = ref_entropy(counts, 1.0, num_bits, unsigned, start_bin, stride)
    fast = float(entropy_amax(t, 1.0, num_bits=num_bits, unsigned=unsigned,
                              start_bin=start_bin, stride=stride))
    assert _close_choice(fast, ref, 1.0, kl, 10 * KL_TIE_TOL), (fast, ref)


def test_entropy_is_not_pulled_down_by_relu_zeros():
    """A heavy-tailed ReLU output, half of it exact zeros: with bin 0 counted as is, every
    candidate of 256 bins or more pays for the spike and the search clips the tail below
    256 bins; levelled, it lands near the tail's 99.99th percentile."""
    g = np.random.default_rng(3)
    x = np.maximum(g.standard_t(3, size=400_000), 0.0)
    counts, width = _hist(x, n=2048)
    assert counts[0] > 0.45 * counts.sum()
    cand, kl = entropy_divergences(counts)      # the spike kept
    spiked = float(cand[int(torch.argmin(kl))]) * width
    assert spiked < 256 * width
    amax = float(entropy_amax(counts, width))
    assert np.percentile(x, 99.9) < amax < float(x.max()), amax
    assert amax > 2 * spiked
    assert torch.equal(level_zero_bin(counts)[1:], counts[1:])
    assert int(level_zero_bin(counts)[0]) == int(counts[1])
    only_zeros = torch.zeros(8, dtype=torch.int64)
    only_zeros[0] = 5
    assert torch.equal(level_zero_bin(only_zeros), only_zeros)


def test_entropy_clips_outliers_of_a_gaussian():
    counts, width = _hist(np.random.default_rng(2).normal(size=1_000_000), n=2048)
    amax = float(entropy_amax(counts, width))
    top = width * counts.numel()
    assert 0.3 * top < amax < 0.95 * top, (amax, top)  # clips the tail, keeps the body


# ------------------------------------------------------------------ percentile


@pytest.mark.parametrize("name", sorted(HISTOGRAMS))
@pytest.mark.parametrize("pct", [50.0, 99.0, 99.9, 99.99, 99.999, 100.0])
def test_percentile_matches_reference(name, pct):
    counts, width = HISTOGRAMS[name]
    ref = ref_percentile(counts.tolist(), width, pct)
    fast = float(percentile_amax(counts, width, pct))
    assert fast == pytest.approx(ref, rel=1e-6)


def test_percentile_honours_its_argument():
    counts, width = HISTOGRAMS["heavy_tailed"]
    values = [float(percentile_amax(counts, width, p)) for p in (99.0, 99.9, 99.99, 99.999)]
    assert values == sorted(values) and len(set(values)) == 4


def test_percentile_of_gaussian_is_near_the_normal_quantile():
    counts, width = HISTOGRAMS["gaussian"]
    amax = float(percentile_amax(counts, width, 99.0))  # two-sided 99 % of |N(0,1)|: 2.576
    assert abs(amax - 2.576) < 0.05


@pytest.mark.parametrize("bad", [0, -1, 100.5, float("nan"), "99"])
def test_percentile_rejects_bad_values(bad):
    counts, width = HISTOGRAMS["uniform"]
    with pytest.raises(CalibrationError, match="percentile"):
        percentile_amax(counts, width, bad)


# ------------------------------------------------------------------ mse


@pytest.mark.parametrize("name", sorted(HISTOGRAMS))
def test_mse_matches_reference(name):
    counts, width = HISTOGRAMS[name]
    ref, err = ref_mse(counts.tolist(), width, num_bits=6, start_bin=64, stride=2)
    fast = float(mse_amax(counts, width, num_bits=6, start_bin=64, stride=2))
    best = min(err.values())
    assert _close_choice(fast, ref, width, err, 1e-9 * best + 1e-12), (fast, ref)


def test_mse_errors_match_reference_values():
    counts, width = HISTOGRAMS["laplace"]
    _, err = ref_mse(counts.tolist(), width, num_bits=8, unsigned=True, start_bin=100,
                     stride=37)
    cand, fast = mse_errors(counts, num_bits=8, unsigned=True, start_bin=100, stride=37)
    assert cand.tolist() == sorted(err)
    np.testing.assert_allclose(fast.numpy() * width**2, [err[i] for i in cand.tolist()],
                               rtol=1e-9)


@settings(max_examples=20, deadline=None)
@given(
    counts=st.lists(st.integers(0, 1000), min_size=20, max_size=120),
    num_bits=st.sampled_from([2, 3, 4]),
    start_bin=st.integers(1, 30),
)
def test_mse_matches_reference_on_random_histograms(counts, num_bits, start_bin):
    if sum(counts) == 0:
        counts[0] = 1
    ref, err = ref_mse(counts, 0.25, num_bits, False, start_bin, 1)
    fast = float(mse_amax(torch.tensor(counts), 0.25, num_bits=num_bits, start_bin=start_bin))
    assert _close_choice(fast, ref, 0.25, err, 1e-9 * min(err.values()) + 1e-12), (fast, ref)


def test_mse_of_uniform_keeps_nearly_the_whole_range():
    counts, width = HISTOGRAMS["uniform"]
    amax = float(mse_amax(counts, width))
    assert amax > 0.95 * width * counts.numel()


# ------------------------------------------------------------------ common


def test_searches_are_registered_by_name():
    counts, width = HISTOGRAMS["laplace"]
    assert set(AMAX_SEARCHES) == {"entropy", "percentile", "mse"}
    assert float(AMAX_SEARCHES["percentile"](counts, width, percentile=99.9)) == float(
        percentile_amax(counts, width, 99.9))
    assert float(AMAX_SEARCHES["entropy"](counts, width, num_bits=8)) == float(
        entropy_amax(counts, width))


@pytest.mark.parametrize("fn", [entropy_amax, mse_amax])
def test_results_are_edges_and_float32(fn):
    counts, width = HISTOGRAMS["gaussian"]
    amax = fn(counts, width)
    assert amax.dtype == torch.float32 and amax.dim() == 0
    i = float(amax) / width
    assert abs(i - round(i)) < 1e-4


@pytest.mark.parametrize("fn", [entropy_amax, mse_amax,
                                lambda c, w: percentile_amax(c, w, 99.0)])
def test_empty_and_malformed_histograms_raise(fn):
    with pytest.raises(CalibrationError, match="empty"):
        fn(torch.zeros(256, dtype=torch.int64), 1.0)
    with pytest.raises(CalibrationError, match="integers"):
        fn(torch.ones(256), 1.0)
    with pytest.raises(CalibrationError, match="1-D"):
        fn(torch.ones(2, 256, dtype=torch.int64), 1.0)


@needs_cuda
@pytest.mark.parametrize("name", ["gaussian", "bimodal", "sparse"])
def test_cuda_matches_cpu(name):
    counts, width = HISTOGRAMS[name]
    for fn in (entropy_amax, mse_amax, lambda c, w: percentile_amax(c, w, 99.9)):
        cpu = fn(counts, width)
        gpu = fn(counts.cuda(), width)
        assert gpu.device.type == "cuda"
        assert float(gpu) == pytest.approx(float(cpu), abs=width)


def test_cpu_searches_restore_the_thread_count():
    counts, width = HISTOGRAMS["laplace"]
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        entropy_amax(counts, width)
        mse_amax(counts, width)
        assert torch.get_num_threads() == 2
        with pytest.raises(CalibrationError):
            percentile_amax(counts, width, 101)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
