"""cxr_xl_latent: cxr_xl (≈1.35B, SD3 depth 21) in latent mode: FLUX.2-style f16, 128-channel
latents (experiments/ae_cxr.py) of the corpora at 512², a 32×32 grid with patch 1 = 1024 image
tokens per image (as cxr_xl's 512² stage), one stage at 512² for the same 1.725M steps at global
batch 1024: 1.81T image tokens (cxr_xl: 1.6T, a quarter of its steps at 256 tokens).
v-prediction. Encode the corpora into <data.root>/latents/NAME first (cxr_b_latent.py), then:

    python -m cxr_rf.aot --config experiments/cxr_xl_latent.py --topology v5p:4x4x4
    launch/tpu_pod.sh --name cxr-xl-latent --type v5p-128 --mount BUCKET \
        --config experiments/cxr_xl_latent.py --workdir gs://BUCKET/runs/cxr_xl_latent \
        -- --config.data.root=/gcs/BUCKET/cxr
"""
from cxr_rf import config


def get_config(arg=None):
    del arg
    c = config.foundation(depth=21)
    c.train.stages = ()                               # cxr_xl: ((0, 256), (250_000, 512))
    c.train.microbatches = 2
    # The latent diff: encoded corpora, the f16/128-channel grid, patch 1, v-prediction.
    c.data.update(latents=True, latent_factor=16,
                  mixture=tuple((f"latents/{n}", w) for n, w in config.corpus_mixture()))
    c.model.update(patch=1, in_channels=128)
    c.flow.prediction = "v"
    return c
