"""Drawn parts of the phantom chest: bones, vessels, opacities and devices.

Each function adds attenuation for one group of structures, either in place on a slice of the
map (bounded boxes keep them cheap) or as a returned full-size layer.
"""
from __future__ import annotations

import numpy as np

from cxr_rf.data.phantom import anatomy as pa
from cxr_rf.data.phantom.raster import F32, blob, box, clip01, smooth_path, splat_lines


def ribs(a: pa.Anatomy, ax, y, n, fracture):
    """Posterior ribs (curved bands with bright cortices) and fainter anterior ribs."""
    r = a.rib
    s = ax / a.H
    out = 0.0
    for kind in ("post", "ant"):
        if kind == "post":
            g = -0.06 * s + r["curv"] * s * s
            y1, sp, count, amp = r["y1"], r["sp"], r["n"], 0.45
            fade = clip01((1.12 - s) / 0.06) * clip01((s - 0.08) / 0.05)
        else:   # anterior ribs run down and medially from the lateral wall
            g = 0.13 * np.clip(1.0 - s, 0, None) ** 1.3
            y1, sp, count, amp = a.y_apex + 0.07, 0.062, 6, 0.18
            fade = clip01((1.05 - s) / 0.05) * clip01((s - 0.3) / 0.15)
        q = y - g
        alpha = r["alpha"]
        k = (np.sqrt(np.maximum(1 + 4 * alpha * (q - y1) / sp, 0)) - 1) / (2 * alpha)
        if kind == "post" and fracture is not None:
            # A displaced fracture: the lateral fragment steps down, with a lucent gap.
            sel = (np.floor(k) == fracture["rib"]) & fracture["mask"]
            beyond = clip01((s - fracture["s"]) * a.H * n)
            k = k - sel * beyond * (0.006 / sp)
            gap = sel * (np.abs(s - fracture["s"]) * a.H < 0.0035)
        fr = k - np.floor(k)
        d = 1.0 / (n * sp)
        band = clip01(fr / d) * clip01((r["wf"] - fr) / d) * ((k >= 0) & (k < count))
        uu = fr / r["wf"]
        bone = amp * r["bone"] * band * (0.62 + 0.38 * (2 * uu - 1) ** 4) * fade
        if kind == "post" and fracture is not None:
            bone = bone * (1 - gap)
        out = out + bone
    return out


def clavicles_spine(A, a: pa.Anatomy, x, y, n):
    """Clavicles over the apices; the spine, pedicles and trachea along the midline."""
    nr = int(0.36 * n)
    ax = np.abs(x - a.cx)
    sc = (ax - 0.03) / 0.26
    c_med, c_lat = a.clavicle
    yc = c_med + (c_lat - c_med) * sc + 0.012 * np.sin(np.pi * clip01(sc))
    th = 0.026 - 0.007 * clip01(sc)
    dd = (y[:nr] - yc) / th
    prof = np.sqrt(clip01(1 - dd * dd)) * (0.65 + 0.35 * dd ** 4)
    A[:nr] += 0.6 * a.rib["bone"] * prof * clip01(sc / 0.05) * clip01((1 - sc) / 0.05)
    sl, xs, ys = box(n, a.cx, 0.5, 0.06, 0.5)
    dx = xs - a.cx
    body = np.sqrt(clip01(1 - (dx / 0.03) ** 2))
    fr = (ys - 0.02) / 0.048
    fr = fr - np.floor(fr)
    endplate = np.exp(-(fr / 0.05) ** 2) + np.exp(-((fr - 0.82) / 0.05) ** 2)
    disc = np.exp(-((fr - 0.91) / 0.04) ** 2)
    ped = sum(np.sqrt(clip01(1 - ((dx - o) / 0.007) ** 2 - ((fr - 0.35) / 0.13) ** 2)) -
              0.7 * np.sqrt(clip01(1 - ((dx - o) / 0.0045) ** 2 - ((fr - 0.35) / 0.08) ** 2))
              for o in (-0.022, 0.022))
    spine = a.rib["bone"] * (0.5 * body * (0.85 + 0.3 * endplate - 0.3 * disc) + 0.3 * ped)
    trachea = np.sqrt(clip01(1 - ((xs - a.cx + 0.004) / 0.016) ** 2))
    trachea = trachea * clip01((a.carina - ys) / 0.01)
    A[sl] += spine - 0.4 * trachea


