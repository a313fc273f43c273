"""Any folder of DICOM files, with an optional CSV of CheXpert-named labels.

    python -m cxr_rf.data.convert --source dicom_dir --input DIR [--labels labels.csv] ...

Files: every ``*.dcm``/``*.dicom`` below DIR, plus extension-less files that carry the DICM
preamble (PACS exports often have no extension); DICOMDIR index files are skipped, they hold
no image. Only headers are read here (``stop_before_pixels``); pixels are decoded by the
converter's workers.

Metadata: patient = PatientID (else StudyInstanceUID, else the file: such a file is its own
patient), study = StudyInstanceUID; sex / age / view from PatientSex, PatientAge,
ViewPosition unless the CSV gives them. InstitutionName and every other header field are
left behind: site is "" (an institution name identifies people as much as a name does).
Split: by a hash of the patient id.

Labels CSV (optional): one key column, ``SOPInstanceUID`` or ``file``/``filename``/``path``
(matched against the path relative to DIR, then the base name); any of the 14 CheXpert
finding columns (1 / 0 / -1 / blank, absent columns are "unmentioned"); optional ``Sex``
(M/F/Male/Female), ``Age`` (years), ``View`` or ``AP/PA`` (PA/AP/LATERAL/LL). Images with no
row keep all findings "unmentioned". A row with an invalid value rejects its image.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from cxr_rf import conditioning as cond
from cxr_rf.data.imaging import is_dicom
from cxr_rf.data.sources import Item, Reject, SourceError
from cxr_rf.data.sources.common import chexpert_state, dicom_demographics, read_csv, read_dicom_header

NAME = "dicom_dir"
MAPPING = """\
| input | Record field |
|---|---|
| labels CSV column named like a CheXpert finding: 1 / 0 / -1 / blank | positive / negative / uncertain / unmentioned |
| finding column absent, or image without a CSV row | unmentioned |
| CSV `Sex` M, Male / F, Female (else header PatientSex M / F) | sex M / F, otherwise unknown |
| CSV `Age` (else header PatientAge nnnY/M/W/D) | age in years, otherwise -1 |
| CSV `View` or `AP/PA` (else header ViewPosition) PA / AP / LL, RL, LATERAL | view PA / AP / LATERAL |
| PatientID (else StudyInstanceUID, else file path) | patient_id (salted hash) |
| StudyInstanceUID | study_id (salted hash) |
| any other header field (names, institution, dates, ...) | not carried |
"""
KEY_COLUMNS = ("SOPInstanceUID", "file", "filename", "path")
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}
_VIEW = {"PA": "PA", "AP": "AP", "LL": "LATERAL", "RL": "LATERAL", "LATERAL": "LATERAL",
         "LAT": "LATERAL"}


def dicom_files(root: str) -> list[str]:
    """DICOM files below ``root`` in a deterministic (sorted relative path) order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            path = os.path.join(dirpath, f)
            ext = os.path.splitext(f)[1].lower()
            if ext in (".dcm", ".dicom") or (not ext and is_dicom(path)):
                found.append(path)
    return sorted(found, key=lambda p: os.path.relpath(p, root))


def items(input_dir: str, opts) -> Iterator[Item | Reject]:
    """One Item per image DICOM under ``input_dir`` (a Reject for unreadable headers)."""
    files = dicom_files(input_dir)
    if not files:
        raise SourceError(f"no DICOM files (*.dcm, or files with the DICM preamble) under {input_dir}")
    labels = _Labels(opts.labels_csv) if getattr(opts, "labels_csv", None) else None
    for path in files:
        rel = os.path.relpath(path, input_dir)
        try:
            ds = read_dicom_header(path)
        except Exception as e:  # noqa: BLE001 - pydicom raises many types for broken files
            message = " ".join(str(e).replace(path, "<file>").replace(rel, "<file>").split())
            yield Reject(path, f"not a readable DICOM file: {message[:200]}")
            continue
        meta = getattr(ds, "file_meta", None)
        if "DirectoryRecordSequence" in ds or (
                meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR_CLASS):
            continue  # a DICOMDIR indexes other files; it is not an image
        sop = str(ds.get("SOPInstanceUID", "") or "").strip()
        study = str(ds.get("StudyInstanceUID", "") or "").strip()
        patient = str(ds.get("PatientID", "") or "").strip() or study or sop or rel
        fields = dicom_demographics(ds)
        findings = np.full(len(cond.FINDINGS), cond.UNMENTIONED, np.int8)
        if labels is not None:
            row = labels.find(rel, sop)
            if row is not None:
                try:
                    findings, overrides = labels.parse(row)
                except ValueError as e:
                    yield Reject(f"{labels.name}:row {row['__row__']} (image {rel})", str(e))
                    continue
                fields.update(overrides)
        yield Item(path=path, split=None, findings=findings, source=NAME, patient_id=patient,
                   study_id=study, **fields)


class _Labels:
    """The optional labels CSV, indexed by relative path, base name and SOPInstanceUID."""

    def __init__(self, csv_path: str):
        self.name = os.path.basename(csv_path)
        rows = read_csv(csv_path)
        header = list(rows[0].keys()) if rows else []
        keys = [c for c in KEY_COLUMNS if c in header]
        if not keys:
            raise SourceError(f"{csv_path} needs a key column: one of {', '.join(KEY_COLUMNS)}")
        self.findings = [f for f in cond.FINDINGS if f in header]
        if not self.findings:
            raise SourceError(f"{csv_path} has none of the CheXpert finding columns "
                              f"({', '.join(cond.FINDINGS[:3])}, ...)")
        self.index: dict[str, dict[str, str]] = {}
        for n, row in enumerate(rows, start=2):  # row 1 is the header
            row["__row__"] = str(n)
            for k in keys:
                value = (row.get(k) or "").strip()
                if value:
                    self.index.setdefault(f"{k}:{value}", row)
        self.keys = keys

    def find(self, rel: str, sop: str) -> dict[str, str] | None:
        candidates = [f"SOPInstanceUID:{sop}"] if sop else []
        for k in ("file", "filename", "path"):
            candidates += [f"{k}:{rel}", f"{k}:{rel.replace(os.sep, '/')}", f"{k}:{os.path.basename(rel)}"]
        return next((self.index[c] for c in candidates if c in self.index), None)

    def parse(self, row: dict[str, str]) -> tuple[np.ndarray, dict]:
        findings = np.full(len(cond.FINDINGS), cond.UNMENTIONED, np.int8)
        for f in self.findings:
            try:
                findings[cond.FINDINGS.index(f)] = chexpert_state(row.get(f))
            except ValueError as e:
                raise ValueError(f"column {f!r}: {e}") from None
        out: dict = {}
        sex = (row.get("Sex") or "").strip().upper()
        if sex:
            out["sex"] = _SEX.get(sex, "unknown")
        age = (row.get("Age") or "").strip()
        if age:
            try:
                out["age"] = float(age)
            except ValueError:
                raise ValueError(f"column 'Age': {age!r} is not a number") from None
        view = (row.get("View") or row.get("AP/PA") or "").strip().upper()
        if view:
            out["view"] = _VIEW.get(view, "unknown")
        return findings, out
