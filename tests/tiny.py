"""The tiny run of the test suite: width 32, depth 2, 2 heads, global batch 8, 48 phantoms.

Also an experiment file, so the CLI, the launchers and in-process runs build exactly the same
configuration: ``--config=tests/tiny.py`` (16² images) or ``--config=tests/tiny.py:32`` (32²).
Tests get it through the fixtures of ``tests/conftest.py``; subprocess workers with ``load``.
"""
import importlib.util
import os

import numpy as np

from cxr_rf import conditioning, config

PATH = os.path.abspath(__file__)


# The tiny latent autoencoder (f2, 4 latent channels at 16²), as dotted overrides of
# experiments/ae_smoke.py: applied in-process and passed as CLI flags, so both build the same
# programs. test_ae_train.py and test_latent.py add what their runs differ in.
TINY_AE = {
    "data.num": 48, "data.resolution": 16, "data.shards": 2,
    "autoencoder.channels": 8, "autoencoder.channel_mult": (1, 2),
    "autoencoder.num_res_blocks": 1, "autoencoder.latent_channels": 4,
    "autoencoder.norm_groups": 4, "autoencoder.mid_attention": False,
    "ae_disc.width": 8, "ae_disc.layers": 1, "ae_disc.groups": 4,
    "ae_optim.warmup_steps": 0, "ae_optim.ema_decay": 0.9,
    "train.batch_size": 8, "train.log_every": 1, "train.eval_every": 0,
    "train.eval_batches": 1, "train.ckpt_every": 2, "train.sample_every": 0,
    "train.stats_batches": 1, "train.progress": False, "sample.grid": 2,
}


def get_config(arg=None):
    c = config.base()
    c.data.update(num=48, resolution=int(arg or 16), shards=2)
    c.model.update(patch=4, width=32, depth=2, heads=2)
    c.train.update(steps=4, batch_size=8, log_every=2, eval_every=0, eval_batches=1,
                   ckpt_every=2, sample_every=0, progress=False)
    c.optim.warmup_steps = 2
    c.sample.update(steps=4, grid=2)
    return c


def load(resolution: int = 16, **train):
    """``get_config`` loaded by path (for processes that do not have tests/ on sys.path),
    with ``train.*`` overrides."""
    spec = importlib.util.spec_from_file_location("tiny", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(str(resolution))
    c.train.update(**train)
    return c


def synthetic_batch(cfg, seed: int = 0) -> dict:
    """A host batch of ``cfg``'s shape: uniform images in [-1, 1] and a different, valid
    condition row per example (equivalence tests must see the conditioning vary)."""
    rng = np.random.default_rng(seed)
    b, r = cfg.train.batch_size, cfg.data.resolution
    tokens = [conditioning.encode(rng.integers(0, len(conditioning.STATES),
                                               len(conditioning.FINDINGS)),
                                  sex=str(rng.choice(conditioning.SEXES)),
                                  age=float(rng.uniform(0, 100)),
                                  race=str(rng.choice(conditioning.RACES)),
                                  view=str(rng.choice(conditioning.VIEWS)),
                                  report_len=cfg.data.report_len)
              for _ in range(b)]
    return {"image": rng.uniform(-1, 1, (b, r, r, cfg.model.in_channels)).astype(np.float32),
            "tokens": np.stack(tokens).astype(np.int32)}
