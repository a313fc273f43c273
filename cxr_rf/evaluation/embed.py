"""Features of image sets, on disk and cached: every evaluation section embeds through here.

A set's features are streamed one batch at a time into a ``cxr_rf.fidelity.FeatureStore``
(one chunk per batch), so memory is one image batch whatever N is. A store is keyed by a
``fingerprint`` of the set (class, name, size, resolution, every metadata row, the first and
last image) and of the extractor (class, name, dim, protocol, plain-valued public attributes),
and is finished only when its ``done.json`` is written, last. ``cached_features`` puts each
(set, extractor) pair at one place under a workdir, so sections share them: the train split is
embedded once per extractor for privacy and fidelity alike.

    feature_store(images, extractor, directory, ...)   one set's features on disk (cached)
    cached_features(images, extractor, workdir, ...)   the same at the shared workdir place
    fingerprint(images, extractor)                     the cache key

An extractor's mutable public attributes (a call counter, say) would change its fingerprint:
keep such state private (``_name``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Mapping

import numpy as np

from cxr_rf import errors, fidelity
from cxr_rf.evaluation.sets import ImageSet


def _extractor_id(extractor) -> dict:
    """What makes two extractors give the same features: class, name, dim, protocol and the
    plain-valued attributes (Pixels' size, a weights path)."""
    ident = {"class": f"{type(extractor).__module__}.{type(extractor).__qualname__}",
             "name": getattr(extractor, "name", None), "dim": getattr(extractor, "dim", None),
             "protocol": getattr(extractor, "protocol", None)}
    for k, v in sorted(getattr(extractor, "__dict__", {}).items()):
        if isinstance(v, (int, float, str, bool)) and not k.startswith("_"):
            ident[k] = v
    return ident


def _meta_json(m: Mapping) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in sorted(m.items())}


def fingerprint(images: ImageSet, extractor) -> str:
    """A short hash of the set (class, name, size, resolution, every metadata row, the first
    and last image) and the extractor: a cached store is reused only for the same pair."""
    h = hashlib.sha256()
    h.update(json.dumps({"set": type(images).__qualname__, "name": getattr(images, "name", ""),
                         "n": len(images), "resolution": images.resolution,
                         "extractor": _extractor_id(extractor)}, sort_keys=True,
                        default=str).encode())
    for m in images.metas:
        h.update(json.dumps(_meta_json(m), sort_keys=True, default=str).encode())
    if len(images):
        h.update(np.ascontiguousarray(images.images([0, len(images) - 1]), np.float32).tobytes())
    return h.hexdigest()[:16]


def feature_store(images: ImageSet, extractor, directory: str | os.PathLike, *,
                  batch_size: int = 64, reuse: bool = True,
                  key: str | None = None) -> fidelity.FeatureStore:
    """The features of every image of ``images``, streamed one batch at a time into a
    FeatureStore at ``directory`` (one chunk per batch). With ``reuse`` a store finished
    earlier (its ``done.json`` matches this set and extractor) is opened as it is; anything
    else there -- an interrupted or different store -- is replaced. ``key``: the set's
    ``fingerprint`` where the caller has it already."""
    directory = os.fspath(directory)
    done = os.path.join(directory, "done.json")
    want = {"fingerprint": key or fingerprint(images, extractor), "n": len(images),
            "extractor": _extractor_id(extractor)}
    if reuse and os.path.isfile(done):
        with open(done) as f:
            if json.load(f) == json.loads(json.dumps(want, default=str)):
                store = fidelity.FeatureStore(directory)
                if store.n == len(images):
                    return store
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    store = fidelity.FeatureStore(directory)
    for _, batch_BxRxR in images.batches(int(batch_size)):
        feats_BxD = np.asarray(extractor(batch_BxRxR), np.float32)
        if feats_BxD.ndim != 2 or feats_BxD.shape[0] != batch_BxRxR.shape[0]:
            raise errors.UserError(f"extractor {getattr(extractor, 'name', extractor)!r} returned "
                                   f"shape {feats_BxD.shape} for {batch_BxRxR.shape[0]} images; "
                                   f"expected [B, D]")
        store.append(feats_BxD)
    with open(done + ".tmp", "w") as f:
        json.dump(want, f, sort_keys=True, default=str)
    os.replace(done + ".tmp", done)        # written last: a store without it is incomplete
    return store


def cached_features(images: ImageSet, extractor, workdir: str | os.PathLike, *,
                    space: str | None = None, batch_size: int = 64,
                    reuse: bool = True) -> fidelity.FeatureStore:
    """``feature_store`` at the shared place for a (set, extractor) pair:
    ``workdir/features/<space>/<set name>-<fingerprint>`` (space defaults to the extractor's
    name). Every section that calls this with the same workdir shares the stores, so e.g. the
    train split is embedded once per extractor."""
    key = fingerprint(images, extractor)
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", str(getattr(images, "name", "set")))[:60]
    space = space or str(getattr(extractor, "name", "features"))
    directory = os.path.join(os.fspath(workdir), "features", space, f"{label}-{key}")
    return feature_store(images, extractor, directory, batch_size=batch_size, reuse=reuse,
                         key=key)
