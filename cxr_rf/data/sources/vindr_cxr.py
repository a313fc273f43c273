"""VinDr-CXR v1.0.0 (PhysioNet; Hospital 108 and Hanoi Medical University Hospital).

On-disk layout (``input_dir`` is the release root)::

    annotations/image_labels_train.csv   image_id, rad_id, one 0/1 column per label (3 readers per image)
    annotations/image_labels_test.csv    image_id, [rad_id,] same labels (1 consensus row per image)
    train/<image_id>.dicom, test/<image_id>.dicom   (".dcm" accepted too)

At least one of the two label files must exist; each present file is used. Column names are
matched case-insensitively, and the unmapped "Other disease" / "Other diseases" column (the
name differs between the files) is not needed. Bounding boxes (annotations_*.csv) are not read.

Aggregation (a decision): every reader assessed every label, so 0 is an assertion of absence.
Per image and finding, k of n readers positive (a finding fed by several columns counts a reader
once): k = 0 -> negative, k > n/2 -> positive (majority; 2 of 3, or the test consensus), else
uncertain (a minority call, e.g. 1 of 3). Then, as CheXpert's labeller does:
- a parent finding (CheXpert's hierarchy: Lung Opacity over Lung Lesion, Edema, Consolidation,
  Pneumonia, Atelectasis; Consolidation over Pneumonia; Enlarged Cardiomediastinum over
  Cardiomegaly) that came out negative becomes unmentioned when a child is positive or
  uncertain: readers tick the most specific label, so an unticked parent is not an absence;
- No Finding: negative when a pathology is positive; a positive No Finding becomes uncertain
  when a pathology is uncertain (a minority of readers saw something).
A reader row with a value other than 0/1 is rejected and the image is aggregated over its
remaining readers. Support Devices is never annotated: unmentioned.

Verified against the release documentation (``../shared/reference/datasets.md``): the
annotations/ and train/, test/ layout, one 0/1 column per label with three readers per train
image, "Other disease" vs "Other diseases", PA only, sex/age only in the DICOM headers, and
JPEG 2000 pixels whose BitsStored (10/12) understates the decoded values (handled in
``imaging``). Assumed (decisions, not documented by the release): the term -> finding table,
the vote thresholds, the parent/No Finding rules, a single consensus row per test image.

Sex and age are only in the DICOM headers: items carry ``dicom_meta=True`` and the converter
reads them. No patient ids are released, so each image is its own patient (the official
train/test folders are used, so no patient hashing is involved). View is PA: the release kept
only PA radiographs.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from cxr_rf import conditioning as cond
from cxr_rf.data.sources import Item, Reject, SourceError, excluded
from cxr_rf.data.sources.common import read_csv, require_columns

NAME = "vindr_cxr"
DEIDENTIFIED_RELEASE = True  # public, de-identified: BurnedInAnnotation YES is a flag, not a reject
FILES = (("image_labels_train.csv", "train", "train"), ("image_labels_test.csv", "test", "test"))
TERMS: dict[str, tuple[str, ...]] = {
    "No finding": ("No Finding",),
    "Aortic enlargement": ("Enlarged Cardiomediastinum",),
    "Cardiomegaly": ("Cardiomegaly",),
    "Lung Opacity": ("Lung Opacity",), "Infiltration": ("Lung Opacity",), "ILD": ("Lung Opacity",),
    "Nodule/Mass": ("Lung Lesion",), "Lung tumor": ("Lung Lesion",), "Lung cavity": ("Lung Lesion",),
    "Lung cyst": ("Lung Lesion",),
    "Edema": ("Edema",), "Consolidation": ("Consolidation",), "Pneumonia": ("Pneumonia",),
    "Atelectasis": ("Atelectasis",), "Pneumothorax": ("Pneumothorax",),
    "Pleural effusion": ("Pleural Effusion",), "Pleural thickening": ("Pleural Other",),
    "Clavicle fracture": ("Fracture",), "Rib fracture": ("Fracture",),
}
IGNORED = ("Calcification", "Emphysema", "Enlarged PA", "Mediastinal shift", "Pulmonary fibrosis",
           "Other lesion", "COPD", "Tuberculosis", "Other disease(s)")
# Findings some VinDr label feeds: only these can become negative.
COVERED = tuple(f for f in cond.FINDINGS if any(f in fs for fs in TERMS.values()))
_VALUES = {"0": False, "0.0": False, "1": True, "1.0": True}
# CheXpert's label hierarchy: a positive/uncertain child leaves a negative parent unmentioned.
PARENTS: dict[str, tuple[str, ...]] = {
    "Lung Opacity": ("Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis"),
    "Consolidation": ("Pneumonia",),
    "Enlarged Cardiomediastinum": ("Cardiomegaly",),
}
PATHOLOGIES = tuple(f for f in cond.FINDINGS if f not in ("No Finding", "Support Devices"))

MAPPING = "\n".join(
    ["| source label | CheXpert finding | state |", "|---|---|---|"]
    + [f"| {t} | {', '.join(fs)} | readers positive: 0 -> negative, majority -> positive, minority -> uncertain |"
       for t, fs in TERMS.items()]
    + [f"| {t} | — | ignored (no counterpart) |" for t in IGNORED]
    + ["| (not annotated) | Support Devices | unmentioned |",
       "| (hierarchy) | " + ", ".join(PARENTS) + " | negative -> unmentioned when a child finding "
       "(CheXpert hierarchy) is positive or uncertain |",
       "| (any pathology) | No Finding | negative when a pathology is positive; positive -> uncertain "
       "when a pathology is uncertain |",
       "", "| field | rule |", "|---|---|",
       "| view | PA (the release kept only PA radiographs) |",
       "| sex, age | from the DICOM header by the converter (dicom_meta=True) |",
       "| race | not provided -> unknown |",
       "| split | train/ -> train, test/ -> test (official); an image in both files keeps train |",
       "| pixels | JPEG 2000; BitsStored 10/12 understates the decoded 16-bit values: not masked (imaging) |",
       "| verified | layout, label columns, 3 readers per train image, PA only, DICOM-only sex/age, "
       "BitsStored mismatch (datasets.md) |",
       "| assumed | term -> finding table, vote thresholds, hierarchy and No Finding rules |",
       ""])


def aggregate(readers: list[np.ndarray]) -> np.ndarray:
    """int8[14] states from per-reader bool[14] positives (see the module docstring)."""
    votes = np.sum(readers, axis=0)
    n = len(readers)
    out = np.zeros(len(cond.FINDINGS), np.int8)
    for i, f in enumerate(cond.FINDINGS):
        if f in COVERED:
            k = int(votes[i])
            out[i] = cond.NEGATIVE if k == 0 else cond.POSITIVE if 2 * k > n else cond.UNCERTAIN
    found = (cond.POSITIVE, cond.UNCERTAIN)
    for parent, children in PARENTS.items():
        p = cond.FINDINGS.index(parent)
        if out[p] == cond.NEGATIVE and any(out[cond.FINDINGS.index(c)] in found for c in children):
            out[p] = cond.UNMENTIONED
    pathology = out[[cond.FINDINGS.index(f) for f in PATHOLOGIES]]
    if (pathology == cond.POSITIVE).any():
        out[0] = cond.NEGATIVE
    elif (pathology == cond.UNCERTAIN).any() and out[0] == cond.POSITIVE:
        out[0] = cond.UNCERTAIN
    return out


def _columns(header: list[str], path: str) -> dict[str, str]:
    """Our term -> the file's column name, matched case-insensitively."""
    by_lower = {h.strip().lower(): h for h in header}
    missing = [t for t in TERMS if t.lower() not in by_lower]
    if missing:
        raise SourceError(f"{path} lacks required column(s): {', '.join(missing)}")
    return {t: by_lower[t.lower()] for t in TERMS}


