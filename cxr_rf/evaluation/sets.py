"""The image sets an evaluation compares: real splits, generated folders, arrays.

Every set has ``len``, ``resolution``, ``metas`` (one metadata dict per image, below) and
``images(idx)`` -> float32 [B, R, R] in [0, 1] (MONOCHROME2); ``batches(batch_size)`` walks it
in order, so memory stays one batch whatever the set's size.

A metadata dict uses the dataset's vocabulary (``cxr_rf.conditioning``):

    findings    int8 [14] state codes (STATES order; UNSPECIFIED = not specified, generated only)
    sex, race, view, source   str, or None where a generated image's condition was not specified
    age         float years, -1.0 unknown, None not specified
    patient_id  str ("" for generated images)

    ReferenceSet(data_dir, split, limit=None, seed=0)   a converted dataset's split (a seeded
                                                        random subset of ``limit`` rows, in order)
    FolderSet(directory)      PNGs + manifest.jsonl, as ``python -m cxr_rf.sample`` and
                              ``generate`` write them
    ArraySet(images, metas)   in memory (tests, perturbed copies)
    Subset(set, idx)          rows of another set
    ConcatSet([a, b])         sets one after the other, at the first one's resolution
    generate(sampler, params, prompts, out, ...)   a run's samples for the metadata of a set
                              (``seeds`` per prompt row), written as a FolderSet, resumable

A generated image's meta also carries ``prompt_row`` (the row of the set whose metadata
asked for it) and ``seed`` where its manifest says so.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Mapping, Sequence

import numpy as np

from cxr_rf import conditioning as cond
from cxr_rf import errors
from cxr_rf.conditioning import Conditions
from cxr_rf.data import imaging, schema

META_FIELDS = ("findings", "sex", "age", "race", "view", "source", "patient_id")
# The attributes sets are split by in subgroup results (fidelity, utility).
SUBGROUPS = ("sex", "age", "race", "view", "source")


def group_value(meta: Mapping, attr: str) -> str | None:
    """The subgroup ``meta`` falls in for ``attr`` (age: a ``conditioning.AGE_BINS`` band);
    None where a generated image's condition was not specified."""
    if attr == "age":
        age = meta.get("age")
        return None if age is None else cond.AGE_BINS[cond.age_bin(float(age))]
    return meta.get(attr)


