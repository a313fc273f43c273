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
from cxr_rf import step as step_lib
from cxr_rf.data import convert, pipeline
from cxr_rf.model import build_model

FLAGS = flags.FLAGS


def data_dir(cfg: ml_collections.ConfigDict, workdir: epath.Path) -> epath.Path:
    """The dataset directory of a run: ``data.dir`` or <workdir>/data."""
    return epath.Path(cfg.data.dir) if cfg.data.dir else workdir / "data"


def ensure_data(cfg: ml_collections.ConfigDict, workdir: epath.Path):
    """The run's data: the ``data.mixture`` pairs, or one dataset directory, converting the
    phantom dataset into the workdir on first use (process 0 writes)."""
    if cfg.data.mixture:
        return [(str(d), float(w)) for d, w in cfg.data.mixture]
    path = data_dir(cfg, workdir)
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


def make_loader(cfg, path, split: str, *, train: bool):
    """The Grain loader of a split: shuffled with CFG dropout for training, fixed for eval."""
    d = cfg.data
    return pipeline.make_loader(
        path, split, global_batch=cfg.train.batch_size, seed=cfg.seed,
        resolution=d.resolution, report_len=d.report_len,
        cond_dropout=dict(d.cond_dropout) if train else None,
        worker_count=d.worker_count if train else 0, prefetch=d.prefetch, shuffle=train)


class Trainer:
    """Holds the compiled steps and shardings of one run; ``run`` is the loop."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        self.mesh = sharding.make_mesh(cfg.mesh)
        sharding.check_batch(cfg.train.batch_size, self.mesh)
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
            self._init = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=self.state_sharding)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        train = functools.partial(step_lib.train_step, model=self.model, tx=self.tx, fs=self.fs,
                                  ema_decay=cfg.optim.ema_decay)
        self._train_step = jax.jit(
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
            return self._train_step(state, self.global_batch(batch))

    def evaluate(self, params, path) -> np.ndarray:
        """Mean validation loss at each fixed timestep over the first eval batches."""
        it = iter(make_loader(self.cfg, path, "validation", train=False))
        with sharding.use(self.mesh):
            losses = [self._eval_step(params, self.global_batch(next(it)))
                      for _ in range(self.cfg.train.eval_batches)]
        return np.mean(np.asarray(jax.device_get(losses)), axis=0)


def run(cfg: ml_collections.ConfigDict, workdir: str | epath.Path,
        stop_at: int | None = None) -> dict:
    """Train (or resume) a run in ``workdir``; returns the last logged metrics.

    ``stop_at`` ends the loop early after that step (with a checkpoint), as a preemption
    would; the schedule still follows ``train.steps``.
    """
    from cxr_rf import sample  # sample imports model/flow only; kept local to keep CLI start fast
    workdir = epath.Path(workdir)
    lead = jax.process_index() == 0
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    path = ensure_data(cfg, workdir)
    trainer = Trainer(cfg)
    loader = make_loader(cfg, path, "train", train=True)
    data_iter = iter(loader)
    mngr = checkpoint.manager(workdir / "checkpoints", keep=cfg.train.ckpt_keep)
    state = trainer.init_state()
    if mngr.latest_step() is not None:
        start, state = checkpoint.restore(mngr, checkpoint.abstract(state), data_iter)
        logging.info("resuming from step %d", start)
    else:
        start = 0
    writer = outputs.MetricWriter(workdir / "tensorboard") if lead else None
    sampler = sample.Sampler(cfg, trainer.model) if lead and cfg.train.sample_every else None
    t = cfg.train
    bar = outputs.progress(start, t.steps, enabled=lead and t.progress)
    last: dict[str, Any] = {}
    window, t0 = [], time.perf_counter()
    end = t.steps if stop_at is None else min(stop_at, t.steps)
    for step in range(start + 1, end + 1):
        state, metrics = trainer.train_step(state, next(data_iter))
        window.append(metrics)
        if step % t.log_every == 0 or step == t.steps:
            host = jax.device_get(window)
            dt = time.perf_counter() - t0
            last = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
            last["images_per_s"] = len(host) * t.batch_size / dt
            last["lr"] = float(step_lib.learning_rate(cfg, step))
            last["nonfinite"] = float(not np.isfinite(last["loss"]))
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.1f}")
            if writer:
                writer.scalars(step, {f"train/{k}": v for k, v in last.items()})
            window, t0 = [], time.perf_counter()
            if not np.isfinite(last["loss"]):
                raise FloatingPointError(f"loss became {last['loss']} at step {step}")
        if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
            val = trainer.evaluate(state.ema_params, path)
            last["val_loss"] = float(val.mean())
            if writer:
                writer.scalars(step, {"val/loss": last["val_loss"], **{
                    f"val/loss_t{tv:.1f}": float(v) for tv, v in zip(t.eval_timesteps, val)}})
        if step % t.ckpt_every == 0 or step == end:
            checkpoint.save(mngr, step, state, data_iter)
        if lead and t.sample_every and (step % t.sample_every == 0 or step == t.steps):
            sampler.grid(state.ema_params, workdir / "samples" / f"step_{step:07d}.png", step=step)
    mngr.wait_until_finished()
    mngr.close()
    bar.close()
    if writer:
        writer.close()
    return last


def _define_flags() -> None:
    """Command-line flags (defined only when run as a program, so importing stays side-effect free)."""
    config_flags.DEFINE_config_file("config", None, "Experiment file (experiments/NAME.py).")
    flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it has checkpoints).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.config is None or FLAGS.workdir is None:
        sys.exit("error: --config and --workdir are required (see --help)")
    logging.getLogger().setLevel(logging.INFO)
    # Orbax and Grain log through absl at INFO on every save/restore; keep the console for ours.
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        metrics = run(FLAGS.config, FLAGS.workdir)
    except (checkpoint.RestoreError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps({"final": metrics}))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
