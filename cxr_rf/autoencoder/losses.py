"""Training objectives of the latent autoencoder: reconstruction, KL, perceptual and hinge GAN.

The usual latent-diffusion recipe (LDM / taming VQGAN, MedVAE for X-rays):

    generator      l1 * |x - x̂|  +  ssim * (1 - SSIM)  +  perceptual * d(φ(x), φ(x̂))
                   +  kl * KL(q(z|x) || N(0, I))
                   +  gan * ramp(step) * λ_adapt * (-mean D(x̂))
    discriminator  ramp(step) * [mean relu(1 - D(x)) + mean relu(1 + D(x̂))]

Everything here is a pure function of arrays (and, for the perceptual loss, of a feature
callable), so a jitted train step composes it freely. Conventions:

    x_BxHxWxC, y_BxHxWxC    images float32 in [-1, 1] (NHWC, C = 1 for radiographs); x is the
                            reconstruction where it matters, y the target
    mean_Bx..., logvar_Bx...  diagonal-Gaussian posterior over latents, any trailing shape
    logits_Bx...             discriminator outputs (PatchGAN: [B, h, w, 1]), any shape

Legend: B batch, H/W height/width, C channels, D feature dim, T feature tokens.

Adaptive GAN weight (taming-transformers ``calculate_adaptive_weight``)
-----------------------------------------------------------------------
λ_adapt = ‖∇_W L_rec‖ / (‖∇_W L_gan‖ + eps), clipped to [0, max_weight] and stop-gradient,
where W is the decoder's LAST conv kernel (the layer that writes pixels). It rescales the adversarial
gradient to the size of the reconstruction gradient at the output, so the GAN neither drowns
the reconstruction when it switches on nor vanishes. ``last_layer_grads`` computes both
gradients from two functions of that kernel (``last_layer_grads_vjp``: from one forward of
kernel -> reconstruction); ``L_rec`` is the non-adversarial part of the loss
(``reconstruction_loss``: L1 + SSIM + perceptual, without KL, as in taming's ``nll_loss``), and
``L_gan`` is ``g_hinge`` of the discriminator on the reconstruction.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

FeatureFn = Callable[[jax.Array], jax.Array]   # images_BxHxW in [0, 1] -> feats_BxD or BxTxD


# --------------------------------------------------------------------------------------------
# Reconstruction
# --------------------------------------------------------------------------------------------

def l1(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean absolute error over every element (a scalar)."""
    return jnp.mean(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))


def gaussian_window(window: int, sigma: float) -> jax.Array:
    """The normalised 1-D Gaussian taps [window] (sum 1) of the SSIM filter."""
    r = jnp.arange(window, dtype=jnp.float32) - (window - 1) / 2.0
    g = jnp.exp(-0.5 * (r / sigma) ** 2)
    return g / jnp.sum(g)


def _blur_valid(x_BxHxWxC: jax.Array, g_K: jax.Array) -> jax.Array:
    """Separable Gaussian filter, 'valid' (no padding), per channel: [B, H-K+1, W-K+1, C]."""
    k = g_K.shape[0]
    c = x_BxHxWxC.shape[-1]
    dn = ("NHWC", "HWIO", "NHWC")
    # Depthwise: feature_group_count = C with one [K, 1] (then [1, K]) filter per channel.
    kh = jnp.tile(g_K.reshape(k, 1, 1, 1), (1, 1, 1, c))
    kw = jnp.tile(g_K.reshape(1, k, 1, 1), (1, 1, 1, c))
    prec = jax.lax.Precision.HIGHEST   # variances are differences of nearly equal moments
    y = jax.lax.conv_general_dilated(x_BxHxWxC, kh, (1, 1), "VALID", dimension_numbers=dn,
                                     feature_group_count=c, precision=prec)
    return jax.lax.conv_general_dilated(y, kw, (1, 1), "VALID", dimension_numbers=dn,
                                        feature_group_count=c, precision=prec)


