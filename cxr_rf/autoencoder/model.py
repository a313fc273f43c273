"""A convolutional KL autoencoder for one-channel radiographs (the latent of "latent mode").

The architecture is the LDM / SD / FLUX autoencoder (diffusers ``Encoder``/``Decoder`` in
``models/autoencoders/vae.py``), so the FLUX.2 weights load onto it unchanged
(``cxr_rf.autoencoder.flux2``):

    x_BxHxWxC in [-1, 1] ─conv_in─> L levels of ``num_res_blocks`` ResBlocks (GroupNorm, SiLU,
    conv 3x3; 1x1 shortcut on a width change), each level but the last followed by a 2x
    downsample (``downsample="conv"``: zero-pad right/bottom by 1, conv 3x3 stride 2, as
    diffusers; ``"avgpool"``: 2x2 mean) ─> mid: ResBlock, [single-head attention], ResBlock
    ─> GroupNorm, SiLU, conv_out to 2·latent_channels (mean ‖ logvar) [─> 1x1 quant_conv]
    ─> optional space-to-depth s x s ─> (mean, logvar) at factor f = 2^(L-1)·s.

    Decoder: the mirror. [1x1 post_quant_conv] ─conv_in─> mid ─> L levels of
    ``num_res_blocks + 1`` ResBlocks, each but the last followed by nearest 2x upsampling and a
    conv 3x3 ─> GroupNorm, SiLU, conv_out to C.

Space-to-depth (``space_to_depth=2``, the FLUX.2 form: an f8, 32-channel posterior becomes f16
with 128 channels) orders the packed channels ``c·s² + dy·s + dx`` (latent channel major), the
order of diffusers' ``Flux2Pipeline._patchify_latents``, so FLUX.2's per-channel statistics
apply to our packed latent unchanged. Sampling happens after packing (element-wise, so it is the
same distribution); ``decode`` unpacks first.

Decoding always runs in float32 (the decoder module, its convs and the post-quant conv compute
in float32 whatever ``dtype`` says; parameters stored in a lower ``param_dtype`` are upcast):
half-precision decoders of other projects produce black or NaN images. ``dtype`` is the
encoder's compute dtype; the encoder returns mean and logvar in float32 (logvar clamped to
[-30, 20], as diffusers' ``DiagonalGaussianDistribution``).

Latent normalisation statistics
-------------------------------
Per packed latent channel, ``shift`` and ``scale`` live in their own non-trainable variable
collection ``"latent_stats"`` (``{"shift": [Z], "scale": [Z]}``, Z = latent_channels·s²), next
to ``"params"`` in the variables dict: ``init`` creates them as 0 and 1, they are saved and
restored with the rest of the variables, and an optimiser that only sees ``variables["params"]``
never touches them. ``normalize(z) = (z - shift) / scale``; ``denormalize`` inverts it.
``latent_stats(means)`` computes them from posterior means (per-channel mean and std, so the
normalised batch has zero mean and unit std per channel); ``with_latent_stats`` puts them into a
variables dict. For FLUX.2 the loader fills them from the checkpoint's BatchNorm running
statistics (shift = running_mean, scale = sqrt(running_var + batch_norm_eps)). Applying the
model with only ``{"params": ...}`` works for encode/decode/__call__; ``normalize`` and
``denormalize`` need the collection.

Shape letters: B batch, H/W image height/width, C image channels (``in_channels``), h/w latent
height/width (after packing), Z packed latent channels, F feature channels of a conv layer, T
attention positions (h'·w' of the mid block), s the space-to-depth factor.

Logical axis names (need rules in ``sharding.RULES``, see the report of this module's author):
``conv_in`` input features of conv kernels and dense layers, ``conv_out`` their output features
(and GroupNorm scale/bias). The conv spatial axes are unnamed (replicated).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cxr_rf import errors

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DOWNSAMPLES = ("conv", "avgpool")
STATS = "latent_stats"          # the variable collection of the normalisation statistics
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
STATS_EPS = 1e-6                # floor of a computed per-channel std

_KERNEL = (None, None, "conv_in", "conv_out")
_DENSE = ("conv_in", "conv_out")
_CHAN = ("conv_out",)


@dataclasses.dataclass(frozen=True)
class AEConfig:
    """The autoencoder, as plain hashable values (``AEConfig(**cfg.autoencoder)``).

    Widths per level are ``channels * channel_mult[i]``; the spatial factor is
    ``2 ** (len(channel_mult) - 1) * space_to_depth``. ``decoder_channel_mult`` (default: the
    encoder's) allows a wider decoder (diffusers' ``decoder_block_out_channels``).
    """
    in_channels: int = 1
    channels: int = 128
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 16
    space_to_depth: int = 1
    mid_attention: bool = True
    norm_groups: int = 32
    downsample: str = "conv"
    use_quant_conv: bool = False
    decoder_channel_mult: tuple | None = None
    norm_eps: float = 1e-6
    dtype: str = "float32"          # the encoder's compute dtype; decoding is always float32
    param_dtype: str = "float32"

    def __post_init__(self):
        def bad(msg):
            raise errors.UserError(f"autoencoder config: {msg}")
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        if self.decoder_channel_mult is not None:
            object.__setattr__(self, "decoder_channel_mult",
                               tuple(int(m) for m in self.decoder_channel_mult))
            if len(self.decoder_channel_mult) != len(self.channel_mult):
                bad(f"decoder_channel_mult {self.decoder_channel_mult} needs "
                    f"{len(self.channel_mult)} levels like channel_mult")
        for name in ("in_channels", "channels", "num_res_blocks", "latent_channels",
                     "norm_groups"):
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult + (self.decoder_channel_mult or ())) < 1:
            bad(f"channel_mult must be a non-empty list of positive ints, got {self.channel_mult}")
        if self.space_to_depth not in (1, 2):
            bad(f"space_to_depth must be 1 or 2, got {self.space_to_depth}")
        if self.downsample not in DOWNSAMPLES:
            bad(f"unknown downsample {self.downsample!r}; allowed: {', '.join(DOWNSAMPLES)}")
        for w in self.widths + self.decoder_widths:
            if w % self.norm_groups:
                bad(f"width {w} is not divisible by norm_groups {self.norm_groups}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                bad(f"unknown {name} {getattr(self, name)!r}; allowed: {', '.join(DTYPES)}")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.channels * m for m in self.channel_mult)

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        return tuple(self.channels * m for m in (self.decoder_channel_mult or self.channel_mult))

    @property
    def factor(self) -> int:
        """Pixels per latent position along each side."""
        return 2 ** (len(self.channel_mult) - 1) * self.space_to_depth

    @property
    def packed_channels(self) -> int:
        """Z: latent channels after space-to-depth."""
        return self.latent_channels * self.space_to_depth ** 2

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(h, w, Z) of an H x W image (H and W must be multiples of ``factor``)."""
        if height % self.factor or width % self.factor:
            raise errors.UserError(f"image size {height}x{width} is not a multiple of the "
                                   f"autoencoder factor {self.factor}")
        return height // self.factor, width // self.factor, self.packed_channels


