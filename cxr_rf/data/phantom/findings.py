"""Geometry of each phantom finding, placed relative to the study's anatomy.

Placement keeps findings *measurable*: opacities stay off the cardiac borders (no silhouette
sign, so the CTR is read from the heart), lung opacities stay above the costophrenic recesses
(so only fluid blunts an angle), and effusions stay below the heart's widest rows. Sizes come
from fixed slots of the study's uniform draws ``u`` so a study's geometry never depends on
which other findings are present.
"""
from __future__ import annotations

import numpy as np

from cxr_rf.data.phantom import anatomy as pa

# Slots into the 64 uniforms a study draws for finding geometry.
_ATEL, _EFF, _PTX, _LES, _CONS, _GGO, _EDEMA, _FRAC, _PO, _DEV, _BREAST = (
    0, 8, 12, 14, 31, 37, 43, 44, 47, 49, 59)


def _side(c_side, u: float) -> str:
    return c_side if c_side in ("right", "left") else ("right" if u < 0.5 else "left")


def atelectasis_elevation(c: dict, u: np.ndarray) -> dict:
    """Hemidiaphragm lift from atelectatic volume loss: {side: rows}."""
    if not c["atel"]:
        return {}
    return {_side(None, u[_ATEL]): 0.018 + 0.017 * u[_ATEL + 1]}


def _lung_span(anat: pa.Anatomy, y: float, side: str) -> tuple[float, float]:
    """(medial, lateral) distance from the midline of the lung at row ``y``."""
    return float(anat.silhouette(np.float32(y), side)), float(anat.cage(np.float32(y)))


def _place(anat, side, y, f, r, med_gap, lat_gap):
    """Centre x for a round opacity of radius r at row y, ``f`` in [0, 1] across the room."""
    m, lat = _lung_span(anat, y, side)
    lo, hi = m + med_gap + r, lat - lat_gap - r
    if hi < lo:                                  # narrow lung: shrink to fit
        r = max(0.006, r - (lo - hi) / 2)
        lo = hi = (m + med_gap + lat - lat_gap) / 2
    return anat.cx + pa.SIDE_SIGN[side] * (lo + f * (hi - lo)), r


def _zone(y: float) -> str:
    return "upper" if y < 0.33 else ("mid" if y < 0.5 else "lower")


