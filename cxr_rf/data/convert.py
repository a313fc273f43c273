"""Convert a chest X-ray source into a TFDS-format dataset of sharded ArrayRecord files.

    python -m cxr_rf.data.convert --source NAME --input RAW_DIR --output OUT_DIR --resolution R \\
        [--workers N] [--max_reject_fraction F] [--fit pad|crop] [--salt SECRET]
    python -m cxr_rf.data.convert --source phantom --output DIR --num 512 --resolution 64
    ... --shard_range A:B   (on each machine, disjoint ranges)   then   ... --publish   (once)

How a conversion runs:
  1. the source (``cxr_rf/data/sources/<name>.py``) lists Items from metadata only;
  2. ``plan.make_plan`` assigns them to splits (official, else patient hash) and shards;
  3. each shard's images are decoded, fitted and PNG-encoded by ``worker.process`` in a pool
     of ``--workers`` processes; the shard is written under ``OUT/.work/`` and renamed when
     complete, with a small JSON (counts, rejects) that marks it done;
  4. at the end the shards get their TFDS names, then ``stats.json``, ``stats.txt``,
     ``features.json`` and, last, ``dataset_info.json`` are written into OUT, and the
     rejects log ``OUT.rejects.jsonl`` beside it (``rejects_log(OUT)``).
A dataset is usable once ``dataset_info.json`` exists (``tfds.builder_from_directory(OUT)``).
Rerunning an interrupted command resumes: finished shards are kept, the rest redone, and the
result is identical to an uninterrupted run. If more than ``--max_reject_fraction`` of the
inputs are rejected, nothing is published and the exit code is 1 (rerunning with a higher
threshold publishes without redoing any work). Inputs a source excludes on purpose (authors'
exclusions, a patient in two official splits) are reported apart and never count as rejected;
images converted with a noted property (``BurnedInAnnotation YES`` in a public release) are
counted under ``flags``.

No raw patient or study id is written inside OUT: records hold salted hashes, and reject
reasons (counted in ``stats.json``/``stats.txt``) carry none. The rejects log
``OUT.rejects.jsonl`` lists input paths, which can contain original ids, so it lives beside
the dataset, not in it: an operator's log, never shared with the dataset.

Several machines: the plan's shards are numbered 0..N-1 (split by split, in plan order) and
``--shard_range A:B`` converts only shards A..B-1 into ``OUT/.work`` (a shared directory; the
ranges must not overlap), without publishing. Once every range is done, one ``--publish`` run
with the same arguments (minus the range) checks that all N shards are there and publishes
exactly what a single process would have (byte for byte).
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cxr_rf import cli, errors
from cxr_rf.data import imaging, schema, sources, worker
from cxr_rf.data import stats as stats_lib
from cxr_rf.data.plan import DEFAULT_SHARD_SIZE, Plan, Unit, make_plan
from cxr_rf.data.sources import Item, Reject, SourceError, SourceOptions
from cxr_rf.data.stats import format_stats
from cxr_rf.data.writer import INFO_FILES, NAME_RE, VERSION, publish_split, shard_writer, write_info

# Only what this module defines: import every other name from the module that defines it.
__all__ = ["UsageError", "TooManyRejects", "convert", "convert_phantom", "rejects_log", "main"]

DEFAULT_SALT = sources.DEFAULT_SALT
DEFAULT_MAX_REJECT_FRACTION = 0.01
SOURCES = sources.SOURCES
WORK = ".work"
# What a conversion writes into OUT; --overwrite deletes only these (rejects.jsonl: older
# conversions wrote their log inside OUT).
_OWN_FILES = re.compile(r"^([a-z][a-z0-9_]*-[a-z][a-z0-9_]*\.array_record-\d{5}-of-\d{5}"
                        r"|dataset_info\.json|features\.json|stats\.json|stats\.txt|metadata\.json"
                        r"|rejects\.jsonl)$")


class UsageError(errors.UserError):
    """Bad arguments, input or output location, detected before anything is written."""


class TooManyRejects(errors.RunError):
    """More inputs were rejected than allowed; ``stats`` holds the summary (nothing published)."""

    def __init__(self, message: str, stats: dict[str, Any]):
        super().__init__(message)
        self.stats = stats


def rejects_log(out_dir: str | os.PathLike) -> Path:
    """Where the rejects log of the dataset at ``out_dir`` goes: ``<OUT>.rejects.jsonl`` beside it."""
    out = Path(out_dir).absolute()
    return out.with_name(out.name + ".rejects.jsonl")


def _unit_done(name: str) -> None:
    """Called after each finished shard; tests replace it to interrupt a conversion."""


# ---------------------------------------------------------------- output directory

def _output_state(out: Path, overwrite: bool) -> str:
    """'fresh', 'unfinished' (a previous run's work to resume) or 'replace' (overwrite)."""
    if not out.exists():
        return "fresh"
    if not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")
    entries = list(out.iterdir())
    if not entries:
        return "fresh"
    if (out / WORK).is_dir() and not (out / "dataset_info.json").exists():
        return "unfinished"
    if not overwrite:
        raise UsageError(f"output {out} is not empty (pass --overwrite to replace a converted dataset)")
    foreign = [p.name for p in entries
               if not ((p.is_file() and _OWN_FILES.match(p.name)) or (p.name == WORK and p.is_dir()))]
    if foreign:
        raise UsageError(f"refusing to overwrite {out}: it holds files that are not part of "
                         f"a converted dataset ({', '.join(sorted(foreign)[:3])})")
    return "replace"


def _clear(out: Path) -> None:
    for p in out.iterdir():
        if p.name == WORK and p.is_dir():
            shutil.rmtree(p)
        elif p.is_file() and _OWN_FILES.match(p.name):
            p.unlink()


def _check_distributed(out: Path, state: str, shard_range: tuple[int, int] | None,
                       publish_only: bool, kind: str = "conversion") -> None:
    """UsageError unless OUT (in ``state``, of ``_output_state``) suits the call: ``--publish``
    needs unfinished work, ``--shard_range`` an empty or unfinished OUT. Shared by convert and
    ``encode`` (``kind`` names the work)."""
    if publish_only and state != "unfinished":
        raise UsageError(f"nothing to publish in {out}: no unfinished {kind} there"
                         + (" (it already holds a dataset)" if state != "fresh" else ""))
    if shard_range is not None and state == "replace":
        raise UsageError(f"output {out} already holds a dataset; --shard_range needs an empty "
                         "or unfinished output")


def _prepare_work(out: Path, state: str, fingerprint: str, units: list[str], *,
                  overwrite: bool, distributed: bool, kind: str = "conversion",
                  of: str = "input or settings") -> Path:
    """Make ``out/.work`` ready for the plan ``fingerprint`` (of the shards named ``units``) and
    return it: resume unfinished work of the same plan; clear OUT when ``state`` (of
    ``_output_state``) is 'replace' or the unfinished work is of another plan (that only with
    ``overwrite``; a ``distributed`` call, --shard_range or --publish, never clears another
    process's work); write ``plan.json`` once. Shared by convert and ``encode`` (``kind`` and
    ``of`` name the work in the error)."""
    work = out / WORK
    if state == "unfinished":
        try:
            previous = json.loads((work / "plan.json").read_text())["fingerprint"]
        except (OSError, ValueError, KeyError):
            previous = None  # interrupted before its plan was written: nothing to keep
        if previous is not None and previous != fingerprint and not overwrite:
            raise UsageError(f"output {out} holds an unfinished {kind} of other {of} "
                             "(pass --overwrite to discard it)")
        if previous is None and distributed:
            previous = fingerprint  # another process is starting: never clear its work
        if previous != fingerprint:
            state = "replace"
    if state == "replace":
        _clear(out)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "plan.json").exists():
        _write_atomic(work / "plan.json", json.dumps({"fingerprint": fingerprint,
                                                      "units": list(units)}))
    return work


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes may share OUT/.work
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- conversion