# --------------------------------------------------------------------------------------------
# Space-to-depth (FLUX.2 patchify order) and latent statistics
# --------------------------------------------------------------------------------------------

def space_to_depth(z_BxHxWxC: jax.Array, s: int) -> jax.Array:
    """[B, H, W, C] -> [B, H/s, W/s, C·s²], channel c·s² + dy·s + dx (Flux2 ``_patchify``)."""
    if s == 1:
        return z_BxHxWxC
    b, h, w, c = z_BxHxWxC.shape
    z = z_BxHxWxC.reshape(b, h // s, s, w // s, s, c)
    return z.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // s, w // s, c * s * s)


def depth_to_space(z_BxhxwxZ: jax.Array, s: int) -> jax.Array:
    """The inverse of ``space_to_depth``."""
    if s == 1:
        return z_BxhxwxZ
    b, h, w, zc = z_BxhxwxZ.shape
    z = z_BxhxwxZ.reshape(b, h, w, zc // (s * s), s, s)
    return z.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * s, w * s, zc // (s * s))


def _per_channel(stats: Mapping[str, Any], ndim: int) -> tuple[jax.Array, jax.Array]:
    """(shift, scale) shaped [1, ..., 1, Z] to broadcast against an ndim latent."""
    shape = (1,) * (ndim - 1) + (-1,)
    return (jnp.asarray(stats["shift"], jnp.float32).reshape(shape),
            jnp.asarray(stats["scale"], jnp.float32).reshape(shape))


def normalize(z_BxhxwxZ: jax.Array, stats: Mapping[str, Any]) -> jax.Array:
    """(z - shift) / scale per packed latent channel."""
    shift_1x1x1xZ, scale_1x1x1xZ = _per_channel(stats, z_BxhxwxZ.ndim)
    return (z_BxhxwxZ - shift_1x1x1xZ) / scale_1x1x1xZ


def denormalize(z_BxhxwxZ: jax.Array, stats: Mapping[str, Any]) -> jax.Array:
    """z * scale + shift: the inverse of ``normalize``."""
    shift_1x1x1xZ, scale_1x1x1xZ = _per_channel(stats, z_BxhxwxZ.ndim)
    return z_BxhxwxZ * scale_1x1x1xZ + shift_1x1x1xZ


def latent_stats(means: Any) -> dict[str, np.ndarray]:
    """{"shift": [Z], "scale": [Z]} (float32): the per-channel mean and std (population, floored
    at ``STATS_EPS``) of posterior means [B, h, w, Z], given as one array or an iterable of
    batches (accumulated in float64, so a dataset can stream through)."""
    batches = [means] if hasattr(means, "shape") else means
    n, s1, s2 = 0, None, None
    for m in batches:
        m = np.asarray(m, np.float64)
        m = m.reshape(-1, m.shape[-1])
        s1 = m.sum(0) if s1 is None else s1 + m.sum(0)
        s2 = (m * m).sum(0) if s2 is None else s2 + (m * m).sum(0)
        n += m.shape[0]
    if not n:
        raise errors.UserError("latent_stats needs at least one latent")
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
    return {"shift": mean.astype(np.float32),
            "scale": np.maximum(std, STATS_EPS).astype(np.float32)}


def with_latent_stats(variables: Mapping[str, Any], stats: Mapping[str, Any]) -> dict:
    """A copy of ``variables`` with its ``"latent_stats"`` collection replaced by ``stats``."""
    out = dict(variables)
    out[STATS] = {"shift": jnp.asarray(stats["shift"], jnp.float32),
                  "scale": jnp.asarray(stats["scale"], jnp.float32)}
    return out


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

def _conv(features: int, kernel: int, *, dtype, param_dtype, name: str, strides: int = 1,
          padding: Any = "SAME") -> nn.Conv:
    pad = ((kernel // 2, kernel // 2),) * 2 if padding == "SAME" else padding
    return nn.Conv(features, (kernel, kernel), strides=strides, padding=pad, dtype=dtype,
                   param_dtype=param_dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), _KERNEL),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), _CHAN))


