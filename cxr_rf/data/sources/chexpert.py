"""CheXpert v1.0 (Stanford), optionally joined with CheXpert-Plus reports and race.

On-disk layouts (``input_dir`` is the folder that holds ``train.csv`` and ``valid.csv``)::

    -small / Kaggle copy:       CheXpert-v1.0-small/{train.csv, valid.csv, train/patient00001/study1/
                                view1_frontal.jpg, valid/patient64541/...}
    full release (Stanford AIMI): CheXpert-v1.0 batch 2 (train 1)/patient00001/study1/view1_frontal.jpg,
                                CheXpert-v1.0 batch 3 (train 2)/..., CheXpert-v1.0 batch 4 (train 3)/...
                                (no ``train/`` folder); train.csv, valid.csv and valid/ in another folder
    train.csv, valid.csv        Path, Sex, Age, Frontal/Lateral, AP/PA, the 14 findings (1.0/0.0/-1.0/blank)

``Path`` starts with the release folder ("CheXpert-v1.0-small/train/..." or
"CheXpert-v1.0/train/..."). It is resolved relative to ``input_dir`` after dropping that first
component, else relative to ``input_dir``'s parent, else relative to ``input_dir``; if none
exists, the patient's folder is looked up in the release's batch folders (folders named
"CheXpert-v1.0 ... batch ..." in ``input_dir`` or its parent, directly or in their
train/valid/test subfolders; indexed once, on the first miss).

VERIFIED against ``../shared/reference/datasets.md``: the CSV columns and label coding; the
-small layout; the full release's ``CheXpert-v1.0 batch N (train M)/patientNNNNN/studyN/viewN_*.jpg``
folders (batches 2-4) without a ``train/`` folder; CheXpert-Plus's file
``df_chexpert_plus_240401.csv`` and its ``path_to_image`` column ("train/patient.../view1_frontal.jpg").
ASSUMED: where the full release keeps train.csv, valid.csv and the validation images (the
reference does not say; batch 1 is believed to be "validate & csv": any ``valid/`` folder in
``input_dir`` or a batch folder is found); CheXpert-Plus's other columns (``section_findings``,
``section_impression``, ``race``, ``sex``, ``age``, ``frontal_lateral``, ``ap_pa``), each used
only if present.

CheXpert-Plus: if ``input_dir`` holds ``df_chexpert_plus_*.csv`` (the last in name order, i.e.
the newest date, wins), its rows are matched to CSV rows on the path from the split folder on,
ignoring the extension (Plus ships PNGs where v1.0 has JPEGs), and supply the report and race.
Images that only CheXpert-Plus lists (no train.csv/valid.csv row) are converted too, with every
finding unmentioned (Plus has no CheXpert labels in this table), split from the path's folder
(train/valid/test), sex/age/view from Plus's columns if present; they are looked up with the
listed extension, then .png/.jpg. Race from the separate Excel sheet is not read (no
spreadsheet dependency); the hidden test set is not read.

This module also holds the helpers other CheXpert-labeller-style sources (MIMIC-CXR-JPG, BRAX,
ReXGradient) share: the 14 label columns, race text mapping and report joining.
"""
from __future__ import annotations

import csv
import glob
import gzip
import os
import re
from typing import Iterator, Mapping

import numpy as np

from cxr_rf import conditioning as cond
from cxr_rf.data.sources import Item, Reject, excluded
from cxr_rf.data.sources.common import chexpert_state, read_csv, require_columns

NAME = "chexpert"
DEIDENTIFIED_RELEASE = True  # public, de-identified: BurnedInAnnotation YES is a flag, not a reject
LABELS: tuple[str, ...] = cond.FINDINGS  # CheXpert's column names are the shared vocabulary
_SPLIT_FILES = (("train.csv", "train"), ("valid.csv", "validation"))
_KEY_RE = re.compile(r"(train|valid|test)/(patient\d+)/(study\d+)/([^/]+?)(\.[A-Za-z0-9]+)?$")
_PATIENT_RE = re.compile(r"(patient\d+)/(study\d+)/")
_TAIL_RE = re.compile(r"(patient\d+)/(study\d+)/([^/]+)$")
_BATCH_RE = re.compile(r"^CheXpert-v1\.0.*\bbatch\b", re.IGNORECASE)
_PLUS_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


