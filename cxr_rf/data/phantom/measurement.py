"""Measurements read from a phantom radiograph alone (no access to its ground truth).

Pipeline: find the exposed field (collimated borders are 0), work at <= 256 px, normalise by
percentiles inside the field (so every site's exposure curve looks alike), remove thin bright
structures (vessels, lines, tubes) with a grey opening, split dark from dense by Otsu, and keep
the dark regions enclosed by the body: the lungs. The midline is the lung-free column band
between them.

Convention (PA display, as if the patient faced the viewer): the lung on the image's left is
the patient's RIGHT lung; ``*_right`` outputs refer to it, ``*_left`` to the image's right.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

# Costophrenic-blunting score above which an effusion is called. A normal recess is the lung's
# lowest point (score ~0); fluid lifts the lateral lung above its medial base (score > ~0.02).
CP_THRESHOLD = 0.012


def _otsu(v: np.ndarray) -> float:
    hist, edges = np.histogram(v, 128)
    p = hist / hist.sum()
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * mids)
    between = (m0[-1] * w0 - m0) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
    return float(mids[np.argmax(between[:-1])])


def _ring_labels(lab: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Labels of components touching the array edge or ``ring``."""
    edge = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1], lab[ring]])
    return np.unique(edge[edge > 0])


def lung_mask(image: np.ndarray) -> tuple[np.ndarray, int]:
    """(lung mask at working resolution, downsampling factor)."""
    mask, f, _ = _lungs(image)
    return mask, f