def ssim(x: jax.Array, y: jax.Array, *, window: int = 11, sigma: float = 1.5,
         data_range: float = 2.0, offset: float = 1.0, k1: float = 0.01,
         k2: float = 0.03) -> jax.Array:
    """Gaussian-window SSIM (Wang et al. 2004) per image: [B], in [-1, 1], 1 iff x == y.

    Local means, variances and covariance use a ``window`` x ``window`` Gaussian of std
    ``sigma`` over 'valid' positions only (no padding, as the reference MATLAB code and
    pytorch-msssim: padded borders would bias the statistics), with population (biased)
    moments; the SSIM map is averaged over positions and channels. ``data_range`` is
    max - min of the pixel scale: 2 for images in [-1, 1]. C1 = (k1 L)², C2 = (k2 L)².
    Use ``1 - ssim`` as a loss. Images smaller than the window are an error.

    ``offset`` is added to both images first: 1 maps [-1, 1] to [0, 2], so the value equals
    the standard SSIM of the [0, 1] images (SSIM is invariant to a common scale when L scales
    with it, but its luminance term (2 μx μy + C1) / (μx² + μy² + C1) is NOT shift-invariant:
    on zero-centred data, mid-grey regions have μ ≈ 0 and the term swings to ~0 or negative
    even for near-identical images). Set 0 for data already in [0, L].
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim wants two equal NHWC shapes, got {x.shape} and {y.shape}")
    if min(x.shape[1:3]) < window:
        raise ValueError(f"ssim window {window} is larger than the image {x.shape[1:3]}")
    x = x.astype(jnp.float32) + offset
    y = y.astype(jnp.float32) + offset
    g_K = gaussian_window(window, sigma)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    # One filter call for all five moments (stacked on the channel axis).
    c = x.shape[-1]
    m = _blur_valid(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), g_K)
    mu_x, mu_y, e_xx, e_yy, e_xy = (m[..., i * c:(i + 1) * c] for i in range(5))
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov = e_xy - mu_x * mu_y
    s_map = ((2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
             / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)))
    return jnp.mean(s_map, axis=(1, 2, 3))


# --------------------------------------------------------------------------------------------
# Latent regulariser
# --------------------------------------------------------------------------------------------

def kl_diag_gaussian(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over every latent dim, mean over the batch.

    Closed form per dim: ½ (mean² + exp(logvar) - 1 - logvar). Summed (not averaged) over the
    latent dims as in LDM's ``DiagonalGaussianDistribution.kl``; that is why its weight is tiny
    (~1e-6): it only keeps the latent scale bounded.
    """
    mean = mean.astype(jnp.float32)
    logvar = logvar.astype(jnp.float32)
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.mean(jnp.sum(kl.reshape(kl.shape[0], -1), axis=1))


# --------------------------------------------------------------------------------------------
# Perceptual
# --------------------------------------------------------------------------------------------

def to_unit_gray(x_BxHxWxC: jax.Array) -> jax.Array:
    """[-1, 1] NHWC -> [0, 1] [B, H, W] (the ``cxr_rf.features`` convention): (x + 1) / 2,
    channels averaged (C = 1 for radiographs). Not clipped: a clip would zero the gradient
    of out-of-range reconstructions, which is exactly where the loss should push back."""
    return (jnp.mean(x_BxHxWxC.astype(jnp.float32), axis=-1) + 1.0) * 0.5


def perceptual(feature_fn: FeatureFn, x: jax.Array, y: jax.Array, *,
               eps: float = 1e-8) -> jax.Array:
    """Distance between the features of reconstructions ``x`` and targets ``y`` (a scalar).

    Images are mapped [-1, 1] -> [0, 1] grayscale [B, H, W] (``to_unit_gray``) and fed to
    ``feature_fn`` in ONE call (batch 2B: one forward, one compile) that must be differentiable
    jnp (e.g. a jitted Flax DINOv2 apply behind a jnp resize/normalise, or a classifier's
    penultimate features); it returns [B, D] or token/spatial features [B, ..., D]. Each feature
    vector is L2-normalised over D, and the distance is ‖f̂(x) - f̂(y)‖² (in [0, 4]) averaged
    over tokens and batch, as LPIPS does per layer (without learned channel weights). The
    target's features are stop-gradient (they are a fixed target; saves nothing at runtime
    but keeps the intent explicit).
    """
    b = x.shape[0]
    f = feature_fn(jnp.concatenate([to_unit_gray(x), to_unit_gray(y)], axis=0))
    f = f.astype(jnp.float32)
    f = f * jax.lax.rsqrt(jnp.sum(f * f, axis=-1, keepdims=True) + eps)
    fx, fy = f[:b], jax.lax.stop_gradient(f[b:])
    return jnp.mean(jnp.sum(jnp.square(fx - fy), axis=-1))


# --------------------------------------------------------------------------------------------
# Adversarial
# --------------------------------------------------------------------------------------------

def d_hinge(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """Discriminator hinge loss mean(relu(1 - D(x))) + mean(relu(1 + D(x̂))); 0 once every real
    logit is >= 1 and every fake one <= -1."""
    return (jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
            + jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32))))


