"""The one record every data source writes, and its on-disk (TFDS example) encoding.

A ``Record`` is one radiograph with its harmonised metadata. ``to_bytes``/``from_bytes`` turn
it into a serialized TFDS example of ``features()``. The image travels as a 16-bit grayscale
PNG encoded and decoded by ``imaging.encode_png``/``decode_png`` (PIL): ``tfds.features.Image``
would need TensorFlow to encode, and PNG is lossless, compact and readable by any tool.
Pixels (decoding, resizing) live in ``imaging``; this module is the record format only.

Categorical fields are stored as text, not class indices, so a dataset stays readable if the
vocabulary in ``cxr_rf.conditioning`` grows or is reordered.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds

from cxr_rf import errors
from cxr_rf import conditioning as cond
from cxr_rf.data import imaging

# Fields stored as UTF-8 text, in a fixed order (also the order of Record's string fields).
TEXT_FIELDS: tuple[str, ...] = (
    "sex", "race", "view", "source", "site", "patient_id", "study_id", "report")
_CHOICES: dict[str, tuple[str, ...]] = {
    "sex": cond.SEXES, "race": cond.RACES, "view": cond.VIEWS, "source": cond.SOURCES}
UNKNOWN_AGE = -1.0
MAX_AGE = 150.0


@dataclasses.dataclass
class Record:
    """One radiograph and its metadata; validated (and normalised) on construction.

    image: uint16 [H, W] grayscale, higher = brighter (MONOCHROME2).
    findings: int8 [14] state codes (see ``conditioning.STATES``) in ``conditioning.FINDINGS`` order.
    age: years, ``-1.0`` when unknown.
    site: acquisition site / institution tag, ``""`` when unknown.
    patient_id, study_id: already hashed (see ``hash_id``); patient_id must be non-empty
    because splits are made per patient.
    """
    image: np.ndarray
    findings: np.ndarray
    sex: str = "unknown"
    age: float = UNKNOWN_AGE
    race: str = "unknown"
    view: str = "unknown"
    source: str = "unknown"
    site: str = ""
    patient_id: str = ""
    study_id: str = ""
    report: str = ""

    def __post_init__(self):
        image = np.asarray(self.image)
        if image.dtype != np.uint16 or image.ndim != 2 or min(image.shape) == 0:
            raise ValueError(f"Record.image must be a non-empty uint16 [H, W] array, "
                             f"got dtype {image.dtype} shape {image.shape}")
        self.image = image
        self.findings = _check_findings(self.findings)
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"Record.{name} must be one of {', '.join(allowed)}; got {value!r}")
        try:
            age = float(self.age)
        except (TypeError, ValueError):
            raise ValueError(f"Record.age must be a number of years or -1.0; got {self.age!r}") from None
        if not (age == UNKNOWN_AGE or (math.isfinite(age) and 0.0 <= age < MAX_AGE)):
            raise ValueError(f"Record.age must be in [0, {MAX_AGE:g}) years or -1.0 (unknown); got {age}")
        self.age = age
        for name in ("site", "patient_id", "study_id", "report"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"Record.{name} must be a str; got {type(getattr(self, name)).__name__}")
        if not self.patient_id:
            raise ValueError("Record.patient_id must be non-empty (splits are made per patient)")


def _check_findings(findings: Any) -> np.ndarray:
    arr = np.asarray(findings)
    n = len(cond.FINDINGS)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"Record.findings must be {n} integer state codes; "
                         f"got dtype {arr.dtype} shape {arr.shape}")
    if arr.min() < 0 or arr.max() >= len(cond.STATES):
        raise ValueError(f"Record.findings codes must be in 0..{len(cond.STATES) - 1} "
                         f"({', '.join(cond.STATES)}); got {arr.tolist()}")
    return arr.astype(np.int8)


def filesystem_path(path: str | os.PathLike, what: str) -> str:
    """``path`` if it is a filesystem path; a URL (gs://, s3://) is refused in one line.

    ArrayRecord files are read and written through POSIX file descriptors, so a dataset in a
    bucket is used through a gcsfuse mount (or a local copy); checkpoints and logs, unlike
    data, go to gs:// directly (Orbax, etils.epath).
    """
    path = os.fspath(path)
    if "://" in path:
        raise errors.UserError(f"{what} {path} is a URL, but ArrayRecord datasets are read and written "
                         f"through filesystem paths: mount the bucket with gcsfuse (e.g. "
                         f"/gcs/BUCKET/...) or copy it to local disk (BUILD_NOTES.md: Cloud paths)")
    return path


def hash_id(raw: str, salt: str) -> str:
    """Salted SHA-256 of an identifier, as 16 hex characters (64 bits: collisions negligible)."""
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"hash_id needs a non-empty str identifier; got {raw!r}")
    return hashlib.sha256(f"{salt}\x00{raw}".encode("utf-8")).hexdigest()[:16]


def features() -> tfds.features.FeaturesDict:
    """The TFDS feature spec of one stored example."""
    spec: dict[str, Any] = {
        # PNG bytes: a scalar object tensor serialises as a bytes feature without TensorFlow.
        "image_png": tfds.features.Tensor(shape=(), dtype=np.object_),
        "findings": tfds.features.Tensor(shape=(len(cond.FINDINGS),), dtype=np.int8),
        "age": tfds.features.Scalar(dtype=np.float32),
    }
    spec.update({name: tfds.features.Text() for name in TEXT_FIELDS})
    return tfds.features.FeaturesDict(spec)


# Latent datasets (``python -m cxr_rf.data.encode``): the same fields plus the autoencoder's
# normalised posterior mean of the image, a float tensor [h, w, Z] (h = w = resolution / factor,
# Z packed latent channels), float16 by default; ``image_png`` is kept unless encoded with
# --nokeep_pixels. What encoded it is recorded in the dataset's stats.json ("latent").
LATENT = "latent"
LATENT_DTYPES = ("float16", "float32")


def latent_features(shape: tuple[int, int, int], dtype: str = "float16", *,
                    pixels: bool = True) -> tfds.features.FeaturesDict:
    """The TFDS feature spec of a latent dataset's example: ``features()`` plus ``latent``
    (``shape`` [h, w, Z], ``dtype`` one of LATENT_DTYPES), without ``image_png`` unless
    ``pixels``."""
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"latent dtype must be one of {LATENT_DTYPES}; got {dtype!r}")
    spec = dict(features())
    if not pixels:
        del spec["image_png"]
    spec[LATENT] = tfds.features.Tensor(shape=tuple(int(v) for v in shape), dtype=np.dtype(dtype))
    return tfds.features.FeaturesDict(spec)


def latent_info(data_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``latent`` section of a dataset's stats.json (what encoded it: autoencoder run,
    step, config, fingerprint, latent shape and dtype), or None for a pixel dataset."""
    import json
    path = os.path.join(os.fspath(data_dir), "stats.json")
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise errors.UserError(f"{path} is not readable JSON: {e}".replace("\n", " ")) from None
    return doc.get(LATENT) if isinstance(doc, dict) else None


def to_example(record: Record) -> dict[str, Any]:
    """The feature dict (as ``features()`` expects it) of one record."""
    ex: dict[str, Any] = {
        "image_png": imaging.encode_png(record.image),
        "findings": record.findings,
        "age": np.float32(record.age),
    }
    ex.update({name: getattr(record, name) for name in TEXT_FIELDS})
    return ex


def serialize(feats: tfds.features.FeaturesDict, example: Mapping[str, Any]) -> bytes:
    """Deterministic serialized TFDS example of a feature dict (see ``to_bytes``)."""
    from tensorflow_datasets.core import example_serializer
    encoded = feats.encode_example(example)
    proto = example_serializer.ExampleSerializer(feats.get_serialized_info()).get_tf_example(encoded)
    return proto.SerializeToString(deterministic=True)


def to_bytes(record: Record, feats: tfds.features.FeaturesDict | None = None) -> bytes:
    """Serialized TFDS example of one record (pass ``feats`` to skip rebuilding the spec).

    Deterministic bytes: TFDS's ``serialize_example`` writes the proto's feature map in an
    order that depends on the process's string hash seed, so two processes (conversion
    workers, machines converting shard ranges) would write the same record differently;
    here the map is serialized sorted, whatever the process.
    """
    return serialize(feats or features(), to_example(record))


def from_example(example: Mapping[str, Any], *, decode: bool = True) -> dict[str, Any]:
    """A deserialized example (e.g. from ``builder.as_data_source``) -> numpy fields.

    Text fields become ``str``. With ``decode`` the PNG becomes ``image`` (uint16 [H, W]);
    otherwise ``image_png`` stays bytes. A latent record (``latent_features``) also gives
    ``latent`` (its stored dtype); one written without pixels has no image (``decode`` is
    then a one-line UserError).
    """
    latent = LATENT in example
    needed = ("findings", "age", *TEXT_FIELDS) + (() if latent else ("image_png",))
    missing = [k for k in needed if k not in example]
    if missing:
        raise ValueError(f"example lacks fields {missing}; is this a cxr_rf dataset?")
    out: dict[str, Any] = {
        "findings": np.asarray(example["findings"], np.int8),
        "age": float(example["age"]),
    }
    for name in TEXT_FIELDS:
        v = example[name]
        out[name] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
    if latent:
        out[LATENT] = np.asarray(example[LATENT])
        if "image_png" not in example:
            if decode:
                raise errors.UserError("this latent dataset was encoded without its pixels "
                                       "(python -m cxr_rf.data.encode --nokeep_pixels): read images "
                                       "from the pixel dataset it was encoded from (stats.json "
                                       "latent.input)")
            return out
    if decode:
        out["image"] = imaging.decode_png(example["image_png"])
    else:
        out["image_png"] = bytes(example["image_png"])
    return out


def from_bytes(data: bytes, feats: tfds.features.FeaturesDict | None = None) -> dict[str, Any]:
    """Serialized example -> dict of numpy fields with the image decoded (inverse of to_bytes)."""
    return from_example((feats or features()).deserialize_example_np(data))


def to_record(fields: Mapping[str, Any]) -> Record:
    """A decoded field dict (from ``from_bytes``) -> a validated Record."""
    return Record(**{f.name: fields[f.name] for f in dataclasses.fields(Record)})
