"""cxr_b: the RadiT-B analogue, ≈0.32B parameters (SD3 depth 13: width 832, 13 heads), pixel
space, patch 16, 256² → 512² on the CXR7-style corpora mixture (config.foundation).

Plan it (no TPU needed; `pip install -e ".[tpu]"`), then launch it:

    python -m cxr_rf.aot --config experiments/cxr_b.py --topology v5p:2x2x2
    launch/tpu_pod.sh --name cxr-b --type v5p-16 --mount BUCKET --config experiments/cxr_b.py \
        --workdir gs://BUCKET/runs/cxr_b -- --config.data.root=/gcs/BUCKET/cxr
"""
from cxr_rf import config


def get_config(arg=None):
    del arg
    c = config.foundation(depth=13)
    c.optim.lr = 2e-4
    c.train.update(steps=500_000, stages=((0, 256), (200_000, 512)))
    c.train.microbatches = 4  # v5p:2x2x2, 512²: 47 GiB of 95 per chip (aot, splash); 2: 92 GiB
    return c
