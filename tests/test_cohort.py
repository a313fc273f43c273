"""Synthetic cohorts (cxr_rf.cohort): spec errors in one line, the sampled conditions
(prevalences, ages, seeds, matched pairs), a tiny cohort from a tiny run read back by the Grain
pipeline and ReferenceSet, kill-and-resume byte-identical to an uninterrupted run, and the
stress report's structure."""
import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest

from cxr_rf import cli, cohort, conditioning as cond, errors

ROOT = Path(__file__).resolve().parents[1]
CARDIO = cond.FINDINGS.index("Cardiomegaly")


# ----------------------------------------------------------------------------- the spec

@pytest.mark.parametrize("spec, match", [
    ({"n": 0}, "n must be a positive integer"),
    ({"n": -3}, "n must be a positive integer"),
    ({"n": 2.5}, "n must be a positive integer"),
    ({"n": 4, "colour": "x"}, "unknown key 'colour'"),
    ({"n": 4, "findings": {"Cardiomegally": 0.3}}, "unknown finding 'Cardiomegally'"),
    ({"n": 4, "findings": {"Cardiomegaly": 1.5}}, r"prevalence must be in \[0, 1\]"),
    ({"n": 4, "findings": {"Cardiomegaly": -0.1}}, r"prevalence must be in \[0, 1\]"),
    ({"n": 4, "sex": {"M": 0.5, "X": 0.5}}, "sex: unknown value 'X'"),
    ({"n": 4, "sex": {"M": 0.5, "F": 0.4}}, "sum to 1"),
    ({"n": 4, "view": "SIDE"}, "view: unknown value 'SIDE'"),
    ({"n": 4, "source": "synthetic"}, "source: unknown value 'synthetic'"),
    ({"n": 4, "age": {"normal": [60, -1]}}, "standard deviation must be > 0"),
    ({"n": 4, "age": {"normal": [60, 10], "clip": [90, 20]}}, "lo < hi"),
    ({"n": 4, "age": {"uniform": [10]}}, "two numbers"),
    ({"n": 4, "age": {"gamma": [1, 2]}}, "age must be"),
    ({"n": 4, "age": 200}, "age must be a number of years"),
    ({"n": 4, "unlisted": "positive"}, "unlisted must be one of"),
    ({"n": 4, "split": "Train!"}, "split must match"),
    ({"n": 4, "pairs": {"vary": "height", "values": [1, 2]}}, "unknown attribute 'height'"),
    ({"n": 4, "pairs": {"vary": "sex", "values": ["M"]}}, "at least 2"),
    ({"n": 4, "pairs": {"vary": "sex", "values": ["M", "Q"]}}, "unknown sex 'Q'"),
    ({"n": 4, "pairs": {"vary": "Edema", "values": ["positive", "maybe"]}}, "finding states"),
    ({"n": 5, "pairs": {"vary": "sex", "values": ["M", "F"]}}, "multiple of the 2"),
    ({"n": 4, "sex": "M", "pairs": {"vary": "sex", "values": ["M", "F"]}}, "also has a distribution"),
    ({"n": 4, "sampling": {"steps": 0}}, "sampling.steps"),
    ({"n": 4, "sampling": {"sampler": "x"}}, "sampling must be"),
])
def test_spec_errors_are_one_line(spec, match):
    with pytest.raises(cohort.SpecError, match=match) as e:
        cohort.check_spec(spec)
    assert "\n" not in str(e.value) and isinstance(e.value, errors.UserError)


