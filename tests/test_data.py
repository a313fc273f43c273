"""Record schema, dataset writer/stats and the convert CLI."""
import dataclasses
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cxr_rf import cli
from cxr_rf import conditioning as cond
from cxr_rf.data import convert, imaging, schema, sources
from cxr_rf.data.plan import patient_split
from cxr_rf.data.schema import Record
from cxr_rf.data.stats import format_stats
from cxr_rf.data.writer import DatasetWriter

RES = 16


def make_record(i: int, res: int = RES, **overrides) -> Record:
    """A small deterministic record; pixel values encode ``i`` so examples can be identified."""
    rng = np.random.default_rng(i)
    fields = dict(
        image=rng.integers(0, 65536, (res, res)).astype(np.uint16),
        findings=np.asarray([(i + k) % 4 for k in range(14)], np.int8),
        sex=cond.SEXES[i % 3], age=-1.0 if i % 5 == 0 else 20.0 + i, race=cond.RACES[i % 5],
        view=cond.VIEWS[i % 4], source="phantom", site=f"site{i % 2}",
        patient_id=schema.hash_id(f"p{i // 2}", "s"), study_id=schema.hash_id(f"s{i}", "s"),
        report=f"report {i} \u00e9")
    fields.update(overrides)
    return Record(**fields)


def test_no_tensorflow():
    assert "tensorflow" not in sys.modules


# ------------------------------------------------------------------ schema

def test_round_trip_exact():
    rec = make_record(7)
    back = schema.from_bytes(schema.to_bytes(rec))
    assert back["image"].dtype == np.uint16 and np.array_equal(back["image"], rec.image)
    assert back["findings"].dtype == np.int8 and np.array_equal(back["findings"], rec.findings)
    for f in dataclasses.fields(Record):
        if f.name not in ("image", "findings"):
            assert back[f.name] == getattr(rec, f.name), f.name
    again = schema.to_record(back)
    assert np.array_equal(again.image, rec.image) and again.report == rec.report


@pytest.mark.parametrize("field,value,match", [
    ("sex", "male", "Record.sex must be one of unknown, M, F"),
    ("race", "Martian", "Record.race"),
    ("view", "PA ", "Record.view"),
    ("source", "mimic", "Record.source"),
    ("age", 200.0, "Record.age"),
    ("age", float("nan"), "Record.age"),
    ("age", "old", "Record.age"),
    ("findings", np.zeros(13, np.int8), "Record.findings"),
    ("findings", np.full(14, 4, np.int8), "Record.findings codes"),
    ("findings", np.zeros(14, np.float32), "Record.findings"),
    ("image", np.zeros((4, 4), np.uint8), "Record.image"),
    ("image", np.zeros((4, 4, 3), np.uint16), "Record.image"),
    ("patient_id", "", "Record.patient_id"),
    ("report", None, "Record.report"),
])
def test_invalid_record(field, value, match):
    with pytest.raises(ValueError, match=match):
        make_record(1, **{field: value})


def test_hash_id():
    a = schema.hash_id("10000032", "salt")
    assert len(a) == 16 and int(a, 16) >= 0
    assert a == schema.hash_id("10000032", "salt") != schema.hash_id("10000032", "other")
    with pytest.raises(ValueError):
        schema.hash_id("", "salt")


def test_resize_and_decode_8bit():
    img = np.full((30, 20), 1000, np.uint16)
    out = imaging.fit_square(img, 8, "crop")
    assert out.shape == (8, 8) and out.dtype == np.uint16 and np.all(out == 1000)
    from PIL import Image
    import io
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(buf, format="PNG")
    assert np.all(imaging.decode_png(buf.getvalue()) == 65535)


# ------------------------------------------------------------------ writer

@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "cxr"
    recs = {"train": [make_record(i) for i in range(11)],
            "validation": [make_record(100 + i) for i in range(2)]}
    with DatasetWriter(out, resolution=RES, num_shards=3) as w:
        for split, rs in recs.items():
            for r in rs:
                w.add(split, r)
    return out, recs, w.stats