def arms(A, a: pa.Anatomy, n):
    """Upper arms beside the chest: soft tissue, humeral heads and shafts."""
    for sx in (-1, 1):
        xa = a.cx + sx * (a.W + 0.075)
        sl, xs, ys = box(n, xa, 0.4, 0.065, 0.4)
        arm = 1.5 * np.sqrt(clip01(1 - ((xs - xa) / 0.065) ** 2)) ** 0.7
        arm = arm * clip01((ys - 0.05) / 0.05) * clip01((0.8 - ys) / 0.25)
        xh, yh = a.cx + sx * (a.W + 0.05), 0.13
        r2 = ((xs - xh) ** 2 + (ys - yh) ** 2) / 0.055 ** 2
        head = np.sqrt(clip01(1 - r2)) * (0.75 + 0.25 * r2 ** 2)
        dx = np.abs(xs - xa + sx * 0.012) / 0.02
        shaft = np.sqrt(clip01(1 - dx * dx)) * (0.5 + 0.5 * dx ** 4) * clip01((ys - yh) / 0.03)
        A[sl] += arm + a.rib["bone"] * (0.6 * head + 0.35 * shaft * clip01((0.75 - ys) / 0.2))


def fracture_spec(det, left):
    """The rib fracture for ``ribs``: which rib, where, and the columns of its side."""
    f = det["fracture"]
    if not f:
        return None
    return {"rib": f["rib"], "s": f["s"], "mask": left if f["side"] == "left" else ~left}


def vessels(st, n):
    """Pulmonary vessels, thick and dense at the hila, thin at the periphery."""
    v = st.vessels
    level = v[:, 4]
    amp = 0.32 * 0.85 ** level
    if st.details["edema"]:       # vascular congestion and cephalisation
        amp = amp * np.where(v[:, 1] < st.anatomy.hila["left"][1], 1.5, 1.15)
    sigma = np.select([level <= 1, level <= 3], [0.0032, 0.002], 0.0011)
    # Widths that a coarse grid cannot resolve share one blur (and one splat).
    blur = np.maximum(sigma * n, 0.5)
    out = 0.0
    for b in np.unique(blur):
        sel = blur == b
        out = out + splat_lines(n, v[sel, :4], sigma[sel], amp[sel])
    return out


def opacities(A, st, n, prof, tex):
    """Nodules/masses, airspace opacities, edema haze, plate atelectasis (lung-confined)."""
    det, a = st.details, st.anatomy
    for les in det["lesions"]:
        if les["kind"] == "mass":        # lobulated: three overlapping lobes
            for k, (ox, oy) in enumerate(((0, 0), (0.45, 0.3), (-0.35, 0.4))):
                rr = les["r"] * (1.0 if k == 0 else 0.6)
                blob(A, n, les["x"] + ox * les["r"], les["y"] + oy * les["r"], rr, les["amp"],
                      prof)
        else:
            blob(A, n, les["x"], les["y"], les["r"], les["amp"], prof)
    for key in ("consolidation", "ggo"):
        p = det[key]
        if not p:
            continue
        sl, xs, ys = box(n, p["x"], p["y"], 2.2 * p["r"], 2.2 * p["r"])
        acc = 0.0
        for bx, by, br in p["blobs"]:
            acc = acc + np.exp(-((xs - p["x"] - bx) ** 2 + (ys - p["y"] - by) ** 2) / (br * br))
        patch = clip01(acc) ** 0.8 * (0.8 + 0.2 * tex[sl])
        A[sl] += p["amp"] * patch * prof[sl]
    if det["edema"]:
        for side in ("right", "left"):
            hx, hy = a.hila[side]
            sl, xs, ys = box(n, hx, hy, 0.2, 0.16)
            haze = np.exp(-((xs - hx) / 0.09) ** 2) * np.exp(-((ys - hy) / 0.075) ** 2)
            A[sl] += det["edema"]["amp"] * haze * prof[sl]
        # Kerley B lines: short horizontal septal lines at the lateral bases.
        segs = []
        for side, sx in (("right", -1), ("left", 1)):
            for k in range(5):
                yy = a.dome[side] - 0.02 - 0.018 * k
                xx = a.cx + sx * (a.H - 0.003)
                segs.append((xx, yy, xx - sx * 0.022, yy))
        A += 0.25 * splat_lines(n, np.array(segs), 0.0012, 1.0) * prof
    at = det["atelectasis"]
    if at:
        xm, ym = (at["x0"] + at["x1"]) / 2, (at["y0"] + at["y1"]) / 2
        half = max(abs(at["x1"] - at["x0"]), 1e-3) / 2 + at["th"]
        sl, xs, ys = box(n, xm, ym, half, half)
        dx, dy = at["x1"] - at["x0"], at["y1"] - at["y0"]
        t = np.clip(((xs - at["x0"]) * dx + (ys - at["y0"]) * dy) / (dx * dx + dy * dy), 0, 1)
        dist = np.hypot(xs - at["x0"] - t * dx, ys - at["y0"] - t * dy)
        A[sl] += at["amp"] * clip01(1 - (dist / (at["th"] / 2)) ** 2) * prof[sl]


