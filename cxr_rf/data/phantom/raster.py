"""Rasterisation primitives for the phantom: anti-aliased lines, boxes, smooth noise.

All coordinates are normalised image units in [0, 1]; ``n`` is the grid size. Thin structures
are splatted as sample points and blurred by a Gaussian of their true width, so they are
anti-aliased (and keep their integrated density) at any resolution.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

F32 = np.float32


def clip01(a):
    """Clip to [0, 1] (soft masks and ramps)."""
    return np.clip(a, 0.0, 1.0)


def splat_lines(n: int, segs: np.ndarray, sigma, amp) -> np.ndarray:
    """Anti-aliased lines: segments (x0, y0, x1, y1) in [0,1] with Gaussian profile ``sigma``.

    ``amp`` is the peak attenuation for a line that is resolved; unresolved lines keep their
    integral (they get fainter, as they would on a coarse detector). ``sigma`` may vary per
    segment; the image is then blurred once with the largest (>= 0.5 px) of them.
    """
    img = np.zeros(n * n, np.float64)
    if len(segs) == 0:
        return img.reshape(n, n).astype(F32)
    segs = np.asarray(segs, np.float64) * n
    amp = np.broadcast_to(np.asarray(amp, np.float64), (len(segs),))
    sigma = np.broadcast_to(np.asarray(sigma, np.float64), (len(segs),))
    dx, dy = segs[:, 2] - segs[:, 0], segs[:, 3] - segs[:, 1]
    length = np.hypot(dx, dy)
    k = np.maximum(np.ceil(length / 0.5).astype(int), 1) + 1
    seg = np.repeat(np.arange(len(segs)), k)
    t = (np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)) / np.repeat(k - 1, k)
    px = segs[seg, 0] + t * dx[seg] - 0.5
    py = segs[seg, 1] + t * dy[seg] - 0.5
    s_px = sigma * n
    w = (amp * np.sqrt(2 * np.pi) * s_px * length / (k - 1))[seg]
    s_px = float(s_px.max())
    j0, i0 = np.floor(px).astype(int), np.floor(py).astype(int)
    fx, fy = px - j0, py - i0
    for di, dj, ww in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                       (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        ii, jj = i0 + di, j0 + dj
        ok = (ii >= 0) & (ii < n) & (jj >= 0) & (jj < n)
        img += np.bincount(ii[ok] * n + jj[ok], (w * ww)[ok], minlength=n * n)
    img = img.reshape(n, n).astype(F32)
    return ndimage.gaussian_filter(img, max(s_px, 0.5), truncate=3.0)


def smooth_path(points, iterations: int = 3) -> np.ndarray:
    """Chaikin corner cutting: a smooth polyline through ``points``, as segments."""
    p = np.asarray(points, np.float64)
    for _ in range(iterations):
        q = 0.75 * p[:-1] + 0.25 * p[1:]
        r = 0.25 * p[:-1] + 0.75 * p[1:]
        p = np.concatenate([p[:1], np.stack([q, r], 1).reshape(-1, 2), p[-1:]])
    return np.concatenate([p[:-1], p[1:]], 1)


def box(n, x, y, rx, ry):
    """Slices and local coordinate grids of the pixels within (x±rx, y±ry)."""
    c0, c1 = max(int((x - rx) * n), 0), min(int(np.ceil((x + rx) * n)) + 1, n)
    r0, r1 = max(int((y - ry) * n), 0), min(int(np.ceil((y + ry) * n)) + 1, n)
    xs = ((np.arange(c0, c1) + 0.5) / n).astype(F32)[None, :]
    ys = ((np.arange(r0, r1) + 0.5) / n).astype(F32)[:, None]
    return (slice(r0, r1), slice(c0, c1)), xs, ys


def _linear_resize_matrix(m: int, n: int) -> np.ndarray:
    """[n, m] weights of linear interpolation from m to n cell-centred samples."""
    pos = np.clip((np.arange(n) + 0.5) * m / n - 0.5, 0, m - 1)
    i0 = np.minimum(np.floor(pos).astype(int), m - 2)
    w = np.zeros((n, m), F32)
    w[np.arange(n), i0] = 1 - (pos - i0)
    w[np.arange(n), i0 + 1] = pos - i0
    return w


def texture(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
    """Unit-variance smooth noise drawn on an m x m grid (resolution independent), at n x n."""
    t = ndimage.gaussian_filter(rng.standard_normal((m, m)), 0.8).astype(F32)
    w = _linear_resize_matrix(m, n)     # separable bilinear upsampling as two small matmuls
    t = w @ t @ w.T
    return t * (1.0 / (t.std() + 1e-6))


def blob(A, n, x, y, r, amp, mask=None, power=0.5):
    """Add a round opacity of radius ``r`` (profile (1 - d^2)^power) to ``A`` in place."""
    sl, xs, ys = box(n, x, y, r, r)
    d2 = ((xs - x) ** 2 + (ys - y) ** 2) / (r * r)
    val = amp * clip01(1 - d2) ** power
    A[sl] += val if mask is None else val * mask[sl]