def _entries(source: str, opts: SourceOptions) -> Iterator[Item | Reject]:
    """The source's entries, stopped after ``opts.num`` Items when a limit is given."""
    n = 0
    for e in sources.get(source).items(opts.input_dir, opts):
        yield e
        n += isinstance(e, Item)
        if opts.num is not None and n >= opts.num:
            return


def _check_args(source: str, opts: SourceOptions, shards: Any, shard_size: Any, workers: Any,
                fit: str, max_reject_fraction: Any, name: str) -> None:
    if source not in SOURCES:
        raise UsageError(f"unknown source {source!r}; valid: {', '.join(SOURCES)}")
    if not _positive_int(opts.resolution) or opts.resolution % 8:
        raise UsageError(f"resolution must be a positive multiple of 8; got {opts.resolution}")
    for what, v in (("shards", shards), ("shard_size", shard_size), ("workers", workers)):
        if v is not None and not _positive_int(v):
            raise UsageError(f"{what} must be a positive int; got {v}")
    if opts.num is not None and not _positive_int(opts.num):
        raise UsageError(f"num must be a positive int; got {opts.num}")
    if not NAME_RE.match(name):
        raise UsageError(f"dataset name must match {NAME_RE.pattern}; got {name!r}")
    if fit not in imaging.FITS:
        raise UsageError(f"fit must be one of {', '.join(imaging.FITS)}; got {fit!r}")
    if not (isinstance(max_reject_fraction, (int, float)) and 0.0 <= max_reject_fraction <= 1.0):
        raise UsageError(f"max_reject_fraction must be in [0, 1]; got {max_reject_fraction}")
    if source != "phantom":
        if not opts.input_dir:
            raise UsageError(f"source {source!r} needs --input RAW_DIR")
        if not Path(opts.input_dir).is_dir():
            raise UsageError(f"input directory {opts.input_dir} does not exist")


