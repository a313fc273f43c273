"""The Flax KL autoencoder: shapes per factor, space-to-depth, float32 decoding, latent statistics."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxr_rf import errors
from cxr_rf.autoencoder import (AEConfig, Autoencoder, denormalize, depth_to_space, init,
                                latent_stats, normalize, space_to_depth, with_latent_stats)

TINY = dict(channels=8, num_res_blocks=1, norm_groups=4)


def _shapes(cfg, hw):
    """(params, encode outputs, decode output) shapes by abstract evaluation (no compile)."""
    x = jax.ShapeDtypeStruct((2,) + hw + (cfg.in_channels,), jnp.float32)
    v = jax.eval_shape(lambda: init(cfg, jax.random.key(0), hw))
    model = Autoencoder(cfg)
    mean, logvar = jax.eval_shape(lambda v, x: model.apply(v, x, method="encode"), v, x)
    rec = jax.eval_shape(lambda v, z: model.apply(v, z, method="decode"), v, mean)
    return v, mean, logvar, rec


@pytest.mark.parametrize("mult, s2d, latent, factor", [
    ((1, 1, 1), 1, 16, 4),          # f4
    ((1, 2, 2, 2), 1, 16, 8),       # f8, SD3 / FLUX.1 form
    ((1, 2, 2, 2), 2, 32, 16),      # f16 by space-to-depth, the FLUX.2 form (32 -> 128 channels)
    ((1, 1, 1), 2, 4, 8),
])
@pytest.mark.parametrize("downsample", ["conv", "avgpool"])
def test_shapes_per_factor(mult, s2d, latent, factor, downsample):
    cfg = AEConfig(channel_mult=mult, space_to_depth=s2d, latent_channels=latent,
                   downsample=downsample, **TINY)
    assert cfg.factor == factor and cfg.packed_channels == latent * s2d * s2d
    hw = (2 * factor, 3 * factor)                       # non-square catches H/W mix-ups
    v, mean, logvar, rec = _shapes(cfg, hw)
    want = (2, 2, 3, latent * s2d * s2d)
    assert mean.shape == logvar.shape == want and mean.dtype == jnp.float32
    assert rec.shape == (2,) + hw + (1,) and rec.dtype == jnp.float32
    assert cfg.latent_shape(*hw) == want[1:]
    assert v["latent_stats"]["shift"].shape == (want[-1],)
    assert ("down_0_downsample" in v["params"]["encoder"]) == (downsample == "conv")


def test_config_from_ml_collections_and_bad_values():
    c = ml_collections.ConfigDict(dict(channels=8, channel_mult=[1, 2], num_res_blocks=1,
                                       latent_channels=4, space_to_depth=2, mid_attention=False,
                                       norm_groups=4, dtype="bfloat16", param_dtype="float32"))
    cfg = AEConfig(**c)
    assert cfg.channel_mult == (1, 2) and cfg.factor == 4 and hash(cfg)
    for bad, match in [(dict(space_to_depth=3), "space_to_depth"),
                       (dict(channels=6), "not divisible by norm_groups"),
                       (dict(dtype="float16"), "unknown dtype"),
                       (dict(downsample="max"), "unknown downsample"),
                       (dict(channel_mult=()), "channel_mult")]:
        with pytest.raises(errors.UserError, match=match):
            AEConfig(**{**TINY, **bad})
    with pytest.raises(errors.UserError, match="not a multiple of the autoencoder factor 4"):
        cfg.latent_shape(16, 18)


def test_params_carry_logical_names():
    cfg = AEConfig(channel_mult=(1, 2), latent_channels=4, use_quant_conv=True, **TINY)
    params = jax.eval_shape(lambda: init(cfg, jax.random.key(0)))["params"]
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(p, nn.Partitioned) for p in leaves)
    assert {n for p in leaves for n in p.names} == {None, "conv_in", "conv_out"}


def test_space_to_depth_round_trip_and_flux2_order():
    z = np.random.default_rng(0).standard_normal((2, 6, 8, 3)).astype(np.float32)
    packed = np.asarray(space_to_depth(jnp.asarray(z), 2))
    assert packed.shape == (2, 3, 4, 12)
    np.testing.assert_array_equal(np.asarray(depth_to_space(jnp.asarray(packed), 2)), z)
    for c, dy, dx in [(0, 0, 0), (1, 0, 1), (2, 1, 0), (2, 1, 1)]:   # channel c*4 + dy*2 + dx
        np.testing.assert_array_equal(packed[:, :, :, c * 4 + dy * 2 + dx], z[:, dy::2, dx::2, c])


def _random_variables(cfg, size):
    """Variables of ``init``'s structure filled from numpy (a real ``init`` compiles the random
    initialisers: ~25 s on a loaded 2-core CI machine)."""
    abstract = nn.unbox(jax.eval_shape(lambda: init(cfg, jax.random.key(0), size)))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.3, s.dtype), abstract["params"])
    return {"params": params, "latent_stats": {"shift": jnp.zeros(cfg.packed_channels),
                                               "scale": jnp.ones(cfg.packed_channels)}}


def _jit(cfg, method=None):
    """Autoencoder(cfg).apply, jitted (eager dispatch compiles op by op: slower on CPU)."""
    return jax.jit(functools.partial(Autoencoder(cfg).apply, method=method))


@pytest.fixture(scope="module")
def small():
    cfg = AEConfig(channel_mult=(1, 2), latent_channels=4, space_to_depth=2, **TINY)
    return cfg, _random_variables(cfg, 16)


def test_decode_is_float32_under_bf16_compute(small):
    cfg, v = small
    cfg16 = AEConfig(**{**cfg.__dict__, "dtype": "bfloat16"})
    z = jax.random.normal(jax.random.key(1), (2, 4, 4, 16))
    out32 = np.asarray(_jit(cfg, "decode")(v, z))
    out16 = _jit(cfg16, "decode")(v, z)
    assert out16.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out16), out32)   # the same float32 computation
    rounded = np.asarray(out16.astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(rounded != np.asarray(out16)) > 0.9           # not bf16 values in disguise
    x = jax.random.uniform(jax.random.key(2), (2, 16, 16, 1), minval=-1, maxval=1)
    rec, mean, logvar = _jit(cfg16)(v, x)
    assert rec.dtype == mean.dtype == logvar.dtype == jnp.float32
    mean32 = _jit(cfg, "encode")(v, x)[0]
    assert 0 < float(jnp.abs(mean - mean32).max()) < 0.1        # encoder did compute in bf16


def test_encode_with_mean_is_deterministic(small):
    cfg, v = small
    fwd = _jit(cfg)
    x = jax.random.uniform(jax.random.key(3), (2, 16, 16, 1), minval=-1, maxval=1)
    rec1, mean, logvar = fwd(v, x)
    rec2, mean2, _ = fwd({"params": v["params"]}, x)      # the stats are not needed here
    np.testing.assert_array_equal(np.asarray(rec1), np.asarray(rec2))
    np.testing.assert_array_equal(np.asarray(mean), np.asarray(mean2))
    np.testing.assert_allclose(np.asarray(rec1), np.asarray(_jit(cfg, "decode")(v, mean)),
                               rtol=0, atol=1e-6)
    assert float(logvar.min()) >= -30 and float(logvar.max()) <= 20
    a = fwd(v, x, jax.random.key(4))[0]
    b = fwd(v, x, jax.random.key(5))[0]
    assert not np.allclose(a, rec1) and not np.allclose(a, b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(fwd(v, x, jax.random.key(4))[0]))


def test_latent_stats_round_trip(small):
    cfg, v = small
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((6, 4, 4, 16)) * rng.uniform(0.1, 5, 16)
         + rng.uniform(-3, 3, 16)).astype(np.float32)
    stats = latent_stats(z)
    streamed = latent_stats([z[:2], z[2:5], z[5:]])
    for k in ("shift", "scale"):
        assert stats[k].shape == (16,) and stats[k].dtype == np.float32
        np.testing.assert_allclose(streamed[k], stats[k], rtol=1e-6)
    vs = with_latent_stats(v, stats)
    model = Autoencoder(cfg)
    n = np.asarray(model.apply(vs, jnp.asarray(z), method="normalize"))
    np.testing.assert_allclose(n.reshape(-1, 16).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(n.reshape(-1, 16).std(0), 1, atol=1e-5)
    back = np.asarray(model.apply(vs, jnp.asarray(n), method="denormalize"))
    np.testing.assert_allclose(back, z, atol=1e-5)
    np.testing.assert_allclose(np.asarray(denormalize(normalize(z, stats), stats)), z, atol=1e-5)
    # init creates the identity statistics (init through normalize creates no params)
    fresh = model.init(jax.random.key(0), jnp.asarray(z), method="normalize")
    assert set(fresh) == {"latent_stats"}
    np.testing.assert_array_equal(np.asarray(model.apply(fresh, jnp.asarray(z), method="normalize")), z)
    with pytest.raises(errors.UserError, match="no 'latent_stats' collection"):
        model.apply({"params": v["params"]}, jnp.asarray(z), method="normalize")
    with pytest.raises(errors.UserError, match="at least one latent"):
        latent_stats([])


def test_bad_input_shape(small):
    cfg, v = small
    with pytest.raises(errors.UserError, match=r"must be \[B, H, W, 1\]"):
        Autoencoder(cfg).apply(v, jnp.zeros((1, 16, 16, 3)), method="encode")
