"""cxr_rf.fidelity against numpy, closed forms, hand-worked cases and brute force."""
import decimal
import os

import numpy as np
import pytest
import scipy.linalg

from cxr_rf import errors, fidelity


def _rand_spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


# --------------------------------------------------------------------------- RunningMoments

def test_running_moments_equal_numpy_over_unequal_chunks_and_merges():
    rng = np.random.default_rng(0)
    # A large common offset: a naive sum-of-squares covariance loses every digit here.
    x = 1e6 + rng.normal(size=(131, 6)) * np.arange(1, 7)
    sizes = [1, 7, 50, 3, 0, 70]
    parts = np.split(x, np.cumsum(sizes)[:-1])
    streamed = fidelity.RunningMoments()
    for p in parts:
        streamed.update(p)
    # The same rows as three accumulators of unequal size, merged (with an empty one).
    a = fidelity.RunningMoments().update(parts[0]).update(parts[1])
    b = fidelity.RunningMoments().update(parts[2])
    c = fidelity.RunningMoments().update(parts[3]).update(parts[5])
    merged = a.merge(fidelity.RunningMoments()).merge(b).merge(c)
    for m in (streamed, merged, fidelity.moments(x, block_size=17)):
        assert m.count == 131
        np.testing.assert_allclose(m.mean, x.mean(axis=0), rtol=1e-14)
        np.testing.assert_allclose(m.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)


def test_running_moments_bad_input():
    m = fidelity.RunningMoments()
    with pytest.raises(errors.UserError, match="mean of no features"):
        m.mean
    m.update(np.zeros((1, 3)))
    with pytest.raises(errors.UserError, match="at least 2"):
        m.cov
    with pytest.raises(errors.UserError, match="4 columns, expected 3"):
        m.update(np.zeros((2, 4)))
    with pytest.raises(errors.UserError, match="2-D"):
        m.update(np.zeros(3))
    with pytest.raises(errors.UserError, match="non-finite"):
        m.update(np.array([[1.0, np.nan, 0.0]]))


# --------------------------------------------------------------------------- Fréchet distance

def test_fd_of_identical_sets_is_zero_also_rank_deficient():
    rng = np.random.default_rng(1)
    for n, d in ((500, 8), (20, 64)):          # the second: N < D, a singular covariance
        x = rng.normal(size=(n, d)) * 3 + 5
        assert fidelity.fid(x, x) == pytest.approx(0, abs=1e-6)
        m = fidelity.moments(x)
        assert fidelity.frechet_distance(m.mean, m.cov, m.mean, m.cov) == pytest.approx(
            0, abs=1e-6)


def test_fd_of_commuting_covariances_is_the_closed_form():
    """Diagonal, then both rotated by one orthogonal Q (they commute):
    FD = ||mu1 - mu2||² + Σ (sqrt a_i - sqrt b_i)²."""
    rng = np.random.default_rng(2)
    d = 10
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.01, 4, d), rng.uniform(0.01, 4, d)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fidelity.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(
        want, rel=1e-12)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    c1, c2 = (q * a) @ q.T, (q * b) @ q.T
    assert fidelity.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-10)


def test_fd_of_non_commuting_covariances_against_exact_references():
    """(1) C1 = L Lᵀ, C2 = L⁻ᵀ diag(d) L⁻¹ with L random: C1 C2 = L diag(d) L⁻¹, so
    Tr (C1 C2)^{1/2} = Σ sqrt d_i exactly, though C1 C2 ≠ C2 C1.
    (2) 2x2: Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M)) for M with non-negative eigenvalues,
    evaluated in 50-digit decimal arithmetic from the exact entries."""
    rng = np.random.default_rng(3)
    d = 12
    L = np.eye(d) + 0.3 * np.tril(rng.normal(size=(d, d)))
    li = np.linalg.inv(L)
    dd = rng.uniform(0.1, 3, d)
    c1, c2 = L @ L.T, li.T @ np.diag(dd) @ li
    c2 = (c2 + c2.T) / 2
    assert not np.allclose(c1 @ c2, c2 @ c1)
    assert fidelity.trace_sqrt_product(c1, c2) == pytest.approx(np.sqrt(dd).sum(), rel=1e-9)
    want = np.trace(c1) + np.trace(c2) - 2 * np.sqrt(dd).sum()
    assert fidelity.frechet_distance(np.zeros(d), c1, np.zeros(d), c2) == pytest.approx(
        want, rel=1e-9)

    c1 = np.array([[2.0, 0.75], [0.75, 1.0]])
    c2 = np.array([[0.5, -0.25], [-0.25, 3.0]])
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    D = decimal.Decimal
    with decimal.localcontext(prec=50):
        e1 = [[D(float(v)) for v in row] for row in c1]
        e2 = [[D(float(v)) for v in row] for row in c2]
        p = [[sum(e1[i][k] * e2[k][j] for k in range(2)) for j in range(2)] for i in range(2)]
        det = p[0][0] * p[1][1] - p[0][1] * p[1][0]
        tr_sqrt = (p[0][0] + p[1][1] + 2 * det.sqrt()).sqrt()
        ref = (sum((D(float(a)) - D(float(b))) ** 2 for a, b in zip(mu1, mu2))
               + e1[0][0] + e1[1][1] + e2[0][0] + e2[1][1] - 2 * tr_sqrt)
    assert fidelity.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(float(ref), rel=1e-13)


