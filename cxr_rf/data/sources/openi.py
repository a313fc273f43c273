"""Open-i / Indiana University chest X-ray collection (NLM).

On-disk layout (``input_dir`` holds the two extracted archives NLMCXR_reports.tgz and NLMCXR_png.tgz)::

    ecgen-radiology/1.xml ...   one report each: <uId id="CXR1"/>, AbstractText Label=COMPARISON/
                                INDICATION/FINDINGS/IMPRESSION, <MeSH><major>/<automatic> terms,
                                <parentImage id="CXR1_1_IM-0001-3001"> per image
    NLMCXR_png/CXR1_1_IM-0001-3001.png

MeSH terms look like "Cardiomegaly/borderline" or "Opacity/lung/apex/left/mild": the head (the
part before the first "/", lower-cased) picks the finding and the qualifiers refine it. Terms are
positive indexing only, so findings without a term stay unmentioned; "normal" means a normal
report (No Finding positive, the 12 pathologies negative unless a pathology term contradicts
it, which then wins). A "borderline" qualifier makes the finding uncertain. Major and automatic
terms are both used.

View: the XML does not record it per image (the caption names the study's views, "PA and
Lateral", not which image is which; the image-id suffix is not a reliable marker); the views
are in the headers of the DICOM release (NLMCXR_dcm.tgz). When ``input_dir`` holds the optional
table ``indiana_projections.csv`` (the widely used per-image table derived from those DICOMs:
uid, filename, projection Frontal/Lateral; a ``ViewPosition`` column, as in a header dump, is
used when present) each image takes its view from it: ViewPosition PA/AP/LL/LATERAL, else
projection Lateral -> LATERAL, Frontal -> unknown (frontal, but PA vs AP not recorded).
Rows are matched to parentImage ids by report number and IM-part
("CXR1_1_IM-0001-3001" <-> "1_IM-0001-3001.dcm.png"); unmatched images keep view unknown.
No demographics and no patient ids are released: each report (uId) is its own patient and the
converter splits by its hash. Reports without images are skipped silently (nothing to convert).

Verified (``../shared/reference/datasets.md``): the XML layout and sections, parentImage ids,
NLMCXR_png names, no view in the XML (views only in the DICOM metadata), and the MeSH variants
"Pulmonary Congestion", "Pleural Effusions", "Effusion", "Pleural Thickening", "Infiltrates".
Assumed: the head -> finding table (e.g. Pulmonary Congestion -> Edema as CheXpert's labeller
does, bare Effusion -> Pleural Effusion), the name and columns of the optional view table,
"normal" as a whole-study negative.
"""
from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from typing import Iterator

import numpy as np

from cxr_rf import conditioning as cond
from cxr_rf.data.sources import Item, Reject, SourceError
from cxr_rf.data.sources.chexpert import join_report
from cxr_rf.data.sources.common import read_csv, require_columns

