"""Cache autoencoder latents of a converted dataset: the input of latent-mode MMDiT training.

    python -m cxr_rf.data.encode --autoencoder AE_RUN --input DATA_DIR --output OUT_DIR \\
        [--batch_size 32] [--step S] [--dtype float16|float32] [--nokeep_pixels] [--overwrite]
    ... --shard_range A:B   (on each machine, disjoint ranges)   then   ... --publish   (once)

Every record of every split of the converted (pixel) dataset ``DATA_DIR`` is written to
``OUT_DIR`` with the same fields (metadata byte for byte, and the 16-bit PNG unless
``--nokeep_pixels``) plus ``latent``: the autoencoder's posterior MEAN of the image (not a
sample: cached samples would put the posterior's variance under the diffusion loss as an
irreducible floor), normalised with the run's ``latent_stats`` (so ~N(0, 1) per channel), as a
float tensor [h, w, Z] (h = w = resolution / factor, Z packed channels), float16 by default
(half the bytes; relative rounding 2^-11, far below what the MMDiT resolves). The schema is
``schema.latent_features``; training reads it with ``data.latents=True``.

Layout and resumption follow ``convert``: one output shard per input shard (same split, same
order, same TFDS names), each written under ``OUT/.work/`` and renamed when complete, marked
done by a JSON; a rerun checks a fingerprint of (input files, autoencoder fingerprint, step,
dtype, pixels) and redoes only unfinished shards, so an interrupted run resumes into the
dataset an uninterrupted one writes. ``stats.json`` is the input's with a ``latent`` section:
the autoencoder run (absolute path), step, config, a SHA-256 fingerprint of its parameters and
latent statistics, the factor, the latent shape and dtype, the input dataset and the resolution
the autoencoder was trained at (encoding another resolution is fine, it is convolutional, and
is noted). ``dataset_info.json`` (written last) carries the same section in its metadata.

Encoding runs in batches of ``--batch_size`` (rounded up to a multiple of the local devices;
the last batch is padded by repetition, so there is one compiled program), data-parallel over
the local devices (parameters replicated, the batch split).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cxr_rf import cli, errors
from cxr_rf.data import convert, imaging, schema
from cxr_rf.data.convert import UsageError
from cxr_rf.data.stats import format_stats
from cxr_rf.data.writer import INFO_FILES, VERSION, publish_split, shard_writer

__all__ = ["encoder", "fingerprint", "encode", "main"]

WORK = convert.WORK
DEFAULT_BATCH = 32


def _shard_done(name: str) -> None:
    """Called after each finished shard; tests replace it to interrupt an encoding."""


# ---------------------------------------------------------------- the autoencoder

def fingerprint(variables: Any) -> str:
    """SHA-256 (hex) over every array of an autoencoder's variables (``params`` and
    ``latent_stats``): path, dtype, shape and bytes, in sorted path order."""
    import jax
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(variables))
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def latest_step(run: str | os.PathLike) -> int:
    """The newest checkpoint step of a run directory (what ``load_autoencoder`` reads)."""
    from etils import epath
    ckpts = epath.Path(run) / "checkpoints"
    steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
    if not steps:
        raise errors.UserError(f"{run} has no autoencoder checkpoints yet; train first")
    return max(steps)


def load(run: str | os.PathLike, step: int | None = None):
    """(AEConfig, variables, step, record) of an autoencoder run: ``record`` is what a latent
    dataset stores about it (absolute run path, step, config, fingerprint, the resolution it
    was trained at). Bad paths are one-line UserErrors (``load_autoencoder``)."""
    from cxr_rf.autoencoder import train as ae_train
    if not str(run):
        raise errors.UserError("no autoencoder run given (--autoencoder / data.autoencoder)")
    run_path = os.path.abspath(os.fspath(run)) if "://" not in str(run) else str(run)
    ae_cfg, variables = ae_train.load_autoencoder(run_path, step)
    step = int(step) if step else latest_step(run_path)
    train_cfg = ae_train.read_config(run_path)
    record = {"run": run_path, "step": step, "config": dataclasses.asdict(ae_cfg),
              "fingerprint": fingerprint(variables),
              "trained_resolution": int(train_cfg.data.resolution)}
    return ae_cfg, variables, step, record


def encoder(ae_cfg, variables, devices: Sequence | None = None
            ) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
    """(fn, n_devices): ``fn(x)`` maps images float32 [B, H, W, 1] in [-1, 1] (B a multiple
    of n_devices) to normalised posterior means float32 [B, h, w, Z], data-parallel over
    ``devices`` (default: the local ones)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from cxr_rf.autoencoder.model import Autoencoder
    devices = list(devices or jax.local_devices())
    mesh = Mesh(np.array(devices), ("data",))
    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    model = Autoencoder(ae_cfg)

    def run(v, x):
        mean, _ = model.apply(v, x, method=Autoencoder.encode)
        return model.apply(v, mean, method=Autoencoder.normalize)

    fn = jax.jit(run, in_shardings=(rep, rows), out_shardings=rows)
    placed = jax.device_put(variables, rep)
    return (lambda x: np.asarray(jax.device_get(fn(placed, jax.device_put(x, rows))))), len(devices)


