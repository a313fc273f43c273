"""CheXGenBench-style utility (cxr_rf.evaluation.utility): the report's structure, and that
synthetic images identical to the real ones score identically."""
import json

import numpy as np
import pytest

from cxr_rf import conditioning as cond
from cxr_rf import errors
from cxr_rf.evaluation import utility as U
from cxr_rf.evaluation import sets as eval_sets
from cxr_rf.evaluation.sets import ArraySet

RECIPE = dict(steps=4, batch_size=16, seed=0, widths=(8, 16), n_boot=50, min_group=5,
              progress=False)


def phantom_set(seed: int, num: int, resolution: int, name: str) -> ArraySet:
    return eval_sets.phantoms(seed, num, resolution, name)


@pytest.fixture(scope="module")
def sets():
    return phantom_set(0, 48, 16, "real"), phantom_set(1, 64, 16, "test")


def test_synthetic_equal_to_real_scores_like_real_and_the_report_has_its_schema(sets):
    real, test = sets
    copy = ArraySet(real.x.copy(), real.metas, name="synthetic")
    rep = U.utility(real, copy, test, **RECIPE)
    assert json.loads(json.dumps(rep)) == rep            # JSON-friendly as it is
    assert rep["models"]["real"] == rep["models"]["synthetic"]
    assert set(rep["models"]) == set(U.MODELS)
    assert rep["sets"]["real+synthetic"]["n"] == 2 * len(real)
    assert rep["sets"]["test"] == {"name": "test", "n": len(test)}
    assert rep["findings"] == list(cond.FINDINGS)
    assert rep["recipe"]["steps"] == 4 and rep["recipe"]["resolution"] == 16
    codes = test.findings()
    for m in rep["models"].values():
        assert set(m) == {"auroc", "macro_auroc", "n_scored", "subgroups"}
        assert list(m["auroc"]) == list(cond.FINDINGS)
        scored = []
        for f, (name, row) in enumerate(m["auroc"].items()):
            assert row["n_pos"] == int((codes[:, f] == cond.POSITIVE).sum())
            assert row["n_neg"] == int((codes[:, f] == cond.NEGATIVE).sum())
            if row["n_pos"] and row["n_neg"]:
                lo, hi = row["ci95"]
                assert 0 <= lo <= hi <= 1 and 0 <= row["auroc"] <= 1
                scored.append(row["auroc"])
            else:
                assert row["auroc"] is None and row["ci95"] is None and row["reason"]
        assert m["n_scored"] == len(scored) > 0
        assert m["macro_auroc"] == pytest.approx(np.mean(scored))
        assert set(m["subgroups"]) == set(U.SUBGROUPS)
        for attr, sg in m["subgroups"].items():
            assert sum(g["n"] for g in sg["groups"].values()) == len(test)
            assert sg["min_count"] == 5
            if sg["gap"] is None:
                assert sg["reason"]
            else:
                ok = {g: v["macro_auroc"] for g, v in sg["groups"].items()
                      if v["n"] >= 5 and v["macro_auroc"] is not None}
                assert sg["gap"] == pytest.approx(max(ok.values()) - min(ok.values()))
                assert ok[sg["best"]] - ok[sg["worst"]] == pytest.approx(sg["gap"])
        assert set(m["subgroups"]["sex"]["groups"]) <= {"M", "F"}
        assert set(m["subgroups"]["age"]["groups"]) <= set(cond.AGE_BINS)
        assert m["subgroups"]["sex"]["gap"] is not None


def test_a_finding_absent_from_the_test_set_is_null_with_a_reason(sets):
    real, test = sets
    metas = [dict(m, findings=np.where(np.arange(14) == 2, cond.NEGATIVE, m["findings"]).astype(np.int8))
             for m in test.metas]                              # Cardiomegaly: no positives
    probs = np.random.default_rng(0).uniform(size=(len(test), 14)).astype(np.float32)
    rep = U.score(probs, ArraySet(test.x, metas), n_boot=20, min_group=5)
    row = rep["auroc"]["Cardiomegaly"]
    assert row["auroc"] is None and row["ci95"] is None and "no positive" in row["reason"]


def test_concatenation_resamples_to_the_first_sets_size(sets):
    real, _ = sets
    big = ArraySet(np.kron(real.x[:3], np.ones((2, 2), np.float32)), real.metas[:3])
    both = U.ConcatSet([real, big])
    assert len(both) == len(real) + 3 and both.resolution == 16
    x = both.images([len(real), len(real) + 2])
    assert x.shape == (2, 16, 16)
    # Lanczos (support 6 source pixels here) blurs the collimation edges a little.
    assert np.abs(x[0] - real.x[0]).mean() < 0.03 and abs(x[0].mean() - real.x[0].mean()) < 0.01


def test_empty_sets_are_one_line_errors(sets):
    real, test = sets
    empty = ArraySet(np.zeros((0, 16, 16), np.float32), [], name="gen")
    with pytest.raises(errors.UserError, match="synthetic set 'gen' is empty") as e:
        U.utility(real, empty, test, **RECIPE)
    assert "\n" not in str(e.value)
    with pytest.raises(errors.UserError, match="test set"):
        U.utility(real, real, empty, **RECIPE)
