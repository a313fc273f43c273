"""Train a rectified-flow MMDiT.

    python -m cxr_rf.train --config experiments/smoke.py --workdir /tmp/run [--config.train.steps=100]

The workdir holds everything of a run: config.json, data/ (converted on first use when
``data.dir`` is empty), checkpoints/, tensorboard events, samples/. Rerunning the same command
resumes from the newest checkpoint.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath
from flax import linen as nn
from ml_collections import config_flags

from cxr_rf import checkpoint, conditioning, outputs, sharding
from cxr_rf import config as config_lib
from cxr_rf import step as step_lib
from cxr_rf.data import convert, pipeline, schema
from cxr_rf.model import build_model

FLAGS = flags.FLAGS


def data_dir(cfg: ml_collections.ConfigDict, workdir: epath.Path) -> epath.Path:
    """The dataset directory of a run: ``data.dir`` or <workdir>/data."""
    return epath.Path(cfg.data.dir) if cfg.data.dir else workdir / "data"


def ensure_data(cfg: ml_collections.ConfigDict, workdir: epath.Path):
    """The run's data: the ``data.mixture`` pairs, or one dataset directory, converting the
    phantom dataset into the workdir on first use (process 0 writes)."""
    if cfg.data.mixture:
        root = cfg.data.get("root", "")
        return [(str(d) if not root or _absolute(str(d)) else str(epath.Path(root) / str(d)),
                 float(w)) for d, w in cfg.data.mixture]
    if cfg.data.dir:
        schema.filesystem_path(cfg.data.dir, "data.dir")
    path = data_dir(cfg, workdir)
    if "://" in str(path):
        raise ValueError(f"workdir {workdir} is a URL: the phantom dataset cannot be converted "
                         f"into it; convert it to a filesystem path and set data.dir")
    if (path / "dataset_info.json").exists():
        return str(path)
    if cfg.data.dir:
        raise FileNotFoundError(f"data.dir={cfg.data.dir} holds no converted dataset "
                                "(expected dataset_info.json; run python -m cxr_rf.data.convert)")
    if cfg.data.source != "phantom":
        raise ValueError(f"only the phantom source converts automatically; convert "
                         f"{cfg.data.source!r} with python -m cxr_rf.data.convert and set data.dir")
    if jax.process_index() == 0:
        logging.info("converting %d phantom images at %d² into %s", cfg.data.num,
                     cfg.data.resolution, path)
        convert.convert_phantom(path, num=cfg.data.num, resolution=cfg.data.resolution,
                                seed=cfg.data.phantom_seed, shards=cfg.data.shards)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("cxr_rf_data_ready")
    return str(path)


def _absolute(path: str) -> bool:
    return path.startswith("/") or "://" in path


def make_loader(cfg, path, split: str, *, train: bool, stage: int = 0):
    """The Grain loader of a split: shuffled with CFG dropout for training, fixed for eval.
    Each resolution ``stage`` reads its own seeded order."""
    d = cfg.data
    return pipeline.make_loader(
        path, split, global_batch=cfg.train.batch_size, seed=cfg.seed + stage,
        resolution=d.resolution, report_len=d.report_len,
        cond_dropout=dict(d.cond_dropout) if train else None,
        worker_count=d.worker_count if train else 0, prefetch=d.prefetch, shuffle=train)


def local_values(tree: Any) -> Any:
    """Host copies of replicated arrays from this process's first shard: with several
    processes a replicated global array is not fully addressable, so device_get would fail."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


class Trainer:
    """Holds the compiled steps and shardings of one run; ``run`` is the loop."""

    def __init__(self, cfg: ml_collections.ConfigDict, devices=None):
        self.cfg = cfg
        self.mesh = sharding.make_mesh(cfg.mesh, devices)
        sharding.check_batch(cfg.train.batch_size, self.mesh, cfg.train.microbatches)
        self.model = build_model(cfg)
        self.tx = step_lib.make_optimizer(cfg)
        self.fs = step_lib.FlowSettings.from_config(cfg)
        init = functools.partial(
            step_lib.init_state, self.model, self.tx, resolution=cfg.data.resolution,
            num_tokens=conditioning.num_tokens(cfg.data.report_len),
            in_channels=cfg.model.in_channels)
        with sharding.use(self.mesh):
            boxed = jax.eval_shape(init, jax.random.PRNGKey(cfg.seed))
            self.state_sharding = sharding.logical_sharding(boxed, self.mesh)
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

    def init_state(self):
        """A freshly initialised, sharded TrainState."""
        with sharding.use(self.mesh):
            return self._init(jax.random.PRNGKey(self.cfg.seed))

    def global_batch(self, local: dict) -> dict:
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


