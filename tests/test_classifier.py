"""The in-house classifier (cxr_rf.features.classifier): the masked loss, that a tiny run learns
a phantom finding, save/load, determinism, data parallelism, and one-line errors."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_rf import conditioning as cond
from cxr_rf import errors, metrics
from cxr_rf.evaluation import sets as eval_sets
from cxr_rf.evaluation.sets import ArraySet
from cxr_rf.features import classifier as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(widths=(8, 16, 32), groups=4, progress=False)
U, P, N, Q, S = cond.UNMENTIONED, cond.POSITIVE, cond.NEGATIVE, cond.UNCERTAIN, cond.UNSPECIFIED


def phantom_set(seed: int, num: int, resolution: int, name: str) -> ArraySet:
    return eval_sets.phantoms(seed, num, resolution, name)


@pytest.fixture(scope="module")
def phantoms():
    """Training phantoms (seed 0) and held-out phantoms of other patients (seed 1), 32 px."""
    return phantom_set(0, 256, 32, "train"), phantom_set(1, 128, 32, "heldout")


# ------------------------------------------------------------------------------ the loss

def _bce(z, y):
    return -(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-z))))


@pytest.mark.parametrize("uncertain", C.UNCERTAIN_MODES)
def test_masked_bce_matches_a_hand_computed_case(uncertain):
    # One row per state: unmentioned, positive, negative, uncertain, unspecified.
    z = np.array([[0.3, -1.2, 2.0, 0.7, -0.4]], np.float32)
    codes = np.array([[U, P, N, Q, S]], np.int8)
    terms = [_bce(-1.2, 1.0), _bce(2.0, 0.0)]           # positive -> 1, negative -> 0
    if uncertain == "zeros":
        terms.append(_bce(0.7, 0.0))
    elif uncertain == "ones":
        terms.append(_bce(0.7, 1.0))
    # Only the first 5 of 14 columns exist here: pad to F with unmentioned (masked) entries.
    zf = np.zeros((1, 14), np.float32)
    zf[:, :5] = z
    cf = np.full((1, 14), U, np.int8)
    cf[:, :5] = codes
    got = float(C.masked_bce(jnp.asarray(zf), jnp.asarray(cf), uncertain))
    assert got == pytest.approx(np.mean(terms), rel=1e-5)
    target, mask = C.targets(cf, uncertain, xp=np)
    assert mask[0, :5].tolist() == [0, 1, 1, float(uncertain != "ignore"), 0]
    assert target[0, 1] == 1 and target[0, 2] == 0
    assert target[0, 3] == float(uncertain == "ones")


def test_an_unlabelled_batch_has_loss_zero_and_zero_gradient():
    codes = jnp.asarray(np.array([[U] * 7 + [S] * 7, [S] * 7 + [U] * 7], np.int8))
    z = jnp.asarray(np.random.default_rng(0).normal(size=(2, 14)).astype(np.float32))
    loss, grad = jax.value_and_grad(C.masked_bce)(z, codes)
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)
    # Uncertain-only: masked under "ignore", labelled otherwise.
    unc = jnp.full((2, 14), Q, jnp.int8)
    assert float(C.masked_bce(z, unc, "ignore")) == 0.0
    assert float(C.masked_bce(z, unc, "zeros")) > 0.0


def test_the_loss_is_stable_for_large_logits():
    z = jnp.array([[80.0, -80.0] + [0.0] * 12])
    codes = jnp.asarray(np.array([[N, P] + [U] * 12], np.int8))
    assert float(C.masked_bce(z, codes)) == pytest.approx(80.0, rel=1e-4)


# ------------------------------------------------------------------------------ training

def test_a_tiny_run_learns_cardiomegaly_on_held_out_phantoms(phantoms, tmp_path):
    train_set, heldout = phantoms
    clf = C.train(train_set, out_dir=tmp_path / "clf", val_set=heldout, steps=300, batch_size=32,
                  lr=3e-3, seed=0, **TINY)
    probs = clf.predict_set(heldout)
    f = cond.FINDINGS.index("Cardiomegaly")
    codes = heldout.findings()[:, f]
    a = metrics.auroc(probs[codes == P, f], probs[codes == N, f])
    assert a > 0.85, a
    # metrics.json holds the same number (validation = the held-out set here).
    saved = json.loads((tmp_path / "clf" / "metrics.json").read_text())
    assert saved["validation"]["auroc"]["Cardiomegaly"]["auroc"] == pytest.approx(a)
    assert set(saved["validation"]["auroc"]) == set(cond.FINDINGS)

    # save -> load: identical predictions and features, and the extractor convention.
    loaded = C.load(tmp_path / "clf", batch_size=clf.batch_size)   # the same program: bitwise
    x = heldout.images(range(20))
    assert loaded.name == "cxr_classifier" and loaded.dim == 32 and loaded.resolution == 32
    np.testing.assert_array_equal(loaded.predict(x), clf.predict(x))
    feats = loaded(x)
    assert feats.shape == (20, 32) and feats.dtype == np.float32
    np.testing.assert_array_equal(feats, clf(x))
    # Padding and batching do not change a row beyond float rounding (another batch size is
    # another compiled program): one image alone, batches of 8.
    np.testing.assert_allclose(loaded(x[3:4]), feats[3:4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(C.load(tmp_path / "clf", batch_size=8).predict(x), clf.predict(x),
                               rtol=1e-5, atol=1e-6)
    # Through the registry, also at another input size (resized inside), and the other protocol.
    from cxr_rf import features
    ext = features.get("cxr_classifier", str(tmp_path / "clf"), protocol="chexgenbench")
    assert isinstance(ext, features.Extractor) and ext.protocol == "chexgenbench"
    big = np.kron(x[:2], np.ones((4, 4), np.float32))           # 128 px
    assert ext(big).shape == (2, 32)
    assert loaded(big).shape == (2, 32)


def test_training_is_deterministic_for_a_seed(phantoms):
    train_set = ArraySet(phantoms[0].x[:64], phantoms[0].metas[:64])
    x = phantoms[1].images(range(8))
    kw = dict(out_dir=None, steps=6, batch_size=16, seed=3, **TINY)
    a = C.train(train_set, **kw).predict(x)
    before = C._train_program.cache_info().hits
    b = C.train(train_set, **kw).predict(x)
    np.testing.assert_array_equal(a, b)
    c = C.train(train_set, **{**kw, "seed": 4}).predict(x)
    assert not np.array_equal(a, c)
    # Same architecture and recipe, another seed: the compiled step is reused, not rebuilt.
    assert C._train_program.cache_info().hits == before + 2


def test_chexgenbench_preprocessing_quantises_to_uint8():
    x = np.random.default_rng(0).uniform(size=(2, 40, 40)).astype(np.float32)
    y = C.chexgenbench_preprocess(x)
    assert y.shape == (2, 299, 299) and y.min() >= 0 and y.max() <= 1
    np.testing.assert_allclose(y * 255, np.round(y * 255), atol=1e-4)


def test_train_cli_on_a_converted_dataset(phantom_data, tmp_path):
    out = tmp_path / "cli"
    m = C.train_cli(phantom_data(16), str(out), steps=2, batch_size=8, widths=(8, 16),
                    progress=False)
    assert {"config.json", "metrics.json", "params"} <= set(os.listdir(out))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolution"] == 16 and cfg["widths"] == [8, 16] and cfg["steps"] == 2
    assert "validation" in m
    assert C.load(out).dim == 16


# ------------------------------------------------------------------------------ sharding

_SHARDED = r"""
import numpy as np, jax
from cxr_rf.evaluation import sets as eval_sets
from cxr_rf.features import classifier as C
assert len(jax.devices()) == 8, jax.devices()
s = eval_sets.phantoms(0, 32, 16)
x = s.images(range(12))
kw = dict(out_dir=None, steps=4, batch_size=16, seed=0, widths=(8, 16), groups=4, progress=False)
one = C.train(s, devices=jax.devices()[:1], **kw)
eight = C.train(s, devices=jax.devices(), **kw)
np.testing.assert_allclose(eight.predict(x), one.predict(x), rtol=1e-4, atol=1e-5)
np.testing.assert_allclose(eight(x), one(x), rtol=1e-4, atol=1e-4)
print("OK")
"""


def test_eight_devices_train_and_predict_like_one():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-c", _SHARDED], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


# ------------------------------------------------------------------------------ bad inputs

def _one_line(e):
    assert "\n" not in str(e.value) and str(e.value)


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(errors.UserError, match="does not exist") as e:
        C.load(tmp_path / "nope")
    _one_line(e)
    with pytest.raises(errors.UserError, match="config.json is missing") as e:
        C.load(tmp_path)
    _one_line(e)
    (tmp_path / "config.json").write_text(json.dumps(C.ClassifierConfig().to_json()))
    with pytest.raises(errors.UserError, match="weights") as e:
        C.load(tmp_path)
    _one_line(e)
    from cxr_rf import features
    with pytest.raises(errors.UserError, match="does not exist"):
        features.get("cxr_classifier", str(tmp_path / "nope"))


def test_bad_training_inputs_are_one_line_errors(phantoms):
    empty = ArraySet(np.zeros((0, 16, 16), np.float32), [])
    with pytest.raises(errors.UserError, match="empty") as e:
        C.train(empty, out_dir=None, steps=1, batch_size=8, **TINY)
    _one_line(e)
    unlabelled = ArraySet(np.zeros((4, 16, 16), np.float32),
                          [{**phantoms[0].metas[0], "findings": np.zeros(14, np.int8)}] * 4)
    with pytest.raises(errors.UserError, match="no positive/negative") as e:
        C.train(unlabelled, out_dir=None, steps=1, batch_size=4, **TINY)
    _one_line(e)
    with pytest.raises(errors.UserError, match="uncertain mode"):
        C.train(phantoms[0], out_dir=None, steps=1, batch_size=8, uncertain="maybe", **TINY)
