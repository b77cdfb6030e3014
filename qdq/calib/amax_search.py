"""amax searches over a histogram of ``|x|``: entropy (KL), percentile and mse.

Every function takes the histogram as ``counts`` (1-D integer tensor, ``N`` bins) and
``bin_width``: bin ``b`` covers ``[b * w, (b + 1) * w)``, so the edges are ``arange(N + 1) * w``.
A candidate amax is an edge ``i * w`` ("keep the first ``i`` bins"). The searches are
vectorised over all candidates at once (prefix sums, or one ``[candidates x bins]`` block),
never a Python loop over bins or candidates, and run on the histogram's device; the result
is a 0-dim float32 tensor there.

======================  ==========================================================
function                amax
======================  ==========================================================
``entropy_amax``        minimises KL(P || Q), TensorRT's calibration (last argmin)
``percentile_amax``     smallest edge with at least ``percentile`` % of the mass below
``mse_amax``            minimises the squared fake-quant error of the histogram's mass
======================  ==========================================================

Example::

    >>> counts = torch.histc(torch.randn(10_000).abs(), 2048, 0, 8).long()
    >>> percentile_amax(counts, 8 / 2048, percentile=99.0)   # about 2.58
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qdq.calib.base import CalibrationError

__all__ = [
    "entropy_amax",
    "percentile_amax",
    "mse_amax",
    "entropy_divergences",
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
    cands = torch.arange(start, num_bins + 1, stride, device=device)
    if int(cands[-1]) != num_bins:
        cands = torch.cat([cands, cands.new_tensor([num_bins])])
    return cands


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

    Sums over bins become differences of prefix sums, so the cost is
    ``[candidates x levels]`` instead of ``[candidates x bins]``:

        KL_i = (sum_b P_b log P_b - sum_j P_j log(Q_j / nz_j)) / T - log T + log S_i

    with T the total count, S_i the count of the first ``i`` bins, and per level j:
    P_j its mass in P, Q_j its mass in Q, nz_j the number of bins where P is non-zero.
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

    # Level j of candidate i spans bins [bounds[i, j], bounds[i, j + 1]).
    m = torch.clamp(cand // levels, min=1)[:, None]
    k = torch.arange(levels + 1, device=dev)[None, :]
    bounds = torch.minimum(k * m, cand[:, None])
    bounds[:, -1] = cand
    q_mass = prefix[bounds].diff(dim=1)
    nz = prefix_nz[bounds].diff(dim=1)

    # P moves the outliers (bins >= i) into bin i - 1, which lies in level min(i-1, L-1).
    outliers = total - prefix[cand]
    last_bin = c[cand - 1]
    last_level = torch.clamp(cand - 1, max=levels - 1)[:, None]
    p_mass = q_mass.scatter_add(1, last_level, outliers[:, None])
    newly_nz = ((last_bin == 0) & (outliers > 0)).to(torch.float64)[:, None]
    nz = nz.scatter_add(1, last_level, newly_nz)

    sum_plogp = prefix_xlogx[cand - 1] + torch.special.xlogy(last_bin + outliers,
                                                             last_bin + outliers)
    # xlogy gives 0 where P has no mass and -inf where P has mass but Q none (KL = inf).
    cross = torch.special.xlogy(p_mass, q_mass / nz.clamp(min=1)).sum(1)
    kl = (sum_plogp - cross) / total - torch.log(total) + torch.log(prefix[cand])
    return cand, kl


def entropy_amax(
    counts: torch.Tensor, bin_width, *, num_bits: int = 8, unsigned: bool = False,
    start_bin: int = 128, stride: int = 1,
) -> torch.Tensor:
    """TensorRT's entropy calibration: the edge ``i * w`` of the candidate with the
    smallest KL(P || Q), the largest such candidate on ties (see ``entropy_divergences``)."""
    counts = _check_counts(counts)
    _require_mass(counts)
    cand, kl = entropy_divergences(counts, num_bits, unsigned, start_bin, stride)
    return _amax_at(cand[_last_argmin(kl, KL_TIE_TOL)], bin_width, counts.device)


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


def mse_errors(
    counts: torch.Tensor, num_bits: int = 8, unsigned: bool = False,
    start_bin: int = 128, stride: int = 1, chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared fake-quant error of the histogram, in units of ``bin_width**2``, for every
    candidate: ``(candidates, errors)``.

    Each bin's mass sits at its centre ``x_b = (b + 1/2) w``. With amax ``i w`` and step
    ``s = i w / qmax`` (qmax 127 signed, 255 unsigned), a centre below amax rounds to the
    grid (half to even) and one above clips to amax:
    ``err_i = sum_b c_b (x_b - s * min(round(x_b / s), qmax))^2``.
    One ``[candidates x bins]`` block of squared errors (built in chunks of candidates)
    times the counts, as a matrix product.
    """
    counts = _check_counts(counts)
    dev = counts.device
    n = counts.numel()
    qmax = (1 << (num_bits - int(not unsigned))) - 1
    cand = candidate_bins(n, start_bin, stride, dev)

    c = counts.to(torch.float64)
    centre = torch.arange(n, device=dev, dtype=torch.float64) + 0.5   # x / w
    a = cand.to(torch.float64)                                         # amax / w
    err = torch.empty_like(a)
    for lo in range(0, cand.numel(), chunk):  # chunks bound memory; each is vectorised
        ai = a[lo:lo + chunk, None]
        r = centre[None, :] * (qmax / ai)         # x / s, in grid steps
        q = torch.round(r).clamp_(max=qmax)       # centres above amax clip to qmax
        r.sub_(q).square_()
        err[lo:lo + chunk] = (r @ c) * (ai[:, 0] / qmax) ** 2
    return cand, err


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