def test_fd_is_symmetric_and_matches_the_sqrtm_route_when_well_conditioned():
    rng = np.random.default_rng(4)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    c1, c2 = _rand_spd(rng, d), _rand_spd(rng, d, 2.0)
    fd12 = fidelity.frechet_distance(mu1, c1, mu2, c2)
    assert fd12 == pytest.approx(fidelity.frechet_distance(mu2, c2, mu1, c1), rel=1e-12)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real        # the pytorch-fid formula
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean)
    assert fd12 == pytest.approx(ref, rel=1e-9)


def test_fd_bad_input():
    with pytest.raises(errors.UserError, match="cov2 has shape"):
        fidelity.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))
    with pytest.raises(errors.UserError, match="mu1 has non-finite"):
        fidelity.frechet_distance(np.array([np.inf, 0]), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(errors.UserError, match="real features have 2 columns, fake 3"):
        fidelity.fid(np.zeros((4, 2)), np.zeros((4, 3)))


# --------------------------------------------------------------------------- KID

def test_mmd2_and_kid_equal_a_hand_computation_on_a_tiny_case():
    x = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])
    y = np.array([[0.5, 0.0], [-1.0, 2.0], [1.0, 0.0]])

    def k(a, b):
        return (sum(p * q for p, q in zip(a, b)) / 2 + 1) ** 3
    n = 3
    want = (sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
            + sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
            - 2 * sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / n ** 2)
    assert fidelity.mmd2_unbiased(x, y) == pytest.approx(want, rel=1e-14)
    # Subsets of every row: each subset is the whole set, so sd 0.
    kid = fidelity.kernel_distance(x, y, subsets=4)
    assert kid.mean == pytest.approx(want, rel=1e-14) and kid.std == pytest.approx(0, abs=1e-12)
    assert np.isnan(fidelity.kernel_distance(x, y, subsets=1).std)


def test_kid_is_unbiased_for_one_distribution_and_positive_for_a_shift():
    """Over 300 independent pairs of sets from one distribution the estimator averages to 0
    within 3 standard errors; the biased V-statistic (diagonals kept) does not."""
    rng = np.random.default_rng(5)
    n, d, reps = 20, 4, 300
    u, v = np.empty(reps), np.empty(reps)
    for r in range(reps):
        x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d))
        u[r] = fidelity.mmd2_unbiased(x, y)
        kxx, kyy = fidelity.polynomial_kernel(x, x), fidelity.polynomial_kernel(y, y)
        v[r] = kxx.mean() + kyy.mean() - 2 * fidelity.polynomial_kernel(x, y).mean()
    se = u.std(ddof=1) / np.sqrt(reps)
    assert abs(u.mean()) < 3 * se
    assert v.mean() > 10 * se
    x, y = rng.normal(size=(400, 8)), rng.normal(size=(300, 8))
    same = fidelity.kernel_distance(x, y, subset_size=100, subsets=50)
    assert abs(same.mean) < same.std
    shifted = fidelity.kernel_distance(x, y + 0.5, subset_size=100, subsets=50)
    assert shifted.mean > 5 * shifted.std > 0
    assert shifted == fidelity.kernel_distance(x, y + 0.5, subset_size=100, subsets=50)
    assert shifted != fidelity.kernel_distance(x, y + 0.5, subset_size=100, subsets=50, seed=1)


def test_kid_bad_input():
    x = np.zeros((5, 2))
    with pytest.raises(errors.UserError, match=r"subset_size must be in \[2, min\(N, M\) = 4\]"):
        fidelity.kernel_distance(x, np.zeros((4, 2)), subset_size=5)
    with pytest.raises(errors.UserError, match="subsets must be >= 1"):
        fidelity.kernel_distance(x, x, subsets=0)
    with pytest.raises(errors.UserError, match="x has 2 feature columns, y 3"):
        fidelity.kernel_distance(x, np.zeros((5, 3)))


