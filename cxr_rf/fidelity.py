"""Fidelity of generated images against real ones, from feature vectors (pure numpy, float64).

The features (one row per image, e.g. an Inception pool layer or a chest-X-ray encoder) come in
as ``feats_NxD`` arrays or as a ``FeatureStore`` (``.npy`` chunks on disk, for N too large to
hold); every function here accepts either, reads the rows block by block, and gives the same
numbers for both. Extracting features and choosing the sets is ``cxr_rf.evaluation.fidelity``'s
(``python -m cxr_rf.evaluate fidelity``).

    RunningMoments     streaming mean and covariance (Chan's parallel merge, float64)
    frechet_distance   FD between two Gaussians (mu, cov); ``fid`` does real vs fake rows
    bootstrap_fd       FD of Poisson-bootstrap replicates of both sets, in one streaming pass
    kernel_distance    KID: unbiased MMD² with the cubic polynomial kernel, over subsets
    prdc               precision, recall, density, coverage (Naeem et al. 2020)

Choices (see each docstring):

* FD's matrix square root: ``Tr (C1 C2)^{1/2}`` is the sum of the square roots of the
  eigenvalues of the *symmetric* PSD matrix ``S C2 S`` with ``S = C1^{1/2}`` (both by ``eigh``;
  ``C1 C2`` is similar to it). Two symmetric eigendecompositions are backward stable, give real
  values only, and clip round-off negatives at 0, so rank-deficient covariances (N < D, common
  with 2048-D features) need no ``eps * I`` retry; ``scipy.linalg.sqrtm`` of the non-symmetric
  ``C1 C2`` (the usual pytorch-fid route) can return complex parts and lose accuracy there.
* KID: ``subsets=100`` subsets of ``min(N, M, 1000)`` rows, drawn without replacement from each
  side (the torch-fidelity/Bińkowski et al. defaults); mean and sd (ddof=1) over subsets.
* PRDC: distances in ``block_size x block_size`` tiles; what stays in memory is one k-NN radius
  per real and per fake row (N + M floats), four per-row accumulators and one tile; k-NN radii
  are kept as a running k smallest per row, so neither side is ever held whole. Tiles are
  numpy by default; ``backend="jax"`` computes them on every local device (rows sharded).
"""
from __future__ import annotations

import os
import re
from typing import Iterator, NamedTuple, Union

import numpy as np

from cxr_rf import errors

DEFAULT_BLOCK = 1024


# --------------------------------------------------------------------------- running moments

class RunningMoments:
    """Streaming mean and covariance of feature rows, in float64.

    ``update(feats_NxD)`` folds a batch in; ``merge(other)`` folds another accumulator in
    (Chan, Golub & LeVeque's pairwise update: each batch is centred on its own mean before its
    scatter matrix is formed, so large offsets cost no precision). ``mean`` and ``cov``
    (ddof=1, as ``np.cov``) equal those of all rows stacked, in any order and chunking.
    """

    def __init__(self, dim: int | None = None):
        self.count = 0
        self.dim = dim
        self._mean_D: np.ndarray | None = None
        self._scatter_DxD: np.ndarray | None = None   # sum of (x - mean)(x - mean)^T

    def _fold(self, n: int, mean_D: np.ndarray, scatter_DxD: np.ndarray) -> None:
        if n == 0:
            return
        if self.dim is None:
            self.dim = mean_D.shape[0]
        elif mean_D.shape[0] != self.dim:
            raise errors.UserError(f"features have {mean_D.shape[0]} columns, expected {self.dim}")
        if self.count == 0:
            self.count, self._mean_D, self._scatter_DxD = n, mean_D.copy(), scatter_DxD.copy()
            return
        total = self.count + n
        delta_D = mean_D - self._mean_D
        self._mean_D = self._mean_D + delta_D * (n / total)
        self._scatter_DxD = (self._scatter_DxD + scatter_DxD
                             + np.outer(delta_D, delta_D) * (self.count * n / total))
        self.count = total

    def update(self, feats_NxD) -> "RunningMoments":
        x = _check_feats(feats_NxD, "features")
        if x.shape[0]:
            mean_D = x.mean(axis=0)
            centred = x - mean_D
            self._fold(x.shape[0], mean_D, centred.T @ centred)
        return self

    def merge(self, other: "RunningMoments") -> "RunningMoments":
        if other.count:
            self._fold(other.count, other._mean_D, other._scatter_DxD)
        return self

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise errors.UserError("mean of no features")
        return self._mean_D.copy()

    @property
    def cov(self) -> np.ndarray:
        if self.count < 2:
            raise errors.UserError(f"covariance needs at least 2 feature rows, got {self.count}")
        return self._scatter_DxD / (self.count - 1)


