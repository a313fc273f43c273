"""Building blocks of the MMDiT: projections, norms, joint attention, embeddings, patchify.

Logical axis names
------------------
Weights and activations have separate names (as in MaxText), so a sharding rule for one never
moves the other. Every parameter is created through ``nn.with_logical_partitioning``; the main
activations pass through ``sharding.constrain``. ``sharding.RULES`` maps every name below to
mesh axes (``tests/test_sharding.py`` fails on a name without a rule). Shape letters: see the
legend in ``mmdit.py``.

Weights:
    embed    the model width D (FSDP shards weights here)
    mlp      MLP hidden M, adaLN modulation outputs X, small-MLP hidden
    heads    attention heads N
    kv       per-head feature dim K
    vocab    context-token vocabulary V                      (embedding table)
    layers   leading axis of scanned block params (added by nn.scan)
    patch    pixel features of one patch P                   (patch in/out projections)
    freq     sinusoidal timestep features F                  (timestep MLP input)
    ctx      rows of the learned context position table L
Activations:
    activation_batch    B        activation_length   T, S (image, context or joint tokens)
    activation_embed    D        activation_mlp      M
    activation_heads    N        activation_kv       K

Remat policies (``cfg.model.remat``)
-----------------------------------
    none           no rematerialisation: fastest, keeps every block activation for backward.
    full           save nothing inside a block; recompute the whole block on backward
                   (~+1 forward of compute, smallest memory).
    dots           save the outputs of all matmuls (checkpoint_dots); recompute the cheap
                   elementwise ops (norms, GELU, modulation).
    dots_no_batch  save only matmuls without batch dims (checkpoint_dots_with_no_batch_dims):
                   the projections are saved, attention scores/AV (batched dots) are recomputed.
    save_attn      save only the named attention outputs (``attn_out``), recompute the rest;
                   avoids re-running the quadratic attention at moderate memory cost.
The flash-style attentions (``cfg.model.attention`` splash, blocked, cudnn) have custom VJPs
whose residuals are q, k, v, the output and the logsumexp: the [T, S] probabilities are
recomputed per tile in the backward, so no policy stores them (with matmul and xla, "none"
and "dots" keep the float32 [B, N, T, S] logits/probabilities of every block).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from cxr_rf import sharding
from cxr_rf.model import attention

Dtype = Any
FREQ_DIM = 256  # width of the sinusoidal timestep features, as in DiT
ATTN_OUT = "attn_out"  # checkpoint_name of the joint-attention output (see "save_attn")

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attn")
POS_EMBEDS = ("sincos", "rope")

# Logical names of the activations this file constrains.
_EMB_BTD = ("activation_batch", "activation_length", "activation_embed")
_MLP_BTM = ("activation_batch", "activation_length", "activation_mlp")

xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()


def remat_policy(name: str) -> Callable[..., bool] | None:
    """The jax.checkpoint policy for a remat name; None for "none" (no remat at all)."""
    policies = {
        "none": None,
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        "save_attn": jax.checkpoint_policies.save_only_these_names(ATTN_OUT),
    }
    if name not in policies:
        raise ValueError(f"unknown remat policy {name!r}; allowed: {', '.join(REMAT_POLICIES)}")
    return policies[name]


def dense(features: int, axes: tuple[str, str], *, dtype: Dtype, param_dtype: Dtype,
          zero: bool = False, init: Callable | None = None, name: str | None = None) -> nn.Dense:
    """A Dense whose kernel carries ``axes`` and whose bias carries ``axes[1]``.

    ``zero`` zero-initialises kernel and bias (adaLN-Zero modulation, final projection).
    """
    kinit = zeros if zero else (init or xavier)
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(kinit, axes),
                    bias_init=nn.with_logical_partitioning(zeros, (axes[1],)))


def heads_proj(heads: int, head_dim: int, *, dtype: Dtype, param_dtype: Dtype,
               name: str) -> nn.DenseGeneral:
    """D -> (heads, head_dim): a q, k or v projection, kernel ("embed", "heads", "kv")."""
    return nn.DenseGeneral((heads, head_dim), axis=-1, dtype=dtype, param_dtype=param_dtype,
                           name=name,
                           kernel_init=nn.with_logical_partitioning(xavier, ("embed", "heads", "kv")),
                           bias_init=nn.with_logical_partitioning(zeros, ("heads", "kv")))


def out_proj(features: int, *, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.DenseGeneral:
    """(heads, head_dim) -> D: attention output projection, kernel ("heads", "kv", "embed")."""
    return nn.DenseGeneral(features, axis=(-2, -1), dtype=dtype, param_dtype=param_dtype,
                           name=name,
                           kernel_init=nn.with_logical_partitioning(xavier, ("heads", "kv", "embed")),
                           bias_init=nn.with_logical_partitioning(zeros, ("embed",)))


def layer_norm(dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm without affine params (adaLN supplies shift/scale); float32 statistics."""
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)


