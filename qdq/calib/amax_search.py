"""amax searches over histograms of ``|x|``: entropy (KL), percentile and mse, with
pytorch-quantization's semantics, batched over many histograms at once.

A histogram is a 1-D integer tensor of ``n`` bins of width ``w``: bin ``b`` covers
``[b w, (b + 1) w)``. Every search takes a list of histograms (lengths may differ; they are
zero-padded into one ``[Q, N]`` block) and returns one chosen index per histogram;
:func:`search_amax` turns it into amax. Nothing loops over candidates or bins in Python:
each search is a few tensor operations over ``[histograms x candidates x levels]``, in
blocks that bound memory. On a CPU every op stays below torch's parallel grain and groups
of histograms run on ``torch.get_num_threads()`` Python threads; nothing changes torch's
thread settings.

===========  ==========================================  ================  ==============
method       candidates                                  amax              chosen
===========  ==========================================  ================  ==============
entropy      edges ``i = start_bin, +stride, ... <= n``   ``i * w``         last min of KL
mse          centres ``i = start_bin, +stride, ... < n``  ``(i + 1/2) w``   first min
percentile   every bin                                   ``b * w`` (left)  first reaching p
===========  ==========================================  ================  ==============

Exact semantics (pytorch-quantization 2.x, ``calib/histogram.py``):

- **entropy**: bin 0 takes bin 1's count first. For candidate ``i``, P is the first ``i``
  bins with the count of all later bins added to bin ``i - 1``; Q spreads the first ``i``
  bins over ``L`` levels (128 signed, 256 unsigned for 8 bits), bin ``b`` going to level
  ``floor(b L / i)``, and gives each bin that is non-empty *in the histogram* (not in P)
  its level's count divided by the number of such bins. KL(P || Q) of the normalised
  distributions; the largest candidate among the minima wins. A candidate whose last bin
  is empty while later bins are not has infinite KL (P has mass where Q has none).
- **percentile**: the left edge of the first bin where the running sum of
  ``count / total`` (float64, left to right) reaches ``percentile / 100``.
- **mse**: candidates are bin centres; the error of a candidate is the sum over all bin
  centres ``x`` of ``count * (fake_quant(x, amax) - x)^2`` (round half to even, centres
  above amax clip to it); the smallest candidate among the minima wins.

Level boundaries make entropy cheap: level ``k`` of candidate ``i`` holds bins
``[ceil(k i / L), ceil((k + 1) i / L))``, so every level's count and number of non-empty
bins are differences of prefix sums: O(candidates x levels), not O(candidates x bins).
mse uses the same idea: the centres that round to grid step ``j`` form a run of bins whose
bounds are integers computed from ``i`` and ``j``, and summation by parts leaves two prefix
sums gathered at ``qmax`` bounds per candidate.

Two deliberate differences, both where pytorch-quantization fails: a candidate that keeps no
count at all (its NaN KL would be picked) is never chosen, and a request with no candidate
(``start_bin`` past the histogram) raises a clear error instead of an index error. Ties
are judged up to float64 rounding (``KL_TIE_TOL``, ``MSE_TIE_RTOL``), as exact arithmetic
would judge them.

Example::

    >>> counts = torch.histc(torch.randn(10_000).abs(), 2048, 0, 4).long()
    >>> search_amax("percentile", [counts], [4 / 2048], percentile=99.0)   # about 2.57
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from qdq.calib.base import CalibrationError, UnknownMethodError

__all__ = [
    "search_amax",
    "entropy_bins",
    "mse_bins",
    "percentile_bins",
    "entropy_divergences",
    "mse_errors",
    "level_zero_bin",
    "num_levels",
    "stack_histograms",
    "SEARCHES",
    "KL_TIE_TOL",
    "MSE_TIE_RTOL",
]

#: KL values within this of the minimum are ties (the largest candidate wins). The prefix
#: sums evaluate KL to about 1e-15; exact ties (common on sparse histograms) must not be
#: decided by that rounding noise.
KL_TIE_TOL = 1e-12
#: mse errors within this fraction of the size of their terms are ties (the smallest
#: candidate wins); the closed form cancels terms about 10^5 times larger than the error.
MSE_TIE_RTOL = 1e-13
#: Elements per tensor op: on a CPU just below torch's parallel grain (32768), so that no
#: op starts a parallel region (each such region stalls when another process holds a core:
#: measured 10-100 times slower on a busy 2-core machine); on a GPU large.
_CPU_BLOCK = 30_000
_DEVICE_BLOCK = 1 << 22


def num_levels(num_bits: int, unsigned: bool) -> int:
    """Levels of the entropy search: 2^(b-1) signed (128 for int8), 2^b unsigned."""
    return 1 << (num_bits - 1 + int(unsigned))


def _qmax(num_bits: int, unsigned: bool) -> int:
    return num_levels(num_bits, unsigned) - 1


# ------------------------------------------------------------------------- inputs


def _check_options(start_bin: int, stride: int) -> None:
    for name, value in (("start_bin", start_bin), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CalibrationError(f"{name} must be an int >= 1, got {value!r}")


def _label(names: Sequence[str] | None, q: int) -> str:
    return names[q] if names is not None else f"histogram {q}"


def _check_histograms(counts: Sequence[torch.Tensor], names: Sequence[str] | None
                      ) -> list[int]:
    """The lengths of the histograms, after checking each: a non-empty 1-D integer tensor
    with counts, none negative (errors name the histogram)."""
    if len(counts) == 0:
        raise CalibrationError("no histogram to search")
    lengths = []
    for q, c in enumerate(counts):
        label = _label(names, q)
        if c.dim() != 1 or c.numel() == 0:
            raise CalibrationError(f"{label}: counts must be a non-empty 1-D tensor, got "
                                   f"shape {tuple(c.shape)}")
        if c.is_floating_point() or c.is_complex() or c.dtype == torch.bool:
            raise CalibrationError(f"{label}: counts must be integers, got {c.dtype}")
        if bool((c < 0).any()):
            raise CalibrationError(f"{label}: counts must not be negative")
        if not bool(c.any()):
            raise CalibrationError(f"{label}: the histogram is empty (all counts are 0)")
        lengths.append(c.numel())
    return lengths


def stack_histograms(counts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Histograms as one zero-padded int64 ``[Q, N]`` block."""
    block = torch.zeros(len(counts), max(c.numel() for c in counts), dtype=torch.int64,
                        device=counts[0].device)
    for q, c in enumerate(counts):
        block[q, :c.numel()] = c
    return block