def moments(feats, block_size: int = DEFAULT_BLOCK, idx=None) -> RunningMoments:
    """RunningMoments of the rows of ``feats`` (array or FeatureStore), block by block: every
    row, or the rows at ``idx`` (ascending, no repeats: a subgroup)."""
    rows = _rows(feats, "features")
    block_size = _check_block(block_size)
    m = RunningMoments(rows.dim)
    for block in _blocks_at(rows, idx, block_size):
        m.update(block)
    return m


def _blocks_at(rows, idx, block_size: int) -> Iterator[np.ndarray]:
    """The rows of ``rows`` (all, or those at sorted ``idx``), ``block_size`` at a time."""
    if idx is None:
        for _, block in rows.blocks(block_size):
            yield block
        return
    idx = np.asarray(idx, np.int64)
    if idx.size and (np.any(np.diff(idx) <= 0) or idx[0] < 0 or idx[-1] >= rows.n):
        raise errors.UserError(f"row indices must be ascending, unique and in [0, {rows.n})")
    for s in range(0, idx.size, block_size):
        yield rows.take(idx[s:s + block_size])


# --------------------------------------------------------------------------- Fréchet distance

def _psd_sqrt(c_DxD: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh((c_DxD + c_DxD.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(cov1_DxD, cov2_DxD) -> float:
    """Tr (C1 C2)^{1/2} = Σ sqrt(eig(S C2 S)), S = C1^{1/2}: symmetric eigenproblems only."""
    s = _psd_sqrt(np.asarray(cov1_DxD, np.float64))
    m = s @ np.asarray(cov2_DxD, np.float64) @ s
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1_D, cov1_DxD, mu2_D, cov2_DxD) -> float:
    """||mu1 - mu2||² + Tr(C1 + C2 - 2 (C1 C2)^{1/2}), the Fréchet (2-Wasserstein²) distance
    between N(mu1, C1) and N(mu2, C2). Covariances must be symmetric PSD (rank-deficient is
    fine); see the module docstring for the square root. Clipped at 0 against round-off."""
    mu1, mu2 = np.asarray(mu1_D, np.float64), np.asarray(mu2_D, np.float64)
    c1, c2 = np.asarray(cov1_DxD, np.float64), np.asarray(cov2_DxD, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, a, shape in (("mu1", mu1, (d,)), ("mu2", mu2, (d,)),
                           ("cov1", c1, (d, d)), ("cov2", c2, (d, d))):
        if d < 1 or a.shape != shape:
            raise errors.UserError(f"{name} has shape {a.shape}, expected {shape} "
                                   "(means of length D, covariances DxD)")
        if not np.isfinite(a).all():
            raise errors.UserError(f"{name} has non-finite values")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(c1) + np.trace(c2) - 2 * trace_sqrt_product(c1, c2)
    return float(max(fd, 0.0))


def fid(real, fake, block_size: int = DEFAULT_BLOCK) -> float:
    """Fréchet distance between the Gaussians fitted to ``real`` and ``fake`` rows."""
    a, b = moments(real, block_size), moments(fake, block_size)
    if a.dim != b.dim:
        raise errors.UserError(f"real features have {a.dim} columns, fake {b.dim}")
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def _poisson_moments(rows, idx, n_boot: int, rng: np.random.Generator, center_D: np.ndarray,
                     block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Means [n_boot, D] and covariances [n_boot, D, D] of ``n_boot`` Poisson(1)-weighted
    replicates of the rows (centred on ``center_D`` first, so the raw-moment sums lose no
    precision; the mean is added back)."""
    d = rows.dim
    s0 = np.zeros(n_boot)
    s1 = np.zeros((n_boot, d))
    s2 = np.zeros((n_boot, d, d))
    for block in _blocks_at(rows, idx, block_size):
        x = block - center_D
        w_KxB = rng.poisson(1.0, (n_boot, x.shape[0])).astype(np.float64)
        s0 += w_KxB.sum(1)
        s1 += w_KxB @ x
        s2 += np.einsum("kb,bd,be->kde", w_KxB, x, x, optimize=True)
    s0 = np.maximum(s0, 2.0)                     # a replicate needs two rows for a covariance
    mean = s1 / s0[:, None]
    cov = (s2 - s0[:, None, None] * mean[:, :, None] * mean[:, None, :]) / (s0 - 1)[:, None, None]
    return mean + center_D, cov


def bootstrap_fd(real, fake, n_boot: int = 50, seed: int = 0, real_idx=None, fake_idx=None,
                 block_size: int = DEFAULT_BLOCK) -> np.ndarray:
    """FDs of ``n_boot`` bootstrap replicates of (real, fake), optionally restricted to the
    rows at ``real_idx`` / ``fake_idx`` (a subgroup).

    Poisson bootstrap (every row weighted by an independent Poisson(1) count, the streaming
    form of resampling with replacement): one pass over each side's blocks accumulates all
    replicates' weighted moments, so memory is ``n_boot`` D x D matrices plus one block,
    whatever N. Their spread is FD's standard error; their percentiles are a poor interval,
    because a resample repeats rows and FD is biased upward at small N
    (``cxr_rf.evaluation.fidelity`` reports point ± 1.96 standard errors)."""
    a, b = _rows(real, "real"), _rows(fake, "fake")
    if a.dim != b.dim:
        raise errors.UserError(f"real features have {a.dim} columns, fake {b.dim}")
    if n_boot < 1:
        raise errors.UserError(f"n_boot must be >= 1, got {n_boot}")
    block_size = _check_block(block_size)
    rng = np.random.default_rng(seed)
    ma, mb = moments(a, block_size, real_idx), moments(b, block_size, fake_idx)
    mu_a, cov_a = _poisson_moments(a, real_idx, n_boot, rng, ma.mean, block_size)
    mu_b, cov_b = _poisson_moments(b, fake_idx, n_boot, rng, mb.mean, block_size)
    return np.array([frechet_distance(mu_a[i], cov_a[i], mu_b[i], cov_b[i])
                     for i in range(n_boot)])


# --------------------------------------------------------------------------- KID

class KID(NamedTuple):
    mean: float
    std: float     # over subsets, ddof=1 (NaN for one subset)


def polynomial_kernel(x_NxD: np.ndarray, y_MxD: np.ndarray) -> np.ndarray:
    """k(x, y) = (x·y / D + 1)³, the KID kernel."""
    return (x_NxD @ y_MxD.T / x_NxD.shape[1] + 1.0) ** 3


def mmd2_unbiased(x_NxD, y_MxD) -> float:
    """Unbiased MMD² (U-statistic: the diagonals of k(x, x) and k(y, y) are left out)."""
    x, y = np.asarray(x_NxD, np.float64), np.asarray(y_MxD, np.float64)
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1))
                 + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def kernel_distance(x_NxD, y_MxD, subset_size: int | None = None, subsets: int = 100,
                    seed: int = 0) -> KID:
    """KID of ``x`` vs ``y`` (arrays or FeatureStores): the unbiased MMD² with the cubic
    polynomial kernel, averaged over ``subsets`` pairs of ``subset_size`` rows (default
    ``min(N, M, 1000)``), each drawn without replacement from its side with
    ``np.random.default_rng(seed)``. From a store only the subset's rows are read."""
    x, y = _rows(x_NxD, "x"), _rows(y_MxD, "y")
    if x.dim != y.dim:
        raise errors.UserError(f"x has {x.dim} feature columns, y {y.dim}")
    if subset_size is None:
        subset_size = min(x.n, y.n, 1000)
    if not 2 <= subset_size <= min(x.n, y.n):
        raise errors.UserError(f"subset_size must be in [2, min(N, M) = {min(x.n, y.n)}], "
                               f"got {subset_size}")
    if subsets < 1:
        raise errors.UserError(f"subsets must be >= 1, got {subsets}")
    rng = np.random.default_rng(seed)
    vals = np.empty(subsets, np.float64)
    for s in range(subsets):
        ix = np.sort(rng.choice(x.n, subset_size, replace=False))
        iy = np.sort(rng.choice(y.n, subset_size, replace=False))
        vals[s] = mmd2_unbiased(x.take(ix), y.take(iy))
    return KID(float(vals.mean()), float(vals.std(ddof=1)) if subsets > 1 else float("nan"))


# --------------------------------------------------------------------------- PRDC

def _distances(a_BxD: np.ndarray, b_CxD: np.ndarray) -> np.ndarray:
    """Euclidean distances between rows (the Gram form, as sklearn; clipped at 0)."""
    sq = ((a_BxD * a_BxD).sum(1)[:, None] + (b_CxD * b_CxD).sum(1)[None, :]
          - 2 * a_BxD @ b_CxD.T)
    return np.sqrt(np.clip(sq, 0, None))


def sharded_distances(a_BxD, b_CxD, devices=None) -> np.ndarray:
    """``_distances`` on JAX devices: the rows of ``a`` split over ``devices`` (default every
    local device; padded to a multiple of their count), ``b`` replicated; float64 result.

    For accelerators and large tiles (``prdc(..., backend="jax")``); JAX computes in float32
    unless ``jax_enable_x64`` is on, so a distance within float32 round-off of a radius can
    fall on the other side of it than with numpy."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    global _jax_distances
    if _jax_distances is None:
        _jax_distances = jax.jit(lambda a, b: jax.numpy.sqrt(jax.numpy.maximum(
            (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0)))
    devices = list(jax.local_devices() if devices is None else devices)
    a, b = np.asarray(a_BxD), np.asarray(b_CxD)
    pad = (-a.shape[0]) % len(devices)
    mesh = Mesh(np.array(devices), ("rows",))
    a_j = jax.device_put(np.pad(a, ((0, pad), (0, 0))), NamedSharding(mesh, P("rows", None)))
    b_j = jax.device_put(b, NamedSharding(mesh, P()))
    return np.asarray(_jax_distances(a_j, b_j), np.float64)[:a.shape[0]]


_jax_distances = None
_BACKENDS = {"numpy": _distances, "jax": sharded_distances}


def _backend(name: str):
    if name not in _BACKENDS:
        raise errors.UserError(f"backend must be one of {sorted(_BACKENDS)}, got {name!r}")
    return _BACKENDS[name]


def knn_radii(feats, k: int, block_size: int = DEFAULT_BLOCK,
              backend: str = "numpy") -> np.ndarray:
    """Distance of every row to its k-th nearest *other* row (self excluded by index).

    Tile by tile, each row keeps its k smallest distances so far: memory is N x k plus one
    tile, and neither operand is held whole."""
    rows = _rows(feats, "features")
    block_size, dist = _check_block(block_size), _backend(backend)
    if not 1 <= k < rows.n:
        raise errors.UserError(f"k must be in [1, {rows.n - 1}] for {rows.n} rows, got {k}")
    out = np.empty(rows.n, np.float64)
    for i0, a in rows.blocks(block_size):
        best = np.full((a.shape[0], k), np.inf)
        for j0, b in rows.blocks(block_size):
            d = dist(a, b)
            lo, hi = max(i0, j0), min(i0 + a.shape[0], j0 + b.shape[0])
            if lo < hi:                                        # this tile holds self-pairs
                idx = np.arange(lo, hi)
                d[idx - i0, idx - j0] = np.inf
            both = np.concatenate([best, d], axis=1)
            best = np.partition(both, k - 1, axis=1)[:, :k]
        out[i0:i0 + a.shape[0]] = best.max(axis=1)
    return out


def prdc(real_NxD, fake_MxD, k: int = 5, block_size: int = DEFAULT_BLOCK,
         backend: str = "numpy") -> dict:
    """{"precision", "recall", "density", "coverage"} of ``fake`` against ``real`` (arrays or
    FeatureStores), as defined by Naeem et al. 2020 and computed by their reference code
    (strict ``<``: a point on a ball's boundary is outside), with r_i the distance of real i
    to its k-th nearest other real and f_j that of fake j among the fakes:

        precision = mean_j [ exists i: d(r_i, f_j) < r_i ]     fakes inside the real manifold
        recall    = mean_i [ exists j: d(r_i, f_j) < f_j ]     reals inside the fake manifold
        density   = mean_j #{i: d(r_i, f_j) < r_i} / k        (≈ 1 when fake ~ real)
        coverage  = mean_i [ min_j d(r_i, f_j) < r_i ]        reals with a fake nearby

    Memory: the N + M radii, four per-row accumulators and one ``block_size`` tile.
    ``backend="jax"`` computes each tile with ``sharded_distances`` (all local devices)."""
    real, fake = _rows(real_NxD, "real"), _rows(fake_MxD, "fake")
    if real.dim != fake.dim:
        raise errors.UserError(f"real features have {real.dim} columns, fake {fake.dim}")
    block_size, dist = _check_block(block_size), _backend(backend)
    if not 1 <= k < min(real.n, fake.n):
        raise errors.UserError(f"k must be in [1, min(N, M) - 1 = {min(real.n, fake.n) - 1}], "
                               f"got {k}")
    r_real = knn_radii(real, k, block_size, backend)
    r_fake = knn_radii(fake, k, block_size, backend)
    in_real = np.zeros(fake.n, bool)       # precision
    hits = np.zeros(fake.n, np.int64)      # density
    in_fake = np.zeros(real.n, bool)       # recall
    covered = np.zeros(real.n, bool)       # coverage
    for j0, f in fake.blocks(block_size):
        jf = slice(j0, j0 + f.shape[0])
        for i0, r in real.blocks(block_size):
            ir = slice(i0, i0 + r.shape[0])
            d = dist(r, f)                                     # real rows x fake columns
            inside = d < r_real[ir, None]
            in_real[jf] |= inside.any(axis=0)
            hits[jf] += inside.sum(axis=0)
            covered[ir] |= inside.any(axis=1)
            in_fake[ir] |= (d < r_fake[None, jf]).any(axis=1)
    return {"precision": float(in_real.mean()), "recall": float(in_fake.mean()),
            "density": float(hits.mean() / k), "coverage": float(covered.mean())}


# --------------------------------------------------------------------------- feature store

_CHUNK = re.compile(r"^chunk_(\d{6})\.npy$")


class FeatureStore:
    """Feature rows spilled to ``directory`` as ``chunk_000000.npy``, ``chunk_000001.npy``, ...

    ``append(feats_NxD)`` writes one chunk (atomically: a temporary file, then a rename) in
    the dtype given; opening an existing directory finds its chunks. Reads go through
    read-only memory maps: ``blocks`` / ``take`` pull only the rows asked for, as float64, so
    ``moments``, ``fid``, ``kernel_distance`` and ``prdc`` run in memory bounded by their
    block size (and, for PRDC, N + M radii) whatever N is. Rows are checked finite and of
    one width on append, so reads need no checks.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise errors.UserError(f"feature store {self.directory} is not a directory")
        os.makedirs(self.directory, exist_ok=True)
        names = sorted(n for n in os.listdir(self.directory) if _CHUNK.match(n))
        if [int(_CHUNK.match(n).group(1)) for n in names] != list(range(len(names))):
            raise errors.UserError(f"feature store {self.directory} has a gap in its chunk "
                                   f"numbers: {names}")
        self._maps: list[np.ndarray] = []
        self.dim: int | None = None
        for n in names:
            m = np.load(os.path.join(self.directory, n), mmap_mode="r")
            if m.ndim != 2 or (self.dim is not None and m.shape[1] != self.dim):
                raise errors.UserError(f"feature store chunk {n} has shape {m.shape}, "
                                       f"expected (rows, {self.dim or 'D'})")
            self.dim = m.shape[1]
            self._maps.append(m)
        self._reindex()

    def _reindex(self) -> None:
        self._starts = np.cumsum([0] + [m.shape[0] for m in self._maps])

    @property
    def n(self) -> int:
        return int(self._starts[-1])

    def __len__(self) -> int:
        return self.n

    def append(self, feats_NxD) -> None:
        x = _check_feats(feats_NxD, "features", keep_dtype=True)
        if self.dim is not None and x.shape[1] != self.dim:
            raise errors.UserError(f"features have {x.shape[1]} columns, the store {self.dim}")
        if x.shape[0] == 0:
            return
        name = os.path.join(self.directory, f"chunk_{len(self._maps):06d}.npy")
        tmp = os.path.join(self.directory, f".tmp_chunk_{len(self._maps):06d}.npy")
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(x))
        os.replace(tmp, name)
        self.dim = x.shape[1]
        self._maps.append(np.load(name, mmap_mode="r"))
        self._reindex()

    def chunks(self) -> Iterator[np.ndarray]:
        """Each chunk as written (a read-only memory map)."""
        yield from self._maps

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float64, across chunk boundaries."""
        parts = []
        c = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            off = start - self._starts[c]
            take = min(stop - start, self._maps[c].shape[0] - off)
            parts.append(np.asarray(self._maps[c][off:off + take], np.float64))
            start += take
            c += 1
        return np.concatenate(parts) if parts else np.empty((0, self.dim or 0))

    def blocks(self, block_size: int) -> Iterator[tuple[int, np.ndarray]]:
        for s in range(0, self.n, block_size):
            yield s, self.rows(s, min(s + block_size, self.n))

    def take(self, sorted_idx: np.ndarray) -> np.ndarray:
        """Rows at ``sorted_idx`` (ascending) as float64; each chunk reads only its own."""
        cut = np.searchsorted(sorted_idx, self._starts)
        parts = [np.asarray(self._maps[c][sorted_idx[cut[c]:cut[c + 1]] - self._starts[c]],
                            np.float64)
                 for c in range(len(self._maps)) if cut[c + 1] > cut[c]]
        return np.concatenate(parts) if parts else np.empty((0, self.dim or 0))


class _ArrayRows:
    """An in-memory ``feats_NxD`` behind the same read interface as FeatureStore."""

    def __init__(self, x_NxD: np.ndarray):
        self.x, self.n, self.dim = x_NxD, x_NxD.shape[0], x_NxD.shape[1]

    def blocks(self, block_size: int) -> Iterator[tuple[int, np.ndarray]]:
        for s in range(0, self.n, block_size):
            yield s, self.x[s:s + block_size]

    def take(self, sorted_idx: np.ndarray) -> np.ndarray:
        return self.x[sorted_idx]


Rows = Union[np.ndarray, FeatureStore]


def _check_feats(x, name: str, keep_dtype: bool = False) -> np.ndarray:
    x = np.asarray(x) if keep_dtype else np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] < 1:
        raise errors.UserError(f"{name} must be a 2-D (rows, D) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise errors.UserError(f"{name} have non-finite or non-numeric values")
    return x


def _rows(x, name: str):
    if isinstance(x, _ArrayRows):
        return x
    if isinstance(x, FeatureStore):
        if x.n == 0:
            raise errors.UserError(f"{name}: feature store {x.directory} is empty")
        return x
    x = _check_feats(x, name)
    if x.shape[0] == 0:
        raise errors.UserError(f"{name} has no rows")
    return _ArrayRows(x)


def _check_block(block_size: int) -> int:
    if int(block_size) != block_size or block_size < 1:
        raise errors.UserError(f"block_size must be a positive integer, got {block_size}")
    return int(block_size)