def test_spec_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{n: 3")
    with pytest.raises(cohort.SpecError, match="not valid JSON"):
        cohort.load_spec(bad)
    with pytest.raises(cohort.SpecError, match="does not exist"):
        cohort.load_spec(tmp_path / "missing.json")
    examples = sorted(glob.glob(str(ROOT / "experiments" / "cohorts" / "*.json")))
    assert examples
    for path in examples:
        spec = cohort.load_spec(path)
        k = len(spec.get("pairs", {}).get("values", [1]))
        assert len(cohort.sample_conditions(dict(spec, n=2 * k))) == 2 * k


# ----------------------------------------------------------------------------- conditions

def test_prevalences_and_ages_follow_the_spec():
    spec = {"n": 20000, "seed": 3, "findings": {"Cardiomegaly": 0.3, "Edema": 0.05},
            "age": {"normal": [60, 15], "clip": [18, 95]}, "sex": {"M": 0.7, "F": 0.3},
            "view": "PA", "unlisted": "negative"}
    members = cohort.sample_conditions(spec)
    f = np.array([m.conditions.findings for m in members])
    assert abs((f[:, CARDIO] == cond.POSITIVE).mean() - 0.3) < 0.015
    assert abs((f[:, cond.FINDINGS.index("Edema")] == cond.POSITIVE).mean() - 0.05) < 0.008
    others = [i for i, n in enumerate(cond.FINDINGS)
              if n not in ("Cardiomegaly", "Edema", "No Finding")]
    assert (f[:, others] == cond.NEGATIVE).all()
    # No Finding is derived: positive exactly when nothing else is.
    nothing = ~(f[:, 1:] == cond.POSITIVE).any(1)
    assert ((f[:, 0] == cond.POSITIVE) == nothing).all()
    ages = np.array([m.conditions.age for m in members])
    assert ages.min() >= 18 and ages.max() <= 95
    assert abs(ages.mean() - 60) < 0.5 and abs(ages.std() - 15) < 0.6
    assert np.allclose(ages, np.round(ages, 1))
    assert abs(np.mean([m.conditions.sex == "M" for m in members]) - 0.7) < 0.015
    assert {m.conditions.view for m in members} == {"PA"}
    assert {m.conditions.race for m in members} == {None}        # not specified
    u = cohort.sample_conditions({"n": 4000, "age": {"uniform": [40, 50]}, "seed": 1})
    a = np.array([m.conditions.age for m in u])
    assert a.min() >= 40 and a.max() <= 50 and abs(a.mean() - 45) < 0.3
    # Unlisted findings at the run's training defaults.
    unm = cohort.sample_conditions({"n": 3}, {n: cond.UNMENTIONED for n in cond.FINDINGS})
    assert all(s == cond.UNMENTIONED for s in unm[0].conditions.findings[1:])


def test_conditions_are_seeded_and_prefix_stable():
    spec = {"n": 40, "seed": 7, "findings": {"Cardiomegaly": 0.5},
            "age": {"normal": [50, 10]}, "sex": {"M": 0.5, "F": 0.5}}
    a, b = cohort.sample_conditions(spec), cohort.sample_conditions(spec)
    assert a == b
    assert cohort.sample_conditions(dict(spec, n=10)) == a[:10]
    c = cohort.sample_conditions(dict(spec, seed=8))
    assert [m.conditions for m in c] != [m.conditions for m in a]
    assert len({m.seed for m in a}) == 40 and all(0 <= m.seed < 2**32 for m in a)


@pytest.mark.parametrize("vary, values", [("sex", ["M", "F"]), ("age", [40, 75]),
                                          ("view", ["PA", "AP", "LATERAL"]),
                                          ("Cardiomegaly", ["positive", "negative"])])
def test_matched_sets_differ_only_in_the_varied_attribute(vary, values):
    spec = {"n": 30 * len(values), "seed": 2, "findings": {"Edema": 0.4, "Atelectasis": 0.3},
            "age": {"uniform": [20, 90]}, "sex": {"M": 0.5, "F": 0.5},
            "view": {"PA": 0.6, "AP": 0.4}, "race": {"White": 0.5, "Asian": 0.5},
            "pairs": {"vary": vary, "values": values}}
    spec.pop(vary, None)
    members = cohort.sample_conditions(spec)
    k = len(values)
    assert len(members) == spec["n"]
    for g in range(spec["n"] // k):
        group = members[g * k:(g + 1) * k]
        assert [m.pair for m in group] == [g] * k and [m.index for m in group] == list(
            range(g * k, (g + 1) * k))
        assert [m.arm for m in group] == values
        assert len({m.seed for m in group}) == 1
        descs = [m.conditions.describe() for m in group]
        for j, d in enumerate(descs):
            if vary in cond.FINDINGS:
                assert d["findings"][vary] == values[j]
                # Everything else equal, but the derived No Finding.
                for other in (x for x in cond.FINDINGS if x not in (vary, "No Finding")):
                    assert d["findings"][other] == descs[0]["findings"][other]
                assert {k2: v for k2, v in d.items() if k2 != "findings"} == {
                    k2: v for k2, v in descs[0].items() if k2 != "findings"}
            else:
                assert d[vary] == values[j]
                assert {k2: v for k2, v in d.items() if k2 != vary} == {
                    k2: v for k2, v in descs[0].items() if k2 != vary}
    assert len({m.seed for m in members}) == spec["n"] // k


def test_stress_spec_defaults():
    marg = {"findings": {f: {"positive": 0.2 if f == "Cardiomegaly" else 0.0, "negative": 0.8}
                         for f in cond.FINDINGS}}
    s = cohort.stress_spec("sex", None, 201, 3, marg)
    assert s["pairs"] == {"vary": "sex", "values": ["M", "F"]} and s["n"] == 200
    assert "sex" not in s and s["findings"] == {"Cardiomegaly": 0.2}
    s = cohort.stress_spec("Cardiomegaly", None, 10, 0, marg)
    assert s["pairs"]["values"] == ["positive", "negative"] and s["findings"] == {}
    assert cohort.stress_spec("age", [30, 50, 70], 10, 0, None)["n"] == 9
    with pytest.raises(cohort.SpecError, match="unknown attribute"):
        cohort.stress_spec("height", [1, 2], 10, 0, None)


# ----------------------------------------------------------------------------- tiny cohort

SPEC = {"name": "tiny", "n": 16, "seed": 2, "findings": {"Cardiomegaly": 0.5},
        "age": {"normal": [60, 15], "clip": [18, 95]}, "view": {"PA": 0.5, "AP": 0.5},
        "pairs": {"vary": "sex", "values": ["M", "F"]}, "sampling": {"steps": 2}}


@pytest.fixture(scope="module")
def tiny_cohort(tiny_run, tmp_path_factory):
    """A matched cohort of the shared tiny run (tests/conftest.py)."""
    out = tmp_path_factory.mktemp("cohorts") / "full"
    stats = cohort.generate(tiny_run, SPEC, out, shards=2, batch_size=8)
    return out, stats


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cohort_is_a_dataset_with_the_requested_records(tiny_run, tiny_cohort):
    from cxr_rf.data import pipeline, schema
    from cxr_rf.evaluation.sets import ReferenceSet
    out, stats = tiny_cohort
    names = sorted(os.listdir(out))
    assert names == sorted(["cxr-train.array_record-00000-of-00002",
                            "cxr-train.array_record-00001-of-00002", "dataset_info.json",
                            "features.json", "metadata.json", "manifest.jsonl", "stats.json",
                            "stats.txt"])
    rows = cohort.read_manifest(out)
    assert [r["index"] for r in rows] == list(range(16))
    assert [r["arm"] for r in rows] == ["M", "F"] * 8 and [r["pair"] for r in rows] == [
        i // 2 for i in range(16)]
    assert stats["total"]["count"] == 16 and list(stats["splits"]) == ["train"]
    syn = stats["synthetic"]
    assert syn["checkpoint_step"] == 2 and syn["spec"]["n"] == 16 and syn["steps"] == 2
    source = pipeline.open_source(str(out), "train")
    assert len(source) == 16
    recs = [schema.from_example(source[i]) for i in range(16)]
    for r, row in zip(recs, rows):
        want = row["conditions"]
        assert r["image"].shape == (16, 16) and r["image"].dtype == np.uint16
        assert [cond.STATES[s] for s in r["findings"]] == [want["findings"][f] for f in cond.FINDINGS]
        assert r["sex"] == want["sex"] == row["arm"] and r["view"] == want["view"]
        assert r["age"] == pytest.approx(want["age"], abs=1e-4)
        assert r["race"] == "unknown" and want["race"] is None
        assert r["site"] == f"synthetic:{Path(tiny_run).name}@2"
        assert r["patient_id"] == row["patient_id"] and r["study_id"] == row["study_id"]
        assert r["patient_id"].startswith("syn-")
    # Pairs: same patient, same seed, same everything but sex.
    for a, b in zip(recs[::2], recs[1::2]):
        assert a["patient_id"] == b["patient_id"] and (a["sex"], b["sex"]) == ("M", "F")
        np.testing.assert_array_equal(a["findings"], b["findings"])
        assert a["age"] == b["age"] and a["view"] == b["view"]
    assert any(r["findings"][CARDIO] == cond.POSITIVE for r in recs)
    assert any(r["findings"][CARDIO] == cond.NEGATIVE for r in recs)
    # Grain pipeline and ReferenceSet.
    it = iter(pipeline.make_loader(str(out), "train", global_batch=8, seed=0, resolution=16,
                                   shuffle=False, num_epochs=1, process_index=0,
                                   process_count=1))
    batch = next(it)
    assert batch["image"].shape == (8, 16, 16, 1) and batch["tokens"].shape[0] == 8
    np.testing.assert_array_equal(batch["findings"], np.stack([r["findings"] for r in recs[:8]]))
    ref = ReferenceSet(out, "train")
    assert len(ref) == 16 and ref.resolution == 16
    np.testing.assert_array_equal(ref.findings(), np.stack([r["findings"] for r in recs]))
    assert ref.images([0]).shape == (1, 16, 16)


def test_kill_and_resume_equals_an_uninterrupted_run(tiny_run, tiny_cohort, tmp_path,
                                                     monkeypatch):
    full, stats = tiny_cohort
    out = tmp_path / "resumed"

    class Killed(Exception):
        pass

    def kill(name):
        raise Killed(name)
    monkeypatch.setattr(cohort, "_hook_shard_done", kill)
    with pytest.raises(Killed):
        cohort.generate(tiny_run, SPEC, out, shards=2, batch_size=8)
    assert sorted(os.listdir(out / cohort.WORK)) == ["plan.json", "shard00000.array_record",
                                                     "shard00000.json"]
    assert not (out / "dataset_info.json").exists()
    done = []
    monkeypatch.setattr(cohort, "_hook_shard_done", done.append)
    cohort.generate(tiny_run, SPEC, out, shards=2, batch_size=8)
    assert done == ["shard00001"]                                      # only the rest
    a, b = _files(full), _files(out)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    # Done: a rerun does nothing; another spec (or run settings) is refused.
    done.clear()
    cohort.generate(tiny_run, SPEC, out, shards=2, batch_size=8)
    assert done == []
    with pytest.raises(errors.UserError, match="another spec"):
        cohort.generate(tiny_run, dict(SPEC, seed=6), out, shards=2)
    with pytest.raises(errors.UserError, match="another spec"):
        cohort.generate(tiny_run, SPEC, out, shards=2, steps=3)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(errors.UserError, match="holds no cohort"):
        cohort.generate(tiny_run, SPEC, tmp_path / "other", shards=2)


def test_stress_report(tiny_cohort, tmp_path):
    from cxr_rf.evaluation import sets
    from cxr_rf.features import classifier
    out, _ = tiny_cohort
    train = sets.phantoms(0, 16, 16)
    clf = classifier.train(train, out_dir=tmp_path / "clf", steps=2, batch_size=8,
                           widths=(8, 16), groups=4, progress=False)
    r = cohort.stress(out, clf, n_boot=20)
    assert r["attribute"] == "sex" and r["values"] == ["M", "F"]
    assert r["groups"] == 8 and r["n"] == 16 and r["bootstrap"] == 20
    assert set(r["findings"]) == set(cond.FINDINGS)
    e = r["findings"]["Cardiomegaly"]
    assert set(e) == {"arms", "gaps", "shift"}
    assert set(e["arms"]) == {"M", "F"} and set(e["gaps"]) == set(e["shift"]) == {"F-M"}
    for arm in e["arms"].values():
        assert set(arm) == {"auroc", "ci95", "n_pos", "n_neg"}
        assert arm["n_pos"] + arm["n_neg"] == 8 and arm["n_pos"] > 0 and arm["n_neg"] > 0
        assert 0 <= arm["auroc"] <= 1 and len(arm["ci95"]) == 2
    assert set(e["gaps"]["F-M"]) == {"gap", "ci95"} and -1 <= e["gaps"]["F-M"]["gap"] <= 1
    assert set(e["shift"]["F-M"]) == {"mean", "ci95"}
    # A finding with one class only: null AUROC, still the same keys.
    assert r["findings"]["Edema"]["arms"]["M"]["auroc"] is None
    json.dumps(r, allow_nan=False)
    # The command: JSON + markdown; a cohort without pairs is refused in one line.
    rep = tmp_path / "rep"
    assert cli.call(cohort, ["stress", f"--cohort={out}", f"--classifier={tmp_path / 'clf'}",
                             f"--out={rep}", "--bootstrap=5"]) == 0
    assert json.loads((rep / "stress.json").read_text())["groups"] == 8
    md = (rep / "stress.md").read_text()
    assert "| Cardiomegaly |" in md and "gap F-M" in md


def test_cli_errors_are_one_line(tiny_run, tmp_path, capsys):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"n": 4, "findings": {"Nope": 0.1}}))
    code = cli.call(cohort, [f"--workdir={tiny_run}", f"--spec={spec}", f"--out={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: cohort spec: unknown finding 'Nope'; valid: "
                                 + ", ".join(cond.FINDINGS)]
    # A cohort without pairs through the command: the table printed, split named in the spec.
    spec.write_text(json.dumps({"n": 3, "split": "test", "sex": "F", "age": 50,
                                "findings": {"Pleural Effusion": 1.0}, "sampling": {"steps": 2}}))
    out = tmp_path / "plain"
    assert cli.call(cohort, [f"--workdir={tiny_run}", f"--spec={spec}", f"--out={out}",
                             "--batch_size=8", "--noprogress"]) == 0
    assert "wrote a cohort of 3 images (split 'test')" in capsys.readouterr().out
    from cxr_rf.evaluation.sets import ReferenceSet
    ref = ReferenceSet(out, "test")
    assert [m["sex"] for m in ref.metas] == ["F"] * 3 and [m["age"] for m in ref.metas] == [50.0] * 3
    assert (ref.findings()[:, cond.FINDINGS.index("Pleural Effusion")] == cond.POSITIVE).all()
    assert [r["arm"] for r in cohort.read_manifest(out)] == [None] * 3
    with pytest.raises(errors.UserError, match="not a matched cohort"):
        cohort.stress(out, None)
    assert cli.call(cohort, ["stress", f"--cohort={out}", f"--classifier={out}",
                             f"--out={tmp_path / 'r'}"]) == 2          # not a classifier
    assert cli.call(cohort, ["bogus", f"--out={tmp_path}"]) == 2
    assert cli.call(cohort, [f"--spec={spec}", f"--out={tmp_path / 'o'}"]) == 2
    assert not (tmp_path / "o").exists()
