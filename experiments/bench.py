"""The shared benchmark shape: 64×64 pixels, patch 4, width 384, depth 6, 6 heads,
64 context tokens (19 structured + 45 report bytes), batch 8.

    python -m cxr_rf.bench train --config experiments/bench.py

The blocks run as a plain loop (``model.scan=False``; a 6-block model compiles in seconds
either way). On XLA:CPU at this shape a rolled layer scan costs ~20% of the train step (its
stacked per-block residuals are zero-filled, copied and dynamically sliced every step); all
blocks in one trip of the scan (``model.scan_unroll=5``) recovers most of it, the loop the rest
(BUILD_NOTES "Train-step and sampling benchmarks"). The deep configs keep the rolled scan.
"""
from cxr_rf import config


def get_config(arg=None):
    del arg
    c = config.base()
    c.data.resolution = 64
    c.data.report_len = 45
    c.model.update(patch=4, width=384, depth=6, heads=6, scan=False)
    c.train.batch_size = 8
    return c
