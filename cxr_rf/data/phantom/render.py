"""Rasterise a phantom study into an attenuation map (the projected line integral).

The map is built in attenuation units: soft tissue of the body (an elliptic cylinder, ~3 at
mid-chest), minus the air of the lungs, plus bone, blood, fluid, opacities and metal. Air in
the lungs is a *fraction of the local body thickness*, so lungs stay darker than the chest
wall at every depth, and it reaches most of its value within ~0.004 of the pleura: sharp lung
borders are what make the cardiothoracic ratio and the costophrenic angles measurable.
Site-specific exposure, noise and markers are applied afterwards (``phantom_site``).

Everything is vectorised over the image or over a bounding box; the drawn parts (bones,
vessels, opacities, devices) live in ``parts``, the primitives in ``raster``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from cxr_rf.data.phantom import parts as parts
from cxr_rf.data.phantom.raster import F32, box, clip01, texture

_EDGE = 0.004        # pleural edge ramp (image widths)


@dataclasses.dataclass
class _Grid:
    """Per-pixel geometry shared by the rendering steps (row/column vectors broadcast)."""
    n: int
    x: np.ndarray        # [1, n] column centres
    y: np.ndarray        # [n, 1] row centres
    ax: np.ndarray       # [1, n] distance from the midline
    left: np.ndarray     # [1, n] image right half = patient's left
    cage: np.ndarray     # [n, 1] inner rib margin half-width
    sil: np.ndarray      # [n, n] cardiomediastinal border for the pixel's side
    dia: np.ndarray      # [1, n] hemidiaphragm row for the pixel's side
    d_wall: np.ndarray   # [n, n] distance inside the chest wall / apex
    body: np.ndarray     # [n, n] soft-tissue attenuation of the body


def _grid(a, n: int) -> _Grid:
    x = ((np.arange(n) + 0.5) / n).astype(F32)[None, :]
    y = ((np.arange(n) + 0.5) / n).astype(F32)[:, None]
    ax = np.abs(x - a.cx)
    left = x >= a.cx
    # Flat-topped body profile: the tangential chest wall stays thick up to the skin line;
    # sloping shoulders and a thinner neck at the top.
    tx = a.T * np.sqrt(clip01(1 - (ax / a.W) ** 4))
    y_sh = 0.005 + 0.09 * clip01((ax - 0.12) / (a.W - 0.12)) ** 1.5
    body = clip01((y - y_sh) / 0.015) * (tx * (0.8 + 0.2 * clip01(y / 0.13)))
    cage = a.cage(y)
    return _Grid(n=n, x=x, y=y, ax=ax, left=left, cage=cage,
                 sil=np.where(left, a.silhouette(y, "left"), a.silhouette(y, "right")),
                 dia=np.where(left, a.diaphragm(x, "left"), a.diaphragm(x, "right")),
                 d_wall=np.minimum(cage - ax, y - a.apex_top(x)), body=body)


def _lungs(a, det, g: _Grid, tex, fine, masks):
    """Lung fields with effusion, pneumothorax and pleural cap: (A, lung profile, parenchyma).

    Lungs lie inside the cage, lateral to the cardiomediastinal silhouette, under the apex
    and above the hemidiaphragm.
    """
    y, left, body = g.y, g.left, g.body
    d_outer = np.minimum(g.d_wall, g.dia - y)
    edge = clip01(np.minimum(d_outer, g.ax - g.sil) / _EDGE + 0.5)
    # Lungs thin out toward the chest wall and diaphragm (they are rounded there) but not
    # toward the heart, whose border stays crisp.
    prof = edge * (0.72 + 0.28 * clip01(d_outer / 0.05))
    air = (0.75 * (0.9 + 0.1 * clip01((y - 0.25) / 0.35))) * body * prof
    fluid = np.zeros((1, 1), F32)
    if det["effusion"]:
        # Fluid below a meniscus that starts at the heart border and rises toward the chest
        # wall replaces the lung air.
        yf = np.full_like(g.x, 9.0)
        for side, e in det["effusion"].items():
            s = clip01((g.ax / a.H - e["t0"]) / (1 - e["t0"])) ** 1.2
            yf = np.where(left == (side == "left"), e["medial"] - (e["medial"] - e["top"]) * s, yf)
        fluid = clip01((y - yf) / 0.012)
        air *= 1 - 0.96 * fluid - 0.1 * clip01((y - yf + 0.05) / 0.05)
    par, line = prof, 0.0
    p = det["pneumothorax"]
    if p:
        # Air between the chest wall and the collapsed lung: no parenchyma, no vessels, a
        # thin bright visceral pleural line at the lung edge.
        side_m = left if p["side"] == "left" else ~left
        gap = p["gap"] * clip01((p["end"] - y) / (p["end"] - a.y_apex)) ** 0.6
        ptx = clip01((gap - g.d_wall) / 0.002) * side_m * edge
        par = prof * (1 - ptx)
        air += 0.03 * body * ptx
        line = 0.3 * np.exp(-((g.d_wall - gap) / 0.0016) ** 2) * side_m * edge * (gap > 0.003)
    c = det["pleural_other"]
    if c:          # apical pleural cap: a soft-tissue rind inside the apex
        side_m = left if c["side"] == "left" else ~left
        cap = clip01((c["th"] - g.d_wall) / 0.003) * clip01((a.y_apex + 0.2 - y) / 0.04)
        air *= 1 - 0.9 * cap * side_m
    if masks is not None:
        masks["pleural_space"] = edge > 0.5
        masks["pneumothorax"] = (prof - par) > 0.5 * prof
        masks["effusion"] = (fluid > 0.5) & (edge > 0.5)
    return body - air + par * (0.12 + 0.05 * tex + 0.1 * fine) + line, prof, par


def _soft_tissue(A, a, det, g: _Grid, par):
    """Heart blood, abdomen and gastric bubble, chest wall, breasts, hila."""
    y, n = g.y, g.n
    arc = np.where(g.left, a.heart_arc(y, "left"), a.heart_arc(y, "right"))
    A += 0.25 * clip01((arc - g.ax) / 0.01) * clip01((g.dia - y + 0.03) / 0.03)
    A += 0.35 * clip01((y - g.dia) / 0.008) * clip01((g.cage + 0.02 - g.ax) / 0.02)
    # Gastric air bubble under the left hemidiaphragm: a dome with a flat air-fluid level.
    bx = a.cx + 0.5 * a.H
    by = float(a.diaphragm(np.float32(bx), "left")) + 0.05
    sl, xs, ys = box(n, bx, by, 0.045, 0.03)
    bubble = clip01(1 - ((xs - bx) / 0.045) ** 2 - ((ys - by) / 0.03) ** 2) ** 0.5
    A[sl] -= 0.7 * bubble * clip01((by + 0.004 - ys) * n)
    # Chest wall muscles seen tangentially: a bright band from the ribs to the skin; pectoral
    # muscles and axillary soft tissue whiten the upper outer lung zones.
    inside = g.body > 0
    A += 0.6 * clip01((g.ax - g.cage) / 0.012) * clip01((a.W - g.ax) / 0.012) * inside
    A += 0.15 * np.exp(-((y - 0.24) / 0.1) ** 2) * clip01(g.ax / a.H) * inside
    if det["breast"]:          # breast shadows over the lower zones, sharp lower margin
        for sx in (-1, 1):
            cxb, cyb = a.cx + sx * 0.6 * a.H, a.dome["right"] - 0.05
            sl, xs, ys = box(n, cxb, cyb, 0.16, 0.12)
            d2 = ((xs - cxb) / 0.16) ** 2 + ((ys - cyb) / 0.12) ** 2
            A[sl] += det["breast"] * np.sqrt(clip01(1 - d2)) * clip01((ys - cyb + 0.12) / 0.12)
    for side in ("right", "left"):    # pulmonary arteries and veins crowd the hila
        hx, hy = a.hila[side]
        sl, xs, ys = box(n, hx, hy, 0.05, 0.06)
        A[sl] += 0.2 * np.exp(-((xs - hx) / 0.022) ** 2 - ((ys - hy) / 0.035) ** 2) * par[sl]


def _bones(A, a, det, g: _Grid):
    """Ribs (within the cage's reach only: computing them on that box saves a third), then
    clavicles, spine and arms."""
    n = g.n
    rs = slice(0, int(0.9 * n))
    cs = slice(max(int((a.cx - 1.13 * a.H) * n), 0), min(int((a.cx + 1.13 * a.H) * n) + 1, n))
    ribs = parts.ribs(a, g.ax[:, cs], g.y[rs], n, parts.fracture_spec(det, g.left[:, cs]))
    # Ribs project over the upper abdomen and the mediastinum too, but dense tissue hides
    # most of them.
    ribs *= 1 - 0.6 * clip01((g.y[rs] - g.dia[:, cs]) / 0.02)
    ribs *= 1 - 0.4 * clip01((g.sil[rs, cs] - g.ax[:, cs]) / 0.02)
    A[rs, cs] += ribs
    parts.clavicles_spine(A, a, g.x, g.y, n)
    parts.arms(A, a, n)


def attenuation(st, n: int, tex_rng: np.random.Generator, masks: dict | None = None) -> np.ndarray:
    """The projected attenuation of study ``st`` on an n x n grid.

    If ``masks`` is a dict it receives boolean ground-truth regions: "pleural_space" (inside
    the pleura: lung, pneumothorax and effusion), "pneumothorax", "effusion" and "heart".
    """
    a, det = st.anatomy, st.details
    g = _grid(a, n)
    tex = texture(tex_rng, 48, n)          # patchy density variations
    fine = texture(tex_rng, 160, n)        # fine reticular interstitial markings
    A, prof, par = _lungs(a, det, g, tex, fine, masks)
    if masks is not None:
        arc = np.where(g.left, a.heart_arc(g.y, "left"), a.heart_arc(g.y, "right"))
        masks["heart"] = (arc > g.ax) & (g.y < g.dia)
    _soft_tissue(A, a, det, g, par)
    _bones(A, a, det, g)
    A += parts.vessels(st, n) * par
    parts.opacities(A, st, n, prof, tex)
    A += parts.devices(det["devices"], a, n)
    return np.maximum(A, 0.0)
