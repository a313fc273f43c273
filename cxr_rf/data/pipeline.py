"""Grain input pipeline: converted TFDS ArrayRecord dataset -> per-process training batches.

    per source: tfds.builder_from_directory(dir).as_data_source(split)  (random access)
        -> shard by JAX process (strided) -> seeded shuffle, fresh each epoch -> repeat
    -> mix the sources by weight (deterministic interleave; one source = no mix)
    -> decode (PNG -> uint16 -> float32 [-1, 1], [R, R, 1]; condition tokens)
    -> CFG dropout: all groups at once, or each on its own (random_map with a seed:
       per-record rng, so deterministic)
    -> batch(global_batch // process_count) -> read ahead `prefetch` batches (threads)
    -> [mp_prefetch over worker processes]

Batches: {"image": float32 [b, R, R, 1], "tokens": int32 [b, L], "findings": int8 [b, 14]}.

Latent datasets (``python -m cxr_rf.data.encode``; ``make_loader(..., latent_shape=(h, w, Z))``)
skip the PNG: "image" is the stored normalised latent as float32 [b, h, w, Z]; a pixel dataset
given for a latent run, a latent one for a pixel run, or a latent of another shape is a
one-line UserError.

Checkpointing the position in the stream: ``it = iter(loader)`` is a
``grain.DatasetIterator``; ``it.get_state()`` (a dict) / ``it.set_state(state)`` capture and
restore it exactly. Inside an Orbax CheckpointManager, save it beside the train state::

    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                               data=grain.checkpoint.CheckpointRestore(it)))

(``grain.checkpoint.CheckpointHandler`` is registered for those args, so no handler needs to
be named; each JAX process writes ``process_{i}-of-{n}.json``.) Restoring needs a loader built
with the same arguments (dataset, seed, batch, process layout).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import grain
from absl import flags as absl_flags
import numpy as np
import tensorflow_datasets as tfds

from cxr_rf import errors
from cxr_rf import conditioning as cond
from cxr_rf.data import imaging, schema


def open_source(data_dir: str, split: str):
    """Random-access source of decoded TFDS examples for ``split`` of a converted dataset."""
    if not os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
        raise errors.UserError(f"no converted dataset at {data_dir!r} (dataset_info.json missing); "
                                f"run python -m cxr_rf.data.convert first")
    builder = tfds.builder_from_directory(data_dir)
    if split not in builder.info.splits:
        raise errors.UserError(f"split {split!r} not in dataset {data_dir!r}; "
                         f"available: {', '.join(builder.info.splits)}")
    return builder.as_data_source(split)


def to_model_range(image_u16: np.ndarray) -> np.ndarray:
    """uint16 [H, W] -> float32 [H, W, 1] in [-1, 1]: what the models (MMDiT, autoencoder) see."""
    x = image_u16.astype(np.float32) * np.float32(2.0 / 65535.0) - np.float32(1.0)
    return x[..., None]


def check_kind(data_dir: str, latent_shape: tuple[int, int, int] | None) -> None:
    """UserError (one line) unless ``data_dir`` holds pixels (``latent_shape`` None: a pixel
    dataset, or a latent one that kept them) or latents of exactly ``latent_shape``."""
    info = schema.latent_info(data_dir)
    if latent_shape is None:
        if info is not None and not info.get("pixels", True):
            raise errors.UserError(f"{data_dir} is a latent dataset without pixels; set "
                                   "data.latents=True to train on its latents")
        return
    if info is None:
        raise errors.UserError(f"{data_dir} is a pixel dataset, but data.latents=True: encode it "
                               "with python -m cxr_rf.data.encode and point data.dir there")
    stored, want = tuple(info["shape"]), tuple(int(v) for v in latent_shape)
    if stored[-1] != want[-1]:
        raise errors.UserError(f"{data_dir} holds {stored[-1]}-channel latents, but "
                               f"model.in_channels={want[-1]}")
    if stored != want:
        raise errors.UserError(f"{data_dir} holds latents of shape {list(stored)} "
                               f"({info.get('resolution')}px / factor {info.get('factor')}), but "
                               f"the run expects {list(want)} (data.resolution / "
                               "data.latent_factor, model.in_channels)")


class DecodeLatent(grain.transforms.Map):
    """Stored latent example -> {"image": float32 [h, w, Z] (the latent), "tokens", "findings"}."""

    def __init__(self, report_len: int = 0):
        self.report_len = report_len

    def map(self, element: Mapping[str, Any]) -> dict[str, np.ndarray]:
        ex = schema.from_example(element, decode=False)
        tokens = cond.encode(ex["findings"], ex["sex"], ex["age"], ex["race"], ex["view"],
                             ex["source"], ex["report"], self.report_len)
        return {"image": np.asarray(ex[schema.LATENT], np.float32), "tokens": tokens,
                "findings": ex["findings"]}


class DecodeExample(grain.transforms.Map):
    """Stored example -> {"image": float32 [R, R, 1] in [-1, 1], "tokens", "findings"}."""

    def __init__(self, resolution: int, report_len: int = 0):
        self.resolution = resolution
        self.report_len = report_len

    def map(self, element: Mapping[str, Any]) -> dict[str, np.ndarray]:
        ex = schema.from_example(element)
        image = ex["image"]
        h, w = image.shape
        if h != w:
            raise errors.UserError(f"stored image is {h}x{w}, not square; re-convert the dataset")
        if h != self.resolution:
            # A training stage at another resolution than the stored one: one Lanczos resample
            # of the whole square (pad and crop agree on squares), the converter's filter.
            # Pillow widens the kernel by the downscale factor, so a lower stage sees the
            # band-limited image a conversion at that resolution approximates, not the aliasing
            # of point or bilinear sampling; a higher stage interpolates.
            image = imaging.fit_square(image, self.resolution, "crop")
        tokens = cond.encode(ex["findings"], ex["sex"], ex["age"], ex["race"], ex["view"],
                             ex["source"], ex["report"], self.report_len)
        return {"image": to_model_range(image), "tokens": tokens, "findings": ex["findings"]}


class CondDropout(grain.transforms.RandomMap):
    """Classifier-free-guidance dropout (``conditioning.dropout``): every group at once with
    probability ``all``, and each group on its own with its probability."""

    def __init__(self, probs: Mapping[str, float]):
        self.probs = {g: float(p) for g, p in probs.items() if p > 0}

    def random_map(self, element: dict[str, np.ndarray], rng: np.random.Generator):
        return {**element, "tokens": cond.dropout(element["tokens"], rng, self.probs)}


def _check_dropout(cond_dropout: Mapping[str, float] | None) -> dict[str, float]:
    probs = dict(cond_dropout or {})
    for g, p in probs.items():
        if g not in cond.GROUPS + ("all",):
            raise errors.UserError(f"cond_dropout: unknown group {g!r}; valid: all (every group "
                                   f"at once), {', '.join(cond.GROUPS)}")
        if not 0.0 <= float(p) <= 1.0:
            raise errors.UserError(f"cond_dropout[{g!r}] must be a probability in [0, 1]; got {p}")
    return probs


def _source_dataset(data_dir: str, split: str, *, seed: int, shuffle: bool,
                    num_epochs: int | None, process_index: int, process_count: int
                    ) -> grain.MapDataset:
    """One converted dataset: this process's records, shuffled per epoch, repeated."""
    source = open_source(data_dir, split)
    if len(source) < process_count:
        raise errors.UserError(f"split {split!r} of {data_dir!r} has {len(source)} examples, fewer "
                         f"than {process_count} processes")
    # Shard first (strided, remainder dropped so every process takes the same number of
    # steps), then shuffle: each epoch is a fresh seeded permutation of this process's slice.
    usable = len(source) - len(source) % process_count
    ds = grain.MapDataset.source(source)[:usable][process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs)


