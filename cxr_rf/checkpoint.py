"""Orbax checkpoints of the whole run: the TrainState and the Grain iterator, saved together.

Restore rules: a workdir with no checkpoint starts fresh; a workdir *with* checkpoints
either restores or stops the run with the reason. Nothing here ever swallows a failed
restore and silently trains from scratch. An unreadable latest checkpoint falls back to the
previous one with a loud warning naming both steps, and is moved aside (``<step>.unreadable``)
so later saves of that step number do not collide with it.

Orbax writes each checkpoint into a temporary directory and renames it on success, so an
interrupted (kill -9) save is never listed and never restored.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from cxr_rf import errors

STATE, DATA = "state", "data"


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
    return ocp.CheckpointManager(directory, options=options,
                                 item_names=(STATE, DATA))


def save(mngr: ocp.CheckpointManager, step: int, state: Any,
         data_iter: grain.DataLoaderIterator | None, *, force: bool = False) -> bool:
    """Save state (+ iterator) at ``step``; returns whether a save was started."""
    args = {STATE: ocp.args.StandardSave(state)}
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

    ``data_iter`` (if given) is advanced in place to the saved position. Raises RestoreError
    naming the step and the cause when anything fails.
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
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # re-raised with context: never fall back to a fresh start
        raise RestoreError(f"restoring step {step} from {mngr.directory} failed: "
                           f"{type(e).__name__}: {e}") from e
    logging.info("restored step %d from %s", step, mngr.directory)
    return step, restored[STATE]


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
    """Restore only the train state (no data iterator), e.g. for sampling."""
    mngr = ocp.CheckpointManager(absolute(directory), item_names=(STATE, DATA),
                                 options=ocp.CheckpointManagerOptions(create=False))
    try:
        return restore(mngr, abstract_state, None, step)
    finally:
        mngr.close()
