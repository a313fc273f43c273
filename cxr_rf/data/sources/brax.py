"""BRAX v1.1 (PhysioNet; Hospital Israelita Albert Einstein, São Paulo).

ASSUMED layout (the reference marks it "check"; this is the most widely documented one,
verify against your copy). ``input_dir`` is the release root::

    master_spreadsheet_update.csv
        PatientID, PatientSex, PatientAge, ViewPosition, PngPath and/or DicomPath (relative to
        input_dir), [AccessionNumber], and the 14 CheXpert-named label columns written by the
        CheXpert labeller (1.0 / 0.0 / -1.0 / blank)
    images/.../*.png   and/or   Anonymized_DICOMs/.../*.dcm

PngPath is used when its file exists, else DicomPath (then the converter may fill missing
sex/age/view from the DICOM header). The study id is AccessionNumber when present, else the
image's folder. PatientAge is read as years ("58", "058Y"), an age band ("20-29" -> its
midpoint) or an open band ("85 or more", "85+" -> 85), since de-identified releases band ages.
"""
from __future__ import annotations

import os
import re
from typing import Iterator

from cxr_rf.data.sources import Item, Reject, SourceError
from cxr_rf.data.sources.chexpert import LABELS, identity_rows, label_findings
from cxr_rf.data.sources.common import read_csv, require_columns
from cxr_rf.data.sources.nih_cxr14 import parse_age

NAME = "brax"
CSV_NAME = "master_spreadsheet_update.csv"
_BAND_RE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_OPEN_RE = re.compile(r"^\s*(\d+)\s*(\+|or more|or older|and over)\s*$", re.I)

MAPPING = f"""\
| source label | CheXpert finding | state |
|---|---|---|
{identity_rows()}
| field | rule |
|---|---|
| view | ViewPosition starting with PA -> PA, with AP (e.g. "AP LLD") -> AP; L, LL, RL, LAT, LATERAL -> LATERAL; else unknown |
| sex | PatientSex M/Male -> M, F/Female -> F, else unknown |
| age | PatientAge years ("58", "058Y"), band "20-29" -> midpoint, "85 or more"/"85+" -> 85, else unknown |
| race | not provided -> unknown |
| split | none official -> None (the converter splits by hashed PatientID) |
"""


def brax_age(text: str | None) -> float:
    """Years from a plain/DICOM age, an age band or an open-ended band; -1 when unknown."""
    text = (text or "").strip()
    m = _BAND_RE.match(text)
    if m:
        return (int(m.group(1)) + int(m.group(2))) / 2
    m = _OPEN_RE.match(text)
    if m:
        return float(m.group(1))
    return parse_age(text)


def _view(text: str) -> str:
    t = text.strip().upper()
    if t.startswith("PA"):
        return "PA"
    if t.startswith("AP"):
        return "AP"
    return "LATERAL" if t in ("L", "LL", "RL", "LAT", "LATERAL") else "unknown"


def items(input_dir: str, opts=None) -> Iterator[Item | Reject]:
    """Every row of the master spreadsheet, in file order."""
    input_dir = os.path.abspath(input_dir)
    csv_path = os.path.join(input_dir, CSV_NAME)
    rows = read_csv(csv_path)
    require_columns(rows, ("PatientID", "PatientSex", "PatientAge", "ViewPosition") + LABELS, csv_path)
    if not ({"PngPath", "DicomPath"} & set(rows[0])):
        raise SourceError(f"{csv_path} lacks required column(s): PngPath or DicomPath")
    for n, row in enumerate(rows, 1):
        ref = f"{CSV_NAME}:row {n}"
        patient = row["PatientID"].strip()
        if not patient:
            yield Reject(ref, "empty PatientID")
            continue
        try:
            findings = label_findings(row)
        except ValueError as e:
            yield Reject(ref, str(e))
            continue
        candidates = [os.path.join(input_dir, os.path.normpath(row[c].strip()))
                      for c in ("PngPath", "DicomPath") if (row.get(c) or "").strip()]
        path = next((c for c in candidates if os.path.isfile(c)), None)
        if path is None:
            yield Reject(candidates[0] if candidates else ref, f"image file not found ({ref})")
            continue
        sex = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}.get(row["PatientSex"].strip().upper(), "unknown")
        study = (row.get("AccessionNumber") or "").strip() or os.path.relpath(os.path.dirname(path), input_dir)
        yield Item(path=path, split=None, findings=findings, sex=sex, age=brax_age(row["PatientAge"]),
                   view=_view(row["ViewPosition"]), source=NAME, patient_id=patient, study_id=study,
                   dicom_meta=not path.lower().endswith(".png"))
