"""Train the latent autoencoder with the MMDiT's machinery (``python -m cxr_rf.train`` with a
config whose ``task`` is "autoencoder" lands in ``run`` here):

    python -m cxr_rf.train --config experiments/ae_smoke.py --workdir /tmp/ae \
        [--config.train.steps=100]

The workdir is laid out like an MMDiT run's: config.json, data/ (phantom converted on first
use), checkpoints/ (Orbax: the whole ``AEState`` + the Grain iterator + fingerprints, via
``cxr_rf.checkpoint``), tensorboard/, samples/step_*.png (originals beside reconstructions of
fixed validation images). Rerunning resumes from the newest checkpoint; resumed == uninterrupted
bitwise. The last step (``train.steps``) computes the per-channel latent statistics over
posterior means of training images and saves them in its checkpoint.

``load_autoencoder(workdir)`` reads a run back for encoding/decoding (latent caching, sampling).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from cxr_rf import checkpoint, errors, outputs
from cxr_rf import config as config_lib
from cxr_rf import train as loop
from cxr_rf import trainer as trainer_lib
from cxr_rf.autoencoder import lora as lora_lib
from cxr_rf.autoencoder import step as step_lib
from cxr_rf.autoencoder.model import STATS, AEConfig, Autoencoder, latent_stats


def _check_workdir(cfg: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """UserError when ``workdir`` holds checkpoints of another kind of run (an MMDiT)."""
    trainer_lib.check_resumable(cfg, workdir)
    saved, ckpts = workdir / "config.json", workdir / "checkpoints"
    if saved.exists() and ckpts.exists() and any(ckpts.iterdir()):
        task = json.loads(saved.read_text()).get("task", "mmdit")
        if task != step_lib.TASK:
            raise errors.UserError(f"{workdir} holds checkpoints of a {task} run, not of an "
                                   f"autoencoder; use another --workdir")


def _pretrained(cfg: ml_collections.ConfigDict):
    """(AEConfig, variables) of ``autoencoder.init_from`` (FLUX.2 folder), else None; the
    loaded architecture replaces the config's autoencoder fields (config.json records it)."""
    folder = str(cfg.autoencoder.get("init_from", "") or "")
    if not folder:
        return None
    from cxr_rf.autoencoder import flux2
    a = cfg.autoencoder
    ae_cfg, variables = flux2.load(folder, dtype=a.dtype, param_dtype=a.param_dtype)
    with cfg.unlocked():
        for k, v in dataclasses.asdict(ae_cfg).items():
            cfg.autoencoder[k] = v
    return ae_cfg, variables