def g_hinge(logits_fake: jax.Array) -> jax.Array:
    """Generator hinge loss -mean(D(x̂))."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def gan_start(step: jax.Array | int, start_step: int, warmup_steps: int = 0) -> jax.Array:
    """The GAN factor at ``step``: 0 before ``start_step``, then a linear ramp to 1 over
    ``warmup_steps`` (0: a step to 1 at ``start_step``). float32 scalar; jit-safe."""
    s = jnp.asarray(step, jnp.float32) - float(start_step)
    if warmup_steps <= 0:
        return (s >= 0).astype(jnp.float32)
    # (s + 1) so that the first step at start_step already gets 1/warmup (not 0).
    return jnp.clip((s + 1.0) / float(warmup_steps), 0.0, 1.0)


def _global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves together, in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(a.astype(jnp.float32)))
                        for a in jax.tree_util.tree_leaves(tree)))


def adaptive_weight(grad_rec: Any, grad_gan: Any, *, max_weight: float = 1e4,
                    eps: float = 1e-4) -> jax.Array:
    """λ = ‖grad_rec‖ / (‖grad_gan‖ + eps), clipped to [0, max_weight], stop-gradient.

    The gradients are of the reconstruction and generator-GAN losses with respect to the
    decoder's last conv kernel (see the module docstring and ``last_layer_grads``); arrays or
    pytrees (global L2 norm). The eps and the clip (taming: 1e-4 and 1e4) keep λ finite when
    the GAN gradient is ~0, e.g. for a freshly initialised discriminator.
    """
    n_rec = _global_norm(grad_rec)
    n_gan = _global_norm(grad_gan)
    return jax.lax.stop_gradient(jnp.clip(n_rec / (n_gan + eps), 0.0, max_weight))


def last_layer_grads(rec_loss_fn: Callable[[jax.Array], jax.Array],
                     gan_loss_fn: Callable[[jax.Array], jax.Array],
                     last_kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(∇_W rec_loss_fn, ∇_W gan_loss_fn) at W = ``last_kernel``, the decoder's last conv kernel.

    Both functions map that kernel to a scalar loss with everything else held fixed. Cheapest:
    close over the decoder's penultimate activation h (so the forward is the last conv only),
    i.e. ``rec_loss_fn = lambda w: reconstruction_loss(y, conv(h, w) + b, ...)[0]`` and
    ``gan_loss_fn = lambda w: g_hinge(disc(conv(h, w) + b))``. Feed the pair to
    ``adaptive_weight``.
    """
    return jax.grad(rec_loss_fn)(last_kernel), jax.grad(gan_loss_fn)(last_kernel)


