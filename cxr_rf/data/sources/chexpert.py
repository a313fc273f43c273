"""CheXpert v1.0 (Stanford), optionally joined with CheXpert-Plus reports and race.

On-disk layout (``input_dir`` is the folder that holds ``train.csv``, e.g. ``CheXpert-v1.0-small/``)::

    train.csv, valid.csv        Path, Sex, Age, Frontal/Lateral, AP/PA, the 14 findings (1.0/0.0/-1.0/blank)
    train/patient00001/study1/view1_frontal.jpg
    valid/patient64541/study1/view1_frontal.jpg

``Path`` starts with the release folder ("CheXpert-v1.0-small/train/..."), so it is resolved
relative to ``input_dir`` after dropping that first component, or else relative to its parent.
Race is only in a separate Excel sheet, which is not read (no spreadsheet dependency); the
hidden/separately released test set is not read either.

Assumption (CheXpert-Plus): if ``input_dir`` holds ``df_chexpert_plus_*.csv`` (released as
``df_chexpert_plus_240401.csv``), its ``path_to_image`` ("train/patient00001/study1/view1_frontal.jpg"),
``section_findings``, ``section_impression`` and, if present, ``race`` columns supply the report and
race. Rows are matched on the path from the split folder on, ignoring the extension (Plus
ships PNGs where v1.0 has JPEGs). With several such files the last in name order (newest date) wins.

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
from cxr_rf.data.sources import Item, Reject
from cxr_rf.data.sources.common import chexpert_state, read_csv, require_columns

NAME = "chexpert"
LABELS: tuple[str, ...] = cond.FINDINGS  # CheXpert's column names are the shared vocabulary
_SPLIT_FILES = (("train.csv", "train"), ("valid.csv", "validation"))
_KEY_RE = re.compile(r"(train|valid|test)/(patient\d+)/(study\d+)/([^/]+?)(\.[A-Za-z0-9]+)?$")
_PATIENT_RE = re.compile(r"(patient\d+)/(study\d+)/")


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

def _plus_table(input_dir: str) -> dict[str, tuple[str, str]]:
    """CheXpert-Plus key -> (report, race); streamed because the file holds every report."""
    files = sorted(glob.glob(os.path.join(input_dir, "df_chexpert_plus*.csv*")))
    if not files:
        return {}
    path = files[-1]
    opener = gzip.open if path.endswith(".gz") else open
    old_limit = csv.field_size_limit(1 << 24)  # long reports can exceed csv's 128 KiB default
    out = {}
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            require_columns(reader.fieldnames or [], ("path_to_image",), path)
            for row in reader:
                m = _KEY_RE.search(row["path_to_image"].replace("\\", "/"))
                if m:
                    out["/".join(m.group(1, 2, 3, 4))] = (
                        join_report(row.get("section_findings"), row.get("section_impression")),
                        race_from_text(row.get("race")))
    finally:
        csv.field_size_limit(old_limit)
    return out


def _resolve(input_dir: str, rel: str) -> str:
    rel = rel.replace("\\", "/")
    parts = rel.split("/")
    candidates = [os.path.join(input_dir, *parts[1:]), os.path.join(os.path.dirname(input_dir), *parts),
                  os.path.join(input_dir, *parts)]
    return next((c for c in candidates if os.path.isfile(c)), candidates[0])


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


def items(input_dir: str, opts=None) -> Iterator[Item | Reject]:
    """Every image of train.csv then valid.csv, in file order."""
    input_dir = os.path.abspath(input_dir)
    tables = []
    for fname, split in _SPLIT_FILES:
        path = os.path.join(input_dir, fname)
        rows = read_csv(path)
        require_columns(rows, ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + LABELS, path)
        tables.append((fname, split, rows))
    plus = _plus_table(input_dir)
    first_split: dict[str, str] = {}  # official splits are patient-disjoint; the first file wins
    for fname, split, rows in tables:
        for row in rows:
            m = _PATIENT_RE.search(row["Path"].replace("\\", "/"))
            if m:
                first_split.setdefault(m.group(1), split)
    for fname, split, rows in tables:
        for n, row in enumerate(rows, 1):
            ref = f"{fname}:row {n}"
            rel = row["Path"].replace("\\", "/")
            m = _PATIENT_RE.search(rel)
            if not m:
                yield Reject(ref, f"cannot parse patientNNNNN/studyN from Path {rel!r}")
                continue
            patient = m.group(1)
            if first_split[patient] != split:
                yield Reject(ref, f"{patient} is also in the official {first_split[patient]} split")
                continue
            try:
                findings = label_findings(row)
            except ValueError as e:
                yield Reject(ref, str(e))
                continue
            path = _resolve(input_dir, rel)
            if not os.path.isfile(path):
                yield Reject(path, f"image file not found ({ref})")
                continue
            key = _KEY_RE.search(rel)
            report, race = plus.get("/".join(key.group(1, 2, 3, 4)) if key else "", ("", "unknown"))
            sex = {"male": "M", "female": "F"}.get(row["Sex"].strip().lower(), "unknown")
            yield Item(path=path, split=split, findings=findings, sex=sex, age=_age(row["Age"]),
                       race=race, view=_view(row["Frontal/Lateral"], row["AP/PA"]), source=NAME,
                       patient_id=patient, study_id=f"{patient}/{m.group(2)}", report=report)
