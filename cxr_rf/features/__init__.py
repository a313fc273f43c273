"""Feature extractors for evaluation, pluggable by name.

Every extractor maps radiographs to one feature row each and follows one convention:

    images_BxHxW   float32 in [0, 1] (0 = black, 1 = white, MONOCHROME2), any square size;
                   the extractor resizes to what it needs itself
    feats_BxD      float32, the extractor's embedding (``dim`` columns)

Legend: B batch, H/W image height/width, D feature dim, F findings (14).

    raddino          Flax DINOv2 (Rad-DINO: ViT-B/14, 518 px) from a local Hugging Face folder;
                     the embedding is the CLS token after the final LayerNorm (``pooler_output``).
                     ``cxr_rf.features.dinov2``
    cxr_classifier   the chest-radiograph classifier trained here
                     (``python -m cxr_rf.evaluate train-classifier``): penultimate features, and
                     ``predict`` gives the 14 finding probabilities. ``cxr_rf.features.classifier``
    pixels           the image itself, area-downsampled to ``PIXEL_SIZE``² and flattened: the
                     pixel space of the privacy distances (and a baseline feature space)

``protocol`` chooses the preprocessing in front of a network: ``default`` (our protocol: the
image at its native resolution and 16-bit precision, resized once by the extractor) or
``chexgenbench`` (CheXGenBench's chain: resize to 299 px, quantise to uint8, then the
extractor's own preprocessing; for Rad-DINO the Hugging Face processor's resize to 518), so
numbers are comparable with RadiT's table. ``pixels`` ignores it.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from cxr_rf import errors

PROTOCOLS = ("default", "chexgenbench")
NAMES = ("raddino", "cxr_classifier", "pixels")
PIXEL_SIZE = 64


@runtime_checkable
class Extractor(Protocol):
    name: str        # as in NAMES
    dim: int         # D
    protocol: str    # as in PROTOCOLS

    def __call__(self, images_BxHxW: np.ndarray) -> np.ndarray:
        """feats_BxD (float32) of images in [0, 1]."""
        ...


def check_images(images_BxHxW, what: str = "images") -> np.ndarray:
    """float32 [B, H, W] in [0, 1], square; one-line error otherwise."""
    x = np.asarray(images_BxHxW)
    if x.ndim != 3 or x.shape[1] != x.shape[2] or x.shape[1] < 1:
        raise errors.UserError(f"{what} must be square [B, H, W] grayscale arrays, got shape {x.shape}")
    x = x.astype(np.float32, copy=False)
    if x.size and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
        raise errors.UserError(f"{what} must be finite values in [0, 1]; "
                               f"got range [{np.nanmin(x):g}, {np.nanmax(x):g}]")
    return x


def area_resize(images_BxHxW: np.ndarray, size: int) -> np.ndarray:
    """Box-filter resize of square images to size x size (exact block means when size divides
    H; otherwise an area-weighted resample through Pillow's BOX filter)."""
    x = check_images(images_BxHxW)
    b, h, _ = x.shape
    if h == size:
        return x
    if h % size == 0:
        f = h // size
        return x.reshape(b, size, f, size, f).mean(axis=(2, 4), dtype=np.float64).astype(np.float32)
    from PIL import Image
    return np.stack([np.asarray(Image.fromarray(im, mode="F").resize((size, size), Image.BOX),
                                np.float32) for im in x]) if b else np.zeros((0, size, size), np.float32)


class Pixels:
    """The image as its feature: area-downsampled to size², flattened (D = size²)."""
    name = "pixels"

    def __init__(self, size: int = PIXEL_SIZE, protocol: str = "default"):
        self.size, self.dim, self.protocol = int(size), int(size) ** 2, protocol

    def __call__(self, images_BxHxW: np.ndarray) -> np.ndarray:
        return area_resize(images_BxHxW, self.size).reshape(-1, self.dim)


def get(name: str, path: str | None = None, *, protocol: str = "default", **kwargs) -> Extractor:
    """The extractor called ``name``, loaded from ``path`` (a local folder) where it needs
    weights. Nothing is downloaded."""
    if name not in NAMES:
        raise errors.UserError(f"unknown feature extractor {name!r}; choose one of {', '.join(NAMES)}")
    if protocol not in PROTOCOLS:
        raise errors.UserError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if name == "pixels":
        return Pixels(protocol=protocol, **kwargs)
    if not path:
        raise errors.UserError(f"feature extractor {name!r} needs a local folder of weights "
                               f"(--{'raddino' if name == 'raddino' else 'classifier'} DIR)")
    if name == "raddino":
        from cxr_rf.features import dinov2
        return dinov2.load(path, protocol=protocol, **kwargs)
    from cxr_rf.features import classifier
    return classifier.load(path, protocol=protocol, **kwargs)
