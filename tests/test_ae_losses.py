"""Autoencoder objectives (cxr_rf.autoencoder.losses) against closed forms and hand-checkable
cases, and the PatchGAN discriminator's shapes."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_rf import sharding
from cxr_rf.autoencoder import discriminator as disc_lib
from cxr_rf.autoencoder import losses

# Test data from numpy: eager jax.random compiles threefry once per shape (slow on the CPU).
def _uniform(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


C1 = (0.01 * 2.0) ** 2
C2 = (0.03 * 2.0) ** 2


def _ssim_reference(x_HxW, y_HxW, window=11, sigma=1.5):
    """Slow, independent float64 SSIM: explicit 2-D Gaussian window at every valid position."""
    r = np.arange(window) - (window - 1) / 2
    g = np.exp(-0.5 * (r / sigma) ** 2)
    w2 = np.outer(g, g)
    w2 /= w2.sum()
    h, w = x_HxW.shape
    vals = []
    for i in range(h - window + 1):
        for j in range(w - window + 1):
            px = x_HxW[i:i + window, j:j + window]
            py = y_HxW[i:i + window, j:j + window]
            mx, my = (w2 * px).sum(), (w2 * py).sum()
            vx = (w2 * (px - mx) ** 2).sum()
            vy = (w2 * (py - my) ** 2).sum()
            cxy = (w2 * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + C1) * (2 * cxy + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2)))
    return float(np.mean(vals))


def test_l1():
    x = jnp.array([[0.0, 1.0], [-1.0, 0.5]]).reshape(1, 2, 2, 1)
    y = jnp.zeros_like(x)
    assert float(losses.l1(x, y)) == pytest.approx(2.5 / 4)


def test_ssim_identical_is_one_and_constant_images_closed_form():
    x = _uniform(0, (2, 16, 16, 1))
    np.testing.assert_allclose(losses.ssim(x, x), 1.0, atol=1e-5)
    # Constant images a and b: sigma = cov = 0, so SSIM = (2ab + C1) / (a² + b² + C1) exactly
    # (the contrast-structure factor is C2 / C2 = 1), on the shifted scale a + 1, b + 1.
    a, b = 0.2, -0.3
    xa = jnp.full((1, 12, 12, 1), a)
    yb = jnp.full((1, 12, 12, 1), b)
    a, b = a + 1, b + 1
    want = (2 * a * b + C1) / (a * a + b * b + C1)
    np.testing.assert_allclose(losses.ssim(xa, yb), [want], rtol=1e-5)


def test_ssim_matches_direct_reference_and_is_symmetric():
    x = _uniform(1, (2, 16, 16, 1))
    y = 0.7 * x + 0.3 * _uniform(2, x.shape) + 0.1
    got = np.asarray(losses.ssim(x, y))
    want = [_ssim_reference(np.asarray(x[i, ..., 0], np.float64) + 1,
                            np.asarray(y[i, ..., 0], np.float64) + 1) for i in range(2)]
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(losses.ssim(y, x), got, atol=1e-6)
    assert np.all(got < 0.95) and np.all(got > 0.7)   # correlation ~0.92
    # offset=0 computes SSIM on the raw scale (a different, zero-centred value).
    raw = _ssim_reference(np.asarray(x[0, ..., 0], np.float64), np.asarray(y[0, ..., 0], np.float64))
    np.testing.assert_allclose(losses.ssim(x, y, offset=0.0)[0], raw, atol=2e-5)
    # Differentiable, also at x == y (the variances' zero is guarded by C2).
    g = jax.grad(lambda a: 1.0 - jnp.mean(losses.ssim(a, x)))(x)
    assert np.all(np.isfinite(np.asarray(g)))
    with pytest.raises(ValueError, match="window"):
        losses.ssim(x[:, :8, :8], y[:, :8, :8])


def test_kl_closed_form_and_monte_carlo():
    np.testing.assert_allclose(losses.kl_diag_gaussian(jnp.zeros((3, 4)), jnp.zeros((3, 4))), 0.0,
                               atol=1e-7)
    # mean 1, var 1: 1/2 per dim; 2x2x2 = 8 dims -> 4 per example.
    ones = jnp.ones((2, 2, 2, 2))
    np.testing.assert_allclose(losses.kl_diag_gaussian(ones, jnp.zeros_like(ones)),
                               4.0, rtol=1e-6)
    mean = 0.5 * _normal(3, (1, 3))
    logvar = 0.5 * _normal(4, (1, 3))
    std = jnp.exp(0.5 * logvar)
    z = mean + std * _normal(5, (200_000, 3))
    log_q = jnp.sum(-0.5 * ((z - mean) / std) ** 2 - jnp.log(std), axis=1)
    log_p = jnp.sum(-0.5 * z**2, axis=1)
    mc = float(jnp.mean(log_q - log_p))
    assert float(losses.kl_diag_gaussian(mean, logvar)) == pytest.approx(mc, abs=0.01)


def test_hinge_losses_closed_form():
    real = jnp.array([2.0, 0.5, -1.0])    # relu(1 - r) = 0, 0.5, 2  -> mean 5/6
    fake = jnp.array([-3.0, 0.0])         # relu(1 + f) = 0, 1       -> mean 1/2
    assert float(losses.d_hinge(real, fake)) == pytest.approx(5 / 6 + 1 / 2)
    assert float(losses.g_hinge(fake)) == pytest.approx(1.5)
    # Perfectly separated (real >= 1, fake <= -1): zero loss and zero gradient.
    u = jnp.abs(_normal(6, (2, 5, 5, 1)))
    assert float(losses.d_hinge(1.0 + u, -1.0 - u)) == 0.0


def test_gan_start_ramp():
    f = lambda s, **kw: float(losses.gan_start(s, 10, **kw))   # noqa: E731
    assert [f(0), f(9), f(10), f(1000)] == [0.0, 0.0, 1.0, 1.0]
    assert [f(9, warmup_steps=4), f(10, warmup_steps=4), f(11, warmup_steps=4),
            f(13, warmup_steps=4), f(50, warmup_steps=4)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert float(jax.jit(losses.gan_start, static_argnums=1)(jnp.int32(12), 10)) == 1.0


def test_adaptive_weight_value_clip_and_stop_gradient():
    g_rec = {"w": jnp.array([3.0, 4.0])}                 # norm 5
    g_gan = {"w": jnp.array([0.0, 2.0])}                 # norm 2
    assert float(losses.adaptive_weight(g_rec, g_gan)) == pytest.approx(5 / (2 + 1e-4))
    assert float(losses.adaptive_weight(g_rec, jax.tree.map(jnp.zeros_like, g_gan))) == 1e4
    assert float(losses.adaptive_weight(g_rec, g_gan, max_weight=2.0)) == 2.0
    d = jax.grad(lambda s: losses.adaptive_weight(s * g_rec["w"], g_gan["w"]))(1.0)
    assert float(d) == 0.0


def test_last_layer_grads_analytic():
    # out = h @ w (the "last layer"); rec = mean((out - y)²), gan = -mean(out * v).
    h, w, y, v = (_normal(7 + i, s) for i, s in enumerate([(6, 3), (3, 2), (6, 2), (6, 2)]))
    g_rec, g_gan = losses.last_layer_grads(lambda k: jnp.mean((h @ k - y) ** 2),
                                           lambda k: -jnp.mean((h @ k) * v), w)
    np.testing.assert_allclose(g_rec, 2 * h.T @ (h @ w - y) / 12, rtol=1e-5)
    np.testing.assert_allclose(g_gan, -h.T @ v / 12, rtol=1e-5)


def _flat(images_BxHxW):   # a differentiable "feature network": the image itself
    return images_BxHxW.reshape(images_BxHxW.shape[0], -1)


def test_perceptual_distance():
    x = _uniform(11, (2, 4, 4, 1))
    y = _uniform(12, (2, 4, 4, 1))
    assert float(losses.perceptual(_flat, x, x)) == pytest.approx(0.0, abs=1e-6)
    fx = ((np.asarray(x) + 1) / 2).reshape(2, -1)
    fy = ((np.asarray(y) + 1) / 2).reshape(2, -1)
    fx /= np.linalg.norm(fx, axis=1, keepdims=True)
    fy /= np.linalg.norm(fy, axis=1, keepdims=True)
    want = np.mean(np.sum((fx - fy) ** 2, axis=1))
    np.testing.assert_allclose(losses.perceptual(_flat, x, y), want, rtol=1e-5)
    # Invariant to the features' scale; token features [B, T, D] average over T.
    np.testing.assert_allclose(losses.perceptual(lambda i: 3.0 * _flat(i), x, y), want, rtol=1e-5)
    tok = lambda i: i.reshape(i.shape[0], 4, 4)   # noqa: E731  4 tokens of 4 dims
    assert np.isfinite(float(losses.perceptual(tok, x, y)))
    # The target is a constant for the gradient.
    gy = jax.grad(lambda b: losses.perceptual(_flat, x, b))(y)
    assert float(jnp.max(jnp.abs(gy))) == 0.0
    # The feature function sees [0, 1] grayscale [B, H, W], one call for both batches.
    seen = []
    losses.perceptual(lambda i: (seen.append(i.shape), _flat(i))[1], x, y)
    assert seen == [(4, 4, 4)]


def test_total_generator_loss_composition():
    y = _uniform(13, (2, 12, 12, 1))
    x = y + 0.1 * _normal(14, y.shape)
    mean = _normal(15, (2, 3, 3, 4))
    logvar = 0.1 * _normal(16, (2, 3, 3, 4))
    logits = _normal(17, (2, 2, 2, 1))
    w = losses.LossWeights(ssim=0.5, perceptual=0.1, kl=1e-3, gan=0.5, gan_start=100)
    rec = (losses.l1(x, y) + 0.5 * (1 - jnp.mean(losses.ssim(x, y)))
           + 0.1 * losses.perceptual(_flat, x, y))
    kl_term = 1e-3 * losses.kl_diag_gaussian(mean, logvar)
    g_rec, g_gan = {"w": jnp.array([3.0, 4.0])}, {"w": jnp.array([0.0, 2.0])}
    lam = 5 / (2 + 1e-4)

    kw = dict(logits_fake=logits, feature_fn=_flat, grad_rec=g_rec, grad_gan=g_gan)
    before, m0 = losses.total_generator_loss(x, y, mean, logvar, 99, w, **kw)
    after, m1 = losses.total_generator_loss(x, y, mean, logvar, 100, w, **kw)
    np.testing.assert_allclose(before, rec + kl_term, rtol=1e-5)
    np.testing.assert_allclose(after, rec + kl_term + 0.5 * lam * losses.g_hinge(logits), rtol=1e-5)
    assert set(m1) == {"l1", "ssim", "perceptual", "rec_loss", "kl", "g_loss", "gan_factor",
                       "adaptive_weight", "loss"}
    assert float(m0["gan_factor"]) == 0.0 and float(m1["adaptive_weight"]) == pytest.approx(lam)
    # Defaults: no SSIM, no perceptual without a feature_fn, no GAN term without logits.
    plain, m = losses.total_generator_loss(x, y, mean, logvar, 10**6)
    np.testing.assert_allclose(plain, losses.l1(x, y) + 1e-6 * losses.kl_diag_gaussian(mean, logvar),
                               rtol=1e-6)
    assert set(m) == {"l1", "rec_loss", "kl", "loss"}
    # No adaptive gradients given: lambda = 1. Jittable with a traced step.
    f = jax.jit(lambda s: losses.total_generator_loss(x, y, mean, logvar, s, w,
                                                      logits_fake=logits)[0])
    np.testing.assert_allclose(f(jnp.int32(200)),
                               losses.reconstruction_loss(x, y, w)[0] + kl_term
                               + 0.5 * losses.g_hinge(logits), rtol=1e-5)


def test_discriminator_loss_ramp():
    real, fake = jnp.array([0.5, 2.0]), jnp.array([0.0, -2.0])
    w = losses.LossWeights(gan_start=5)
    d0, _ = losses.discriminator_loss(real, fake, 4, w)
    d1, m = losses.discriminator_loss(real, fake, 5, w)
    assert float(d0) == 0.0
    assert float(d1) == pytest.approx(0.25 + 0.5) == float(m["d_loss"])


@pytest.mark.parametrize("norm,layers,side", [("group", 3, 32), ("none", 2, 24)])
def test_patch_discriminator_shapes(norm, layers, side):
    d = disc_lib.PatchDiscriminator(width=8, layers=layers, norm=norm, groups=4)
    d16 = disc_lib.PatchDiscriminator(width=8, layers=layers, norm=norm, groups=4, dtype=jnp.bfloat16)
    x = _uniform(18, (2, side, side, 1))
    boxed = jax.eval_shape(d.init, jax.random.PRNGKey(8), x)["params"]   # specs, no compute
    # Random params of those shapes from numpy: compiling the threefry initialisers costs
    # more CPU time than everything this test checks.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype),
                          nn.unbox(boxed))

    @jax.jit   # one compile for everything
    def run(p):
        def d_loss(q):
            return losses.d_hinge(d.apply({"params": q}, x), d.apply({"params": q}, -x))
        return d.apply({"params": p}, x), d16.apply({"params": p}, x), jax.grad(d_loss)(p)

    logits, logits16, g = run(params)
    h = disc_lib.output_side(side, layers)
    assert h == side // 2**layers - 2
    assert logits.shape == (2, h, h, 1) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    # bf16 compute still returns float32 logits.
    assert logits16.shape == logits.shape and logits16.dtype == jnp.float32
    # Every logical name has a rule in sharding.RULES.
    names = {n for spec in jax.tree.leaves(nn.get_partition_spec(boxed),
                                           is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
             for n in spec if n is not None}
    assert names and names <= {name for name, _ in sharding.RULES}
    # Gradients reach the discriminator through the hinge loss.
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(g))
    assert optax_norm(g) > 0


def optax_norm(tree):
    return math.sqrt(sum(float(jnp.sum(jnp.square(a))) for a in jax.tree.leaves(tree)))


def test_discriminator_rejects_bad_config():
    x = jnp.zeros((1, 32, 32, 1))
    with pytest.raises(ValueError, match="norm"):
        disc_lib.PatchDiscriminator(width=8, norm="batch").init(jax.random.PRNGKey(0), x)


def test_adaptive_weight_inside_a_differentiated_loss():
    # A toy decoder whose last layer is a 1x1 conv (h @ w) and a linear "discriminator": the
    # train-step pattern (inner gradients of the last kernel inside the outer jax.grad). Since
    # lambda is stop-gradient, the outer gradient is grad_rec + kl-part + gan * lambda * grad_gan.
    h = _normal(40, (2, 4, 4, 3))
    w0 = _normal(41, (3, 1))
    y = _uniform(42, (2, 4, 4, 1))
    mean, logvar = _normal(43, (2, 2)), jnp.zeros((2, 2))
    v = _normal(44, (2, 4, 4, 1))
    disc = lambda img: img * v                                  # noqa: E731  logits [B, H, W, 1]
    recon = lambda w: jnp.einsum("bhwk,ko->bhwo", h, w)         # noqa: E731
    wts = losses.LossWeights(gan_start=0, kl=0.0)

    def loss_fn(w):
        rec_fn = lambda k: losses.reconstruction_loss(recon(k), y, wts)[0]   # noqa: E731
        gan_fn = lambda k: losses.g_hinge(disc(recon(k)))                    # noqa: E731
        g_rec, g_gan = losses.last_layer_grads(rec_fn, gan_fn, w)
        return losses.total_generator_loss(recon(w), y, mean, logvar, 1, wts,
                                           logits_fake=disc(recon(w)), grad_rec=g_rec,
                                           grad_gan=g_gan)

    (_, m), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(w0)
    g_rec = jax.grad(lambda k: losses.l1(recon(k), y))(w0)
    g_gan = jax.grad(lambda k: losses.g_hinge(disc(recon(k))))(w0)
    lam = float(jnp.linalg.norm(g_rec)) / (float(jnp.linalg.norm(g_gan)) + 1e-4)
    assert float(m["adaptive_weight"]) == pytest.approx(lam, rel=1e-5)
    np.testing.assert_allclose(g, g_rec + 0.5 * lam * g_gan, rtol=1e-4, atol=1e-6)
    # At the gradient's output the GAN part is rescaled to the size of the reconstruction part.
    assert (float(jnp.linalg.norm(lam * g_gan))
            == pytest.approx(float(jnp.linalg.norm(g_rec)), rel=1e-3))


def test_last_layer_grads_vjp_matches_and_reuses_the_forward():
    h, w, y, v = (_normal(50 + i, s) for i, s in enumerate([(6, 3), (3, 2), (6, 2), (6, 2)]))
    rec = lambda out: jnp.mean((out - y) ** 2)   # noqa: E731
    gan = lambda out: -jnp.mean(out * v)         # noqa: E731
    out, g_rec, g_gan = losses.last_layer_grads_vjp(lambda k: h @ k, w, rec, gan)
    want_rec, want_gan = losses.last_layer_grads(lambda k: rec(h @ k), lambda k: gan(h @ k), w)
    np.testing.assert_allclose(out, h @ w, rtol=1e-6)
    np.testing.assert_allclose(g_rec, want_rec, rtol=1e-5)
    np.testing.assert_allclose(g_gan, want_gan, rtol=1e-5)
    # The returned reconstruction carries gradients to what output_fn closes over.
    gh = jax.grad(lambda hh: jnp.sum(losses.last_layer_grads_vjp(lambda k: hh @ k, w, rec, gan)[0]))(h)
    np.testing.assert_allclose(gh, jnp.broadcast_to(jnp.sum(w, axis=1)[None], h.shape), rtol=1e-5)