class ImageSet:
    """Base: subclasses set ``metas`` and ``resolution`` and implement ``_load(i)``."""
    name: str = "images"
    metas: list[dict]
    resolution: int

    def __len__(self) -> int:
        return len(self.metas)

    def _load(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def images(self, idx: Sequence[int]) -> np.ndarray:
        """float32 [len(idx), R, R] in [0, 1]."""
        idx = [int(i) for i in idx]
        if not idx:
            return np.zeros((0, self.resolution, self.resolution), np.float32)
        return np.stack([self._load(i) for i in idx])

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(indices, images) in order, batch_size at a time."""
        for s in range(0, len(self), batch_size):
            idx = np.arange(s, min(s + batch_size, len(self)))
            yield idx, self.images(idx)

    def findings(self) -> np.ndarray:
        """int8 [N, 14] of all metas."""
        return (np.stack([m["findings"] for m in self.metas]).astype(np.int8) if self.metas
                else np.zeros((0, len(cond.FINDINGS)), np.int8))


def to_unit(image_u16: np.ndarray) -> np.ndarray:
    """uint16 [H, W] -> float32 in [0, 1]."""
    return image_u16.astype(np.float32) * np.float32(1.0 / 65535.0)


def meta_of(fields: Mapping) -> dict:
    """The metadata dict of a stored record's fields (``schema.from_example``)."""
    return {"findings": np.asarray(fields["findings"], np.int8), "sex": fields["sex"],
            "age": float(fields["age"]), "race": fields["race"], "view": fields["view"],
            "source": fields["source"], "patient_id": fields.get("patient_id", "")}


def conditions_of(meta: Mapping) -> Conditions:
    """The sampling conditions that ask for exactly this metadata (no report)."""
    age = meta["age"]
    if age is not None and float(age) < 0:
        age = "unknown"
    return Conditions(tuple(int(s) for s in meta["findings"]), meta["sex"], age, meta["race"],
                      meta["view"], meta["source"])


def meta_of_conditions(described: Mapping) -> dict:
    """The metadata dict of ``Conditions.describe()`` (a manifest row's "conditions")."""
    try:
        findings = np.asarray([cond.REQUEST_STATES.index(described["findings"][f])
                               for f in cond.FINDINGS], np.int8)
        age = described.get("age")
        age = -1.0 if age == "unknown" else None if age is None else float(age)
    except (KeyError, ValueError, TypeError) as e:
        raise errors.UserError(f"manifest conditions are not a Conditions.describe() dict: {e}") from None
    return {"findings": findings, "sex": described.get("sex"), "age": age,
            "race": described.get("race"), "view": described.get("view"),
            "source": described.get("source"), "patient_id": ""}


class ReferenceSet(ImageSet):
    """A split of a converted dataset; ``limit`` rows drawn at random (seeded), kept in order."""

    def __init__(self, data_dir: str | os.PathLike, split: str, limit: int | None = None,
                 seed: int = 0):
        from cxr_rf.data import pipeline   # Grain/TFDS; imported late
        self.data_dir, self.split = os.fspath(data_dir), split
        self.name = f"{os.path.basename(self.data_dir.rstrip('/'))}/{split}"
        self._source = pipeline.open_source(self.data_dir, split)
        n = len(self._source)
        if n == 0:
            raise errors.UserError(f"split {split!r} of {self.data_dir} is empty")
        rows = np.arange(n)
        if limit is not None and limit < n:
            rows = np.sort(np.random.default_rng(seed).choice(n, int(limit), replace=False))
        self.rows = rows
        self.metas = [meta_of(schema.from_example(self._source[int(r)], decode=False)) for r in rows]
        self.resolution = int(self._load(0).shape[0])

    def _load(self, i: int) -> np.ndarray:
        ex = schema.from_example(self._source[int(self.rows[i])])
        image = ex["image"]
        if image.shape[0] != image.shape[1]:
            raise errors.UserError(f"{self.name}: stored image is {image.shape}, not square")
        return to_unit(image)


class FolderSet(ImageSet):
    """Generated images: ``manifest.jsonl`` rows with "file" and "conditions"
    (``Conditions.describe()``); 8- or 16-bit grayscale PNGs (or DICOMs) of one square size."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self.name = os.path.basename(self.directory.rstrip("/"))
        manifest = os.path.join(self.directory, "manifest.jsonl")
        if not os.path.isdir(self.directory):
            raise errors.UserError(f"image folder {self.directory} does not exist")
        if not os.path.isfile(manifest):
            raise errors.UserError(f"{self.directory} has no manifest.jsonl (one JSON row per image "
                                   f"with 'file' and 'conditions', as python -m cxr_rf.sample writes)")
        with open(manifest) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            raise errors.UserError(f"{manifest} lists no images")
        self.files, self.metas, self.rows = [], [], rows
        for r in rows:
            if "file" not in r or "conditions" not in r:
                raise errors.UserError(f"{manifest}: every row needs 'file' and 'conditions', got keys "
                                       f"{sorted(r)}")
            path = os.path.join(self.directory, r["file"])
            if not os.path.isfile(path):
                raise errors.UserError(f"{manifest} lists {r['file']}, which is not in the folder")
            self.files.append(path)
            meta = meta_of_conditions(r["conditions"])
            meta.update({k: r[k] for k in ("prompt_row", "seed") if k in r})
            self.metas.append(meta)
        self.resolution = int(self._load(0).shape[0])

    def _load(self, i: int) -> np.ndarray:
        try:
            image = imaging.read(self.files[i])           # PNG, JPEG or (synthetic) DICOM
        except errors.UserError as e:   # ImageError: one line naming the file
            raise errors.UserError(f"{self.files[i]}: {e}") from None
        if image.shape[0] != image.shape[1] or (hasattr(self, "resolution")
                                                and image.shape[0] != self.resolution):
            raise errors.UserError(f"{self.files[i]} is {image.shape[0]}x{image.shape[1]}; every image "
                                   f"of a folder must be square and of one size")
        return to_unit(image)


class ArraySet(ImageSet):
    """Images already in memory: float [N, R, R] in [0, 1] with one metadata dict each."""

    def __init__(self, images_NxRxR: np.ndarray, metas: Sequence[Mapping], name: str = "arrays"):
        from cxr_rf.features import check_images
        self.x = check_images(images_NxRxR, name)
        if len(metas) != len(self.x):
            raise errors.UserError(f"{name}: {len(self.x)} images but {len(metas)} metadata rows")
        self.metas, self.name = [dict(m) for m in metas], name
        self.resolution = int(self.x.shape[1])

    def _load(self, i: int) -> np.ndarray:
        return self.x[i]


def generate(sampler, params, prompts: ImageSet, out: str | os.PathLike, *, seeds: int = 1,
             seed: int = 0, settings: Mapping | None = None, chunk: int = 256,
             progress: bool = False, **generate_kwargs) -> FolderSet:
    """Samples of ``sampler`` (``cxr_rf.sample.Sampler``) for the metadata of every row of
    ``prompts``, ``seeds`` per row (row r, copy j: noise seed ``seed + r * seeds + j``), as
    16-bit PNGs with ``manifest.jsonl`` in ``out``; returns the FolderSet.

    ``settings`` (JSON-able: checkpoint, steps, guidance...) goes into every manifest row. The
    images are written ``chunk`` at a time with their manifest rows, so an interrupted run
    resumes after its last whole chunk; a folder made with other settings or prompts is
    refused, never mixed. ``generate_kwargs`` go to ``Sampler.generate``."""
    from cxr_rf import outputs
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    settings = dict(settings or {}, prompts=prompts.name, seeds=int(seeds), seed0=int(seed))
    manifest = os.path.join(out, "manifest.jsonl")
    rows = []
    if os.path.isfile(manifest):
        with open(manifest) as f:
            lines = f.read().split("\n")
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:      # an empty or half-written last line
                break
        if rows and rows[0].get("settings") != json.loads(json.dumps(outputs.to_json(settings))):
            raise errors.UserError(f"{out} holds samples made with other settings "
                                   f"({rows[0].get('settings')}); use another --out or delete it")
    jobs = [(r, j) for r in range(len(prompts)) for j in range(int(seeds))]
    if len(rows) != len(jobs):              # resume after the last whole chunk
        rows = rows[:len(rows) // chunk * chunk]
        with open(manifest, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    if seed < 0 or seed + len(jobs) > 2**32:
        raise errors.UserError(f"seed + number of samples must be in [0, 2**32], got {seed} + {len(jobs)}")
    import tqdm
    bar = tqdm.tqdm(total=len(jobs), initial=len(rows), disable=not progress, unit="img",
                    desc="generate", dynamic_ncols=True)
    with open(manifest, "a") as f:
        for start in range(len(rows), len(jobs), chunk):
            part = jobs[start:start + chunk]
            conds = [conditions_of(prompts.metas[r]) for r, _ in part]
            sds = [seed + r * int(seeds) + j for r, j in part]
            images = sampler.generate(params, conds, sds, **generate_kwargs)
            for i, ((r, _), sd, c, x) in enumerate(zip(part, sds, conds, images)):
                name = f"{start + i:06d}.png"
                outputs.write_png(os.path.join(out, name), x, bits=16)
                f.write(json.dumps(outputs.to_json(
                    {"file": name, "prompt_row": r, "seed": sd, "conditions": c.describe(),
                     "settings": settings}), sort_keys=True) + "\n")
            f.flush()
            bar.update(len(part))
    bar.close()
    return FolderSet(out)


class Subset(ImageSet):
    """Rows ``idx`` of another set (e.g. one half of a held-out split as a control)."""

    def __init__(self, base: ImageSet, idx: Sequence[int], name: str | None = None):
        self.base, self.idx = base, [int(i) for i in idx]
        self.name = name or f"{base.name}[{len(self.idx)}]"
        self.metas = [base.metas[i] for i in self.idx]
        self.resolution = base.resolution

    def _load(self, i: int) -> np.ndarray:
        return self.base.images([self.idx[i]])[0]


class ConcatSet(ImageSet):
    """Two (or more) ImageSets one after the other, at the first set's resolution (the others
    are resampled with an anti-aliased Lanczos filter when their size differs)."""

    def __init__(self, sets: Sequence[ImageSet], name: str | None = None):
        self.sets = list(sets)
        self.resolution = int(self.sets[0].resolution)
        self.name = name or "+".join(str(getattr(s, "name", "")) for s in self.sets)
        self.metas = [m for s in self.sets for m in s.metas]
        self._where = [(k, i) for k, s in enumerate(self.sets) for i in range(len(s))]

    def _load(self, i: int) -> np.ndarray:
        k, j = self._where[i]
        x = self.sets[k].images([j])[0]
        if x.shape[0] != self.resolution:
            from PIL import Image
            x = np.clip(np.asarray(Image.fromarray(np.asarray(x, np.float32), mode="F").resize(
                (self.resolution, self.resolution), Image.LANCZOS), np.float32), 0.0, 1.0)
        return x


def phantoms(seed: int, num: int, resolution: int, name: str | None = None, **overrides) -> ArraySet:
    """``num`` phantom studies (``phantom.generate(seed, i, resolution, **overrides)``) as an
    ArraySet with their ground-truth metadata: real images with known labels, without a
    conversion (tests, controls)."""
    from cxr_rf.data import phantom
    studies = [phantom.generate(seed, i, resolution, **overrides) for i in range(num)]
    images = np.stack([to_unit(s.image) for s in studies])
    metas = [{"findings": s.findings, "sex": s.sex, "age": s.age, "race": s.race, "view": s.view,
              "source": "phantom", "patient_id": s.patient_id} for s in studies]
    return ArraySet(images, metas, name=name or f"phantoms_{seed}_{num}_{resolution}")
