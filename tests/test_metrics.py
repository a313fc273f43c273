"""cxr_rf.metrics against brute force and closed forms."""
import math

import numpy as np
import pytest

from cxr_rf import metrics


def _pairs(pos, neg) -> float:
    """AUROC by counting every (positive, negative) pair: wins 1, ties ½."""
    p = np.asarray(pos, np.float64)[:, None]
    q = np.asarray(neg, np.float64)[None, :]
    return float(((p > q) + 0.5 * (p == q)).mean())


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_the_pair_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    # Few distinct values, so there are many ties within and across the groups.
    pos = rng.integers(0, 6, rng.integers(1, 40)).astype(float)
    neg = rng.integers(-1, 5, rng.integers(1, 40)).astype(float)
    assert metrics.auroc(pos, neg) == pytest.approx(_pairs(pos, neg), abs=1e-12)
    cont_p, cont_n = rng.normal(0.3, 1, 57), rng.normal(0, 1, 33)
    assert metrics.auroc(cont_p, cont_n) == pytest.approx(_pairs(cont_p, cont_n), abs=1e-12)


def test_auroc_extremes_and_symmetry():
    assert metrics.auroc([2, 3], [0, 1]) == 1.0
    assert metrics.auroc([0, 1], [2, 3]) == 0.0
    assert metrics.auroc([1, 1], [1, 1, 1]) == 0.5
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=20), rng.normal(size=30)
    assert metrics.auroc(a, b) + metrics.auroc(b, a) == pytest.approx(1.0)
    assert metrics.auroc([np.inf], [1e300]) == 1.0


def test_auroc_of_two_gaussians_is_phi_of_d_over_sqrt2():
    rng = np.random.default_rng(1)
    n = 20000
    for d in (0.0, 0.5, 1.0, 2.0):
        want = 0.5 * (1 + math.erf(d / math.sqrt(2) / math.sqrt(2)))   # Φ(d/√2)
        got = metrics.auroc(rng.normal(d, 1, n), rng.normal(0, 1, n))
        assert got == pytest.approx(want, abs=0.01), d


def test_identical_distributions_give_one_half():
    x = np.random.default_rng(2).normal(size=500)
    assert metrics.auroc(x, x) == 0.5
    rng = np.random.default_rng(3)
    assert metrics.auroc(rng.normal(size=20000), rng.normal(size=20000)) == pytest.approx(
        0.5, abs=0.01)


def test_nans_are_dropped_and_counted():
    pos, neg = [3.0, np.nan, 2.0], [1.0, np.nan, np.nan, 2.5]
    assert metrics.auroc(pos, neg) == _pairs([3, 2], [1, 2.5])
    assert metrics.drop_nan(neg)[1] == 2
    assert math.isnan(metrics.auroc([np.nan], [1.0]))
    assert math.isnan(metrics.auroc([], [1.0]))
    assert all(math.isnan(v) for v in metrics.bootstrap_ci([np.nan, np.nan], [1.0]))
    s = metrics.summary([1.0, 3.0, np.nan])
    assert s == {"mean": 2.0, "sd": pytest.approx(math.sqrt(2)), "n": 2, "nan": 1}


def test_bootstrap_interval_contains_the_estimate_and_is_deterministic():
    rng = np.random.default_rng(4)
    pos, neg = rng.normal(1, 1, 60), rng.normal(0, 1, 50)
    est = metrics.auroc(pos, neg)
    lo, hi = metrics.bootstrap_ci(pos, neg, n=500, seed=7)
    assert lo < est < hi
    assert (lo, hi) == metrics.bootstrap_ci(pos, neg, n=500, seed=7)
    assert (lo, hi) != metrics.bootstrap_ci(pos, neg, n=500, seed=8)
    lo90, hi90 = metrics.bootstrap_ci(pos, neg, n=500, seed=7, level=0.9)
    assert lo <= lo90 < hi90 <= hi
    # Any two-group statistic works, e.g. a difference of means.
    dlo, dhi = metrics.bootstrap_ci(pos, neg, stat=lambda a, b: a.mean() - b.mean(), n=500)
    assert dlo < pos.mean() - neg.mean() < dhi


def test_bootstrap_interval_shrinks_as_one_over_sqrt_n():
    rng = np.random.default_rng(5)
    widths = {}
    for n in (100, 1600):
        lo, hi = metrics.bootstrap_ci(rng.normal(0.8, 1, n), rng.normal(0, 1, n), n=400)
        widths[n] = hi - lo
    ratio = widths[100] / widths[1600]          # √16 = 4
    assert 3.0 < ratio < 5.3, widths


def test_bootstrap_bad_arguments():
    with pytest.raises(ValueError, match="level"):
        metrics.bootstrap_ci([1.0], [0.0], level=1.0)
    with pytest.raises(ValueError, match="n must be"):
        metrics.bootstrap_ci([1.0], [0.0], n=0)
