"""Image sets of the evaluation (cxr_rf.evaluation.sets): a converted split read back as
stored, a run's samples for a split's metadata written as a folder that resumes after a crash
to the same pixels, and folders that cannot be evaluated refused in one line."""
import json

import numpy as np
import pytest

from cxr_rf import conditioning as cond
from cxr_rf import errors
from cxr_rf.data import pipeline, schema
from cxr_rf.evaluation import sets


def test_reference_set_is_the_stored_split(phantom_data):
    d = phantom_data(16)
    full = sets.ReferenceSet(d, "train")
    src = pipeline.open_source(d, "train")
    assert len(full) == len(src) and full.resolution == 16
    ex = schema.from_example(src[3])
    np.testing.assert_allclose(full.images([3])[0], ex["image"] / 65535.0, rtol=1e-6)
    m = full.metas[3]
    assert m["sex"] == ex["sex"] and m["age"] == ex["age"] and m["patient_id"] == ex["patient_id"]
    np.testing.assert_array_equal(m["findings"], ex["findings"])
    sub = sets.ReferenceSet(d, "train", limit=5, seed=1)
    assert len(sub) == 5 and list(sub.rows) == sorted(sub.rows)
    assert list(sub.rows) == list(sets.ReferenceSet(d, "train", limit=5, seed=1).rows)
    np.testing.assert_array_equal(sub.images([0])[0], full.images([sub.rows[0]])[0])
    seen = np.concatenate([idx for idx, _ in full.batches(7)])
    assert list(seen) == list(range(len(full)))
    half = sets.Subset(full, [4, 2])
    np.testing.assert_array_equal(half.images([1]), full.images([2]))


def test_conditions_round_trip_through_a_manifest():
    f = np.array([cond.POSITIVE, cond.NEGATIVE] + [cond.UNSPECIFIED] * 12, np.int8)
    meta = {"findings": f, "sex": "F", "age": -1.0, "race": None, "view": "PA", "source": None}
    c = sets.conditions_of(meta)
    assert c.age == "unknown" and c.race is None
    back = sets.meta_of_conditions(json.loads(json.dumps(c.describe())))
    np.testing.assert_array_equal(back["findings"], f)
    assert {k: back[k] for k in ("sex", "age", "race", "view", "source")} == \
        {"sex": "F", "age": -1.0, "race": None, "view": "PA", "source": None}


@pytest.fixture(scope="module")
def tiny_sampler(tiny_run):
    """The real Sampler of the shared tiny run (tests/conftest.py; EMA params restored)."""
    from cxr_rf import sample
    cfg, model, params, step = sample.load(tiny_run, batch_size=4)
    return sample.Sampler(cfg, model, batch_size=4), params


def test_generate_writes_a_folder_that_resumes_to_the_same_pixels(tiny_sampler, phantom_data,
                                                                    tmp_path):
    sampler, params = tiny_sampler
    prompts = sets.ReferenceSet(phantom_data(16), "test", limit=3)
    kw = dict(seeds=2, seed=5, settings={"steps": 2}, chunk=4, steps=2)
    whole = sets.generate(sampler, params, prompts, tmp_path / "a", **kw)
    assert len(whole) == 6 and whole.resolution == 16
    assert [m["prompt_row"] for m in whole.metas] == [0, 0, 1, 1, 2, 2]
    assert [m["seed"] for m in whole.metas] == [5, 6, 7, 8, 9, 10]
    np.testing.assert_array_equal(whole.metas[2]["findings"], prompts.metas[1]["findings"])
    assert whole.metas[2]["sex"] == prompts.metas[1]["sex"]
    # A crash after 5 rows, the last half-written: the rerun keeps the first whole chunk (4).
    man = tmp_path / "a" / "manifest.jsonl"
    lines = man.read_text().splitlines()
    man.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    (tmp_path / "a" / "000004.png").write_bytes(b"broken")
    again = sets.generate(sampler, params, prompts, tmp_path / "a", **kw)
    np.testing.assert_array_equal(again.images(range(6)), whole.images(range(6)))
    assert man.read_text().count("\n") == 6
    # One image is the same whatever batch or chunk it was drawn in.
    alone = sets.generate(sampler, params, prompts, tmp_path / "b", **dict(kw, chunk=1))
    np.testing.assert_array_equal(alone.images([3]), whole.images([3]))
    with pytest.raises(errors.UserError, match="other settings"):
        sets.generate(sampler, params, prompts, tmp_path / "a", **dict(kw, seed=6))


def test_bad_folders_are_one_line(tmp_path):
    with pytest.raises(errors.UserError, match="does not exist"):
        sets.FolderSet(tmp_path / "nowhere")
    with pytest.raises(errors.UserError, match="no manifest.jsonl"):
        sets.FolderSet(tmp_path)
    (tmp_path / "manifest.jsonl").write_text("")
    with pytest.raises(errors.UserError, match="lists no images"):
        sets.FolderSet(tmp_path)
    c = sets.conditions_of({"findings": np.full(14, 2), "sex": None, "age": None, "race": None,
                            "view": None, "source": None}).describe()
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"file": "x.png", "conditions": c}))
    with pytest.raises(errors.UserError, match="lists x.png, which is not in the folder"):
        sets.FolderSet(tmp_path)
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"file": "x.png"}))
    with pytest.raises(errors.UserError, match="needs 'file' and 'conditions'"):
        sets.FolderSet(tmp_path)
    with pytest.raises(errors.UserError, match="2 images but 1 metadata rows"):
        sets.ArraySet(np.zeros((2, 4, 4)), [{}])