def run(cfg: ml_collections.ConfigDict, workdir: str | epath.Path,
        stop_at: int | None = None, devices=None) -> dict:
    """Train (or resume) an autoencoder run in ``workdir``; returns the last logged metrics
    (``stop_at`` and ``devices`` as in ``cxr_rf.train.run``)."""
    t = cfg.train
    workdir = epath.Path(workdir)
    stop_at = stop_at if stop_at is not None else (t.stop_at or None)
    end = t.steps if stop_at is None else min(stop_at, t.steps)
    lead = jax.process_index() == 0

    # ----------------------------------------------------------------------------------------
    # Setup: checks before anything is written, the data, the pretrained weights (they fix the
    # architecture written to config.json), the compiled steps, the iterator, the manager.
    # ----------------------------------------------------------------------------------------
    if len(config_lib.stages(cfg)) != 1:
        raise errors.UserError("train.stages: the autoencoder trains at one resolution "
                               "(data.resolution); leave train.stages empty")
    _check_workdir(cfg, workdir)
    path = trainer_lib.ensure_data(cfg, workdir)
    pretrained = _pretrained(cfg)
    if lead:
        loop.write_config(cfg, workdir)
    trainer = step_lib.AETrainer(cfg, devices, init_from=pretrained)
    data_iter = iter(trainer_lib.make_loader(cfg, path, "train", train=True))
    mngr, stop, writer = loop.open_outputs(t, workdir, lead)
    use_ema = trainer.ema_decay > 0
    grids = bool(t.sample_every) and lead
    if grids and jax.process_count() > 1:
        # As the MMDiT loop: the grid's program would run on process 0 alone.
        logging.warning("reconstruction grids are off with %d processes", jax.process_count())
        grids = False
    try:
        start, state = trainer_lib.restore_or_start(cfg, mngr, trainer.init_state(),
                                                    iter_for_step=lambda _: data_iter)
        bar = outputs.progress(start, t.steps, enabled=lead and t.progress)
        last: dict[str, Any] = {}
        window, t0 = [], time.perf_counter()
        logging.info("autoencoder f%d, %d latent channels at %d² (global batch %d); GAN from "
                     "step %d", trainer.ae_cfg.factor, trainer.ae_cfg.packed_channels,
                     cfg.data.resolution, t.batch_size, trainer.weights.gan_start + 1)

        for step in range(start + 1, end + 1):
            # ------------------------------------------------------------------------------------
            # Train step: the reconstruction program before gan_start, the GAN program after.
            # ------------------------------------------------------------------------------------
            state, metrics = trainer.train_step(state, next(data_iter), step)
            window.append(metrics)

            # ------------------------------------------------------------------------------------
            # Log (the per-window host sync; the non-finite streak is checked here).
            # ------------------------------------------------------------------------------------
            if step % t.log_every == 0 or step == t.steps:
                host = [trainer_lib.local_values(m) for m in window]
                dt = time.perf_counter() - t0
                last = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                last.update(images_per_s=len(host) * t.batch_size / dt,
                            skipped=float(np.sum([m["skipped"] for m in host])),
                            nonfinite_streak=float(host[-1]["nonfinite_streak"]))
                bar.update(step - bar.n)
                bar.set_postfix(l1=f"{last['l1']:.4f}", psnr=f"{last['psnr']:.2f}")
                if writer:
                    writer.scalars(step, {f"train/{k}": v for k, v in last.items()})
                window, t0 = [], time.perf_counter()
                trainer_lib.check_streak(int(last["nonfinite_streak"]), t.max_nonfinite, step)

            # ------------------------------------------------------------------------------------
            # Evaluate: PSNR / SSIM of posterior-mean reconstructions of validation images.
            # ------------------------------------------------------------------------------------
            if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                val = evaluate(trainer, state.generator_params(use_ema), cfg, path)
                last.update(val)
                if writer:
                    writer.scalars(step, {f"val/{k[4:]}": v for k, v in val.items()})

            # ------------------------------------------------------------------------------------
            # Latent statistics, at the run's last step (before its checkpoint, so they are in it).
            # ------------------------------------------------------------------------------------
            if step == t.steps:
                stats = compute_latent_stats(trainer, state.generator_params(use_ema), cfg, path)
                state = state.replace(latent_stats=jax.device_put(
                    {k: np.asarray(v) for k, v in stats.items()},
                    jax.tree.map(lambda a: a.sharding, state.latent_stats)))
                last.update(latent_shift_mean=float(np.mean(stats["shift"])),
                            latent_scale_mean=float(np.mean(stats["scale"])))

            # ------------------------------------------------------------------------------------
            # Checkpoint (state + iterator), then the reconstruction grid.
            # ------------------------------------------------------------------------------------
            preempted = loop.save_checkpoint(mngr, stop, step, end, t.ckpt_every, state,
                                             data_iter)
            if grids and (step % t.sample_every == 0 or step == t.steps):
                recon_grid(trainer, state.generator_params(use_ema), cfg, path,
                           workdir / "samples" / f"step_{step:07d}.png")
            if preempted:
                loop.stopped(last, step)
                break
        mngr.wait_until_finished()
        bar.close()
        return last
    finally:
        # ----------------------------------------------------------------------------------------
        # Teardown, whatever happened.
        # ----------------------------------------------------------------------------------------
        loop.close_all(stop, mngr, data_iter, writer)


# --------------------------------------------------------------------------------------------
# Evaluation, statistics, grids.
# --------------------------------------------------------------------------------------------

def _val_batches(cfg, path, n: int):
    it = iter(trainer_lib.make_loader(cfg, path, "validation", train=False))
    return [next(it)["image"] for _ in range(n)]


