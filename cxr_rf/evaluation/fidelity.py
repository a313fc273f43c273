"""Fidelity of a generated set against a real one, in one feature space.

    real ImageSet ─► extractor ─► FeatureStore ─┐
                                               ├─► FD (bootstrap CI), KD, PRDC    overall
    fake ImageSet ─► extractor ─► FeatureStore ─┘   FD, KD                        per finding
                                                    FD (bootstrap CI)             per subgroup

* **Overall**: FD with a 95% interval (± 1.96 Poisson-bootstrap standard errors), KD (unbiased MMD², cubic polynomial
  kernel, mean ± sd over subsets) and precision / recall / density / coverage (k = 5).
* **Per finding** (CheXGenBench's conditional fidelity): the real rows with the finding
  positive against the generated rows conditioned positive on it.
* **Per subgroup**: sex, age band (``conditioning.AGE_BINS``), race, view and source; for each
  value, the real rows in the group against the generated rows conditioned on it, with counts.
  A group is scored when both sides have at least ``min_count`` rows (FD is biased upward at
  small N: compare groups of similar size, and read the counts).

Features are extracted once per (set, extractor) under ``workdir`` (``embed.cached_features``,
shared with the other sections) and every metric reads them block by block
(``cxr_rf.fidelity``), so memory is bounded whatever N. Protocols: ``default`` (images at native resolution and
16-bit precision into the extractor) and ``chexgenbench`` (``cxr_rf.features``: 299 px uint8
first; KD subsets of min(N_real, N_fake) rows, as its torchmetrics KID; PRDC k = 5).
"""
from __future__ import annotations

import os
import time
from typing import Mapping, Sequence

import numpy as np

from cxr_rf import conditioning as cond
from cxr_rf import errors
from cxr_rf import fidelity as fd
from cxr_rf.evaluation.embed import cached_features
from cxr_rf.evaluation.sets import SUBGROUPS, ImageSet, group_value

MIN_COUNT = 20          # rows per side before a finding or subgroup is scored
BOOTSTRAP = 50          # bootstrap replicates of each FD interval
KID_SUBSETS = 100
PRDC_K = 5


# ----------------------------------------------------------------------------- groups

def subgroups(metas: Sequence[Mapping]) -> dict[str, dict[str, np.ndarray]]:
    """{attr: {value: ascending row indices}} over SUBGROUPS."""
    out: dict[str, dict[str, list[int]]] = {a: {} for a in SUBGROUPS}
    for i, m in enumerate(metas):
        for a in SUBGROUPS:
            v = group_value(m, a)
            if v is not None:
                out[a].setdefault(v, []).append(i)
    return {a: {v: np.asarray(ix, np.int64) for v, ix in sorted(g.items())} for a, g in out.items()}


