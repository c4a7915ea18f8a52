"""A study's arithmetic: mean ± std, per-seed paired differences, the verdict sentence, seeds needed.

Runs of the same seed share the student's initialisation and data order, so the difference of
two methods' AP on the same seed removes most of the seed-to-seed spread. Over n seeds the
paired differences d_1..d_n have mean m and sample std s; the 95% interval of the mean
difference is m ± t(n-1) * s / sqrt(n) (Student's t, two-sided 97.5% quantile). A method is
called ahead (behind) only when that interval excludes 0; otherwise the two are level within
the spread. One seed has no spread: nothing is claimed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

# Student's t, two-sided 95% (the 97.5% quantile), for 1..30 degrees of freedom (standard tables)
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t975(dof: int) -> float:
    """Student's t 97.5% quantile for ``dof`` >= 1 degrees of freedom (1.96 beyond 30)."""
    if dof < 1:
        raise ValueError(f"t975: dof must be at least 1, got {dof}")
    return _T975[dof - 1] if dof <= len(_T975) else 1.96


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    if not values:
        raise ValueError("mean_std: no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_differences(ap: Mapping[int, float], other: Mapping[int, float]) -> dict[int, float]:
    """Per seed, ``ap[seed] - other[seed]`` over the seeds both have (AP points)."""
    return {seed: ap[seed] - other[seed] for seed in sorted(ap) if seed in other}


def interval(diffs: Sequence[float]) -> tuple[float, float] | None:
    """The 95% interval of the mean paired difference (None for fewer than 2 seeds)."""
    if len(diffs) < 2:
        return None
    m, s = mean_std(diffs)
    half = t975(len(diffs) - 1) * s / math.sqrt(len(diffs))
    return m - half, m + half


def verdict(name: str, other: str, diffs: Sequence[float]) -> str:
    """One sentence on ``name`` against ``other`` from the per-seed AP differences (name - other)
    that claims only what the spread supports, e.g. "ICD ahead of FPN-MSE by 0.40 ± 0.70 AP
    (2 of 3 seeds ahead): level within the spread"."""
    n = len(diffs)
    if n == 0:
        return f"{name} against {other}: no seed with both runs finished, nothing to compare"
    m, s = mean_std(diffs)
    side = "ahead of" if m > 0 else "behind" if m < 0 else "even with"
    by = f"by {abs(m):.2f}" if m else "at a difference of 0.00"
    ahead = sum(d > 0 for d in diffs)
    if n == 1:
        return f"{name} {side} {other} {by} AP on one seed: no spread measured, nothing can be claimed (run more seeds)"
    lo, hi = interval(diffs)
    head = f"{name} {side} {other} {by} ± {s:.2f} AP ({ahead} of {n} seeds ahead)"
    if lo > 0:
        return f"{head}: ahead beyond the spread (95% interval of the mean {lo:+.2f} to {hi:+.2f})"
    if hi < 0:
        return f"{head}: behind beyond the spread (95% interval of the mean {lo:+.2f} to {hi:+.2f})"
    return f"{head}: level within the spread (95% interval of the mean {lo:+.2f} to {hi:+.2f} holds 0)"


def seeds_needed(difference: float, std: float, limit: int = 1000) -> int | None:
    """The fewest seeds n >= 2 whose 95% interval of the mean paired difference excludes 0 when
    the true mean difference is ``difference`` and the per-seed spread ``std`` (AP points):
    t(n-1) * std / sqrt(n) < |difference|. None when more than ``limit`` (or difference 0)."""
    if std < 0:
        raise ValueError(f"seeds_needed: std must be >= 0, got {std}")
    if difference == 0:
        return None
    for n in range(2, limit + 1):
        if t975(n - 1) * std / math.sqrt(n) < abs(difference):
            return n
    return None