def convert(source: str, out_dir: str | os.PathLike, opts: SourceOptions, *,
            shards: int | None = None, shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 1,
            fit: str = "pad", max_reject_fraction: float = DEFAULT_MAX_REJECT_FRACTION,
            name: str = "cxr", overwrite: bool = False, progress: bool = False,
            shard_range: tuple[int, int] | None = None, publish_only: bool = False) -> dict[str, Any]:
    """Convert ``source`` into a dataset at ``out_dir`` (resuming unfinished work); returns the stats.

    ``shard_range=(a, b)`` converts only the plan's shards a..b-1 (of N) and publishes nothing;
    it returns ``{"shard_range": [a, min(b, N)], "shards": N, "pending": shards still to do}``.
    ``publish_only`` converts nothing and publishes once every shard is done (RunError
    otherwise). Both keep other processes' work: they never clear OUT (no ``overwrite``).

    Raises UsageError for bad arguments, input or output (before writing anything),
    TooManyRejects when the reject fraction exceeds ``max_reject_fraction`` (the work is kept
    for a rerun), other errors for failures while converting (the work is kept as well).
    With ``workers > 1`` call it under ``if __name__ == "__main__":`` (worker processes
    re-import the main script, as multiprocessing always does outside fork).
    """
    _check_args(source, opts, shards, shard_size, workers, fit, max_reject_fraction, name)
    if shard_range is not None:
        if not (isinstance(shard_range, (tuple, list)) and len(shard_range) == 2
                and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shard_range)
                and 0 <= shard_range[0] < shard_range[1]):
            raise UsageError(f"shard_range must be A:B with 0 <= A < B; got {shard_range}")
    distributed = shard_range is not None or publish_only
    if distributed and overwrite:
        raise UsageError("--overwrite cannot be combined with --shard_range or --publish "
                         "(other processes' shards would be deleted)")
    if shard_range is not None and publish_only:
        raise UsageError("pass either --shard_range or --publish, not both")
    try:
        out = Path(schema.filesystem_path(out_dir, "output")).absolute()
    except ValueError as e:
        raise UsageError(str(e)) from None
    state = _output_state(out, overwrite)
    try:
        plan = make_plan(_entries(source, opts), shards=shards, shard_size=shard_size, settings={
            "version": VERSION, "source": source, "resolution": opts.resolution, "fit": fit,
            "name": name, "salt": _digest(opts.salt), "seed": opts.seed})
    except SourceError as e:
        raise UsageError(str(e)) from None
    if not plan.units and not plan.rejects:
        where = opts.input_dir or "the source"
        raise UsageError(f"source {source!r} found no images in {where}")
    _check_distributed(out, state, shard_range, publish_only)
    if shard_range is not None and shard_range[0] >= len(plan.units):
        raise UsageError(f"shard_range {shard_range[0]}:{shard_range[1]} starts past the plan's "
                         f"{len(plan.units)} shards")
    work = _prepare_work(out, state, plan.fingerprint, [u.name for u in plan.units],
                         overwrite=overwrite, distributed=distributed)
    cfg = worker.WorkerConfig(source=source, salt=opts.salt, resolution=opts.resolution, fit=fit)
    if publish_only:
        missing = [i for i, u in enumerate(plan.units) if not _is_done(work, u)]
        if missing:
            raise errors.RunError(f"{len(missing)} of {len(plan.units)} shards are not converted "
                                  f"yet (first: shard {missing[0]}); finish their --shard_range "
                                  "runs, then publish")
    lo, hi = shard_range if shard_range is not None else (0, len(plan.units))
    mine = plan.units[lo:hi]
    pending = [u for u in mine if not _is_done(work, u)]
    _run(pending, work, cfg, workers, total=sum(len(u.items) for u in mine),
         done=sum(len(u.items) for u in mine) - sum(len(u.items) for u in pending),
         progress=progress, desc=f"convert {source}")
    if shard_range is not None:
        return {"shard_range": [lo, min(hi, len(plan.units))], "shards": len(plan.units),
                "pending": sum(not _is_done(work, u) for u in plan.units)}
    return _finish(plan, out, name=name, resolution=opts.resolution, source=source,
                   max_reject_fraction=max_reject_fraction)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()  # the salt itself is never stored