def finding_details(c: dict, u: np.ndarray, anat: pa.Anatomy, *, sex: str, breast: float,
                    habitus: float) -> dict:
    """Geometry and descriptors for every present finding (None/empty for absent ones)."""
    d = {"widened": c["widened"], "pneumonia": c["pneumonia"]}
    # Effusion: a meniscus, low medially and rising to ``top`` at the chest wall.
    d["effusion"] = {}
    sides = ("right", "left") if c["eff"] == "bilateral" else ((c["eff"],) if c["eff"] else ())
    for i, side in enumerate(sides):
        k = 0 if side == "right" else 1
        size_u = u[_EFF + k]
        size = "small" if size_u < 0.5 else ("moderate" if size_u < 0.85 else "large")
        rise = {"small": (0.035, 0.06), "moderate": (0.065, 0.1), "large": (0.11, 0.15)}[size]
        dome = anat.dome[side]
        top = dome - (rise[0] + (rise[1] - rise[0]) * u[_EFF + 2 + k])
        medial = dome + {"small": 0.03, "moderate": 0.0, "large": -0.03}[size]
        # Fluid never reaches the rows of the heart's widest point.
        medial = max(medial, anat.heart[side][1] + 0.05)
        # The meniscus starts at the heart border (t0, in hemithorax widths) and rises to
        # ``top`` at the chest wall.
        t0 = min(anat.heart[side][0] / anat.H, 0.85)
        d["effusion"][side] = {"size": size, "top": top, "medial": max(medial, top + 0.03),
                               "t0": t0}
    d["pneumothorax"] = None
    if c["ptx"]:
        gap = 0.03 + 0.05 * u[_PTX]
        size = "small" if gap < 0.045 else ("moderate" if gap < 0.065 else "large")
        d["pneumothorax"] = {"side": c["ptx"], "gap": gap, "end": 0.45 + 0.2 * u[_PTX + 1],
                             "size": size}
    d["lesions"] = []
    if c["lesion"]:
        mass = u[_LES + 1] < 0.2
        n = 1 if mass else 1 + int(u[_LES] > 0.6) + int(u[_LES] > 0.85)
        for j in range(n):
            side = _side(None, u[_LES + 2 + j])
            y = 0.24 + 0.3 * u[_LES + 5 + j]
            r = (0.035 + 0.015 * u[_LES + 11 + j]) if mass else (0.01 + 0.012 * u[_LES + 11 + j])
            x, r = _place(anat, side, y, u[_LES + 8 + j], r, 0.03, 0.025)
            d["lesions"].append({"side": side, "x": x, "y": y, "r": r, "zone": _zone(y),
                                 "amp": 0.55 + 0.3 * u[_LES + 14 + j],
                                 "kind": "mass" if mass else "nodule"})
    d["consolidation"] = None
    if c["cons"]:
        d["consolidation"] = _patch(anat, u, _CONS, (0.045, 0.07), (0.75, 1.05), 0.04)
    d["ggo"] = None
    if c["ggo"]:
        d["ggo"] = _patch(anat, u, _GGO, (0.06, 0.09), (0.28, 0.4), 0.03)
    d["edema"] = {"amp": 0.2 + 0.1 * u[_EDEMA]} if c["edema"] else None
    d["atelectasis"] = None
    if c["atel"]:
        side = _side(None, u[_ATEL])
        y = anat.dome[side] - 0.14 + 0.05 * u[_ATEL + 2]
        m, lat = _lung_span(anat, y, side)
        width = lat - m
        mid = m + width * (0.42 + 0.16 * u[_ATEL + 3])
        half = width * (0.15 + 0.1 * u[_ATEL + 4])
        tilt = 0.25 * (u[_ATEL + 6] - 0.5)
        sx = pa.SIDE_SIGN[side]
        d["atelectasis"] = {"side": side, "zone": _zone(y),
                            "x0": anat.cx + sx * (mid - half), "x1": anat.cx + sx * (mid + half),
                            "y0": y - tilt * half, "y1": y + tilt * half,
                            "th": 0.006 + 0.005 * u[_ATEL + 5], "amp": 0.6 + 0.3 * u[_ATEL + 7]}
    d["fracture"] = None
    if c["fracture"]:
        d["fracture"] = {"side": _side(None, u[_FRAC]), "rib": 4 + int(u[_FRAC + 1] * 5),
                         "s": 0.72 + 0.2 * u[_FRAC + 2]}
    d["pleural_other"] = None
    if c["pleural_other"]:
        d["pleural_other"] = {"side": _side(None, u[_PO]), "th": 0.012 + 0.01 * u[_PO + 1]}
    d["devices"] = _devices(u, anat) if c["devices"] else None
    d["breast"] = (0.24 + 0.08 * u[_BREAST] + 0.03 * habitus) if sex == "F" else 0.0
    return d


def _patch(anat, u, k, r_range, amp_range, med_gap):
    """A patchy airspace opacity: a cluster of blobs in the mid/upper lung, off the heart."""
    side = _side(None, u[k])
    r = r_range[0] + (r_range[1] - r_range[0]) * u[k + 3]
    y = min(0.3 + 0.2 * u[k + 1], anat.dome[side] - 0.06 - 1.2 * r)
    x, r = _place(anat, side, y, u[k + 2], r, med_gap + 0.3 * r, 0.01)
    sub = np.random.default_rng(int(u[k + 5] * 2**31))
    blobs = np.concatenate([sub.normal(0, 0.45 * r, (7, 2)), sub.uniform(0.35, 0.6, (7, 1)) * r],
                           1)
    return {"side": side, "x": x, "y": y, "r": r, "zone": _zone(y), "blobs": blobs.tolist(),
            "amp": amp_range[0] + (amp_range[1] - amp_range[0]) * u[k + 4]}


def _devices(u: np.ndarray, anat: pa.Anatomy) -> dict:
    """Which support devices, and where; at least one is present."""
    k = _DEV
    have = {"ecg": u[k] < 0.5, "cvc": u[k + 1] < 0.5, "et": u[k + 2] < 0.3,
            "ng": u[k + 3] < 0.3, "pm": u[k + 4] < 0.25}
    if not any(have.values()):
        have[("ecg", "cvc", "et", "ng", "pm")[int(u[k + 7] * 5)]] = True
    sub = np.random.default_rng(int(u[k + 9] * 2**31))
    ecg = []
    if have["ecg"]:
        for _ in range(3):
            # Electrodes sit on the upper chest/shoulders, away from the cardiac borders.
            ecg.append((float(anat.cx + sub.choice([-1, 1]) * sub.uniform(0.14, 0.3)),
                        float(sub.uniform(0.14, 0.32))))
    return {"ecg": ecg,
            "cvc": ("right" if u[k + 5] < 0.7 else "left") if have["cvc"] else None,
            "et": (anat.carina - 0.03 - 0.04 * u[k + 8]) if have["et"] else None,
            "ng": bool(have["ng"]),
            "pm": ("left" if u[k + 6] < 0.8 else "right") if have["pm"] else None}
