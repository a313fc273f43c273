"""Random patients, studies and ground-truth findings for the phantom generator.

Randomness is keyed by (seed, patient) for what a patient keeps across studies (demographics,
habitus, chronic heart size, home site, the shape of the chest) and by (seed, index) for the
study (acute findings, view, site, exposure). Every random number is drawn whether or not it
ends up used, and before any override is applied, so forcing a finding or a view changes only
that aspect of an otherwise identical study: tests can compare a study with its own
finding-free twin.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from cxr_rf import conditioning as cond
from cxr_rf.data.phantom import anatomy as pa

SITES: tuple[str, ...] = ("site_a", "site_b", "site_c")
STUDIES_PER_PATIENT = 3
_SITE_P = (0.4, 0.35, 0.25)
_RACE_P = {"unknown": 0.6, "White": 0.2, "Black": 0.08, "Asian": 0.07, "Other": 0.05}
# Arbitrary synthetic habitus offsets (in SD units, about a sixth of the spread): small on
# purpose, so race has a weak measurable effect without standing for any real population.
_RACE_HABITUS = {"unknown": 0.0, "White": 0.0, "Black": 0.15, "Asian": -0.15, "Other": 0.0}
SIDED = ("Pleural Effusion", "Pneumothorax")
_SIDES = ("right", "left", "bilateral")
OVERRIDES = ("findings", "sex", "age", "race", "view", "site")
# PA-equivalent cardiothoracic ratios. The bands leave a gap around 0.5 even after the 10% AP
# magnification (normal <= 0.484, enlarged >= 0.583) so the labels are unambiguous.
NORMAL_CTR = (0.37, 0.44)
ENLARGED_CTR = (0.53, 0.62)
_GEOM_KEYS = ("H", "cx", "apex", "wide", "dome", "dome_lr", "heart_lr", "heart_h", "heart_v",
              "med", "knob", "bone", "rib_sp", "rib_curv", "rib_w", "clav", "carina", "hilum",
              "dome_peak", "cp", "breast")


@dataclasses.dataclass
class Study:
    """Everything the renderer and the report writer need for one study."""
    patient: int
    sex: str
    age: float
    race: str
    view: str
    site: str
    present: dict        # finding name -> bool (ground truth)
    details: dict        # sides, sizes, devices... for the report and the renderer
    anatomy: pa.Anatomy
    vessels: np.ndarray
    label_u: np.ndarray  # uniforms that decide label noise (uncertain / unmentioned)
    exposure_u: list     # uniforms for collimation and exposure jitter


def _patient(seed: int, patient: int) -> dict:
    rng = np.random.default_rng([seed, patient, 0])
    p = {"sex": "M" if rng.random() < 0.5 else "F",
         "age": float(np.round(18 + 77 * rng.beta(2.2, 1.8), 1)),
         "race": str(rng.choice(list(_RACE_P), p=list(_RACE_P.values()))),
         "habitus_z": float(np.clip(rng.normal(), -2.5, 2.5)),
         "sick": float(rng.beta(1.3, 2.6)),
         "heart_u": float(rng.random()), "cm_u": float(rng.random()),
         "cm_ctr_u": float(rng.random()),
         "site": int(rng.choice(len(SITES), p=_SITE_P))}
    p["geom"] = {k: float(rng.random()) for k in _GEOM_KEYS}
    return p


def _validate(overrides: dict) -> dict:
    bad = sorted(set(overrides) - set(OVERRIDES))
    if bad:
        raise ValueError(f"unknown override(s) {bad}; valid: {', '.join(OVERRIDES)}")
    o = dict(overrides)
    if "sex" in o and o["sex"] not in ("M", "F"):
        raise ValueError(f"sex must be 'M' or 'F', got {o['sex']!r}")
    if "age" in o and not 18 <= float(o["age"]) <= 95:
        raise ValueError(f"age must be in [18, 95] years, got {o['age']!r}")
    if "race" in o and o["race"] not in cond.RACES:
        raise ValueError(f"race must be one of {', '.join(cond.RACES)}, got {o['race']!r}")
    if "view" in o and o["view"] not in ("PA", "AP"):
        raise ValueError(f"view must be 'PA' or 'AP', got {o['view']!r}")
    if "site" in o and o["site"] not in SITES:
        raise ValueError(f"site must be one of {', '.join(SITES)}, got {o['site']!r}")
    if not isinstance(o.get("findings", {}), dict):
        raise ValueError(f"findings must be a dict {{finding: value}}, got {o['findings']!r}")
    for name, v in o.get("findings", {}).items():
        if name not in cond.FINDINGS:
            raise ValueError(f"unknown finding {name!r}; valid: {', '.join(cond.FINDINGS)}")
        sides = _SIDES if name == "Pleural Effusion" else (_SIDES[:2] if name in SIDED else ())
        if not (isinstance(v, (bool, np.bool_)) or (isinstance(v, str) and v in sides)):
            extra = "".join(f"/{s!r}" for s in sides)
            raise ValueError(f"{name!r} must be True/False{extra}, got {v!r}")
    return o


def _truth(u: dict, p: dict, age: float, forced: dict) -> dict:
    """Random ground truth (patient-correlated), then the forced findings and implications."""
    s, old = u["sick"], age > 65
    cm = p["cm_u"] < 0.05 + 0.25 * p["sick"] + 0.07 * old
    c = {"cm": cm, "widened": u["widened"] < 0.04,
         "eff": _SIDES[int(u["eff_side"] * 3)] if u["eff"] < 0.05 + 0.28 * s + 0.12 * cm else None,
         "ptx": _SIDES[int(u["ptx_side"] * 2)] if u["ptx"] < 0.045 + 0.12 * s else None,
         "lesion": u["lesion"] < 0.06 + 0.08 * old, "cons": u["cons"] < 0.04 + 0.2 * s,
         "edema": u["edema"] < 0.01 + 0.08 * s + 0.15 * cm, "ggo": u["ggo"] < 0.06,
         "atel": u["atel"] < 0.05 + 0.2 * s, "devices": u["devices"] < 0.05 + 0.55 * s,
         "fracture": u["fracture"] < 0.03 + 0.03 * old, "pleural_other": u["pleural_other"] < 0.03}
    c["pneumonia"] = c["cons"] and u["pneumonia"] < 0.5
    simple = {"Lung Lesion": "lesion", "Edema": "edema", "Atelectasis": "atel",
              "Fracture": "fracture", "Pleural Other": "pleural_other",
              "Support Devices": "devices", "Cardiomegaly": "cm", "Consolidation": "cons",
              "Pneumonia": "pneumonia"}
    for name, key in simple.items():
        if name in forced:
            c[key] = bool(forced[name])
    for name, key, rand_side in (("Pleural Effusion", "eff", u["eff_side"]),
                                 ("Pneumothorax", "ptx", u["ptx_side"])):
        v = forced.get(name)
        if v is not None:
            c[key] = v if isinstance(v, str) else (_SIDES[int(rand_side * 2)] if v else None)
    if "Pneumonia" in forced:      # pneumonia is drawn as a consolidation
        c["cons"] = c["cons"] or c["pneumonia"]
    if not c["cons"]:
        c["pneumonia"] = False
    if "Lung Opacity" in forced:
        if forced["Lung Opacity"]:
            c["ggo"] = c["ggo"] or not (c["cons"] or c["edema"])
        else:
            c.update(cons=False, pneumonia=False, edema=False, ggo=False)
    if "Enlarged Cardiomediastinum" in forced:
        if forced["Enlarged Cardiomediastinum"]:
            c["widened"] = c["widened"] or not c["cm"]
        else:
            c.update(cm=False, widened=False)
    if forced.get("No Finding"):
        c.update(cm=False, widened=False, eff=None, ptx=None, lesion=False, cons=False,
                 pneumonia=False, edema=False, ggo=False, atel=False, devices=False,
                 fracture=False, pleural_other=False)
    return c


def _present(c: dict) -> dict:
    pr = {"Enlarged Cardiomediastinum": c["cm"] or c["widened"], "Cardiomegaly": c["cm"],
          "Lung Opacity": c["cons"] or c["edema"] or c["ggo"], "Lung Lesion": c["lesion"],
          "Edema": c["edema"], "Consolidation": c["cons"], "Pneumonia": c["pneumonia"],
          "Atelectasis": c["atel"], "Pneumothorax": c["ptx"] is not None,
          "Pleural Effusion": c["eff"] is not None, "Pleural Other": c["pleural_other"],
          "Fracture": c["fracture"], "Support Devices": c["devices"]}
    pr["No Finding"] = not any(pr.values())
    return {f: bool(pr[f]) for f in cond.FINDINGS}


def sample_study(seed: int, index: int, overrides: dict) -> Study:
    """Draw the study (seed, index) and apply validated ``overrides``."""
    o = _validate(overrides)
    patient = index // STUDIES_PER_PATIENT
    p = _patient(seed, patient)
    rng = np.random.default_rng([seed, index, 1])
    keys = ("sick", "widened", "eff", "eff_side", "ptx", "ptx_side", "lesion", "cons", "edema",
            "ggo", "atel", "devices", "fracture", "pleural_other", "pneumonia", "view", "site",
            "site_other", "ctr_jit", "cx", "dome")
    u = {k: float(rng.random()) for k in keys}
    u["sick"] = float(np.clip(p["sick"] + 0.15 * (u["sick"] - 0.5), 0, 1))
    # Python floats, not numpy scalars: numpy scalars would promote the float32 rendering
    # to float64.
    f_u = rng.random(64).tolist()    # finding geometry draws (see findings.py)
    label_u = rng.random(2 * len(cond.FINDINGS))
    exposure_u = rng.random(8).tolist()
    sex, age = o.get("sex", p["sex"]), float(o.get("age", p["age"]))
    race = o.get("race", p["race"])
    forced = o.get("findings", {})
    c = _truth(u, p, age, forced)
    present = _present(c)
    for name, v in forced.items():
        if present[name] != bool(v):
            raise ValueError(f"contradictory findings override: {name}={v!r} conflicts with "
                             f"{ {k: w for k, w in forced.items() if k != name} }")
    p_ap = 0.1 + 0.3 * u["sick"] + 0.12 * (age > 70) + 0.4 * c["devices"]
    view = o.get("view", "AP" if u["view"] < p_ap else "PA")
    home = p["site"]
    site_i = home if u["site"] < 0.85 else (home + 1 + int(u["site_other"] * 2)) % len(SITES)
    site = o.get("site", SITES[site_i])
    lo, hi = ENLARGED_CTR if c["cm"] else NORMAL_CTR
    # Older hearts sit higher in the normal band; the study jitter is small (same heart).
    if c["cm"]:
        base = p["cm_ctr_u"]
    else:
        base = p["heart_u"] * 0.8 + 0.2 * float(np.clip((age - 18) / 77, 0, 1))
    ctr_pa = lo + (hi - lo) * float(np.clip(base + 0.08 * (u["ctr_jit"] - 0.5), 0, 1))
    g = dict(p["geom"])
    g["habitus"] = p["habitus_z"] + _RACE_HABITUS[race]
    g["cx"] = 0.7 * g["cx"] + 0.3 * u["cx"]
    g["dome"] = 0.8 * g["dome"] + 0.2 * u["dome"]
    from cxr_rf.data.phantom import findings as pf  # local: findings.py imports Study
    elevation = pf.atelectasis_elevation(c, f_u)
    anat = pa.sample_anatomy(g, sex=sex, age=age, view=view, ctr_pa=ctr_pa,
                             widened=c["widened"], elevation=elevation)
    vessels = pa.vessel_tree(rng, anat)
    details = pf.finding_details(c, f_u, anat, sex=sex, breast=g["breast"], habitus=g["habitus"])
    return Study(patient=patient, sex=sex, age=age, race=race, view=view, site=site,
                 present=present, details=details, anatomy=anat, vessels=vessels,
                 label_u=label_u, exposure_u=exposure_u)
