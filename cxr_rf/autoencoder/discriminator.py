"""PatchGAN discriminator (pix2pix / taming ``NLayerDiscriminator``) for the autoencoder's GAN.

    x [B, H, W, C] in [-1, 1]
    -> conv 4x4 s2 (width F, bias, no norm) -> LeakyReLU 0.2
    -> (layers - 1) x [conv 4x4 s2 (width F·min(2^n, 8)) -> norm -> LeakyReLU 0.2]
    -> conv 4x4 s1 (F·min(2^layers, 8)) -> norm -> LeakyReLU 0.2
    -> conv 4x4 s1 -> 1 channel
    = logits [B, h, w, 1], float32; each logit judges one receptive-field patch (70 px for
      layers = 3), so the GAN sharpens local texture rather than global layout.

All convs pad 1, so each stride-2 conv halves the side and each stride-1 conv takes 1 off:
h = H / 2^layers - 2 (30 for H = 256, layers = 3, as in taming).

Decisions: GroupNorm instead of taming's BatchNorm (no mutable batch statistics to thread
through a pjit step, and no dependence on the per-device batch); ``norm="none"`` is the
plain alternative. Weights N(0, 0.02) as taming's ``weights_init``. Norms run in float32.

Logical partitioning (names already in ``sharding.RULES``): conv kernels [kh, kw, in, out] are
(None, None, None, "embed") — output channels (64..512) sharded like model width, the input
side left whole because the first conv has 1 input channel — the last conv (1 output
channel) is (None, None, "embed", None); biases and norm params carry their channel axis.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
NORMS = ("group", "none")

_init = nn.initializers.normal(0.02)
_zeros = nn.initializers.zeros_init()


def _conv(features: int, stride: int, *, bias: bool, last: bool, dtype: Dtype,
          param_dtype: Dtype, name: str) -> nn.Conv:
    axes = (None, None, "embed", None) if last else (None, None, None, "embed")
    return nn.Conv(features, (4, 4), strides=stride, padding=1, use_bias=bias, dtype=dtype,
                   param_dtype=param_dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(_init, axes),
                   bias_init=nn.with_logical_partitioning(_zeros, (None if last else "embed",)))


class PatchDiscriminator(nn.Module):
    """NLayer PatchGAN. ``layers`` stride-2 convs, base ``width`` F, ``norm`` in NORMS
    (``groups`` groups for GroupNorm; must divide every width)."""
    width: int = 64
    layers: int = 3
    norm: str = "group"
    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _norm(self, h: jax.Array, name: str) -> jax.Array:
        if self.norm == "none":
            return h
        return nn.GroupNorm(num_groups=self.groups, epsilon=1e-5, dtype=jnp.float32,
                            param_dtype=self.param_dtype, name=name,
                            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                    ("embed",)),
                            bias_init=nn.with_logical_partitioning(_zeros, ("embed",)))(h)

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        if self.norm not in NORMS:
            raise ValueError(f"unknown discriminator norm {self.norm!r}; allowed: {', '.join(NORMS)}")
        if self.layers < 1:
            raise ValueError(f"discriminator layers must be >= 1, got {self.layers}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # A norm directly after the input would erase the absolute intensity the GAN judges.
        h = _conv(self.width, 2, bias=True, last=False, name="conv_in", **kw)(
            x_BxHxWxC.astype(self.dtype))
        h = nn.leaky_relu(h, 0.2)
        for n in range(1, self.layers + 1):
            stride = 2 if n < self.layers else 1
            # Bias is redundant before a norm (its mean is removed); kept without one.
            h = _conv(self.width * min(2 ** n, 8), stride, bias=self.norm == "none", last=False,
                      name=f"conv_{n}", **kw)(h)
            h = nn.leaky_relu(self._norm(h, f"norm_{n}").astype(self.dtype), 0.2)
        logits = _conv(1, 1, bias=True, last=True, name="conv_out", **kw)(h)
        return logits.astype(jnp.float32)


def output_side(side: int, layers: int = 3) -> int:
    """The logit map's side h for an input side H: each stride-2 4x4 pad-1 conv maps
    s -> floor(s / 2), each stride-1 one s -> s - 1."""
    for _ in range(layers):
        side = (side + 2 - 4) // 2 + 1
    return side - 2
