"""cxr_rf.evaluation.privacy: exact nearest neighbours (blocked, streamed, sharded), the
held-out threshold and copy rate, the memorisation control, bad inputs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from cxr_rf import errors, features
from cxr_rf.evaluation import embed, privacy
from cxr_rf.evaluation.sets import ArraySet


def _brute(q, t):
    d = np.sqrt(((q[:, None, :] - t[None, :, :]) ** 2).sum(-1))
    return d.min(1), d.argmin(1)


def _chest_like(n, r=32, seed=0):
    """Smooth random 'radiographs': a shared bright-centre template plus per-image low- and
    mid-frequency variation, so independent images are alike but never near-copies."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:r, :r] / (r - 1) - 0.5
    template = 0.55 - 0.6 * (xx ** 2 + yy ** 2)
    low = ndimage.zoom(rng.normal(size=(n, 4, 4)), (1, r / 4, r / 4), order=1)
    mid = ndimage.zoom(rng.normal(size=(n, 8, 8)), (1, r / 8, r / 8), order=1)
    x = template[None] + 0.12 * low + 0.05 * mid
    return np.clip(x, 0, 1).astype(np.float32)


def _set(x, name, pid):
    metas = [{"findings": np.zeros(14, np.int8), "sex": "F", "age": 50.0, "race": None,
              "view": "PA", "source": "t", "patient_id": f"{pid}{i}"} for i in range(len(x))]
    return ArraySet(x, metas, name=name)


@pytest.fixture(scope="module")
def trio():
    x = _chest_like(550, seed=3)
    return _set(x[:250], "train", "tr"), _set(x[250:450], "heldout", "ho"), \
        _set(x[450:], "heldout2", "h2")


# --------------------------------------------------------------------------- nearest neighbours

@pytest.mark.parametrize("backend", ["numpy", "jax"])
@pytest.mark.parametrize("block", [7, 16, 1000])
def test_nearest_equals_brute_force(backend, block):
    rng = np.random.default_rng(1)
    q, t = rng.normal(size=(37, 5)) + 3.0, rng.normal(size=(53, 5)) + 3.0
    t[11] = q[4]                                         # an exact copy reads exactly 0
    dist, idx = privacy.nearest(q, t, block_size=block, backend=backend)
    want_d, want_i = _brute(q, t)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(dist, want_d, rtol=1e-12, atol=1e-12)
    assert dist[4] == 0.0 and idx[4] == 11


def test_ties_go_to_the_lower_train_index():
    t = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    dist, idx = privacy.nearest(np.zeros((1, 2)), t, block_size=1, backend="numpy")
    assert idx[0] == 0 and dist[0] == 1.0


class _Counting:
    """Pixels with a call counter (private: plain public attributes are part of the
    extractor's identity in a store's fingerprint)."""
    name, protocol = "pixels", "default"

    def __init__(self, size=16):
        self.inner, self.dim, self._calls = features.Pixels(size), size * size, 0

    def __call__(self, x):
        self._calls += 1
        return self.inner(x)


def test_streaming_through_feature_stores_equals_in_memory(tmp_path):
    x = _chest_like(61, r=32, seed=5)
    train, queries = _set(x[:41], "train", "a"), _set(x[41:], "q", "b")
    ex = _Counting()
    st = embed.feature_store(train, ex, tmp_path / "t", batch_size=9)
    sq = embed.feature_store(queries, ex, tmp_path / "q", batch_size=9)
    assert st.n == 41 and len(list(st.chunks())) == 5 and ex._calls == 5 + 3
    ft, fq = ex.inner(train.images(range(41))), ex.inner(queries.images(range(20)))
    np.testing.assert_array_equal(st.rows(0, 41), ft)
    got = privacy.nearest(sq, st, block_size=6)
    want = privacy.nearest(fq, ft, block_size=1000)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_array_equal(got[1], _brute(fq.astype(np.float64), ft)[1])
    # A finished store is reused as it is; another set in the same place replaces it.
    again = embed.feature_store(train, ex, tmp_path / "t", batch_size=9)
    assert ex._calls == 8 and again.n == 41
    embed.feature_store(queries, ex, tmp_path / "t", batch_size=50)
    assert ex._calls == 9 and privacy.fidelity.FeatureStore(tmp_path / "t").n == 20
    # An interrupted store (no done.json) is rebuilt, not trusted.
    os.remove(tmp_path / "q" / "done.json")
    assert embed.feature_store(queries, ex, tmp_path / "q", batch_size=9).n == 20
    assert ex._calls == 12


_SHARDED = r"""
import jax, numpy as np
from cxr_rf.evaluation import embed, privacy
assert jax.local_device_count() == 8, jax.local_devices()
rng = np.random.default_rng(2)
q, t = rng.normal(size=(45, 6)), rng.normal(size=(61, 6))
d8, i8 = privacy.nearest(q, t, block_size=13)
d1, i1 = privacy.nearest(q, t, block_size=13, devices=jax.local_devices()[:1])
dn, i_n = privacy.nearest(q, t, block_size=13, backend="numpy")
assert (i8 == i1).all() and (i8 == i_n).all(), (i8, i1, i_n)
assert np.array_equal(d8, d1) and np.allclose(d8, dn, rtol=1e-12)
print("ok")
"""


