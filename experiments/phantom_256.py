"""phantom_256: a single-accelerator run on 20k procedural phantom radiographs at 256²
(converted into the workdir on first use): SD3 depth 8 (width 512, 8 heads, ≈75M parameters),
patch 8 (1024 tokens), 128² → 256² progressive, bf16. 4.3e17 training FLOPs: about 25 min
at 300 TFLOP/s achieved (an estimate from the FLOP formula, not a measurement), plus the
one-time phantom conversion.

    python -m cxr_rf.train --config experiments/phantom_256.py --workdir runs/phantom_256
    launch/local.sh --config experiments/phantom_256.py --workdir runs/phantom_256
"""
from cxr_rf import config


def get_config(arg=None):
    del arg
    c = config.base()
    c.data.update(num=20_000, resolution=256, shards=16, worker_count=4)
    c.model.update(patch=8, dtype="bfloat16", **config.sd3_size(8))
    c.optim.update(lr=3e-4, warmup_steps=1_000, ema_decay=0.9995)
    c.train.update(steps=40_000, batch_size=64, log_every=100, eval_every=2_000, eval_batches=4,
                   ckpt_every=2_000, sample_every=5_000, stages=((0, 128), (10_000, 256)))
    return c
