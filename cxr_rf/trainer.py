"""The trainer as a library: what `train`, `aot`, `bench` (and next the evaluation and the
autoencoder) share, with no command line in it.

    Trainer(cfg)          the mesh, the model, the compiled train/eval steps of one stage
    Stages(...)           the run's resolution stages, each with its Trainer and data iterator
    ensure_data(...)      the run's dataset(s), converting the phantom set on first use
    restore_or_start(...) the newest readable checkpoint, or step 0 for an empty workdir

The loop itself lives in `cxr_rf.train.run`; the shapes of a run (``abstract_state``,
``dummy_batch``) in `cxr_rf.step`, beside the state they describe.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import linen as nn

from cxr_rf import checkpoint, conditioning, errors, sharding
from cxr_rf import config as config_lib
from cxr_rf import step as step_lib
from cxr_rf.data import convert, pipeline, schema
from cxr_rf.model import build_model

Batch = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Host values.
# --------------------------------------------------------------------------------------------

def local_values(tree: Any) -> Any:
    """Host copies of replicated arrays from this process's first shard: with several
    processes a replicated global array is not fully addressable, so device_get would fail."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


# --------------------------------------------------------------------------------------------
# Data of a run.
# --------------------------------------------------------------------------------------------

def latent_mode(cfg: ml_collections.ConfigDict) -> bool:
    """Does the run train on cached autoencoder latents (``data.latents``)?"""
    return bool(cfg.data.get("latents", False))


def data_dir(cfg: ml_collections.ConfigDict, workdir: epath.Path) -> epath.Path:
    """The dataset directory of a run: ``data.dir`` or <workdir>/data (<workdir>/latents, the
    phantom set encoded from <workdir>/data, in latent mode)."""
    if cfg.data.dir:
        return epath.Path(cfg.data.dir)
    return workdir / ("latents" if latent_mode(cfg) else "data")


def _absolute(path: str) -> bool:
    return path.startswith("/") or "://" in path


