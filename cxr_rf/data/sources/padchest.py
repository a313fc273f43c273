"""PadChest (BIMCV, Hospital San Juan, Alicante).

On-disk layout (``input_dir`` is the release root)::

    PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz)
        ImageID, ImageDir, StudyDate_DICOM, StudyID, PatientID, PatientBirth, PatientSex_DICOM,
        ViewPosition_DICOM, Projection, ..., PhotometricInterpretation_DICOM, BitsStored_DICOM,
        ..., Report, MethodLabel, Labels, ...
    0/<ImageID> ... 54/<ImageID>     16-bit PNGs, one folder per zip (ImageDir), or
    <ImageID>                        the same files in one flat folder (as many mirrors ship it)

VERIFIED against ``../shared/reference/datasets.md`` (the real release and public loaders):
the CSV name and columns used here; 16-bit PNGs in ImageDir folders, and mirrors with one flat
folder (an image is looked up in ``<input>/<ImageDir>/<ImageID>`` first, then
``<input>/<ImageID>``); the 16-bit PNGs use only part of the range (loaders rescale per
image); rows whose PhotometricInterpretation_DICOM is MONOCHROME1 need inverting; ``Report``
is preprocessed, stemmed Spanish (so it is NOT used as a report: records get an empty report);
about 21 PNGs are truncated (the pixel decoder rejects those, not this module).

Pixels: decoded by ``imaging`` (16-bit kept, 8-bit x257), then stretched per image to the
full 0..65535 range (``Item.stretch``: min-max, as ``imaging`` does for a DICOM without a VOI
window, so PadChest is not left dark next to every other source), then inverted for
MONOCHROME1 rows (``Item.invert``, set here from the row's PhotometricInterpretation_DICOM).

ASSUMED: the label-term mapping below (our reading of the terms, not the authors'); that the
terms are positive mentions only (negated findings are not listed), so a finding with no term
stays unmentioned; "normal" asserts the whole study is normal: No Finding positive and the 12
pathologies negative (Support Devices stays unmentioned unless a device term is listed); if a
pathology term contradicts it, the pathology wins and No Finding becomes negative. Terms not in
the table (about 150 of PadChest's ~190, e.g. 'aortic elongation', 'scoliosis', 'COPD signs')
leave findings unmentioned. A blank Labels cell keeps the image with everything unmentioned.
A blank or other PhotometricInterpretation_DICOM is treated as MONOCHROME2 (not inverted).

``Labels`` is a stringified Python list of free (Spanish-derived, English) terms, e.g.
"['cardiomegaly', 'pleural effusion']"; terms are trimmed and lower-cased before lookup.
Rows with Projection EXCLUDE are images the dataset authors excluded on purpose; they are
reported as excluded (not rejected) with that reason, never converted.
"""
from __future__ import annotations

import ast
import os
from typing import Iterator

import numpy as np

from cxr_rf import conditioning as cond
from cxr_rf.data.sources import Item, Reject, excluded
from cxr_rf.data.sources.common import read_csv, require_columns

NAME = "padchest"
DEIDENTIFIED_RELEASE = True  # public, de-identified: BurnedInAnnotation YES is a flag, not a reject
CSV_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
_GROUPS: dict[str, tuple[str, ...]] = {
    "No Finding": ("normal",),
    "Enlarged Cardiomediastinum": ("mediastinal enlargement", "superior mediastinal enlargement"),
    "Cardiomegaly": ("cardiomegaly",),
    "Lung Opacity": ("infiltrates", "alveolar pattern", "interstitial pattern", "ground glass pattern",
                     "reticular interstitial pattern", "reticulonodular interstitial pattern",
                     "increased density", "miliary opacities"),
    "Lung Lesion": ("nodule", "multiple nodules", "mass", "pulmonary mass", "lung metastasis",
                    "cavitation", "lepidic adenocarcinoma"),
    "Edema": ("pulmonary edema",),
    "Consolidation": ("consolidation",),
    "Pneumonia": ("pneumonia", "atypical pneumonia"),
    "Atelectasis": ("atelectasis", "laminar atelectasis", "segmental atelectasis", "lobar atelectasis",
                    "total atelectasis", "round atelectasis", "atelectasis basal"),
    "Pneumothorax": ("pneumothorax", "hydropneumothorax"),
    "Pleural Effusion": ("pleural effusion", "loculated pleural effusion", "loculated fissural effusion",
                         "hydropneumothorax", "costophrenic angle blunting", "empyema"),
    "Pleural Other": ("pleural thickening", "apical pleural thickening", "calcified pleural thickening",
                      "pleural plaques", "calcified pleural plaques", "asbestosis signs"),
    "Fracture": ("fracture", "rib fracture", "callus rib fracture", "clavicle fracture",
                 "humeral fracture", "vertebral fracture"),
    "Support Devices": ("pacemaker", "dual chamber device", "single chamber device", "electrical device",
                        "central venous catheter", "central venous catheter via jugular vein",
                        "central venous catheter via subclavian vein",
                        "central venous catheter via umbilical vein", "reservoir central venous catheter",
                        "catheter", "endotracheal tube", "nsg tube", "tracheostomy tube", "chest drain tube",
                        "heart valve present", "artificial heart valve", "artificial mitral heart valve",
                        "artificial aortic heart valve"),
}
TERMS: dict[str, tuple[str, ...]] = {}
for _finding, _terms in _GROUPS.items():
    for _t in _terms:
        TERMS[_t] = TERMS.get(_t, ()) + (_finding,)
PATHOLOGIES = tuple(f for f in cond.FINDINGS if f not in ("No Finding", "Support Devices"))
PROJECTIONS = {"PA": "PA", "AP": "AP", "AP_HORIZONTAL": "AP", "L": "LATERAL", "COSTAL": "unknown",
               "UNK": "unknown", "": "unknown"}

