"""TFDS-format output: ArrayRecord shards named the TFDS way plus ``dataset_info.json``.

``DatasetWriter`` streams Records into a new dataset in one go (tests, small in-memory
conversions). ``publish_split`` and ``write_info`` are the two steps every writer ends with;
``cxr_rf.data.convert`` uses them to assemble a resumable, sharded conversion.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import dataset_info as tfds_info
from tensorflow_datasets.core import naming

from cxr_rf.data import imaging, schema, stats as stats_lib
from cxr_rf.data.schema import Record

VERSION = "1.0.0"
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# group_size:1 makes every record independently seekable (random access).
ARRAY_RECORD_OPTIONS = "group_size:1"
# Files write_info writes; dataset_info.json is listed last because it is written last.
INFO_FILES = ("metadata.json", "features.json", "dataset_info.json")


def shard_writer(path: str | os.PathLike):
    """An ArrayRecord writer with the options every shard of a dataset uses."""
    return array_record_module.ArrayRecordWriter(os.fspath(path), ARRAY_RECORD_OPTIONS)


def publish_split(directory: str | os.PathLike, name: str, split: str,
                  shards: Sequence[tuple[Path, int]]) -> tfds.core.SplitInfo:
    """Move ``(file, length)`` shards to their TFDS names in ``directory``; empty ones are deleted.

    Idempotent: a shard already moved by an interrupted earlier call (its source gone, its
    final file present) counts as done, so finishing can itself be resumed.
    """
    kept = [(p, n) for p, n in shards if n]
    for p, n in shards:
        if not n:
            Path(p).unlink(missing_ok=True)
    template = naming.ShardedFileTemplate(data_dir=Path(directory), dataset_name=name, split=split,
                                          filetype_suffix="array_record")
    num_bytes = 0
    for j, (p, _) in enumerate(kept):
        final = template.sharded_filepath(shard_index=j, num_shards=len(kept))
        if Path(p).exists():
            os.replace(p, final)
        elif not Path(final).exists():
            raise FileNotFoundError(f"shard {p} is missing")
        num_bytes += os.path.getsize(final)
    return tfds.core.SplitInfo(name=split, shard_lengths=[n for _, n in kept],
                               num_bytes=num_bytes, filename_template=template)


def write_info(directory: str | os.PathLike, *, name: str, resolution: int,
               split_infos: Sequence[tfds.core.SplitInfo], description: str) -> None:
    """Write the TFDS metadata files (``INFO_FILES``) of a dataset into ``directory``."""
    info = tfds.core.DatasetInfo(
        builder=tfds_info.DatasetIdentity(
            name=name, version=tfds.core.Version(VERSION), data_dir=str(directory),
            module_name="cxr_rf.data.convert"),
        description=description,
        features=schema.features(),
        metadata=tfds.core.MetadataDict(resolution=int(resolution)),
        split_dict=tfds.core.SplitDict(list(split_infos)),
    )
    info.set_file_format("array_record")
    info.write_to_directory(directory)


def _positive_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


class DatasetWriter:
    """Streams Records into a TFDS ArrayRecord dataset; publishes it atomically on close.

    Records of each split go round-robin to ``num_shards`` ArrayRecord writers, so memory stays
    bounded whatever the dataset size. Files are written to a hidden sibling directory and
    renamed to ``out_dir`` only when complete: a reader never sees a half-written dataset.
    Leaving the ``with`` block by an exception deletes the partial output.
    """

    def __init__(self, out_dir: str | os.PathLike, *, name: str = "cxr", resolution: int,
                 num_shards: int, description: str = ""):
        if not NAME_RE.match(name):
            raise ValueError(f"dataset name must match {NAME_RE.pattern}; got {name!r}")
        for what, v in (("resolution", resolution), ("num_shards", num_shards)):
            if not _positive_int(v):
                raise ValueError(f"{what} must be a positive int; got {v!r}")
        self.out_dir = Path(out_dir).absolute()
        if self.out_dir.exists() and (not self.out_dir.is_dir() or any(self.out_dir.iterdir())):
            raise FileExistsError(f"output {self.out_dir} exists and is not an empty directory")
        self.name, self.resolution, self.num_shards = name, int(resolution), int(num_shards)
        self.description = description
        self.stats: dict[str, Any] | None = None
        self._feats = schema.features()
        self._tmp = self.out_dir.parent / f".{self.out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
        self._tmp.mkdir(parents=True)
        self._writers: dict[str, list[Any]] = {}
        self._lengths: dict[str, list[int]] = {}
        self._counts: dict[str, dict[str, Any]] = {}
        self._open = True

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _tmp_shard(self, split: str, i: int) -> Path:
        return self._tmp / f"{split}.shard{i:05d}.tmp"

    def add(self, split: str, record: Record) -> None:
        """Append one record to ``split`` (fitted to resolution as ``--fit crop`` does, if needed)."""
        if not self._open:
            raise ValueError("DatasetWriter is closed")
        if not NAME_RE.match(split):
            raise ValueError(f"split name must match {NAME_RE.pattern}; got {split!r}")
        if not isinstance(record, Record):
            raise ValueError(f"DatasetWriter.add needs a schema.Record; got {type(record).__name__}")
        if record.image.shape != (self.resolution, self.resolution):
            # Crop, as this writer always did (no borders); the converter's resizer, so a
            # dataset written here has the pixels ``convert --fit crop`` would give.
            record = dataclasses.replace(
                record, image=imaging.fit_square(record.image, self.resolution, "crop"))
        if split not in self._writers:
            self._writers[split] = [shard_writer(self._tmp_shard(split, i))
                                    for i in range(self.num_shards)]
            self._lengths[split] = [0] * self.num_shards
            self._counts[split] = stats_lib.empty_counts()
        n = self._counts[split]["count"]
        self._writers[split][n % self.num_shards].write(schema.to_bytes(record, self._feats))
        self._lengths[split][n % self.num_shards] += 1
        stats_lib.count(self._counts[split], {k: getattr(record, k) for k in stats_lib.META_FIELDS})

    def _close_writers(self) -> None:
        for writers in self._writers.values():
            for w in writers:
                w.close()
        self._writers = {}
        self._open = False

    def abort(self) -> None:
        """Discard everything written so far."""
        self._close_writers()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def close(self) -> dict[str, Any]:
        """Finish the shards, write TFDS metadata and stats.json, publish; returns the stats."""
        if not self._open:
            if self.stats is None:
                raise ValueError("DatasetWriter was aborted")
            return self.stats
        self._close_writers()
        if not self._lengths:
            self.abort()
            raise ValueError("no records were added; refusing to write an empty dataset")
        try:
            infos = [publish_split(self._tmp, self.name, split,
                                   [(self._tmp_shard(split, i), n)
                                    for i, n in enumerate(self._lengths[split])])
                     for split in sorted(self._lengths)]
            write_info(self._tmp, name=self.name, resolution=self.resolution, split_infos=infos,
                       description=self.description or f"cxr_rf chest radiographs, {self.resolution}px")
            self.stats = stats_lib.build(self.name, self.resolution, self._counts)
            (self._tmp / "stats.json").write_text(json.dumps(self.stats, indent=1))
            if self.out_dir.exists():
                self.out_dir.rmdir()  # checked empty at start; rename cannot replace a directory
            os.replace(self._tmp, self.out_dir)
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        return self.stats