def test_writer_opens_with_tfds(written):
    out, recs, _ = written
    builder = tfds.builder_from_directory(str(out))
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 11, "validation": 2}
    assert builder.info.splits["train"].num_shards == 3
    assert builder.info.splits["validation"].num_shards == 2  # empty third shard dropped
    names = sorted(p.name for p in out.iterdir())
    assert "cxr-train.array_record-00000-of-00003" in names
    assert "cxr-validation.array_record-00001-of-00002" in names
    assert {"dataset_info.json", "features.json", "stats.json"} <= set(names)
    assert not any(p.name.startswith(".cxr.partial") for p in out.parent.iterdir())
    src = builder.as_data_source("train")
    assert len(src) == 11
    got = sorted(schema.from_example(src[i])["study_id"] for i in range(len(src)))
    assert got == sorted(r.study_id for r in recs["train"])
    ex = schema.from_example(src[0])
    orig = next(r for r in recs["train"] if r.study_id == ex["study_id"])
    assert np.array_equal(ex["image"], orig.image) and ex["report"] == orig.report


def test_writer_stats(written):
    out, recs, stats = written
    assert stats == json.loads((out / "stats.json").read_text())
    assert stats["splits"]["train"]["count"] == 11 and stats["total"]["count"] == 13
    allr = recs["train"] + recs["validation"]
    for fi, f in enumerate(cond.FINDINGS):
        for si, s in enumerate(cond.STATES):
            assert stats["total"]["findings"][f][s] == sum(int(r.findings[fi]) == si for r in allr)
    assert stats["total"]["sex"]["M"] == sum(r.sex == "M" for r in allr)
    assert stats["total"]["age"]["unknown"] == sum(r.age < 0 for r in allr)
    assert stats["total"]["site"] == {"site0": 7, "site1": 6}
    assert stats["total"]["source"] == {"phantom": 13}
    table = format_stats(stats)
    assert "Cardiomegaly" in table and "unmentioned" in table and "train" in table


def test_writer_resizes(tmp_path):
    big = make_record(3, res=40)
    wide = make_record(4, image=np.full((24, 48), 7, np.uint16))
    with DatasetWriter(tmp_path / "d", resolution=8, num_shards=1) as w:
        w.add("train", big)
        w.add("train", wide)
    src = tfds.builder_from_directory(str(tmp_path / "d")).as_data_source("train")
    imgs = [schema.from_example(src[i])["image"] for i in range(2)]
    assert all(im.shape == (8, 8) and im.dtype == np.uint16 for im in imgs)
    assert np.all(imgs[1] == 7)


def test_writer_errors(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError):
        DatasetWriter(tmp_path / "full", resolution=8, num_shards=1)
    with pytest.raises(ValueError, match="resolution"):
        DatasetWriter(tmp_path / "a", resolution=0, num_shards=1)
    with pytest.raises(RuntimeError):
        with DatasetWriter(tmp_path / "b", resolution=8, num_shards=1) as w:
            w.add("train", make_record(0))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # partial output removed
    w = DatasetWriter(tmp_path / "c", resolution=8, num_shards=1)
    with pytest.raises(ValueError, match="split name"):
        w.add("Train!", make_record(0))
    w.abort()


def test_patient_split_fractions():
    splits = [patient_split(f"patient{i}") for i in range(4000)]
    assert patient_split("patient1") == splits[1]
    frac = {s: splits.count(s) / len(splits) for s in ("train", "validation", "test")}
    assert abs(frac["train"] - 0.9) < 0.02 and abs(frac["test"] - 0.05) < 0.015


# ------------------------------------------------------------------ CLI

