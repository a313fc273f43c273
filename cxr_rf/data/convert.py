"""Convert a data source into a TFDS-format dataset of sharded ArrayRecord files.

    python -m cxr_rf.data.convert --source phantom --output DIR --num 512 --resolution 64

The output opens with ``tfds.builder_from_directory(DIR)`` (no TensorFlow needed) and holds
``{name}-{split}.array_record-XXXXX-of-YYYYY`` shards, ``dataset_info.json``, ``features.json``
and ``stats.json`` (label and demographic marginals per split). A source is a callable in
``SOURCES`` that takes ``SourceOptions`` and returns an iterator of ``(split, Record)``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import dataset_info as tfds_info
from tensorflow_datasets.core import naming

from cxr_rf import conditioning as cond
from cxr_rf.data import schema
from cxr_rf.data.schema import Record

VERSION = "1.0.0"
DEFAULT_SALT = "cxr_rf"  # pass a secret --salt for real data: small id spaces are brute-forceable
SPLIT_FRACTIONS = (("train", 0.90), ("validation", 0.05), ("test", 0.05))
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# Files a converted dataset consists of; --overwrite deletes only these.
_OWN_FILES = re.compile(r"^([a-z][a-z0-9_]*-[a-z][a-z0-9_]*\.array_record-\d{5}-of-\d{5}"
                        r"|dataset_info\.json|features\.json|stats\.json|metadata\.json)$")


# ---------------------------------------------------------------- statistics

def _empty_counts() -> dict[str, Any]:
    return {
        "count": 0,
        "findings": {f: {s: 0 for s in cond.STATES} for f in cond.FINDINGS},
        "sex": {v: 0 for v in cond.SEXES},
        "age": {v: 0 for v in cond.AGE_BINS},
        "race": {v: 0 for v in cond.RACES},
        "view": {v: 0 for v in cond.VIEWS},
        "source": {},  # sparse: a dataset usually holds one or two sources
        "site": {},
    }


def _count(counts: dict[str, Any], record: Record) -> None:
    counts["count"] += 1
    for f, s in zip(cond.FINDINGS, record.findings):
        counts["findings"][f][cond.STATES[s]] += 1
    counts["age"][cond.AGE_BINS[cond.age_bin(record.age)]] += 1
    for key in ("sex", "race", "view", "source", "site"):
        value = getattr(record, key) or "unknown"
        counts[key][value] = counts[key].get(value, 0) + 1


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total = _empty_counts()
    for part in parts:
        total["count"] += part["count"]
        for f, states in part["findings"].items():
            for s, n in states.items():
                total["findings"][f][s] += n
        for key in ("sex", "age", "race", "view", "source", "site"):
            for v, n in part[key].items():
                total[key][v] = total[key].get(v, 0) + n
    return total


def format_stats(stats: dict[str, Any]) -> str:
    """Human-readable table: split sizes, per-finding state counts, demographic marginals."""
    lines = [f"{'split':<14}{'examples':>10}"]
    for split, counts in stats["splits"].items():
        lines.append(f"{split:<14}{counts['count']:>10}")
    total = stats["total"]
    lines += [f"{'total':<14}{total['count']:>10}", ""]
    states = ("positive", "negative", "uncertain", "unmentioned")
    lines.append(f"{'finding':<28}" + "".join(f"{s:>12}" for s in states))
    for f in cond.FINDINGS:
        lines.append(f"{f:<28}" + "".join(f"{total['findings'][f][s]:>12}" for s in states))
    lines.append("")
    for key in ("sex", "age", "race", "view", "source", "site"):
        items = sorted(total[key].items(), key=lambda kv: -kv[1]) if key == "site" else total[key].items()
        items = [(v, n) for v, n in items if n or key not in ("source", "site")]
        shown = " | ".join(f"{v} {n}" for v, n in items[:10])
        more = f" | ... {len(items) - 10} more" if len(items) > 10 else ""
        lines.append(f"{key + ':':<8}{shown}{more}")
    return "\n".join(lines)


# ---------------------------------------------------------------- writer

class DatasetWriter:
    """Streams Records into a TFDS ArrayRecord dataset; publishes it atomically on close.

    Records of each split go round-robin to ``num_shards`` ArrayRecord writers, so memory stays
    bounded whatever the dataset size. Files are written to a hidden sibling directory and
    renamed to ``out_dir`` only when complete: a reader (or a trainer that converts on first
    run) never sees a half-written dataset. Leaving the ``with`` block by an exception deletes
    the partial output.
    """

    def __init__(self, out_dir: str | os.PathLike, *, name: str = "cxr", resolution: int,
                 num_shards: int, description: str = ""):
        if not _NAME_RE.match(name):
            raise ValueError(f"dataset name must match {_NAME_RE.pattern}; got {name!r}")
        for what, v in (("resolution", resolution), ("num_shards", num_shards)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
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
        """Append one record to ``split`` (resized to resolution x resolution if needed)."""
        if not self._open:
            raise ValueError("DatasetWriter is closed")
        if not _NAME_RE.match(split):
            raise ValueError(f"split name must match {_NAME_RE.pattern}; got {split!r}")
        if not isinstance(record, Record):
            raise ValueError(f"DatasetWriter.add needs a schema.Record; got {type(record).__name__}")
        if record.image.shape != (self.resolution, self.resolution):
            record = dataclasses.replace(
                record, image=schema.resize_image(record.image, self.resolution))
        if split not in self._writers:
            self._writers[split] = [
                # group_size:1 makes every record independently seekable (random access).
                array_record_module.ArrayRecordWriter(str(self._tmp_shard(split, i)), "group_size:1")
                for i in range(self.num_shards)]
            self._lengths[split] = [0] * self.num_shards
            self._counts[split] = _empty_counts()
        n = self._counts[split]["count"]
        self._writers[split][n % self.num_shards].write(schema.to_bytes(record, self._feats))
        self._lengths[split][n % self.num_shards] += 1
        _count(self._counts[split], record)

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
            split_infos = [self._finish_split(split) for split in sorted(self._lengths)]
            info = tfds.core.DatasetInfo(
                builder=tfds_info.DatasetIdentity(
                    name=self.name, version=tfds.core.Version(VERSION), data_dir=str(self._tmp),
                    module_name=__name__),
                description=self.description or f"cxr_rf chest radiographs, {self.resolution}px",
                features=self._feats,
                metadata=tfds.core.MetadataDict(resolution=self.resolution),
                split_dict=tfds.core.SplitDict(split_infos),
            )
            info.set_file_format("array_record")
            info.write_to_directory(self._tmp)
            order = [s for s, _ in SPLIT_FRACTIONS if s in self._counts]
            order += sorted(set(self._counts) - set(order))
            self.stats = {
                "name": self.name, "resolution": self.resolution,
                "splits": {s: self._counts[s] for s in order},
                "total": _merge([self._counts[s] for s in order]),
            }
            (self._tmp / "stats.json").write_text(json.dumps(self.stats, indent=1))
            if self.out_dir.exists():
                self.out_dir.rmdir()  # checked empty at start; rename cannot replace a directory
            os.replace(self._tmp, self.out_dir)
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        return self.stats

    def _finish_split(self, split: str) -> tfds.core.SplitInfo:
        # Fewer records than shards leaves empty shards; drop them so every shard has data.
        lengths = self._lengths[split]
        kept = [i for i, n in enumerate(lengths) if n]
        template = naming.ShardedFileTemplate(
            data_dir=self._tmp, dataset_name=self.name, split=split, filetype_suffix="array_record")
        num_bytes = 0
        for i in range(self.num_shards):
            if i not in kept:
                self._tmp_shard(split, i).unlink()
        for j, i in enumerate(kept):
            final = template.sharded_filepath(shard_index=j, num_shards=len(kept))
            os.replace(self._tmp_shard(split, i), final)
            num_bytes += os.path.getsize(final)
        return tfds.core.SplitInfo(name=split, shard_lengths=[lengths[i] for i in kept],
                                   num_bytes=num_bytes, filename_template=template)


# ---------------------------------------------------------------- sources

@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """What a source may need; each source checks the fields it uses."""
    input_dir: str | None = None
    num: int | None = None       # phantom: how many studies; raw sources: optional limit
    resolution: int = 64
    seed: int = 0
    salt: str = DEFAULT_SALT


def patient_split(patient_key: str) -> str:
    """Deterministic patient-level split (train 90 / validation 5 / test 5) from any stable id."""
    h = int.from_bytes(hashlib.sha256(f"split\x00{patient_key}".encode("utf-8")).digest()[:8], "big")
    u = h / 2.0 ** 64
    edge = 0.0
    for split, frac in SPLIT_FRACTIONS:
        edge += frac
        if u < edge:
            return split
    return SPLIT_FRACTIONS[-1][0]


def phantom_source(opts: SourceOptions) -> Iterator[tuple[str, Record]]:
    """Procedural phantom studies (cxr_rf.data.phantom), split by patient."""
    if opts.input_dir:
        raise ValueError("the phantom source takes no --input")
    if opts.num is None or opts.num <= 0:
        raise ValueError(f"the phantom source needs --num > 0; got {opts.num}")
    from cxr_rf.data import phantom  # imported late: only this source needs it
    first = phantom.generate(opts.seed, 0, opts.resolution)  # its errors surface before writing

    def gen() -> Iterator[tuple[str, Record]]:
        for index in range(opts.num):
            study = first if index == 0 else phantom.generate(opts.seed, index, opts.resolution)
            age = -1.0 if study.age is None else float(study.age)
            yield patient_split(str(study.patient_id)), Record(
                image=study.image, findings=study.findings, sex=study.sex, age=age,
                race=study.race, view=study.view, source="phantom", site=study.site,
                patient_id=schema.hash_id(str(study.patient_id), opts.salt),
                study_id=schema.hash_id(str(study.study_id), opts.salt), report=study.report)
    return gen()


# A source validates its options eagerly (before any output is created) and returns an iterator.
SOURCES: dict[str, Callable[[SourceOptions], Iterator[tuple[str, Record]]]] = {
    "phantom": phantom_source,
}


def _check_output(out_dir: Path, overwrite: bool) -> list[Path]:
    """Files to delete before writing to ``out_dir``; raises if it may not be written."""
    if not out_dir.exists():
        return []
    if not out_dir.is_dir():
        raise ValueError(f"output {out_dir} exists and is not a directory")
    entries = list(out_dir.iterdir())
    if entries and not overwrite:
        raise ValueError(f"output {out_dir} is not empty (pass --overwrite to replace a converted dataset)")
    foreign = [p.name for p in entries if not (p.is_file() and _OWN_FILES.match(p.name))]
    if foreign:
        raise ValueError(f"refusing to overwrite {out_dir}: it holds files that are not part of "
                         f"a converted dataset ({', '.join(sorted(foreign)[:3])})")
    return entries


class UsageError(ValueError):
    """Bad arguments or output location, detected before anything is written."""


def convert(source: str, out_dir: str | os.PathLike, opts: SourceOptions, *, shards: int = 4,
            name: str = "cxr", overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Run ``SOURCES[source]`` into a dataset at ``out_dir``; returns the stats.

    Raises UsageError for bad arguments (before touching the output), other errors while
    converting (the partial output is removed).
    """
    try:
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; valid: {', '.join(sorted(SOURCES))}")
        if not _positive_int(opts.resolution) or opts.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8; got {opts.resolution}")
        if not _positive_int(shards):
            raise ValueError(f"shards must be a positive int; got {shards}")
        if opts.num is not None and not _positive_int(opts.num):
            raise ValueError(f"num must be a positive int; got {opts.num}")
        if not _NAME_RE.match(name):
            raise ValueError(f"dataset name must match {_NAME_RE.pattern}; got {name!r}")
        out = Path(out_dir)
        stale = _check_output(out, overwrite)
        items = SOURCES[source](opts)  # a source checks its options eagerly
    except ValueError as e:
        raise UsageError(str(e)) from None
    for p in stale:  # only after every check passed
        p.unlink()
    with DatasetWriter(out, name=name, resolution=opts.resolution, num_shards=shards,
                       description=f"cxr_rf dataset converted from source {source!r}") as writer:
        if progress:
            from tqdm import tqdm
            items = tqdm(items, total=opts.num, desc=f"convert {source}", unit="img", file=sys.stderr)
        for split, record in items:
            writer.add(split, record)
    assert writer.stats is not None
    return writer.stats


