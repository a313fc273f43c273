"""Acquisition sites: exposure curve, detector blur and noise, collimation, side marker.

Each site is a fixed set of parameters (a made-up scanner), with small per-study exposure
jitter. The exposure curve maps attenuation ``A`` to display brightness,
``lo + (hi - lo) * (1 - exp(-A / a0)) ** gamma``: monotone (dense = bright) and compressive,
like a log-amplified detector with a site LUT. Collimated borders are exactly 0 and the
exposed field is >= 1, so the field can be found from the pixels alone.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

SITE_PARAMS: dict[str, dict] = {
    # High contrast, fine low noise, tight collimation, "R" block marker at the top left.
    "site_a": dict(a0=2.1, gamma=1.25, lo=0.03, hi=0.99, noise=0.010, corr=0.0, blur=0.0,
                   grid=0.0, heel=0.0, border=(0.008, 0.025), marker=("R", "top-left", "block")),
    # Flat, bright LUT, soft detector with correlated noise and grid lines, wide collimation,
    # a bare "L" glyph at the top right.
    "site_b": dict(a0=2.5, gamma=0.95, lo=0.10, hi=0.90, noise=0.016, corr=1.2, blur=0.7,
                   grid=0.012, heel=0.0, border=(0.055, 0.09), marker=("L", "top-right", "glyph")),
    # Steep, dark LUT, noisy, anode-heel gradient, "L" block at the bottom right.
    "site_c": dict(a0=1.8, gamma=1.5, lo=0.02, hi=0.97, noise=0.024, corr=0.6, blur=0.0,
                   grid=0.0, heel=0.08, border=(0.03, 0.05),
                   marker=("L", "bottom-right", "block")),
}

# 5x7 bitmaps of the side-marker letters.
_GLYPHS = {
    "L": ["1....", "1....", "1....", "1....", "1....", "1....", "11111"],
    "R": ["1111.", "1...1", "1...1", "1111.", "1.1..", "1..1.", "1...1"],
}


def field_box(site: str, u: np.ndarray, n: int) -> tuple[int, int, int, int]:
    """Exposed field (row0, row1, col0, col1) in pixels for collimation draws ``u[4]``."""
    lo, hi = SITE_PARAMS[site]["border"]
    m = [int(round((lo + (hi - lo) * float(v)) * n)) for v in u[:4]]
    return m[0], n - m[1], m[2], n - m[3]


def _marker(img: np.ndarray, site: str, box: tuple[int, int, int, int]) -> None:
    """Burn the site's side-marker letter into a corner of the field (procedural glyph)."""
    letter, corner, style = SITE_PARAMS[site]["marker"]
    n = img.shape[0]
    size = max(int(round(0.055 * n)), 3)
    pad = max(int(round(0.012 * n)), 1)
    r0 = box[0] + pad if corner.startswith("top") else box[1] - pad - size
    c0 = box[2] + pad if corner.endswith("left") else box[3] - pad - size
    rows = (np.arange(size) + 0.5) / size * 9 - 1          # 7 glyph rows plus a margin
    cols = (np.arange(size) + 0.5) / size * 7 - 1
    ri, ci = np.floor(rows).astype(int), np.floor(cols).astype(int)
    bitmap = np.array([[c == "1" for c in row] for row in _GLYPHS[letter]])
    inside = (ri[:, None] >= 0) & (ri[:, None] < 7) & (ci[None, :] >= 0) & (ci[None, :] < 5)
    on = inside & bitmap[np.clip(ri, 0, 6)[:, None], np.clip(ci, 0, 4)[None, :]]
    patch = img[r0:r0 + size, c0:c0 + size]
    if style == "block":       # lead block: bright square, letter cut out dark
        patch[...] = np.where(on, 0.12, 0.97)
    else:
        patch[on] = 1.0


def expose(A: np.ndarray, site: str, u: np.ndarray, noise_rng: np.random.Generator) -> np.ndarray:
    """Attenuation -> uint16 radiograph for ``site`` with study draws ``u`` (8 uniforms)."""
    p = SITE_PARAMS[site]
    n = A.shape[0]
    a0 = p["a0"] * (1 + 0.12 * (u[6] - 0.5))
    lo = p["lo"] + 0.02 * (u[7] - 0.5)
    if p["blur"]:
        A = ndimage.gaussian_filter(A, p["blur"] * n / 512)
    img = lo + (p["hi"] - lo) * (1 - np.exp(-A / a0)) ** p["gamma"]
    if p["heel"]:
        img = img * (1 + p["heel"] * (0.5 - (np.arange(n, dtype=np.float32)[:, None] + 0.5) / n))
    noise = noise_rng.standard_normal((n, n), dtype=np.float32)
    if p["corr"]:
        noise = ndimage.gaussian_filter(noise, p["corr"])
        noise *= 1.0 / (noise.std() + 1e-6)
    # Quantum noise grows where fewer photons arrive, i.e. in the brighter (denser) areas.
    img = img + p["noise"] * (0.5 + 0.7 * img) * noise
    if p["grid"]:
        img = img + p["grid"] * np.cos(2 * np.pi * np.arange(n, dtype=np.float32) / 2.7)[None]
    img = np.clip(img, 1.0 / 65535, 1.0)
    box = field_box(site, u, n)
    _marker(img, site, box)
    out = np.zeros((n, n), np.uint16)
    r0, r1, c0, c1 = box
    out[r0:r1, c0:c1] = np.maximum(np.round(img[r0:r1, c0:c1] * 65535), 1).astype(np.uint16)
    return out
