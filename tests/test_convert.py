"""The conversion pipeline: privacy, bad input and rejects, resume, workers, reporting, CLI."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from pydicom.data import get_testdata_files

from cxr_rf import cli
from cxr_rf import conditioning as cond
from cxr_rf.data import convert, imaging, schema, sources, worker
from cxr_rf.data.sources import SourceOptions
from dicom_fixtures import write_dicom

RES = 16


def _records(out: Path) -> dict[str, list[dict]]:
    """Every record of a dataset, per split, in stored order (images as PNG bytes)."""
    builder = tfds.builder_from_directory(str(out))
    got = {}
    for split in builder.info.splits:
        src = builder.as_data_source(split)
        got[split] = [schema.from_example(src[i], decode=False) for i in range(len(src))]
    return got


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        len(a[s]) == len(b[s]) and all(
            x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
            for x, y in zip(a[s], b[s])) for s in a)


def _film(seed: int, shape=(40, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, shape).astype(np.uint16)


def _dicom_dir(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_dicom(root / f"img{i:02d}.dcm", _film(i), bits_stored=12, PatientID=f"P{i // 2}",
                    PatientSex="MF"[i % 2], PatientAge=f"{40 + i:03d}Y", ViewPosition="PA")
    return root


def _cli(capsys, *args):
    """The command in this process -> (exit code, stdout, stderr)."""
    code = cli.call(convert, [*args, "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------ privacy

def test_no_identifier_reaches_the_output(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_dicom(raw / "scan.dcm", _film(0, (64, 48)), bits_stored=12, PatientName="Doe^Jane",
                PatientID="SECRET123", InstitutionName="Saint Elsewhere Hospital",
                OtherPatientIDs="ALTID-777", PatientBirthDate="19500101", PatientSex="F",
                PatientAge="071Y", AccessionNumber="ACC-4242")
    out = tmp_path / "out"
    code, printed, _ = _cli(capsys, "--source", "dicom_dir", "--input", raw, "--output", out,
                            "--resolution", RES, "--salt", "s3cret")
    assert code == 0
    secrets = [b"Doe", b"Jane", b"SECRET123", b"Elsewhere", b"ALTID", b"19500101", b"ACC-4242",
               b"s3cret"]
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    for shard in out.glob("cxr-*.array_record-*"):  # and the records, decompressed
        reader = array_record_module.ArrayRecordReader(str(shard))
        blobs += list(reader.read_all())
        reader.close()
    blobs.append(printed.encode())
    for blob in blobs:
        for s in secrets:
            assert s not in blob and s.lower() not in blob.lower(), s
    (rec,) = _records(out)[next(iter(_records(out)))]
    assert rec["patient_id"] == schema.hash_id("SECRET123", "s3cret") != "SECRET123"
    assert rec["sex"] == "F" and rec["age"] == 71.0 and rec["site"] == ""


# ------------------------------------------------------------------ bad input

@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """6 good DICOMs + truncated, non-image, multi-frame and bad-label files; labels CSV."""
    raw = _dicom_dir(tmp_path_factory.mktemp("messy"), 6)
    good = (raw / "img00.dcm").read_bytes()
    (raw / "truncated.dcm").write_bytes(good[: len(good) - 1000])
    (raw / "notes.dcm").write_text("shopping list, not a radiograph\n")
    write_dicom(raw / "cine.dcm", np.stack([_film(9)] * 3), PatientID="P9")
    write_dicom(raw / "badlabel.dcm", _film(10), PatientID="P10")
    (raw / "README").write_text("ignored: no extension and no DICM preamble")
    cond_cols = ",".join(cond.FINDINGS[:3])
    (raw / "labels.csv").write_text(
        f"file,{cond_cols},Sex\nimg00.dcm,1,0,-1,M\nimg01.dcm,,1.0,,F\nbadlabel.dcm,2,,,\n")
    return raw


def test_bad_files_are_rejected_with_reasons(messy, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["--source", "dicom_dir", "--input", messy, "--output", out, "--resolution", RES,
            "--labels", messy / "labels.csv"]
    code, printed, err = _cli(capsys, *args)  # default threshold 1%: 4 of 10 rejected
    assert code == 1 and "4 of 10 inputs rejected" in err and err.count("\n") == 1
    assert "rejected 4 of 10 inputs" in printed and not (out / "dataset_info.json").exists()
    rejects = {Path(r["path"]).name: r["reason"]
               for r in map(json.loads, convert.rejects_log(out).read_text().splitlines())}
    assert set(rejects) == {"truncated.dcm", "notes.dcm", "cine.dcm", "labels.csv:row 4 (image badlabel.dcm)"}
    assert "pixel data could not be decoded" in rejects["truncated.dcm"]
    assert "no pixel data" in rejects["notes.dcm"]
    assert "multi-frame" in rejects["cine.dcm"]
    assert "'No Finding'" in rejects["labels.csv:row 4 (image badlabel.dcm)"]
    assert not any("badlabel" in r for r in rejects.values())  # file names stay in the path
    assert not (out / "rejects.jsonl").exists()  # the log lives beside OUT, not in it
    work = {p.name: p.stat().st_mtime_ns for p in (out / ".work").glob("*.array_record")}
    code, printed, _ = _cli(capsys, *args, "--max_reject_fraction", "0.5")
    assert code == 0 and "wrote 6 examples" in printed
    assert sorted(p.stat().st_mtime_ns for p in out.glob("cxr-*")) == sorted(work.values())
    recs = [r for rs in _records(out).values() for r in rs]
    by_sex = {(r["sex"], tuple(r["findings"][:3])) for r in recs}
    assert ("M", (cond.POSITIVE, cond.NEGATIVE, cond.UNCERTAIN)) in by_sex  # CSV overrides header
    assert ("F", (cond.UNMENTIONED, cond.POSITIVE, cond.UNMENTIONED)) in by_sex
    assert sum(r["findings"].any() for r in recs) == 2  # rows without labels: all unmentioned
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rejects"]["count"] == 4 and stats["total"]["count"] == 6
    assert (out / "stats.txt").read_text().startswith("split")


@pytest.mark.parametrize("setup,needle", [
    ("missing", "input directory"),
    ("empty", "no DICOM files"),
    ("no_csv", "missing required file"),
    ("bad_csv", "needs a key column"),
])
def test_unusable_input_is_a_one_line_error(tmp_path, capsys, setup, needle):
    raw = tmp_path / "raw"
    extra = []
    if setup != "missing":
        raw.mkdir()
    if setup in ("no_csv", "bad_csv"):
        _dicom_dir(raw, 1)
        extra = ["--labels", raw / "labels.csv"]
    if setup == "bad_csv":
        (raw / "labels.csv").write_text("Image,Cardiomegaly\nimg00.dcm,1\n")
    code, _, err = _cli(capsys, "--source", "dicom_dir", "--input", raw, "--output",
                        tmp_path / "o", "--resolution", RES, *extra)
    assert code == 2 and needle in err and err.count("\n") == 1, err
    if setup == "no_csv":
        assert "labels.csv" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ resume and workers

def test_interrupted_conversion_resumes_exactly(tmp_path, monkeypatch):
    opts = SourceOptions(num=30, resolution=RES, seed=5)
    kw = dict(shards=3)
    convert.convert("phantom", tmp_path / "ref", opts, **kw)

    finished = []

    def crash_after_two(name):
        finished.append(name)
        if len(finished) == 2:
            raise KeyboardInterrupt  # as if killed
    monkeypatch.setattr(convert, "_unit_done", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        convert.convert("phantom", tmp_path / "run", opts, **kw)
    work = tmp_path / "run" / ".work"
    assert not (tmp_path / "run" / "dataset_info.json").exists()
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in work.glob("*.array_record")}
    assert sorted(done) == ["train-00000.array_record", "train-00001.array_record"]
    converted = sum(json.loads((work / f"train-0000{i}.json").read_text())["records"] for i in (0, 1))

    monkeypatch.setattr(convert, "_unit_done", lambda name: None)
    calls = []
    real = worker.process
    monkeypatch.setattr(worker, "process", lambda cfg, item: calls.append(item) or real(cfg, item))
    stats = convert.convert("phantom", tmp_path / "run", opts, **kw)
    assert 0 < converted and len(calls) == 30 - converted  # finished shards were not redone
    ref, got = _records(tmp_path / "ref"), _records(tmp_path / "run")
    assert _same(ref, got) and stats == json.loads((tmp_path / "ref" / "stats.json").read_text())
    ids = [r["study_id"] for rs in got.values() for r in rs]
    assert len(ids) == len(set(ids)) == 30  # no duplicates
    for shard in ("train.array_record-00000-of-00003", "train.array_record-00001-of-00003"):
        st = (tmp_path / "run" / f"cxr-{shard}").stat()
        assert (st.st_ino, st.st_mtime_ns) in done.values()  # kept, not rewritten
    assert not work.exists()
    for f in ("stats.json", "stats.txt", "dataset_info.json", "cxr-train.array_record-00002-of-00003"):
        assert (tmp_path / "run" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
    assert convert.rejects_log(tmp_path / "run").read_bytes() == convert.rejects_log(tmp_path / "ref").read_bytes()


def test_shard_ranges_in_two_processes_then_publish_equal_one_process(tmp_path, capsys):
    """Two processes convert disjoint shard ranges of one plan into one OUT; --publish then
    gives exactly the files of a single-process conversion (rejects log included)."""
    raw = _dicom_dir(tmp_path / "raw", 12)
    (raw / "notes.dcm").write_text("not a radiograph")  # a reject, reported once
    args = ["--source", "dicom_dir", "--input", str(raw), "--resolution", str(RES), "--shards", "2",
            "--max_reject_fraction", "0.5", "--no-progress"]
    assert _cli(capsys, *args[:-1], "--output", tmp_path / "ref")[0] == 0
    out = tmp_path / "run"
    n = len(list((tmp_path / "ref").glob("cxr-*.array_record-*")))
    assert n >= 3
    procs = [subprocess.Popen([sys.executable, "-m", "cxr_rf.data.convert", *args, "--output", str(out),
                               "--shard_range", r], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in ("0:2", f"2:{n + 5}")]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), results
    assert any("0 shards still to do; run with --publish" in o for o, _, _ in results), results
    assert not (out / "dataset_info.json").exists() and not convert.rejects_log(out).exists()
    code, _, err = _cli(capsys, *args[:-1], "--output", out, "--shard_range", "0:1", "--overwrite")
    assert code == 2 and "--overwrite cannot be combined" in err
    code, printed, _ = _cli(capsys, *args[:-1], "--output", out, "--publish")
    assert code == 0 and "wrote 12 examples" in printed
    files = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert files == sorted(p.name for p in out.iterdir())
    for f in files:
        assert (out / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
    assert convert.rejects_log(out).read_bytes() == convert.rejects_log(tmp_path / "ref").read_bytes()


def test_publish_needs_every_shard(tmp_path, capsys):
    raw = _dicom_dir(tmp_path / "raw", 6)
    args = ["--source", "dicom_dir", "--input", raw, "--resolution", RES, "--shards", "2",
            "--output", tmp_path / "o"]
    code, _, err = _cli(capsys, *args, "--publish")
    assert code == 2 and "nothing to publish" in err and err.count("\n") == 1
    assert _cli(capsys, *args, "--shard_range", "0:1")[0] == 0
    code, _, err = _cli(capsys, *args, "--publish")
    assert code == 1 and "shards are not converted yet" in err and err.count("\n") == 1
    for bad in ("2", "3:1", "a:b"):
        code, _, err = _cli(capsys, *args, "--shard_range", bad)
        assert code == 2 and "shard_range" in err, bad
    code, _, err = _cli(capsys, *args, "--shard_range", "99:100")
    assert code == 2 and "starts past the plan" in err
    assert _cli(capsys, *args, "--shard_range", "1:99")[0] == 0
    code, printed, _ = _cli(capsys, *args, "--publish")
    assert code == 0 and "wrote 6 examples" in printed


def test_resume_refuses_other_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "_unit_done", lambda name: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        convert.convert("phantom", tmp_path / "o", SourceOptions(num=8, resolution=RES), shards=2)
    monkeypatch.setattr(convert, "_unit_done", lambda name: None)
    with pytest.raises(convert.UsageError, match="unfinished conversion of other input"):
        convert.convert("phantom", tmp_path / "o", SourceOptions(num=8, resolution=RES, seed=1), shards=2)
    stats = convert.convert("phantom", tmp_path / "o", SourceOptions(num=8, resolution=RES, seed=1),
                            shards=2, overwrite=True)
    assert stats["total"]["count"] == 8


def test_pydicom_files_through_dicom_dir_with_two_workers(tmp_path):
    """Every real test DICOM is converted or rejected with a reason; 2 workers == 1 worker."""
    raw = tmp_path / "raw"
    root = Path(get_testdata_files("CT_small.dcm")[0]).parent
    candidates = 0
    for f in map(Path, get_testdata_files()):
        if f.is_file() and (f.suffix.lower() == ".dcm" or (not f.suffix and imaging.is_dicom(f))):
            dst = raw / f.relative_to(root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst)
            candidates += "DICOMDIR" not in f.name
    kw = dict(max_reject_fraction=1.0, shard_size=20)
    s1 = convert.convert("dicom_dir", tmp_path / "w1", SourceOptions(input_dir=str(raw), resolution=RES), **kw)
    s2 = convert.convert("dicom_dir", tmp_path / "w2", SourceOptions(input_dir=str(raw), resolution=RES),
                         workers=2, **kw)
    assert s1 == s2 and _same(_records(tmp_path / "w1"), _records(tmp_path / "w2"))
    rejects = [json.loads(line) for line in convert.rejects_log(tmp_path / "w1").read_text().splitlines()]
    assert all(r["reason"] and "internal error" not in r["reason"] for r in rejects)
    assert s1["total"]["count"] >= 40 and s1["total"]["count"] + len(rejects) == candidates
    assert any(r["reason"].startswith("no decoder for transfer syntax") for r in rejects)
    for rs in _records(tmp_path / "w1").values():
        for r in rs:
            assert imaging.decode_png(r["image_png"]).shape == (RES, RES)


# ------------------------------------------------------------------ CLI and sources registry

def test_cli_help_lists_every_source():
    r = subprocess.run([sys.executable, "-m", "cxr_rf.data.convert", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    help_text = " ".join(r.stdout.split())
    for name in sources.SOURCES:
        assert name in help_text, name
    for flag in ("--workers", "--max_reject_fraction", "--fit", "--labels", "--input"):
        assert flag in help_text
    assert set(sources.SOURCES) - {"unknown"} == set(cond.SOURCES) - {"unknown"}


def test_source_helpers(tmp_path):
    import gzip
    with gzip.open(tmp_path / "t.csv.gz", "wt") as f:
        f.write("\ufeffa,b\n1,2\n")
    rows = sources.read_csv(tmp_path / "t.csv")  # finds the .gz, strips the BOM
    assert rows == [{"a": "1", "b": "2"}]
    sources.require_columns(rows, ["a"], "t.csv")
    with pytest.raises(sources.SourceError, match="t.csv lacks required column.*: c"):
        sources.require_columns(rows, ["a", "c"], "t.csv")
    with pytest.raises(sources.SourceError, match="missing required file .*nope.csv"):
        sources.read_csv(tmp_path / "nope.csv")
    assert [sources.chexpert_state(v) for v in ("1.0", "0", "-1", "")] == [
        cond.POSITIVE, cond.NEGATIVE, cond.UNCERTAIN, cond.UNMENTIONED]
    with pytest.raises(ValueError):
        sources.chexpert_state("2")


def test_num_limits_a_real_source_and_the_table_reports_it(tmp_path, capsys):
    raw = _dicom_dir(tmp_path / "raw", 6)
    code, printed, _ = _cli(capsys, "--source", "dicom_dir", "--input", raw, "--output",
                            tmp_path / "o", "--resolution", RES, "--num", 3, "--fit", "crop")
    assert code == 0 and "wrote 3 examples" in printed
    lines = printed.splitlines()
    assert lines[0].split() == ["split", "examples", "dicom_dir"]  # per split x per source
    assert "total 3 3" in [" ".join(line.split()) for line in lines]
    assert "rejected 0 of 3 inputs" in printed and convert.rejects_log(tmp_path / "o").read_text() == ""
    recs = [r for rs in _records(tmp_path / "o").values() for r in rs]
    assert sorted(r["age"] for r in recs) == [40.0, 41.0, 42.0]  # the first 3 files, header ages
    assert all(r["view"] == "PA" and r["source"] == "dicom_dir" for r in recs)


def test_dicom_meta_fills_unknown_fields_from_the_header(tmp_path):
    path = write_dicom(tmp_path / "v.dcm", _film(3), bits_stored=12, PatientSex="F",
                       PatientAge="006M", ViewPosition="LL")
    item = sources.Item(path=path, split=None, findings=np.zeros(14, np.int8), sex="M",
                        source="vindr_cxr", patient_id="p", dicom_meta=True)
    rec = worker.to_record(worker.WorkerConfig("vindr_cxr", "salt", RES), item)
    assert (rec.sex, rec.age, rec.view) == ("M", 0.5, "LATERAL")  # known sex kept
    assert rec.image.shape == (RES, RES) and rec.study_id == ""
    bad = worker.process(worker.WorkerConfig("vindr_cxr", "salt", RES),
                         sources.Item(path=path, split=None, findings=np.full(14, 7, np.int8),
                                      source="vindr_cxr", patient_id="p"))
    assert isinstance(bad, sources.Reject) and bad.reason.startswith("invalid metadata: Record.findings")