def _lungs(image: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """(lung mask, downsampling factor, the working image normalised by the 1st/99th
    percentiles of the exposed field: lungs ~0.3-0.6, mediastinum ~1)."""
    img = np.asarray(image, np.float32)
    n = img.shape[0]
    f = max(1, n // 256)
    m = (n // f) * f
    w = img[:m, :m].reshape(m // f, f, m // f, f).mean((1, 3))
    field = w > 0
    rows = np.flatnonzero(field.mean(1) > 0.5)
    cols = np.flatnonzero(field.mean(0) > 0.5)
    mask = np.zeros_like(field)
    if rows.size < 8 or cols.size < 8:
        return mask, f, np.zeros_like(w)
    r0, r1, c0, c1 = rows[0] + 1, rows[-1], cols[0] + 1, cols[-1]
    crop = w[r0:r1, c0:c1]
    p1, p99 = np.percentile(crop, [1, 99])
    norm = (w - p1) / max(p99 - p1, 1e-6)
    x = (crop - p1) / max(p99 - p1, 1e-6)
    x = ndimage.gaussian_filter(x, 0.7)
    k = max(3, int(round(0.014 * w.shape[0])) | 1)
    x = ndimage.grey_opening(x, size=(k, k))
    # Outside air is the darkest class and touches the field edge: flood it away first, so
    # the second split is between lung and dense tissue whatever the habitus/collimation.
    air = x < 0.5 * _otsu(x)
    lab, _ = ndimage.label(air)
    outside = np.isin(lab, _ring_labels(lab, np.zeros_like(air)))
    body = ~ndimage.binary_dilation(outside, iterations=2)
    ring = ndimage.binary_dilation(outside, iterations=3)
    t = _otsu(x[body])
    lungs = np.zeros_like(air)
    # Lungs are the large dark regions enclosed by the body. If the split lets a lung leak
    # out (through a dark neck or a thin chest wall), lower the threshold until it closes.
    for dt in np.arange(0.0, 0.33, 0.04):
        dark = (x < t - dt) & body
        lab, num = ndimage.label(dark)
        if num == 0:
            continue
        sizes = ndimage.sum_labels(dark, lab, np.arange(1, num + 1))
        keep = sizes > 0.004 * dark.size
        bad = _ring_labels(lab, ring)
        keep[bad[bad > 0] - 1] = False
        lungs = keep[lab - 1] & (lab > 0)
        half = lungs.shape[1] // 2
        if min(lungs[:, :half].mean(), lungs[:, half:].mean()) > 0.03:
            break
    mask[r0:r1, c0:c1] = ndimage.binary_fill_holes(lungs)
    return mask, f, norm


def _edges(lung: np.ndarray, lateral_first: bool):
    """Per row: (present, lateral edge, medial edge, fill fraction) of one lung."""
    n = lung.shape[1]
    present = lung.any(1)
    first = np.argmax(lung, 1)
    last = n - 1 - np.argmax(lung[:, ::-1], 1)
    span = np.maximum(last - first + 1, 1)
    fill = lung.sum(1) / span
    lat, med = (first, last) if lateral_first else (last, first)
    return present, lat, med, fill


def _bottom(lung: np.ndarray, c0: int, c1: int, how) -> float:
    cols = lung[:, min(c0, c1):max(c0, c1) + 1]
    has = cols.any(0)
    if not has.any():
        return np.nan
    low = lung.shape[0] - 1 - np.argmax(cols[::-1], 0)
    return float(how(low[has]))


def measure(image: np.ndarray) -> dict:
    """Analytic measurements from pixels: CTR, costophrenic blunting, effusion calls.

    Returns ``ctr`` (max horizontal cardiac silhouette extent / max internal thoracic width),
    ``heart_width`` and ``thoracic_width`` (fractions of the image width),
    ``cp_blunting_left/right`` (costophrenic blunting: how far the lung's lowest point lies
    below the lowest lung in the lateral recess, in thoracic widths; ~0 for a sharp angle,
    higher = blunter), ``effusion_left/right`` (blunting > CP_THRESHOLD) and
    ``ptx_lucency_left/right`` (pneumothorax: how much darker the lung's lateral rim is than
    the lung just inside it, in the upper half; see ``_peripheral_lucency``). Left/right are
    the patient's. Accurate from 128 px up; values are NaN/False when no lungs are found (tiny
    images).
    """
    out = {"ctr": np.nan, "heart_width": np.nan, "thoracic_width": np.nan,
           "cp_blunting_left": np.nan, "cp_blunting_right": np.nan,
           "effusion_left": False, "effusion_right": False,
           "ptx_lucency_left": np.nan, "ptx_lucency_right": np.nan}
    mask, _, norm = _lungs(image)
    n = mask.shape[1]
    colsum = ndimage.uniform_filter1d(mask.sum(0).astype(np.float32), 3)
    cols = np.flatnonzero(colsum)
    if cols.size < 10:
        return out
    a, b = cols[0], cols[-1]
    lo, hi = a + int(0.3 * (b - a)), a + int(0.7 * (b - a))
    centre = colsum[lo:hi]
    gap = np.flatnonzero(centre <= centre.min() + 0.5) + lo
    mid = int(round(gap.mean()))
    right = mask.copy()          # patient right = image left
    right[:, mid:] = False
    left = mask.copy()
    left[:, :mid] = False
    pr, lat_r, med_r, fill_r = _edges(right, True)
    pl, lat_l, med_l, fill_l = _edges(left, False)
    if pr.sum() < 10 or pl.sum() < 10:
        return out
    out["ptx_lucency_right"] = _peripheral_lucency(right, norm, True)
    out["ptx_lucency_left"] = _peripheral_lucency(left, norm, False)
    # Thorax: the cage is widest over a long stretch of rows, so robust percentiles of each
    # side's lateral edge equal its extreme even where a zone is opacified.
    x_r = float(np.percentile(lat_r[pr], 8))
    x_l = float(np.percentile(lat_l[pl], 92))
    thorax = x_l - x_r + 1
    rows = np.flatnonzero(pr | pl)
    top = rows[0] + 0.35 * (rows[-1] - rows[0])
    heart, cp = [], {}
    for name, pres, med, fill, lung, wall, sgn in (("right", pr, med_r, fill_r, right, x_r, -1),
                                                   ("left", pl, med_l, fill_l, left, x_l, 1)):
        med_s = ndimage.median_filter(med, 3)
        cand = pres & (fill > 0.85) & (np.arange(len(pres)) > top)
        ext = _heart_extreme(lung, med_s, cand, sgn, max(2, round(0.012 * n)))
        if ext is None:
            return out
        heart.append(ext)
        # Costophrenic angle: a normal lateral recess is the lowest point of the lung; fluid
        # fills it and rises toward the wall (a meniscus), so the lung then ends higher
        # laterally than medially.
        lowest = float(np.flatnonzero(pres)[-1])
        lat_b = _bottom(lung, int(round(wall - sgn * 0.03 * thorax)), int(round(wall)), np.max)
        cp[name] = (lowest - lat_b) / thorax
    width = heart[1] - heart[0] - 1
    out.update(ctr=float(width / thorax), heart_width=float(width / n),
               thoracic_width=float(thorax / n))
    for name, score in cp.items():
        out[f"cp_blunting_{name}"] = float(score)
        out[f"effusion_{name}"] = bool(score > CP_THRESHOLD)
    return out


def _heart_extreme(lung, med, cand, sgn, k):
    """Most lateral point of the heart border along one lung's medial edge (a column).

    The medial edge is the heart border only where lung continues *below* that point in the
    same column; where the lung ends there instead (on a hemidiaphragm or a fluid level) the
    edge is a base, not the heart, and that row is dropped.
    """
    rows = list(np.flatnonzero(cand))
    while rows:
        vals = sgn * med[rows]
        j = int(np.argmax(vals))
        r, c = rows[j], med[rows[j]]
        below = lung[r + 1:r + 1 + k, c]
        if below.size == k and below.all():
            return float(c)
        rows.pop(j)
    return None


def _peripheral_lucency(lung: np.ndarray, norm: np.ndarray, lateral_first: bool) -> float:
    """Pneumothorax sign of one lung: the median, over the rows of its upper half, of how much
    darker the lateral rim is than the lung just inside it.

    Per row, along the lung from its lateral edge inward: the median of the normalised
    brightness 5-11 px in (at 128 px; offsets scale with the working width) minus the darkest
    value 1-3 px in. A normal lung gets brighter toward the chest wall (it thins there, and
    the wall's soft tissue overlaps it): score < ~0. Pleural air between the wall and a
    collapsed lung has no lung tissue or vessels and is the darkest band of the row: score
    > 0. The band is widest at the apex and thins downward, hence the upper half.
    """
    n = lung.shape[1]
    s = n / 128
    o = [int(round(k * s)) for k in (1, 4, 5, 12)]
    rows = np.flatnonzero(lung.any(1))
    if rows.size < 10:
        return np.nan
    vals = []
    for r in rows[rows < rows[0] + 0.5 * (rows[-1] - rows[0])]:
        c = np.flatnonzero(lung[r])
        if c.size < 16 * s:
            continue
        p = norm[r, c] if lateral_first else norm[r, c[::-1]]
        vals.append(np.median(p[o[2]:o[3]]) - p[o[0]:o[1]].min())
    return float(np.median(vals)) if vals else np.nan
