"""The sampler end to end on a tiny random MMDiT: its images against an explicit Euler
recurrence written here from the model's raw outputs, so conditions, guidance scale, timestep
shift, x-prediction and seeding must all reach the pixels.

The model is initialised at random and then every leaf is perturbed: at init the zero output
layer makes the network output exactly 0, and a sampler fed zeros returns its noise whatever
it was asked for.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_rf import conditioning, config
from cxr_rf.conditioning import Conditions
from cxr_rf.model import build_model, init_params
from cxr_rf.sample import Sampler

RES, STEPS = 16, 2
A = Conditions.parse("Cardiomegaly,Pleural Effusion", sex="F", age=70, view="PA")
B = Conditions.parse("Pneumothorax", sex="M", age=25, view="AP")


def _cfg(**flow):
    cfg = config.base()
    cfg.data.resolution = RES
    cfg.model.update(width=32, depth=2, heads=2, patch=4)
    cfg.flow.update(flow)
    cfg.sample.update(steps=STEPS, cfg=4.0, method="euler")
    return cfg


@functools.lru_cache(maxsize=None)
def _model_params():
    model = build_model(_cfg())
    params = nn.meta.unbox(jax.jit(init_params, static_argnums=(0, 2))(
        model, jax.random.PRNGKey(0), RES))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(
        np.asarray(a) + 0.1 * rng.standard_normal(a.shape), a.dtype), params)
    return model, params


@functools.lru_cache(maxsize=None)
def _sampler(prediction="v", shift=0.0):
    """One Sampler per flow setting (its compiled program is cached per instance)."""
    model, _ = _model_params()
    return Sampler(_cfg(prediction=prediction, shift=shift), model)


def _reference(conds, seeds, *, scale, shift, prediction, t_eps=0.05):
    """Guided Euler over STEPS steps, spelled out: noise PRNGKey(seed) per image, the SD3
    shifted grid, conditional and null-token outputs combined in velocity space."""
    model, params = _model_params()
    apply = jax.jit(lambda x, t, tok: model.apply({"params": params}, x, t, tok))
    x = jnp.stack([jax.random.normal(jax.random.PRNGKey(s), (RES, RES, 1)) for s in seeds])
    tok = jnp.asarray(np.stack([c.tokens() for c in conds]), jnp.int32)
    null = jnp.asarray(np.stack([conditioning.null_tokens()] * len(conds)), jnp.int32)
    u = 1.0 - np.arange(STEPS + 1) / STEPS
    ts = shift * u / (1.0 + (shift - 1.0) * u)
    x = np.asarray(x, np.float64)
    for t, t_next in zip(ts[:-1], ts[1:]):
        t_B = jnp.full((len(conds),), t, jnp.float32)
        xin = jnp.asarray(x, jnp.float32)
        out_c = np.asarray(apply(xin, t_B, tok), np.float64)
        out_u = np.asarray(apply(xin, t_B, null), np.float64)
        if prediction == "x":         # the clean-image guess -> velocity (x - x̂) / t
            out_c, out_u = (x - out_c) / max(t, t_eps), (x - out_u) / max(t, t_eps)
        x = x + (t_next - t) * (out_u + scale * (out_c - out_u))
    return x[..., 0]


@pytest.mark.parametrize("prediction,shift", [("v", 0.0), ("v", 3.0), ("x", 3.0)])
def test_sampler_matches_explicit_guided_euler(prediction, shift):
    sampler = _sampler(prediction, shift)
    _, params = _model_params()
    # shift 0 is automatic: 16 image tokens < base_tokens, so it resolves to 1.
    grid_shift = shift or 1.0
    for scale in (1.0, 4.0):
        got = sampler.generate(params, [A, B], [3, 4], cfg_scale=scale)
        want = _reference([A, B], [3, 4], scale=scale, shift=grid_shift, prediction=prediction)
        assert got.shape == (2, RES, RES)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4)


def _mad(a, b):
    return float(np.mean(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_conditions_scale_shift_and_prediction_change_the_pixels():
    _, params = _model_params()
    base = _sampler()
    img = base.generate(params, [A, B], [0, 0])               # same noise, two conditions
    assert _mad(img[0], img[1]) > 0.02
    # Rows are independent of each other: swapping the conditions swaps the images.
    swapped = base.generate(params, [B, A], [0, 0])
    np.testing.assert_allclose(swapped[::-1], img, atol=1e-5)
    assert _mad(base.generate(params, [A, B], [0, 0], cfg_scale=1.0), img) > 0.02
    assert _mad(_sampler("v", 3.0).generate(params, [A, B], [0, 0]), img) > 0.02
    assert _mad(_sampler("x", 0.0).generate(params, [A, B], [0, 0]), img) > 0.02
    # Another seed, another image.
    assert _mad(base.generate(params, [A, B], [1, 1]), img) > 0.2


def test_same_arguments_same_pixels():
    _, params = _model_params()
    a = _sampler().generate(params, [A, B], [5, 6], cfg_scale=2.5)
    b = _sampler().generate(params, [A, B], [5, 6], cfg_scale=2.5)
    fresh = Sampler(_cfg(), _model_params()[0]).generate(params, [A, B], [5, 6], cfg_scale=2.5)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, fresh)
