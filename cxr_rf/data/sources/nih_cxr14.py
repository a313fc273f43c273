"""NIH ChestX-ray14 (NIH Clinical Center).

On-disk layout (``input_dir`` is the release root)::

    Data_Entry_2017_v2020.csv or Data_Entry_2017.csv (.gz accepted; v2020 preferred when both exist)
        Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age, Patient Gender,
        View Position, OriginalImage[Width, Height], OriginalImagePixelSpacing[x, y]
        (the bracketed headers split into the odd column names "OriginalImage[Width", "Height]",
        "OriginalImagePixelSpacing[x", "y]"; they are not needed and not read)
    train_val_list.txt, test_list.txt   one image name per line (official, patient-disjoint)
    images/*.png  or  images_001/images/*.png ... images_012/images/*.png  (box tarballs / Kaggle)

Images are found by listing those folders once (names only, never pixels).

Label semantics (a decision): the labels come from NLP over reports and list positive mentions
only, so a listed finding is positive and an unlisted one is unmentioned. "No Finding" asserts
that none of NIH's 14 labels applies, so it makes No Finding positive and the ten CheXpert
findings NIH's labels cover negative; Enlarged Cardiomediastinum, Fracture and Support Devices,
which NIH never labels, stay unmentioned. Any mapped positive makes No Finding negative; an
image whose only labels are Emphysema/Fibrosis/Hernia (no CheXpert counterpart) keeps No Finding
unmentioned.
"""
from __future__ import annotations

import os
import re
from typing import Iterator

import numpy as np

from cxr_rf import conditioning as cond
from cxr_rf.data.sources import Item, Reject, SourceError, excluded
from cxr_rf.data.sources.common import read_csv, require_columns

NAME = "nih_cxr14"
DEIDENTIFIED_RELEASE = True  # public, de-identified: BurnedInAnnotation YES is a flag, not a reject
CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
LIST_FILES = (("train_val_list.txt", "train"), ("test_list.txt", "test"))
TERMS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("Atelectasis",), "Cardiomegaly": ("Cardiomegaly",),
    "Consolidation": ("Consolidation",), "Edema": ("Edema",), "Effusion": ("Pleural Effusion",),
    "Infiltration": ("Lung Opacity",), "Mass": ("Lung Lesion",), "Nodule": ("Lung Lesion",),
    "Pleural_Thickening": ("Pleural Other",), "Pneumonia": ("Pneumonia",),
    "Pneumothorax": ("Pneumothorax",),
    "Emphysema": (), "Fibrosis": (), "Hernia": (),  # no CheXpert counterpart: ignored
}
# What NIH's "No Finding" asserts absent: every CheXpert finding one of its labels maps to.
COVERED = tuple(sorted({f for fs in TERMS.values() for f in fs}, key=cond.FINDINGS.index))
_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([YMWD]?)\s*$", re.I)
_UNIT_YEARS = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}

MAPPING = "\n".join(
    ["| source label | CheXpert finding | state |", "|---|---|---|"]
    + [f"| {t} | {', '.join(fs) if fs else '—'} | {'positive' if fs else 'ignored (no counterpart)'} |"
       for t, fs in TERMS.items()]
    + [f"| No Finding | No Finding | positive; {', '.join(COVERED)} negative |",
       "| (label absent) | — | unmentioned; No Finding negative if any mapped label is present |",
       "", "| field | rule |", "|---|---|",
       "| view | View Position PA -> PA, AP -> AP, else unknown |",
       "| sex | Patient Gender M/F, else unknown |",
       "| age | Patient Age as years (\"058Y\", \"58\"; M/W/D units converted); outside 0-120 (the v2017 typos like 412) -> unknown |",
       "| race | not provided -> unknown |",
       "| split | train_val_list.txt -> train, test_list.txt -> test; an unlisted image takes its patient's split (None if the patient is unlisted); an image in both lists, or a patient in both, keeps the first split seen and later images are rejected; no lists at all -> None |",
       ""])


def parse_age(text: str | None) -> float:
    """'058Y', '58', '58.0', '006M', '010W', '021D' -> years; blank, unparseable or > 120 -> -1."""
    m = _AGE_RE.match(text or "")
    if not m:
        return -1.0
    age = float(m.group(1)) * _UNIT_YEARS[m.group(2).upper()]
    return age if 0 <= age <= 120 else -1.0


