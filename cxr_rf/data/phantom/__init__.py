"""Procedural phantom chest radiographs with known ground truth.

``generate(seed, index, R)`` returns one frontal (PA or AP) study: a 16-bit image in which
dense is bright, CheXpert-style finding labels, demographics, view, acquisition site, a
templated report and the ground truth it was drawn from. ``measure(image)`` reads the
cardiothoracic ratio and costophrenic blunting back from the pixels alone, so tests (and
evaluations of generative models trained on phantoms) can check findings analytically.

How it is built (see the helper modules):
  * ``patients``         patients (index // 3; stable demographics, chest shape, heart size)
                         and studies (acute findings, view, site), overrides;
  * ``anatomy``          analytic curves: rib cage, cardiomediastinal silhouette, domes;
  * ``findings``         where each finding goes, placed so it stays measurable;
  * ``render``           attenuation line integrals (body - lung air + bone + fluid + ...),
                         with ``parts`` (bones, vessels, opacities, devices) and
                         ``raster`` (anti-aliased lines, boxes, smooth noise);
  * ``site``             exposure curve, noise, collimation and side marker per site;
  * ``report``   label codes and the report; ``measurement`` the measurements.

Image convention: PA display, as if the patient faced the viewer, so the patient's right is
on the image's left. "left"/"right" in labels, reports, ``truth`` and ``measure`` are always
the patient's. Randomness: ``np.random.default_rng([seed, patient, 0])`` for the patient,
``[seed, index, 1]`` for the study, ``[seed, index, 2]`` for pixel noise and ``[seed, index,
3]`` for lung texture; anatomy and labels do not depend on the resolution.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from cxr_rf.data.phantom import measurement as phantom_measure
from cxr_rf.data.phantom import render as phantom_render
from cxr_rf.data.phantom import report as phantom_report
from cxr_rf.data.phantom import site as phantom_site
from cxr_rf.data.phantom.patients import OVERRIDES, SITES, sample_study

__all__ = ["SITES", "OVERRIDES", "PhantomStudy", "describe", "generate", "measure", "truth_masks"]

_MIN_RENDER = 128     # small images are rendered at >= 128 px and box-downsampled


@dataclasses.dataclass(frozen=True)
class PhantomStudy:
    """One generated study. ``image`` is uint16 [R, R], bright = dense, 0 = collimated."""
    image: np.ndarray
    findings: np.ndarray      # int8 [14] label codes in conditioning.FINDINGS order
    sex: str                  # "M" | "F"
    age: float                # years
    race: str                 # a value of conditioning.RACES
    view: str                 # "PA" | "AP"
    site: str                 # one of SITES
    patient_id: str
    study_id: str
    report: str
    truth: dict


def generate(seed: int, index: int, resolution: int, **overrides) -> PhantomStudy:
    """The phantom study (seed, index) at ``resolution`` x ``resolution`` pixels.

    ``overrides`` force conditions: ``findings={"Cardiomegaly": True, "Pleural Effusion":
    "left"}`` (bool per finding; "left"/"right"/"bilateral" for Pleural Effusion and
    "left"/"right" for Pneumothorax), ``sex`` ("M"/"F"), ``age`` (18-95), ``race``, ``view``
    ("PA"/"AP") and ``site``. Everything not forced is the same as in the unforced study.
    """
    n = int(resolution)
    if n != resolution or not 16 <= n <= 4096:
        raise ValueError(f"resolution must be an integer in [16, 4096], got {resolution!r}")
    st = sample_study(int(seed), int(index), overrides)
    k = -(-_MIN_RENDER // n) if n < _MIN_RENDER else 1
    A = phantom_render.attenuation(st, n * k, np.random.default_rng([seed, index, 3]))
    if k > 1:    # box filter: the anti-aliased mean attenuation of each output pixel
        A = A.reshape(n, k, n, k).mean((1, 3))
    image = phantom_site.expose(A, st.site, st.exposure_u, np.random.default_rng([seed, index, 2]))
    meta = _metadata(seed, index, st)
    ctr, heart, thorax = st.anatomy.truth_ctr()
    eff = st.details["effusion"]
    truth = {
        "ctr": ctr, "heart_width": heart, "thoracic_width": thorax, "midline": st.anatomy.cx,
        "effusion_left": "left" in eff, "effusion_right": "right" in eff,
        "pneumothorax": st.details["pneumothorax"]["side"] if st.details["pneumothorax"] else None,
        "present": dict(st.present),
        "field": phantom_site.field_box(st.site, st.exposure_u, n),
        "details": st.details,
    }
    return PhantomStudy(image=image, truth=truth, **meta)


def describe(seed: int, index: int, **overrides) -> dict:
    """The metadata fields of ``generate(seed, index, R, **overrides)`` without rendering.

    Keys: findings, sex, age, race, view, site, patient_id, study_id, report. Cheap (no
    pixels), so a converter can plan splits before workers render the images.
    """
    return _metadata(seed, index, sample_study(int(seed), int(index), overrides))


def _metadata(seed: int, index: int, st) -> dict:
    codes = phantom_report.labels(st.present, st.label_u)
    patient_id = f"phantom-{seed}-{st.patient}"
    return dict(findings=codes, sex=st.sex, age=st.age, race=st.race, view=st.view,
                site=st.site, patient_id=patient_id, study_id=f"{patient_id}-{index}",
                report=phantom_report.report(st, codes))


def truth_masks(seed: int, index: int, resolution: int, **overrides) -> dict[str, np.ndarray]:
    """Boolean ground-truth regions of ``generate(seed, index, resolution, **overrides)``.

    Keys: "pleural_space" (inside the pleura), "pneumothorax", "effusion", "heart"; [R, R]
    arrays on the image grid (rendered at >= 128 px and box-downsampled like the image).
    """
    n = int(resolution)
    st = sample_study(int(seed), int(index), overrides)
    k = -(-_MIN_RENDER // n) if n < _MIN_RENDER else 1
    masks: dict = {}
    phantom_render.attenuation(st, n * k, np.random.default_rng([seed, index, 3]), masks)
    if k > 1:
        masks = {name: m.reshape(n, k, n, k).mean((1, 3)) > 0.5 for name, m in masks.items()}
    return masks


def measure(image: np.ndarray) -> dict:
    """Measurements from the image alone; see ``phantom_measure.measure``."""
    return phantom_measure.measure(image)
