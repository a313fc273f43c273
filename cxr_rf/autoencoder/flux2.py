"""The FLUX.2 autoencoder (Apache-2.0), loaded from a local diffusers folder onto ``Autoencoder``.

The folder is a diffusers ``AutoencoderKLFlux2`` (e.g. the ``vae/`` subfolder of
black-forest-labs/FLUX.2-dev, downloaded beforehand; nothing here downloads):

    config.json                          ``_class_name: "AutoencoderKLFlux2"``
    diffusion_pytorch_model.safetensors  its weights, read with ``safetensors.numpy`` (no torch)

What FLUX.2's autoencoder is in diffusers 0.42.1 (``models/autoencoders/autoencoder_kl_flux2.py``
and ``pipelines/flux2/pipeline_flux2.py``):

* the FLUX.1 / SD ``AutoencoderKL`` body unchanged (``vae.Encoder``/``vae.Decoder``: conv_in,
  ``DownEncoderBlock2D`` levels of ``layers_per_block`` ResnetBlock2D with a pad-(0,1,0,1)
  stride-2 conv downsampler, mid block ResNet / 1-head attention / ResNet, GroupNorm eps 1e-6,
  SiLU, conv_out to 2·latent; decoder mirror with ``layers_per_block + 1`` ResNets per level and
  nearest-2x + conv upsamplers), plus 1x1 ``quant_conv`` / ``post_quant_conv``. Defaults:
  block_out_channels (128, 256, 512, 512) (f8), layers_per_block 2, **latent_channels 32**,
  norm_num_groups 32, RGB.
* ``patch_size`` (2, 2): the pipeline patchifies the posterior **mode (mean)** 2x2 into
  4·32 = 128 channels at f16 (``_patchify_latents``: channel c·4 + dy·2 + dx), and
* a ``BatchNorm2d(128, affine=False, eps=batch_norm_eps=1e-4)`` whose running statistics are
  never applied by the module itself: the pipeline normalises the patchified latent with
  ``(z - running_mean) / sqrt(running_var + eps)`` before the transformer and inverts that
  before unpatchifying and decoding. There is no scaling_factor / shift_factor (FLUX.1's).

Here: ``AEConfig(space_to_depth=2, use_quant_conv=True, ...)`` reproduces the body and the 2x2
packing in the same channel order, and the BatchNorm statistics become the model's
``latent_stats`` (shift = running_mean, scale = sqrt(running_var + batch_norm_eps)), so
``normalize(encode(x)[0])`` is the pipeline's transformer input.

RGB -> grayscale (``gray=True``, the default; radiographs are one channel):

* first conv: its 3 input-channel kernels are summed into 1. For a gray image g replicated to
  RGB, ``sum_c W[:, c] * g = (sum_c W[:, c]) * g``: every encoder activation is the same as for
  the RGB model on (g, g, g) (tests check this against diffusers).
* last conv: its 3 output channels (kernels and biases) are averaged into 1, so the gray output
  is the mean of the RGB model's three output channels (the conv is linear).

Weights are converted once with the explicit table ``weight_map`` (Flax path -> diffusers name,
conversion): conv OIHW -> HWIO, linear (out, in) -> (in, out), norms as they are.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cxr_rf import errors
from cxr_rf.autoencoder.model import DTYPES, STATS, AEConfig, Autoencoder

CLASS_NAME = "AutoencoderKLFlux2"
FILES = ("config.json", "diffusion_pytorch_model.safetensors")
_HINT = (f"point at a local diffusers {CLASS_NAME} folder holding {', '.join(FILES)} (e.g. the "
         f"vae/ subfolder of black-forest-labs/FLUX.2-dev, downloaded beforehand); nothing is "
         f"downloaded")


def _need(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise errors.UserError(f"{path} not found: {_HINT}")
    return path


def _conv(w):       # torch OIHW -> flax HWIO
    return w.transpose(2, 3, 1, 0)


def _linear(w):     # torch (out, in) -> flax (in, out)
    return w.T


def _same(w):
    return w


def _sum_in(w):     # first conv, RGB -> gray: sum the 3 input-channel kernels
    return _conv(w.sum(axis=1, keepdims=True))


def _mean_out(w):   # last conv, RGB -> gray: average the 3 output-channel kernels
    return _conv(w.mean(axis=0, keepdims=True))


def _mean_bias(b):  # ... and its biases
    return b.mean(axis=0, keepdims=True)


def _torch_shape(convert: Callable, flax_shape: tuple, rgb: int) -> tuple:
    """The diffusers tensor shape that ``convert`` maps onto ``flax_shape``."""
    if convert in (_conv, _sum_in, _mean_out):
        h, w, i, o = flax_shape
        return {_conv: (o, i, h, w), _sum_in: (o, rgb, h, w), _mean_out: (rgb, i, h, w)}[convert]
    if convert is _linear:
        return tuple(flax_shape[::-1])
    if convert is _mean_bias:
        return (rgb,)
    return tuple(flax_shape)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

def config_from_diffusers(d: dict, *, gray: bool = True, dtype: str = "float32",
                          param_dtype: str = "float32", where: str = "config.json") -> AEConfig:
    """The ``AEConfig`` of a diffusers ``AutoencoderKLFlux2`` config dict (every field checked)."""
    def bad(msg):
        raise errors.UserError(f"{where}: {msg}")
    if d.get("_class_name") != CLASS_NAME:
        bad(f"_class_name {d.get('_class_name')!r} is not supported; only {CLASS_NAME!r} "
            f"(the FLUX.2 autoencoder)")
    boc = [int(c) for c in d.get("block_out_channels", (128, 256, 512, 512))]
    dec = d.get("decoder_block_out_channels") or boc
    levels = len(boc)
    for key, want in (("down_block_types", "DownEncoderBlock2D"),
                      ("up_block_types", "UpDecoderBlock2D")):
        types = list(d.get(key, [want] * levels))
        if types != [want] * levels:
            bad(f"{key} {types} is not supported; only {levels} x {want!r}")
    if d.get("act_fn", "silu") != "silu":
        bad(f"act_fn {d.get('act_fn')!r} is not supported; only 'silu'")
    if len(dec) != levels or any(c % boc[0] for c in list(boc) + list(dec)):
        bad(f"block_out_channels {boc} / decoder_block_out_channels {dec} must have the same "
            f"length and be multiples of the first width")
    patch = list(d.get("patch_size", (2, 2)))
    if len(patch) != 2 or patch[0] != patch[1] or patch[0] not in (1, 2):
        bad(f"patch_size {patch} is not supported; only [2, 2] (or [1, 1])")
    quant = bool(d.get("use_quant_conv", True))
    if quant != bool(d.get("use_post_quant_conv", True)):
        bad("use_quant_conv and use_post_quant_conv must be equal")
    cin, cout = int(d.get("in_channels", 3)), int(d.get("out_channels", 3))
    if cin != cout:
        bad(f"in_channels {cin} != out_channels {cout} is not supported")
    if gray and cin not in (1, 3):
        bad(f"gray=True needs in_channels 3 (RGB, summed into 1) or 1, got {cin}")
    try:
        return AEConfig(in_channels=1 if gray else cin, channels=boc[0],
                        channel_mult=tuple(c // boc[0] for c in boc),
                        decoder_channel_mult=(tuple(c // boc[0] for c in dec)
                                              if list(dec) != list(boc) else None),
                        num_res_blocks=int(d.get("layers_per_block", 2)),
                        latent_channels=int(d.get("latent_channels", 32)),
                        space_to_depth=int(patch[0]),
                        mid_attention=bool(d.get("mid_block_add_attention", True)),
                        norm_groups=int(d.get("norm_num_groups", 32)), downsample="conv",
                        use_quant_conv=quant, dtype=dtype, param_dtype=param_dtype)
    except errors.UserError as e:
        bad(str(e))


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

def weight_map(cfg: AEConfig, *, rgb_to_gray: bool) -> dict[tuple, tuple[str, Callable]]:
    """The one table: Flax param path -> (diffusers tensor name, conversion)."""
    m: dict[tuple, tuple[str, Callable]] = {}

    def conv(fpath, name, kernel=_conv, bias=_same):
        m[fpath + ("kernel",)] = (name + ".weight", kernel)
        m[fpath + ("bias",)] = (name + ".bias", bias)

    def norm(fpath, name):
        m[fpath + ("scale",)] = (name + ".weight", _same)
        m[fpath + ("bias",)] = (name + ".bias", _same)

    def resnet(fpath, name, has_shortcut):
        norm(fpath + ("norm1",), name + ".norm1")
        conv(fpath + ("conv1",), name + ".conv1")
        norm(fpath + ("norm2",), name + ".norm2")
        conv(fpath + ("conv2",), name + ".conv2")
        if has_shortcut:
            conv(fpath + ("shortcut",), name + ".conv_shortcut")

    def mid(fpath, name):
        resnet(fpath + ("res_0",), name + ".resnets.0", False)
        if cfg.mid_attention:
            a = name + ".attentions.0"
            norm(fpath + ("attn", "norm"), a + ".group_norm")
            for ours, theirs in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("out", "to_out.0")):
                conv(fpath + ("attn", ours), f"{a}.{theirs}", kernel=_linear)
        resnet(fpath + ("res_1",), name + ".resnets.1", False)

    e, wid = ("encoder",), cfg.widths
    conv(e + ("conv_in",), "encoder.conv_in", kernel=_sum_in if rgb_to_gray else _conv)
    prev = wid[0]
    for i, w in enumerate(wid):
        for j in range(cfg.num_res_blocks):
            resnet(e + (f"down_{i}_res_{j}",), f"encoder.down_blocks.{i}.resnets.{j}",
                   (prev if j == 0 else w) != w)
        prev = w
        if i < len(wid) - 1:
            conv(e + (f"down_{i}_downsample",), f"encoder.down_blocks.{i}.downsamplers.0.conv")
    mid(e + ("mid",), "encoder.mid_block")
    norm(e + ("norm_out",), "encoder.conv_norm_out")
    conv(e + ("conv_out",), "encoder.conv_out")
    if cfg.use_quant_conv:
        conv(("quant_conv",), "quant_conv")
        conv(("post_quant_conv",), "post_quant_conv")

    d, wid = ("decoder",), cfg.decoder_widths[::-1]
    conv(d + ("conv_in",), "decoder.conv_in")
    mid(d + ("mid",), "decoder.mid_block")
    prev = wid[0]
    for i, w in enumerate(wid):
        for j in range(cfg.num_res_blocks + 1):
            resnet(d + (f"up_{i}_res_{j}",), f"decoder.up_blocks.{i}.resnets.{j}",
                   (prev if j == 0 else w) != w)
        prev = w
        if i < len(wid) - 1:
            conv(d + (f"up_{i}_upsample",), f"decoder.up_blocks.{i}.upsamplers.0.conv")
    norm(d + ("norm_out",), "decoder.conv_norm_out")
    conv(d + ("conv_out",), "decoder.conv_out",
         kernel=_mean_out if rgb_to_gray else _conv, bias=_mean_bias if rgb_to_gray else _same)
    return m


def load_variables(path: str, cfg: AEConfig, *, rgb_to_gray: bool, bn_eps: float) -> dict:
    """{"params", "latent_stats"} (param_dtype; unboxed) from the safetensors file, every shape
    checked."""
    from flax import linen as nn
    from flax.traverse_util import flatten_dict, unflatten_dict
    from safetensors.numpy import load_file
    try:
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001  (a corrupt or foreign file: the user's to fix)
        raise errors.UserError(f"cannot read {path}: {e}".replace("\n", " ")) from None
    x = jax.ShapeDtypeStruct((1, 4 * cfg.factor, 4 * cfg.factor, cfg.in_channels), jnp.float32)
    shapes = flatten_dict(nn.unbox(jax.eval_shape(Autoencoder(cfg).init, jax.random.key(0), x)
                                   ["params"]))
    table = weight_map(cfg, rgb_to_gray=rgb_to_gray)
    assert set(table) == set(shapes), set(table) ^ set(shapes)
    pdt = DTYPES[cfg.param_dtype]

    def get(name, want):
        if name not in tensors:
            raise errors.UserError(f"{path} has no weight {name!r} (needed by config.json: "
                                   f"widths {list(cfg.widths)}, {cfg.num_res_blocks} res blocks "
                                   f"per level)")
        if tuple(tensors[name].shape) != tuple(want):
            raise errors.UserError(f"{path}: weight {name!r} has shape "
                                   f"{tuple(tensors[name].shape)}, config.json implies {tuple(want)}")
        return np.asarray(tensors[name], np.float32)

    rgb = 3 if rgb_to_gray else cfg.in_channels
    flat = {}
    for fpath, (name, convert) in table.items():
        w = convert(get(name, _torch_shape(convert, shapes[fpath].shape, rgb)))
        flat[fpath] = jnp.asarray(w, pdt)
    z = (cfg.packed_channels,)
    mean, var = get("bn.running_mean", z), get("bn.running_var", z)
    stats = {"shift": jnp.asarray(mean, jnp.float32),
             "scale": jnp.asarray(np.sqrt(var.astype(np.float64) + bn_eps), jnp.float32)}
    return {"params": unflatten_dict(flat), STATS: stats}


def load(folder: str, *, gray: bool = True, dtype: str = "float32",
         param_dtype: str = "float32") -> tuple[AEConfig, dict]:
    """(AEConfig, variables) of the FLUX.2 autoencoder in a local diffusers folder.

    ``gray`` adapts the RGB model to one channel (see the module doc). ``variables`` holds
    "params" and "latent_stats" (the BatchNorm running statistics): pass it to
    ``Autoencoder(cfg).apply``.
    """
    if not os.path.isdir(folder):
        raise errors.UserError(f"{folder} is not a directory: {_HINT}")
    cfg_path, weights = _need(folder, FILES[0]), _need(folder, FILES[1])
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise errors.UserError(f"cannot read {cfg_path}: {e}".replace("\n", " ")) from None
    if not isinstance(d, dict):
        raise errors.UserError(f"{cfg_path}: not a JSON object")
    cfg = config_from_diffusers(d, gray=gray, dtype=dtype, param_dtype=param_dtype,
                                where=cfg_path)
    rgb_to_gray = gray and int(d.get("in_channels", 3)) == 3
    variables = load_variables(weights, cfg, rgb_to_gray=rgb_to_gray,
                               bn_eps=float(d.get("batch_norm_eps", 1e-4)))
    return cfg, variables
