"""Finding labels (state codes) and the templated report of a phantom study.

Truth and labels are kept apart. Every finding that is present is labelled POSITIVE (it is
drawn, visibly). A finding that is absent is usually NEGATIVE, but like a real reader's
report it is sometimes not mentioned at all (UNMENTIONED, ~5%) or hedged (UNCERTAIN, ~3%).
"No Finding" is POSITIVE iff no other label is POSITIVE. The report states exactly what the
labels say: positives described, negatives as "No ...", uncertain ones as "... cannot be
excluded", unmentioned ones not at all.
"""
from __future__ import annotations

import numpy as np

from cxr_rf import conditioning as cond

P_UNMENTIONED, P_UNCERTAIN = 0.05, 0.03

NEGATIVE_TEXT = {
    "Enlarged Cardiomediastinum": "No enlargement of the cardiomediastinal silhouette.",
    "Cardiomegaly": "No cardiomegaly.",
    "Lung Opacity": "No focal lung opacity.",
    "Lung Lesion": "No lung nodule or mass.",
    "Edema": "No pulmonary edema.",
    "Consolidation": "No consolidation.",
    "Pneumonia": "No evidence of pneumonia.",
    "Atelectasis": "No atelectasis.",
    "Pneumothorax": "No pneumothorax.",
    "Pleural Effusion": "No pleural effusion.",
    "Pleural Other": "No pleural thickening or other pleural abnormality.",
    "Fracture": "No fracture.",
    "Support Devices": "No support devices.",
}
UNCERTAIN_TEXT = {
    "Enlarged Cardiomediastinum": "Mild widening of the mediastinum cannot be excluded.",
    "Cardiomegaly": "Borderline cardiomegaly cannot be excluded.",
    "Lung Opacity": "A faint lung opacity cannot be excluded.",
    "Lung Lesion": "A small lung nodule cannot be excluded.",
    "Edema": "Mild pulmonary edema cannot be excluded.",
    "Consolidation": "Early consolidation cannot be excluded.",
    "Pneumonia": "Pneumonia cannot be excluded clinically.",
    "Atelectasis": "Minimal basal atelectasis cannot be excluded.",
    "Pneumothorax": "A tiny pneumothorax cannot be excluded.",
    "Pleural Effusion": "A trace pleural effusion cannot be excluded.",
    "Pleural Other": "Pleural thickening cannot be excluded.",
    "Fracture": "A nondisplaced rib fracture cannot be excluded.",
    "Support Devices": "A support device cannot be excluded.",
}
# The order a reader goes through the film in.
_ORDER = ("Support Devices", "Lung Lesion", "Consolidation", "Pneumonia", "Lung Opacity",
          "Edema", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
          "Cardiomegaly", "Enlarged Cardiomediastinum", "Fracture")
_ORDINAL = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
            "ninth", "tenth", "eleventh")


def labels(present: dict, u: np.ndarray) -> np.ndarray:
    """int8 state codes in FINDINGS order from ground truth and label-noise uniforms ``u``."""
    out = np.empty(len(cond.FINDINGS), np.int8)
    for i, f in enumerate(cond.FINDINGS):
        if present[f]:
            out[i] = cond.POSITIVE
        elif u[i] < P_UNMENTIONED:
            out[i] = cond.UNMENTIONED
        elif u[i] < P_UNMENTIONED + P_UNCERTAIN:
            out[i] = cond.UNCERTAIN
        else:
            out[i] = cond.NEGATIVE
    others = np.delete(out, cond.FINDINGS.index("No Finding"))
    out[cond.FINDINGS.index("No Finding")] = (
        cond.NEGATIVE if (others == cond.POSITIVE).any() else cond.POSITIVE)
    return out


def _devices(dev: dict) -> str:
    parts = []
    if dev["et"]:
        parts.append("endotracheal tube terminating above the carina")
    if dev["ng"]:
        parts.append("enteric tube coursing below the left hemidiaphragm")
    if dev["cvc"]:
        parts.append(f"{dev['cvc']}-sided central venous catheter with tip in the low SVC")
    if dev["pm"]:
        parts.append(f"{dev['pm']}-sided pacemaker with leads in the right atrium and ventricle")
    if dev["ecg"]:
        parts.append("overlying ECG leads")
    return "Support devices: " + "; ".join(parts) + "."


