"""Dataset inspector: counts vs stats.json, contact sheets, histograms, pixel-defect flags, CLI."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cxr_rf import conditioning as cond
from cxr_rf import errors
from cxr_rf.data import inspect as ins
from cxr_rf.data.schema import Record
from cxr_rf.data.writer import DatasetWriter

RES = 32
# source -> the defect its pixels get (every source holds otherwise the same kind of image)
DEFECTS = {
    "chexpert": lambda v: v,                                   # normal
    "nih_cxr14": lambda v: v * 0.12,                           # dark
    "padchest": lambda v: 1.0 - v,                             # inverted (MONOCHROME1 kept)
    "vindr_cxr": lambda v: np.clip((v - 0.3) / 0.4, 0.0, 1.0),  # clipped window
    "brax": lambda v: (v * 1.5) % 1.0,                         # wrapped past the top
}
EXPECTED_FLAGS = {"chexpert": [], "nih_cxr14": ["dark"], "padchest": ["bright", "inverted"],
                  "vindr_cxr": ["clipped"], "brax": ["wrapped"]}
PER_SOURCE = {"train": 9, "validation": 3}


def chest_like(i: int) -> np.ndarray:
    """A bright thorax blob on a dark background, in [0, 1]: what the flags call normal."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[-1:1:RES * 1j, -1:1:RES * 1j]
    cx, cy = rng.uniform(-0.1, 0.1, 2)
    body = np.exp(-(((x - cx) / 0.6) ** 2 + ((y - cy) / 0.7) ** 2))
    return np.clip(0.08 + 0.8 * body + rng.normal(0, 0.02, (RES, RES)), 0.0, 1.0)


def make_record(source: str, i: int) -> Record:
    v = DEFECTS[source](chest_like(i))
    findings = np.full(14, cond.NEGATIVE, np.int8)
    findings[i % 14] = cond.POSITIVE
    findings[(i + 3) % 14] = cond.UNCERTAIN
    findings[(i + 5) % 14] = cond.UNMENTIONED
    return Record(image=np.round(v * 65535).astype(np.uint16), findings=findings,
                  sex=cond.SEXES[i % 3], age=-1.0 if i % 4 == 0 else 20.0 + 3 * (i % 25),
                  race=cond.RACES[i % 5], view=cond.VIEWS[1 + i % 2], source=source,
                  site=f"{source}_site{i % 2}", patient_id=f"{source}-p{i}", study_id=f"s{i}")


def records():
    """{split: [Record]}: every source in every split."""
    out = {}
    for split, n in PER_SOURCE.items():
        base = 0 if split == "train" else 1000
        out[split] = [make_record(s, base + i) for s in DEFECTS for i in range(n)]
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "ds"
    recs = records()
    with DatasetWriter(out, resolution=RES, num_shards=2) as w:
        for split, rs in recs.items():
            for r in rs:
                w.add(split, r)
    return str(out), recs


@pytest.fixture(scope="module")
def report(dataset):
    data_dir, _ = dataset
    return ins.inspect_dataset(data_dir, per_source=6, sample=64, seed=3)


def test_counts_match_records(dataset, report):
    _, recs = dataset
    everything = [r for rs in recs.values() for r in rs]
    assert report["total"]["count"] == len(everything)
    for split, rs in recs.items():
        c = report["splits"][split]
        assert c["count"] == len(rs)
        assert c["source"] == {s: PER_SOURCE[split] for s in DEFECTS}
    for s in DEFECTS:
        b = report["by_source"][s]
        mine = [r for r in everything if r.source == s]
        assert b["count"] == len(mine) and b["splits"] == PER_SOURCE
        assert b["sites"] == {f"{s}_site{k}": sum(r.site == f"{s}_site{k}" for r in mine)
                              for k in (0, 1)}
        known = [r.age for r in mine if r.age >= 0]
        assert b["age"]["known"] == len(known) and b["age"]["unknown"] == len(mine) - len(known)
        assert b["age"]["min"] == pytest.approx(min(known))
        assert b["age"]["max"] == pytest.approx(max(known))
        assert b["age"]["median"] == pytest.approx(float(np.median(known)))
    for fi, f in enumerate(cond.FINDINGS):
        for si, st in enumerate(cond.STATES):
            assert report["total"]["findings"][f][st] == sum(int(r.findings[fi]) == si
                                                             for r in everything)
    assert report["total"]["view"]["PA"] == sum(r.view == "PA" for r in everything)
    assert report["stats_json"] == {"present": True, "agrees": True, "differences": []}


