"""Geometry of the phantom chest: the thorax outline, lungs, heart, diaphragm as analytic curves.

Coordinates are normalised to the image: ``x`` runs over columns in [0, 1] (left to right as
displayed), ``y`` over rows in [0, 1] (top to bottom). The radiograph is displayed in the usual
PA convention, as if the patient faced the viewer, so the *patient's right* is on the image's
*left* (x < cx) and the patient's left (heart apex, stomach bubble, lower hemidiaphragm) is on
the image's right. Everywhere in the phantom code ``side`` is the patient's side: "right"
(image left, sign -1) or "left" (image right, sign +1).

Every curve is a function of one coordinate (a row or a column), so the renderer evaluates it
on a vector and broadcasts, and the ground-truth CTR is computed from the same functions the
renderer draws with.
"""
from __future__ import annotations

import dataclasses

import numpy as np

SIDE_SIGN = {"right": -1.0, "left": 1.0}


def _arc(y, center, half_up, half_low, width, p_up=2.0):
    """Half-width of a superelliptic arc: ``width`` at ``center``, 0 at center-half_up/+half_low.

    ``p_up`` < 2 straightens the upper half (the sloping left ventricular border).
    """
    up = y < center
    f32 = np.float32
    d = np.abs(y - center) / np.where(up, f32(half_up), f32(half_low))
    p = np.where(up, f32(p_up), f32(2.0))
    return width * np.clip(1.0 - d ** p, 0.0, 1.0) ** (1.0 / p)


@dataclasses.dataclass
class Anatomy:
    """Analytic chest geometry for one study (all lengths in image-width units).

    The thoracic cage (inner rib margin) is narrow at the apex, widens to its maximum
    half-width ``H`` at row ``y_wide`` and stays at ``H`` down to the costophrenic angles; that
    constant stretch makes the maximal internal thoracic width measurable even when a base or a
    lateral zone is opacified.
    """
    cx: float            # midline column
    H: float             # max internal thoracic half-width
    W: float             # body (soft tissue) half-width
    T: float             # soft-tissue attenuation through the mid-chest
    y_apex: float        # row of the lung apices
    y_wide: float        # row where the cage reaches H
    apex_frac: float     # cage half-width at the apex row, as a fraction of H
    dome: dict           # side -> row of the hemidiaphragm dome top
    dome_peak: float     # dome top position as a fraction of the hemithorax (0 midline, 1 wall)
    dome_med_drop: float  # how far the dome falls medially (cardiophrenic angle)
    dome_lat_drop: float  # how far it falls laterally (costophrenic recess depth)
    heart: dict          # side -> (width, center row, half-height above, half-height below)
    med: dict            # side -> upper mediastinal half-width
    knob: tuple          # (row, extra half-width) of the aortic knob (patient left)
    rib: dict            # posterior/anterior rib layout and bone density
    clavicle: tuple      # (medial row, lateral row)
    carina: float        # row of the tracheal carina
    hila: dict           # side -> (x, y) of the hilum

    def cage(self, y):
        """Half-width of the inner rib margin at rows ``y``."""
        f = np.clip((self.y_wide - y) / (self.y_wide - self.y_apex), 0.0, 1.0)
        return self.H * (1.0 - (1.0 - self.apex_frac) * f ** 2)

    def heart_arc(self, y, side):
        """Distance from the midline to the cardiac border on ``side`` (0 off the heart)."""
        w, c, up, low = self.heart[side]
        return _arc(y, c, up, low, w, 1.35 if side == "left" else 2.0)

    def silhouette(self, y, side):
        """Distance from the midline to the cardiomediastinal border on ``side`` at rows ``y``."""
        m = np.full_like(np.asarray(y, np.float32), self.med[side])
        if side == "left":
            ky, kw = self.knob
            m = m + kw * np.exp(-((y - ky) / 0.03) ** 2)
            m = m + 0.018 * np.exp(-((y - (ky + 0.08)) / 0.025) ** 2)  # pulmonary trunk
        return np.maximum(m, self.heart_arc(y, side))

    def diaphragm(self, x, side):
        """Row of the hemidiaphragm surface on ``side`` at columns ``x`` (dome, then recesses)."""
        t = np.abs(x - self.cx) / self.H
        p = self.dome_peak
        med = self.dome_med_drop * np.clip((p - t) / p, 0.0, None) ** 2
        lat = self.dome_lat_drop * np.clip((t - p) / (1.0 - p), 0.0, None) ** 2.4
        return self.dome[side] + med + lat

    def apex_top(self, x):
        """Row of the upper lung border (the two apical domes) at columns ``x``."""
        a = np.abs(x - self.cx)
        peak = 0.4 * self.H
        return self.y_apex + 5.0 * (a - peak) ** 2

    def truth_ctr(self) -> tuple[float, float, float]:
        """(ctr, heart width, thoracic width) from the analytic curves.

        Heart width is the horizontal extent of the cardiac silhouette above each
        hemidiaphragm (maximal right + maximal left distance from the midline, the classic
        MRD + MLD); thoracic width is the maximal inner rib-cage width (2 H).
        """
        widths = []
        for side in ("right", "left"):
            ys = np.linspace(self.y_apex + 0.1, self.dome[side], 2000, dtype=np.float32)
            widths.append(float(self.silhouette(ys, side).max()))
        heart = widths[0] + widths[1]
        return heart / (2 * self.H), heart, 2 * self.H