def _positive(f: str, st) -> str:
    d = st.details
    if f == "Support Devices":
        return _devices(d["devices"])
    if f == "Lung Lesion":
        les = d["lesions"]
        if les[0]["kind"] == "mass":
            return f"Lobulated mass in the {les[0]['side']} {les[0]['zone']} lung."
        where = sorted({f"{x['side']} {x['zone']}" for x in les})
        noun = "A pulmonary nodule" if len(les) == 1 else f"{len(les)} pulmonary nodules"
        return f"{noun} in the {' and '.join(where)} lung."
    if f == "Consolidation":
        c = d["consolidation"]
        return (f"Patchy airspace opacity in the {c['side']} {c['zone']} lung, consistent with "
                "consolidation.")
    if f == "Pneumonia":
        return "In the appropriate clinical setting, findings are concerning for pneumonia."
    if f == "Lung Opacity":
        if d["ggo"]:
            g = d["ggo"]
            return f"Hazy opacity in the {g['side']} {g['zone']} lung."
        return ""          # already described as consolidation or edema
    if f == "Edema":
        return ("Bilateral perihilar airspace opacity with vascular congestion and septal lines, "
                "consistent with pulmonary edema.")
    if f == "Atelectasis":
        a = d["atelectasis"]
        return (f"Linear atelectasis in the {a['side']} {a['zone']} lung with elevation of the "
                f"{a['side']} hemidiaphragm.")
    if f == "Pneumothorax":
        p = d["pneumothorax"]
        return (f"{p['size'].capitalize()} {p['side']} apical pneumothorax with a visible "
                "pleural line.")
    if f == "Pleural Effusion":
        e = d["effusion"]
        if len(e) == 2:
            return (f"Bilateral pleural effusions, {e['right']['size']} on the right and "
                    f"{e['left']['size']} on the left, with blunting of the costophrenic angles.")
        side, v = next(iter(e.items()))
        return (f"{v['size'].capitalize()} {side} pleural effusion with blunting of the {side} "
                "costophrenic angle.")
    if f == "Pleural Other":
        return f"{d['pleural_other']['side'].capitalize()} apical pleural thickening."
    if f == "Cardiomegaly":
        return "The cardiac silhouette is enlarged, consistent with cardiomegaly."
    if f == "Enlarged Cardiomediastinum":
        if st.present["Cardiomegaly"]:
            return "Enlarged cardiomediastinal silhouette."
        return "The mediastinum is widened (enlarged cardiomediastinal silhouette)."
    if f == "Fracture":
        fr = d["fracture"]
        return f"Displaced fracture of the {fr['side']} {_ORDINAL[fr['rib']]} posterior rib."
    raise KeyError(f)


def _impression_item(f: str, st) -> str:
    d = st.details
    if f == "Pleural Effusion":
        e = d["effusion"]
        return ("Bilateral pleural effusions" if len(e) == 2 else
                f"{next(iter(e.values()))['size'].capitalize()} {next(iter(e))} pleural effusion")
    if f == "Pneumothorax":
        return f"{d['pneumothorax']['side'].capitalize()} pneumothorax"
    return {"Lung Lesion": "Lung lesion; CT recommended",
            "Support Devices": "Support devices in place",
            "Fracture": "Rib fracture", "Pleural Other": "Pleural thickening",
            "Enlarged Cardiomediastinum": "Enlarged cardiomediastinum",
            "Lung Opacity": "Lung opacity"}.get(f, f)


def report(st, codes: np.ndarray) -> str:
    """The templated English report for study ``st`` with label ``codes``."""
    state = dict(zip(cond.FINDINGS, codes.tolist()))
    pos, neg, unc = [], [], []
    for f in _ORDER:
        if state[f] == cond.POSITIVE:
            s = _positive(f, st)
            if s:
                pos.append(s)
        elif state[f] == cond.NEGATIVE:
            neg.append(NEGATIVE_TEXT[f])
        elif state[f] == cond.UNCERTAIN:
            unc.append(UNCERTAIN_TEXT[f])
    view = "PA" if st.view == "PA" else "portable AP"
    head = f"EXAMINATION: Chest radiograph, {view} view. COMPARISON: None."
    findings = " ".join(pos + neg + unc)
    items = [_impression_item(f, st) for f in _ORDER if state[f] == cond.POSITIVE]
    if items:
        impression = " ".join(f"{i + 1}. {s}." for i, s in enumerate(items))
    else:
        impression = "No acute cardiopulmonary process."
    return f"{head}\nFINDINGS: {findings}\nIMPRESSION: {impression}"