NAME = "openi"
DEIDENTIFIED_RELEASE = True  # public, de-identified: BurnedInAnnotation YES is a flag, not a reject
HEADS: dict[str, str] = {
    "cardiomegaly": "Cardiomegaly",
    "pleural effusion": "Pleural Effusion", "pleural effusions": "Pleural Effusion",
    "effusion": "Pleural Effusion",  # bare "Effusion": pericardial effusion is its own term
    "pneumothorax": "Pneumothorax",
    "opacity": "Lung Opacity", "infiltrate": "Lung Opacity", "infiltrates": "Lung Opacity",
    "airspace disease": "Lung Opacity", "density": "Lung Opacity",
    "nodule": "Lung Lesion", "mass": "Lung Lesion", "lung neoplasms": "Lung Lesion",
    "edema": "Edema", "pulmonary edema": "Edema", "pulmonary congestion": "Edema",
    "pleural thickening": "Pleural Other",
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia",
    "atelectasis": "Atelectasis", "pulmonary atelectasis": "Atelectasis", "atelectases": "Atelectasis",
    "fractures, bone": "Fracture", "fracture": "Fracture", "rib fractures": "Fracture",
    "catheters, indwelling": "Support Devices", "tube, inserted": "Support Devices",
    "pacemaker, artificial": "Support Devices", "medical device": "Support Devices",
    "implanted medical device": "Support Devices", "central venous catheters": "Support Devices",
    "heart valve prosthesis": "Support Devices",
}
# (head, qualifier) pairs: a generic head that names a CheXpert finding only with that qualifier.
QUALIFIED: dict[tuple[str, str], str] = {
    ("thickening", "pleura"): "Pleural Other",
    ("mediastinum", "enlarged"): "Enlarged Cardiomediastinum",
    ("mediastinum", "widened"): "Enlarged Cardiomediastinum",
    ("cardiac shadow", "enlarged"): "Cardiomegaly",
    ("heart", "enlarged"): "Cardiomegaly",
}
PATHOLOGIES = tuple(f for f in cond.FINDINGS if f not in ("No Finding", "Support Devices"))

MAPPING = "\n".join(
    ["| source label | CheXpert finding | state |", "|---|---|---|"]
    + [f"| {h} | {f} | positive (uncertain with a 'borderline' qualifier) |" for h, f in HEADS.items()]
    + [f"| {h}/…{q}… | {f} | positive |" for (h, q), f in QUALIFIED.items()]
    + [f"| normal | No Finding | positive; {', '.join(PATHOLOGIES)} negative unless a pathology term is also present |",
       "| any other term (e.g. Lung/hypoinflation, Calcified Granuloma, No Indexing) | — | ignored (unmentioned) |",
       "", "| field | rule |", "|---|---|",
       "| view | optional indiana_projections.csv (from the NLMCXR DICOMs): ViewPosition PA/AP/LL/LATERAL, "
       "else projection Lateral -> LATERAL, Frontal -> unknown; without it (the XML has no view) -> unknown |",
       "| verified | XML layout, parentImage ids, PNG names, views only in DICOM metadata, the MeSH "
       "variants listed (datasets.md) |",
       "| assumed | head -> finding table, optional view table name/columns, normal -> negatives |",
       "| sex, age, race | not released -> unknown |",
       "| report | AbstractText FINDINGS + IMPRESSION |",
       "| split | none official -> None; each report (uId) is its own patient |",
       ""])


def findings_from_mesh(terms: list[str]) -> np.ndarray:
    """int8[14] states from MeSH major/automatic terms (see the module docstring)."""
    out = np.zeros(len(cond.FINDINGS), np.int8)
    normal = False
    for term in terms:
        parts = [p.strip().lower() for p in term.split("/") if p.strip()]
        if not parts:
            continue
        head, quals = parts[0], parts[1:]
        if head == "normal":
            normal = True
            continue
        finding = HEADS.get(head) or next((f for (h, q), f in QUALIFIED.items() if h == head and q in quals), None)
        if finding is None:
            continue
        i = cond.FINDINGS.index(finding)
        state = cond.UNCERTAIN if "borderline" in quals else cond.POSITIVE
        if out[i] != cond.POSITIVE:
            out[i] = state
    idx = [cond.FINDINGS.index(f) for f in PATHOLOGIES]
    if (out[idx] == cond.POSITIVE).any():
        out[0] = cond.NEGATIVE
    elif normal:  # pathologies still unmentioned become negative; a borderline one stays uncertain
        out[0] = cond.POSITIVE
        out[idx] = np.where(out[idx] == cond.UNMENTIONED, cond.NEGATIVE, out[idx])
    return out