def _reader_vector(row: dict[str, str], columns: dict[str, str]) -> np.ndarray:
    out = np.zeros(len(cond.FINDINGS), bool)
    for term, col in columns.items():
        value = (row.get(col) or "").strip()
        if value not in _VALUES:
            raise ValueError(f"bad value {col}={row.get(col)!r} (expected 0 or 1)")
        if _VALUES[value]:
            for f in TERMS[term]:
                out[cond.FINDINGS.index(f)] = True
    return out


def items(input_dir: str, opts=None) -> Iterator[Item | Reject]:
    """Every image of image_labels_train.csv then image_labels_test.csv, in first-row order."""
    input_dir = os.path.abspath(input_dir)
    ann = os.path.join(input_dir, "annotations")
    present = [f for f in FILES if any(os.path.isfile(os.path.join(ann, f[0] + z)) for z in ("", ".gz"))]
    if not present:
        raise SourceError(f"missing {os.path.join(ann, FILES[0][0])} (and {FILES[1][0]}): "
                          "need at least one VinDr image-label table")
    seen: dict[str, str] = {}
    for fname, split, folder in present:
        path = os.path.join(ann, fname)
        rows = read_csv(path)
        require_columns(rows, ("image_id",), path)
        columns = _columns(list(rows[0].keys()), path)
        readers: dict[str, list[np.ndarray]] = {}
        for n, row in enumerate(rows, 1):
            image = row["image_id"].strip()
            try:
                if not image:
                    raise ValueError("empty image_id")
                vec = _reader_vector(row, columns)
            except ValueError as e:
                yield Reject(f"{fname}:row {n}", str(e))
                if image:
                    readers.setdefault(image, [])  # keeps its order; other readers may be valid
                continue
            readers.setdefault(image, []).append(vec)
        for image, votes in readers.items():
            if image in seen:
                yield excluded(f"{fname}:{image}", f"image also in the official {seen[image]} split")
                continue
            seen[image] = split
            if not votes:
                yield Reject(f"{fname}:{image}", "no valid reader rows")
                continue
            base = os.path.join(input_dir, folder, image)
            img = next((base + ext for ext in (".dicom", ".dcm") if os.path.isfile(base + ext)), None)
            if img is None:
                yield Reject(base + ".dicom", f"image file not found ({fname})")
                continue
            yield Item(path=img, split=split, findings=aggregate(votes), view="PA", source=NAME,
                       patient_id=image, study_id=image, dicom_meta=True)
