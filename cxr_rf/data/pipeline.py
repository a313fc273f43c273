"""Grain input pipeline: converted TFDS ArrayRecord dataset -> per-process training batches.

    source (tfds.builder_from_directory(dir).as_data_source(split), random access)
      -> IndexSampler (shard by JAX process, seeded shuffle per epoch, epochs)
      -> decode (PNG -> uint16 -> float32 [-1, 1], [R, R, 1]; condition tokens)
      -> CFG dropout (RandomMap: per-record rng from the sampler, so deterministic)
      -> Batch(global_batch // process_count)

Batches: {"image": float32 [b, R, R, 1], "tokens": int32 [b, L], "findings": int8 [b, 14]}.

Checkpointing the position in the stream: ``it = iter(loader)`` is a
``grain.DataLoaderIterator``; ``it.get_state()`` (bytes) / ``it.set_state(state)`` capture and
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
from typing import Any, Mapping

import grain
from absl import flags as absl_flags
import numpy as np
import tensorflow_datasets as tfds

from cxr_rf import conditioning as cond
from cxr_rf.data import schema


def open_source(data_dir: str, split: str):
    """Random-access source of decoded TFDS examples for ``split`` of a converted dataset."""
    if not os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
        raise FileNotFoundError(f"no converted dataset at {data_dir!r} (dataset_info.json missing); "
                                f"run python -m cxr_rf.data.convert first")
    builder = tfds.builder_from_directory(data_dir)
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} not in dataset {data_dir!r}; "
                         f"available: {', '.join(builder.info.splits)}")
    return builder.as_data_source(split)


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
            raise ValueError(f"stored image is {h}x{w}, not square; re-convert the dataset")
        if h != self.resolution:
            image = schema.resize_image(image, self.resolution)
        x = image.astype(np.float32) * np.float32(2.0 / 65535.0) - np.float32(1.0)
        tokens = cond.encode(ex["findings"], ex["sex"], ex["age"], ex["race"], ex["view"],
                             ex["source"], ex["report"], self.report_len)
        return {"image": x[..., None], "tokens": tokens, "findings": ex["findings"]}


class CondDropout(grain.transforms.RandomMap):
    """Classifier-free-guidance dropout: each group replaced by its null tokens independently."""

    def __init__(self, probs: Mapping[str, float]):
        self.probs = {g: float(p) for g, p in probs.items() if p > 0}

    def random_map(self, element: dict[str, np.ndarray], rng: np.random.Generator):
        return {**element, "tokens": cond.dropout(element["tokens"], rng, self.probs)}


def _check_dropout(cond_dropout: Mapping[str, float] | None) -> dict[str, float]:
    probs = dict(cond_dropout or {})
    for g, p in probs.items():
        if g not in cond.GROUPS:
            raise ValueError(f"cond_dropout: unknown group {g!r}; valid: {', '.join(cond.GROUPS)}")
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"cond_dropout[{g!r}] must be a probability in [0, 1]; got {p}")
    return probs


def make_loader(data_dir: str, split: str, *, global_batch: int, seed: int, resolution: int,
                report_len: int = 0, cond_dropout: Mapping[str, float] | None = None,
                worker_count: int = 0, prefetch: int = 2, shuffle: bool = True,
                num_epochs: int | None = None, process_index: int | None = None,
                process_count: int | None = None,
                drop_remainder: bool = True) -> grain.DataLoader:
    """A Grain DataLoader yielding this process's slice of each global batch.

    Every process sees a disjoint 1/process_count of the examples (the remainder dropped so
    all processes take the same number of steps), reshuffled each epoch with ``seed``.
    ``num_epochs=None`` repeats forever. ``process_index``/``process_count`` default to JAX's.
    """
    if process_index is None or process_count is None:
        import jax  # only needed for the defaults; tests pass both explicitly
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, process_count); "
                         f"got {process_index} of {process_count}")
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(f"global_batch ({global_batch}) must be a positive multiple of "
                         f"process_count ({process_count})")
    if resolution <= 0:
        raise ValueError(f"resolution must be positive; got {resolution}")
    if not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2 ** 32):
        raise ValueError(f"seed must be an int in [0, 2**32) (Grain's limit); got {seed!r}")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None; got {num_epochs}")
    if worker_count < 0 or prefetch < 0:
        raise ValueError(f"worker_count and prefetch must be >= 0; got {worker_count}, {prefetch}")
    probs = _check_dropout(cond_dropout)
    if worker_count > 0 and not absl_flags.FLAGS.is_parsed():
        # Grain's worker processes read absl flags; a program that never ran absl.app (pytest,
        # an argparse CLI, a notebook) would crash there, so settle for the flag defaults.
        absl_flags.FLAGS.mark_as_parsed()

    source = open_source(data_dir, split)
    shard = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count,
                                        drop_remainder=True)
    if len(source) < process_count:
        raise ValueError(f"split {split!r} has {len(source)} examples, fewer than "
                         f"{process_count} processes")
    # The sampler and the loader take the same shard options: the loader asks for sampler
    # positions i*count + index, the sampler maps them into this process's slice of records.
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=shard, shuffle=shuffle, num_epochs=num_epochs,
        seed=int(seed))
    ops: list[Any] = [DecodeExample(resolution, report_len)]
    if any(p > 0 for p in probs.values()):
        ops.append(CondDropout(probs))
    ops.append(grain.transforms.Batch(global_batch // process_count, drop_remainder=drop_remainder))
    return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                            worker_count=worker_count, worker_buffer_size=prefetch,
                            shard_options=shard)
