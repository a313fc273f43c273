"""CPU smoke run in latent mode: the smoke run's MMDiT trained on cached autoencoder latents of
phantom radiographs instead of pixels. After the autoencoder smoke run (a few minutes):

    python -m cxr_rf.train --config experiments/ae_smoke.py --workdir runs/ae_smoke
    python -m cxr_rf.train --config experiments/latent_smoke.py --workdir runs/latent_smoke
    python -m cxr_rf.sample --workdir runs/latent_smoke --num 8 --findings Cardiomegaly --sex F --age 70 --view PA --out runs/latent_smoke/cli_samples
    python -m cxr_rf.evaluate control --workdir runs/latent_smoke --num 32

The second command converts 2048 phantoms at 64² into runs/latent_smoke/data, encodes them
with the autoencoder run ``data.autoencoder`` (default runs/ae_smoke; another one with
``--config.data.autoencoder=PATH``) into runs/latent_smoke/latents (posterior means,
normalised, float16 [16, 16, 4]: ae_smoke is f4 with 4 channels) and trains on them. Samples,
grids and evaluation are decoded 64² pixel images. The latent grid 16² with patch 2 is 64 image
tokens, the token count of the pixel smoke run (32², patch 4), with the same model.
"""
from cxr_rf import config


def get_config(arg=None):
    del arg
    c = config.base()
    c.data.update(num=2048, resolution=64, latents=True, latent_factor=4,
                  autoencoder="runs/ae_smoke")
    c.model.update(patch=2, in_channels=4, width=128, depth=4, heads=4)
    c.train.update(steps=800, batch_size=64, log_every=50, eval_every=200, ckpt_every=200,
                   sample_every=400)
    c.optim.update(lr=1.5e-3, warmup_steps=40)
    c.sample.update(steps=20, cfg=4.0, guidance="findings=8")
    return c