def sample_anatomy(g: dict, *, sex: str, age: float, view: str, ctr_pa: float,
                   widened: bool, elevation: dict) -> Anatomy:
    """Build the anatomy from the study's uniform draws ``g`` and its resolved conditions.

    ``ctr_pa`` is the PA-equivalent cardiothoracic ratio; an AP view magnifies the heart
    (it lies anterior, far from the detector) by 10% and raises the diaphragm a little
    (supine / poor inspiration). ``elevation`` lifts a hemidiaphragm (volume loss).
    """
    old = float(np.clip((age - 18.0) / 77.0, 0.0, 1.0))
    female = sex == "F"
    habitus = g["habitus"]
    H = (0.312 if female else 0.334) + 0.006 * habitus + 0.006 * (g["H"] - 0.5)
    cx = 0.5 + 0.012 * (g["cx"] - 0.5)
    W = H + max(0.06 + 0.012 * habitus, 0.045) + (0.01 if female else 0.0)
    T = 3.0 + 0.22 * habitus
    # Kyphosis with age: the apices project lower and the clavicles higher.
    y_apex = 0.105 + 0.03 * g["apex"] + 0.015 * old
    y_wide = 0.44 + 0.03 * g["wide"]
    ap = view == "AP"
    d_right = 0.645 + 0.04 * g["dome"] - (0.02 if ap else 0.0)
    d_left = d_right + 0.015 + 0.02 * g["dome_lr"]
    dome = {"right": d_right - elevation.get("right", 0.0),
            "left": d_left - elevation.get("left", 0.0)}
    # The heart sits on the diaphragm, widest just above it; AP magnifies it.
    ctr = ctr_pa * (1.10 if ap else 1.0)
    width = ctr * 2 * H
    frac_r = 0.34 + 0.06 * g["heart_lr"]
    # Right border (right atrium): a gentle bulge low in the chest. Left border (left
    # ventricle): a long slope from below the pulmonary trunk down to an apex just above the
    # dome, then a short turn onto the diaphragm.
    up_r = 0.15 + 0.03 * g["heart_h"]
    up_l = 0.21 + 0.03 * g["heart_h"]
    heart = {
        "right": (frac_r * width, dome["right"] - 0.06 - 0.015 * g["heart_v"], up_r, 0.2),
        "left": ((1 - frac_r) * width, dome["left"] - 0.055 - 0.015 * g["heart_v"], up_l, 0.17),
    }
    med_r = 0.045 + 0.01 * g["med"] + (0.012 if widened else 0.0)
    knob_w = 0.035 + 0.025 * old + (0.02 if widened else 0.0)
    # Keep the mediastinum inside the heart's extent so the CTR stays the heart's.
    med_r = min(med_r, 0.8 * heart["right"][0])
    knob_w = min(knob_w, 0.85 * heart["left"][0] - 0.04)
    bone = 1.05 - 0.35 * old + 0.1 * (g["bone"] - 0.5)
    rib = {"y1": y_apex - 0.025, "sp": 0.048 + 0.006 * g["rib_sp"], "alpha": 0.045,
           "curv": 0.17 + 0.04 * g["rib_curv"], "wf": 0.36 + 0.06 * g["rib_w"], "bone": bone,
           "n": 10}
    clav_med = 0.175 - 0.025 * old - (0.025 if ap else 0.0) + 0.02 * (g["clav"] - 0.5)
    clav = (clav_med, clav_med - (0.01 if ap else 0.045))
    hila = {"right": (cx - 0.09 - 0.01 * g["hilum"], 0.42 + 0.02 * g["hilum"]),
            "left": (cx + 0.09 + 0.01 * g["hilum"], 0.40 + 0.02 * g["hilum"])}
    return Anatomy(cx=cx, H=H, W=W, T=T, y_apex=y_apex, y_wide=y_wide, apex_frac=0.3,
                   dome=dome, dome_peak=0.45 + 0.08 * g["dome_peak"],
                   dome_med_drop=0.05, dome_lat_drop=0.085 + 0.02 * g["cp"], heart=heart,
                   med={"right": med_r, "left": 0.04}, knob=(0.29 + 0.02 * g["knob"], knob_w),
                   rib=rib, clavicle=clav, carina=0.35 + 0.03 * g["carina"], hila=hila)


def vessel_tree(rng: np.random.Generator, anat: Anatomy) -> np.ndarray:
    """Branching pulmonary vessels from each hilum: rows (x0, y0, x1, y1, level).

    Seven trunks per lung leave the hilar region; at every level each segment continues
    roughly straight and sends one side branch, with shorter segments each level. The
    renderer thins and fades vessels with level, so they are dense near the hila and fine in
    the periphery, as on a real film.
    """
    rows = []
    for side in ("right", "left"):
        sx = SIDE_SIGN[side]
        hx, hy = anat.hila[side]
        ang = np.array([-1.25, -0.8, -0.35, 0.1, 0.55, 0.95, 1.35]) + rng.normal(0, 0.08, 7)
        n0 = ang.size
        x = hx + sx * rng.uniform(0.0, 0.015, n0)
        y = hy + np.linspace(-0.035, 0.045, n0) + rng.normal(0, 0.005, n0)
        length = 0.06 * rng.uniform(0.8, 1.2, n0)
        for level in range(7):
            n = ang.size
            x1 = x + sx * np.cos(ang) * length
            y1 = y + np.sin(ang) * length
            rows.append(np.stack([x, y, x1, y1, np.full(n, level)], 1))
            side_turn = rng.choice([-1.0, 1.0], n) * rng.uniform(0.35, 0.75, n)
            # Children: the continuing trunk (small wiggle) and a side branch; all drift a
            # little toward the base, where perfusion (and vessel calibre) is greatest.
            ang = np.concatenate([ang + rng.normal(0, 0.15, n), ang + side_turn]) + 0.04
            x = np.concatenate([x1, x1])
            y = np.concatenate([y1, y1])
            length = (np.concatenate([length * rng.uniform(0.8, 0.92, n),
                                      length * rng.uniform(0.6, 0.8, n)]))
    return np.concatenate(rows).astype(np.float32)