def _is_done(work: Path, unit: Unit) -> bool:
    return (work / f"{unit.name}.json").exists() and (work / f"{unit.name}.array_record").exists()


def _ordered(fn, items: Iterator[Item], executor, window: int) -> Iterator[Any]:
    """``map(fn, items)`` on the executor, in input order, with at most ``window`` in flight.

    Input order makes the output independent of the number of workers; the window bounds
    memory however long the source. A worker that dies raises BrokenProcessPool here
    instead of hanging the conversion.
    """
    in_flight: collections.deque = collections.deque()
    for item in items:
        in_flight.append(executor.submit(fn, item))
        if len(in_flight) >= window:
            yield in_flight.popleft().result()
    while in_flight:
        yield in_flight.popleft().result()


def _run(pending: list[Unit], work: Path, cfg: worker.WorkerConfig, workers: int, *,
         total: int, done: int, progress: bool, desc: str) -> None:
    """Convert the pending units in order; each is published into ``work`` when complete."""
    if not pending:
        return
    from tqdm import tqdm
    items = (item for unit in pending for item in unit.items)
    fn = functools.partial(worker.process, cfg)
    executor = None
    if workers > 1:
        # forkserver: workers fork from a clean server process, never from a parent that may
        # hold threads (JAX, Grain) that fork would copy in a locked state.
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["cxr_rf.data.worker"])
        executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx)
    try:
        results = map(fn, items) if executor is None else _ordered(fn, items, executor, 8 * workers)
        with tqdm(total=total, initial=done, desc=desc, unit="img", file=sys.stderr,
                  disable=not progress, dynamic_ncols=True) as bar:
            for unit in pending:
                _write_unit(unit, results, work, bar)
                _unit_done(unit.name)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def _write_unit(unit: Unit, results: Iterator[Any], work: Path, bar) -> None:
    tmp = work / f"{unit.name}.array_record.tmp"
    counts = stats_lib.empty_counts()
    rejects: list[list[str]] = []
    flags: dict[str, int] = {}
    w = shard_writer(tmp)
    try:
        for _ in unit.items:
            res = next(results)
            if isinstance(res, Reject):
                rejects.append([res.path, res.reason, res.kind])
            else:
                w.write(res.example)
                stats_lib.count(counts, res.meta)
                for flag in res.flags:
                    flags[flag] = flags.get(flag, 0) + 1
            bar.update(1)
    finally:
        w.close()
    os.replace(tmp, work / f"{unit.name}.array_record")
    _write_atomic(work / f"{unit.name}.json", json.dumps(
        {"records": counts["count"], "counts": counts, "rejects": rejects, "flags": flags}))