def _norm(groups: int, eps: float, *, dtype, param_dtype, name: str) -> nn.GroupNorm:
    # flax computes the group statistics in float32 for any dtype
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                        name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), _CHAN),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), _CHAN))


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv 3x3, GroupNorm, SiLU, conv 3x3, + (1x1 conv) shortcut."""
    features: int
    groups: int
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x_BxHxWxF: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _norm(self.groups, self.eps, name="norm1", **kw)(x_BxHxWxF)
        h = _conv(self.features, 3, name="conv1", **kw)(nn.silu(h))
        h = _norm(self.groups, self.eps, name="norm2", **kw)(h)
        h = _conv(self.features, 3, name="conv2", **kw)(nn.silu(h))
        if x_BxHxWxF.shape[-1] != self.features:
            x_BxHxWxF = _conv(self.features, 1, name="shortcut", **kw)(x_BxHxWxF)
        return x_BxHxWxF.astype(h.dtype) + h


class Attention(nn.Module):
    """Single-head self-attention over all positions (GroupNorm, q/k/v, out, + residual);
    logits and softmax in float32."""
    groups: int
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x_BxHxWxF: jax.Array) -> jax.Array:
        b, hh, ww, f = x_BxHxWxF.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def dense(name):
            return nn.Dense(f, name=name, **kw,
                            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                     _DENSE),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                   _CHAN))
        h_BxTxF = _norm(self.groups, self.eps, name="norm", **kw)(x_BxHxWxF).reshape(b, hh * ww, f)
        q_BxTxF, k_BxTxF, v_BxTxF = dense("q")(h_BxTxF), dense("k")(h_BxTxF), dense("v")(h_BxTxF)
        logits_BxTxT = jnp.einsum("btf,bsf->bts", q_BxTxF, k_BxTxF,
                                  preferred_element_type=jnp.float32) / math.sqrt(f)
        probs_BxTxT = jax.nn.softmax(logits_BxTxT, axis=-1).astype(v_BxTxF.dtype)
        o_BxTxF = dense("out")(jnp.einsum("bts,bsf->btf", probs_BxTxT, v_BxTxF))
        return x_BxHxWxF.astype(o_BxTxF.dtype) + o_BxTxF.reshape(b, hh, ww, f)


class _Mid(nn.Module):
    cfg: AEConfig
    dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(groups=c.norm_groups, eps=c.norm_eps, dtype=self.dtype,
                  param_dtype=DTYPES[c.param_dtype])
        x = ResBlock(x.shape[-1], name="res_0", **kw)(x)
        if c.mid_attention:
            x = Attention(name="attn", **kw)(x)
        return ResBlock(x.shape[-1], name="res_1", **kw)(x)


class Encoder(nn.Module):
    """x_BxHxWxC -> moments [B, H/f', W/f', 2·latent_channels] (f' = 2^(L-1), before packing)."""
    cfg: AEConfig

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        c = self.cfg
        dt, pdt = DTYPES[c.dtype], DTYPES[c.param_dtype]
        kw = dict(dtype=dt, param_dtype=pdt)
        rkw = dict(groups=c.norm_groups, eps=c.norm_eps, **kw)
        h = _conv(c.widths[0], 3, name="conv_in", **kw)(x_BxHxWxC.astype(dt))
        for i, width in enumerate(c.widths):
            for j in range(c.num_res_blocks):
                h = ResBlock(width, name=f"down_{i}_res_{j}", **rkw)(h)
            if i < len(c.widths) - 1:
                if c.downsample == "conv":   # diffusers Downsample2D(padding=0): pad (0,1,0,1)
                    h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
                    h = _conv(width, 3, strides=2, padding="VALID", name=f"down_{i}_downsample",
                              **kw)(h)
                else:
                    h = nn.avg_pool(h, (2, 2), strides=(2, 2))
        h = _Mid(c, dt, name="mid")(h)
        h = nn.silu(_norm(c.norm_groups, c.norm_eps, name="norm_out", **kw)(h))
        return _conv(2 * c.latent_channels, 3, name="conv_out", **kw)(h)


class Decoder(nn.Module):
    """z [B, h', w', latent_channels] (unpacked) -> x_BxHxWxC, always in float32."""
    cfg: AEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        c = self.cfg
        kw = dict(dtype=jnp.float32, param_dtype=DTYPES[c.param_dtype])
        rkw = dict(groups=c.norm_groups, eps=c.norm_eps, **kw)
        widths = c.decoder_widths[::-1]
        h = _conv(widths[0], 3, name="conv_in", **kw)(z.astype(jnp.float32))
        h = _Mid(c, jnp.float32, name="mid")(h)
        for i, width in enumerate(widths):
            for j in range(c.num_res_blocks + 1):
                h = ResBlock(width, name=f"up_{i}_res_{j}", **rkw)(h)
            if i < len(widths) - 1:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)   # nearest, x2
                h = _conv(width, 3, name=f"up_{i}_upsample", **kw)(h)
        h = nn.silu(_norm(c.norm_groups, c.norm_eps, name="norm_out", **kw)(h))
        return _conv(c.in_channels, 3, name="conv_out", **kw)(h)