def test_sharded_over_8_devices_equals_1_device():
    """Subprocess: 8 forced CPU devices; query blocks of 13 padded to 16 and split 8 ways."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# --------------------------------------------------------------------------- threshold

def test_threshold_and_copy_rate_on_known_distances():
    heldout = np.arange(1.0, 102.0)              # 101 values: the 1st percentile is exactly 2.0
    samples = np.array([0.5, 1.5, 2.0, 2.5] + [50.0] * 96)
    r = privacy.copy_stats(samples, heldout)
    assert r["threshold"] == 2.0 and r["threshold_quantile"] == 0.01
    assert r["copy_rate"]["count"] == 2 and r["copy_rate"]["rate"] == 0.02   # strict <: 2.0 is not
    assert r["heldout_copy_rate"]["count"] == 1 and r["heldout_copy_rate"]["n"] == 101
    lo, hi = privacy.wilson(2, 100)
    assert r["copy_rate"]["lo"] == lo and abs(lo - 0.005507) < 1e-5 and abs(hi - 0.070017) < 1e-5
    assert not r["flagged"] and r["flag_bound"] == 0.02
    assert r["samples_nearest"]["median"] == 50.0 and r["heldout_nearest"]["median"] == 51.0
    assert r["heldout_nearest"]["quantiles"]["0.01"] == 2.0
    copies = privacy.copy_stats(np.zeros(100), heldout)
    assert copies["flagged"] and copies["copy_rate"]["lo"] > 0.96 and copies["auroc"] == 0.0
    same = privacy.copy_stats(heldout, heldout)
    assert same["auroc"] == 0.5 and not same["flagged"]
    assert privacy.wilson(0, 10)[0] == 0.0 and np.isnan(privacy.wilson(0, 0)[0])


# --------------------------------------------------------------------------- the control

def test_perturbed_copies_are_flagged_and_heldout_is_not(trio, tmp_path):
    train, heldout, heldout2 = trio
    copies = privacy.perturbed_copies(train, 60, seed=1)
    assert len(copies) == 60 and copies.resolution == 32
    rows = [m["prompt_row"] for m in copies.metas]
    assert rows == sorted(set(rows)) and copies.metas[0]["patient_id"] == f"tr{rows[0]}"
    x = copies.images([0])[0]
    assert 0 < np.abs(x - train.images([rows[0]])[0]).mean() < 0.05

    out = tmp_path / "out"
    r = privacy.privacy(copies, train, heldout, {"pixels": features.Pixels()},
                        workdir=tmp_path / "w", out_dir=out, pairs=4)
    json.dumps(r)                                         # JSON-friendly
    p = r["spaces"]["pixels"]
    assert p["dim"] == 64 * 64 and r["heldout_patients_in_train"] == 0
    assert p["flagged"] and p["copy_rate"]["rate"] == 1.0 and p["auroc"] == 0.0
    assert p["prompt"]["nearest_is_prompt"] == 1.0 and p["prompt"]["n"] == 60
    assert p["prompt"]["median"] == p["samples_nearest"]["median"]
    assert [c["distance"] for c in p["closest"]] == sorted(c["distance"] for c in p["closest"])
    assert len(p["closest"]) == 4 and p["closest"][0]["train"] in rows
    for png in p["pngs"].values():
        assert os.path.getsize(png) > 1000
    from PIL import Image
    assert Image.open(p["pngs"]["pairs"]).size[0] == 4 * 128

    # Unseen real images as "samples": as far from train as the baseline, not flagged. The
    # train features are reused from the first call (same workdir).
    r2 = privacy.privacy(heldout2, train, heldout, ["pixels"], workdir=tmp_path / "w")
    p2 = r2["spaces"]["pixels"]
    assert not p2["flagged"] and p2["prompt"] is None and "pngs" not in p2
    assert p2["copy_rate"]["rate"] < 0.05 and 0.35 < p2["auroc"] < 0.65, p2
    assert len(os.listdir(tmp_path / "w" / "features" / "pixels")) == 4   # 3 + heldout2


# --------------------------------------------------------------------------- bad inputs

def _one_line_error(match, fn, *a, **kw):
    with pytest.raises(errors.UserError, match=match) as e:
        fn(*a, **kw)
    assert "\n" not in str(e.value)


def test_bad_inputs_are_one_line_errors(trio, tmp_path):
    train, heldout, _ = trio
    px = {"pixels": features.Pixels(16)}
    empty = ArraySet(np.zeros((0, 32, 32), np.float32), [], name="none")
    _one_line_error("samples set 'none' has no images", privacy.privacy, empty, train, heldout,
                    px, workdir=tmp_path)
    _one_line_error("train set 'none' has no images", privacy.privacy, heldout, empty, heldout,
                    px, workdir=tmp_path)
    small = _set(_chest_like(5, r=16), "small", "s")
    _one_line_error("resolutions differ", privacy.privacy, small, train, heldout, px,
                    workdir=tmp_path)
    _one_line_error("unknown feature extractor 'inception'", privacy.privacy, heldout, train,
                    heldout, ["inception"], workdir=tmp_path)
    _one_line_error("not a feature extractor", privacy.privacy, heldout, train, heldout,
                    {"x": 3}, workdir=tmp_path)
    _one_line_error("no feature spaces", privacy.privacy, heldout, train, heldout, {},
                    workdir=tmp_path)
    bad = ArraySet(heldout.images([0]), [dict(heldout.metas[0], prompt_row=250)])
    _one_line_error("prompt_row 250 is not an index", privacy.privacy, bad, train, heldout, px,
                    workdir=tmp_path)
    _one_line_error("columns", privacy.nearest, np.zeros((2, 3)), np.zeros((2, 4)))
    _one_line_error("n >= 1", privacy.perturbed_copies, train, 0)