def _finish(plan: Plan, out: Path, *, name: str, resolution: int, source: str,
            max_reject_fraction: float) -> dict[str, Any]:
    """Reports always; the dataset only when the rejects are within the threshold."""
    work = out / WORK
    docs = {u.name: json.loads((work / f"{u.name}.json").read_text()) for u in plan.units}
    rejects = [(r.path, r.reason, r.kind) for r in plan.rejects]
    # Unit documents of older conversions hold [path, reason] (kind: rejected).
    rejects += [(r[0], r[1], r[2] if len(r) > 2 else sources.REJECTED)
                for u in plan.units for r in docs[u.name]["rejects"]]
    excluded = stats_lib.summarize_excluded(r for _, r, k in rejects if k == sources.EXCLUDED)
    summary = stats_lib.summarize_rejects(
        (r for _, r, k in rejects if k != sources.EXCLUDED),
        plan.num_items + len(plan.rejects) - excluded["count"])
    flags: dict[str, int] = {}
    for u in plan.units:
        for flag, n in docs[u.name].get("flags", {}).items():
            flags[flag] = flags.get(flag, 0) + n
    per_split: dict[str, list[Unit]] = {}
    for u in plan.units:
        per_split.setdefault(u.split, []).append(u)
    counts = {split: stats_lib.merge(docs[u.name]["counts"] for u in units)
              for split, units in per_split.items()}
    stats = stats_lib.build(name, resolution, {s: c for s, c in counts.items() if c["count"]}, summary,
                            excluded=excluded, flags=flags)
    log = rejects_log(out)
    _write_atomic(log, "".join(json.dumps({"path": p, "reason": r, "kind": k}) + "\n"
                               for p, r, k in rejects))
    (out / "rejects.jsonl").unlink(missing_ok=True)  # an older conversion's log inside OUT
    _write_atomic(out / "stats.txt", format_stats(stats) + "\n")
    if summary["fraction"] > max_reject_fraction:
        raise TooManyRejects(
            f"{summary['count']} of {summary['inputs']} inputs rejected "
            f"({100 * summary['fraction']:.2f}% > {100 * max_reject_fraction:g}%); see "
            f"{log}; nothing published (rerun with a higher "
            "--max_reject_fraction to publish)", stats)
    if not stats["total"]["count"]:
        raise errors.RunError(f"no image could be converted; see {log}")
    infos = [publish_split(out, name, split, [(work / f"{u.name}.array_record", docs[u.name]["records"])
                                              for u in units])
             for split, units in per_split.items() if counts[split]["count"]]
    _write_atomic(out / "stats.json", json.dumps(stats, indent=1))
    meta = work / "meta"
    shutil.rmtree(meta, ignore_errors=True)
    meta.mkdir()
    write_info(meta, name=name, resolution=resolution, split_infos=infos,
               description=f"cxr_rf dataset converted from source {source!r}")
    for f in INFO_FILES:  # dataset_info.json last: its presence means "complete"
        os.replace(meta / f, out / f)
    shutil.rmtree(work)
    return stats


def _positive_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def convert_phantom(out_dir: str | os.PathLike, *, num: int, resolution: int, seed: int = 0,
                    shards: int = 4, salt: str = DEFAULT_SALT, overwrite: bool = False,
                    progress: bool = False, workers: int = 1) -> dict[str, Any]:
    """Convert ``num`` phantom studies into ``out_dir`` (used by the trainer on first run)."""
    return convert("phantom", out_dir, SourceOptions(num=num, resolution=resolution, seed=seed,
                                                     salt=salt),
                   shards=shards, overwrite=overwrite, progress=progress, workers=workers)


# ---------------------------------------------------------------- CLI

def define_output_flags(verb: str, which: str, noun: str) -> None:
    """The output flags convert and encode share: --overwrite, --no-progress and the
    distributed pair --shard_range / --publish (checked by ``_check_distributed``)."""
    from absl import flags
    flags.DEFINE_boolean("overwrite", False, "Replace an existing dataset (or discard unfinished "
                         "work of other settings).")
    flags.DEFINE_boolean("no-progress", False, "No progress bar.")
    flags.DEFINE_string("shard_range", None, f"A:B: {verb} only shards A..B-1 {which} into "
                        "OUT/.work (several machines, one shared OUT); publish with --publish.")
    flags.DEFINE_boolean("publish", False, f"Publish {noun.lower()} whose shards were all "
                         "written by --shard_range runs (same other arguments).")