def evaluate(trainer: step_lib.AETrainer, params, cfg, path) -> dict[str, float]:
    """{"val_psnr", "val_ssim", "val_l1"}: means over the first ``train.eval_batches``
    validation batches of the posterior-mean reconstructions."""
    p, s, l1 = [], [], []
    for x in _val_batches(cfg, path, cfg.train.eval_batches):
        psnr, ssim, recon = trainer.reconstruct(params, x)
        p.append(psnr), s.append(ssim), l1.append(np.abs(recon - np.asarray(x)).mean())
    return {"val_psnr": float(np.mean(p)), "val_ssim": float(np.mean(s)),
            "val_l1": float(np.mean(l1))}


def compute_latent_stats(trainer: step_lib.AETrainer, params, cfg, path) -> dict[str, np.ndarray]:
    """Per-channel shift/scale of posterior means over the first ``train.stats_batches``
    training batches in file order (no shuffle, so every process and rerun sees the same)."""
    it = iter(trainer_lib.make_loader(cfg, path, "train", train=False))
    n = max(int(cfg.train.get("stats_batches", 8)), 1)
    return latent_stats(trainer.means(params, next(it)["image"]) for _ in range(n))


def recon_grid(trainer: step_lib.AETrainer, params, cfg, path, out: epath.Path) -> None:
    """A PNG of fixed validation images, each original beside its reconstruction."""
    x = _val_batches(cfg, path, 1)[0]
    _, _, recon = trainer.reconstruct(params, x)
    n = min(int(cfg.sample.grid), len(x))
    images = [im for i in range(n) for im in (np.asarray(x[i]), recon[i])]
    labels = [lab for _ in range(n) for lab in ("original", "reconstruction")]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        outputs.grid(images, labels, cols=4).save(f, format="PNG")


# --------------------------------------------------------------------------------------------
# Reading a run back.
# --------------------------------------------------------------------------------------------

def read_config(workdir: str | epath.Path) -> ml_collections.ConfigDict:
    """The config of an autoencoder run directory; one-line UserError for anything else."""
    return config_lib.read_run(workdir, step_lib.TASK)


def load_autoencoder(workdir: str | epath.Path, step: int | None = None
                     ) -> tuple[AEConfig, dict]:
    """(AEConfig, variables {"params", "latent_stats"}) of an autoencoder run, on the first
    local device: the EMA generator (LoRA merged) when the run keeps one, else its parameters.
    Only those fields of the checkpoint are read (and checked against their fingerprints).
    ``Autoencoder(cfg).apply(variables, x, method="encode")`` etc."""
    cfg = read_config(workdir)
    ae_cfg = step_lib.ae_config(cfg)
    ckpts = epath.Path(workdir) / "checkpoints"
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    r = cfg.data.resolution

    def shapes():
        x = jax.numpy.zeros((1, r, r, ae_cfg.in_channels), jax.numpy.float32)
        v = Autoencoder(ae_cfg).init(jax.random.PRNGKey(0), x)
        from flax import linen as nn
        params = nn.unbox(v["params"])
        rank = int(cfg.autoencoder.get("lora_rank", 0) or 0)
        alpha = float(cfg.autoencoder.get("lora_alpha", 0.0) or 0.0) or None
        lora = (lora_lib.init_lora(params, rank, alpha, rng=jax.random.PRNGKey(0))
                if rank else None)
        return params, v[STATS], lora

    put = lambda tree: jax.tree.map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), tree)
    params_a, stats_a, lora_a = (put(x) if x is not None else None
                                 for x in jax.eval_shape(shapes))
    use_ema = float(cfg.ae_optim.get("ema_decay", 0.0)) > 0
    step, stats = checkpoint.restore_field(ckpts, "latent_stats", stats_a, step)
    if lora_a is None:
        _, params = checkpoint.restore_field(ckpts, "ema" if use_ema else "params", params_a,
                                             step)
    else:
        _, base = checkpoint.restore_field(ckpts, "params", params_a, step)
        _, lora = checkpoint.restore_field(ckpts, "ema" if use_ema else "lora", lora_a, step)
        params = lora_lib.apply_lora(base, lora)
    if step < int(cfg.train.steps):
        logging.warning("autoencoder checkpoint of step %d is before the run's end (%d): its "
                        "latent statistics are not computed yet", step, int(cfg.train.steps))
    return ae_cfg, {"params": params, STATS: stats}
