"""amax searches over a histogram of ``|x|``: entropy (KL), percentile and mse.

Every function takes the histogram as ``counts`` (1-D integer tensor, ``N`` bins) and
``bin_width``: bin ``b`` covers ``[b * w, (b + 1) * w)``, so the edges are ``arange(N + 1) * w``.
A candidate amax is an edge ``i * w`` ("keep the first ``i`` bins"). The searches are
vectorised over all candidates at once (prefix sums, or a ``[candidates x bins]`` block
built in a few chunks of candidates to bound memory), never a Python loop over bins or
candidates, and run on the histogram's device; the result is a 0-dim float32 tensor there.
On a CPU they run on one thread (see ``_one_cpu_thread``).

======================  ==========================================================
function                amax
======================  ==========================================================
``entropy_amax``        minimises KL(P || Q), TensorRT's calibration (last argmin),
                        with bin 0 levelled to bin 1 as in pytorch-quantization
``percentile_amax``     smallest edge with at least ``percentile`` % of the mass below
``mse_amax``            minimises the squared fake-quant error of the histogram's mass
======================  ==========================================================

Example::

    >>> counts = torch.histc(torch.randn(10_000).abs(), 2048, 0, 8).long()
    >>> percentile_amax(counts, 8 / 2048, percentile=99.0)   # about 2.58
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

from qdq.calib.base import CalibrationError

__all__ = [
    "entropy_amax",
    "percentile_amax",
    "mse_amax",
    "entropy_divergences",
    "level_zero_bin",
    "mse_errors",
    "num_levels",
    "candidate_bins",
    "AMAX_SEARCHES",
    "KL_TIE_TOL",
]

#: KL values closer than this to the minimum count as ties (the largest amax wins). The
#: prefix-sum evaluation is exact up to float64 rounding (about 1e-14 here); without the
#: tolerance, rounding noise would pick among exactly tied candidates at random.
KL_TIE_TOL = 1e-10


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run on one CPU thread. The searches work on tensors of about 10^5 elements, where
    starting a parallel region costs more than it saves; on a busy machine, where the
    second thread waits for a core, 2 threads were measured 10-100x slower than one."""
    old = torch.get_num_threads()
    if device.type != "cpu" or old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _single_threaded(fn):
    @functools.wraps(fn)
    def wrapper(counts, *args, **kwargs):
        with _one_cpu_thread(counts.device):
            return fn(counts, *args, **kwargs)
    return wrapper


def num_levels(num_bits: int, unsigned: bool) -> int:
    """Quantization levels covering ``[0, amax]``: 2^(b-1) signed (128 for int8, the
    TensorRT convention for a histogram of ``|x|``), 2^b unsigned (256)."""
    return 1 << (num_bits - 1 + int(unsigned))


def candidate_bins(num_bins: int, start_bin: int, stride: int, device=None) -> torch.Tensor:
    """Candidate bin counts ``i`` (amax = ``i * w``): ``start_bin, start_bin + stride, ...``
    up to ``num_bins`` inclusive (keeping every bin is always a candidate)."""
    if start_bin < 1 or stride < 1:
        raise CalibrationError(
            f"start_bin and stride must be >= 1, got start_bin={start_bin}, stride={stride}"
        )
    start = min(start_bin, num_bins)
    cands = list(range(start, num_bins + 1, stride))
    if cands[-1] != num_bins:
        cands.append(num_bins)
    return torch.tensor(cands, dtype=torch.int64, device=device)


def _check_counts(counts: torch.Tensor) -> torch.Tensor:
    if counts.dim() != 1 or counts.numel() == 0:
        raise CalibrationError(f"counts must be a non-empty 1-D tensor, got {tuple(counts.shape)}")
    if counts.is_floating_point() or counts.is_complex():
        raise CalibrationError(f"counts must be integers, got {counts.dtype}")
    counts = counts.long()
    if counts.device.type == "cpu" and bool((counts < 0).any()):
        raise CalibrationError("counts must not be negative")
    return counts


def _amax_at(i: torch.Tensor, bin_width, device) -> torch.Tensor:
    width = torch.as_tensor(bin_width, dtype=torch.float64, device=device)
    return (i.to(torch.float64) * width).to(torch.float32).reshape(())


