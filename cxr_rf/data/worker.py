"""The per-image work of a conversion: pixels -> validated Record -> serialized example.

Runs in the converter's worker processes (or inline with one worker), so everything here
is a pure function of (WorkerConfig, Item): results do not depend on the number of workers.
Anything wrong with one input becomes a reject reason instead of an exception.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np

from cxr_rf.data import imaging, schema, sources
from cxr_rf.data.schema import Record
from cxr_rf.data.sources import Item
from cxr_rf.data.stats import META_FIELDS


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """What every worker needs besides the Item."""
    source: str
    salt: str
    resolution: int
    fit: str = "pad"


@dataclasses.dataclass(frozen=True)
class Done:
    """A converted image: its serialized TFDS example, the fields the statistics count and the
    flags of what was let through on purpose (``imaging.BURNED_IN``)."""
    example: bytes
    meta: dict[str, Any]
    flags: tuple[str, ...] = ()


_FEATURES = None  # the TFDS feature spec, built once per process


def process(cfg: WorkerConfig, item: Item) -> Done | sources.Reject:
    """Convert one Item; a file or metadata problem becomes a Reject with its reason."""
    global _FEATURES
    try:
        flags: list[str] = []
        record = to_record(cfg, item, flags)
        if _FEATURES is None:
            _FEATURES = schema.features()
        return Done(example=schema.to_bytes(record, _FEATURES),
                    meta={k: getattr(record, k) for k in META_FIELDS}, flags=tuple(flags))
    except imaging.ImageError as e:
        return sources.Reject(item.path, _scrub(str(e), item))
    except ValueError as e:  # Record validation: out-of-range labels, ages, unknown categories
        return sources.Reject(item.path, _scrub(f"invalid metadata: {' '.join(str(e).split())}", item))
    except Exception as e:  # noqa: BLE001 - recorded per file and counted against the threshold
        return sources.Reject(item.path, _scrub(
            f"internal error {type(e).__name__}: {' '.join(str(e).split())[:200]}", item))


def _scrub(reason: str, item: Item) -> str:
    """The reason without the item's path, file name or raw ids (library messages, e.g. an
    OSError's, may quote them; reasons are counted in stats.json, paths stay in the rejects log)."""
    path = item.path
    # Whole words of 3+ characters only: shorter ones (NIH's patient "3", a file "v.dcm")
    # would blank ordinary numbers and words.
    for texts, mark in (((path, os.path.abspath(path), os.path.basename(path),
                          os.path.splitext(os.path.basename(path))[0]), "<file>"),
                        ((item.patient_id, item.study_id), "<id>")):
        for text in sorted({t for t in texts if t and len(t) >= 3}, key=len, reverse=True):
            reason = re.sub(rf"(?<![A-Za-z0-9]){re.escape(text)}(?![A-Za-z0-9])", mark, reason)
    return reason


def to_record(cfg: WorkerConfig, item: Item, flags: list[str] | None = None) -> Record:
    """Pixels (source ``load`` or ``imaging.load`` with the Item's pixel options) + harmonised
    fields + salted-hash ids; flags of the image (``imaging.decode``) are appended to ``flags``."""
    module = sources.get(cfg.source)
    custom = getattr(module, "load", None)
    if custom is not None:
        image = custom(item, cfg.resolution, cfg.fit)
    else:
        raw, found = imaging.decode(item.path, stretch=item.stretch, invert=item.invert,
                                    allow_burned_in=bool(getattr(module, "DEIDENTIFIED_RELEASE", False)))
        image = imaging.fit_square(raw, cfg.resolution, cfg.fit)
        if flags is not None:
            flags.extend(found)
    image = np.asarray(image)
    if image.shape != (cfg.resolution, cfg.resolution):
        raise imaging.ImageError(f"loader returned shape {image.shape}, expected "
                                 f"{cfg.resolution}x{cfg.resolution}")
    sex, age, view = item.sex, item.age, item.view
    if item.dicom_meta and (sex == "unknown" or age < 0 or view == "unknown"):
        header = _demographics(item.path)
        sex = header["sex"] if sex == "unknown" else sex
        age = header["age"] if age < 0 else age
        view = header["view"] if view == "unknown" else view
    if not item.patient_id:
        raise ValueError("no patient id")
    return Record(
        image=image, findings=item.findings, sex=sex, age=age, race=item.race, view=view,
        source=item.source, site=item.site,
        patient_id=schema.hash_id(item.patient_id, cfg.salt),
        study_id=schema.hash_id(item.study_id, cfg.salt) if item.study_id else "",
        report=item.report)


def _demographics(path: str) -> dict:
    from cxr_rf.data.sources.common import dicom_demographics, read_dicom_header
    try:
        return dicom_demographics(read_dicom_header(path))
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for broken headers
        raise imaging.ImageError(f"unreadable DICOM header: {' '.join(str(e).split())[:200]}") from None
