"""MIMIC-CXR-JPG v2.0/2.1 (PhysioNet), with optional reports and MIMIC-IV demographics.

On-disk layout (``input_dir`` is the release root, ``.../mimic-cxr-jpg/2.0.0/``)::

    mimic-cxr-2.0.0-metadata.csv(.gz)   dicom_id, subject_id, study_id, ViewPosition, StudyDate, ...
    mimic-cxr-2.0.0-chexpert.csv(.gz)   subject_id, study_id, the 14 findings (1.0/0.0/-1.0/blank)
    mimic-cxr-2.0.0-split.csv(.gz)      dicom_id, study_id, subject_id, split (train/validate/test)
    files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg

Optional, used when present:
- reports (from MIMIC-CXR, not -JPG): ``mimic-cxr-reports/files/p10/p10000032/s50414267.txt``
  or the same path under ``files/`` (what unzipping the reports into the release root gives);
  the FINDINGS and IMPRESSION sections are kept, the whole text if it has neither.
- MIMIC-IV ``patients.csv(.gz)`` (subject_id, gender, anchor_age, anchor_year) and
  ``admissions.csv(.gz)`` (subject_id, race; ``ethnicity`` in MIMIC-IV 1.0), directly in
  ``input_dir`` or in its ``hosp/`` (MIMIC-IV 2.x) or ``core/`` (1.0) subfolder.

Labels come from the CheXpert labeller table (the negbio table has the same format and is not
used). Studies the table lacks keep all findings unmentioned rather than being dropped.

Verified (``../shared/reference/datasets.md``): the table names and columns, the image path
layout, split values, and that ViewPosition holds rarer codes besides PA/AP/LATERAL/LL (AP
AXIAL, LAO, XTABLE LATERAL, ...). Assumed: which of AP/PA/LATERAL each rarer code belongs to
(read from its name: see ``_VIEWS``), the report and MIMIC-IV file locations.
"""
from __future__ import annotations

import collections
import os
import re
from typing import Iterator

import numpy as np

from cxr_rf import conditioning as cond
from cxr_rf.data.sources import Item, Reject, excluded
from cxr_rf.data.sources.chexpert import (LABELS, identity_rows, join_report,
                                          label_findings, race_from_text)
from cxr_rf.data.sources.common import read_csv, require_columns

NAME = "mimic_cxr_jpg"
DEIDENTIFIED_RELEASE = True  # public, de-identified: BurnedInAnnotation YES is a flag, not a reject
PREFIX = "mimic-cxr-2.0.0-"
_SPLITS = {"train": "train", "validate": "validation", "test": "test"}
# ViewPosition codes of the metadata table. The rarer ones (reference: "AP AXIAL, LAO, XTABLE
# LATERAL, ...") follow their projection: AP-ish (axial/lordotic, decubitus) -> AP, PA-ish -> PA,
# laterals (incl. cross-table and the swimmer's lateral) -> LATERAL; obliques and anything
# else -> unknown (neither frontal nor lateral).
_VIEWS = {"PA": "PA", "AP": "AP", "LATERAL": "LATERAL", "LL": "LATERAL", "RL": "LATERAL",
          "AP AXIAL": "AP", "AP LLD": "AP", "AP RLD": "AP", "PA LLD": "PA", "PA RLD": "PA",
          "XTABLE LATERAL": "LATERAL", "SWIMMERS": "LATERAL",
          "LAO": "unknown", "RAO": "unknown", "LPO": "unknown", "RPO": "unknown"}
_SECTION_RE = re.compile(r"^[ \t]*([A-Z][A-Z /&]+):", re.M)

MAPPING = f"""\
| source label | CheXpert finding | state |
|---|---|---|
{identity_rows()}
| field | rule |
|---|---|
| view | ViewPosition PA, PA LLD, PA RLD -> PA; AP, AP AXIAL, AP LLD, AP RLD -> AP; LATERAL, LL, RL, XTABLE LATERAL, SWIMMERS -> LATERAL; obliques (LAO, RAO, LPO, RPO), anything else or blank -> unknown |
| sex | MIMIC-IV patients.gender M/F, else unknown (no MIMIC-IV tables -> unknown) |
| age | anchor_age + (StudyDate year - anchor_year) (dates share MIMIC-IV's shift); anchor_age alone without StudyDate |
| race | MIMIC-IV admissions.race (ethnicity in 1.0): the patient's most frequent known value; WHITE* -> White, BLACK* -> Black, ASIAN* -> Asian, UNKNOWN/UNABLE/DECLINED -> unknown, others -> Other |
| labels | study without a chexpert.csv row -> all unmentioned (kept) |
| verified | file names (2.1.0 still ships mimic-cxr-2.0.0-*.csv.gz), columns, files/ layout, split values, the rarer view codes exist (datasets.md) |
| assumed | AP/PA/LATERAL class of each rarer view code (by its projection name), MIMIC-IV table locations |
| split | mimic-cxr-2.0.0-split.csv: train -> train, validate -> validation, test -> test; an image missing there takes its patient's split (None if the patient is not listed); a patient listed in two splits keeps the first, later images are rejected |
"""


def _mimic_iv(input_dir: str, name: str) -> tuple[str, list[dict[str, str]]] | None:
    for sub in ("", "hosp", "core"):
        path = os.path.join(input_dir, sub, name)
        if os.path.isfile(path) or os.path.isfile(path + ".gz"):
            return path, read_csv(path)
    return None