def identity_rows() -> str:
    """Markdown rows mapping each CheXpert-named column onto itself."""
    return "".join(f"| {f} | {f} | 1.0 positive, 0.0 negative, -1.0 uncertain, blank unmentioned |\n"
                   for f in LABELS)


MAPPING = f"""\
| source label | CheXpert finding | state |
|---|---|---|
{identity_rows()}
| field | rule |
|---|---|
| view | Frontal/Lateral=Lateral -> LATERAL; else AP/PA column AP -> AP, PA -> PA, other/blank -> unknown |
| sex | Male -> M, Female -> F, Unknown/blank -> unknown |
| age | Age in years; 0 (CheXpert's "missing") or unparseable -> unknown |
| race | CheXpert-Plus `race` if present (White/Black/Asian by keyword, unknown/declined -> unknown, else Other) |
| report | CheXpert-Plus section_findings + section_impression if present, else empty |
| split | train.csv -> train, valid.csv -> validation (official, patient-disjoint); patient id parsed from Path |
| image | Path against -small (`train/`, `valid/`) or the full release's `CheXpert-v1.0 batch N (...)/patientNNNNN/...` folders (verified: reference) |
| CheXpert-Plus only | images in `df_chexpert_plus_*.csv` (`path_to_image`, verified) without a train/valid.csv row: findings unmentioned, split from the path folder; sex/age/view from Plus columns if present (assumed) |
"""


# ---------------------------------------------------------------- shared helpers

def label_findings(row: Mapping[str, str], columns: Mapping[str, str] | None = None) -> np.ndarray:
    """int8[14] states from CheXpert-style cells; ``columns`` maps finding -> column (default: same name).

    Raises ValueError naming the column and the bad value.
    """
    out = np.zeros(len(LABELS), np.int8)
    for i, finding in enumerate(LABELS):
        col = finding if columns is None else columns.get(finding)
        if col is None:
            continue
        try:
            out[i] = chexpert_state(row.get(col))
        except ValueError:
            raise ValueError(f"bad label {col}={row.get(col)!r} (expected 1.0, 0.0, -1.0 or blank)") from None
    return out


def race_from_text(text: str | None) -> str:
    """Free-text race (MIMIC-IV, CheXpert-Plus) -> conditioning.RACES, by keyword.

    Declined/unknown answers stay "unknown"; Hispanic, Native, Pacific Islander and multi-race
    answers become "Other" because the vocabulary has no finer class.
    """
    t = (text or "").strip().lower()
    if "white" in t or "caucasian" in t:  # before "asian": "caucasian" contains it
        return "White"
    if "black" in t or "african" in t:
        return "Black"
    if "asian" in t:
        return "Asian"
    if t in ("", "nan", "none") or any(w in t for w in ("unknown", "declined", "refused", "unable",
                                                         "not specified", "not reported")):
        return "unknown"
    return "Other"


def join_report(findings: str | None, impression: str | None) -> str:
    """'FINDINGS: ...\\nIMPRESSION: ...' from whichever sections are non-empty."""
    parts = [f"{name}: {' '.join(text.split())}" for name, text in
             (("FINDINGS", findings), ("IMPRESSION", impression)) if text and text.strip()]
    return "\n".join(parts)


# ---------------------------------------------------------------- CheXpert

def _plus_file(input_dir: str) -> str | None:
    files = sorted(glob.glob(os.path.join(input_dir, "df_chexpert_plus*.csv*")))
    return files[-1] if files else None