def positives(metas: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """{finding: ascending indices of rows where it is positive}."""
    f_NxF = (np.stack([m["findings"] for m in metas]) if metas
             else np.zeros((0, len(cond.FINDINGS)), np.int8))
    return {f: np.flatnonzero(f_NxF[:, j] == cond.POSITIVE) for j, f in enumerate(cond.FINDINGS)}


# ----------------------------------------------------------------------------- metrics

def _fd_entry(real, fake, ri, fi, *, n_boot: int, seed: int, block: int) -> dict:
    point = fd.frechet_distance(*_mc(fd.moments(real, block, ri)), *_mc(fd.moments(fake, block, fi)))
    entry = {"n_real": int(real.n if ri is None else ri.size),
             "n_fake": int(fake.n if fi is None else fi.size), "fd": point}
    if n_boot:
        # The interval is point ± 1.96 bootstrap standard errors, not the bootstrap's
        # percentiles: a resample repeats rows (~63% distinct), which biases FD upward by
        # about as much as its spread at small N, so percentile intervals can miss the point
        # value altogether; the standard error is what the resampling measures well.
        reps = fd.bootstrap_fd(real, fake, n_boot, seed, ri, fi, block)
        se = float(np.std(reps, ddof=1)) if n_boot > 1 else float("nan")
        entry["fd_se"] = se
        entry["fd_ci95"] = [max(point - 1.96 * se, 0.0), point + 1.96 * se]
    return entry


def _mc(m: fd.RunningMoments):
    return m.mean, m.cov


def _kd(real, fake, ri, fi, *, protocol: str, seed: int) -> dict:
    nr = real.n if ri is None else ri.size
    nf = fake.n if fi is None else fi.size
    # CheXGenBench (torchmetrics KID): one subset size, min(N_real, N_fake); ours caps it at
    # 1000 rows (torch-fidelity), which costs O(1000²) per subset whatever N.
    size = min(nr, nf) if protocol == "chexgenbench" else min(nr, nf, 1000)
    x = real if ri is None else real.take(ri)
    y = fake if fi is None else fake.take(fi)
    k = fd.kernel_distance(x, y, subset_size=size, subsets=KID_SUBSETS, seed=seed)
    return {"mean": k.mean, "sd": k.std, "subset_size": int(size), "subsets": KID_SUBSETS}


def fidelity(real: ImageSet, fake: ImageSet, extractor, *, workdir: str | os.PathLike,
             batch_size: int = 64,
             n_boot: int = BOOTSTRAP, min_count: int = MIN_COUNT, k: int = PRDC_K,
             seed: int = 0, block_size: int = fd.DEFAULT_BLOCK, backend: str = "numpy",
             ) -> dict:
    """Fidelity of ``fake`` against ``real`` in ``extractor``'s space (module docstring).

    Features are cached under ``workdir`` (``embed.cached_features``). Returns::

        {"space", "protocol", "dim", "n_real", "n_fake",
         "overall":   {"n_real", "n_fake", "fd", "fd_se", "fd_ci95", "kd": {"mean", "sd", "subset_size",
                       "subsets"}, "prdc": {"precision", "recall", "density", "coverage", "k"}},
         "findings":  {finding: {"n_real", "n_fake", "fd", "fd_se", "fd_ci95", "kd"} | {"n_real",
                       "n_fake", "skipped": reason}},
         "subgroups": {attr: {value: {"n_real", "n_fake", "fd", "fd_se", "fd_ci95"} | {..., "skipped"}}},
         "settings":  {"bootstrap", "min_count", "seed", "block_size"}, "timing_s": {...}}
    """
    if len(real) < 2 or len(fake) < 2:
        raise errors.UserError(f"fidelity needs at least 2 images per side; got {len(real)} real "
                               f"({real.name}), {len(fake)} generated ({fake.name})")
    if real.resolution != fake.resolution:
        raise errors.UserError(f"real images are {real.resolution}² and generated ones "
                               f"{fake.resolution}²: compare at one resolution (convert the "
                               f"reference at the model's resolution)")
    protocol = getattr(extractor, "protocol", "default")
    t0 = time.perf_counter()
    a = cached_features(real, extractor, workdir, batch_size=batch_size)
    b = cached_features(fake, extractor, workdir, batch_size=batch_size)
    t1 = time.perf_counter()
    args = dict(n_boot=n_boot, seed=seed, block=block_size)
    overall = _fd_entry(a, b, None, None, **args)
    overall["kd"] = _kd(a, b, None, None, protocol=protocol, seed=seed)
    kk = min(k, min(a.n, b.n) - 1)
    overall["prdc"] = {**fd.prdc(a, b, k=kk, block_size=block_size, backend=backend), "k": kk}

    def scored(ri, fi, kd: bool):
        if min(ri.size, fi.size) < min_count:
            return {"n_real": int(ri.size), "n_fake": int(fi.size),
                    "skipped": f"fewer than {min_count} rows on a side"}
        e = _fd_entry(a, b, ri, fi, **args)
        if kd:
            e["kd"] = _kd(a, b, ri, fi, protocol=protocol, seed=seed)
        return e

    pr, pf = positives(real.metas), positives(fake.metas)
    findings = {f: scored(pr[f], pf[f], True) for f in cond.FINDINGS}
    gr, gf = subgroups(real.metas), subgroups(fake.metas)
    groups = {attr: {v: scored(gr[attr].get(v, np.zeros(0, np.int64)),
                               gf[attr].get(v, np.zeros(0, np.int64)), False)
                     for v in sorted(set(gr[attr]) | set(gf[attr]))}
              for attr in SUBGROUPS}
    t2 = time.perf_counter()
    return {"space": extractor.name, "protocol": protocol, "dim": int(a.dim),
            "n_real": int(a.n), "n_fake": int(b.n), "real": real.name, "fake": fake.name,
            "overall": overall, "findings": findings, "subgroups": groups,
            "settings": {"bootstrap": n_boot, "min_count": min_count, "seed": seed,
                         "block_size": block_size, "prdc_k": kk},
            "timing_s": {"features": t1 - t0, "metrics": t2 - t1}}
