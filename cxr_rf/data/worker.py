"""The per-image work of a conversion: pixels -> validated Record -> serialized example.

Runs in the converter's worker processes (or inline with one worker), so everything here
is a pure function of (WorkerConfig, Item): results do not depend on the number of workers.
Anything wrong with one input becomes a reject reason instead of an exception.
"""
from __future__ import annotations

import dataclasses
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
    """A converted image: its serialized TFDS example and the fields the statistics count."""
    example: bytes
    meta: dict[str, Any]


_FEATURES = None  # the TFDS feature spec, built once per process


def process(cfg: WorkerConfig, item: Item) -> Done | sources.Reject:
    """Convert one Item; a file or metadata problem becomes a Reject with its reason."""
    global _FEATURES
    try:
        record = to_record(cfg, item)
        if _FEATURES is None:
            _FEATURES = schema.features()
        return Done(example=schema.to_bytes(record, _FEATURES),
                    meta={k: getattr(record, k) for k in META_FIELDS})
    except imaging.ImageError as e:
        return sources.Reject(item.path, str(e))
    except ValueError as e:  # Record validation: out-of-range labels, ages, unknown categories
        return sources.Reject(item.path, f"invalid metadata: {' '.join(str(e).split())}")
    except Exception as e:  # noqa: BLE001 - recorded per file and counted against the threshold
        return sources.Reject(item.path, f"internal error {type(e).__name__}: {' '.join(str(e).split())[:200]}")


def to_record(cfg: WorkerConfig, item: Item) -> Record:
    """Pixels (source ``load`` or ``imaging.load``) + harmonised fields + salted-hash ids."""
    module = sources.get(cfg.source)
    custom = getattr(module, "load", None)
    image = (custom(item, cfg.resolution, cfg.fit) if custom is not None
             else imaging.load(item.path, cfg.resolution, cfg.fit))
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
