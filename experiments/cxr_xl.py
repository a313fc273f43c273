"""cxr_xl: the RadiT XL analogue, ≈1.35B parameters (SD3 depth 21: width 1344, 21 heads),
pixel space, patch 16, 512² output, trained on 1.6T image tokens like RadiT XL: 250k steps at
256² (256 tokens/image) then 1.475M steps at 512² (1024 tokens/image), global batch 1024.

    python -m cxr_rf.aot --config experiments/cxr_xl.py --topology v5p:4x4x4
    launch/tpu_pod.sh --name cxr-xl --type v5p-128 --mount BUCKET --config experiments/cxr_xl.py \
        --workdir gs://BUCKET/runs/cxr_xl -- --config.data.root=/gcs/BUCKET/cxr
"""
from cxr_rf import config


def get_config(arg=None):
    del arg
    c = config.foundation(depth=21)
    # v5p:4x4x4, 512², splash attention (auto on TPU): 59 GiB of 95 per chip in one piece (aot);
    # with --config.model.attention=xla it needs 2 microbatches (49 GiB).
    c.train.microbatches = 1
    return c
