"""The shared benchmark shape: 64×64 pixels, patch 4, width 384, depth 6, 6 heads,
64 context tokens (19 structured + 45 report bytes), batch 8.

    python -m cxr_rf.bench train --config experiments/bench.py

The layer scan runs all 5 regular blocks in one trip (``model.scan_unroll``): a 6-block model
compiles in seconds either way, and on XLA:CPU a rolled scan's stacked per-block residuals
(zero-filled, copied and dynamically sliced every step) cost ~25% of the step at this shape
(BUILD_NOTES "Train-step and sampling benchmarks"). The parameters keep the scanned layout.
"""
from cxr_rf import config


def get_config(arg=None):
    del arg
    c = config.base()
    c.data.resolution = 64
    c.data.report_len = 45
    c.model.update(patch=4, width=384, depth=6, heads=6, scan_unroll=5)
    c.train.batch_size = 8
    return c
