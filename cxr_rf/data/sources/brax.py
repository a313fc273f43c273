"""BRAX v1.1 (PhysioNet; Hospital Israelita Albert Einstein, São Paulo).

ASSUMED layout (the reference marks it "check"; this is the most widely documented one,
verify against your copy). ``input_dir`` is the release root::

    master_spreadsheet_update.csv
        PatientID, PatientSex, PatientAge, ViewPosition, PngPath and/or DicomPath (relative to
        input_dir), [AccessionNumber], and the 14 CheXpert-named label columns written by the
        CheXpert labeller (1.0 / 0.0 / -1.0 / blank)
    images/.../*.png   and/or   Anonymized_DICOMs/.../*.dcm

PngPath is used when its file exists, else DicomPath (then the converter may fill missing
sex/age/view from the DICOM header). The 16-bit PNGs use only part of the range, so PNG items
are stretched per image to 0..65535 (``Item.stretch``, as for PadChest); a DICOM's VOI/window
already spans the full range. The study id is AccessionNumber when present, else the
image's folder.

PatientAge is the START of a 5-year band (``../shared/reference/datasets.md``: "60" = 60-64,
the last band "85 or more"): a multiple of 5 becomes the band's midpoint (60 -> 62.5), "85 or
more" (or "85+") -> 87.5, the midpoint of an assumed 85-89 band (the open band has no upper end;
a decision). An explicit band "20-29" -> its midpoint; a plain number that is not a multiple
of 5 (not a band start) and a DICOM-style age ("058Y") are taken as exact years.

Verified (reference): the spreadsheet name and columns, DICOM and PNG paths, the age bands.
Assumed (marked "check" in the reference until real files are seen): paths relative to the
release root, labels as CheXpert labeller values, the ViewPosition codes below.
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
DEIDENTIFIED_RELEASE = True  # public, de-identified: BurnedInAnnotation YES is a flag, not a reject
CSV_NAME = "master_spreadsheet_update.csv"
_BAND_RE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_START_RE = re.compile(r"^\d+(\.0*)?$")  # the spreadsheet's plain band start, "60" or "60.0"
_OPEN_RE = re.compile(r"^\s*(\d+)\s*(\+|or more|or older|and over)\s*$", re.I)

MAPPING = f"""\
| source label | CheXpert finding | state |
|---|---|---|
{identity_rows()}
| field | rule |
|---|---|
| view | ViewPosition starting with PA -> PA, with AP (e.g. "AP LLD") -> AP; L, LL, RL, LAT, LATERAL -> LATERAL; else unknown |
| sex | PatientSex M/Male -> M, F/Female -> F, else unknown |
| age | PatientAge is a 5-year band start: "60" -> 62.5 (60-64); "85 or more"/"85+" -> 87.5 (assumed 85-89); band "20-29" -> midpoint; plain non-multiple of 5 or DICOM-style "058Y" -> exact years; else unknown |
| verified | spreadsheet name and columns, DicomPath/PngPath, age bands (datasets.md) |
| assumed | relative paths, CheXpert-labeller label values, ViewPosition codes |
| race | not provided -> unknown |
| image | PngPath if the file exists (16-bit, stretched per image to the full range), else DicomPath |
| split | none official -> None (the converter splits by hashed PatientID) |
"""


BAND = 5  # PatientAge "60" means 60-64


def brax_age(text: str | None) -> float:
    """Years (band midpoint) from a band start, an open band or an explicit band; -1 when unknown."""
    text = (text or "").strip()
    m = _BAND_RE.match(text)
    if m:
        return (int(m.group(1)) + int(m.group(2))) / 2
    m = _OPEN_RE.match(text)
    if m:
        return int(m.group(1)) + BAND / 2
    years = parse_age(text)
    if _START_RE.match(text) and years >= 0 and int(years) % BAND == 0:
        return years + BAND / 2  # a band start: its midpoint
    return years


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
                   dicom_meta=not path.lower().endswith(".png"), stretch=path.lower().endswith(".png"))
