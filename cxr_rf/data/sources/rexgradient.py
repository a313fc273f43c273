"""ReXGradient-160K (Gradient Health via Rajpurkar lab; Hugging Face release).

ASSUMED layout (the reference marks it "check"; verify against your copy). ``input_dir`` is the
release root::

    metadata/train_metadata.csv, metadata/valid_metadata.csv, metadata/test_metadata.csv
        (.csv.gz accepted; at least one must exist; JSON metadata is not read)
        one row per image: ImagePath, PatientID, PatientSex, PatientAge ("014Y"),
        ImageViewPosition (or ViewPosition), [StudyInstanceUid], Findings, Impression,
        [InstitutionName], [the 14 CheXpert-named label columns, if a labeller was run]
    deid_png/<patient>/<accession>/studies/<StudyUID>/series/<SeriesUID>/instances/<SOP>.png
        (the concatenated ``deid_png.part*`` archive, extracted)

ImagePath is resolved relative to ``input_dir`` after dropping leading "../" components, or
relative to ``input_dir/deid_png``. The release has reports but no labels: findings are
unmentioned unless the table carries CheXpert-named columns (1.0/0.0/-1.0/blank). The split
is the official one given by the file (valid -> validation); a patient found in two files
keeps the first file's split (train, valid, test order) and later rows are rejected.
"""
from __future__ import annotations

import os
import re
from typing import Iterator

import numpy as np

from cxr_rf import conditioning as cond
from cxr_rf.data.sources import Item, Reject, SourceError
from cxr_rf.data.sources.chexpert import LABELS, identity_rows, join_report, label_findings
from cxr_rf.data.sources.common import read_csv, require_columns
from cxr_rf.data.sources.nih_cxr14 import parse_age

NAME = "rexgradient"
FILES = (("train_metadata.csv", "train"), ("valid_metadata.csv", "validation"),
         ("test_metadata.csv", "test"))
_STUDY_RE = re.compile(r"/studies/([^/]+)/")

MAPPING = f"""\
| source label | CheXpert finding | state |
|---|---|---|
{identity_rows()}| (no label columns, the release default) | — | all unmentioned |

| field | rule |
|---|---|
| view | ImageViewPosition (or ViewPosition): PA, POSTERO_ANTERIOR -> PA; AP*, ANTERO_POSTERIOR -> AP; LATERAL, LL, RL, LAT, *LATERAL* -> LATERAL; SUPINE, ERECT, DECUBITUS, KUB, UNKNOWN, blank -> unknown |
| sex | PatientSex M/F, else unknown |
| age | PatientAge DICOM age ("014Y") or years; else unknown |
| race | not provided -> unknown |
| site | InstitutionName when present |
| report | Findings + Impression sections |
| split | train_metadata -> train, valid_metadata -> validation, test_metadata -> test (official) |
"""


def _view(text: str) -> str:
    t = text.strip().upper().replace("-", "_")
    if t in ("PA", "POSTERO_ANTERIOR") or t.startswith("PA "):
        return "PA"
    if t.startswith("AP") or t.startswith("ANTERO_POSTERIOR"):
        return "AP"
    if t in ("LL", "RL", "LAT") or "LATERAL" in t:
        return "LATERAL"
    return "unknown"


def _resolve(input_dir: str, rel: str) -> str:
    parts = [p for p in rel.strip().replace("\\", "/").split("/") if p not in ("", ".", "..")]
    candidates = [os.path.join(input_dir, *parts), os.path.join(input_dir, "deid_png", *parts)]
    return next((c for c in candidates if os.path.isfile(c)), candidates[0])


def items(input_dir: str, opts=None) -> Iterator[Item | Reject]:
    """Every row of the train, valid and test metadata tables, in that order."""
    input_dir = os.path.abspath(input_dir)
    meta = os.path.join(input_dir, "metadata")
    tables = []
    for fname, split in FILES:
        path = os.path.join(meta, fname)
        if os.path.isfile(path) or os.path.isfile(path + ".gz"):
            rows = read_csv(path)
            require_columns(rows, ("ImagePath", "PatientID", "PatientSex", "PatientAge"), path)
            tables.append((fname, split, rows))
    if not tables:
        raise SourceError(f"missing {os.path.join(meta, FILES[0][0])} (or the valid/test metadata tables)")
    first_split: dict[str, str] = {}
    for _, split, rows in tables:
        for row in rows:
            if row["PatientID"].strip():
                first_split.setdefault(row["PatientID"].strip(), split)
    for fname, split, rows in tables:
        header = set(rows[0])
        labelled = all(f in header for f in LABELS)
        view_col = next((c for c in ("ImageViewPosition", "ViewPosition") if c in header), None)
        study_col = next((c for c in ("StudyInstanceUid", "StudyInstanceUID") if c in header), None)
        for n, row in enumerate(rows, 1):
            ref = f"{fname}:row {n}"
            patient = row["PatientID"].strip()
            if not patient or not row["ImagePath"].strip():
                yield Reject(ref, "empty PatientID or ImagePath")
                continue
            if first_split[patient] != split:
                yield Reject(ref, f"patient {patient} is also in the official {first_split[patient]} split")
                continue
            try:
                findings = label_findings(row) if labelled else np.zeros(len(cond.FINDINGS), np.int8)
            except ValueError as e:
                yield Reject(ref, str(e))
                continue
            path = _resolve(input_dir, row["ImagePath"])
            if not os.path.isfile(path):
                yield Reject(path, f"image file not found ({ref})")
                continue
            m = _STUDY_RE.search(path.replace("\\", "/"))
            study = ((row.get(study_col) or "").strip() if study_col else "") or (
                m.group(1) if m else os.path.dirname(row["ImagePath"].strip()))
            sex = row["PatientSex"].strip().upper()
            yield Item(path=path, split=split, findings=findings, sex=sex if sex in ("M", "F") else "unknown",
                       age=parse_age(row["PatientAge"]), view=_view(row.get(view_col, "") if view_col else ""),
                       source=NAME, site=(row.get("InstitutionName") or "").strip(), patient_id=patient,
                       study_id=study, report=join_report(row.get("Findings"), row.get("Impression")))
