"""Orbax checkpoints of the whole run: the TrainState and the Grain iterator, saved together.

Restore rules: a workdir with no checkpoint starts fresh; a workdir *with* checkpoints
either restores or stops the run with the reason. Nothing here ever swallows a failed
restore and silently trains from scratch.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

STATE, DATA = "state", "data"


class RestoreError(RuntimeError):
    """A checkpoint exists but could not be restored."""


def absolute(directory: str | epath.Path) -> epath.Path:
    """Orbax needs absolute paths; local relative ones are resolved, URLs (gs://) kept."""
    path = epath.Path(directory)
    return path if "://" in str(directory) else epath.Path(os.path.abspath(str(path)))


def manager(directory: str | epath.Path, *, keep: int = 3, save_interval: int = 1,
            async_save: bool = True) -> ocp.CheckpointManager:
    """A manager for (state, data-iterator) checkpoints under ``directory``."""
    directory = absolute(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_interval, create=True,
        enable_async_checkpointing=async_save)
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
        raise RestoreError(
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


def restore_params(directory: str | epath.Path, abstract_state: Any,
                   step: int | None = None) -> tuple[int, Any]:
    """Restore only the train state (no data iterator), e.g. for sampling."""
    mngr = ocp.CheckpointManager(absolute(directory), item_names=(STATE, DATA),
                                 options=ocp.CheckpointManagerOptions(create=False))
    try:
        return restore(mngr, abstract_state, None, step)
    finally:
        mngr.close()
