"""cxr_b_latent: cxr_b (≈0.32B, SD3 depth 13) in latent mode: trained on FLUX.2-style f16,
128-channel autoencoder latents (experiments/ae_cxr.py) of the corpora at 512², a 32×32 latent
grid with patch 1 (FLUX.2's convention for its packed 128-channel latent) = 1024 image tokens
per image, the token count of the pixel model's 512² stage (patch 16). One stage at 512² (latent
data is encoded at one resolution): the compute per step equals cxr_b's 512² stage, but every
step sees full-resolution images. v-prediction (the latent-space default; x-prediction was for
large pixel patches).

Encode each converted corpus once with the autoencoder run, into <data.root>/latents/NAME:

    python -m cxr_rf.data.encode --autoencoder gs://BUCKET/runs/ae_cxr --input /gcs/BUCKET/cxr/NAME \
        --output /gcs/BUCKET/cxr/latents/NAME [--shard_range A:B ... then --publish]
    python -m cxr_rf.aot --config experiments/cxr_b_latent.py --topology v5p:2x2x2
    launch/tpu_pod.sh --name cxr-b-latent --type v5p-16 --mount BUCKET \
        --config experiments/cxr_b_latent.py --workdir gs://BUCKET/runs/cxr_b_latent \
        -- --config.data.root=/gcs/BUCKET/cxr

The autoencoder the data records (run, step, fingerprint) is copied into config.json at the
start of training and decodes every sample.
"""
from cxr_rf import config


def get_config(arg=None):
    del arg
    c = config.foundation(depth=13)
    c.optim.lr = 2e-4
    c.train.update(steps=500_000, stages=())          # cxr_b: stages ((0, 256), (200_000, 512))
    c.train.microbatches = 4
    # The latent diff: encoded corpora, the f16/128-channel grid, patch 1, v-prediction.
    c.data.update(latents=True, latent_factor=16,
                  mixture=tuple((f"latents/{n}", w) for n, w in config.corpus_mixture()))
    c.model.update(patch=1, in_channels=128)
    c.flow.prediction = "v"
    return c