def parse_mixture(data_dir: str | Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """A dataset directory, or (directory, weight) pairs, as normalised (dir, weight) pairs."""
    if isinstance(data_dir, (str, os.PathLike)):
        return [(schema.filesystem_path(data_dir, "dataset"), 1.0)]
    pairs = [(schema.filesystem_path(d, "dataset"), float(w)) for d, w in data_dir]
    if not pairs or any(w <= 0 for _, w in pairs):
        raise errors.UserError(f"a mixture needs one or more (dir, weight) pairs with weight > 0; "
                         f"got {list(data_dir)!r}")
    total = sum(w for _, w in pairs)
    return [(d, w / total) for d, w in pairs]


def make_loader(data_dir: str | Sequence[tuple[str, float]], split: str, *, global_batch: int,
                seed: int, resolution: int, report_len: int = 0,
                cond_dropout: Mapping[str, float] | None = None, worker_count: int = 0,
                prefetch: int = 2, shuffle: bool = True, num_epochs: int | None = None,
                process_index: int | None = None, process_count: int | None = None,
                drop_remainder: bool = True,
                latent_shape: tuple[int, int, int] | None = None) -> grain.IterDataset:
    """A Grain dataset yielding this process's slice of each global batch; ``iter()`` it.

    ``data_dir`` is one converted dataset or a mixture ``[(dir, weight), ...]``: each source is
    sharded and shuffled on its own, then interleaved deterministically in proportion to the
    weights. Every process sees a disjoint 1/process_count of each source, reshuffled every
    epoch with ``seed``; ``num_epochs=None`` repeats forever. The iterator's
    ``get_state``/``set_state`` (and Orbax via grain.checkpoint) resume it exactly.
    ``process_index``/``process_count`` default to JAX's. ``latent_shape`` (h, w, Z) reads
    latent datasets (every source must be one of that shape; ``resolution`` is then the
    pixel side they were encoded at, unused here).
    """
    if process_index is None or process_count is None:
        import jax  # only needed for the defaults; tests pass both explicitly
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise errors.UserError(f"process_index must be in [0, process_count); "
                         f"got {process_index} of {process_count}")
    if global_batch <= 0 or global_batch % process_count:
        raise errors.UserError(f"global_batch ({global_batch}) must be a positive multiple of "
                         f"process_count ({process_count})")
    if resolution <= 0:
        raise errors.UserError(f"resolution must be positive; got {resolution}")
    if not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2 ** 32):
        raise errors.UserError(f"seed must be an int in [0, 2**32) (Grain's limit); got {seed!r}")
    if num_epochs is not None and num_epochs <= 0:
        raise errors.UserError(f"num_epochs must be positive or None; got {num_epochs}")
    if worker_count < 0 or prefetch < 0:
        raise errors.UserError(f"worker_count and prefetch must be >= 0; got {worker_count}, {prefetch}")
    probs = _check_dropout(cond_dropout)
    mixture = parse_mixture(data_dir)
    if len(mixture) > 1 and num_epochs is not None:
        raise errors.UserError("a mixture is an endless stream: use num_epochs=None")
    if worker_count > 0 and not absl_flags.FLAGS.is_parsed():
        # Grain's worker processes read absl flags; a program that never ran absl.app (pytest,
        # an argparse CLI, a notebook) would crash there, so settle for the flag defaults.
        absl_flags.FLAGS.mark_as_parsed()

    for d, _ in mixture:
        check_kind(d, latent_shape)
    parts = [_source_dataset(d, split, seed=int(seed) + i, shuffle=shuffle,
                             num_epochs=num_epochs, process_index=process_index,
                             process_count=process_count) for i, (d, _) in enumerate(mixture)]
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [w for _, w in mixture])
    ds = ds.map(DecodeExample(resolution, report_len) if latent_shape is None
                else DecodeLatent(report_len))
    if any(p > 0 for p in probs.values()):
        ds = ds.random_map(CondDropout(probs), seed=int(seed))
    ds = ds.batch(global_batch // process_count, drop_remainder=drop_remainder)
    # Read ahead ``prefetch`` batches with as many threads (in each worker, or in this process
    # without workers). Grain's default (16 threads, 500 elements) counts elements after the
    # batch, so it buffered up to 500 batches: at 512² and batch 32, 16 GB per process, growing
    # while the train step consumes more slowly. The order, and so the batches and the
    # iterator state, do not depend on it.
    ahead = max(prefetch, 1)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=ahead, prefetch_buffer_size=ahead))
    if worker_count > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=max(prefetch, 1)))
    return it_ds