class RMSNorm(nn.Module):
    """RMSNorm over the last (per-head feature) axis with a learned ("kv",) scale.

    Used on q and k: it bounds attention logits, which keeps bf16 training stable (SD3).
    """
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                 ("kv",)),
                           (x.shape[-1],), self.param_dtype)
        # Statistics in float32: the mean of squares underflows/overflows easily in bf16.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale_1K = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
        return (x32 * scale_1K).astype(self.dtype)


class Mlp(nn.Module):
    """Transformer MLP D -> hidden -> D with tanh-GELU (as in DiT/SD3)."""
    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h_BTM = dense(self.hidden, ("embed", "mlp"), name="fc1", **kw)(x_BTD)
        h_BTM = sharding.constrain(nn.gelu(h_BTM, approximate=True), _MLP_BTM)
        out_BTD = dense(x_BTD.shape[-1], ("mlp", "embed"), name="fc2", **kw)(h_BTM)
        return sharding.constrain(out_BTD, _EMB_BTD)


class Modulation(nn.Module):
    """adaLN-Zero: silu(c) -> Dense(n*D), zero-initialised, split into n [B, 1, D] vectors.

    Zero init makes every gated residual branch start closed, so each block is the identity
    at initialisation (DiT's adaLN-Zero).
    """
    n: int
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c_BD: jax.Array) -> tuple[jax.Array, ...]:
        m_BX = dense(self.n * self.width, ("embed", "mlp"), zero=True, name="proj",
                     dtype=self.dtype, param_dtype=self.param_dtype)(nn.silu(c_BD))
        return tuple(jnp.split(m_BX[:, None, :], self.n, axis=-1))


def modulate(x_BTD: jax.Array, shift_B1D: jax.Array, scale_B1D: jax.Array) -> jax.Array:
    """adaLN: x * (1 + scale) + shift."""
    return x_BTD * (1 + scale_B1D) + shift_B1D


def joint_attention(q_BTNK: jax.Array, k_BSNK: jax.Array, v_BSNK: jax.Array,
                    keep_BS: jax.Array | None = None, implementation: str = "auto") -> jax.Array:
    """One softmax attention of queries over the joint [image; context] keys.

    ``keep_BS`` (bool, optional) marks the keys every query may attend to; the others get
    exactly zero weight (report padding). At least one key per example must be kept.

    Logits accumulate and the softmax runs in float32 for any input dtype. ``implementation``
    (``cfg.model.attention``) picks the kernel per backend: see ``cxr_rf/model/attention.py``.
    The output is named ``attn_out`` for the "save_attn" remat policy; what the backward then
    keeps of the attention itself depends on the implementation (blocked, splash and cudnn
    keep only their output and logsumexp, matmul and xla the [T, S] probabilities).
    """
    out_BTNK = attention.attention(q_BTNK, k_BSNK, v_BSNK, keep_BS, implementation=implementation)
    return checkpoint_name(out_BTNK, ATTN_OUT)


def timestep_sinusoid(t_B: jax.Array, dim: int = FREQ_DIM, max_period: float = 10_000.0
                      ) -> jax.Array:
    """Sinusoidal features of t*1000 (t in [0, 1]), float32 [B, dim]: [cos | sin]."""
    half = dim // 2
    freqs_F = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    # Scale to the DDPM-style [0, 1000] range so the frequency spectrum matches DiT's.
    args_BF = (t_B.astype(jnp.float32) * 1000.0)[:, None] * freqs_F[None]
    return jnp.concatenate([jnp.cos(args_BF), jnp.sin(args_BF)], axis=-1)


