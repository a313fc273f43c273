"""The shared benchmark shape: 64×64 pixels, patch 4, width 384, depth 6, 6 heads,
64 context tokens (19 structured + 45 report bytes), batch 8.

    python -m cxr_rf.bench train --config experiments/bench.py

The blocks are unrolled (``model.scan=False``): a 6-block model compiles in seconds either
way, and on XLA:CPU the scan's stacked per-block residuals (zero-filled and copied each step,
then sliced in the backward) cost ~25% of the step at this shape (BUILD_NOTES "Train-step and
sampling benchmarks"). The deep configs keep the scan for compile time and memory.
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
