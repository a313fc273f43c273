"""DINOv2 in Flax (the Rad-DINO architecture), loaded from a local Hugging Face folder.

The folder is what ``microsoft/rad-dino`` holds (downloaded beforehand; nothing here downloads):

    config.json               ``Dinov2Config`` (model_type "dinov2", no register tokens)
    model.safetensors         ``Dinov2Model`` weights, read with ``safetensors.numpy`` (no torch)
    preprocessor_config.json  the ``BitImageProcessor``: resize (shortest edge), centre crop,
                              rescale, normalise with ITS mean/std (never ImageNet constants)

The network, as transformers' ``modeling_dinov2.py`` (4.57) computes it, in eval mode:

    pixels [B, S, S, 3] -> conv p x p, stride p (patch embedding) -> [B, G*G, D]
    -> prepend CLS, add position embeddings (bicubic-interpolated when G differs from the
       pretrained grid) -> L pre-LN blocks:
           x += ls1 * attn(LN1 x);   x += ls2 * mlp(LN2 x)     (LayerScale, exact-erf GELU)
    -> final LayerNorm = last_hidden_state [B, T, D];  pooler_output = its CLS row [B, D]

The embedding of the extractor is ``pooler_output``, as in CheXGenBench.

Shape letters: B batch, H/W input image height/width, S model input side (crop size), C input
channels (3), G patch grid side, T tokens (1 + G*G), D hidden size, N heads, K per-head dim,
M MLP hidden, P pretrained grid side.

Position-embedding interpolation reproduces ``Dinov2Embeddings.interpolate_pos_encoding``:
``torch.nn.functional.interpolate(mode="bicubic", align_corners=False, size=(G, G))`` in float32,
no antialias (also when shrinking), the output size given (so the scale is exactly P / G, not
DINOv2's original ``scale_factor`` with its +0.1 offset). It is skipped only when the token count
equals the pretrained one (and the input is square, which it always is here).

Preprocessing protocols (``preprocess``), both ending in ``(x - mean) / std`` per channel:

    default       the float image at its native precision, replicated to 3 channels, resized
                  with the processor's PIL filter (bicubic for Rad-DINO) in float ("F" mode) to
                  the shortest edge, centre-cropped: the processor's geometry without its uint8
                  quantisation (the HF processor quantises a float image before resizing).
    chexgenbench  CheXGenBench's chain: 8-bit image (round(x * 255)) -> PIL convert("RGB") ->
                  PIL bilinear resize to 299 x 299 (uint8) -> then the processor's own steps:
                  PIL resize of the uint8 image to the shortest edge, centre crop, rescale by
                  ``rescale_factor`` (in float64, then float32, as transformers does), normalise.
                  (CheXGenBench's metrics/fid.py goes uint8 -> ToTensor (/255) -> (*255).to(uint8)
                  between the two resizes; that float32 round trip is exact for all 256 values,
                  so the uint8 image is passed on unchanged here. Its AutoImageProcessor is the
                  slow, PIL-based ``BitImageProcessor`` in transformers 4.57; a "Fast" processor
                  resizes with torchvision instead and gives different pixels.)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cxr_rf import errors

NAME = "raddino"
CHEXGENBENCH_SIZE = 299  # CheXGenBench resizes every image to Inception's 299 px first
FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
# float32 matmuls at full precision on every backend: the features feed distances (FD, PRDC,
# privacy) that must not move with the accelerator's default TF32/bf16 matmul passes.
PRECISION = jax.lax.Precision.HIGHEST


def _need(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise errors.UserError(
            f"{path} not found: point at a local Hugging Face DINOv2 folder holding "
            f"{', '.join(FILES)} (e.g. microsoft/rad-dino, downloaded beforehand); nothing is "
            f"downloaded")
    return path


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise errors.UserError(f"cannot read {path}: {e}".replace("\n", " ")) from None


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """The fields of a Hugging Face ``config.json`` this port uses (defaults: transformers')."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    patch_size: int = 14
    image_size: int = 518
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    hidden_act: str = "gelu"

    @classmethod
    def from_json(cls, path: str) -> "Dinov2Config":
        d = _read_json(path)
        cfg = cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})
        if d.get("model_type", "dinov2") != "dinov2":
            raise errors.UserError(f"{path}: model_type {d.get('model_type')!r} is not supported; "
                                   f"only 'dinov2' (Dinov2Model, e.g. microsoft/rad-dino)")
        if d.get("num_register_tokens", 0) or "registers" in str(d.get("architectures", "")):
            raise errors.UserError(f"{path}: DINOv2 with register tokens is not supported")
        if d.get("use_swiglu_ffn", False):
            raise errors.UserError(f"{path}: use_swiglu_ffn=true (the giant DINOv2) is not supported")
        if cfg.hidden_act != "gelu":
            raise errors.UserError(f"{path}: hidden_act {cfg.hidden_act!r} is not supported; only 'gelu'")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise errors.UserError(f"{path}: hidden_size {cfg.hidden_size} is not a multiple of "
                                   f"num_attention_heads {cfg.num_attention_heads}")
        return cfg

    @property
    def grid(self) -> int:
        """P: the pretrained patch grid side (image_size // patch_size)."""
        return self.image_size // self.patch_size

    @property
    def mlp_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class Processor:
    """The fields of a ``BitImageProcessor`` ``preprocessor_config.json`` (defaults: its own)."""
    do_resize: bool = True
    size: dict = dataclasses.field(default_factory=lambda: {"shortest_edge": 224})
    resample: int = 3               # PIL.Image.BICUBIC
    do_center_crop: bool = True
    crop_size: dict = dataclasses.field(default_factory=lambda: {"height": 224, "width": 224})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)   # transformers' OPENAI_CLIP_MEAN
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)   # (its BitImageProcessor default)

    @classmethod
    def from_json(cls, path: str) -> "Processor":
        d = _read_json(path)
        p = cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})
        kind = d.get("image_processor_type", "BitImageProcessor")
        if kind != "BitImageProcessor":
            raise errors.UserError(f"{path}: image_processor_type {kind!r} is not supported; "
                                   f"only 'BitImageProcessor'")
        if not ("shortest_edge" in p.size or {"height", "width"} <= set(p.size)):
            raise errors.UserError(f"{path}: size must have shortest_edge or height and width, "
                               f"got {p.size}")
        out = p.crop_size if p.do_center_crop else p.size
        if "height" in out and out["height"] != out.get("width"):
            raise errors.UserError(f"{path}: only square model inputs are supported, got {out}")
        if not all(len(np.atleast_1d(v)) in (1, 3) for v in (p.image_mean, p.image_std)):
            raise errors.UserError(f"{path}: image_mean and image_std need 1 or 3 values")
        return p

    @property
    def resolution(self) -> int:
        """S: the side of the model input (the crop; the resize target without a crop)."""
        if self.do_center_crop:
            return int(self.crop_size["height"])
        return int(self.size.get("shortest_edge", self.size.get("height")))

    def resize_hw(self, h: int, w: int) -> tuple[int, int]:
        """transformers' ``get_resize_output_image_size`` (shortest edge, or a fixed size)."""
        if "shortest_edge" not in self.size:
            return int(self.size["height"]), int(self.size["width"])
        s = int(self.size["shortest_edge"])
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = s, int(s * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------

def _center_crop(x_HxWxC: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """transformers' ``center_crop``: floor-centred, zero-padded where the image is smaller."""
    h, w = x_HxWxC.shape[:2]
    if h < ch or w < cw:
        ph, pw = max(ch, h), max(cw, w)
        pad = np.zeros((ph, pw) + x_HxWxC.shape[2:], x_HxWxC.dtype)
        t, l = math.ceil((ph - h) / 2), math.ceil((pw - w) / 2)
        pad[t:t + h, l:l + w] = x_HxWxC
        x_HxWxC, h, w = pad, ph, pw
    top, left = (h - ch) // 2, (w - cw) // 2
    return x_HxWxC[top:top + ch, left:left + cw]


def preprocess(images_BxHxW: np.ndarray, processor: Processor, protocol: str = "default") -> np.ndarray:
    """pixels_BxSxSxC float32, normalised, from grayscale images in [0, 1] (see module doc)."""
    from PIL import Image

    from cxr_rf.features import PROTOCOLS, check_images
    if protocol not in PROTOCOLS:
        raise errors.UserError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    x_BxHxW = check_images(images_BxHxW)
    p = processor
    mean_C = np.broadcast_to(np.asarray(p.image_mean, np.float32), (3,))
    std_C = np.broadcast_to(np.asarray(p.image_std, np.float32), (3,))
    out = []
    for im_HxW in x_BxHxW:
        if protocol == "chexgenbench":
            pil = Image.fromarray(np.round(im_HxW * 255.0).astype(np.uint8), mode="L").convert("RGB")
            if pil.size != (CHEXGENBENCH_SIZE, CHEXGENBENCH_SIZE):
                pil = pil.resize((CHEXGENBENCH_SIZE, CHEXGENBENCH_SIZE), Image.BILINEAR)
            if p.do_resize:
                h, w = p.resize_hw(pil.height, pil.width)
                pil = pil.resize((w, h), p.resample)
            y_HxWxC = np.asarray(pil)
        else:
            y_HxW = im_HxW
            if p.do_resize:
                h, w = p.resize_hw(*y_HxW.shape)
                if (h, w) != y_HxW.shape:
                    y_HxW = np.asarray(Image.fromarray(y_HxW, mode="F").resize((w, h), p.resample),
                                       np.float32)
            y_HxWxC = np.repeat(y_HxW[..., None], 3, axis=-1)
        if p.do_center_crop:
            y_HxWxC = _center_crop(y_HxWxC, int(p.crop_size["height"]), int(p.crop_size["width"]))
        if protocol == "chexgenbench" and p.do_rescale:
            # transformers' rescale: upcast to float64, scale, then float32
            y_HxWxC = (y_HxWxC.astype(np.float64) * p.rescale_factor).astype(np.float32)
        y_HxWxC = y_HxWxC.astype(np.float32)
        if p.do_normalize:
            y_HxWxC = (y_HxWxC - mean_C) / std_C
        out.append(y_HxWxC)
    if not out:
        s = processor.resolution
        return np.zeros((0, s, s, 3), np.float32)
    return np.stack(out).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------

def _cubic_weights_GxP(g: int, p: int) -> np.ndarray:
    """[g, p] matrix of ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False,
    size=g)`` along one axis of length p: Keys' cubic with A = -0.75, source coordinate
    (i + 0.5) * p / g - 0.5, taps clamped to the border (no antialias)."""
    a = -0.75
    w = np.zeros((g, p), np.float64)
    scale = np.float32(p) / np.float32(g)   # torch computes the scale and coordinates in float32
    for i in range(g):
        src = np.float32(scale * np.float32(i + 0.5) - np.float32(0.5))
        i0 = int(np.floor(src))
        t = float(src - np.float32(i0))
        taps = (((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                ((a + 2) * t - (a + 3)) * t * t + 1,
                ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
                ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a)
        for k, c in enumerate(taps):
            w[i, min(max(i0 - 1 + k, 0), p - 1)] += c
    return w


class Embeddings(nn.Module):
    cfg: Dinov2Config

    @nn.compact
    def __call__(self, x_BxSxSxC):
        c, d = self.cfg, self.cfg.hidden_size
        x_BxGxGxD = nn.Conv(d, (c.patch_size, c.patch_size), strides=c.patch_size, padding="VALID",
                            precision=PRECISION, name="patch")(x_BxSxSxC)
        b, g = x_BxGxGxD.shape[0], x_BxGxGxD.shape[1]
        cls_1x1xD = self.param("cls_token", nn.initializers.zeros, (1, 1, d))
        pos_1xTxD = self.param("position_embeddings", nn.initializers.zeros, (1, c.grid ** 2 + 1, d))
        if g != c.grid:
            w_GxP = jnp.asarray(_cubic_weights_GxP(g, c.grid), jnp.float32)
            grid_PxPxD = pos_1xTxD[0, 1:].reshape(c.grid, c.grid, d)
            grid_GxGxD = jnp.einsum("ip,jq,pqd->ijd", w_GxP, w_GxP, grid_PxPxD, precision=PRECISION)
            pos_1xTxD = jnp.concatenate([pos_1xTxD[:, :1], grid_GxGxD.reshape(1, g * g, d)], axis=1)
        x_BxTxD = jnp.concatenate([jnp.broadcast_to(cls_1x1xD, (b, 1, d)),
                                   x_BxGxGxD.reshape(b, g * g, d)], axis=1)
        return x_BxTxD + pos_1xTxD


class Attention(nn.Module):
    cfg: Dinov2Config

    @nn.compact
    def __call__(self, x_BxTxD):
        c = self.cfg
        n, k = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        b, t, _ = x_BxTxD.shape

        def proj(name):
            y = nn.Dense(c.hidden_size, use_bias=c.qkv_bias, precision=PRECISION, name=name)(x_BxTxD)
            return y.reshape(b, t, n, k)
        q_BxTxNxK, k_BxTxNxK, v_BxTxNxK = proj("query"), proj("key"), proj("value")
        logits_BxNxTxT = jnp.einsum("bqnk,btnk->bnqt", q_BxTxNxK, k_BxTxNxK,
                                    precision=PRECISION) * (k ** -0.5)
        probs_BxNxTxT = jax.nn.softmax(logits_BxNxTxT, axis=-1)
        o_BxTxNxK = jnp.einsum("bnqt,btnk->bqnk", probs_BxNxTxT, v_BxTxNxK, precision=PRECISION)
        return nn.Dense(c.hidden_size, precision=PRECISION, name="out")(o_BxTxNxK.reshape(b, t, n * k))


class Block(nn.Module):
    cfg: Dinov2Config

    @nn.compact
    def __call__(self, x_BxTxD):
        c = self.cfg
        def ls(name):  # LayerScale [D], shaped [1, 1, D] for the residual branch
            return self.param(name, nn.initializers.ones, (c.hidden_size,))[None, None, :]
        h_BxTxD = nn.LayerNorm(c.layer_norm_eps, name="norm1")(x_BxTxD)
        x_BxTxD = x_BxTxD + ls("layer_scale1") * Attention(c, name="attention")(h_BxTxD)
        h_BxTxD = nn.LayerNorm(c.layer_norm_eps, name="norm2")(x_BxTxD)
        h_BxTxM = nn.Dense(c.mlp_dim, precision=PRECISION, name="fc1")(h_BxTxD)
        # transformers' "gelu" is the exact erf GELU, not the tanh approximation
        h_BxTxD = nn.Dense(c.hidden_size, precision=PRECISION, name="fc2")(
            nn.gelu(h_BxTxM, approximate=False))
        return x_BxTxD + ls("layer_scale2") * h_BxTxD


class Dinov2(nn.Module):
    """pixels_BxSxSxC -> (pooler_BxD, last_hidden_BxTxD); S any multiple of the patch size
    (a remainder is dropped by the stride, as in the PyTorch conv)."""
    cfg: Dinov2Config

    @nn.compact
    def __call__(self, x_BxSxSxC):
        x_BxTxD = Embeddings(self.cfg, name="embeddings")(x_BxSxSxC)
        for i in range(self.cfg.num_hidden_layers):
            x_BxTxD = Block(self.cfg, name=f"layer_{i}")(x_BxTxD)
        x_BxTxD = nn.LayerNorm(self.cfg.layer_norm_eps, name="layernorm")(x_BxTxD)
        return x_BxTxD[:, 0], x_BxTxD


# --------------------------------------------------------------------------------------------
# Weights: Hugging Face names -> the Flax tree
# --------------------------------------------------------------------------------------------

_LINEAR = lambda w: w.T                                   # noqa: E731  torch [out, in] -> [in, out]
_CONV = lambda w: w.transpose(2, 3, 1, 0)                 # noqa: E731  [D, C, p, p] -> [p, p, C, D]
_SAME = lambda w: w                                       # noqa: E731


def _hf_shape(convert, flax_shape: tuple) -> tuple:
    """The Hugging Face shape that ``convert`` maps onto ``flax_shape``."""
    if convert is _LINEAR:
        return tuple(flax_shape[::-1])
    if convert is _CONV:
        return tuple(flax_shape[i] for i in (3, 2, 0, 1))
    return tuple(flax_shape)


def weight_map(cfg: Dinov2Config) -> dict[tuple[str, ...], tuple[str, Any]]:
    """Flax path -> (Hugging Face name, conversion): THE table between the two layouts.
    (``embeddings.mask_token`` is unused at inference and not read.)"""
    m = {("embeddings", "cls_token"): ("embeddings.cls_token", _SAME),
         ("embeddings", "position_embeddings"): ("embeddings.position_embeddings", _SAME),
         ("embeddings", "patch", "kernel"): ("embeddings.patch_embeddings.projection.weight", _CONV),
         ("embeddings", "patch", "bias"): ("embeddings.patch_embeddings.projection.bias", _SAME),
         ("layernorm", "scale"): ("layernorm.weight", _SAME),
         ("layernorm", "bias"): ("layernorm.bias", _SAME)}
    for i in range(cfg.num_hidden_layers):
        hf, fx = f"encoder.layer.{i}.", f"layer_{i}"
        for norm in ("norm1", "norm2"):
            m[(fx, norm, "scale")] = (hf + norm + ".weight", _SAME)
            m[(fx, norm, "bias")] = (hf + norm + ".bias", _SAME)
        for ls in ("layer_scale1", "layer_scale2"):
            m[(fx, ls)] = (hf + ls + ".lambda1", _SAME)
        linears = {("attention", "out"): "attention.output.dense",
                   ("fc1",): "mlp.fc1", ("fc2",): "mlp.fc2"}
        for proj in ("query", "key", "value"):
            linears[("attention", proj)] = "attention.attention." + proj
        for fpath, hname in linears.items():
            m[(fx,) + fpath + ("kernel",)] = (hf + hname + ".weight", _LINEAR)
            if fpath[-1] not in ("query", "key", "value") or cfg.qkv_bias:
                m[(fx,) + fpath + ("bias",)] = (hf + hname + ".bias", _SAME)
    return m


def load_params(path: str, cfg: Dinov2Config) -> dict:
    """The Flax parameters from ``model.safetensors`` (float32), every shape checked."""
    from flax.traverse_util import flatten_dict, unflatten_dict
    from safetensors.numpy import load_file
    try:
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001  (a corrupt or foreign file: the user's to fix)
        raise errors.UserError(f"cannot read {path}: {e}".replace("\n", " ")) from None
    # A checkpoint of a model with a head (Dinov2For...) prefixes the backbone with "dinov2."
    tensors = {k.removeprefix("dinov2."): v for k, v in tensors.items()}
    pixels = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
    shapes = flatten_dict(jax.eval_shape(Dinov2(cfg).init, jax.random.key(0), pixels)["params"])
    table = weight_map(cfg)
    assert set(table) == set(shapes), set(table) ^ set(shapes)
    flat = {}
    for fpath, (hname, convert) in table.items():
        if hname not in tensors:
            raise errors.UserError(f"{path} has no weight {hname!r} (needed by the config: "
                                   f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size})")
        want = _hf_shape(convert, shapes[fpath].shape)
        if tuple(tensors[hname].shape) != want:
            raise errors.UserError(f"{path}: weight {hname!r} has shape "
                                   f"{tuple(tensors[hname].shape)}, config.json implies {want}")
        w = convert(np.asarray(tensors[hname], np.float32))
        flat[fpath] = w
    return unflatten_dict(flat)


# --------------------------------------------------------------------------------------------
# The extractor
# --------------------------------------------------------------------------------------------

class Dinov2Extractor:
    """``cxr_rf.features`` extractor: ``__call__(images_BxHxW) -> feats_BxD`` (pooler_output).

    Images go through in fixed batches of ``batch_size`` (the last one zero-padded), so one
    input size compiles once; each batch is split over a 1-D ("data",) mesh of the devices with
    the parameters replicated.
    """
    name = NAME

    def __init__(self, cfg: Dinov2Config, processor: Processor, params, *,
                 protocol: str = "default", batch_size: int = 32, devices=None):
        from cxr_rf.features import PROTOCOLS
        if protocol not in PROTOCOLS:
            raise errors.UserError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if int(batch_size) < 1:
            raise errors.UserError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg, self.processor, self.protocol = cfg, processor, protocol
        self.dim, self.resolution = cfg.hidden_size, processor.resolution
        self.mesh = Mesh(np.array(list(jax.local_devices() if devices is None else devices)), ("data",))
        n = self.mesh.size
        self.batch_size = -(-int(batch_size) // n) * n   # a multiple of the device count
        self._data = NamedSharding(self.mesh, PartitionSpec("data"))
        self.params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))
        model = Dinov2(cfg)
        # jit caches one executable per input shape: with fixed batches that is one per size
        self._forward = jax.jit(lambda p, x: model.apply({"params": p}, x),
                                in_shardings=(None, self._data))

    def embed_pixels(self, pixels_BxSxSxC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pooler_BxD, last_hidden_BxTxD) of preprocessed pixels (any multiple of the patch)."""
        x = np.asarray(pixels_BxSxSxC, np.float32)
        b, bs = len(x), self.batch_size
        pooled, hidden = [], []
        for i in range(0, max(b, 1), bs):
            chunk = x[i:i + bs]
            pad = np.zeros((bs - len(chunk),) + x.shape[1:], np.float32)
            p_BxD, h_BxTxD = self._forward(self.params,
                                           jax.device_put(np.concatenate([chunk, pad]), self._data))
            pooled.append(np.asarray(p_BxD)[:len(chunk)])
            hidden.append(np.asarray(h_BxTxD)[:len(chunk)])
        return np.concatenate(pooled), np.concatenate(hidden)

    def hidden_states(self, images_BxHxW: np.ndarray) -> np.ndarray:
        """last_hidden_BxTxD (after the final LayerNorm) of images in [0, 1]."""
        return self.embed_pixels(preprocess(images_BxHxW, self.processor, self.protocol))[1]

    def __call__(self, images_BxHxW: np.ndarray) -> np.ndarray:
        """feats_BxD: pooler_output (CLS after the final LayerNorm), float32."""
        return self.embed_pixels(preprocess(images_BxHxW, self.processor, self.protocol))[0]


def load(path: str, *, protocol: str = "default", batch_size: int = 32, devices=None) -> Dinov2Extractor:
    """The Rad-DINO (any DINOv2) extractor from a local Hugging Face folder."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise errors.UserError(
            f"{path} is not a directory: point at a local Hugging Face DINOv2 folder holding "
            f"{', '.join(FILES)} (e.g. microsoft/rad-dino, downloaded beforehand); nothing is "
            f"downloaded")
    cfg_path, weights_path, proc_path = (_need(path, f) for f in FILES)
    cfg = Dinov2Config.from_json(cfg_path)
    processor = Processor.from_json(proc_path)
    return Dinov2Extractor(cfg, processor, load_params(weights_path, cfg), protocol=protocol,
                           batch_size=batch_size, devices=devices)