def check_streak(streak: int, limit: int, step: int) -> None:
    """Stop the run when the last ``limit`` updates were all skipped as non-finite."""
    if limit and streak >= limit:
        raise FloatingPointError(
            f"{streak} consecutive non-finite steps (loss or gradients) up to step {step}; "
            f"updates were skipped, stopping (train.max_nonfinite={limit})")


def restore_or_start(cfg, mngr, state, iter_for_step=None) -> tuple[int, Any]:
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

    def enter(self, step: int) -> bool:
        """Make the stage that trains ``step`` current; returns whether it changed."""
        if self.stage is not None and self.stage.start < step <= self.stage.end:
            return False            # the per-step case: two integer comparisons
        stage = config_lib.stage_at(self.schedule, step)
        if self.stage is not None and stage.index == self.stage.index:
            return False
        self.close()
        self.stage, self.cfg_at = stage, config_lib.for_stage(self.cfg, stage)
        self.trainer = Trainer(self.cfg_at, self.devices)
        self.data_iter = iter(make_loader(self.cfg_at, self.path, "train", train=True,
                                          stage=stage.index))
        return True

    def close(self) -> None:
        """Stop the current iterator's Grain worker processes (if any)."""
        close = getattr(self.data_iter, "close", None)
        if close:
            close()

    def iterator_for(self, step: int):
        """The data iterator a checkpoint of ``step`` restores into."""
        self.enter(step)
        return self.data_iter


def run(cfg: ml_collections.ConfigDict, workdir: str | epath.Path,
        stop_at: int | None = None, devices=None) -> dict:
    """Train (or resume) a run in ``workdir``; returns the last logged metrics.

    ``stop_at`` ends the loop early after that step (with a checkpoint), as a preemption
    would; the schedule still follows ``train.steps``. SIGTERM does the same at the next
    step boundary (``preempted`` is then set in the result). ``devices`` (default: all)
    is what the mesh spans.
    """
    workdir = epath.Path(workdir)
    stop_at = stop_at if stop_at is not None else (cfg.train.stop_at or None)
    schedule = config_lib.stages(cfg)  # a bad schedule fails before any work
    lead = jax.process_index() == 0
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    path = ensure_data(cfg, workdir)
    stages = Stages(cfg, schedule, path, devices)
    stages.enter(0)
    t = cfg.train
    mngr = checkpoint.manager(workdir / "checkpoints", keep=t.ckpt_keep,
                              keep_period=t.ckpt_keep_period, async_save=t.ckpt_async)
    start, state = restore_or_start(cfg, mngr, stages.trainer.init_state(),
                                    iter_for_step=stages.iterator_for)
    stop = checkpoint.StopRequest()
    try:
        return _loop(cfg, workdir, path, stages, state, mngr, start, stop, stop_at)
    finally:
        stop.close()
        mngr.close()
        stages.close()