def _positive_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def convert_phantom(out_dir: str | os.PathLike, *, num: int, resolution: int, seed: int = 0,
                    shards: int = 4, salt: str = DEFAULT_SALT, overwrite: bool = False,
                    progress: bool = False) -> dict[str, Any]:
    """Convert ``num`` phantom studies into ``out_dir`` (used by the trainer on first run)."""
    return convert("phantom", out_dir, SourceOptions(num=num, resolution=resolution, seed=seed,
                                                     salt=salt),
                   shards=shards, overwrite=overwrite, progress=progress)


# ---------------------------------------------------------------- CLI

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2: no usage dump, no traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m cxr_rf.data.convert",
                description="Convert a chest X-ray source into a TFDS ArrayRecord dataset.")
    p.add_argument("--source", required=True, help=f"one of: {', '.join(sorted(SOURCES))}")
    p.add_argument("--output", required=True, help="output directory (created; must be empty)")
    p.add_argument("--input", default=None, help="raw dataset directory (real sources)")
    p.add_argument("--num", type=int, default=None,
                   help="phantom: number of studies; real sources: optional limit")
    p.add_argument("--resolution", type=int, required=True, help="output side in pixels (multiple of 8)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed")
    p.add_argument("--shards", type=int, default=4, help="ArrayRecord shards per split")
    p.add_argument("--salt", default=DEFAULT_SALT, help="salt for hashing patient/study ids")
    p.add_argument("--name", default="cxr", help="TFDS dataset name (file prefix)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing converted dataset")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 = bad arguments, 1 = conversion failed)."""
    parser = _parser()
    args = parser.parse_args(argv)
    opts = SourceOptions(input_dir=args.input, num=args.num, resolution=args.resolution,
                         seed=args.seed, salt=args.salt)
    try:
        stats = convert(args.source, args.output, opts, shards=args.shards, name=args.name,
                        overwrite=args.overwrite, progress=not args.no_progress)
    except UsageError as e:
        parser.error(str(e))
    except (ValueError, OSError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    print(format_stats(stats))
    print(f"wrote {stats['total']['count']} examples to {Path(args.output).absolute()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
