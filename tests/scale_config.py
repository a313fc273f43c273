"""Tiny run for the scale-out tests (width 32, depth 2, 16² images, batch 8), as a config file
so the CLI, the launcher and in-process runs build exactly the same configuration."""
from cxr_rf import config


def get_config(arg=None):
    del arg
    c = config.base()
    c.data.update(num=48, resolution=16, shards=2)
    c.model.update(patch=4, width=32, depth=2, heads=2)
    c.train.update(steps=4, batch_size=8, log_every=2, eval_every=0, eval_batches=1,
                   ckpt_every=2, sample_every=0, progress=False)
    c.optim.warmup_steps = 2
    return c