def devices(dev, a: pa.Anatomy, n):
    """Metal and radio-opaque plastic: tubes, lines, pacemaker, ECG electrodes."""
    if not dev:
        return 0.0
    cx, out = a.cx, np.zeros((n, n), F32)
    if dev["et"]:
        xe = cx - 0.004
        for off, amp in ((-0.007, 0.5), (0.007, 0.5), (0.004, 1.4)):
            out += splat_lines(n, np.array([[xe + off, 0.0, xe + off, dev["et"]]]), 0.0012, amp)
    if dev["ng"]:
        dl = a.dome["left"]
        path = [(cx + 0.01, 0.0), (cx + 0.012, 0.3), (cx + 0.022, a.carina + 0.2),
                (cx + 0.05, dl + 0.03), (cx + 0.12, dl + 0.08), (cx + 0.15, dl + 0.07)]
        out += splat_lines(n, smooth_path(path), 0.0022, 1.2)
    if dev["cvc"]:
        s = -1 if dev["cvc"] == "right" else 1
        path = [(cx + s * 0.26, 0.19), (cx + s * 0.13, 0.215), (cx + s * 0.05, 0.245),
                (cx - 0.035, 0.31), (cx - 0.035, a.carina + 0.06)]
        out += splat_lines(n, smooth_path(path), 0.0017, 1.6)
    if dev["pm"]:
        s = -1 if dev["pm"] == "right" else 1
        bx, by = cx + s * 0.24, 0.2
        sl, xs, ys = box(n, bx, by, 0.04, 0.03)
        # Titanium can with a less dense battery compartment.
        can = clip01((0.034 - np.abs(xs - bx)) * n) * clip01((0.024 - np.abs(ys - by)) * n)
        cell = (clip01((0.02 - np.abs(xs - bx - s * 0.01)) * n)
                * clip01((0.015 - np.abs(ys - by)) * n))
        out[sl] += 2.6 * can - 0.6 * cell
        wr, vr = a.heart["right"][0], a.heart["right"][1]
        wl, vl = a.heart["left"][0], a.heart["left"][1]
        for tip in ((cx - 0.7 * wr, vr - 0.03), (cx + 0.6 * wl, vl + 0.03)):
            path = [(bx - s * 0.03, by), (cx + s * 0.09, 0.225), (cx - 0.03, 0.3),
                    (cx - 0.04, vr - 0.06), tip]
            out += splat_lines(n, smooth_path(path), 0.0018, 2.0)
    for ex, ey in dev["ecg"]:
        sl, xs, ys = box(n, ex, ey, 0.014, 0.014)
        d = np.hypot(xs - ex, ys - ey)
        out[sl] += 1.2 * np.exp(-((d - 0.01) / 0.0015) ** 2) + 2.0 * clip01((0.003 - d) * n)
    return out
