"""Two-group statistics for evaluations (pure numpy): AUROC and its bootstrap interval.

NaN policy: a NaN score (an image the measurement could not read) is *dropped* before any
statistic; ``drop_nan`` returns how many were dropped, and callers report that count next to
the statistic (``cxr_rf.evaluate`` does, per group). ±inf are ordinary, orderable values. A
group that is empty after dropping gives NaN, never an exception.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def drop_nan(x) -> tuple[np.ndarray, int]:
    """(the finite-or-infinite values of ``x`` as float64, the number of NaNs dropped)."""
    x = np.asarray(x, np.float64).ravel()
    keep = ~np.isnan(x)
    return x[keep], int(x.size - keep.sum())


def auroc(pos, neg) -> float:
    """Area under the ROC curve of score ``pos`` (positives) vs ``neg`` (negatives).

    P(score of a random positive > score of a random negative) + ½ P(equal): the
    Mann-Whitney U of the positives divided by n_pos * n_neg, with ties counted ½ (average
    ranks). NaNs are dropped (see ``drop_nan``); NaN if a group is then empty.
    """
    p, _ = drop_nan(pos)
    q, _ = drop_nan(neg)
    if p.size == 0 or q.size == 0:
        return float("nan")
    x = np.concatenate([p, q])
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    # The average 1-based rank of each distinct value: the c tied values after `before`
    # smaller ones hold ranks before+1 .. before+c.
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = mean_rank[inverse]
    u = ranks[: p.size].sum() - p.size * (p.size + 1) / 2.0
    return float(u / (p.size * q.size))


def bootstrap_ci(pos, neg, stat: Callable = auroc, n: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (lo, hi) of ``stat(pos, neg)`` at confidence ``level``.

    NaNs are dropped first; each group is then resampled with replacement at its own size
    (a stratified bootstrap: both groups keep their sizes), ``n`` times, with
    ``np.random.default_rng(seed)``: the same inputs and seed give the same interval.
    Resamples where ``stat`` is NaN are ignored; (nan, nan) when a group is empty.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    p, _ = drop_nan(pos)
    q, _ = drop_nan(neg)
    if p.size == 0 or q.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    ip = rng.integers(0, p.size, (n, p.size))
    iq = rng.integers(0, q.size, (n, q.size))
    stats = np.array([stat(p[a], q[b]) for a, b in zip(ip, iq)], np.float64)
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def summary(x) -> dict:
    """{"mean", "sd" (ddof=1; NaN below 2 values), "n", "nan"} of ``x`` with NaNs dropped."""
    v, dropped = drop_nan(x)
    return {"mean": float(v.mean()) if v.size else float("nan"),
            "sd": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
            "n": int(v.size), "nan": dropped}