# ---------------------------------------------------------------- the input dataset

@dataclasses.dataclass(frozen=True)
class _Unit:
    index: int
    split: str
    path: str
    records: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"


def _open_input(input_dir: str):
    """(units in split order, the input's stats.json, its resolution)."""
    import tensorflow_datasets as tfds
    path = schema.filesystem_path(input_dir, "input")
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
        raise UsageError(f"no converted dataset at {path} (dataset_info.json missing); run "
                         "python -m cxr_rf.data.convert first")
    if schema.latent_info(path) is not None:
        raise UsageError(f"{path} is already a latent dataset; encode the pixel dataset it was "
                         "made from")
    try:
        stats = json.loads(Path(path, "stats.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}/stats.json is missing or unreadable: {e}".replace("\n", " ")) from None
    info = tfds.builder_from_directory(path).info
    order = [s for s in stats.get("splits", {}) if s in info.splits]
    order += sorted(set(info.splits) - set(order))
    units, i = [], 0
    for split in order:
        si = info.splits[split]
        for p, n in zip(si.filepaths, si.shard_lengths):
            units.append(_Unit(i, split, os.fspath(p), int(n)))
            i += 1
    return units, stats, int(stats.get("resolution") or info.metadata["resolution"])


def _input_digest(input_dir: str, units: list[_Unit]) -> str:
    h = hashlib.sha256(Path(input_dir, "dataset_info.json").read_bytes())
    for u in units:
        h.update(f"{os.path.basename(u.path)}|{u.records}|{os.path.getsize(u.path)}".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- encoding

def encode(input_dir: str | os.PathLike, out_dir: str | os.PathLike,
           autoencoder: str | os.PathLike, *, step: int | None = None,
           batch_size: int = DEFAULT_BATCH, dtype: str = "float16", keep_pixels: bool = True,
           overwrite: bool = False, progress: bool = False,
           shard_range: tuple[int, int] | None = None, publish_only: bool = False,
           devices: Sequence | None = None) -> dict[str, Any]:
    """Encode the dataset at ``input_dir`` into a latent dataset at ``out_dir`` (resuming
    unfinished work); returns the output's stats (with its ``latent`` section).

    ``shard_range``/``publish_only`` as in ``convert.convert`` (then the return value is
    ``{"shard_range", "shards", "pending"}`` resp. the stats). UsageError for bad arguments,
    input, output or autoencoder, before anything is written.
    """
    if dtype not in schema.LATENT_DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(schema.LATENT_DTYPES)}; got {dtype!r}")
    if not (isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool)
            and batch_size > 0):
        raise UsageError(f"batch_size must be a positive int; got {batch_size}")
    if shard_range is not None and publish_only:
        raise UsageError("pass either --shard_range or --publish, not both")
    if (shard_range is not None or publish_only) and overwrite:
        raise UsageError("--overwrite cannot be combined with --shard_range or --publish "
                         "(other processes' shards would be deleted)")
    try:
        in_path = os.path.abspath(schema.filesystem_path(input_dir, "input"))
        out = Path(schema.filesystem_path(out_dir, "output")).absolute()
    except errors.UserError as e:
        raise UsageError(str(e)) from None
    if out == Path(in_path):
        raise UsageError("--output must differ from --input")
    units, in_stats, resolution = _open_input(in_path)
    if shard_range is not None and not 0 <= shard_range[0] < shard_range[1]:
        raise UsageError(f"shard_range must be A:B with 0 <= A < B; got {shard_range}")
    if shard_range is not None and shard_range[0] >= len(units):
        raise UsageError(f"shard_range {shard_range[0]}:{shard_range[1]} starts past the "
                         f"input's {len(units)} shards")
    ae_cfg, variables, step, record = load(autoencoder, step)
    shape = ae_cfg.latent_shape(resolution, resolution)     # UserError: not a multiple
    factor = ae_cfg.factor
    latent = {"autoencoder": record, "factor": factor, "shape": list(shape), "dtype": dtype,
              "pixels": bool(keep_pixels), "resolution": resolution, "input": in_path,
              "normalized": True, "posterior": "mean", "version": VERSION}
    if record["trained_resolution"] != resolution:
        latent["note"] = (f"the autoencoder was trained at {record['trained_resolution']}px; "
                          f"this dataset is {resolution}px")
    plan_fp = hashlib.sha256(json.dumps(
        {"input": _input_digest(in_path, units), "ae": record["fingerprint"], "step": step,
         "dtype": dtype, "pixels": bool(keep_pixels), "version": VERSION},
        sort_keys=True).encode()).hexdigest()

    state = convert._output_state(out, overwrite)
    convert._check_distributed(out, state, shard_range, publish_only, kind="encoding")
    work = convert._prepare_work(out, state, plan_fp, [u.name for u in units],
                                 overwrite=overwrite,
                                 distributed=shard_range is not None or publish_only,
                                 kind="encoding", of="input, autoencoder or settings")
    done = lambda u: (work / f"{u.name}.json").exists() and (  # noqa: E731
        work / f"{u.name}.array_record").exists()
    if publish_only:
        missing = [u.index for u in units if not done(u)]
        if missing:
            raise errors.RunError(f"{len(missing)} of {len(units)} shards are not encoded yet "
                                  f"(first: shard {missing[0]}); finish their --shard_range "
                                  "runs, then publish")
    lo, hi = shard_range if shard_range is not None else (0, len(units))
    pending = [u for u in units[lo:hi] if not done(u)]
    feats = schema.latent_features(shape, dtype, pixels=keep_pixels)
    if pending:
        fn, ndev = encoder(ae_cfg, variables, devices)
        bs = -(-int(batch_size) // ndev) * ndev
        from tqdm import tqdm
        total = sum(u.records for u in units[lo:hi])
        with tqdm(total=total, initial=total - sum(u.records for u in pending), unit="img",
                  desc="encode", file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
            for u in pending:
                _encode_unit(u, work, fn, bs, feats, dtype, keep_pixels, bar)
                _shard_done(u.name)
    if shard_range is not None:
        return {"shard_range": [lo, min(hi, len(units))], "shards": len(units),
                "pending": sum(not done(u) for u in units)}
    return _finish(units, out, in_stats, latent, feats)


def _encode_unit(u: _Unit, work: Path, fn, bs: int, feats, dtype: str, keep_pixels: bool,
                 bar) -> None:
    from array_record.python import array_record_module
    from cxr_rf.data import pipeline
    in_feats = schema.features()
    reader = array_record_module.ArrayRecordReader(u.path)
    tmp = work / f"{u.name}.array_record.tmp"
    w = None
    try:
        count = reader.num_records()
        if count != u.records:
            raise errors.RunError(f"input shard {u.path} holds {count} records, its "
                                  f"dataset_info says {u.records}")
        w = shard_writer(tmp)
        for start in range(0, count, bs):               # one batch in memory at a time
            fields = [schema.from_example(in_feats.deserialize_example_np(b), decode=False)
                      for b in reader.read(start, min(start + bs, count))]
            x = np.stack([pipeline.to_model_range(imaging.decode_png(f["image_png"]))
                          for f in fields])
            n = len(x)
            if n < bs:                          # pad by repetition: one program shape
                x = np.concatenate([x, np.repeat(x[-1:], bs - n, axis=0)])
            z = fn(x)[:n].astype(dtype)
            for f, zi in zip(fields, z):
                ex = {k: v for k, v in f.items() if keep_pixels or k != "image_png"}
                ex[schema.LATENT] = zi
                w.write(schema.serialize(feats, ex))
            bar.update(n)
    finally:
        reader.close()
        if w is not None:
            w.close()
    os.replace(tmp, work / f"{u.name}.array_record")
    convert._write_atomic(work / f"{u.name}.json", json.dumps({"records": count}))


def _finish(units: list[_Unit], out: Path, in_stats: dict, latent: dict, feats) -> dict:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import dataset_info as tfds_info
    work = out / WORK
    name = str(in_stats.get("name") or "cxr")
    per_split: dict[str, list[_Unit]] = {}
    for u in units:
        per_split.setdefault(u.split, []).append(u)
    infos = [publish_split(out, name, split, [(work / f"{u.name}.array_record", u.records)
                                              for u in us])
             for split, us in per_split.items()]
    stats = {**in_stats, schema.LATENT: latent}
    convert._write_atomic(out / "stats.json", json.dumps(stats, indent=1))
    convert._write_atomic(out / "stats.txt", format_stats(in_stats) + "\n"
                          + f"latent: {latent['shape']} {latent['dtype']}, factor "
                            f"{latent['factor']}, autoencoder {latent['autoencoder']['run']} "
                            f"step {latent['autoencoder']['step']}\n")
    meta = work / "meta"
    shutil.rmtree(meta, ignore_errors=True)
    meta.mkdir()
    info = tfds.core.DatasetInfo(
        builder=tfds_info.DatasetIdentity(
            name=name, version=tfds.core.Version(VERSION), data_dir=str(meta),
            module_name="cxr_rf.data.encode"),
        description=f"cxr_rf latent dataset: {latent['input']} encoded by "
                    f"{latent['autoencoder']['run']} (step {latent['autoencoder']['step']})",
        features=feats,
        metadata=tfds.core.MetadataDict(resolution=int(latent["resolution"]),
                                        latent=json.loads(json.dumps(latent))),
        split_dict=tfds.core.SplitDict(list(infos)))
    info.set_file_format("array_record")
    info.write_to_directory(meta)
    for f in INFO_FILES:            # dataset_info.json last: its presence means "complete"
        os.replace(meta / f, out / f)
    shutil.rmtree(work)
    return stats


# ---------------------------------------------------------------- CLI

def _define_flags() -> None:
    from absl import flags
    flags.DEFINE_string("autoencoder", None, "Autoencoder run directory (python -m cxr_rf.train "
                        "--config experiments/ae_*.py).")
    flags.DEFINE_string("input", None, "Converted (pixel) dataset directory.")
    flags.DEFINE_string("output", None, "Output directory (created; must be empty).")
    flags.DEFINE_integer("batch_size", DEFAULT_BATCH, "Images per encoder batch (rounded up to "
                         "a multiple of the local devices).")
    flags.DEFINE_integer("step", None, "Autoencoder checkpoint step (default: newest).")
    flags.DEFINE_enum("dtype", "float16", list(schema.LATENT_DTYPES), "Stored latent dtype.")
    flags.DEFINE_boolean("keep_pixels", True, "Keep each record's PNG (evaluate, inspect and "
                         "privacy then read the latent dataset like a pixel one).")
    convert.define_output_flags("encode", "(of all splits, in order)", "An encoding")
    cli.check_number("batch_size", 1)
    cli.check_number("step", 1)


def main(argv: list[str]) -> int:
    from absl import flags
    f = flags.FLAGS
    cli.no_arguments(argv)
    cli.require("autoencoder", "input", "output")
    shard_range = convert._parse_shard_range(f.shard_range)
    stats = encode(f.input, f.output, f.autoencoder, step=f.step, batch_size=f.batch_size,
                   dtype=f.dtype, keep_pixels=f.keep_pixels, overwrite=f.overwrite,
                   progress=not f["no-progress"].value, shard_range=shard_range,
                   publish_only=f.publish)
    if shard_range is not None:
        print(convert._shard_range_done("encoded", stats, f.output))
        return 0
    lat = stats[schema.LATENT]
    print(f"wrote {stats['total']['count']} latents {lat['shape']} ({lat['dtype']}, factor "
          f"{lat['factor']}) to {Path(f.output).absolute()} with the autoencoder "
          f"{lat['autoencoder']['run']} step {lat['autoencoder']['step']}")
    if "note" in lat:
        print(f"note: {lat['note']}")
    return 0


if __name__ == "__main__":
    cli.run(main, _define_flags)
