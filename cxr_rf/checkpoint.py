"""Orbax checkpoints of the whole run: the TrainState and the Grain iterator, saved together.

Restore rules: a workdir with no checkpoint starts fresh; a workdir *with* checkpoints
either restores or stops the run with the reason. Nothing here ever swallows a failed
restore and silently trains from scratch. An unreadable latest checkpoint falls back to the
previous one with a loud warning naming both steps, and is moved aside (``<step>.unreadable``)
so later saves of that step number do not collide with it.

Orbax writes each checkpoint into a temporary directory and renames it on success, so an
interrupted (kill -9) save is never listed and never restored.

Corrupted contents (bit rot, a bad copy between buckets) decode without error, so each
checkpoint also holds fingerprints of what was saved (``fingerprint``, a JSON item committed
with the state): two 32-bit words per array, computed on device, and a hash of each process's
data-iterator state. A restore recomputes them and treats any mismatch as unreadable.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax import lax

from cxr_rf import errors

STATE, DATA, FINGERPRINT = "state", "data", "fingerprint"
ITEMS = (STATE, DATA, FINGERPRINT)
FINGERPRINT_FORMAT = "cxr_rf.fingerprint.v1"


class RestoreError(errors.RunError):
    """A checkpoint exists but could not be restored."""


class NoSuchStep(RestoreError, errors.UserError):
    """The step asked for has no checkpoint: bad input (exit status 2), and a RestoreError
    for the callers that catch that."""
    exit_code = errors.EXIT_USAGE


def absolute(directory: str | epath.Path) -> epath.Path:
    """Orbax needs absolute paths; local relative ones are resolved, URLs (gs://) kept."""
    path = epath.Path(directory)
    return path if "://" in str(directory) else epath.Path(os.path.abspath(str(path)))


def manager(directory: str | epath.Path, *, keep: int = 3, keep_period: int = 0,
            save_interval: int = 1, async_save: bool = True) -> ocp.CheckpointManager:
    """A manager for (state, data-iterator) checkpoints under ``directory``: keeps the last
    ``keep`` plus every ``keep_period``-th step (0 = none)."""
    directory = absolute(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period or None, save_interval_steps=save_interval,
        create=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


# --------------------------------------------------------------------------------------------
# Fingerprints.
#
# Per array, two words: the sums mod 2**32 over its elements of fmix(u_i) and fmix(u_i ^ K),
# where u_i = w_i ^ (i * G mod 2**32), w_i is the element's bits as a uint32 word (narrower
# types zero-extended, 64-bit ones split in two), i its row-major position in the *global*
# array, G odd and K a constant. For a fixed i both terms are bijections of w_i, so changing
# any one element (one flipped bit or many) changes both words for certain; changes to
# several elements go unnoticed with probability ~2**-64. Each term depends only on the
# element's bits and global position, and integer addition mod 2**32 is exact, associative
# and commutative: the words are the same for any sharding, device count or reduction order.
# --------------------------------------------------------------------------------------------

_G, _K = 0x9E3779B1, 0x7F4A7C15    # odd multiplier of the position; the second word's key


def _fmix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 in which every input bit affects
    every output bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """``x``'s bits as uint32 words, without any value conversion."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 4 or size == 8:                 # 8 bytes: a trailing axis of two words
        return lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        return lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
    raise TypeError(f"no fingerprint for dtype {x.dtype}")


def _array_fingerprint(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    w = _words(x)
    # i * G from per-axis iotas: a reshape to 1-D could move a sharded array between devices;
    # iotas are partitioned with their global offsets.
    position, stride = jnp.uint32(0), _G
    for axis in reversed(range(w.ndim)):
        position = position + lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride)
        stride = stride * w.shape[axis] % 2**32
    mixed = w ^ position
    return (jnp.sum(_fmix(mixed), dtype=jnp.uint32),
            jnp.sum(_fmix(mixed ^ jnp.uint32(_K)), dtype=jnp.uint32))


@jax.jit
def _fingerprints_on_device(leaves: list) -> list:
    # One program for the whole tree. (One per array deadlocks XLA's CPU backend with several
    # devices: many small programs with collectives in flight at once.) Only scalars come
    # back; rank-0 results are replicated, so every process can read them.
    return [_array_fingerprint(x) for x in leaves]


def fingerprints(tree: Any) -> dict[str, str]:
    """{array path: 16 hex digits} of every array in ``tree``, computed on its devices (one
    reduction pass; only the words reach the host). The same for any sharding of the tree."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    words = jax.device_get(_fingerprints_on_device([x for _, x in flat]))
    return {jax.tree_util.keystr(p, simple=True, separator="/"): f"{int(a):08x}{int(b):08x}"
            for (p, _), (a, b) in zip(flat, words, strict=True)}


def _iterator_digest(data_iter) -> str:
    """A hash of the iterator's state (its position in the data), the value Grain saves."""
    state = data_iter.get_state()
    raw = state if isinstance(state, bytes) else json.dumps(state, sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def _iterator_digests(data_iter) -> list[str]:
    """Every process's ``_iterator_digest`` (each process saves its own iterator file)."""
    mine = _iterator_digest(data_iter)
    if jax.process_count() == 1:
        return [mine]
    from jax.experimental import multihost_utils
    words = np.frombuffer(bytes.fromhex(mine), np.uint32)
    every = np.asarray(multihost_utils.process_allgather(words))
    return [r.astype(np.uint32).tobytes().hex() for r in every.reshape(-1, words.size)]


def save(mngr: ocp.CheckpointManager, step: int, state: Any,
         data_iter: grain.DataLoaderIterator | None, *, force: bool = False) -> bool:
    """Save state (+ iterator, + their fingerprints) at ``step``; returns whether a save was
    started."""
    if not force and not mngr.should_save(step):
        return False                # skipped by the manager: no fingerprints to compute
    prints = {"format": FINGERPRINT_FORMAT, "arrays": fingerprints(state),
              "data": _iterator_digests(data_iter) if data_iter is not None else None}
    args = {STATE: ocp.args.StandardSave(state), FINGERPRINT: ocp.args.JsonSave(prints)}
    if data_iter is not None:
        args[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing ``tree``, the restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)


def restore(mngr: ocp.CheckpointManager, abstract_state: Any,
            data_iter: grain.DataLoaderIterator | None, step: int | None = None) -> tuple[int, Any]:
    """Restore ``step`` (default latest) into the layout of ``abstract_state``.

    ``data_iter`` (if given) is advanced in place to the saved position. The restored arrays
    and iterator are checked against the fingerprints saved with them (``verify``). Raises
    RestoreError naming the step and the cause when anything fails or does not match.
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise RestoreError(f"no checkpoint in {mngr.directory}")
    if step not in mngr.all_steps():
        raise NoSuchStep(
            f"no checkpoint for step {step} in {mngr.directory}; have {sorted(mngr.all_steps())}")
    args = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        args[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    # Checkpoints written before fingerprints existed have no such item: restored unverified.
    verified = (epath.Path(mngr.directory) / str(step) / FINGERPRINT).exists()
    if verified:
        args[FINGERPRINT] = ocp.args.JsonRestore()
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # re-raised with context: never fall back to a fresh start
        raise RestoreError(f"restoring step {step} from {mngr.directory} failed: "
                           f"{type(e).__name__}: {e}") from e
    if verified:
        verify(restored[STATE], data_iter, restored[FINGERPRINT],
               f"step {step} in {mngr.directory}")
        logging.info("restored step %d from %s (fingerprints match)", step, mngr.directory)
    else:
        logging.warning("checkpoint at step %d in %s has no fingerprints (written before they "
                        "existed): restored without verifying its contents", step, mngr.directory)
    return step, restored[STATE]


def verify(state: Any, data_iter, saved: dict, where: str) -> None:
    """Raise RestoreError naming the first array (or the data iterator) of ``state`` whose
    fingerprint differs from ``saved``."""
    fmt = saved.get("format") if isinstance(saved, dict) else None
    if fmt != FINGERPRINT_FORMAT or not isinstance(saved.get("arrays"), dict):
        raise RestoreError(f"{where}: unrecognised fingerprint record (format {fmt!r})")
    want, got = saved["arrays"], fingerprints(state)
    for path, value in got.items():
        if path not in want:
            raise RestoreError(f"{where}: array {path} has no saved fingerprint")
        if want[path] != value:
            raise RestoreError(f"{where}: array {path} does not match its fingerprint "
                               "(contents corrupted)")
    if missing := sorted(set(want) - set(got)):
        raise RestoreError(f"{where}: saved array {missing[0]} is not in the restored state")
    if data_iter is not None and saved.get("data") is not None:
        digests, i = saved["data"], jax.process_index()
        ok = np.array([i < len(digests) and digests[i] == _iterator_digest(data_iter)])
        if jax.process_count() > 1:
            # Each process checks its own iterator file; all must reach the same verdict, or
            # one would fall back to an older step while the others go on.
            from jax.experimental import multihost_utils
            ok = np.asarray(multihost_utils.process_allgather(ok)).reshape(-1)
        if not ok.all():
            raise RestoreError(f"{where}: data iterator state of process "
                               f"{int(np.argmin(ok))} does not match its fingerprint "
                               "(contents corrupted)")


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any,
                   data_iter: grain.DataLoaderIterator | None,
                   iter_for_step: Callable[[int], grain.DataLoaderIterator] | None = None,
                   ) -> tuple[int, Any]:
    """Restore the newest readable checkpoint, newest first.

    The data iterator restored into is ``data_iter``, or ``iter_for_step(step)`` for the step
    tried (runs whose stages read different datasets/resolutions).

    Each unreadable one is reported with a loud warning naming it and the step tried next,
    then moved aside. Raises RestoreError (with every cause) when none is readable.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise RestoreError(f"no checkpoint in {mngr.directory}")
    failures = []
    for i, step in enumerate(steps):
        try:
            it = iter_for_step(step) if iter_for_step else data_iter
            restored = restore(mngr, abstract_state, it, step)
        except RestoreError as e:
            failures.append(str(e))
            nxt = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "none left"
            logging.warning("!!! CHECKPOINT AT STEP %d IS UNREADABLE; %s !!! (%s)", step, nxt, e)
            continue
        if failures:
            set_aside(mngr, steps[:i])
        return restored
    raise RestoreError(f"no readable checkpoint in {mngr.directory} (steps {steps}): "
                       + " | ".join(failures))


def set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
    """Rename unreadable step directories to ``<step>.unreadable`` (kept for inspection)."""
    if jax.process_index() == 0:
        for step in steps:
            path = epath.Path(mngr.directory) / str(step)
            if path.exists():
                dst, n = path.parent / f"{step}.unreadable", 0
                while dst.exists():  # an earlier unreadable copy of the same step
                    n += 1
                    dst = path.parent / f"{step}.unreadable.{n}"
                path.rename(dst)
                logging.warning("moved unreadable checkpoint %s aside to %s", path, dst)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("cxr_rf_ckpt_set_aside")
    mngr.reload()


class StopRequest:
    """SIGTERM (or JAX's preemption notice) -> save at the next step boundary and stop.

    With one process a Python SIGTERM handler sets a flag. With several, the decision must be
    the same on every process at the same step, so it comes from JAX's preemption sync
    service through ``mngr.reached_preemption`` (which handles SIGTERM itself).
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: checkpointing at the next step boundary, then exiting")
        self.requested = True

    def __call__(self, mngr: ocp.CheckpointManager, step: int) -> bool:
        """Whether to save and stop after ``step``."""
        return self.requested or mngr.reached_preemption(step)

    def close(self) -> None:
        """Put the previous SIGTERM handler back."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def restore_params(directory: str | epath.Path, abstract_state: Any,
                   step: int | None = None) -> tuple[int, Any]:
    """Restore only the train state (no data iterator)."""
    mngr = ocp.CheckpointManager(absolute(directory), item_names=ITEMS,
                                 options=ocp.CheckpointManagerOptions(create=False))
    try:
        return restore(mngr, abstract_state, None, step)
    finally:
        mngr.close()


def restore_field(directory: str | epath.Path, field: str, abstract_field: Any,
                  step: int | None = None) -> tuple[int, Any]:
    """Restore one field of the saved TrainState (``ema_params`` for sampling) and nothing
    else: Orbax's partial restore reads only that field's arrays, so sampling a cxr_8b run
    reads its 32 GB of EMA weights, not the 128 GB with the parameters and Adam moments,
    straight into the layout of ``abstract_field`` (its shardings). Checked against the
    saved fingerprints of that field; RestoreError names the step and the cause."""
    mngr = ocp.CheckpointManager(absolute(directory), item_names=ITEMS,
                                 options=ocp.CheckpointManagerOptions(create=False))
    try:
        steps = mngr.all_steps()
        step = mngr.latest_step() if step is None else step
    finally:
        mngr.close()
    if step is None:
        raise RestoreError(f"no checkpoint in {directory}")
    if step not in steps:
        raise NoSuchStep(f"no checkpoint for step {step} in {directory}; have {sorted(steps)}")
    where = f"step {step} in {absolute(directory)}"
    path = absolute(directory) / str(step)
    target = {field: abstract_field}
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
        target)
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(path / STATE, args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True))
    except Exception as e:  # re-raised with context
        raise RestoreError(f"restoring {field} of {where} failed: {type(e).__name__}: {e}") from e
    prints = path / FINGERPRINT
    if prints.exists():
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as json_ckptr:
            saved = json_ckptr.restore(prints)
        if isinstance(saved, dict) and isinstance(saved.get("arrays"), dict):
            # This field's fingerprints only (verify checks the record's format).
            saved = {**saved, "arrays": {k: v for k, v in saved["arrays"].items()
                                         if k.split("/")[0] == field}}
        verify(restored, None, saved, where)
    else:
        logging.warning("checkpoint at %s has no fingerprints: %s restored unverified", where, field)
    return step, restored[field]