def _define_flags() -> None:
    """Command-line flags (defined only when run as a program, so importing stays side-effect
    free)."""
    from absl import flags
    flags.DEFINE_string("source", None, f"One of: {', '.join(SOURCES)}.")
    flags.DEFINE_string("output", None, "Output directory (created; must be empty).")
    flags.DEFINE_string("input", None, "Raw dataset directory (every source but phantom).")
    flags.DEFINE_integer("resolution", None, "Output side in pixels (a multiple of 8).")
    flags.DEFINE_integer("workers", 1, "Decoding processes.")
    flags.DEFINE_float("max_reject_fraction", DEFAULT_MAX_REJECT_FRACTION,
                       "Fail (exit 1, publish nothing) when more inputs than this are rejected.")
    flags.DEFINE_enum("fit", "pad", list(imaging.FITS),
                      "pad (default: keep the whole film, black borders) or crop to a square.")
    flags.DEFINE_string("labels", None, "dicom_dir: CSV of CheXpert-named label columns keyed "
                        "by file name or SOPInstanceUID.")
    flags.DEFINE_integer("num", None, "phantom: number of studies; real sources: optional limit.")
    flags.DEFINE_integer("seed", 0, "Phantom seed.")
    flags.DEFINE_integer("shards", None, "ArrayRecord shards per split (default: one per "
                         f"{DEFAULT_SHARD_SIZE} images).")
    flags.DEFINE_integer("shard_size", DEFAULT_SHARD_SIZE,
                         "Images per shard when --shards is not given.")
    flags.DEFINE_string("salt", DEFAULT_SALT, "Secret salt for hashing patient/study ids.")
    flags.DEFINE_string("name", "cxr", "TFDS dataset name (file prefix).")
    define_output_flags("convert", "of the plan", "A conversion")
    # The other numbers are checked by convert() itself (_check_args), for library callers too.
    cli.check_number("seed", 0)


def _parse_shard_range(text: str | None) -> tuple[int, int] | None:
    """``--shard_range A:B`` as (A, B); None when not given (also for ``encode``)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"--shard_range must be A:B (two non-negative ints); got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _shard_range_done(verb: str, stats: dict[str, Any], output: str) -> str:
    """The line a ``--shard_range`` run prints (also for ``encode``)."""
    a, b = stats["shard_range"]
    return (f"{verb} shards {a}:{b} of {stats['shards']} into {Path(output).absolute() / WORK}; "
            f"{stats['pending']} shards still to do"
            + ("; run with --publish" if not stats["pending"] else ""))


def main(argv: list[str]) -> int:
    """Convert and print the label marginals. Bad arguments, input or output (UsageError) exit
    2 and too many rejects (TooManyRejects, after its table) 1, through ``cli.run``."""
    from absl import flags
    f = flags.FLAGS
    cli.no_arguments(argv)
    cli.require("source", "output", "resolution")
    opts = SourceOptions(input_dir=f.input, num=f.num, resolution=f.resolution, seed=f.seed,
                         salt=f.salt, labels_csv=f.labels)
    shard_range = _parse_shard_range(f.shard_range)
    try:
        stats = convert(f.source, f.output, opts, shards=f.shards, shard_size=f.shard_size,
                        workers=f.workers, fit=f.fit, max_reject_fraction=f.max_reject_fraction,
                        name=f.name, overwrite=f.overwrite, progress=not f["no-progress"].value,
                        shard_range=shard_range, publish_only=f.publish)
    except TooManyRejects as e:
        print(format_stats(e.stats))   # what was rejected; the error line says why it stops
        raise
    if shard_range is not None:
        print(_shard_range_done("converted", stats, f.output))
        return 0
    print(format_stats(stats))
    print(f"wrote {stats['total']['count']} examples to {Path(f.output).absolute()}; rejected "
          f"and excluded inputs are listed in {rejects_log(f.output)} (raw paths: keep it "
          "with the raw data, not with the dataset)")
    if f.salt == DEFAULT_SALT and f.source != "phantom":
        print("note: ids were hashed with the public default salt; pass --salt SECRET for "
              "data that leaves your site")
    return 0


if __name__ == "__main__":
    cli.run(main, _define_flags)
