"""ReXGradient-160K (Gradient Health via Rajpurkar lab; Hugging Face release).

Layout (``input_dir`` is the release root, the folder that holds ``metadata/``)::

    metadata/train_metadata.csv, metadata/valid_metadata.csv, metadata/test_metadata.csv
        (.csv.gz accepted; at least one split must exist)
        one row per STUDY, no image path: PatientID, PatientSex, PatientAge ("014Y"),
        [id], [StudyInstanceUid], [StudyDate], [InstitutionName], Indication, Comparison,
        Findings, Impression, [the 14 CheXpert-named label columns, if a labeller was run]
    metadata/train_metadata_view_position.json (and valid_, test_)
        {study key: {"ImagePath": ["../deid_png/...png", ...],
                     "ImageViewPosition": ["PA", "LATERAL", ...], [study-level fields], ...}}
    deid_png/<patient>/<accession>/studies/<StudyUID>/series/<SeriesUID>/instances/<SOP>.png
        (the concatenated ``deid_png.part*`` archive, extracted)

VERIFIED against ``../shared/reference/datasets.md`` (the real release): the three
``{train,valid,test}_metadata.csv`` tables are one row per study with PatientID, PatientSex,
PatientAge, Findings, Impression and no image path; per-image paths (``../deid_png/...``,
relative to ``metadata/``) and view positions are lists in ``*_metadata_view_position.json``;
images are PNGs under ``deid_png/``; the split is given by the file.

ASSUMED (public loaders of the release, not the reference): the JSON is an object keyed by a
study key that equals the CSV's ``id`` column, each value holding the parallel lists
``ImagePath`` and ``ImageViewPosition`` (the latter may be shorter, null or hold "None"/"N/A":
those images get view unknown) and the study's own PatientID / StudyInstanceUid / PatientSex /
PatientAge / Findings / Impression. A study is joined to its CSV row by ``id`` = key, else by
StudyInstanceUid; study-level fields come from the CSV row, falling back to the JSON entry's
own fields where the CSV has no row or a blank cell. A CSV study that has no JSON entry has no
image to convert and is rejected. The old assumption of one CSV row per image with an
``ImagePath`` column was wrong (no such table is released) and is no longer read.

Paths are resolved relative to ``metadata/`` first (as written), then relative to
``input_dir`` and ``input_dir/deid_png`` after dropping leading "../" (for copies whose
``deid_png`` was extracted elsewhere under the root). The release has reports but no labels:
findings are unmentioned unless the study table carries CheXpert-named columns
(1.0/0.0/-1.0/blank). A patient found in two files keeps the first file's split (train,
valid, test order) and its later images are rejected.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator

import numpy as np

from cxr_rf import conditioning as cond
from cxr_rf.data.sources import Item, Reject, SourceError, excluded
from cxr_rf.data.sources.chexpert import LABELS, identity_rows, join_report, label_findings
from cxr_rf.data.sources.common import read_csv, require_columns
from cxr_rf.data.sources.nih_cxr14 import parse_age

NAME = "rexgradient"
DEIDENTIFIED_RELEASE = True  # public, de-identified: BurnedInAnnotation YES is a flag, not a reject
FILES = (("train_metadata.csv", "train"), ("valid_metadata.csv", "validation"),
         ("test_metadata.csv", "test"))
JSON_SUFFIX = "_view_position.json"  # train_metadata.csv -> train_metadata_view_position.json
_STUDY_RE = re.compile(r"/studies/([^/]+)/")
_BLANK = ("", "none", "nan", "null", "n/a")

MAPPING = f"""\
| source label | CheXpert finding | state |
|---|---|---|
{identity_rows()}| (no label columns, the release default) | — | all unmentioned |