class TimestepEmbedder(nn.Module):
    """t_B -> sinusoid(t*1000) -> Dense -> SiLU -> Dense: [B, D]."""
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t_B: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                  init=nn.initializers.normal(0.02))
        h_BD = dense(self.width, ("freq", "mlp"), name="fc1", **kw)(timestep_sinusoid(t_B))
        return dense(self.width, ("mlp", "embed"), name="fc2", **kw)(nn.silu(h_BD))


AGE_FEATURES = 16   # Fourier features of a continuous age (8 frequencies, cos and sin)


def age_features(years_B: jax.Array) -> jax.Array:
    """Fourier features of ages in years, float32 [B, AGE_FEATURES]: cos and sin of
    2π·years/period for 8 periods from 200 down to 5 years (geometric), so ages months apart
    embed alike and decades apart differ smoothly."""
    periods_F = 200.0 * (5.0 / 200.0) ** (jnp.arange(AGE_FEATURES // 2, dtype=jnp.float32)
                                          / (AGE_FEATURES // 2 - 1))
    args_BF = 2 * jnp.pi * years_B.astype(jnp.float32)[:, None] / periods_F[None]
    return jnp.concatenate([jnp.cos(args_BF), jnp.sin(args_BF)], axis=-1)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[len(pos), dim] sin-cos features of integer positions (MAE/DiT convention)."""
    omega = 1.0 / 10_000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(h: int, w: int, dim: int) -> np.ndarray:
    """Fixed 2D sin-cos position table [h*w, dim] (row-major grid): half rows, half columns.

    Computed for the actual grid on every call, so the model runs at any resolution.
    """
    if dim % 4:
        raise ValueError(f"sincos position embedding needs width divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    emb = np.concatenate([_sincos_1d(dim // 2, rows.reshape(-1)),
                          _sincos_1d(dim // 2, cols.reshape(-1))], axis=1)
    return emb.astype(np.float32)


def rope_2d(h: int, w: int, head_dim: int, theta: float = 10_000.0
            ) -> tuple[np.ndarray, np.ndarray]:
    """2D axial rotary tables (cos_IK, sin_IK), each [h*w, head_dim].

    The first half of each head's features rotates with the row index, the second half with
    the column index; within each half the usual rotate-half pairing (i, i + quarter) is used.
    """
    if head_dim % 4:
        raise ValueError(f"rope needs head_dim (width/heads) divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    inv_freq = 1.0 / theta ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ang_r = np.outer(rows.reshape(-1), inv_freq)  # [I, K/4]
    ang_c = np.outer(cols.reshape(-1), inv_freq)
    ang_IK = np.concatenate([ang_r, ang_r, ang_c, ang_c], axis=1)
    return np.cos(ang_IK).astype(np.float32), np.sin(ang_IK).astype(np.float32)


def apply_rope(x_BINK: jax.Array, cos_IK: jax.Array, sin_IK: jax.Array) -> jax.Array:
    """Rotate q or k of image tokens by the 2D axial tables (float32 math, input dtype out)."""
    x32 = x_BINK.astype(jnp.float32)
    # rotate-half within each axis half: [a, b | c, d] -> [-b, a | -d, c]
    a, b, c, d = jnp.split(x32, 4, axis=-1)
    rot = jnp.concatenate([-b, a, -d, c], axis=-1)
    cos = cos_IK[None, :, None, :]
    sin = sin_IK[None, :, None, :]
    return (x32 * cos + rot * sin).astype(x_BINK.dtype)


def patchify(x_BHWC: jax.Array, p: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C] in row-major patch order."""
    b, h, w, c = x_BHWC.shape
    x = x_BHWC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tok_BIP: jax.Array, h: int, w: int, p: int, c: int) -> jax.Array:
    """Inverse of ``patchify``: [B, (h/p)(w/p), p*p*c] -> [B, h, w, c]."""
    b = tok_BIP.shape[0]
    x = tok_BIP.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)
