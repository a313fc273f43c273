"""Build tests/fixtures/flux2_ae_tiny/: a tiny random diffusers ``AutoencoderKLFlux2`` and its outputs.

Run with a PyTorch environment holding diffusers 0.42.1 (NOT a dependency of cxr_rf):

    python scripts/make_flux2_ae_fixture.py [out_dir]

(diffusers 0.42.1 needs huggingface-hub >= 1.32, which transformers 4.57 refuses: use an
environment without transformers, or diffusers' import of its PEFT loaders fails.)

The model: ``AutoencoderKLFlux2`` (diffusers/models/autoencoders/autoencoder_kl_flux2.py) with
block_out_channels (8, 16) (2 levels, f2), layers_per_block 2, latent_channels 4, norm_num_groups
4, mid-block attention, quant/post-quant convs, a BatchNorm2d over the 2x2-patchified 16
channels, RGB in/out. Every GroupNorm affine, bias and the BatchNorm running statistics are
randomised (the defaults 1/0 would hide a missing or swapped tensor).

``reference.npz`` (float32; torch NCHW layout as diffusers returns it):

    x_rgb        [2, 3, 16, 24]  input images in [-1, 1]
    mean, logvar [2, 4, 8, 12]   ``encode(x_rgb).latent_dist`` .mean / .logvar (logvar clamped)
    packed       [2, 16, 4, 6]   Flux2Pipeline._patchify_latents(mean)
    normed       [2, 16, 4, 6]   (packed - bn.running_mean) / sqrt(bn.running_var + eps): the
                                 latent Flux2Pipeline._encode_vae_image hands to the transformer
    z            [2, 4, 8, 12]   a random latent
    dec          [2, 3, 16, 24]  ``decode(z).sample``
    dec_normed   [2, 3, 16, 24]  the pipeline's decode path from ``normed``: denormalise with the
                                 BatchNorm statistics, unpatchify, decode
    x_gray       [2, 1, 16, 24]  gray images in [-1, 1]
    mean_gray    [2, 4, 8, 12]   ``encode(x_gray replicated to RGB)`` .mean (the RGB -> gray test)
    logvar_gray  [2, 4, 8, 12]

``full_size_shapes.json``: the config and every state-dict tensor shape of the default
(full-size FLUX.2, 84M parameters) ``AutoencoderKLFlux2()``, built on the meta device (no
weights), so the tests check the name table at full size too.
"""
import json
import os
import sys

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKLFlux2


def patchify(latents):
    """diffusers 0.42.1 ``Flux2Pipeline._patchify_latents`` (copied: importing the pipeline
    needs transformers)."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents):
    """diffusers 0.42.1 ``Flux2Pipeline._unpatchify_latents``."""
    b, c, h, w = latents.shape
    latents = latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return latents.reshape(b, c // 4, h * 2, w * 2)


def main(out_dir):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=2, latent_channels=4, norm_num_groups=4,
        sample_size=16, mid_block_add_attention=True, batch_norm_eps=1e-4).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
        vae.bn.running_mean.copy_(0.5 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(torch.empty_like(vae.bn.running_var).uniform_(0.2, 3.0))
        vae.bn.num_batches_tracked.fill_(7)
    os.makedirs(out_dir, exist_ok=True)
    vae.save_pretrained(out_dir, safe_serialization=True)

    yy, xx = np.mgrid[0:16, 0:24] / 16.0
    def images(c):
        base = np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform()))[None, None]
        return np.clip(0.6 * base + 0.4 * rng.standard_normal((2, c, 16, 24)), -1, 1)
    ref = {"x_rgb": images(3), "x_gray": images(1), "z": rng.standard_normal((2, 4, 8, 12))}
    ref = {k: v.astype(np.float32) for k, v in ref.items()}
    t = {k: torch.from_numpy(v) for k, v in ref.items()}
    mean_bn = vae.bn.running_mean.view(1, -1, 1, 1)
    std_bn = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    with torch.no_grad():
        post = vae.encode(t["x_rgb"]).latent_dist
        ref["mean"], ref["logvar"] = post.mean.numpy(), post.logvar.numpy()
        packed = patchify(post.mode())
        normed = (packed - mean_bn) / std_bn
        ref["packed"], ref["normed"] = packed.numpy(), normed.numpy()
        ref["dec"] = vae.decode(t["z"]).sample.numpy()
        ref["dec_normed"] = vae.decode(unpatchify(normed * std_bn + mean_bn)).sample.numpy()
        post = vae.encode(t["x_gray"].repeat(1, 3, 1, 1)).latent_dist
        ref["mean_gray"], ref["logvar_gray"] = post.mean.numpy(), post.logvar.numpy()
    ref = {k: np.asarray(v, np.float32) for k, v in ref.items()}
    np.savez_compressed(os.path.join(out_dir, "reference.npz"), **ref)
    with open(os.path.join(out_dir, "versions.json"), "w") as f:
        json.dump({"torch": torch.__version__, "diffusers": diffusers.__version__,
                   "numpy": np.__version__}, f, indent=1)
    with torch.device("meta"):
        full = AutoencoderKLFlux2()
    with open(os.path.join(out_dir, "full_size_shapes.json"), "w") as f:
        json.dump({"config": {k: v for k, v in full.config.items() if not k.startswith("_")},
                   "num_parameters": sum(p.numel() for p in full.parameters()),
                   "shapes": {k: list(v.shape) for k, v in full.state_dict().items()}}, f,
                  indent=0, default=list)
    print({k: v.shape for k, v in ref.items()})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else
         os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                      "flux2_ae_tiny"))