| field | rule |
|---|---|
| image | one record per entry of the study's ImagePath list in `*_metadata_view_position.json` (verified: the reference; `../deid_png/...` relative to `metadata/`) |
| view | the image's entry of ImageViewPosition (verified: a per-image list in the JSON; value spellings assumed): PA, POSTERO_ANTERIOR -> PA; AP*, ANTERO_POSTERIOR -> AP; LATERAL, LL, RL, LAT, *LATERAL* -> LATERAL; SUPINE, ERECT, DECUBITUS, LAO, RAO, UNKNOWN, N/A, None, missing -> unknown |
| sex | PatientSex M/F (study CSV, verified column), else unknown |
| age | PatientAge DICOM age ("014Y", "002D") or years (study CSV, verified column); else unknown |
| race | not provided -> unknown |
| site | InstitutionName when present (assumed column) |
| report | Findings + Impression sections of the study (verified columns) |
| split | train_metadata -> train, valid_metadata -> validation, test_metadata -> test (official, verified) |
| join | JSON key = CSV `id`, else StudyInstanceUid (assumed: public loaders, not the reference) |
"""


def _view(text: Any) -> str:
    t = ("" if text is None else str(text)).strip().upper().replace("-", "_")
    if t in ("PA", "POSTERO_ANTERIOR") or t.startswith("PA "):
        return "PA"
    if t.startswith("AP") or t.startswith("ANTERO_POSTERIOR"):
        return "AP"
    if t in ("LL", "RL", "LAT") or "LATERAL" in t:
        return "LATERAL"
    return "unknown"


def _text(value: Any) -> str:
    """A CSV cell or JSON value as stripped text; None and 'None'/'nan'/'N/A' spellings -> ''."""
    if value is None or isinstance(value, (list, dict)):
        return ""
    text = str(value).strip()
    return "" if text.lower() in _BLANK else text


def _resolve(input_dir: str, meta: str, rel: str) -> str:
    rel = rel.strip().replace("\\", "/")
    parts = [p for p in rel.split("/") if p not in ("", ".", "..")]
    candidates = [os.path.normpath(os.path.join(meta, *rel.split("/"))),
                  os.path.join(input_dir, *parts), os.path.join(input_dir, "deid_png", *parts)]
    return next((c for c in candidates if os.path.isfile(c)), candidates[0])


def _json_path(meta: str, fname: str) -> str:
    return os.path.join(meta, fname[:-len(".csv")] + JSON_SUFFIX)


def _load_json(path: str) -> dict[str, dict]:
    """The view-position JSON as {study key: entry}; SourceError naming the file if unusable."""
    if not os.path.isfile(path):
        raise SourceError(f"missing {path}: the study table has no image paths; the per-image paths "
                          f"and views are in this file of the release")
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path} is not readable JSON: {' '.join(str(e).split())[:200]}") from None
    if isinstance(data, list):  # tolerate a list of entries (keys are then their positions)
        data = {str(n): e for n, e in enumerate(data)}
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object of studies, got {type(data).__name__}")
    return data


def _studies(meta: str, fname: str, rows: list[dict[str, str]], entries: dict[str, Any]):
    """(reference, csv row or None, JSON entry or None) per study: JSON order, then CSV-only rows."""
    by_id: dict[str, int] = {}
    by_uid: dict[str, int] = {}
    for n, row in enumerate(rows):
        if _text(row.get("id")):
            by_id.setdefault(_text(row.get("id")), n)
        uid = _text(row.get("StudyInstanceUid") or row.get("StudyInstanceUID"))
        if uid:
            by_uid.setdefault(uid, n)
    used: set[int] = set()
    jname = os.path.basename(_json_path(meta, fname))
    for k, (key, entry) in enumerate(entries.items(), 1):
        n = by_id.get(str(key))
        if n is None and isinstance(entry, dict):
            n = by_uid.get(_text(entry.get("StudyInstanceUid") or entry.get("StudyInstanceUID")))
        if n is not None and n in used:
            n = None  # a second JSON study claiming the same CSV row keeps its own fields only
        if n is not None:
            used.add(n)
        yield f"{jname}:study {k}", (rows[n] if n is not None else None), entry, (n + 1 if n is not None else None)
    for n, row in enumerate(rows):
        if n not in used:
            yield f"{fname}:row {n + 1}", row, None, n + 1


def items(input_dir: str, opts=None) -> Iterator[Item | Reject]:
    """Every image of the train, valid and test studies, in that order (JSON order within a file)."""
    input_dir = os.path.abspath(input_dir)
    meta = os.path.join(input_dir, "metadata")
    tables = []
    for fname, split in FILES:
        path = os.path.join(meta, fname)
        if os.path.isfile(path) or os.path.isfile(path + ".gz"):
            rows = read_csv(path)
            require_columns(rows, ("PatientID", "PatientSex", "PatientAge"), path)
            tables.append((fname, split, rows, _load_json(_json_path(meta, fname))))
    if not tables:
        raise SourceError(f"missing {os.path.join(meta, FILES[0][0])} (or the valid/test metadata tables)")
    studies = [(fname, split, rows, list(_studies(meta, fname, rows, entries)))
               for fname, split, rows, entries in tables]
    first_split: dict[str, str] = {}

    def field(row, entry, *names) -> str:
        for source in (row, entry):
            if isinstance(source, dict):
                for name in names:
                    value = _text(source.get(name))
                    if value:
                        return value
        return ""

    for _, split, _, rows in studies:
        for _, row, entry, _ in rows:
            patient = field(row, entry, "PatientID")
            if patient:
                first_split.setdefault(patient, split)
    for fname, split, rows, study_rows in studies:
        labelled = all(f in rows[0] for f in LABELS)
        for ref, row, entry, row_no in study_rows:
            if entry is None:
                yield Reject(ref, "study has no entry in the view-position JSON (no image paths)")
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("ImagePath"), list):
                yield Reject(ref, "JSON entry has no ImagePath list")
                continue
            paths = entry["ImagePath"]
            views = entry.get("ImageViewPosition")
            views = views if isinstance(views, list) else []
            patient = field(row, entry, "PatientID")
            if not patient:
                yield Reject(ref, "empty PatientID")
                continue
            if first_split[patient] != split:
                yield excluded(ref, f"patient is also in the official {first_split[patient]} split "
                                  f"(the first split listing a patient keeps it)")
                continue
            try:
                findings = (label_findings(row) if labelled and row is not None
                            else np.zeros(len(cond.FINDINGS), np.int8))
            except ValueError as e:
                yield Reject(f"{fname}:row {row_no}", str(e))
                continue
            sex = field(row, entry, "PatientSex").upper()
            age = parse_age(field(row, entry, "PatientAge"))
            report = join_report(field(row, entry, "Findings"), field(row, entry, "Impression"))
            site = field(row, entry, "InstitutionName")
            uid = field(row, entry, "StudyInstanceUid", "StudyInstanceUID")
            if not paths:
                yield Reject(ref, "ImagePath list is empty")
            for j, rel in enumerate(paths):
                iref = f"{ref} image {j + 1}"
                if not isinstance(rel, str) or not rel.strip():
                    yield Reject(iref, "ImagePath entry is not a path")
                    continue
                path = _resolve(input_dir, meta, rel)
                if not os.path.isfile(path):
                    yield Reject(path, f"image file not found ({iref})")
                    continue
                m = _STUDY_RE.search(path.replace("\\", "/"))
                study = uid or (m.group(1) if m else os.path.dirname(rel.strip()))
                yield Item(path=path, split=split, findings=findings,
                           sex=sex if sex in ("M", "F") else "unknown", age=age,
                           view=_view(views[j] if j < len(views) else None), source=NAME, site=site,
                           patient_id=patient, study_id=study, report=report)
