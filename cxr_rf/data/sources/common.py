"""Helpers shared by source modules: tolerant CSV reading, column checks, CheXpert label states."""
from __future__ import annotations

import csv
import gzip
import os
from typing import Iterable, Sequence

from cxr_rf import conditioning as cond
from cxr_rf import errors


class SourceError(errors.UserError):
    """Unusable input as a whole (missing required CSV, empty input): one-line message naming the expected file."""


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of ``path`` as dicts; accepts ``x.csv`` or ``x.csv.gz`` whichever exists.

    Corpora ship their tables both ways (MIMIC gzips, CheXpert does not), so a source names
    the plain file and this finds either. Raises SourceError naming the expected file if
    neither exists.
    """
    path = os.fspath(path)
    base = path[:-3] if path.endswith(".gz") else path
    for candidate in (path, base, base + ".gz"):
        if os.path.isfile(candidate):
            break
    else:
        raise SourceError(f"missing required file {base} (or {base}.gz)")
    opener = gzip.open if candidate.endswith(".gz") else open
    # utf-8-sig: some tables carry a BOM that would otherwise corrupt the first column name.
    with opener(candidate, "rt", encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def require_columns(rows: Sequence[dict[str, str]] | Iterable[str], required: Iterable[str],
                    file: str | os.PathLike) -> None:
    """Raise SourceError naming ``file`` and the columns of ``required`` that ``rows`` lacks.

    ``rows`` is the list from ``read_csv`` (its first row's keys are the header) or a header.
    """
    required = list(required)
    if isinstance(rows, (list, tuple)) and not rows:
        raise SourceError(f"{os.fspath(file)} has no rows (expected columns: {', '.join(required)})")
    if isinstance(rows, (list, tuple)) and isinstance(rows[0], dict):
        header = set(rows[0].keys())
    else:
        header = set(rows)
    missing = [c for c in required if c not in header]
    if missing:
        raise SourceError(f"{os.fspath(file)} lacks required column(s): {', '.join(missing)}")


_CHEXPERT = {"1": cond.POSITIVE, "1.0": cond.POSITIVE, "0": cond.NEGATIVE, "0.0": cond.NEGATIVE,
             "-1": cond.UNCERTAIN, "-1.0": cond.UNCERTAIN, "": cond.UNMENTIONED}


def chexpert_state(value: str | None) -> int:
    """CheXpert-style label cell -> STATES code; blank is 'unmentioned', never 'negative'."""
    key = "" if value is None else str(value).strip()
    if key not in _CHEXPERT:
        raise ValueError(f"label value {value!r} is not one of 1, 0, -1 or blank")
    return _CHEXPERT[key]


_VIEWS = {"PA": "PA", "AP": "AP", "LL": "LATERAL", "RL": "LATERAL", "LATERAL": "LATERAL",
          "LAT": "LATERAL", "L": "LATERAL"}
_AGE_UNITS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def dicom_demographics(ds) -> dict:
    """sex / age / view from a pydicom header, "unknown"/-1.0 where absent or malformed.

    An age of zero years ("000Y") is a missing value, not a newborn: VinDr-CXR writes it for
    unknown ages (a newborn's age is given in days, weeks or months: "003D").
    """
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    age_text = str(ds.get("PatientAge", "") or "").strip().upper()  # e.g. "065Y", "006M"
    age = -1.0
    if (len(age_text) >= 2 and age_text[-1] in _AGE_UNITS and age_text[:-1].isdigit()
            and not (age_text[-1] == "Y" and int(age_text[:-1]) == 0)):
        years = int(age_text[:-1]) * _AGE_UNITS[age_text[-1]]
        age = years if years < 150 else -1.0
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    return {"sex": sex if sex in ("M", "F") else "unknown", "age": float(age),
            "view": _VIEWS.get(view, "unknown")}


def read_dicom_header(path: str | os.PathLike):
    """The header of a DICOM file (no pixels); pydicom's errors propagate for the caller to reject."""
    import warnings

    import pydicom
    with warnings.catch_warnings():  # non-conformant values are common and harmless here
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
