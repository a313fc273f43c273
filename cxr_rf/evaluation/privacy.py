"""Privacy: how close generated images sit to the training images, against an unseen baseline.

A generator that memorises reproduces training images; one that generalises makes images no
closer to the training set than unseen real images of the same population are. So every
sample and every held-out real image gets its exact nearest training image, per feature space
("pixels" and any extractor, ``cxr_rf.features``), and the samples' distances are judged
against the held-out ones:

    distance    Euclidean L2 between feature rows, NOT squared, in float64. Tiles are scored on
                the local devices (Gram form, float32 at HIGHEST matmul precision, features
                centred first to limit cancellation) only to pick each query's nearest row in
                a train block; that candidate's distance is then recomputed exactly in float64
                on the host, so reported distances carry no float32 round-off (an exact copy
                reads 0.0) and only near-ties within round-off can pick a different index.
    threshold   tau = the ``quantile`` (default 1st) percentile of the held-out -> train
                nearest distances (``np.quantile``, linear): "closer to a training image than
                99% of unseen real images are". The held-out rate below tau is ~1% by
                construction; tau is only as good as the held-out set is large (M >= 1000
                gives a percentile estimated from >= 10 images below it).
    copy rate   fraction of samples with nearest distance < tau (strict), with a 95% Wilson
                binomial interval.
    flagged     memorisation: copy_rate.lo > margin x quantile (default 2 x 1% = 2%). The
                lower bound, not the rate, so a few chance hits in a small set flag nothing;
                the margin, because tau is itself estimated and the held-out and sample sets
                need not be drawn alike (other sex/view mix) -- twice the base rate is a
                clear excess, not a wobble.
    auroc       P(sample distance > held-out distance) (Mann-Whitney, ``metrics.auroc``):
                0.5 = samples sit as far from training images as unseen real images do;
                < 0.5 = closer (memorisation or mode collapse onto training images); > 0.5 =
                farther (off-distribution samples, which fidelity measures, not privacy).
    prompt      for samples whose meta has ``"prompt_row"`` (the ``train`` index whose
                metadata prompted it; several seeds per row): each sample's distance to that
                one training image (CheXGenBench's measure), per seed and in float -- their
                code reused the last generation for every seed and subtracted uint8 arrays,
                which wrap around.

Features are streamed batch by batch into ``fidelity.FeatureStore``s under
``workdir/features/<space>/<set name>-<fingerprint>/`` (fingerprint: the set's class, name, size,
resolution, metadata and first/last image, and the extractor's identity), so memory is one
image batch plus one distance tile whatever N is; a complete store (``done.json`` beside its
chunks) is reused when ``reuse=True`` -- the train split's features are shared with other
sections through ``cached_features``.

    nearest(queries, train, ...)                       exact NN (distance, index), blocked
    prompt_distances(samples, train, rows, ...)        distance to given train rows
    copy_stats(samples_nn, heldout_nn, ...)            tau, copy rate, flag, AUROC, quantiles
    perturbed_copies(train, n, ...)                    positive control: near-copies
    privacy(samples, train, heldout, spaces, ...)      the section: dict + PNGs

Legend: N samples, M held-out images, T training images, Q query rows (N or M), D feature
dim, B batch / query block, C train block, R image resolution.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np

from cxr_rf import errors, fidelity, metrics
from cxr_rf import features as feat
from cxr_rf.evaluation.embed import cached_features
from cxr_rf.evaluation.sets import ArraySet, ImageSet

QUANTILE = 0.01      # tau: the held-out 1st percentile
MARGIN = 2.0         # flagged when the copy rate's lower bound > MARGIN x QUANTILE
LEVEL = 0.95         # Wilson interval
REPORT_QUANTILES = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
DEFAULT_BLOCK = 1024
_Z95 = 1.959963984540054


# --------------------------------------------------------------------------- nearest neighbours

_argmin_fn = None


def _device_argmin(a_BxD: np.ndarray, b_CxD: np.ndarray, valid_C: np.ndarray, devices):
    """Index of the nearest valid row of ``b`` for every row of ``a``: rows of ``a`` split
    over ``devices``, ``b`` replicated. Squared distances in the Gram form (argmin only, so
    no sqrt), float32 at HIGHEST matmul precision (TPU's default would be bf16 passes)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    global _argmin_fn
    if _argmin_fn is None:
        def f(a, b, valid):
            hi = jax.lax.Precision.HIGHEST
            d2 = ((b * b).sum(1)[None, :] - 2 * jnp.matmul(a, b.T, precision=hi)
                  + (a * a).sum(1)[:, None])
            return jnp.argmin(jnp.where(valid[None, :], d2, jnp.inf), axis=1)
        _argmin_fn = jax.jit(f)
    mesh = Mesh(np.array(devices), ("rows",))
    a_j = jax.device_put(a_BxD, NamedSharding(mesh, P("rows", None)))
    b_j = jax.device_put(b_CxD, NamedSharding(mesh, P()))
    v_j = jax.device_put(valid_C, NamedSharding(mesh, P()))
    return np.asarray(_argmin_fn(a_j, b_j, v_j))


def _pad_rows(x_NxD: np.ndarray, n: int) -> np.ndarray:
    return np.pad(x_NxD, ((0, n - x_NxD.shape[0]), (0, 0)))


def nearest(queries, train, *, block_size: int = DEFAULT_BLOCK, backend: str = "jax",
            devices=None) -> tuple[np.ndarray, np.ndarray]:
    """(dist_Q float64, idx_Q int64): every query row's exact nearest ``train`` row by
    Euclidean distance (not squared). Both arguments are ``feats_xD`` arrays or FeatureStores.

    Query blocks x train blocks of ``block_size`` rows: per query row a running (min, argmin)
    over train blocks, so memory is one tile whatever Q and T are. Within a tile the candidate
    is picked on the devices (``backend="jax"``: every local device, or ``devices``; blocks
    padded to fixed shapes so the program compiles once) or with numpy (``"numpy"``); its
    distance is then recomputed in float64 from the rows themselves (module docstring).
    Ties go to the lower train index."""
    q, t = fidelity._rows(queries, "queries"), fidelity._rows(train, "train")
    if q.dim != t.dim:
        raise errors.UserError(f"query features have {q.dim} columns, train features {t.dim}")
    block = fidelity._check_block(block_size)
    if backend not in ("jax", "numpy"):
        raise errors.UserError(f"backend must be 'jax' or 'numpy', got {backend!r}")
    if backend == "jax":
        import jax
        devices = list(jax.local_devices() if devices is None else devices)
        qpad = -(-min(block, q.n) // len(devices)) * len(devices)   # rows split evenly
        cpad = min(block, t.n)
    # Centre on one fixed offset (the first train block's mean): the Gram form's cancellation
    # error scales with the squared norms, and centred features have much smaller ones.
    offset_D = next(t.blocks(block))[1].mean(axis=0)
    dist_Q, idx_Q = np.full(q.n, np.inf), np.zeros(q.n, np.int64)
    for i0, a in q.blocks(block):
        a_c = a - offset_D
        a_dev = _pad_rows(a_c, qpad).astype(np.float32) if backend == "jax" else None
        for j0, b in t.blocks(block):
            b_c = b - offset_D
            if backend == "jax":
                valid_C = np.arange(cpad) < b.shape[0]
                j_B = _device_argmin(a_dev, _pad_rows(b_c, cpad).astype(np.float32), valid_C,
                                     devices)[:a.shape[0]]
            else:
                j_B = np.argmin(fidelity._distances(a_c, b_c), axis=1)
            d_B = np.sqrt(((a - b[j_B]) ** 2).sum(axis=1))       # exact, float64
            rows = slice(i0, i0 + a.shape[0])
            better = d_B < dist_Q[rows]                            # strict: earlier block wins ties
            dist_Q[rows] = np.where(better, d_B, dist_Q[rows])
            idx_Q[rows] = np.where(better, j0 + j_B, idx_Q[rows])
    return dist_Q, idx_Q


def prompt_distances(samples, train, rows_N, *, block_size: int = DEFAULT_BLOCK) -> np.ndarray:
    """dist_N float64: each sample row's Euclidean distance to train row ``rows_N[i]`` (its
    prompt's training image); NaN where ``rows_N[i] < 0`` (no prompt). Samples are read
    block by block and only the train rows they name."""
    s, t = fidelity._rows(samples, "samples"), fidelity._rows(train, "train")
    rows_N = np.asarray(rows_N, np.int64)
    if rows_N.shape != (s.n,):
        raise errors.UserError(f"{rows_N.shape[0]} prompt rows for {s.n} samples")
    if (rows_N >= t.n).any():
        raise errors.UserError(f"prompt_row {int(rows_N.max())} is out of range for a train set "
                               f"of {t.n} images")
    out = np.full(s.n, np.nan)
    for i0, a in s.blocks(fidelity._check_block(block_size)):
        r = rows_N[i0:i0 + a.shape[0]]
        has = r >= 0
        if has.any():
            uniq, inv = np.unique(r[has], return_inverse=True)
            b = t.take(uniq)
            out[i0:i0 + a.shape[0]][has] = np.sqrt(((a[has] - b[inv]) ** 2).sum(axis=1))
    return out


# --------------------------------------------------------------------------- statistics

def wilson(count: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval (lo, hi) of a binomial proportion count / n; (nan, nan) for n=0."""
    if n == 0:
        return float("nan"), float("nan")
    if level != LEVEL:
        from scipy.stats import norm
        z = float(norm.ppf(0.5 + level / 2))
    else:
        z = _Z95
    p = count / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _rate(below_N: np.ndarray) -> dict:
    count, n = int(below_N.sum()), int(below_N.size)
    lo, hi = wilson(count, n)
    return {"rate": count / n if n else float("nan"), "lo": lo, "hi": hi, "count": count, "n": n}


def _summary(x: np.ndarray) -> dict:
    x = x[~np.isnan(x)]
    if not x.size:
        return {"n": 0, "mean": float("nan"), "median": float("nan"), "min": float("nan"),
                "quantiles": {}}
    return {"n": int(x.size), "mean": float(x.mean()), "median": float(np.median(x)),
            "min": float(x.min()),
            "quantiles": {f"{q:g}": float(v) for q, v in
                          zip(REPORT_QUANTILES, np.quantile(x, REPORT_QUANTILES))}}


def copy_stats(samples_nn_N, heldout_nn_M, *, quantile: float = QUANTILE,
               margin: float = MARGIN) -> dict:
    """The threshold, copy rates, flag and AUROC of nearest-train distances (module docstring):

        threshold           tau = np.quantile(heldout_nn, quantile)
        copy_rate           {rate, lo, hi, count, n}: samples with distance < tau (Wilson 95%)
        heldout_copy_rate   the same for the held-out images (~quantile by construction)
        flagged             copy_rate.lo > margin * quantile
        auroc               P(sample distance > held-out distance); < 0.5: samples closer
        samples_nearest, heldout_nearest   {n, mean, median, min, quantiles: {"0.01": ...}}
    """
    s, h = np.asarray(samples_nn_N, np.float64), np.asarray(heldout_nn_M, np.float64)
    if not 0 < quantile < 1:
        raise errors.UserError(f"quantile must be in (0, 1), got {quantile}")
    if s.size == 0 or h.size == 0:
        raise errors.UserError("copy statistics need at least one sample and one held-out distance")
    tau = float(np.quantile(h, quantile))
    rate = _rate(s < tau)
    bound = margin * quantile
    return {"threshold": tau, "threshold_quantile": quantile,
            "copy_rate": rate, "heldout_copy_rate": _rate(h < tau),
            "flag_bound": bound, "flagged": bool(rate["lo"] > bound),
            "auroc": metrics.auroc(s, h),
            "samples_nearest": _summary(s), "heldout_nearest": _summary(h)}


# --------------------------------------------------------------------------- positive control

def perturbed_copies(train: ImageSet, n: int, *, noise: float = 0.01, shift: int = 1,
                     scale: float = 0.02, seed: int = 0) -> ArraySet:
    """``n`` lightly perturbed copies of training images: a memorisation control that the
    privacy section must flag. Each copy takes a random training image (distinct ones while
    ``n <= len(train)``), shifts it by ``shift`` pixels along a random axis and direction
    (edge replicated), scales its intensity by a factor in [1 - scale, 1 + scale], adds
    N(0, noise²) noise and clips to [0, 1]. Metas are the original's with ``prompt_row`` set."""
    if n < 1 or len(train) == 0:
        raise errors.UserError(f"perturbed_copies needs n >= 1 and a non-empty train set, "
                               f"got n={n}, {len(train)} training images")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(train), n, replace=n > len(train)))
    out_NxRxR = train.images(rows).astype(np.float64)
    for k in range(n):
        axis, sign = int(rng.integers(2)), int(rng.choice([-1, 1]))
        x = np.roll(out_NxRxR[k], sign * shift, axis=axis)
        if shift:       # replicate the edge instead of wrapping the far side in
            edge = [slice(None)] * 2
            edge[axis] = slice(0, shift) if sign > 0 else slice(-shift, None)
            src = [slice(None)] * 2
            src[axis] = slice(shift, shift + 1) if sign > 0 else slice(-shift - 1, -shift)
            x[tuple(edge)] = x[tuple(src)]
        x = x * rng.uniform(1 - scale, 1 + scale) + rng.normal(0, noise, x.shape)
        out_NxRxR[k] = np.clip(x, 0.0, 1.0)
    metas = [dict(train.metas[int(r)], prompt_row=int(r)) for r in rows]
    return ArraySet(out_NxRxR.astype(np.float32), metas, name=f"perturbed_copies_{n}")


# --------------------------------------------------------------------------- PNGs

def _pairs_png(path: str, samples: ImageSet, train: ImageSet, dist_N, idx_N, k: int,
               space: str) -> list[dict]:
    from cxr_rf import outputs
    order = np.argsort(dist_N, kind="stable")[:k]
    pairs = [{"sample": int(i), "train": int(idx_N[i]), "distance": float(dist_N[i])}
             for i in order]
    if path and pairs:
        ims, labels = [], []
        for p in pairs:
            s = samples.images([p["sample"]])[0]
            t = train.images([p["train"]])[0]
            ims += [s * 2 - 1, t * 2 - 1]                      # outputs.grid wants [-1, 1]
            labels += [f"sample {p['sample']} | {space}: d={p['distance']:.4g}",
                       f"train {p['train']} | nearest"]
        outputs.grid(ims, labels, cols=4 if len(pairs) > 1 else 2).save(path)
    return pairs


def _histogram_png(path: str, samples_nn, heldout_nn, tau: float, quantile: float, space: str,
                   prompt_nn=None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    both = np.concatenate([samples_nn, heldout_nn])
    bins = np.linspace(0.0, float(both.max()) * 1.02 or 1.0, 50)
    ax.hist(heldout_nn, bins, alpha=0.55, density=True,
            label=f"held-out real (M={len(heldout_nn)})")
    ax.hist(samples_nn, bins, alpha=0.55, density=True, label=f"samples (N={len(samples_nn)})")
    if prompt_nn is not None and np.isfinite(prompt_nn).any():
        ax.hist(prompt_nn[np.isfinite(prompt_nn)], bins, histtype="step", density=True,
                color="k", label="sample to its prompt's image")
    ax.axvline(tau, color="r", ls="--", label=f"tau = held-out p{100 * quantile:g} = {tau:.4g}")
    ax.set_xlabel(f"distance to nearest training image ({space}, L2)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- the section

def _spaces(spaces) -> dict:
    """{name: extractor} from a mapping (values extractors or names) or a list of names."""
    if isinstance(spaces, str) or not isinstance(spaces, (Mapping, Sequence)):
        raise errors.UserError(f"spaces must be a mapping of name -> extractor or a list of "
                               f"names, got {type(spaces).__name__}")
    items = spaces.items() if isinstance(spaces, Mapping) else ((s, s) for s in spaces)
    out = {}
    for name, ex in items:
        if isinstance(ex, str):
            ex = feat.get(ex)                   # unknown names: one-line UserError there
        if not callable(ex):
            raise errors.UserError(f"space {name!r} is not a feature extractor "
                                   f"(got {type(ex).__name__})")
        out[str(name)] = ex
    if not out:
        raise errors.UserError("no feature spaces given; use at least {'pixels': Pixels()}")
    return out


def _prompt_rows(samples: ImageSet, n_train: int) -> np.ndarray:
    rows = np.full(len(samples), -1, np.int64)
    for i, m in enumerate(samples.metas):
        r = m.get("prompt_row")
        if r is None:
            continue
        if int(r) != r or not 0 <= int(r) < n_train:
            raise errors.UserError(f"sample {i}: prompt_row {r!r} is not an index into the "
                                   f"{n_train} training images")
        rows[i] = int(r)
    return rows


def _shared_patients(train: ImageSet, heldout: ImageSet) -> int:
    ids = {m.get("patient_id") for m in train.metas} - {"", None}
    return sum(1 for m in heldout.metas if m.get("patient_id") not in ("", None)
               and m.get("patient_id") in ids)


def privacy(samples: ImageSet, train: ImageSet, heldout: ImageSet, spaces, *,
            workdir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
            batch_size: int = 64, block_size: int = DEFAULT_BLOCK, pairs: int = 8,
            quantile: float = QUANTILE, margin: float = MARGIN, reuse: bool = True,
            backend: str = "jax", devices=None) -> dict:
    """The privacy section: nearest training images of ``samples`` and of ``heldout`` in each
    of ``spaces`` ({name: extractor or extractor name}, or a list of names; "pixels" is
    ``features.Pixels()``), and the copy statistics (module docstring).

    Features go to ``workdir/features/<space>/<set name>-<fingerprint>`` (reused when
    ``reuse``). With ``out_dir``, per space: ``privacy_<space>_pairs.png`` (the ``pairs``
    closest samples, each beside its nearest training image, labelled with the distance) and
    ``privacy_<space>_hist.png`` (both distance distributions, tau marked).

    Returns (JSON-friendly)::

        {"sets": {"samples"|"train"|"heldout": {"name", "n", "resolution"}},
         "heldout_patients_in_train": int,   # held-out images whose patient is in train (want 0)
         "distance": "euclidean (L2, not squared), float64",
         "spaces": {<space>: {
             "dim": D,
             "threshold": tau, "threshold_quantile": 0.01,
             "copy_rate": {"rate", "lo", "hi", "count", "n"},          # samples < tau, Wilson 95%
             "heldout_copy_rate": {...},                                # ~0.01 by construction
             "flag_bound": margin * quantile, "flagged": bool,          # copy_rate.lo > flag_bound
             "auroc": float,                                            # < 0.5: samples closer
             "samples_nearest": {"n", "mean", "median", "min", "quantiles": {"0.01": ..}},
             "heldout_nearest": {...},
             "nearest_train_rows": {"distinct": int, "top": [[row, count], ...]},
             "prompt": None | {"n", "mean", "median", "min", "quantiles",   # per seed
                                "copy_rate": {...},     # prompt distance < tau
                                "nearest_is_prompt": fraction whose nearest train image is the
                                                     prompt's own},
             "closest": [{"sample", "train", "distance"}, ...],        # the `pairs` closest
             "pngs": {"pairs": path, "histogram": path} (with out_dir)}}}
    """
    sets = {"samples": samples, "train": train, "heldout": heldout}
    for role, s in sets.items():
        if not isinstance(s, ImageSet):
            raise errors.UserError(f"{role} must be an ImageSet, got {type(s).__name__}")
        if len(s) == 0:
            raise errors.UserError(f"the {role} set {getattr(s, 'name', '')!r} has no images")
    spaces = _spaces(spaces)
    for name, ex in spaces.items():
        # A copy is a copy at the resolution the generator was trained on; comparing across
        # resolutions would put the resampling difference into every distance and the held-out
        # baseline (at train's resolution) would no longer calibrate the samples' distances.
        if isinstance(ex, feat.Pixels) and len({s.resolution for s in sets.values()}) > 1:
            raise errors.UserError(
                f"space {name!r} compares pixels, but the resolutions differ (samples "
                f"{samples.resolution}, train {train.resolution}, held-out {heldout.resolution}); "
                f"generate or resize to one resolution")
    if pairs < 0:
        raise errors.UserError(f"pairs must be >= 0, got {pairs}")
    prompt_rows_N = _prompt_rows(samples, len(train))
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)

    result = {"sets": {r: {"name": getattr(s, "name", ""), "n": len(s),
                           "resolution": int(s.resolution)} for r, s in sets.items()},
              "heldout_patients_in_train": _shared_patients(train, heldout),
              "distance": "euclidean (L2, not squared), float64", "spaces": {}}
    for name, ex in spaces.items():
        stores = {role: cached_features(s, ex, workdir, space=name, batch_size=batch_size,
                                        reuse=reuse) for role, s in sets.items()}
        kw = dict(block_size=block_size, backend=backend, devices=devices)
        s_dist, s_idx = nearest(stores["samples"], stores["train"], **kw)
        h_dist, _ = nearest(stores["heldout"], stores["train"], **kw)
        r = {"dim": int(stores["train"].dim)}
        r.update(copy_stats(s_dist, h_dist, quantile=quantile, margin=margin))
        rows, counts = np.unique(s_idx, return_counts=True)
        top = np.argsort(-counts, kind="stable")[:10]
        r["nearest_train_rows"] = {"distinct": int(rows.size),
                                   "top": [[int(rows[i]), int(counts[i])] for i in top]}
        p_dist = None
        if (prompt_rows_N >= 0).any():
            p_dist = prompt_distances(stores["samples"], stores["train"], prompt_rows_N,
                                      block_size=block_size)
            has = prompt_rows_N >= 0
            r["prompt"] = dict(_summary(p_dist[has]), copy_rate=_rate(p_dist[has] < r["threshold"]),
                               nearest_is_prompt=float((s_idx[has] == prompt_rows_N[has]).mean()))
        else:
            r["prompt"] = None
        pair_png = os.path.join(out_dir, f"privacy_{name}_pairs.png") if out_dir else ""
        r["closest"] = _pairs_png(pair_png, samples, train, s_dist, s_idx, pairs, name)
        if out_dir is not None:
            hist_png = os.path.join(out_dir, f"privacy_{name}_hist.png")
            _histogram_png(hist_png, s_dist, h_dist, r["threshold"], quantile, name, p_dist)
            r["pngs"] = {"pairs": pair_png if r["closest"] else None, "histogram": hist_png}
        result["spaces"][name] = r
    return result
