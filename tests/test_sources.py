"""Raw-corpus sources: each reads a tiny fixture in its real on-disk layout (tests/fixtures_sources.py)."""
import os
import re

import numpy as np
import pytest

import fixtures_sources as fx
from cxr_rf import conditioning as cond
from cxr_rf.data import sources
from cxr_rf.data.sources import Item, Reject, SourceError

P, N, U, X = cond.POSITIVE, cond.NEGATIVE, cond.UNCERTAIN, cond.UNMENTIONED
REAL = ("mimic_cxr_jpg", "chexpert", "nih_cxr14", "padchest", "vindr_cxr", "brax", "rexgradient", "openi")
MAKERS = {"mimic_cxr_jpg": fx.make_mimic, "chexpert": fx.make_chexpert, "nih_cxr14": fx.make_nih,
          "padchest": fx.make_padchest, "vindr_cxr": fx.make_vindr, "brax": fx.make_brax,
          "rexgradient": fx.make_rexgradient, "openi": fx.make_openi}


def run(name, input_dir):
    out = list(sources.get(name).items(input_dir, None))
    items = [e for e in out if isinstance(e, Item)]
    rejects = [e for e in out if isinstance(e, Reject)]
    assert len(items) + len(rejects) == len(out)
    return items, rejects


def states(item, **expected):
    """Assert finding states by name (underscores for spaces); all others must be unmentioned."""
    want = np.zeros(14, np.int8)
    for k, v in expected.items():
        want[cond.FINDINGS.index(k.replace("_", " "))] = v
    assert item.findings.dtype == np.int8 and item.findings.tolist() == want.tolist(), \
        dict(zip(cond.FINDINGS, item.findings.tolist()))


def by_name(items):
    return {os.path.basename(i.path): i for i in items}


def test_one_list_of_sources_and_its_token_ids_are_pinned():
    """conditioning.SOURCES is the one list; trained checkpoints depend on its order."""
    assert cond.SOURCES == ("unknown", "phantom", "mimic_cxr_jpg", "chexpert", "nih_cxr14", "padchest",
                            "vindr_cxr", "brax", "rexgradient", "openi", "dicom_dir")
    sl = cond.group_slices()["source"]
    ids = [int(cond.encode(np.zeros(14, np.int8), source=s)[sl][0]) for s in cond.SOURCES]
    assert ids == list(range(88, 99)) and cond.null_tokens()[sl].tolist() == [99]
    assert cond.vocab_size() == 358
    # The data package derives its registry: same names, same order, one module each.
    assert sources.SOURCES == cond.SOURCES[1:]
    assert [sources.get(s).NAME for s in sources.SOURCES] == list(sources.SOURCES)