def last_layer_grads_vjp(output_fn: Callable[[jax.Array], jax.Array], last_kernel: jax.Array,
                         rec_loss_fn: Callable[[jax.Array], jax.Array],
                         gan_loss_fn: Callable[[jax.Array], jax.Array]
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(reconstruction, ∇_W L_rec, ∇_W L_gan) from ONE forward of ``output_fn`` (kernel ->
    reconstruction; e.g. the whole autoencoder apply with ``decoder/conv_out/kernel``
    substituted) and two vjps that only run back through the last conv.

    For when the penultimate activation is not at hand. ``rec_loss_fn`` and ``gan_loss_fn``
    map the reconstruction to a scalar. The returned reconstruction is differentiable (also
    with respect to whatever ``output_fn`` closes over), so the caller can use it as THE
    reconstruction of the step and pay for no extra forward.
    """
    recon, vjp = jax.vjp(output_fn, last_kernel)
    (g_rec,) = vjp(jax.grad(rec_loss_fn)(recon).astype(recon.dtype))
    (g_gan,) = vjp(jax.grad(gan_loss_fn)(recon).astype(recon.dtype))
    return recon, g_rec, g_gan


# --------------------------------------------------------------------------------------------
# Totals
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the autoencoder objective (defaults: the LDM/MedVAE recipe).

    l1 1.0           pixel L1, the main reconstruction term
    ssim 0.0         1 - SSIM; off by default (L1 + perceptual already cover structure)
    perceptual 0.1   feature distance (``perceptual``); only used when a feature_fn is given.
                     0.1 because the normalised-feature distance is O(0.1-1) while L1 on a
                     good reconstruction is O(0.01-0.05) in [-1, 1] units
    kl 1e-6          summed KL: only bounds the latent scale (LDM: 1e-6)
    gan 0.5          generator hinge weight on top of the adaptive weight (taming/MedVAE 0.5)
    gan_start 50_000 step at which the discriminator and the GAN term switch on (LDM starts it
                     after the reconstruction has converged: an early GAN destabilises it)
    gan_warmup 0     linear ramp length after gan_start (0: switch on at once)
    adaptive True    scale the GAN term by ``adaptive_weight``
    max_adaptive 1e4 clip of the adaptive weight
    """
    l1: float = 1.0
    ssim: float = 0.0
    perceptual: float = 0.1
    kl: float = 1e-6
    gan: float = 0.5
    gan_start: int = 50_000
    gan_warmup: int = 0
    adaptive: bool = True
    max_adaptive: float = 1e4


def reconstruction_loss(x: jax.Array, y: jax.Array, weights: LossWeights = LossWeights(), *,
                        feature_fn: FeatureFn | None = None) -> tuple[jax.Array, dict]:
    """The non-adversarial, non-KL part: l1·L1 + ssim·(1 - SSIM) + perceptual·d_feat, of
    reconstruction ``x`` against target ``y``. This is the L_rec of the adaptive weight.
    Terms whose weight is 0 (or perceptual without a feature_fn) are not computed."""
    metrics = {"l1": l1(x, y)}
    loss = weights.l1 * metrics["l1"]
    if weights.ssim:
        metrics["ssim"] = jnp.mean(ssim(x, y))
        loss = loss + weights.ssim * (1.0 - metrics["ssim"])
    if weights.perceptual and feature_fn is not None:
        metrics["perceptual"] = perceptual(feature_fn, x, y)
        loss = loss + weights.perceptual * metrics["perceptual"]
    metrics["rec_loss"] = loss
    return loss, metrics


def total_generator_loss(x: jax.Array, y: jax.Array, mean: jax.Array, logvar: jax.Array,
                         step: jax.Array | int, weights: LossWeights = LossWeights(), *,
                         logits_fake: jax.Array | None = None,
                         feature_fn: FeatureFn | None = None,
                         grad_rec: Any = None, grad_gan: Any = None
                         ) -> tuple[jax.Array, dict]:
    """The autoencoder (generator) loss and its metrics.

        loss = L_rec + kl·KL + gan · gan_start(step) · λ · g_hinge(logits_fake)

    ``x`` reconstruction, ``y`` target (NHWC, [-1, 1]); ``mean``/``logvar`` the posterior
    (pass logvar = zeros and weights.kl = 0 for a deterministic encoder such as FLUX.2's);
    ``logits_fake`` = D(x) (None: no GAN term, e.g. before gan_start in a step that skips the
    discriminator). λ = ``adaptive_weight(grad_rec, grad_gan)`` when ``weights.adaptive`` and
    both gradients are given (``last_layer_grads``), else 1. λ and the ramp are constants for
    the gradient. Metrics: l1, [ssim], [perceptual], rec_loss, kl, g_loss, gan_factor,
    adaptive_weight, loss (all float32 scalars).
    """
    loss, metrics = reconstruction_loss(x, y, weights, feature_fn=feature_fn)
    metrics["kl"] = kl_diag_gaussian(mean, logvar)
    loss = loss + weights.kl * metrics["kl"]
    if logits_fake is not None and weights.gan:
        factor = gan_start(step, weights.gan_start, weights.gan_warmup)
        if weights.adaptive and grad_rec is not None and grad_gan is not None:
            lam = adaptive_weight(grad_rec, grad_gan, max_weight=weights.max_adaptive)
        else:
            lam = jnp.ones((), jnp.float32)
        metrics["g_loss"] = g_hinge(logits_fake)
        metrics["gan_factor"] = factor
        metrics["adaptive_weight"] = lam
        loss = loss + weights.gan * factor * lam * metrics["g_loss"]
    metrics["loss"] = loss
    return loss, metrics


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array, step: jax.Array | int,
                       weights: LossWeights = LossWeights()) -> tuple[jax.Array, dict]:
    """gan_start(step) · d_hinge: the discriminator's loss (the fakes' logits must come from
    stop-gradient reconstructions). Metrics: d_loss (unscaled), logits_real, logits_fake
    (means), d_factor."""
    factor = gan_start(step, weights.gan_start, weights.gan_warmup)
    d = d_hinge(logits_real, logits_fake)
    metrics = {"d_loss": d, "logits_real": jnp.mean(logits_real.astype(jnp.float32)),
               "logits_fake": jnp.mean(logits_fake.astype(jnp.float32)), "d_factor": factor}
    return factor * d, metrics