VIEW_TABLE = "indiana_projections.csv"
_IMAGE_KEY_RE = re.compile(r"^(?:CXR)?(\d+)_(?:\d+_)?(IM-[0-9A-Za-z-]+?)(?:\.dcm)?(?:\.png)?$", re.I)
_VIEW_POSITIONS = {"PA": "PA", "AP": "AP", "LL": "LATERAL", "RL": "LATERAL", "LATERAL": "LATERAL", "LAT": "LATERAL"}
_PROJECTIONS = {"LATERAL": "LATERAL"}  # "Frontal" does not say PA or AP: unknown


def image_key(name: str) -> str | None:
    """'CXR1_1_IM-0001-3001' / '1_IM-0001-3001.dcm.png' -> '1_IM-0001-3001'; None if neither."""
    m = _IMAGE_KEY_RE.match(os.path.basename(name.strip()))
    return f"{int(m.group(1))}_{m.group(2).upper()}" if m else None


def _views(input_dir: str) -> dict[str, str]:
    """image key -> view from the optional per-image table; {} when absent."""
    path = os.path.join(input_dir, VIEW_TABLE)
    if not (os.path.isfile(path) or os.path.isfile(path + ".gz")):
        return {}
    rows = read_csv(path)
    if not rows:
        return {}
    require_columns(rows, ("filename",), path)
    if not ({"projection", "ViewPosition"} & set(rows[0])):
        raise SourceError(f"{path} lacks required column(s): projection or ViewPosition")
    views: dict[str, str] = {}
    for row in rows:
        key = image_key(row.get("filename") or "")
        if key is None:
            continue
        view = _VIEW_POSITIONS.get(" ".join((row.get("ViewPosition") or "").upper().split()))
        view = view or _PROJECTIONS.get((row.get("projection") or "").strip().upper(), "unknown")
        views[key] = view
    return views


def _order(name: str) -> tuple[float, str]:
    stem = os.path.splitext(name)[0]
    return (int(stem) if stem.isdigit() else math.inf, name)


def items(input_dir: str, opts=None) -> Iterator[Item | Reject]:
    """Every image of every report, reports in numeric file order."""
    input_dir = os.path.abspath(input_dir)
    xml_dir, png_dir = os.path.join(input_dir, "ecgen-radiology"), os.path.join(input_dir, "NLMCXR_png")
    names = sorted((n for n in os.listdir(xml_dir) if n.lower().endswith(".xml")), key=_order) \
        if os.path.isdir(xml_dir) else []
    if not names:
        raise SourceError(f"missing {xml_dir}/*.xml (the extracted NLMCXR_reports.tgz)")
    if not os.path.isdir(png_dir):
        raise SourceError(f"missing {png_dir} (the extracted NLMCXR_png.tgz)")
    views = _views(input_dir)
    for name in names:
        xml_path = os.path.join(xml_dir, name)
        try:
            root = ET.parse(xml_path).getroot()
        except ET.ParseError as e:
            yield Reject(xml_path, f"unparseable XML: {e}")
            continue
        sections = {(a.get("Label") or "").upper(): a.text or "" for a in root.iter("AbstractText")}
        report = join_report(sections.get("FINDINGS"), sections.get("IMPRESSION"))
        mesh = [e.text or "" for tag in ("major", "automatic") for m in root.iter("MeSH") for e in m.iter(tag)]
        findings = findings_from_mesh(mesh)
        uid = root.find("uId")
        report_id = (uid.get("id") if uid is not None else "") or os.path.splitext(name)[0]
        # A report without parentImage (about a hundred exist) has no image to lose: skipped,
        # not rejected, so it does not count against the converter's reject budget.
        for image in [p.get("id") for p in root.iter("parentImage") if p.get("id")]:
            path = os.path.join(png_dir, image + ".png")
            if not os.path.isfile(path):
                yield Reject(path, f"image file not found ({name})")
                continue
            yield Item(path=path, split=None, findings=findings.copy(), source=NAME,
                       view=views.get(image_key(image) or "", "unknown"),
                       patient_id=report_id, study_id=report_id, report=report)