def test_flags_find_each_defect(report):
    assert report["flags"] == EXPECTED_FLAGS
    p = report["pixels"]
    assert all(p[s]["sampled"] == sum(PER_SOURCE.values()) for s in DEFECTS)
    assert p["padchest"]["frac_border_brighter"] == 1.0
    assert p["chexpert"]["frac_border_brighter"] == 0.0
    assert p["brax"]["frac_wrap_like"] == 1.0 and p["chexpert"]["frac_wrap_like"] == 0.0
    for s in DEFECTS:
        assert len(p[s]["histogram"]) == ins.HIST_BINS
        assert sum(p[s]["histogram"]) == pytest.approx(1.0, abs=1e-4)
    # The dark source's pixels sit in the lowest bins, the inverted one's mass moved up.
    assert sum(p["nih_cxr14"]["histogram"][:ins.HIST_BINS // 4]) > 0.95


def test_image_measures():
    normal = np.round(chest_like(0) * 65535).astype(np.uint16)
    m = ins.image_measures(normal)
    assert m["border"] < m["centre"] and m["wrap_steps"] == 0.0 and m["hi_frac"] < 0.01
    inv = ins.image_measures(65535 - normal)
    assert inv["border"] > inv["centre"] and inv["mean"] == pytest.approx(1 - m["mean"], abs=1e-4)
    # Black padding next to a bright film edge is neither a wrap nor (at 25%) clipping.
    padded = np.zeros((RES, RES), np.uint16)
    padded[:, RES // 8:RES - RES // 8] = 60000
    padded[RES // 2, RES // 2] = 65535
    pm = ins.image_measures(padded)
    assert pm["wrap_steps"] == 0.0 and pm["lo_frac"] == 0.25
    const = ins.image_measures(np.full((8, 8), 7, np.uint16))
    assert const["hi_frac"] == const["lo_frac"] == 1.0
    assert ins.histogram(np.array([[0, 65535]], np.uint16)).tolist() == [1] + [0] * 62 + [1]


def test_flags_on_one_source_use_absolute_bounds():
    s = {"mean": 0.5, "border": 0.2, "centre": 0.6, "hi_frac": 0.001, "lo_frac": 0.01,
         "wrap_steps": 0.0}
    ok = ins.summarize_measures([s] * 5)
    assert ins.source_flags({"a": ok}) == {"a": {}}
    dark = ins.summarize_measures([{**s, "mean": 0.1}] * 5)
    assert list(ins.source_flags({"a": dark})["a"]) == ["dark"]
    # Two sources: no relative comparison (which of the two would be the odd one?).
    assert ins.source_flags({"a": ok, "b": ins.summarize_measures([{**s, "mean": 0.8}] * 5)}) \
        == {"a": {}, "b": {}}
    assert ins.source_flags({"a": {"sampled": 0}}) == {"a": {}}


def test_files(dataset, report):
    data_dir, _ = dataset
    out = os.path.join(data_dir, "inspect")
    assert report["out"] == os.path.abspath(out)
    names = set(os.listdir(out))
    assert names == {f"contact_{s}.png" for s in DEFECTS} | {
        "histograms.png", "inspect.json", "report.txt"}
    doc = json.loads(open(os.path.join(out, "inspect.json")).read())
    assert doc["flags"] == EXPECTED_FLAGS and doc["thresholds"] == ins.THRESHOLDS
    sheet = Image.open(os.path.join(out, "contact_chexpert.png"))
    assert sheet.mode == "L" and sheet.width == 4 * ins.TILE and sheet.height > 2 * ins.TILE
    hist = Image.open(os.path.join(out, "histograms.png"))
    assert hist.width > 600 and hist.height > 400
    text = open(os.path.join(out, "report.txt")).read()
    assert "stats.json: agrees" in text and "padchest: inverted:" in text
    assert "No Finding" in text and "chexpert_site0" in text


def test_seeded_sample(dataset, tmp_path):
    data_dir, _ = dataset
    a = ins.inspect_dataset(data_dir, tmp_path / "a", per_source=3, sample=4, seed=1)
    b = ins.inspect_dataset(data_dir, tmp_path / "b", per_source=3, sample=4, seed=1)
    c = ins.inspect_dataset(data_dir, tmp_path / "c", per_source=3, sample=4, seed=2)
    for s in DEFECTS:
        pa, pb = (open(tmp_path / d / f"contact_{s}.png", "rb").read() for d in "ab")
        assert pa == pb
        assert a["pixels"][s]["sampled"] == 4
    assert a["pixels"] == b["pixels"]
    assert a["pixels"] != c["pixels"]    # another seed, other records
    assert Image.open(tmp_path / "a" / "contact_brax.png").width == 3 * ins.TILE


def test_disagreeing_stats_json(dataset, tmp_path):
    data_dir, _ = dataset
    copy = tmp_path / "ds"
    shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("inspect"))
    doc = json.loads((copy / "stats.json").read_text())
    doc["splits"]["train"]["count"] += 1
    doc["splits"]["train"]["sex"]["M"] += 1
    (copy / "stats.json").write_text(json.dumps(doc))
    r = ins.inspect_dataset(str(copy), per_source=1, sample=1)
    assert r["stats_json"]["agrees"] is False
    diffs = r["stats_json"]["differences"]
    assert any("stats.json counts 46 records, the dataset has 45" in d for d in diffs)
    assert any("sex differs" in d for d in diffs)
    assert "DISAGREES" in ins.format_report(r)
    (copy / "stats.json").unlink()
    r = ins.inspect_dataset(str(copy), tmp_path / "o2", per_source=1, sample=1)
    assert r["stats_json"]["present"] is False


def test_phantom_is_clean(phantom_data, tmp_path):
    r = ins.inspect_dataset(phantom_data(16), tmp_path / "o", per_source=4, sample=32)
    assert r["flags"] == {"phantom": []}
    assert r["stats_json"]["agrees"]


def test_library_bad_input(tmp_path, dataset):
    data_dir, _ = dataset
    with pytest.raises(errors.UserError, match="does not exist"):
        ins.inspect_dataset(str(tmp_path / "nope"))
    with pytest.raises(errors.UserError, match="per_source"):
        ins.inspect_dataset(data_dir, tmp_path / "o", per_source=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(errors.UserError, match="not a directory"):
        ins.inspect_dataset(data_dir, tmp_path / "file")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ CLI (subprocesses)

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cxr_rf.data.inspect", *map(str, args)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_runs(dataset, tmp_path):
    data_dir, _ = dataset
    p = _cli(data_dir, "--out", tmp_path / "out", "--per_source", "2", "--sample", "8")
    assert p.returncode == 0, p.stderr
    assert "stats.json: agrees" in p.stdout and "nih_cxr14: dark:" in p.stdout
    assert (tmp_path / "out" / "contact_padchest.png").is_file()
    assert (tmp_path / "out" / "report.txt").read_text().strip() == p.stdout.strip()


@pytest.mark.parametrize("case", ["missing", "not_converted", "per_source", "no_dir"])
def test_cli_bad_input(case, tmp_path, dataset):
    data_dir, _ = dataset
    out = tmp_path / "out"
    if case == "missing":
        args, want = (tmp_path / "nope", "--out", out), "does not exist"
    elif case == "not_converted":
        (tmp_path / "raw").mkdir()
        (tmp_path / "raw" / "a.png").write_bytes(b"x")
        args, want = (tmp_path / "raw", "--out", out), "not a converted dataset"
    elif case == "per_source":
        args, want = (data_dir, "--out", out, "--per_source", "0"), "per_source"
    else:
        args, want = ("--out", out), "give one dataset directory"
    p = _cli(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], p.stderr
    assert not out.exists()