# --------------------------------------------------------------------------- PRDC

def test_prdc_hand_worked_1d_case():
    """k = 1. Reals 0 1 2 3 6: radii (nearest other real) 1 1 1 1 3.
    Fakes -0.5 2.9 3.5 10 10.5: radii (nearest other fake) 3.4 0.6 0.6 0.5 0.5.

    precision: -0.5 (0.5 from real 0 < 1), 2.9 (0.1 from 3), 3.5 (0.5 from 3) are inside a
      real ball; 10 and 10.5 are not (4 and 4.5 from 6, radius 3): 3/5.
    recall: reals 0, 1, 2 lie within 3.4 of fake -0.5 and 3 within 0.6 of 2.9; real 6 is
      2.5 from 3.5 (radius 0.6), 4 from 10 (0.5): 4/5.
    density: real balls holding each fake: -0.5 → {0}; 2.9 → {2, 3} (6 is 3.1 away);
      3.5 → {3, 6}; 10, 10.5 → none: (1 + 2 + 2 + 0 + 0) / (k=1) / 5 = 1.0.
    coverage: nearest fake of each real: 0 → 0.5 < 1, 1 → 1.5 ≥ 1 (uncovered), 2 → 0.9 < 1,
      3 → 0.1 < 1, 6 → 2.5 < 3: 4/5.
    """
    real = np.array([0, 1, 2, 3, 6], float)[:, None]
    fake = np.array([-0.5, 2.9, 3.5, 10, 10.5])[:, None]
    np.testing.assert_array_equal(fidelity.knn_radii(real, 1), [1, 1, 1, 1, 3])
    np.testing.assert_allclose(fidelity.knn_radii(fake, 1), [3.4, 0.6, 0.6, 0.5, 0.5])
    got = fidelity.prdc(real, fake, k=1)
    assert got == pytest.approx({"precision": 0.6, "recall": 0.8, "density": 1.0,
                                 "coverage": 0.8})
    assert fidelity.prdc(real, fake, k=1, block_size=2) == got


def test_prdc_identical_and_disjoint_sets():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(200, 8))
    assert fidelity.prdc(x, x, k=5) == pytest.approx(
        {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0})
    far = fidelity.prdc(x, rng.normal(size=(150, 8)) + 100, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_knn_radii_and_prdc_by_blocks_equal_brute_force():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(37, 3))
    real[5] = real[9]                          # a duplicate: self is excluded by index only
    fake = rng.normal(size=(29, 3)) * 1.3 + 0.3
    for x in (real, fake):
        full = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        np.fill_diagonal(full, np.inf)
        for k in (1, 3):
            want = np.sort(full, axis=1)[:, k - 1]
            for b in (1, 5, 100):
                np.testing.assert_allclose(fidelity.knn_radii(x, k, block_size=b), want,
                                           rtol=1e-12, atol=1e-12)
    assert fidelity.knn_radii(real, 1)[5] == 0
    full = fidelity.prdc(real, fake, k=3, block_size=1000)
    assert fidelity.prdc(real, fake, k=3, block_size=1) == full
    assert fidelity.prdc(real, fake, k=3, block_size=6) == full
    # and against the reference definitions on the full distance matrix
    d = np.sqrt(((real[:, None] - fake[None]) ** 2).sum(-1))
    rr, rf = fidelity.knn_radii(real, 3), fidelity.knn_radii(fake, 3)
    assert full == pytest.approx({
        "precision": (d < rr[:, None]).any(0).mean(), "recall": (d < rf[None]).any(1).mean(),
        "density": (d < rr[:, None]).sum(0).mean() / 3, "coverage": (d.min(1) < rr).mean()})


def test_prdc_bad_input():
    x = np.zeros((4, 2))
    with pytest.raises(errors.UserError, match=r"k must be in \[1, min\(N, M\) - 1 = 3\]"):
        fidelity.prdc(x, np.ones((6, 2)), k=4)
    with pytest.raises(errors.UserError, match="block_size must be a positive integer"):
        fidelity.prdc(x, x, k=1, block_size=0)
    with pytest.raises(errors.UserError, match="real has no rows"):
        fidelity.prdc(np.zeros((0, 2)), x)


# --------------------------------------------------------------------------- FeatureStore

