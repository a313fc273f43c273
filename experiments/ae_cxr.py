"""ae_cxr: the RadiT-class latent autoencoder, FLUX.2-like (channels 128, mult (1, 2, 4, 4),
32 latent channels, 2x2 space-to-depth: f16 with 128 channels) at 512² on the converted
corpora mixture (config.foundation's data), with the LDM/taming objective: L1 + perceptual
(+ KL 1e-6) and a PatchGAN hinge term with the adaptive weight from step 50k.

Perceptual term: on Rad-DINO tokens when ``ae_loss.perceptual_features`` is a local Rad-DINO
folder (``perceptual_extractor="raddino"``), on the in-house classifier's features with
``perceptual_extractor="cxr_classifier"`` and its folder, else off. Start from FLUX.2's weights
with ``autoencoder.init_from=DIR`` (a local diffusers AutoencoderKLFlux2 folder; its config
replaces the architecture here) and fine-tune them with LoRA with ``autoencoder.lora_rank=R``.

    launch/tpu_pod.sh --name ae-cxr --type v5p-16 --mount BUCKET --config experiments/ae_cxr.py \
        --workdir gs://BUCKET/runs/ae_cxr -- --config.data.root=/gcs/BUCKET/cxr \
        --config.ae_loss.perceptual_features=/gcs/BUCKET/models/rad-dino \
        [--config.autoencoder.init_from=/gcs/BUCKET/models/flux2-vae \
         --config.autoencoder.lora_rank=16]
"""
from cxr_rf import config
from cxr_rf.autoencoder import step


def get_config(arg=None):
    del arg
    f = config.foundation(depth=13)          # only for its data section (corpora, 512²)
    c = step.config_sections(config.base())
    c.data = f.data
    c.autoencoder.update(channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                         latent_channels=32, space_to_depth=2, mid_attention=True,
                         norm_groups=32, use_quant_conv=True, dtype="bfloat16")
    c.ae_loss.update(l1=1.0, perceptual=0.1, kl=1e-6, gan=0.5, gan_start=50_000,
                     perceptual_features="", perceptual_extractor="raddino")
    c.ae_disc.update(width=64, layers=3, norm="group", groups=32)
    c.ae_optim.update(lr=1e-4, disc_lr=1e-4, b1=0.5, b2=0.9, warmup_steps=1_000,
                      ema_decay=0.999)
    c.train.update(steps=200_000, batch_size=256, log_every=100, eval_every=5_000,
                   eval_batches=8, ckpt_every=2_000, ckpt_keep=3, ckpt_keep_period=50_000,
                   sample_every=10_000, stats_batches=64)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c