def _demographics(input_dir: str) -> tuple[dict[str, tuple[str, float, int | None]], dict[str, str]]:
    """subject -> (sex, anchor_age, anchor_year) and subject -> race, from MIMIC-IV if present."""
    people: dict[str, tuple[str, float, int | None]] = {}
    found = _mimic_iv(input_dir, "patients.csv")
    if found:
        path, rows = found
        require_columns(rows, ("subject_id", "gender", "anchor_age"), path)
        for row in rows:
            try:
                age = float(row["anchor_age"])
            except ValueError:
                age = -1.0
            try:
                year = int(row.get("anchor_year") or "")
            except ValueError:
                year = None
            sex = row["gender"].strip().upper()
            people[row["subject_id"]] = (sex if sex in ("M", "F") else "unknown", age, year)
    races: dict[str, str] = {}
    found = _mimic_iv(input_dir, "admissions.csv")
    if found:
        path, rows = found
        col = "race" if rows and "race" in rows[0] else "ethnicity"
        require_columns(rows, ("subject_id", col), path)
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for row in rows:
            race = race_from_text(row[col])
            if race != "unknown":
                counts[row["subject_id"]][race] += 1
        races = {s: c.most_common(1)[0][0] for s, c in counts.items()}
    return people, races


def _report(input_dir: str, subject: str, study: str) -> str:
    rel = (f"p{subject[:2]}", f"p{subject}", f"s{study}.txt")
    for base in (os.path.join(input_dir, "mimic-cxr-reports", "files"), os.path.join(input_dir, "files")):
        path = os.path.join(base, *rel)
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                return report_sections(f.read())
    return ""


def report_sections(text: str) -> str:
    """FINDINGS and IMPRESSION of a free-text report; the whole text, whitespace-collapsed, if neither."""
    marks = list(_SECTION_RE.finditer(text))
    sections: dict[str, str] = {}
    for m, nxt in zip(marks, marks[1:] + [None]):
        sections.setdefault(m.group(1).strip(), text[m.end():nxt.start() if nxt else len(text)])
    if sections.get("FINDINGS", "").strip() or sections.get("IMPRESSION", "").strip():
        return join_report(sections.get("FINDINGS"), sections.get("IMPRESSION"))
    return " ".join(text.split())


def _age(person: tuple[str, float, int | None] | None, study_date: str) -> float:
    if person is None or person[1] < 0:
        return -1.0
    age = person[1]
    if person[2] is not None and len(study_date) >= 4 and study_date[:4].isdigit():
        age += int(study_date[:4]) - person[2]
    return age if 0 <= age < 150 else -1.0


def items(input_dir: str, opts=None) -> Iterator[Item | Reject]:
    """Every image of the metadata table, in file order."""
    input_dir = os.path.abspath(input_dir)
    meta_path = os.path.join(input_dir, PREFIX + "metadata.csv")
    label_path = os.path.join(input_dir, PREFIX + "chexpert.csv")
    split_path = os.path.join(input_dir, PREFIX + "split.csv")
    meta, labels_rows, split_rows = read_csv(meta_path), read_csv(label_path), read_csv(split_path)
    require_columns(meta, ("dicom_id", "subject_id", "study_id", "ViewPosition"), meta_path)
    require_columns(labels_rows, ("subject_id", "study_id") + LABELS, label_path)
    require_columns(split_rows, ("dicom_id", "subject_id", "split"), split_path)

    labels: dict[str, np.ndarray | str] = {}
    for n, row in enumerate(labels_rows, 1):
        try:
            labels[row["study_id"]] = label_findings(row)
        except ValueError as e:  # every image of the study is rejected with this reason
            labels[row["study_id"]] = f"{os.path.basename(label_path)}:row {n}: {e}"
    dicom_split: dict[str, str | None] = {}
    subject_split: dict[str, str] = {}
    for row in split_rows:
        split = _SPLITS.get(row["split"].strip())
        dicom_split[row["dicom_id"]] = split
        if split:
            subject_split.setdefault(row["subject_id"], split)
    people, races = _demographics(input_dir)

    last_study, report = "", ""  # images of a study are adjacent: a one-entry cache suffices
    meta_name = os.path.basename(meta_path)
    for n, row in enumerate(meta, 1):
        ref = f"{meta_name}:row {n}"
        subject, study, dicom = row["subject_id"].strip(), row["study_id"].strip(), row["dicom_id"].strip()
        if not (subject.isdigit() and study.isdigit() and dicom):
            yield Reject(ref, "bad ids (subject_id and study_id must be digits, dicom_id non-empty)")
            continue
        if dicom in dicom_split and dicom_split[dicom] is None:
            yield Reject(ref, f"{os.path.basename(split_path)} gives an unknown split value for the image")
            continue
        split = dicom_split.get(dicom) or subject_split.get(subject)
        if split is not None and subject_split.get(subject, split) != split:
            yield excluded(ref, f"patient is also in the official {subject_split[subject]} split")
            continue
        found = labels.get(study)
        if isinstance(found, str):
            yield Reject(ref, found)
            continue
        findings = np.zeros(len(cond.FINDINGS), np.int8) if found is None else found.copy()
        path = os.path.join(input_dir, "files", f"p{subject[:2]}", f"p{subject}", f"s{study}", dicom + ".jpg")
        if not os.path.isfile(path):
            yield Reject(path, f"image file not found ({ref})")
            continue
        if study != last_study:
            last_study, report = study, _report(input_dir, subject, study)
        person = people.get(subject)
        yield Item(path=path, split=split, findings=findings,
                   sex=person[0] if person else "unknown", age=_age(person, row.get("StudyDate", "")),
                   race=races.get(subject, "unknown"),
                   view=_VIEWS.get(" ".join(row["ViewPosition"].upper().split()), "unknown"), source=NAME,
                   patient_id=subject, study_id=study, report=report)