def _check_candidates(lengths: list[int], first: int, last_of: Callable[[int], int],
                      names: Sequence[str] | None, what: str) -> None:
    """Every histogram must have at least one candidate (``first <= last_of(n)``)."""
    for q, n in enumerate(lengths):
        if first > last_of(n):
            raise CalibrationError(
                f"{_label(names, q)}: start_bin={first} leaves no {what} candidate in a "
                f"histogram of {n} bins (use a start_bin of at most {max(last_of(n), 1)})")


def _candidates(lengths: list[int], first: int, last: int, stride: int, device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``first, first + stride, ...`` up to the largest ``n + last``, and ``[Q, T]`` which
    of them each histogram has (``i <= n + last``)."""
    top = max(lengths) + last
    cand = torch.arange(first, top + 1, stride, dtype=torch.int64, device=device)
    ends = torch.tensor(lengths, device=device)[:, None] + last
    return cand, cand[None, :] <= ends


def _in_groups(counts: Sequence[torch.Tensor], lengths: list[int],
               search: Callable[[torch.Tensor, list[int]], torch.Tensor]) -> torch.Tensor:
    """``search(block, lengths)`` over groups of histograms (each group stacked into a
    zero-padded int64 block), concatenated.

    On a CPU a group is small enough that every op of the search stays below the parallel
    grain (``_CPU_BLOCK``), and groups run on ``torch.get_num_threads()`` Python threads:
    an op never waits at a parallel barrier for a core another process holds, and both
    cores work when both are free. On a GPU, one group."""
    if counts[0].device.type != "cpu":
        return search(stack_histograms(counts), lengths)
    size = max(1, _CPU_BLOCK // (max(lengths) + 1))
    groups = [range(lo, min(lo + size, len(counts))) for lo in range(0, len(counts), size)]
    workers = min(torch.get_num_threads(), len(groups))

    def run(rows: range) -> torch.Tensor:
        return search(stack_histograms([counts[q] for q in rows]), [lengths[q] for q in rows])

    if workers == 1:
        return torch.cat([run(rows) for rows in groups])
    with ThreadPoolExecutor(workers) as pool:
        return torch.cat(list(pool.map(run, groups)))


def _pick(values: torch.Tensor, valid: torch.Tensor, tol: torch.Tensor | float,
          last: bool) -> torch.Tensor:
    """Per row, the last (or first) valid index within ``tol`` of the row's valid minimum;
    a row whose valid values are all +inf gets its last (first) valid index."""
    masked = torch.where(valid, values, torch.inf)
    best = masked.min(1, keepdim=True).values
    hits = valid & (masked <= best + tol)
    pos = torch.arange(values.shape[1], device=values.device).expand_as(values)
    if last:
        return torch.where(hits, pos, -1).max(1).values
    return torch.where(hits, pos, values.shape[1]).min(1).values


def _log_(x: torch.Tensor) -> torch.Tensor:
    """``x.log_()``; on a CPU through numpy, which stays on one thread: torch's log starts
    a parallel region from 2048 elements on, and each such region stalls on a busy machine
    whose other core is taken."""
    if x.device.type == "cpu":
        with np.errstate(divide="ignore"):
            np.log(x.numpy(), out=x.numpy())
        return x
    return x.log_()


def _xlogy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x * log(y)`` with ``0 * log(anything) = 0``."""
    return torch.where(x == 0, 0.0, _log_(y.clone()).mul_(x))


def _prefix(values: torch.Tensor) -> torch.Tensor:
    """``[Q, N]`` -> ``[Q, N + 1]`` with column ``k`` the sum of columns ``< k``."""
    return torch.nn.functional.pad(torch.cumsum(values, 1), (1, 0))


def _gather_blocks(tables: Sequence[torch.Tensor], bounds: torch.Tensor,
                   reduce: Callable[..., torch.Tensor], differences: bool = False
                   ) -> torch.Tensor:
    """``reduce(lo, hi, *gathered)`` for every histogram and candidate, in blocks.

    ``tables`` are ``[Q, N + 1]`` prefix sums and ``bounds`` ``[T, K]`` indices into them,
    the same for every histogram. The tables are laid side by side as the columns of one
    ``[N + 1, len(tables) * Q]`` table, so that a single ``index_select`` gathers every
    table for every histogram; ``reduce`` gets, for candidates ``lo:hi``, one ``[hi - lo,
    K, Q]`` view per table (``[hi - lo, K - 1, Q]`` of differences between neighbouring
    bounds with ``differences``) and returns ``[hi - lo, Q]``. Returns ``[Q, T]``."""
    q_count = tables[0].shape[0]
    table = torch.cat([t.t() for t in tables], dim=1)
    t_count, k = bounds.shape
    out = torch.empty(t_count, q_count, dtype=torch.float64, device=bounds.device)
    budget = _CPU_BLOCK if bounds.device.type == "cpu" else _DEVICE_BLOCK
    step = max(1, budget // (table.shape[1] * k))
    for lo in range(0, t_count, step):       # blocks bound memory; each is a few tensor ops
        hi = min(lo + step, t_count)
        rows = table.index_select(0, bounds[lo:hi].reshape(-1)).view(hi - lo, k, -1)
        if differences:
            rows = rows.diff(dim=1)
        out[lo:hi] = reduce(lo, hi, *rows.split(q_count, dim=2))
    return out.t()


# ------------------------------------------------------------------------- entropy


def level_zero_bin(counts: torch.Tensor) -> torch.Tensor:
    """Bin 0 set to bin 1's count along the last dim, as pytorch-quantization's entropy
    search does first (a row left without counts by it is kept as it was).

    After a ReLU, bin 0 holds the exact zeros, often half the tensor; counted as they are,
    every candidate pays for that spike and the search clips the tail (BENCHMARKS.md,
    "Entropy and ReLU zeros")."""
    if counts.shape[-1] < 2:
        return counts
    leveled = counts.clone()
    leveled[..., 0] = counts[..., 1]
    empty = leveled.sum(-1, keepdim=True) == 0
    return torch.where(empty, counts, leveled)


def _entropy_kl(block: torch.Tensor, lengths: list[int], levels: int, start_bin: int,
                stride: int, level_zero: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(candidates [T], KL [Q, T], valid [Q, T])``; KL is +inf where P has mass that Q
    lacks and where the candidate keeps no count."""
    dev = block.device
    counts = level_zero_bin(block) if level_zero else block
    cand, valid = _candidates(lengths, start_bin, 0, stride, dev)
    c = counts.to(torch.float64)
    mass = _prefix(c)                                    # count of bins < k
    nonzero = _prefix((counts > 0).to(torch.float64))    # non-empty bins < k
    plogp = _prefix(_xlogy(c, c))
    total = mass[:, -1:]

    # Level k of candidate i: bins [ceil(k i / L), ceil((k + 1) i / L)).
    k = torch.arange(levels + 1, device=dev)
    bounds = torch.div(k[None, :] * cand[:, None] + levels - 1, levels, rounding_mode="floor")

    def level_sum(lo: int, hi: int, m: torch.Tensor, nz: torch.Tensor) -> torch.Tensor:
        # sum_k M_k log(M_k / nz_k) with 0 log 0 = 0 (xlogy is 10x slower): a level is
        # empty exactly when it has no non-empty bin, so 0 / 0 marks the empty levels
        ratio = _log_(torch.nan_to_num_(torch.div(m, nz), nan=1.0))
        return ratio.mul_(m).sum(1)

    head = _gather_blocks((mass, nonzero), bounds, level_sum, differences=True)

    at = cand.expand(len(lengths), -1)
    kept = mass.gather(1, at)                            # S_i: count of the first i bins
    outliers = total - kept                              # added to bin i - 1 in P
    last = c.gather(1, at - 1)
    # The level holding bin i - 1 starts at ceil((L - 1) i / L) = i - floor(i / L), or at
    # i - 1 when i < L (one bin per level then).
    first = (at - torch.clamp(at // levels, min=1))
    last_mass = kept - mass.gather(1, first)
    last_nz = nonzero.gather(1, at) - nonzero.gather(1, first)
    p_log_p = plogp.gather(1, at - 1) + _xlogy(last + outliers, last + outliers)
    tail = _xlogy(outliers, last_mass / last_nz.clamp_min(1))
    kl = (p_log_p - head - tail) / total - _log_(total.clone()) + _log_(kept.clone())
    starved = (kept == 0) | ((last == 0) & (outliers > 0))
    return cand, torch.where(starved, torch.inf, kl), valid


def entropy_bins(counts: Sequence[torch.Tensor], *, num_bits: int = 8, unsigned: bool = False,
                 start_bin: int = 128, stride: int = 1, names: Sequence[str] | None = None
                 ) -> torch.Tensor:
    """The chosen edge index ``i`` (amax ``i * w``) of every histogram (int64 ``[Q]``)."""
    _check_options(start_bin, stride)
    lengths = _check_histograms(counts, names)
    _check_candidates(lengths, start_bin, lambda n: n, names, "entropy")
    levels = num_levels(num_bits, unsigned)

    def search(rows: torch.Tensor, sub: list[int]) -> torch.Tensor:
        cand, kl, valid = _entropy_kl(rows, sub, levels, start_bin, stride)
        return cand[_pick(kl, valid, KL_TIE_TOL, last=True)]

    return _in_groups(counts, lengths, search)


def entropy_divergences(counts: torch.Tensor, num_bits: int = 8, unsigned: bool = False,
                        start_bin: int = 128, stride: int = 1, level_zero: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(P || Q) of every candidate of one histogram: ``(candidates, divergences)``
    (float64, +inf where infinite). ``level_zero=False`` searches the histogram as counted,
    without giving bin 0 bin 1's count."""
    _check_options(start_bin, stride)
    lengths = _check_histograms([counts], None)
    _check_candidates(lengths, start_bin, lambda n: n, None, "entropy")
    levels = num_levels(num_bits, unsigned)
    cand, kl, _ = _entropy_kl(stack_histograms([counts]), lengths, levels, start_bin, stride,
                              level_zero)
    return cand, kl[0]


# ------------------------------------------------------------------------- mse


def _mse_units(block: torch.Tensor, lengths: list[int], qmax: int, start_bin: int,
               stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(candidates [T], error [Q, T], valid [Q, T], tolerance [Q, 1])``; the error is in
    units of ``(w / (2 qmax))^2``.

    With ``y = 2b + 1`` (centre ``y w / 2``) and ``v = 2i + 1`` (amax ``v w / 2``), the
    centre rounds to grid step ``j`` where ``qmax y / v`` is nearest to ``j``, and its error
    is ``(w / 2 qmax)^2 (qmax y - j v)^2``. Steps ``j < qmax`` take the bins below
    ``e_j = ceil(((2j + 1) v - 2 qmax) / (4 qmax))``; step ``qmax`` takes the rest, clipped
    ones included. Summing by parts over the steps::

        err = qmax^2 Y2 - 2 qmax v (qmax Y1 - sum_j C1[e_j]) + v^2 (qmax^2 Y0
              - sum_j (2j + 1) C0[e_j])

    with ``C0``, ``C1`` prefix sums of ``c`` and ``c y`` and ``Y0``, ``Y1``, ``Y2`` the
    totals of ``c``, ``c y``, ``c y^2``. A centre never falls on a rounding boundary
    (``2 qmax y`` is even, ``(2j + 1) v`` odd), so half-to-even never comes into play.
    """
    dev = block.device
    cand, valid = _candidates(lengths, start_bin, -1, stride, dev)
    c = block.to(torch.float64)
    y = torch.arange(1, 2 * block.shape[1], 2, device=dev, dtype=torch.float64)
    c0, c1 = _prefix(c), _prefix(c * y)
    y0, y1, y2 = c0[:, -1:], c1[:, -1:], (c * y * y).sum(1, keepdim=True)
    v = 2 * cand + 1
    odd = torch.arange(1, 2 * qmax, 2, device=dev)                     # 2j + 1, j < qmax
    bounds = torch.div(odd[None, :] * v[:, None] + 2 * qmax - 1, 4 * qmax,
                       rounding_mode="floor").clamp_(0, block.shape[1])
    weights = odd.to(torch.float64)
    v_col = v.to(torch.float64)[:, None]

    def steps(lo: int, hi: int, g1: torch.Tensor, g0: torch.Tensor) -> torch.Tensor:
        vv = v_col[lo:hi]                    # 2 qmax v sum C1[e_j] - v^2 sum (2j+1) C0[e_j]
        return g1.sum(1).mul_(2 * qmax * vv) - torch.matmul(weights, g0).mul_(vv * vv)

    vf = v.to(torch.float64)[None, :]
    err = (qmax * qmax * y2 - 2 * qmax * qmax * vf * y1 + qmax * qmax * vf * vf * y0
           + _gather_blocks((c1, c0), bounds, steps))
    scale = qmax * qmax * y2 + (vf.max() ** 2) * qmax * qmax * y0
    return cand, err, valid, MSE_TIE_RTOL * scale


def mse_bins(counts: Sequence[torch.Tensor], *, num_bits: int = 8, unsigned: bool = False,
             start_bin: int = 128, stride: int = 1, names: Sequence[str] | None = None
             ) -> torch.Tensor:
    """The chosen centre index ``i`` (amax ``(i + 1/2) w``) of every histogram."""
    _check_options(start_bin, stride)
    lengths = _check_histograms(counts, names)
    _check_candidates(lengths, start_bin, lambda n: n - 1, names, "mse")
    qmax = _qmax(num_bits, unsigned)

    def search(rows: torch.Tensor, sub: list[int]) -> torch.Tensor:
        cand, err, valid, tol = _mse_units(rows, sub, qmax, start_bin, stride)
        return cand[_pick(err, valid, tol, last=False)]

    return _in_groups(counts, lengths, search)


def mse_errors(counts: torch.Tensor, num_bits: int = 8, unsigned: bool = False,
               start_bin: int = 128, stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error of every candidate centre of one histogram, in units of ``w^2``:
    ``(candidates, errors)``."""
    _check_options(start_bin, stride)
    qmax = _qmax(num_bits, unsigned)
    lengths = _check_histograms([counts], None)
    _check_candidates(lengths, start_bin, lambda n: n - 1, None, "mse")
    cand, err, _, _ = _mse_units(stack_histograms([counts]), lengths, qmax, start_bin, stride)
    return cand, err[0] / (2 * qmax) ** 2


# ------------------------------------------------------------------------- percentile


def percentile_bins(counts: Sequence[torch.Tensor], *, percentile: float = 99.99,
                    names: Sequence[str] | None = None) -> torch.Tensor:
    """The first bin ``b`` (amax: its left edge ``b * w``) where the cumulative share of the
    count reaches ``percentile / 100``; ``n`` (the top edge) if rounding keeps it below.

    The share is pytorch-quantization's, rounding included: a running float64 sum of
    ``count / total``, left to right (torch's CPU cumsum adds in that order, as numpy's
    does), so that a share landing exactly on ``percentile / 100`` is decided as there."""
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or \
            not 0 < percentile <= 100:
        raise CalibrationError(f"percentile must be in the range (0, 100], got {percentile!r}")
    lengths = _check_histograms(counts, names)
    target = percentile / 100.0

    def search(rows: torch.Tensor, sub: list[int]) -> torch.Tensor:
        c = rows.to(torch.float64)
        share = torch.cumsum(c / c.sum(1, keepdim=True), 1)
        found = torch.searchsorted(share, torch.full_like(share[:, :1], target))
        return torch.minimum(found.reshape(-1), torch.tensor(sub))

    device = counts[0].device
    on_cpu = [c.cpu() for c in counts]         # the same additions on every device
    return _in_groups(on_cpu, lengths, search).to(device)


# ------------------------------------------------------------------------- amax


def _edges(bins, widths):
    return bins.to(torch.float64) * widths


def _centres(bins, widths):
    return (bins.to(torch.float64) + 0.5) * widths


#: Search by name: ``(function giving the chosen index, index -> amax, keywords it takes)``.
SEARCHES: dict[str, tuple[Callable[..., torch.Tensor], Callable, tuple[str, ...]]] = {
    "entropy": (entropy_bins, _edges, ("num_bits", "unsigned", "start_bin", "stride")),
    "mse": (mse_bins, _centres, ("num_bits", "unsigned", "start_bin", "stride")),
    "percentile": (percentile_bins, _edges, ("percentile",)),
}


def search_amax(method: str, counts: Sequence[torch.Tensor], bin_widths: Sequence[float], *,
                names: Sequence[str] | None = None, **options) -> torch.Tensor:
    """amax of every histogram by one search (float32 ``[Q]`` on the histograms' device).

    ``options`` are the search's keywords: ``num_bits``, ``unsigned``, ``start_bin``,
    ``stride`` for entropy and mse, ``percentile`` for percentile; any other is an error.
    ``names`` label the histograms in error messages.
    """
    if method not in SEARCHES:
        raise UnknownMethodError(f"unknown amax search {method!r}; choose one of "
                                 f"{', '.join(SEARCHES)}")
    find, to_amax, accepted = SEARCHES[method]
    extra = sorted(set(options) - set(accepted))
    if extra:
        raise CalibrationError(f"the {method} search takes no {', '.join(extra)} "
                               f"(its options: {', '.join(accepted)})")
    if len(bin_widths) != len(counts):
        raise CalibrationError(f"{len(counts)} histograms but {len(bin_widths)} bin widths")
    bins = find(counts, names=names, **options)
    widths = torch.tensor([float(w) for w in bin_widths], dtype=torch.float64,
                          device=bins.device)
    return to_amax(bins, widths).to(torch.float32)
