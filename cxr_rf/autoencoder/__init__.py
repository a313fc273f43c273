"""The latent autoencoder: the Flax KL autoencoder (``model``) and the FLUX.2 loader (``flux2``).

``losses``, ``discriminator`` and ``lora`` (training) live beside them.
"""
from cxr_rf.autoencoder.model import (
    STATS,
    AEConfig,
    Autoencoder,
    Decoder,
    Encoder,
    denormalize,
    depth_to_space,
    init,
    latent_stats,
    normalize,
    space_to_depth,
    with_latent_stats,
)

__all__ = [
    "STATS", "AEConfig", "Autoencoder", "Decoder", "Encoder", "denormalize", "depth_to_space",
    "init", "latent_stats", "normalize", "space_to_depth", "with_latent_stats",
]
