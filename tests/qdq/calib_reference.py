"""A plain reference of pytorch-quantization's histogram calibration, written from the
description of its algorithm (README "Calibration", ``qdq.calib.amax_search``) with Python
loops, one value, bin and candidate at a time. It shares no code with ``qdq.calib``: the
tests and ``scripts/bench_calib.py`` compare the fast, vectorised code against it.

- collector: the first batch with a non-zero value fixes ``s = f32(num_bins) / f32(m0)``
  (``m0`` its largest ``|x|``); ``|x|`` goes to bin ``trunc(f32(|x| * s))``, the top edge to
  the last bin; a later batch whose largest ``|x|`` exceeds ``m0`` and scales past the last
  bin appends bins up to ``ceil(f32(M * s))``; past ``max_bins`` bins, neighbours merge
  ``2^j`` at a time (smallest ``j`` that fits) and ``s`` halves ``j`` times.
- entropy: bin 0 takes bin 1's count; candidate ``i``: P = first ``i`` bins, the rest added
  to bin ``i - 1``; bin ``b < i`` belongs to level ``floor(b * L / i)``; Q gives every bin
  that is non-empty in the histogram its level's count over the level's non-empty bins;
  KL(P || Q) normalised; the last candidate within ``KL_TIES`` of the minimum.
- percentile: the first bin whose running share of the total (float sum of
  ``count / total``, left to right) reaches ``p / 100``.
- mse: candidate centres ``i``; error = sum over centres of ``count * (fq(centre) -
  centre)^2`` with ``fq`` fake quantization to ``qmax`` steps of ``amax / qmax``, round half
  to even, clipped at amax; exact integer arithmetic; the first minimum.
"""

from __future__ import annotations

import math

import numpy as np

#: Candidates whose KL lies this close to the minimum count as tied (the last one wins).
KL_TIES = 1e-12


def collect(batches, num_bins: int = 2048, max_bins: int | None = None,
            skip_zeros: bool = False) -> tuple[list[int], float | None]:
    """``(counts, bin width)`` of ``|x|`` over the batches (arrays or tensors)."""
    max_bins = 32 * num_bins if max_bins is None else max_bins
    counts: list[int] | None = None
    first_max = 0.0
    scale = np.float32(0.0)
    bins = num_bins
    merged = 0
    for batch in batches:
        values = [abs(np.float32(v)) for v in np.asarray(batch, dtype=np.float32).reshape(-1)]
        if skip_zeros:
            values = [v for v in values if v != 0]
        if not values:
            continue
        if counts is None:
            counts = [0] * num_bins
        largest = max(values)
        if largest == 0:
            counts[0] += len(values)
            continue
        if first_max == 0:
            first_max = float(largest)
            scale = np.float32(num_bins) / np.float32(largest)
        elif largest > first_max and float(np.float32(largest) * scale) > bins:
            need = math.ceil(float(np.float32(largest) * scale))
            shift = 0
            while math.ceil(need / 2 ** shift) > max_bins:
                shift += 1
            if shift:
                coarse = [0] * math.ceil(len(counts) / 2 ** shift)
                for b, c in enumerate(counts):
                    coarse[b // 2 ** shift] += c
                counts = coarse
                scale = np.float32(scale * np.float32(2.0 ** -shift))
                merged += shift
            bins = math.ceil(need / 2 ** shift)
            counts.extend([0] * (bins - len(counts)))
        for v in values:
            b = int(np.float32(v) * scale)          # float32 product, truncated
            counts[min(b, bins - 1)] += 1
    if counts is None:
        return [], None
    width = None if first_max == 0 else first_max / num_bins * 2.0 ** merged
    return counts, width


def entropy_bin(counts, num_bits: int = 8, unsigned: bool = False, start_bin: int = 128,
                stride: int = 1) -> tuple[int, dict[int, float]]:
    """The chosen candidate ``i`` (amax = edge ``i``) and the KL of every candidate."""
    bins = [int(c) for c in counts]
    if len(bins) > 1:
        leveled = list(bins)
        leveled[0] = leveled[1]
        if sum(leveled) > 0:
            bins = leveled
    levels = 2 ** (num_bits - 1 + int(unsigned))
    divergences = {}
    for i in range(start_bin, len(bins) + 1, stride):
        p = bins[:i]
        p[i - 1] += sum(bins[i:])
        level_count: dict[int, int] = {}
        level_nonempty: dict[int, int] = {}
        for b in range(i):
            if bins[b] != 0:
                level = b * levels // i
                level_count[level] = level_count.get(level, 0) + bins[b]
                level_nonempty[level] = level_nonempty.get(level, 0) + 1
        q = []
        for b in range(i):
            level = b * levels // i
            q.append(level_count[level] / level_nonempty[level] if bins[b] != 0 else 0.0)
        p_total, q_total = sum(p), sum(q)
        if q_total == 0:                      # keeps no count: never chosen
            divergences[i] = math.inf
            continue
        terms = []
        for pb, qb in zip(p, q, strict=True):
            if pb == 0:
                continue
            if qb == 0:
                terms = None
                break
            terms.append(pb / p_total * math.log((pb / p_total) / (qb / q_total)))
        divergences[i] = math.inf if terms is None else math.fsum(terms)
    best = min(divergences.values())
    chosen = max(i for i, d in divergences.items() if d <= best + KL_TIES)
    return chosen, divergences


def percentile_bin(counts, percentile: float) -> int:
    """The bin whose left edge is the amax: the first whose running share of the total
    (a float sum of ``count / total``, left to right) reaches ``percentile / 100``; the top
    edge ``len(counts)`` if the rounded share never does."""
    total = sum(int(c) for c in counts)
    target = percentile / 100.0
    share = 0.0
    for b, c in enumerate(counts):
        share += int(c) / total
        if share >= target:
            return b
    return len(counts)


def mse_bin(counts, num_bits: int = 8, unsigned: bool = False, start_bin: int = 128,
            stride: int = 1) -> tuple[int, dict[int, int]]:
    """The chosen centre ``i`` (amax = centre of bin ``i``) and every candidate's error, an
    exact integer in units of ``(w / (2 qmax))^2``.

    In units of half a bin, centre ``b`` is ``2b + 1`` and amax ``2i + 1``; the grid step
    is ``(2i + 1) / qmax``, so ``centre / step = qmax (2b + 1) / (2i + 1)``, rounded half
    to even and clipped at ``qmax``, and ``fq(centre) - centre = (level (2i + 1) - qmax
    (2b + 1)) / (2 qmax)`` half bins."""
    qmax = 2 ** (num_bits - 1 + int(unsigned)) - 1
    errors = {}
    for i in range(start_bin, len(counts), stride):
        amax = 2 * i + 1
        error = 0
        for b, c in enumerate(counts):
            if c == 0:
                continue
            centre = qmax * (2 * b + 1)           # centre / step = centre / amax
            level, rest = divmod(centre, amax)
            if 2 * rest > amax or (2 * rest == amax and level % 2 == 1):
                level += 1                        # round half to even
            level = min(level, qmax)
            error += int(c) * (level * amax - centre) ** 2
        errors[i] = error
    best = min(errors.values())
    return min(i for i, e in errors.items() if e == best), errors
