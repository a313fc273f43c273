"""cxr_8b: ≈8B parameters (SD3 depth 38: width 2432, 38 heads), pixel space, patch 16,
256² → 512²; FSDP over 128 chips (2432 = 128·19; 38 heads rule out tensor=4) and data
parallelism over the rest (HSDP), no rematerialisation: 40 GiB of 95 per v5p chip (aot).

    python -m cxr_rf.aot --config experiments/cxr_8b.py --topology v5p:8x8x8
    launch/tpu_pod.sh --name cxr-8b --type v5p-1024 --mount BUCKET --config experiments/cxr_8b.py \
        --workdir gs://BUCKET/runs/cxr_8b -- --config.data.root=/gcs/BUCKET/cxr
"""
from cxr_rf import config


def get_config(arg=None):
    del arg
    c = config.foundation(depth=38)
    c.mesh.update(data=-1, fsdp=128, tensor=1)  # 38 heads: tensor=4 does not divide; width 2432 = 128·19
    return c