class Autoencoder(nn.Module):
    """``encode(x) -> (mean, logvar)``, ``decode(z) -> x``, ``__call__(x, rng) -> (x̂, mean,
    logvar)``; ``normalize`` / ``denormalize`` with the ``"latent_stats"`` collection.

    Images [B, H, W, C] in [-1, 1]; latents [B, H/f, W/f, Z] (packed; see module doc).
    """
    cfg: AEConfig

    def setup(self):
        c = self.cfg
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        if c.use_quant_conv:
            self.quant_conv = _conv(2 * c.latent_channels, 1, name="quant_conv",
                                    dtype=DTYPES[c.dtype], param_dtype=DTYPES[c.param_dtype])
            self.post_quant_conv = _conv(c.latent_channels, 1, name="post_quant_conv",
                                         dtype=jnp.float32, param_dtype=DTYPES[c.param_dtype])
        if self.is_mutable_collection(STATS) or self.has_variable(STATS, "shift"):
            z = c.packed_channels
            self.shift = self.variable(STATS, "shift", jnp.zeros, (z,), jnp.float32)
            self.scale = self.variable(STATS, "scale", jnp.ones, (z,), jnp.float32)

    def encode(self, x_BxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, logvar), each [B, H/f, W/f, Z] float32 (packed when space_to_depth > 1)."""
        c = self.cfg
        if x_BxHxWxC.ndim != 4 or x_BxHxWxC.shape[-1] != c.in_channels:
            raise errors.UserError(f"autoencoder input must be [B, H, W, {c.in_channels}], "
                                   f"got {tuple(x_BxHxWxC.shape)}")
        c.latent_shape(*x_BxHxWxC.shape[1:3])
        m = self.encoder(x_BxHxWxC)
        if c.use_quant_conv:
            m = self.quant_conv(m)
        m = m.astype(jnp.float32)
        mean, logvar = jnp.split(m, 2, axis=-1)
        logvar = jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)
        return space_to_depth(mean, c.space_to_depth), space_to_depth(logvar, c.space_to_depth)

    def decode(self, z_BxhxwxZ: jax.Array) -> jax.Array:
        """x_BxHxWxC float32 from a packed (un-normalised) latent; always computed in float32."""
        z = depth_to_space(z_BxhxwxZ.astype(jnp.float32), self.cfg.space_to_depth)
        if self.cfg.use_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x_BxHxWxC: jax.Array, rng: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(reconstruction, mean, logvar): z = mean + exp(logvar/2)·ε with ``rng``, else mean."""
        mean, logvar = self.encode(x_BxHxWxC)
        z = mean
        if rng is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)
        return self.decode(z), mean, logvar

    def _stats(self) -> dict:
        if not self.has_variable(STATS, "shift"):
            raise errors.UserError(f"the autoencoder variables have no {STATS!r} collection; "
                                   f"add it with with_latent_stats(variables, stats)")
        return {"shift": self.shift.value, "scale": self.scale.value}

    def normalize(self, z_BxhxwxZ: jax.Array) -> jax.Array:
        """(z - shift) / scale with the stored statistics."""
        return normalize(z_BxhxwxZ, self._stats())

    def denormalize(self, z_BxhxwxZ: jax.Array) -> jax.Array:
        """z · scale + shift with the stored statistics."""
        return denormalize(z_BxhxwxZ, self._stats())


def init(cfg: AEConfig, rng: jax.Array, image_size: int | tuple[int, int] = 0) -> dict:
    """Fresh variables {"params" (boxed with logical names), "latent_stats" (0 and 1)} of
    ``Autoencoder(cfg)``, traced on one image of ``image_size`` (default: one factor·4 side)."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if not hw[0]:
        hw = (4 * cfg.factor,) * 2
    x = jnp.zeros((1,) + tuple(hw) + (cfg.in_channels,), jnp.float32)
    return dict(jax.jit(Autoencoder(cfg).init)(rng, x))