def findings_from_labels(text: str) -> np.ndarray:
    """int8[14] states from a pipe-separated 'Finding Labels' cell; ValueError for an unknown label."""
    labels = [t.strip() for t in text.split("|") if t.strip()]
    if not labels:
        raise ValueError("empty Finding Labels")
    out = np.zeros(len(cond.FINDINGS), np.int8)
    if labels == ["No Finding"]:
        for f in COVERED:
            out[cond.FINDINGS.index(f)] = cond.NEGATIVE
        out[0] = cond.POSITIVE
        return out
    for t in labels:
        if t == "No Finding":  # contradicted by the other labels: the positives win
            continue
        if t not in TERMS:
            raise ValueError(f"unknown label {t!r} in Finding Labels {text!r}")
        for f in TERMS[t]:
            out[cond.FINDINGS.index(f)] = cond.POSITIVE
    if out[1:].any():
        out[0] = cond.NEGATIVE
    return out


def _image_index(input_dir: str) -> dict[str, str]:
    """File name -> path for every PNG under images/ or images_NNN/[images/]."""
    index: dict[str, str] = {}
    for entry in sorted(os.scandir(input_dir), key=lambda e: e.name):
        if not entry.is_dir() or not (entry.name == "images" or entry.name.startswith("images_")):
            continue
        for folder in (entry.path, os.path.join(entry.path, "images")):
            if os.path.isdir(folder):
                for f in os.scandir(folder):
                    if f.name.lower().endswith(".png"):
                        index.setdefault(f.name, f.path)
    return index


def _read_lists(input_dir: str) -> dict[str, list[str]] | None:
    present = [os.path.isfile(os.path.join(input_dir, f)) for f, _ in LIST_FILES]
    if not any(present):
        return None
    if not all(present):
        missing = [f for (f, _), p in zip(LIST_FILES, present) if not p]
        raise SourceError(f"missing {os.path.join(input_dir, missing[0])} (the official split needs both lists)")
    listed: dict[str, list[str]] = {}
    for fname, split in LIST_FILES:
        with open(os.path.join(input_dir, fname), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    listed.setdefault(line.strip(), []).append(split)
    return listed


def items(input_dir: str, opts=None) -> Iterator[Item | Reject]:
    """Every row of the Data_Entry table, in file order."""
    input_dir = os.path.abspath(input_dir)
    csv_path = next((os.path.join(input_dir, n) for n in CSV_NAMES
                     if any(os.path.isfile(os.path.join(input_dir, n + z)) for z in ("", ".gz"))),
                    os.path.join(input_dir, CSV_NAMES[-1]))
    rows = read_csv(csv_path)
    require_columns(rows, ("Image Index", "Finding Labels", "Patient ID", "Patient Age",
                           "Patient Gender", "View Position"), csv_path)
    listed = _read_lists(input_dir) or {}
    patient_split: dict[str, str] = {}  # the first listed split of each patient wins
    for row in rows:
        splits = listed.get(row["Image Index"].strip())
        if splits:
            patient_split.setdefault(row["Patient ID"].strip(), splits[0])
    images = _image_index(input_dir)
    name = os.path.basename(csv_path)
    for n, row in enumerate(rows, 1):
        ref = f"{name}:row {n}"
        image, patient = row["Image Index"].strip(), row["Patient ID"].strip()
        if not image or not patient:
            yield Reject(ref, "empty Image Index or Patient ID")
            continue
        splits = listed.get(image, [])
        if len(splits) > 1:
            yield excluded(ref, "image is listed in both train_val_list.txt and test_list.txt")
            continue
        split = splits[0] if splits else patient_split.get(patient)
        if split is not None and patient_split.get(patient, split) != split:
            yield excluded(ref, f"patient is also in the official {patient_split[patient]} split")
            continue
        try:
            findings = findings_from_labels(row["Finding Labels"])
        except ValueError as e:
            yield Reject(ref, str(e))
            continue
        if image not in images:
            yield Reject(os.path.join(input_dir, "images", image), f"image file not found ({ref})")
            continue
        sex = row["Patient Gender"].strip().upper()
        view = row["View Position"].strip().upper()
        yield Item(path=images[image], split=split, findings=findings,
                   sex=sex if sex in ("M", "F") else "unknown", age=parse_age(row["Patient Age"]),
                   view=view if view in ("PA", "AP") else "unknown", source=NAME,
                   patient_id=patient, study_id=os.path.splitext(image)[0])