def _last_argmin(values: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
    """Index of the last entry within ``tol`` of the minimum (no host sync)."""
    best = values.min()
    hits = values <= best + tol
    pos = torch.arange(values.numel(), device=values.device)
    return torch.where(hits, pos, -1).max()


@_single_threaded
def entropy_divergences(
    counts: torch.Tensor, num_bits: int = 8, unsigned: bool = False,
    start_bin: int = 128, stride: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(P || Q) for every candidate: ``(candidates, divergences)``.

    For candidate ``i``: P is the first ``i`` bins with the mass of all later bins added
    to bin ``i - 1``. Q merges the first ``i`` bins (without that extra mass) into ``L``
    levels of ``m = max(i // L, 1)`` bins (the last level also takes the ``i mod L``
    remainder), then spreads each level's count evenly over the bins of that level where
    P is non-zero. Both are normalised. ``inf`` where P has mass and Q none.

    With T the total count, S_i the count of the first ``i`` bins, and per level j its
    mass P_j in P, Q_j in Q and nz_j bins where P is non-zero:

        KL_i = (sum_b P_b log P_b - sum_j P_j log(Q_j / nz_j)) / T - log T + log S_i

    P and Q differ only in the level holding bin ``i - 1`` (the "tail" level); all levels
    before it (the "head") depend on ``m`` alone, and there are only ``N // L`` values of
    ``m``. So the head sums are one ``[m values x levels]`` block, everything else is a
    prefix sum: the cost is O(candidates + bins), not O(candidates x bins).
    """
    counts = _check_counts(counts)
    dev = counts.device
    n = counts.numel()
    levels = num_levels(num_bits, unsigned)
    cand = candidate_bins(n, start_bin, stride, dev)

    c = counts.to(torch.float64)
    zero = c.new_zeros(1)
    prefix = torch.cat([zero, torch.cumsum(c, 0)])            # S[k] = sum of bins < k
    prefix_nz = torch.cat([zero, torch.cumsum((counts > 0).to(torch.float64), 0)])
    prefix_xlogx = torch.cat([zero, torch.cumsum(torch.special.xlogy(c, c), 0)])
    total = prefix[-1]

    # Head of merge width m: levels [k m, (k + 1) m) for k < L - 1 (no outliers, P = Q).
    widths = torch.arange(1, max(n // levels, 1) + 1, device=dev)
    bounds = widths[:, None] * torch.arange(levels, device=dev)[None, :]
    q_head = prefix[bounds].diff(dim=1)
    nz_head = prefix_nz[bounds].diff(dim=1)
    head_by_width = torch.special.xlogy(q_head, q_head / nz_head.clamp(min=1)).sum(1)

    m = torch.clamp(cand // levels, min=1)
    # Fewer bins than levels: every bin is its own level and the tail is bin i - 1.
    short = cand < levels
    head_end = torch.where(short, cand - 1, (levels - 1) * m)
    head = torch.where(short, prefix_xlogx[head_end], head_by_width[m - 1])

    # Tail level [head_end, i): P adds the outliers (bins >= i) into bin i - 1.
    outliers = total - prefix[cand]
    last_bin = c[cand - 1]
    q_tail = prefix[cand] - prefix[head_end]
    p_tail = q_tail + outliers
    nz_tail = (prefix_nz[cand] - prefix_nz[head_end]
               + ((last_bin == 0) & (outliers > 0)).to(torch.float64))
    tail = torch.special.xlogy(p_tail, q_tail / nz_tail.clamp(min=1))

    sum_plogp = prefix_xlogx[cand - 1] + torch.special.xlogy(last_bin + outliers,
                                                             last_bin + outliers)
    kl = (sum_plogp - head - tail) / total - torch.log(total) + torch.log(prefix[cand])
    starved = (p_tail > 0) & (q_tail == 0)
    return cand, torch.where(starved, torch.inf, kl)


def level_zero_bin(counts: torch.Tensor) -> torch.Tensor:
    """``counts`` with bin 0 set to bin 1's count, as pytorch-quantization's entropy
    calibration does before its search (unchanged if that would leave no mass).

    After a ReLU, bin 0 holds the exact zeros, often half the tensor. They quantize
    exactly at any amax, but counted they decide the search: every candidate of 256 bins
    or more merges bin 0 with bin 1 into one level and pays for the spike, so the search
    stops below 256 bins and clips the tail (8.7 points of top-1 on the reference model,
    BENCHMARKS.md "Entropy and ReLU zeros")."""
    if counts.numel() < 2:
        return counts
    leveled = torch.cat([counts[1:2], counts[1:]])
    return torch.where(leveled.sum() > 0, leveled, counts)   # no host sync


@_single_threaded
def entropy_amax(
    counts: torch.Tensor, bin_width, *, num_bits: int = 8, unsigned: bool = False,
    start_bin: int = 128, stride: int = 1,
) -> torch.Tensor:
    """TensorRT's entropy calibration: the edge ``i * w`` of the candidate with the
    smallest KL(P || Q), the largest such candidate on ties (see ``entropy_divergences``),
    searched on the histogram with its zero bin levelled (:func:`level_zero_bin`)."""
    counts = _check_counts(counts)
    _require_mass(counts)
    counts = level_zero_bin(counts)
    cand, kl = entropy_divergences(counts, num_bits, unsigned, start_bin, stride)
    return _amax_at(cand[_last_argmin(kl, KL_TIE_TOL)], bin_width, counts.device)


@_single_threaded
def percentile_amax(counts: torch.Tensor, bin_width, percentile: float = 99.99) -> torch.Tensor:
    """Smallest edge ``i * w`` with at least ``percentile`` % of the counts in bins below it."""
    counts = _check_counts(counts)
    if not (isinstance(percentile, (int, float)) and 0 < percentile <= 100):
        raise CalibrationError(f"percentile must be in (0, 100], got {percentile!r}")
    _require_mass(counts)
    cum = torch.cumsum(counts, 0)
    # 100 * count against percentile * total, in float64: the left side is exact below
    # 2^53 / 100 counts, the right side rounds once (so 99.9 % of 200000 is 199800).
    cum100 = cum.to(torch.float64) * 100.0
    need = (cum100[-1] / 100.0 * percentile).reshape(1)
    i = torch.searchsorted(cum100, need).reshape(()) + 1
    return _amax_at(torch.clamp(i, max=counts.numel()), bin_width, counts.device)


@_single_threaded
def mse_errors(
    counts: torch.Tensor, num_bits: int = 8, unsigned: bool = False,
    start_bin: int = 128, stride: int = 1, chunk: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared fake-quant error of the histogram, in units of ``bin_width**2``, for every
    candidate: ``(candidates, errors)``.

    Each bin's mass sits at its centre ``x_b = (b + 1/2) w``. With amax ``i w`` and step
    ``s = i w / qmax`` (qmax 127 signed, 255 unsigned), a centre below amax rounds to the
    grid (half to even) and one above clips to amax:
    ``err_i = sum_b c_b (x_b - s * min(round(x_b / s), qmax))^2``.
    Per chunk of candidates, one ``[candidates x bins]`` block of squared errors times
    the counts (a matrix product) over the non-empty bins below the chunk's largest amax;
    bins above it only clip, which suffix sums of ``c``, ``c x`` and ``c x^2`` give in
    closed form.
    """
    counts = _check_counts(counts)
    dev = counts.device
    n = counts.numel()
    qmax = (1 << (num_bits - int(not unsigned))) - 1
    cand = candidate_bins(n, start_bin, stride, dev)

    c = counts.to(torch.float64)
    centre = torch.arange(n, device=dev, dtype=torch.float64) + 0.5   # x / w
    zero = c.new_zeros(1)
    # Suffix sums over bins >= k of c, c x, c x^2: the clipping error of bins past a chunk.
    tail0, tail1, tail2 = (torch.cat([torch.cumsum(v.flip(0), 0).flip(0), zero])
                           for v in (c, c * centre, c * centre * centre))
    # Empty bins add nothing: the block only spans bins with counts (one host sync).
    kept = torch.nonzero(counts).reshape(-1)
    kept_cpu = kept.cpu()
    c_kept, x_kept = c[kept], centre[kept]
    a = cand.to(torch.float64)                                         # amax / w
    cand_cpu = cand.cpu()
    err = torch.empty_like(a)
    for lo in range(0, cand.numel(), chunk):  # chunks bound memory; each is vectorised
        hi = min(lo + chunk, cand.numel())
        top = int(cand_cpu[hi - 1])                      # bins >= top only clip
        k = int(torch.searchsorted(kept_cpu, top))       # kept bins below top
        ai = a[lo:hi, None]
        r = x_kept[None, :k] * (qmax / ai)        # x / s, in grid steps
        q = torch.round(r).clamp_(max=qmax)       # centres above amax clip to qmax
        r.sub_(q).square_()
        ai = ai[:, 0]
        clip = tail2[top] - 2 * ai * tail1[top] + ai * ai * tail0[top]
        err[lo:hi] = (r @ c_kept[:k]) * (ai / qmax) ** 2 + clip
    return cand, err


@_single_threaded
def mse_amax(
    counts: torch.Tensor, bin_width, *, num_bits: int = 8, unsigned: bool = False,
    start_bin: int = 128, stride: int = 1,
) -> torch.Tensor:
    """The candidate edge ``i * w`` with the smallest expected squared quantization error
    (the smallest such edge on ties; see ``mse_errors``)."""
    counts = _check_counts(counts)
    _require_mass(counts)
    cand, err = mse_errors(counts, num_bits, unsigned, start_bin, stride)
    return _amax_at(cand[torch.argmin(err)], bin_width, counts.device)


def _require_mass(counts: torch.Tensor) -> None:
    if int(counts.sum()) == 0:
        raise CalibrationError("the histogram is empty (all counts are 0)")


def _entropy(counts, bin_width, *, num_bits=8, unsigned=False, start_bin=128, stride=1,
             **_ignored):
    return entropy_amax(counts, bin_width, num_bits=num_bits, unsigned=unsigned,
                        start_bin=start_bin, stride=stride)


def _percentile(counts, bin_width, *, percentile=99.99, **_ignored):
    return percentile_amax(counts, bin_width, percentile=percentile)


def _mse(counts, bin_width, *, num_bits=8, unsigned=False, start_bin=128, stride=1, **_ignored):
    return mse_amax(counts, bin_width, num_bits=num_bits, unsigned=unsigned,
                    start_bin=start_bin, stride=stride)


#: Search by name: ``fn(counts, bin_width, num_bits=, unsigned=, percentile=, start_bin=,
#: stride=)``; each uses the keywords it needs.
AMAX_SEARCHES: dict[str, Callable[..., torch.Tensor]] = {
    "entropy": _entropy,
    "percentile": _percentile,
    "mse": _mse,
}