def _loop(cfg, workdir, path, stages, state, mngr, start, stop, stop_at) -> dict:
    """The training loop of ``run`` (state restored, manager open)."""
    from cxr_rf import sample  # sample imports model/flow only; kept local to keep CLI start fast
    lead = jax.process_index() == 0
    writer = outputs.MetricWriter(workdir / "tensorboard") if lead else None
    t = cfg.train
    grids = bool(t.sample_every)
    if grids and jax.process_count() > 1:
        # The sampler runs on process 0 alone and cannot read parameters sharded over the
        # other processes' devices; grids come from `python -m cxr_rf.sample` instead.
        logging.warning("sample grids are off with %d processes", jax.process_count())
        grids = False
    sampler, current = None, None
    bar = outputs.progress(start, t.steps, enabled=lead and t.progress)
    last: dict[str, Any] = {}
    window, t0 = [], time.perf_counter()
    end = t.steps if stop_at is None else min(stop_at, t.steps)
    for step in range(start + 1, end + 1):
        stages.enter(step)
        if stages.stage.index != current:
            st, current = stages.stage, stages.stage.index
            logging.info("stage %d: steps %d-%d at %d² (global batch %d, timestep shift %.3g)",
                         st.index, st.start + 1, st.end, st.resolution, st.batch_size,
                         stages.trainer.fs.shift)
            sampler = sample.Sampler(stages.cfg_at, stages.trainer.model) if lead and grids else None
        trainer, data_iter = stages.trainer, stages.data_iter
        state, metrics = trainer.train_step(state, next(data_iter))
        window.append(metrics)
        if step % t.log_every == 0 or step == t.steps:
            host = [local_values(m) for m in window]
            dt = time.perf_counter() - t0
            last = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
            last["images_per_s"] = len(host) * stages.stage.batch_size / dt
            last["lr"] = float(step_lib.lr_schedule(cfg)(step))
            last["skipped"] = float(np.sum([m["skipped"] for m in host]))
            last["nonfinite_streak"] = float(host[-1]["nonfinite_streak"])
            last["resolution"] = float(stages.stage.resolution)
            last["shift"] = float(trainer.fs.shift)
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.1f}")
            if writer:
                writer.scalars(step, {f"train/{k}": v for k, v in last.items()})
            window, t0 = [], time.perf_counter()
            # Checked when logging (no per-step host sync); the streak lives in the state.
            check_streak(int(host[-1]["nonfinite_streak"]), t.max_nonfinite, step)
        if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
            val = trainer.evaluate(state.ema_params, path)
            last["val_loss"] = float(val.mean())
            if writer:
                writer.scalars(step, {"val/loss": last["val_loss"], **{
                    f"val/loss_t{tv:.1f}": float(v) for tv, v in zip(t.eval_timesteps, val)}})
        preempted = stop(mngr, step)
        if step % t.ckpt_every == 0 or step == end or preempted:
            checkpoint.save(mngr, step, state, data_iter, force=preempted)
        if sampler and (step % t.sample_every == 0 or step == t.steps):
            sampler.grid(state.ema_params, workdir / "samples" / f"step_{step:07d}.png", step=step)
        if preempted:
            logging.warning("stopping after the checkpoint of step %d (preemption/SIGTERM)", step)
            last["preempted"] = step
            break
    mngr.wait_until_finished()
    bar.close()
    if writer:
        writer.close()
    return last


def _define_flags() -> None:
    """Command-line flags (defined only when run as a program, so importing stays side-effect free)."""
    config_flags.DEFINE_config_file("config", None, "Experiment file (experiments/NAME.py).")
    flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it has checkpoints).")
    flags.DEFINE_string("coordinator", None, "host:port of process 0, for explicit multi-process "
                        "runs (TPU pods and SLURM are detected without it).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).")
    flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")


# Environment variables whose presence means a multi-host cluster JAX can join by itself.
_CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                "OMPI_MCA_orte_hnp_uri")


def init_distributed(coordinator: str | None, num_processes: int | None,
                     process_id: int | None) -> None:
    """Join the other processes: explicit flags, else automatic on TPU pods / SLURM / MPI."""
    if coordinator:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator needs --num_processes and --process_id")
        # CPU processes need a cross-process collectives backend; harmless on GPU/TPU.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)
    elif num_processes is not None or process_id is not None:
        raise ValueError("--num_processes/--process_id need --coordinator")
    elif any(os.environ.get(k) for k in _CLUSTER_ENV) and int(
            os.environ.get("SLURM_NTASKS", "2")) > 1:
        jax.distributed.initialize()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.config is None or FLAGS.workdir is None:
        sys.exit("error: --config and --workdir are required (see --help)")
    logging.getLogger().setLevel(logging.INFO)
    # Orbax and Grain log through absl at INFO on every save/restore; keep the console for ours.
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        init_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
        if jax.process_index() != 0:  # one console: the others report only problems
            logging.getLogger().setLevel(logging.WARNING)
        metrics = run(FLAGS.config, FLAGS.workdir)
    except (checkpoint.RestoreError, FileNotFoundError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    if jax.process_index() == 0:
        print(json.dumps({"final": metrics}))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