def _plus_table(input_dir: str) -> tuple[str, dict[str, dict], list[tuple[int, str | None, str]]]:
    """(file name, key -> fields of its first row, [(row number, key or None, path_to_image)]).

    Streamed because the file holds every report; only the fields used are kept.
    """
    path = _plus_file(input_dir)
    if path is None:
        return "", {}, []
    opener = gzip.open if path.endswith(".gz") else open
    old_limit = csv.field_size_limit(1 << 24)  # long reports can exceed csv's 128 KiB default
    table: dict[str, dict] = {}
    order: list[tuple[int, str | None, str]] = []
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            require_columns(reader.fieldnames or [], ("path_to_image",), path)
            for n, row in enumerate(reader, 1):
                rel = (row.get("path_to_image") or "").strip().replace("\\", "/")
                m = _KEY_RE.search(rel)
                key = "/".join(m.group(1, 2, 3, 4)) if m else None
                order.append((n, key, rel))
                if key is not None and key not in table:
                    table[key] = {
                        "report": join_report(row.get("section_findings"), row.get("section_impression")),
                        "race": race_from_text(row.get("race")),
                        "sex": (row.get("sex") or "").strip(), "age": (row.get("age") or "").strip(),
                        "view": _view(row.get("frontal_lateral") or "", row.get("ap_pa") or "")}
    finally:
        csv.field_size_limit(old_limit)
    return os.path.basename(path), table, order


class _Resolver:
    """CSV/Plus paths -> files, in the -small layout or the full release's batch folders."""

    def __init__(self, input_dir: str):
        self.input_dir = input_dir
        self._index: dict[str, list[str]] | None = None

    def _batches(self) -> dict[str, list[str]]:
        """patientNNNNN -> the folders that hold its folder, over every batch folder (built once)."""
        if self._index is None:
            self._index = {}
            roots = []
            for top in dict.fromkeys((self.input_dir, os.path.dirname(self.input_dir))):
                try:
                    entries = sorted(os.scandir(top), key=lambda e: e.name)
                except OSError:
                    continue
                roots += [e.path for e in entries if _BATCH_RE.search(e.name) and e.is_dir()]
            for root in roots:
                for folder in (root, *(os.path.join(root, s) for s in ("train", "valid", "test"))):
                    try:
                        entries = sorted(os.scandir(folder), key=lambda e: e.name)
                    except OSError:
                        continue
                    for e in entries:
                        if e.name.startswith("patient") and e.is_dir():
                            self._index.setdefault(e.name, []).append(folder)
        return self._index

    def __call__(self, rel: str, extensions: tuple[str, ...] = ()) -> str:
        """The existing file for ``rel`` (trying ``extensions`` in place of its own), else the first candidate."""
        rel = rel.replace("\\", "/")
        stem, ext = os.path.splitext(rel)
        rels = [rel] + [stem + e for e in extensions if e.lower() != ext.lower()]
        first = None
        for r in rels:
            parts = r.split("/")
            candidates = [os.path.join(self.input_dir, *parts[1:]),
                          os.path.join(os.path.dirname(self.input_dir), *parts),
                          os.path.join(self.input_dir, *parts)]
            first = first or candidates[0]
            found = next((c for c in candidates if os.path.isfile(c)), None)
            if found:
                return found
        for r in rels:
            m = _TAIL_RE.search(r)
            if m:
                for folder in self._batches().get(m.group(1), ()):
                    c = os.path.join(folder, *m.group(1, 2, 3))
                    if os.path.isfile(c):
                        return c
        return first


def _age(text: str) -> float:
    try:
        age = float(text)
    except (TypeError, ValueError):
        return -1.0
    return age if 0 < age < 150 else -1.0  # 0 is CheXpert's code for "missing"


def _view(frontal_lateral: str, ap_pa: str) -> str:
    if frontal_lateral.strip().lower() == "lateral":
        return "LATERAL"
    return {"AP": "AP", "PA": "PA"}.get(ap_pa.strip().upper(), "unknown")