def test_feature_store_round_trip_and_metrics_equal_in_memory(tmp_path):
    rng = np.random.default_rng(8)
    real = rng.normal(size=(203, 5)).astype(np.float32)
    fake = (rng.normal(size=(157, 5)) + 0.2).astype(np.float32)
    stores = []
    for name, x, sizes in (("real", real, [64, 1, 100, 38]), ("fake", fake, [50, 50, 57])):
        s = fidelity.FeatureStore(tmp_path / name)
        for p in np.split(x, np.cumsum(sizes)[:-1]):
            s.append(p)
        s.append(np.zeros((0, 5), np.float32))           # writes nothing
        stores.append(fidelity.FeatureStore(tmp_path / name))   # reopened from disk
    rs, fs = stores
    assert len(rs) == 203 and rs.dim == 5 and len(list(rs.chunks())) == 4
    assert sorted(os.listdir(tmp_path / "real")) == [f"chunk_{i:06d}.npy" for i in range(4)]
    np.testing.assert_array_equal(np.concatenate(list(rs.chunks())), real)
    np.testing.assert_array_equal(rs.rows(60, 170), real[60:170])
    idx = np.array([0, 63, 64, 65, 164, 165, 202])
    np.testing.assert_array_equal(rs.take(idx), real[idx])

    m_store, m_mem = fidelity.moments(rs, 30), fidelity.moments(real, 30)
    np.testing.assert_array_equal(m_store.mean, m_mem.mean)
    np.testing.assert_array_equal(m_store.cov, m_mem.cov)
    assert fidelity.fid(rs, fs, 30) == fidelity.fid(real, fake, 30)
    assert (fidelity.kernel_distance(rs, fs, subset_size=60, subsets=10)
            == fidelity.kernel_distance(real, fake, subset_size=60, subsets=10))
    assert fidelity.prdc(rs, fs, k=4, block_size=45) == fidelity.prdc(real, fake, k=4,
                                                                       block_size=45)
    assert fidelity.prdc(rs, fake, k=4) == fidelity.prdc(real, fake, k=4)


def test_feature_store_bad_input(tmp_path):
    s = fidelity.FeatureStore(tmp_path / "s")
    with pytest.raises(errors.UserError, match="is empty"):
        fidelity.prdc(s, np.zeros((4, 2)))
    s.append(np.zeros((3, 2)))
    with pytest.raises(errors.UserError, match="3 columns, the store 2"):
        s.append(np.zeros((3, 3)))
    with pytest.raises(errors.UserError, match="non-finite"):
        s.append(np.full((1, 2), np.inf))
    os.rename(tmp_path / "s" / "chunk_000000.npy", tmp_path / "s" / "chunk_000001.npy")
    with pytest.raises(errors.UserError, match="gap in its chunk numbers"):
        fidelity.FeatureStore(tmp_path / "s")
    (tmp_path / "f").write_text("")
    with pytest.raises(errors.UserError, match="is not a directory"):
        fidelity.FeatureStore(tmp_path / "f")


# --------------------------------------------------------------------------- JAX tiles

_SHARDED = r"""
import jax, numpy as np
from cxr_rf import fidelity
assert jax.local_device_count() == 4, jax.local_devices()
rng = np.random.default_rng(9)
real, fake = rng.normal(size=(53, 6)), rng.normal(size=(41, 6)) + 0.3
d4 = fidelity.sharded_distances(real, fake)
d1 = fidelity.sharded_distances(real, fake, devices=jax.local_devices()[:1])
np.testing.assert_allclose(d4, d1, rtol=1e-6, atol=1e-6)
np.testing.assert_allclose(d4, fidelity._distances(real, fake), rtol=1e-4, atol=1e-4)
np.testing.assert_allclose(fidelity.knn_radii(real, 3, 16, backend="jax"),
                           fidelity.knn_radii(real, 3, 16), rtol=1e-4)
got, want = fidelity.prdc(real, fake, 3, 16, "jax"), fidelity.prdc(real, fake, 3, 16)
assert all(abs(got[m] - want[m]) <= 0.05 for m in want), (got, want)
print("ok")
"""


def test_sharded_distances_over_4_devices_equal_1_device_and_numpy():
    """Subprocess: 4 forced CPU devices, rows padded 53 -> 56 and split 4 ways."""
    import subprocess
    import sys
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_unknown_backend_is_refused():
    with pytest.raises(errors.UserError, match="backend must be one of"):
        fidelity.prdc(np.zeros((4, 2)), np.ones((4, 2)), k=1, backend="torch")