def _cli(capsys, *args):
    code = cli.call(convert, list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--source", "nope", "--num", "4", "--resolution", "16"], "unknown source 'nope'; valid: phantom"),
    (["--source", "phantom", "--num", "4", "--resolution", "20"], "positive multiple of 8"),
    (["--source", "phantom", "--num", "4", "--resolution", "-8"], "positive multiple of 8"),
    (["--source", "phantom", "--num", "0", "--resolution", "16"], "num must be a positive"),
])
def test_cli_bad_args(tmp_path, capsys, args, needle):
    code, err = _cli(capsys, "--output", str(tmp_path / "o"), *args)
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_cli_nonempty_output(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    code, err = _cli(capsys, "--source", "phantom", "--num", "4", "--resolution", "16",
                     "--output", str(tmp_path))
    assert code == 2 and "not empty" in err and err.count("\n") == 1
    code, err = _cli(capsys, "--source", "phantom", "--num", "4", "--resolution", "16",
                     "--output", str(tmp_path), "--overwrite")
    assert code == 2 and "refusing to overwrite" in err and (tmp_path / "keep.txt").exists()


def test_cli_subprocess_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cxr_rf.data.convert", "--source", "bogus",
                        "--output", str(tmp_path / "o"), "--resolution", "16"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: unknown source 'bogus'; valid: "
        + ", ".join(sources.SOURCES)]


def test_phantom_source_with_stand_in(tmp_path, monkeypatch):
    """The phantom adapter (ids hashed, patient-level split) against a stand-in generator."""
    import types
    import cxr_rf.data

    def generate(seed, index, resolution):
        rec = make_record(index + 1000 * seed, res=resolution)
        return types.SimpleNamespace(
            image=rec.image, findings=rec.findings, sex=rec.sex, age=None, race=rec.race,
            view=rec.view, site="s", patient_id=f"pat{index // 3}", study_id=f"st{index}",
            report="")
    def describe(seed, index):  # the metadata of generate(), without pixels
        study = generate(seed, index, 16)
        return {k: getattr(study, k) for k in ("findings", "sex", "age", "race", "view", "site",
                                               "patient_id", "study_id", "report")}
    fake = types.SimpleNamespace(generate=generate, describe=describe)
    monkeypatch.setitem(sys.modules, "cxr_rf.data.phantom", fake)
    monkeypatch.setattr(cxr_rf.data, "phantom", fake, raising=False)
    stats = convert.convert_phantom(tmp_path / "d", num=30, resolution=8, shards=2, salt="x")
    assert stats["total"]["count"] == 30 and stats["total"]["age"]["unknown"] == 30
    builder = tfds.builder_from_directory(str(tmp_path / "d"))
    seen = {}
    for split in builder.info.splits:
        src = builder.as_data_source(split)
        for i in range(len(src)):
            ex = schema.from_example(src[i])
            assert ex["patient_id"] != "pat0" and len(ex["patient_id"]) == 16  # hashed
            seen.setdefault(ex["patient_id"], set()).add(split)
    assert len(seen) == 10 and all(len(v) == 1 for v in seen.values())


@pytest.mark.skipif(importlib.util.find_spec("cxr_rf.data.phantom") is None,
                    reason="cxr_rf.data.phantom not written yet")
def test_cli_phantom(tmp_path, capsys):
    out = tmp_path / "ph"
    assert cli.call(convert, ["--source", "phantom", "--output", str(out), "--num", "40",
                              "--resolution", "16", "--shards", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Pleural Effusion" in printed and "wrote 40 examples" in printed
    builder = tfds.builder_from_directory(str(out))
    assert sum(s.num_examples for s in builder.info.splits.values()) == 40
    patients = {}
    for split in builder.info.splits:
        src = builder.as_data_source(split)
        for i in range(len(src)):
            ex = schema.from_example(src[i])
            assert ex["source"] == "phantom" and ex["image"].shape == (16, 16)
            patients.setdefault(ex["patient_id"], set()).add(split)
    assert all(len(s) == 1 for s in patients.values())  # patient-level split
    stats = convert.convert_phantom(tmp_path / "again", num=40, resolution=16, shards=2)
    assert stats == json.loads((out / "stats.json").read_text())  # deterministic