def _sex(text: str) -> str:
    return {"male": "M", "female": "F", "m": "M", "f": "F"}.get(text.strip().lower(), "unknown")


def items(input_dir: str, opts=None) -> Iterator[Item | Reject]:
    """Every image of train.csv then valid.csv, in file order, then those only CheXpert-Plus lists."""
    input_dir = os.path.abspath(input_dir)
    tables = []
    for fname, split in _SPLIT_FILES:
        path = os.path.join(input_dir, fname)
        rows = read_csv(path)
        require_columns(rows, ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + LABELS, path)
        tables.append((fname, split, rows))
    plus_name, plus, plus_order = _plus_table(input_dir)
    resolve = _Resolver(input_dir)
    first_split: dict[str, str] = {}  # official splits are patient-disjoint; the first file wins
    listed: set[str] = set()
    for fname, split, rows in tables:
        for row in rows:
            rel = row["Path"].replace("\\", "/")
            m = _PATIENT_RE.search(rel)
            if m:
                first_split.setdefault(m.group(1), split)
            key = _KEY_RE.search(rel)
            if key:
                listed.add("/".join(key.group(1, 2, 3, 4)))
    for fname, split, rows in tables:
        for n, row in enumerate(rows, 1):
            ref = f"{fname}:row {n}"
            rel = row["Path"].replace("\\", "/")
            m = _PATIENT_RE.search(rel)
            if not m:
                yield Reject(ref, "cannot parse patientNNNNN/studyN from Path")
                continue
            patient = m.group(1)
            if first_split[patient] != split:
                yield excluded(ref, f"patient is also in the official {first_split[patient]} split "
                                  f"(the first file listing a patient keeps it)")
                continue
            try:
                findings = label_findings(row)
            except ValueError as e:
                yield Reject(ref, str(e))
                continue
            path = resolve(rel)
            if not os.path.isfile(path):
                yield Reject(path, f"image file not found ({ref})")
                continue
            key = _KEY_RE.search(rel)
            info = plus.get("/".join(key.group(1, 2, 3, 4)) if key else "", {})
            yield Item(path=path, split=split, findings=findings, sex=_sex(row["Sex"]), age=_age(row["Age"]),
                       race=info.get("race", "unknown"), view=_view(row["Frontal/Lateral"], row["AP/PA"]),
                       source=NAME, patient_id=patient, study_id=f"{patient}/{m.group(2)}",
                       report=info.get("report", ""))
    # Images only CheXpert-Plus lists: no CheXpert labels here, so every finding stays unmentioned.
    seen: set[str] = set()
    for n, key, rel in plus_order:
        ref = f"{plus_name}:row {n}"
        if key is None:
            yield Reject(ref, "cannot parse {train,valid,test}/patientNNNNN/studyN/<view> from path_to_image")
            continue
        if key in listed:
            continue
        if key in seen:
            yield excluded(ref, "path_to_image listed twice (the first row is kept)")
            continue
        seen.add(key)
        folder, patient, study = key.split("/")[:3]
        split = _PLUS_SPLITS[folder]
        if first_split.setdefault(patient, split) != split:
            yield excluded(ref, f"patient is also in the official {first_split[patient]} split "
                              f"(the first file listing a patient keeps it)")
            continue
        path = resolve("CheXpert-v1.0/" + rel[rel.index(key.split("/")[0] + "/" + patient):],
                       extensions=(".png", ".jpg"))
        if not os.path.isfile(path):
            yield Reject(path, f"image file not found ({ref})")
            continue
        info = plus[key]
        yield Item(path=path, split=split, findings=np.zeros(len(LABELS), np.int8), sex=_sex(info["sex"]),
                   age=_age(info["age"]), race=info["race"], view=info["view"], source=NAME,
                   patient_id=patient, study_id=f"{patient}/{study}", report=info["report"])