def test_conditioning_imports_without_the_data_package():
    import subprocess
    import sys
    code = ("import sys, cxr_rf.conditioning; "
            "print(sorted(m for m in sys.modules if m.startswith('cxr_rf.data')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]


def reasons(rejects):
    return " | ".join(f"{r.path}: {r.reason}" for r in rejects)


def check_common(name, items):
    """Invariants every source keeps: valid vocab, source tag, files exist, one split per patient."""
    patient_split = {}
    for it in items:
        assert it.source == name and it.sex in cond.SEXES and it.race in cond.RACES and it.view in cond.VIEWS
        assert it.age == -1.0 or 0 <= it.age < 150
        assert it.split in (None, "train", "validation", "test") and it.patient_id and os.path.isfile(it.path)
        assert patient_split.setdefault(it.patient_id, it.split) == it.split, it.patient_id


@pytest.mark.parametrize("name", REAL)
def test_mapping_table_names_valid_findings(name):
    mod = sources.get(name)
    assert mod.NAME == name and name in cond.SOURCES
    rows = [line for line in mod.MAPPING.split("\n\n")[0].splitlines()[2:] if line.startswith("|")]
    assert rows, f"{name}.MAPPING has no label rows"
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 3, line
        for finding in cells[1].split(", "):
            assert finding == "—" or finding in cond.FINDINGS, f"{name}: {finding!r} in {line!r}"
    assert "| view |" in mod.MAPPING and "| split |" in mod.MAPPING


@pytest.mark.parametrize("name,expected", [
    ("mimic_cxr_jpg", "mimic-cxr-2.0.0-metadata.csv"), ("chexpert", "train.csv"),
    ("nih_cxr14", "Data_Entry_2017.csv"), ("padchest", "PADCHEST_chest_x_ray_images_labels_160K"),
    ("vindr_cxr", "image_labels_train.csv"), ("brax", "master_spreadsheet_update.csv"),
    ("rexgradient", "train_metadata.csv"), ("openi", "ecgen-radiology")])
def test_empty_input_names_expected_file(tmp_path, name, expected):
    with pytest.raises(SourceError, match=re.escape(expected)):
        list(sources.get(name).items(str(tmp_path), None))


def test_missing_required_column_is_named(tmp_path):
    fx.write_csv(str(tmp_path / "master_spreadsheet_update.csv"), ["PatientID", "PngPath"], [["1", "a.png"]])
    with pytest.raises(SourceError, match="master_spreadsheet_update.csv lacks required column.*PatientSex"):
        list(sources.get("brax").items(str(tmp_path), None))


def test_mimic(tmp_path):
    items, rejects = run("mimic_cxr_jpg", fx.make_mimic(str(tmp_path)))
    check_common("mimic_cxr_jpg", items)
    it = by_name(items)
    assert sorted(it) == ["d1.jpg", "d10.jpg", "d11.jpg", "d12.jpg", "d13.jpg", "d14.jpg", "d2.jpg", "d3.jpg",
                          "d4.jpg", "d8.jpg", "d9.jpg"], reasons(rejects)
    assert len(rejects) == 3
    assert any(r.path.endswith("d5.jpg") and "not found" in r.reason for r in rejects)
    assert any("row 3" in r.reason and "Cardiomegaly='2.0'" in r.reason for r in rejects)
    assert any("row 7" in r.path and "validation" in r.reason for r in rejects)
    d1 = it["d1.jpg"]
    states(d1, Cardiomegaly=P, Edema=U, Pleural_Effusion=N)
    assert (d1.split, d1.view, d1.sex, d1.age, d1.race) == ("train", "PA", "F", 60.0, "White")
    assert d1.report == "FINDINGS: Enlarged heart. Trace fluid.\nIMPRESSION: Cardiomegaly."
    assert (d1.patient_id, d1.study_id) == ("10000032", "50414267")
    assert it["d2.jpg"].view == "LATERAL" and it["d2.jpg"].report == d1.report
    d3 = it["d3.jpg"]  # no label row -> unmentioned; not in split.csv -> the patient's split
    states(d3)
    assert (d3.split, d3.view, d3.age) == ("train", "LATERAL", 62.0)
    d4 = it["d4.jpg"]
    states(d4, No_Finding=P)
    assert (d4.split, d4.view, d4.sex, d4.age, d4.race) == ("validation", "AP", "M", 45.0, "Black")
    assert d4.report == "No acute cardiopulmonary process."
    d8 = it["d8.jpg"]
    assert (d8.sex, d8.age, d8.race, d8.split) == ("unknown", -1.0, "unknown", "train")
    # Rarer codes: AP-ish -> AP, PA-ish -> PA, laterals -> LATERAL, obliques -> unknown.
    views = {n: it[n + ".jpg"].view for n in ("d9", "d10", "d11", "d12", "d13", "d14")}
    assert views == {"d9": "AP", "d10": "PA", "d11": "LATERAL", "d12": "unknown", "d13": "LATERAL",
                     "d14": "AP"}
    assert all(it[n + ".jpg"].split == "train" for n in views)


def test_mimic_without_optional_tables(tmp_path):
    d = fx.make_mimic(str(tmp_path))
    for f in ("hosp/patients.csv.gz", "hosp/admissions.csv.gz"):
        os.remove(os.path.join(d, f))
    items, _ = run("mimic_cxr_jpg", d)
    assert {(i.sex, i.age, i.race) for i in items} == {("unknown", -1.0, "unknown")}


def test_chexpert(tmp_path):
    items, rejects = run("chexpert", fx.make_chexpert(str(tmp_path)))
    check_common("chexpert", items)
    assert len(items) == 4 and len(rejects) == 3, reasons(rejects)
    assert any(r.path == "train.csv:row 4" and "Cardiomegaly='2.0'" in r.reason for r in rejects)
    assert any("patient00004" in r.path and "not found" in r.reason for r in rejects)
    assert any(r.path == "valid.csv:row 2" and "train" in r.reason for r in rejects)
    a, b, c, v = items
    states(a, Cardiomegaly=N, Pleural_Effusion=U, Support_Devices=P)
    assert (a.split, a.sex, a.age, a.view, a.race) == ("train", "F", 68.0, "AP", "White")
    assert (a.patient_id, a.study_id) == ("patient00001", "patient00001/study1")
    assert a.report == "FINDINGS: Lines and tubes in place.\nIMPRESSION: Possible effusion."
    assert (b.view, b.report, b.race) == ("LATERAL", "", "unknown")
    assert (c.age, c.sex, c.view) == (-1.0, "M", "PA")  # Age 0 means missing
    states(v, **{f.replace(" ", "_"): N for f in cond.FINDINGS if f != "Edema"}, Edema=P)
    assert (v.split, v.race, v.report) == ("validation", "Black", "IMPRESSION: Mild edema.")


@pytest.mark.parametrize("csv_at_root", [False, True])
def test_chexpert_full_release(tmp_path, csv_at_root):
    """Stanford AIMI layout: batch folders, no train/ folder; Plus-only images are read too."""
    d = fx.make_chexpert_full(str(tmp_path), csv_at_root=csv_at_root)
    items, rejects = run("chexpert", d)
    check_common("chexpert", items)
    text = reasons(rejects)
    assert len(items) == 6 and len(rejects) == 6, text
    a, b, c, v, p5, p6 = items
    assert "batch 2 (train 1)" in a.path and "batch 3 (train 2)" in c.path and "/valid/" in v.path
    # Same labels and Plus join as the -small copy.
    states(a, Cardiomegaly=N, Pleural_Effusion=U, Support_Devices=P)
    assert (a.split, a.sex, a.age, a.view, a.race) == ("train", "F", 68.0, "AP", "White")
    assert a.report == "FINDINGS: Lines and tubes in place.\nIMPRESSION: Possible effusion."
    assert (b.view, c.age, v.split, v.race) == ("LATERAL", -1.0, "validation", "Black")
    assert any(r.path == "train.csv:row 4" and "Cardiomegaly='2.0'" in r.reason for r in rejects)
    assert any("patient00004" in r.path and "not found" in r.reason for r in rejects)
    assert any(r.path == "valid.csv:row 2" and "also in the official train split" in r.reason for r in rejects)
    # Images only CheXpert-Plus lists: unmentioned findings, fields from Plus, split from the path.
    states(p5)
    assert (p5.patient_id, p5.split, p5.sex, p5.age, p5.view, p5.race, p5.report) == (
        "patient00005", "train", "F", 61.0, "PA", "Asian", "IMPRESSION: Clear.")
    assert p6.path.endswith("patient00006/study1/view1_frontal.png")  # Plus ships PNGs
    assert (p6.sex, p6.age, p6.view, p6.race, p6.study_id) == ("M", -1.0, "LATERAL", "unknown",
                                                                "patient00006/study1")
    assert any("patient00007" in r.path and "not found" in r.reason for r in rejects)
    assert any(r.path == "df_chexpert_plus_240401.csv:row 6" and "validation split" in r.reason for r in rejects)
    assert any(r.path == "df_chexpert_plus_240401.csv:row 7" and "cannot parse" in r.reason for r in rejects)
    assert not any(re.search(r"patient\d", r.reason) for r in rejects)  # no patient ids in reasons


def test_chexpert_full_release_converts(tmp_path):
    from cxr_rf.data import convert
    d = fx.make_chexpert_full(str(tmp_path / "raw"))
    items, rejects = run("chexpert", d)
    out = tmp_path / "out"
    convert.convert("chexpert", out, sources.SourceOptions(input_dir=d, resolution=8), max_reject_fraction=1.0)
    import json
    stats = json.loads((out / "stats.json").read_text())
    assert sum(s["count"] for s in stats["splits"].values()) == len(items) == 6
    assert sum(1 for _ in open(convert.rejects_log(out))) == len(rejects)


def test_nih(tmp_path):
    d = fx.make_nih(str(tmp_path))
    from cxr_rf.data.sources.common import read_csv
    header = read_csv(os.path.join(d, "Data_Entry_2017.csv"))[0].keys()
    assert {"OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"} <= set(header)
    items, rejects = run("nih_cxr14", d)
    check_common("nih_cxr14", items)
    it = by_name(items)
    assert sorted(it) == ["00000001_000.png", "00000001_001.png", "00000001_002.png", "00000002_000.png",
                          "00000003_000.png", "00000007_000.png"], reasons(rejects)
    assert len(rejects) == 4
    text = reasons(rejects)
    assert "unknown label 'Foo'" in text and "00000005_000.png: image file not found" in text
    assert "patient is also in the official test split" in text and "listed in both" in text
    states(it["00000001_000.png"], No_Finding=N, Cardiomegaly=P)
    states(it["00000001_001.png"], No_Finding=N, Cardiomegaly=P)  # Emphysema ignored
    x = it["00000001_002.png"]
    states(x, No_Finding=N, Lung_Opacity=P, Lung_Lesion=P, Pleural_Effusion=P, Pleural_Other=P)
    assert (x.age, x.view, x.sex, x.split, x.study_id) == (58.0, "AP", "M", "train", "00000001_002")
    nf = it["00000002_000.png"]
    covered = ("Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
               "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other")
    states(nf, No_Finding=P, **{f.replace(" ", "_"): N for f in covered})
    h = it["00000003_000.png"]
    states(h)  # Hernia only: nothing CheXpert can say
    assert (h.split, h.age, h.sex) == ("test", -1.0, "F")
    assert it["00000007_000.png"].split is None


def test_padchest(tmp_path):
    items, rejects = run("padchest", fx.make_padchest(str(tmp_path)))
    check_common("padchest", items)
    it = by_name(items)
    assert sorted(it) == ["i1.png", "i2.png", "i3.png", "i4.png", "i8.png"], reasons(rejects)
    text = reasons(rejects)
    assert len(rejects) == 3 and "not a list literal" in text and "i7.png" in text
    assert "intentionally excluded: Projection is EXCLUDE" in text
    assert not any(f"pa{k}" in r.reason for r in rejects for k in range(1, 9))  # no patient ids
    from PIL import Image
    with Image.open(it["i1.png"].path) as im:  # the fixture really is 16-bit
        assert im.mode in ("I;16", "I") and np.asarray(im).max() > 255
    i1 = it["i1.png"]
    states(i1, No_Finding=N, Cardiomegaly=P, Pleural_Effusion=P, Support_Devices=P)
    assert (i1.view, i1.sex, i1.age, i1.split, i1.patient_id, i1.study_id) == ("PA", "M", 76.0, None, "pa1", "st1")
    assert all(i.report == "" for i in items)  # Report is stemmed Spanish tokens, not a report
    pathologies = [f for f in cond.FINDINGS if f not in ("No Finding", "Support Devices")]
    states(it["i2.png"], No_Finding=P, **{f.replace(" ", "_"): N for f in pathologies})
    assert it["i2.png"].view == "LATERAL"
    states(it["i3.png"], No_Finding=N, Lung_Lesion=P)  # ' nodule' trimmed, '' and unmapped ignored
    assert (it["i3.png"].view, it["i3.png"].age) == ("AP", -1.0)
    states(it["i4.png"], No_Finding=N, Fracture=P)
    assert it["i4.png"].view == "unknown"  # COSTAL
    states(it["i8.png"])
    assert (it["i8.png"].sex, it["i8.png"].view, it["i8.png"].age) == ("unknown", "unknown", 57.0)


def test_padchest_flat_folder(tmp_path):
    """Mirrors ship every PNG in one folder: the same Items, found without ImageDir folders."""
    d = fx.make_padchest(str(tmp_path), flat=True)
    assert not os.path.isdir(os.path.join(d, "0"))
    items, rejects = run("padchest", d)
    check_common("padchest", items)
    assert sorted(by_name(items)) == ["i1.png", "i2.png", "i3.png", "i4.png", "i8.png"], reasons(rejects)
    assert all(os.path.dirname(i.path) == d for i in items)
    assert len(rejects) == 3 and "flat folder" in reasons(rejects)


@pytest.mark.parametrize("flat", [False, True])
def test_padchest_pixels_are_rescaled_and_monochrome1_inverted(tmp_path, flat):
    """12-bit values in a 16-bit PNG fill 0..65535 (not left dark); MONOCHROME1 rows come out inverted."""
    from PIL import Image

    from cxr_rf.data import imaging
    from cxr_rf.data.sources import padchest
    d = fx.make_padchest(str(tmp_path), flat=flat)
    it = by_name(run("padchest", d)[0])
    for name in ("i1.png", "i3.png"):
        with Image.open(it[name].path) as im:
            raw = np.asarray(im).astype(np.float64)
        assert raw.max() < 4096  # only part of the 16-bit range on disk
        assert it[name].stretch and it[name].invert == (name in fx.PADCHEST_MONOCHROME1)
        out = _item_pixels(it[name])
        assert out.dtype == np.uint16 and out.shape == (fx.SIZE, fx.SIZE)
        assert out.min() == 0 and out.max() == 65535
        expect = (raw - raw.min()) / (raw.max() - raw.min()) * 65535
        if name in fx.PADCHEST_MONOCHROME1:
            expect = 65535 - expect
        # same pixels up to the resampling of fit_square (identity at the native size)
        assert np.abs(out.astype(np.float64) - expect).max() <= 1.0, name
    # A truncated PNG (the real release has ~21) is an ImageError, which the converter rejects.
    path = it["i1.png"].path
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(imaging.ImageError):
        _item_pixels(it["i1.png"])
    assert not hasattr(padchest, "load")  # the Item's fields say everything; no CSV re-read


def _item_pixels(item, size=None):
    """An Item's pixels at R x R as the converter's worker makes them."""
    from cxr_rf.data import worker
    return worker.to_record(worker.WorkerConfig(item.source, "salt", size or fx.SIZE), item).image


def test_padchest_convert_rejects_bad_files_and_keeps_the_rest(tmp_path):
    import json

    from cxr_rf.data import convert
    d = fx.make_padchest(str(tmp_path / "raw"))
    with open(os.path.join(d, "1", "i4.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    convert.convert("padchest", out, sources.SourceOptions(input_dir=d, resolution=8), max_reject_fraction=1.0)
    lines = [json.loads(x) for x in open(convert.rejects_log(out))]
    assert len(lines) == 4 and any(x["path"].endswith("i4.png") for x in lines), lines
    import tensorflow_datasets as tfds

    from cxr_rf.data import schema
    builder = tfds.builder_from_directory(str(out))
    images = [schema.from_example(src[i])["image"] for split in builder.info.splits
              for src in [builder.as_data_source(split)] for i in range(len(src))]
    assert len(images) == 4  # the good images were all written, each over the full range
    assert all(im.min() == 0 and im.max() == 65535 for im in images)


def test_vindr(tmp_path):
    items, rejects = run("vindr_cxr", fx.make_vindr(str(tmp_path)))
    check_common("vindr_cxr", items)
    it = {i.patient_id: i for i in items}
    assert sorted(it) == ["imgA", "imgB", "imgC", "imgE", "imgF", "imgG"], reasons(rejects)
    text = reasons(rejects)
    assert len(rejects) == 3 and "image_labels_train.csv:row 7" in text and "Edema='2'" in text
    assert "imgD.dicom" in text and "image_labels_test.csv:imgA" in text
    neg = {f.replace(" ", "_"): N for f in cond.FINDINGS if f != "Support Devices"}
    # A: cardiomegaly 2/3 and fracture 2/3 (rib, clavicle: one vote per reader), aortic 1/3.
    states(it["imgA"], **{**neg, "Cardiomegaly": P, "Fracture": P, "Enlarged_Cardiomediastinum": U})
    states(it["imgB"], **{**neg, "No_Finding": P})
    # C: nodule 1 of 2 valid readers; its parent Lung Opacity is not asserted absent.
    states(it["imgC"], **{**neg, "No_Finding": N, "Lung_Lesion": U, "Lung_Opacity": X})
    states(it["imgE"], **{**neg, "Pneumothorax": P})
    # F: parents of positive children stay unmentioned, never negative.
    states(it["imgF"], **{**neg, "No_Finding": N, "Consolidation": P, "Cardiomegaly": P,
                          "Lung_Opacity": X, "Enlarged_Cardiomediastinum": X})
    # G: a minority pneumonia demotes the majority No Finding to uncertain (as CheXpert).
    states(it["imgG"], **{**neg, "No_Finding": U, "Pneumonia": U, "Consolidation": X, "Lung_Opacity": X})
    assert {i.split for i in items} == {"train", "test"} and it["imgE"].split == "test"
    assert all(i.dicom_meta and i.view == "PA" and i.path.endswith(".dicom") for i in items)


def test_vindr_jpeg2000_pixels_beyond_bits_stored_decode_monotonic(tmp_path):
    """imgE is stored as VinDr ships it (JPEG 2000, BitsStored 12, 16-bit values, MONOCHROME1)."""
    import pydicom

    from cxr_rf.data import imaging
    items, _ = run("vindr_cxr", fx.make_vindr(str(tmp_path)))
    path = next(i.path for i in items if i.patient_id == "imgE")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID.is_encapsulated and ds.BitsStored == 12
    assert int(ds.pixel_array.max()) > 4095
    out = imaging.read(path).astype(np.int64)
    v = fx.VINDR_VALUES.astype(np.float64)
    want = 65535 - np.rint((v - v.min()) / (v.max() - v.min()) * 65535)  # MONOCHROME1: inverted
    assert np.array_equal(out, want)  # strictly monotonic in the stored values: nothing wrapped


def test_brax(tmp_path):
    items, rejects = run("brax", fx.make_brax(str(tmp_path)))
    check_common("brax", items)
    assert len(items) == 4 and len(rejects) == 2, reasons(rejects)
    assert "Fracture='yes'" in reasons(rejects) and "not found" in reasons(rejects)
    assert not any("id_" in r.reason for r in rejects)  # no patient id in a reason
    a, b, c, e = items
    states(a, Cardiomegaly=P, Edema=U)
    assert (a.sex, a.age, a.view, a.study_id, a.split, a.dicom_meta) == ("M", 58.0, "PA", "acc1", None, False)
    assert (b.age, b.view) == (87.5, "LATERAL")  # "85 or more": midpoint of an assumed 85-89 band
    assert c.path.endswith(".dcm") and c.dicom_meta and (c.sex, c.age, c.view) == ("unknown", 24.5, "AP")
    states(e, Atelectasis=P)
    assert (e.age, e.sex, e.study_id) == (62.5, "F", "acc5")  # "60" is the band 60-64


def test_rexgradient(tmp_path):
    """Real layout: per-study CSVs without image paths; images and views from the JSON lists."""
    items, rejects = run("rexgradient", fx.make_rexgradient(str(tmp_path)))
    check_common("rexgradient", items)
    assert len(items) == 5 and len(rejects) == 4, reasons(rejects)
    text = reasons(rejects)
    assert "1.2.3.3.png: image file not found" in text
    assert "train_metadata.csv:row 2: study has no entry in the view-position JSON" in text
    assert "no ImagePath list" in text and "patient is also in the official train split" in text
    assert not any(p in r.reason for r in rejects for p in ("GRDN1", "GRDN4", "GRDN6"))  # no patient ids
    a, b, j, v, t = items
    states(a)
    assert (a.split, a.view, a.sex, a.age, a.site, a.study_id) == ("train", "PA", "M", 14.0, "SiteA", "1.2.3")
    assert a.report == "FINDINGS: Lungs clear.\nIMPRESSION: Normal chest."
    assert (b.view, b.report, b.study_id) == ("LATERAL", a.report, "1.2.3")  # study fields shared
    assert os.path.basename(a.path) == "1.2.3.1.png" and os.path.basename(b.path) == "1.2.3.2.png"
    # A study only the JSON lists keeps the entry's own fields; a null view is unknown.
    assert (j.patient_id, j.sex, j.age, j.view, j.report) == ("GRDN5", "F", 30.0, "unknown",
                                                              "IMPRESSION: Small effusion.")
    assert (v.split, v.view, v.study_id, v.report) == ("validation", "AP", "7.7", "IMPRESSION: Edema.")
    states(t, Cardiomegaly=P)  # test CSV has no id column: joined on StudyInstanceUid
    assert (t.split, t.view, t.age, t.patient_id) == ("test", "unknown", -1.0, "GRDN3")


def test_rexgradient_needs_the_view_position_json(tmp_path):
    d = fx.make_rexgradient(str(tmp_path))
    os.remove(os.path.join(d, "metadata", "valid_metadata_view_position.json"))
    with pytest.raises(SourceError, match="valid_metadata_view_position.json"):
        list(sources.get("rexgradient").items(d, None))
    with open(os.path.join(d, "metadata", "valid_metadata_view_position.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(SourceError, match="not readable JSON"):
        list(sources.get("rexgradient").items(d, None))


def test_openi(tmp_path):
    items, rejects = run("openi", fx.make_openi(str(tmp_path)))
    check_common("openi", items)
    assert [os.path.basename(i.path) for i in items] == [
        "CXR1_1_IM-0001-3001.png", "CXR1_1_IM-0001-4001.png", "CXR2_1_IM-0652-1001.png",
        "CXR4_1_IM-2000-1001.png", "CXR5_2_IM-2001-2001.png"]
    text = reasons(rejects)
    assert len(rejects) == 2 and "CXR2_1_IM-0652-2001.png" in text
    assert "3.xml: unparseable XML" in text  # 10.xml has no image: nothing to convert, no reject
    pathologies = [f for f in cond.FINDINGS if f not in ("No Finding", "Support Devices")]
    states(items[0], No_Finding=P, **{f.replace(" ", "_"): N for f in pathologies})
    assert items[0].report == "FINDINGS: The heart is normal.\nIMPRESSION: Normal chest x-XXXX."
    states(items[2], No_Finding=N, Cardiomegaly=U, Pleural_Effusion=P, Pleural_Other=P, Support_Devices=P)
    assert items[2].patient_id == "CXR2" and items[2].split is None
    # MeSH variants: Pulmonary Congestion -> Edema, Pleural Effusions/Effusion -> Pleural Effusion,
    # Infiltrates -> Lung Opacity, Pleural Thickening -> Pleural Other.
    states(items[3], No_Finding=N, Edema=P, Pleural_Effusion=P, Lung_Opacity=P)
    states(items[4], No_Finding=N, Pleural_Effusion=P, Pleural_Other=P)
    # Views from the optional indiana_projections.csv: Lateral -> LATERAL, Frontal (PA or AP
    # not recorded) and images the table lacks -> unknown.
    assert [i.view for i in items] == ["LATERAL", "unknown", "unknown", "LATERAL", "unknown"]


def test_openi_views_from_dicom_header_table_or_none(tmp_path):
    d = fx.make_openi(str(tmp_path))
    fx.write_csv(os.path.join(d, "indiana_projections.csv"), ["uid", "filename", "projection", "ViewPosition"], [
        ["1", "1_IM-0001-4001.dcm.png", "Frontal", "PA"], ["1", "1_IM-0001-3001.dcm.png", "Lateral", ""],
        ["2", "2_IM-0652-1001.dcm.png", "Frontal", "AP"], ["5", "5_IM-2001-2001.dcm.png", "Frontal", " "]])
    items, _ = run("openi", d)
    assert [i.view for i in items] == ["LATERAL", "PA", "AP", "unknown", "unknown"]
    os.remove(os.path.join(d, "indiana_projections.csv"))  # optional: without it every view is unknown
    items, _ = run("openi", d)
    assert len(items) == 5 and {i.view for i in items} == {"unknown"}
    fx.write_csv(os.path.join(d, "indiana_projections.csv"), ["uid", "filename"], [["1", "x"]])
    with pytest.raises(SourceError, match="indiana_projections.csv lacks.*projection or ViewPosition"):
        run("openi", d)


def test_shared_parsers():
    from cxr_rf.data.sources.brax import brax_age
    from cxr_rf.data.sources.chexpert import race_from_text
    from cxr_rf.data.sources.nih_cxr14 import parse_age
    races = {"WHITE - OTHER EUROPEAN": "White", "Caucasian": "White", "BLACK/CAPE VERDEAN": "Black",
             "Asian, non-Hispanic": "Asian", "HISPANIC/LATINO - CUBAN": "Other", "Patient Refused": "unknown",
             "UNABLE TO OBTAIN": "unknown", "": "unknown", "Native Hawaiian or Other Pacific Islander": "Other"}
    assert {k: race_from_text(k) for k in races} == races
    assert [parse_age(a) for a in ("058Y", "58", "006M", "", "412", "abc")] == [58.0, 58.0, 0.5, -1, -1, -1]
    assert [brax_age(a) for a in ("20-29", "85 or more", "90+", "040Y", "60", "0", "58", "")] == \
        [24.5, 87.5, 92.5, 40.0, 62.5, 2.5, 58.0, -1.0]


@pytest.mark.parametrize("name", REAL)
def test_order_is_deterministic(tmp_path, name):
    d = MAKERS[name](str(tmp_path))
    first = [(type(e).__name__, e.path) for e in sources.get(name).items(d, None)]
    assert first == [(type(e).__name__, e.path) for e in sources.get(name).items(d, None)]


@pytest.mark.parametrize("name", REAL)
def test_convert_end_to_end(tmp_path, name):
    """convert() on each fixture; the dataset read back holds exactly the source's Items."""
    import json

    import tensorflow_datasets as tfds

    from cxr_rf.data import convert, plan, schema
    d = MAKERS[name](str(tmp_path / "raw"))
    items, rejects = run(name, d)
    out = tmp_path / "out"
    convert.convert(name, out, sources.SourceOptions(input_dir=d, resolution=8), max_reject_fraction=1.0)
    builder = tfds.builder_from_directory(str(out))
    got, patient_split = [], {}
    for split in builder.info.splits:
        src = builder.as_data_source(split)
        for i in range(len(src)):
            ex = schema.from_example(src[i])
            assert ex["image"].shape == (8, 8) and ex["source"] == name
            assert patient_split.setdefault(ex["patient_id"], split) == split  # patient-level split
            got.append((split, tuple(ex["findings"].tolist()), ex["view"], ex["race"], ex["report"]))
            if name == "vindr_cxr":  # sex/age exist only in the DICOM header: the converter read it
                assert (ex["sex"], ex["age"]) == ("F", 45.0)
    # Official splits are kept as given; split=None Items go by the hash of their raw patient id.
    want = [(it.split or plan.patient_split(it.patient_id), tuple(it.findings.tolist()), it.view,
             it.race, it.report) for it in items]
    assert sorted(got) == sorted(want)
    assert sum(1 for _ in open(convert.rejects_log(out))) == len(rejects)
    assert json.loads((out / "stats.json").read_text())
    assert_no_raw_ids(out, items)


def assert_no_raw_ids(out, items):
    """No raw patient or study id of the fixture in any file inside the dataset directory,
    nor in any decoded record field but the pixels. An id matches as a whole word; ids
    shorter than 3 characters (NIH's patient "3") would match ordinary counts and are not
    searched."""
    import re

    import tensorflow_datasets as tfds
    from array_record.python import array_record_module

    from cxr_rf.data import schema
    ids = {i for it in items for i in (it.patient_id, it.study_id) if len(i) >= 3}
    assert ids, "the fixture has no id long enough to search for"
    pattern = re.compile(rb"(?<![A-Za-z0-9])(" + b"|".join(
        re.escape(i.encode()) for i in sorted(ids, key=len, reverse=True)) + rb")(?![A-Za-z0-9])")
    blobs = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert any(n.endswith("stats.json") for n in blobs) and any(".array_record-" in n for n in blobs)
    for shard in out.glob("*.array_record-*"):  # the records' bytes, uncompressed
        reader = array_record_module.ArrayRecordReader(str(shard))
        blobs.update((f"{shard.name}[{j}]", raw) for j, raw in enumerate(reader.read_all()))
        reader.close()
    builder = tfds.builder_from_directory(str(out))
    for split in builder.info.splits:  # and every decoded field but the pixels
        src = builder.as_data_source(split)
        for j in range(len(src)):
            ex = schema.from_example(src[j], decode=False)
            blobs[f"{split}[{j}]"] = repr({k: v for k, v in ex.items() if k != "image_png"}).encode()
    for name, blob in blobs.items():
        found = pattern.search(blob)
        assert found is None, f"raw id {found.group().decode()!r} in {name}"


def test_excluded_inputs_are_reported_apart_and_not_counted_as_rejects(tmp_path):
    """PadChest's Projection EXCLUDE row is excluded, not rejected: it is listed apart in
    stats.json, stats.txt and the rejects log, and leaves the reject fraction alone."""
    import json

    from cxr_rf.data import convert
    d = fx.make_padchest(str(tmp_path / "raw"))
    _, rejects = run("padchest", d)
    kinds = sorted(r.kind for r in rejects)
    assert kinds == [sources.EXCLUDED, sources.REJECTED, sources.REJECTED], reasons(rejects)
    out = tmp_path / "out"
    # 2 rejected of the 7 inputs not excluded (28.6%) pass 30%; 3 of 8 (37.5%) would not.
    stats = convert.convert("padchest", out, sources.SourceOptions(input_dir=d, resolution=8),
                            max_reject_fraction=0.3)
    assert (stats["rejects"]["count"], stats["rejects"]["inputs"]) == (2, 7)
    assert stats["excluded"]["count"] == 1 and stats["flags"] == {}
    (reason,) = stats["excluded"]["reasons"]
    assert "Projection is EXCLUDE" in reason and reason not in stats["rejects"]["reasons"]
    assert stats == json.loads((out / "stats.json").read_text())
    text = (out / "stats.txt").read_text()
    assert "rejected 2 of 7 inputs" in text and "excluded 1 inputs on purpose" in text
    log = [json.loads(x) for x in open(convert.rejects_log(out))]
    assert sorted(x["kind"] for x in log) == kinds
    # format_stats still prints an older stats.json (no "excluded" or "flags")
    from cxr_rf.data.stats import format_stats
    old = {k: v for k, v in stats.items() if k not in ("excluded", "flags")}
    assert "rejected 2 of 7 inputs" in format_stats(old) and "excluded" not in format_stats(old)


def test_vindr_burned_in_annotation_is_a_flag_and_000Y_an_unknown_age(tmp_path):
    """On a public de-identified release, BurnedInAnnotation YES is counted, not rejected;
    VinDr's "000Y" is a missing age, not a newborn."""
    import json

    import pydicom

    from cxr_rf.data import convert
    from cxr_rf.data.sources.common import dicom_demographics
    d = fx.make_vindr(str(tmp_path / "raw"))
    items, rejects = run("vindr_cxr", d)
    first, second = items[0], items[1]
    for item, tag, value in ((first, "BurnedInAnnotation", "YES"), (second, "PatientAge", "000Y")):
        ds = pydicom.dcmread(item.path)
        setattr(ds, tag, value)
        ds.save_as(item.path)
    out = tmp_path / "out"
    stats = convert.convert("vindr_cxr", out, sources.SourceOptions(input_dir=d, resolution=8),
                            max_reject_fraction=1.0)
    assert stats["flags"] == {"burned_in_annotation": 1}
    assert stats["total"]["count"] == len(items) and stats["rejects"]["count"] == len(rejects) - sum(
        r.kind == sources.EXCLUDED for r in rejects)
    assert "burned_in_annotation 1" in (out / "stats.txt").read_text()
    assert not any("BurnedIn" in json.loads(x)["reason"] for x in open(convert.rejects_log(out)))
    assert _record(second).age == -1.0 and _record(items[2]).age == 45.0
    ages = {a: dicom_demographics(pydicom.Dataset({}) if a is None else _ds(PatientAge=a))["age"]
            for a in (None, "000Y", "000D", "006M", "045Y", "151Y")}
    assert ages == {None: -1.0, "000Y": -1.0, "000D": 0.0, "006M": 0.5, "045Y": 45.0, "151Y": -1.0}


def _ds(**tags):
    import pydicom
    ds = pydicom.Dataset()
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


def _record(item):
    from cxr_rf.data import worker
    return worker.to_record(worker.WorkerConfig(item.source, "salt", fx.SIZE), item)


def test_brax_pngs_are_stretched_to_the_full_range(tmp_path):
    from PIL import Image
    d = fx.make_brax(str(tmp_path))
    v = np.random.default_rng(3).integers(100, 3000, (fx.SIZE, fx.SIZE)).astype(np.uint16)
    Image.fromarray(v).save(os.path.join(d, "images/id_1/Study_1/a.png"))
    a, _, c, _ = run("brax", d)[0]
    assert a.stretch and not c.stretch  # a DICOM's window already spans the range
    out = _item_pixels(a).astype(np.float64)
    want = np.rint((v - v.min()) / (v.max() - v.min()) * 65535.0)
    assert np.abs(out - want).max() <= 1.0 and out.min() == 0 and out.max() == 65535