MAPPING = "\n".join(
    ["| source label | CheXpert finding | state |", "|---|---|---|"]
    + [f"| {t} | {', '.join(fs)} | positive |" for t, fs in TERMS.items() if t != "normal"]
    + [f"| normal | No Finding | positive; {', '.join(PATHOLOGIES)} negative unless a pathology term is also listed |",
       "| any other term | — | ignored (finding stays unmentioned) |",
       "", "| field | rule |", "|---|---|",
       "| view | Projection PA -> PA, AP and AP_horizontal -> AP, L -> LATERAL, COSTAL (rib views), UNK or blank -> unknown (kept); EXCLUDE -> excluded (on purpose, by the dataset authors; not a reject) |",
       "| sex | PatientSex_DICOM M/F, else unknown |",
       "| age | year of StudyDate_DICOM - PatientBirth (a year); outside 0-120 or missing -> unknown |",
       "| race | not provided -> unknown |",
       "| report | none: the Report column is preprocessed, stemmed Spanish tokens, not text (verified: reference) |",
       "| image | <input>/<ImageDir>/<ImageID>, else flat <input>/<ImageID> (verified: reference); 16-bit rescaled per image to the full range; PhotometricInterpretation_DICOM MONOCHROME1 inverted (verified: reference) |",
       "| split | none official -> None (the converter splits by hashed PatientID) |",
       ""])


def findings_from_terms(terms: list[str]) -> np.ndarray:
    """int8[14] states from PadChest's (normalised) label terms."""
    out = np.zeros(len(cond.FINDINGS), np.int8)
    for t in terms:
        for f in TERMS.get(t, ()):
            out[cond.FINDINGS.index(f)] = cond.POSITIVE
    pathology = any(out[cond.FINDINGS.index(f)] == cond.POSITIVE for f in PATHOLOGIES)
    if pathology:
        out[0] = cond.NEGATIVE
    elif out[0] == cond.POSITIVE:
        for f in PATHOLOGIES:
            out[cond.FINDINGS.index(f)] = cond.NEGATIVE
    return out


def parse_labels(text: str) -> list[str]:
    """"['a', ' b']" -> ['a', 'b']; blank/'nan' -> []; ValueError if not a list of strings."""
    text = (text or "").strip()
    if text.lower() in ("", "nan", "none"):
        return []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"Labels is not a list literal: {text[:60]!r}") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"Labels is not a list of strings: {text[:60]!r}")
    return [v.strip().lower() for v in value if v.strip()]


def _age(study_date: str, birth: str) -> float:
    try:
        age = int(study_date.strip()[:4]) - int(float(birth))
    except ValueError:
        return -1.0
    return float(age) if 0 <= age <= 120 else -1.0


def _image_path(input_dir: str, image_dir: str, image: str) -> tuple[str | None, list[str]]:
    """(the existing file or None, the candidates tried): <ImageDir>/<ImageID>, then flat <ImageID>."""
    candidates = []
    try:
        candidates.append(os.path.join(input_dir, str(int(float(image_dir))), image))
    except (ValueError, OverflowError):
        pass  # a bad ImageDir still finds the image in a flat folder
    candidates.append(os.path.join(input_dir, image))
    return next((c for c in candidates if os.path.isfile(c)), None), candidates


def items(input_dir: str, opts=None) -> Iterator[Item | Reject]:
    """Every row of the labels table, in file order."""
    input_dir = os.path.abspath(input_dir)
    csv_path = os.path.join(input_dir, CSV_NAME)
    rows = read_csv(csv_path)
    require_columns(rows, ("ImageID", "ImageDir", "StudyID", "PatientID", "PatientBirth",
                           "PatientSex_DICOM", "Projection", "StudyDate_DICOM", "Labels"), csv_path)
    for n, row in enumerate(rows, 1):
        ref = f"{CSV_NAME}:row {n}"
        image, patient = row["ImageID"].strip(), row["PatientID"].strip()
        if not image or not patient:
            yield Reject(ref, "empty ImageID or PatientID")
            continue
        if os.path.basename(image) != image or image in (".", ".."):
            yield Reject(ref, "ImageID is not a file name")
            continue
        projection = row["Projection"].strip().upper()
        if projection == "EXCLUDE":
            yield excluded(ref, "intentionally excluded: Projection is EXCLUDE (the PadChest authors "
                              "marked this image as not to be used)")
            continue
        try:
            findings = findings_from_terms(parse_labels(row["Labels"]))
        except ValueError as e:
            yield Reject(ref, str(e))
            continue
        path, tried = _image_path(input_dir, row["ImageDir"].strip(), image)
        if path is None:
            bad_dir = "" if len(tried) > 1 else f"; ImageDir {row['ImageDir']!r} is not a folder number"
            yield Reject(tried[0], f"image file not found in its ImageDir folder or the flat folder "
                                   f"({ref}{bad_dir})")
            continue
        sex = row["PatientSex_DICOM"].strip().upper()
        # The Report column is stemmed Spanish tokens, not text: never passed on as a report.
        photometric = (row.get("PhotometricInterpretation_DICOM") or "").strip().upper()
        yield Item(path=path, split=None, findings=findings, sex=sex if sex in ("M", "F") else "unknown",
                   age=_age(row["StudyDate_DICOM"], row["PatientBirth"]),
                   view=PROJECTIONS.get(projection, "unknown"), source=NAME, patient_id=patient,
                   study_id=row["StudyID"].strip(), report="", stretch=True,
                   invert=photometric == "MONOCHROME1")

