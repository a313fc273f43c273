"""CPU smoke run of the latent autoencoder: converts 512 phantom radiographs at 64² and trains a
small f4 KL autoencoder (4 latent channels) with the PatchGAN switched on at step 300, a few
minutes on 2 CPU cores; writes reconstruction grids and the latent statistics:

    python -m cxr_rf.train --config experiments/ae_smoke.py --workdir runs/ae_smoke

Read it back with ``cxr_rf.autoencoder.train.load_autoencoder("runs/ae_smoke")``.
"""
from cxr_rf import config
from cxr_rf.autoencoder import step


def get_config(arg=None):
    del arg
    c = step.config_sections(config.base())
    c.data.update(num=512, resolution=64)
    c.autoencoder.update(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                         latent_channels=4, norm_groups=8, mid_attention=False)
    c.ae_loss.update(perceptual=0.0, kl=1e-6, gan=0.5, gan_start=300)
    c.ae_disc.update(width=32, layers=2, groups=8)
    c.ae_optim.update(lr=4e-4, disc_lr=4e-4, warmup_steps=20, ema_decay=0.99)
    c.train.update(steps=400, batch_size=16, log_every=25, eval_every=100, eval_batches=2,
                   ckpt_every=100, sample_every=200, stats_batches=8)
    return c
