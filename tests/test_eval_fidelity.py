"""The fidelity section (cxr_rf.evaluation.fidelity) and the bootstrap of cxr_rf.fidelity:
the section's numbers equal the library's on the same features, identical sets score 0 and
full precision/recall, groups and findings count the right rows, and bad inputs are one line."""
import numpy as np
import pytest

from cxr_rf import conditioning as cond
from cxr_rf import errors, features
from cxr_rf import fidelity as fd
from cxr_rf.evaluation import fidelity as section
from cxr_rf.evaluation.sets import ArraySet


def _metas(n, rng):
    out = []
    for i in range(n):
        f = np.full(len(cond.FINDINGS), cond.NEGATIVE, np.int8)
        f[cond.FINDINGS.index("Cardiomegaly")] = cond.POSITIVE if i % 2 else cond.NEGATIVE
        out.append({"findings": f, "sex": "M" if i % 3 else "F", "age": float(20 + i % 60),
                    "race": "unknown", "view": "PA", "source": "phantom", "patient_id": str(i)})
    return out


def _set(n, seed, shift=0.0, name="s"):
    rng = np.random.default_rng(seed)
    x = np.clip(rng.uniform(0.2, 0.8, (n, 8, 8)) + shift, 0, 1).astype(np.float32)
    return ArraySet(x, _metas(n, rng), name=name)


EX = features.Pixels(size=4)         # D = 16: fast, exact


def test_section_equals_library_and_counts_groups(tmp_path):
    real, fake = _set(60, 0, name="real"), _set(50, 1, 0.05, name="fake")
    r = section.fidelity(real, fake, EX, workdir=tmp_path, n_boot=20, min_count=10)
    fr, ff = EX(real.images(range(60))), EX(fake.images(range(50)))
    o = r["overall"]
    assert o["fd"] == pytest.approx(fd.fid(fr, ff), rel=1e-10)
    assert o["kd"]["mean"] == pytest.approx(fd.kernel_distance(fr, ff, 50, 100, 0).mean)
    assert {k: o["prdc"][k] for k in ("precision", "recall", "density", "coverage")} == \
        fd.prdc(fr, ff, k=5)
    lo, hi = o["fd_ci95"]
    assert o["fd_se"] > 0 and lo == pytest.approx(max(o["fd"] - 1.96 * o["fd_se"], 0))
    assert hi == pytest.approx(o["fd"] + 1.96 * o["fd_se"])
    # per finding: the real rows with Cardiomegaly positive (odd i) vs the fake ones
    c = r["findings"]["Cardiomegaly"]
    assert (c["n_real"], c["n_fake"]) == (30, 25)
    assert c["fd"] == pytest.approx(fd.fid(fr[1::2], ff[1::2]), rel=1e-10)
    assert "skipped" in r["findings"]["Edema"] and r["findings"]["Edema"]["n_real"] == 0
    # subgroups: sex F is i % 3 == 0
    sf = r["subgroups"]["sex"]["F"]
    assert (sf["n_real"], sf["n_fake"]) == (20, 17)
    assert sf["fd"] == pytest.approx(fd.fid(fr[::3], ff[::3]), rel=1e-10)
    assert set(r["subgroups"]) == set(section.SUBGROUPS)
    assert r["subgroups"]["age"]["20-29"]["n_real"] == 10
    # the features were cached: a second call reads the stores
    again = section.fidelity(real, fake, EX, workdir=tmp_path, n_boot=20, min_count=10)
    assert again["overall"]["fd"] == o["fd"]


def test_identical_sets_score_zero_and_full_manifold(tmp_path):
    real = _set(40, 3, name="a")
    r = section.fidelity(real, _set(40, 3, name="b"), EX, workdir=tmp_path, n_boot=0)
    assert r["overall"]["fd"] == pytest.approx(0.0, abs=1e-9)
    assert r["overall"]["prdc"]["precision"] == r["overall"]["prdc"]["recall"] == 1.0
    assert "fd_ci95" not in r["overall"]


def test_poisson_bootstrap_is_weighted_moments_of_its_draws():
    """One replicate's moments equal the np.cov of the rows repeated by their Poisson counts
    (the draws replayed from the same seed)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 5)) + 3.0
    rows = fd._rows(x, "x")
    mean, cov = fd._poisson_moments(rows, None, 4, np.random.default_rng(9), x.mean(0), 10)
    replay = np.random.default_rng(9)
    w = np.concatenate([replay.poisson(1.0, (4, b)) for b in (10, 10, 10, 7)], axis=1)
    for k in range(4):
        rep = np.repeat(x, w[k], axis=0)
        np.testing.assert_allclose(mean[k], rep.mean(0), rtol=1e-12)
        np.testing.assert_allclose(cov[k], np.cov(rep, rowvar=False), rtol=1e-10, atol=1e-12)


def test_bootstrap_interval_covers_the_gaussian_truth():
    """FD between N(0, I) and N(m, I) samples: the closed form |m|² sits inside the
    bootstrap percentiles of a large sample (where FD's small-N bias is negligible), and a
    subgroup's indices restrict the rows."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4000, 3)), rng.normal(size=(4000, 3)) + [1.0, 0, 0]
    reps = fd.bootstrap_fd(a, b, n_boot=60, seed=2)
    lo, hi = np.percentile(reps, [2.5, 97.5])
    assert lo < 1.0 < hi and hi - lo < 0.3
    idx = np.arange(0, 4000, 2)
    sub = fd.bootstrap_fd(a, b, 5, 3, real_idx=idx, fake_idx=idx)
    assert sub.shape == (5,) and np.all(np.abs(sub - 1.0) < 0.4)


def test_bad_inputs_are_one_line(tmp_path):
    with pytest.raises(errors.UserError, match="16² and generated ones 8²"):
        section.fidelity(ArraySet(np.zeros((4, 16, 16)), _metas(4, None)), _set(4, 0), EX,
                         workdir=tmp_path)
    with pytest.raises(errors.UserError, match="at least 2 images per side"):
        section.fidelity(_set(1, 0), _set(4, 0), EX, workdir=tmp_path)
    with pytest.raises(errors.UserError, match="ascending, unique"):
        fd.moments(np.zeros((5, 2)), idx=[3, 1])
