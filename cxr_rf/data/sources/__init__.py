"""Raw chest X-ray corpora as streams of ``Item``s for ``cxr_rf.data.convert``.

A source module ``cxr_rf/data/sources/<name>.py`` reads only metadata (CSV, XML, DICOM headers
read with ``stop_before_pixels``) and yields, in a deterministic order, one ``Item`` per image
it can use and one ``Reject`` per row or file it cannot. Pixels are decoded later, in worker
processes, by ``cxr_rf.data.imaging``; ids are salted and hashed by the converter, so a source
never needs the salt and never has to be trusted with privacy.

Each module defines ``NAME`` (a ``conditioning.SOURCES`` value), ``items(input_dir, opts)`` and
``MAPPING`` (a markdown table of how its labels map onto the shared vocabulary). A module may
also define ``load(item, resolution, fit) -> uint16 [R, R]`` to produce pixels itself (the
phantom source does: it has no files); per-image pixel rules that ``imaging`` applies (stretch
to the full range, inversion) are Item fields instead. A module that sets
``DEIDENTIFIED_RELEASE = True`` (a public, already de-identified corpus) has DICOMs flagged
``BurnedInAnnotation YES`` converted and counted as a flag rather than rejected.

Rows a source drops on purpose (authors' exclusions, a patient in two official splits, a
duplicate listing) are ``Reject``s of kind ``EXCLUDED`` (``excluded(path, reason)``): reported
apart from unusable inputs and never counted against ``--max_reject_fraction``. A reason never
names a patient, study or image id (reasons reach ``stats.json``); put the reference in ``path``.
"""
from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

import numpy as np

from cxr_rf import conditioning as cond
from cxr_rf.data.sources.common import SourceError, chexpert_state, read_csv, require_columns

__all__ = ["Item", "Reject", "REJECTED", "EXCLUDED", "excluded", "SourceError", "SourceOptions", "SOURCES", "get", "read_csv",
           "require_columns", "chexpert_state"]

DEFAULT_SALT = "cxr_rf"  # pass a secret --salt for real data: small id spaces are brute-forceable
# Derived, not listed: ``conditioning.SOURCES`` is the one list (its order fixes the token ids
# trained checkpoints use, and conditioning must import without the data package). Every
# value but "unknown" names a module here.
SOURCES: tuple[str, ...] = tuple(s for s in cond.SOURCES if s != "unknown")


@dataclasses.dataclass(frozen=True)
class Item:
    """One image to convert: where its pixels are, plus every other Record field already harmonised."""
    path: str                      # image file path (DICOM/PNG/JPEG), or "<scheme>://..." for a source's own load()
    split: str | None              # "train" | "validation" | "test", or None = assign by patient hash
    findings: np.ndarray           # int8[14] conditioning STATES codes
    sex: str = "unknown"
    age: float = -1.0
    race: str = "unknown"
    view: str = "unknown"
    source: str = "unknown"
    site: str = ""
    patient_id: str = ""           # RAW id (the converter salts+hashes it; sources never hash)
    study_id: str = ""             # RAW id
    report: str = ""
    dicom_meta: bool = False       # True: fill sex/age/view from the DICOM header when they are unknown
    stretch: bool = False          # True: min-max stretch the decoded pixels to 0..65535 (partial-range PNGs)
    invert: bool = False           # True: invert after decoding (a MONOCHROME1 image stored as a raster)


REJECTED = "rejected"   # unreadable or invalid input: counts toward --max_reject_fraction
EXCLUDED = "excluded"   # dropped on purpose (authors' exclusions, split conflicts): reported only


@dataclasses.dataclass(frozen=True)
class Reject:
    """Something a source could not (REJECTED) or should not (EXCLUDED) turn into an Item; the
    conversion records it and goes on. ``reason`` carries no id (it is counted in stats.json)."""
    path: str                      # file or CSV row reference, e.g. "train.csv:row 17"
    reason: str
    kind: str = REJECTED

    def __post_init__(self):
        if self.kind not in (REJECTED, EXCLUDED):
            raise ValueError(f"Reject.kind must be {REJECTED!r} or {EXCLUDED!r}; got {self.kind!r}")


def excluded(path: str, reason: str) -> Reject:
    """An input the source drops on purpose (reported, not counted as a reject)."""
    return Reject(path, reason, EXCLUDED)


def get(name: str) -> ModuleType:
    """The source module called ``name`` (imported on first use, so unused sources cost nothing)."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; valid: {', '.join(SOURCES)}")
    return importlib.import_module(f"{__name__}.{name}")


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """What a source may need; each source checks the fields it uses."""
    input_dir: str | None = None
    num: int | None = None            # phantom: how many studies; raw sources: optional limit
    resolution: int = 64
    seed: int = 0                     # phantom seed
    salt: str = DEFAULT_SALT          # used by the converter only: sources never hash
    labels_csv: str | None = None     # dicom_dir: optional CSV of labels
