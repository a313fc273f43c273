"""cxr_3b: ≈3.2B parameters (SD3 depth 28: width 1792, 28 heads), pixel space, patch 16,
256² → 512², same recipe and token budget per stage as cxr_xl.

    python -m cxr_rf.aot --config experiments/cxr_3b.py --topology v5p:4x4x8
    launch/tpu_pod.sh --name cxr-3b --type v5p-256 --mount BUCKET --config experiments/cxr_3b.py \
        --workdir gs://BUCKET/runs/cxr_3b -- --config.data.root=/gcs/BUCKET/cxr
"""
from cxr_rf import config


def get_config(arg=None):
    del arg
    c = config.foundation(depth=28)
    # v5p:4x4x8, 512², splash attention (auto on TPU): 52 GiB of 95 per chip in one piece (aot);
    # with --config.model.attention=xla it needs 2 microbatches (44 GiB).
    c.train.microbatches = 1
    return c