def check_resumable(cfg: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """UserError (one line) when ``cfg`` is not on this code's condition-token layout, or
    ``workdir`` holds checkpoints of a run trained on another one: its embedding rows would
    be restored under other meanings."""
    conditioning.check_layout(cfg, "the config")
    saved = epath.Path(workdir) / "config.json"
    ckpts = epath.Path(workdir) / "checkpoints"
    if saved.exists() and ckpts.exists() and any(ckpts.iterdir()):
        conditioning.check_layout(ml_collections.ConfigDict(json.loads(saved.read_text())),
                                  f"the run in {workdir}")


def data_sources(cfg: ml_collections.ConfigDict, workdir: epath.Path) -> list[tuple[str, float]]:
    """The run's datasets as (directory, weight) pairs: the ``data.mixture`` (relative dirs
    under ``data.root``) or the one dataset directory with weight 1. Nothing is checked."""
    if cfg.data.mixture:
        root = cfg.data.get("root", "")
        return [(str(d) if not root or _absolute(str(d)) else str(epath.Path(root) / str(d)),
                 float(w)) for d, w in cfg.data.mixture]
    return [(str(data_dir(cfg, epath.Path(workdir))), 1.0)]


def ensure_data(cfg: ml_collections.ConfigDict, workdir: epath.Path):
    """The run's data: the ``data.mixture`` pairs, or one dataset directory, converting the
    phantom dataset into the workdir on first use (process 0 writes). In latent mode see
    ``ensure_latents`` (which fills in ``cfg.data``'s autoencoder fields)."""
    if latent_mode(cfg):
        return ensure_latents(cfg, workdir)
    if cfg.data.mixture:
        return data_sources(cfg, workdir)
    if cfg.data.dir:
        schema.filesystem_path(cfg.data.dir, "data.dir")
    path = data_dir(cfg, workdir)
    if "://" in str(path):
        raise errors.UserError(f"workdir {workdir} is a URL: the phantom dataset cannot be "
                               f"converted into it; convert it to a filesystem path and set "
                               f"data.dir")
    if (path / "dataset_info.json").exists():
        return str(path)
    if cfg.data.dir:
        raise errors.UserError(f"data.dir={cfg.data.dir} holds no converted dataset "
                               "(expected dataset_info.json; run python -m cxr_rf.data.convert)")
    if cfg.data.source != "phantom":
        raise errors.UserError(f"only the phantom source converts automatically; convert "
                               f"{cfg.data.source!r} with python -m cxr_rf.data.convert and set "
                               f"data.dir")
    if jax.process_index() == 0:
        logging.info("converting %d phantom images at %d² into %s", cfg.data.num,
                     cfg.data.resolution, path)
        convert.convert_phantom(path, num=cfg.data.num, resolution=cfg.data.resolution,
                                seed=cfg.data.phantom_seed, shards=cfg.data.shards)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("cxr_rf_data_ready")
    return str(path)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def ensure_latents(cfg: ml_collections.ConfigDict, workdir: epath.Path):
    """The latent run's data (``data.latents=True``), checked against the config, which it
    completes in place (so config.json records them): ``data.latent_factor`` (when 0),
    ``data.autoencoder`` (absolute; when empty), ``data.autoencoder_step`` (when 0) and
    ``data.autoencoder_fingerprint``, from the datasets' stats.json ``latent`` record.

    With an empty ``data.dir`` and no mixture, the phantom set is converted into
    <workdir>/data and encoded with ``data.autoencoder`` into <workdir>/latents on first use
    (process 0; both resumable). One-line UserErrors: a pixel dataset, sources encoded by
    different autoencoders, a latent channel count other than ``model.in_channels``, another
    resolution or factor than the config's."""
    from cxr_rf.data import encode
    d = cfg.data
    if d.mixture:
        sources = data_sources(cfg, workdir)
        for p, _ in sources:
            schema.filesystem_path(p, "data.mixture")
        paths = [p for p, _ in sources]
        result: Any = sources
    elif d.dir:
        path = schema.filesystem_path(d.dir, "data.dir")
        if not (epath.Path(path) / "dataset_info.json").exists():
            raise errors.UserError(f"data.dir={d.dir} holds no latent dataset (expected "
                                   "dataset_info.json; run python -m cxr_rf.data.encode)")
        paths, result = [path], path
    else:
        if not d.autoencoder:
            raise errors.UserError("data.latents=True with an empty data.dir needs "
                                   "data.autoencoder (an autoencoder run) to encode the phantom "
                                   "set, or data.dir set to a latent dataset "
                                   "(python -m cxr_rf.data.encode)")
        latents = data_dir(cfg, workdir)
        if "://" in str(latents):
            raise errors.UserError(f"workdir {workdir} is a URL: the phantom dataset cannot be "
                                   "encoded into it; encode it to a filesystem path and set "
                                   "data.dir")
        if not (latents / "dataset_info.json").exists():
            pixel_cfg = ml_collections.ConfigDict(cfg.to_dict())
            pixel_cfg.data.latents = False
            pixels = ensure_data(pixel_cfg, workdir)          # <workdir>/data
            if jax.process_index() == 0:
                logging.info("encoding %s with the autoencoder %s into %s", pixels,
                             d.autoencoder, latents)
                encode.encode(pixels, latents, d.autoencoder, step=d.autoencoder_step or None,
                              batch_size=int(d.get("encode_batch", 32)))
            _sync("cxr_rf_latents_ready")
        paths, result = [str(latents)], str(latents)
    infos = []
    for p in paths:
        info = schema.latent_info(p)
        if info is None:
            raise errors.UserError(f"{p} is a pixel dataset, but data.latents=True: encode it "
                                   "with python -m cxr_rf.data.encode")
        infos.append(info)
    fps = {i["autoencoder"]["fingerprint"] for i in infos}
    if len(fps) > 1:
        raise errors.UserError(f"the datasets of data.mixture were encoded by different "
                               f"autoencoders ({', '.join(i['autoencoder']['run'] for i in infos)})")
    info = infos[0]
    shapes = {tuple(i["shape"]) for i in infos}
    if len(shapes) > 1:
        raise errors.UserError(f"the datasets of data.mixture hold latents of different shapes "
                               f"{sorted(shapes)}")
    h, w, z = info["shape"]
    if int(cfg.model.in_channels) != int(z):
        raise errors.UserError(f"{paths[0]} holds {z}-channel latents, but "
                               f"model.in_channels={cfg.model.in_channels}; set "
                               f"--config.model.in_channels={z}")
    if int(info["resolution"]) != int(d.resolution):
        raise errors.UserError(f"{paths[0]} was encoded at {info['resolution']}px, but "
                               f"data.resolution={d.resolution} (a latent run trains at the "
                               "resolution its latents were encoded at)")
    if d.latent_factor and int(d.latent_factor) != int(info["factor"]):
        raise errors.UserError(f"{paths[0]} holds factor-{info['factor']} latents, but "
                               f"data.latent_factor={d.latent_factor}")
    ae = info["autoencoder"]
    if d.autoencoder_fingerprint and d.autoencoder_fingerprint != ae["fingerprint"]:
        raise errors.UserError(f"{paths[0]} was encoded by another autoencoder ({ae['run']} "
                               f"step {ae['step']}) than data.autoencoder_fingerprint names")
    d.latent_factor = int(info["factor"])
    if not d.autoencoder:
        d.autoencoder = ae["run"]
    elif "://" not in str(d.autoencoder):
        d.autoencoder = os.path.abspath(str(d.autoencoder))
    if not d.autoencoder_step:
        d.autoencoder_step = int(ae["step"])
    d.autoencoder_fingerprint = ae["fingerprint"]
    step_lib.grid_size(cfg)                                 # divisibility, in one line
    return result


def latent_shape(cfg: ml_collections.ConfigDict) -> tuple[int, int, int] | None:
    """(h, w, Z) of the run's latents, or None for a pixel run."""
    if not latent_mode(cfg):
        return None
    g = step_lib.grid_size(cfg)
    return (g, g, int(cfg.model.in_channels))


def make_loader(cfg: ml_collections.ConfigDict, path, split: str, *, train: bool,
                stage: int = 0):
    """The Grain loader of a split: shuffled with CFG dropout for training, fixed for eval.
    Each resolution ``stage`` reads its own seeded order."""
    d = cfg.data
    return pipeline.make_loader(
        path, split, global_batch=cfg.train.batch_size, seed=cfg.seed + stage,
        resolution=d.resolution, report_len=d.report_len,
        cond_dropout=dict(d.cond_dropout) if train else None,
        worker_count=d.worker_count if train else 0, prefetch=d.prefetch, shuffle=train,
        latent_shape=latent_shape(cfg))


# --------------------------------------------------------------------------------------------
# The compiled steps of one stage.
# --------------------------------------------------------------------------------------------

class Trainer:
    """The mesh, model, optimizer and compiled train/eval steps of one configuration (one
    resolution stage). ``jitted_step`` is the exact program `aot` compiles for TPUs and
    `bench` times."""

    def __init__(self, cfg: ml_collections.ConfigDict, devices=None):
        self.cfg = cfg
        self.mesh = sharding.make_mesh(cfg.mesh, devices)
        sharding.check_batch(cfg.train.batch_size, self.mesh, cfg.train.microbatches)
        self.model = build_model(cfg)
        self.tx = step_lib.make_optimizer(cfg)
        self.fs = step_lib.flow_settings(cfg)
        init = step_lib.init_fn(cfg, self.model, self.tx)
        with sharding.use(self.mesh):
            boxed = jax.eval_shape(init, jax.random.PRNGKey(cfg.seed))
            self.state_sharding = sharding.logical_sharding(boxed, self.mesh)
            # The abstract state with its shardings, from the trace above (no second trace).
            self._abstract_state = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                nn.unbox(boxed), self.state_sharding)
            sharding.check_divisible(boxed.params, self.mesh)
            sharding.check_replication(boxed.params, self.mesh, cfg.mesh.max_replicated)
            self._init = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=self.state_sharding)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        train = functools.partial(step_lib.train_step, model=self.model, tx=self.tx, fs=self.fs,
                                  ema_decay=cfg.optim.ema_decay,
                                  microbatches=cfg.train.microbatches)
        self.jitted_step = jax.jit(
            train, in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, sharding.replicated(self.mesh)), donate_argnums=0)
        evaluate = functools.partial(step_lib.eval_step, model=self.model, fs=self.fs,
                                     timesteps=tuple(cfg.train.eval_timesteps))
        self._eval_step = jax.jit(evaluate)

    def init_state(self) -> step_lib.TrainState:
        """A freshly initialised, sharded TrainState."""
        with sharding.use(self.mesh):
            return self._init(jax.random.PRNGKey(self.cfg.seed))

    def abstract_inputs(self) -> tuple[step_lib.TrainState, Batch]:
        """(state, batch) ShapeDtypeStructs with the step's input shardings: what
        ``jitted_step.lower`` takes to compile without any data (aot, memory analysis)."""
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
                 for k, v in step_lib.dummy_batch(self.cfg).items()}
        return self._abstract_state, batch

    def global_batch(self, local: dict) -> Batch:
        """Assemble the process-local batches into global arrays on the mesh."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in local.items() if k in ("image", "tokens")}

    def train_step(self, state, batch):
        with sharding.use(self.mesh):
            return self.jitted_step(state, self.global_batch(batch))

    def evaluate(self, params, path) -> np.ndarray:
        """Mean validation loss at each fixed timestep over the first eval batches."""
        it = iter(make_loader(self.cfg, path, "validation", train=False))
        with sharding.use(self.mesh):
            losses = [self._eval_step(params, self.global_batch(next(it)))
                      for _ in range(self.cfg.train.eval_batches)]
        return np.mean([local_values(x) for x in losses], axis=0)


class NonFiniteError(errors.RunError, FloatingPointError):
    """Too many consecutive skipped (non-finite) updates."""


def check_streak(streak: int, limit: int, step: int) -> None:
    """Stop the run when the last ``limit`` updates were all skipped as non-finite."""
    if limit and streak >= limit:
        raise NonFiniteError(
            f"{streak} consecutive non-finite steps (loss or gradients) up to step {step}; "
            f"updates were skipped, stopping (train.max_nonfinite={limit})")


# --------------------------------------------------------------------------------------------
# Resolution stages and restore.
# --------------------------------------------------------------------------------------------

class Stages:
    """The run's resolution stages (config.stages), entered in order: each has its own Trainer
    (its batch shape and timestep shift; the state's shapes and shardings are the same in all)
    and its own data iterator, a fresh seeded pass at its resolution."""

    def __init__(self, cfg: ml_collections.ConfigDict, schedule: list[config_lib.Stage], path,
                 devices=None):
        self.cfg, self.schedule, self.path, self.devices = cfg, schedule, path, devices
        self.stage: config_lib.Stage | None = None
        self.cfg_at: ml_collections.ConfigDict | None = None
        self.trainer: Trainer | None = None
        self.data_iter = None

    def enter(self, step: int) -> None:
        """Make the stage that trains ``step`` current (a no-op within the current stage)."""
        if self.stage is not None and self.stage.start < step <= self.stage.end:
            return                  # the per-step case: two integer comparisons
        stage = config_lib.stage_at(self.schedule, step)
        if self.stage is not None and stage.index == self.stage.index:
            return
        self.close()
        self.stage, self.cfg_at = stage, config_lib.for_stage(self.cfg, stage)
        self.trainer = Trainer(self.cfg_at, self.devices)
        self.data_iter = iter(make_loader(self.cfg_at, self.path, "train", train=True,
                                          stage=stage.index))

    def close(self) -> None:
        """Stop the current iterator's Grain worker processes (if any)."""
        close = getattr(self.data_iter, "close", None)
        if close:
            close()

    def iterator_for(self, step: int):
        """The data iterator a checkpoint of ``step`` restores into."""
        self.enter(step)
        return self.data_iter


def restore_or_start(cfg: ml_collections.ConfigDict, mngr, state,
                     iter_for_step=None) -> tuple[int, Any]:
    """(start step, state): the newest readable checkpoint, or step 0 for an empty workdir.
    ``iter_for_step(step)`` gives the data iterator a checkpoint of ``step`` restores into
    (its resolution stage's); None restores the state alone."""
    if not mngr.all_steps():
        return 0, state
    try:
        start, state = checkpoint.restore_latest(mngr, checkpoint.abstract(state), None,
                                                 iter_for_step=iter_for_step)
    except checkpoint.RestoreError:
        if not cfg.train.fresh_start_if_unreadable:
            raise
        logging.warning("!!! NO CHECKPOINT READABLE; STARTING FROM SCRATCH "
                        "(train.fresh_start_if_unreadable=True) !!!")
        checkpoint.set_aside(mngr, sorted(mngr.all_steps()))
        return 0, state
    logging.info("resuming from step %d", start)
    return start, state
