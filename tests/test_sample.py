"""The sampler end to end on a tiny random MMDiT: its images against an explicit Euler
recurrence written here from the model's raw outputs, so conditions, guidance scale, timestep
shift, x-prediction and seeding must all reach the pixels.

The model is initialised at random and then every leaf is perturbed: at init the zero output
layer makes the network output exactly 0, and a sampler fed zeros returns its noise whatever
it was asked for.
"""
from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_rf import checkpoint, conditioning, config, errors, sample, trainer
from cxr_rf import step as step_lib
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


# ---------------------------------------------------------------- guidance, batching, restore

def test_per_group_guidance_equals_plain_cfg_when_the_scales_are_equal():
    _, params = _model_params()
    sampler = _sampler()
    plain = sampler.generate(params, [A, B], [3, 4], cfg_scale=4.0)
    same = sampler.generate(params, [A, B], [3, 4], guidance=sample.Guidance.parse(
        4.0, "findings=4,demographics=4"))
    np.testing.assert_allclose(same, plain, rtol=1e-5, atol=1e-5)
    other = sampler.generate(params, [A, B], [3, 4], guidance=sample.Guidance.parse(
        4.0, "findings=8,demographics=1"))
    assert _mad(other, plain) > 0.01
    sets, scales = sample.Guidance.parse(4.0, "findings=8,demographics=1").chain()
    assert sets == [("view", "source", "report"), ("findings",), ("sex", "age", "race")]
    assert scales == [4.0, 8.0, 1.0]
    assert sample.Guidance.parse(1.0).chain() == ([], [])     # conditional only: one branch
    with pytest.raises(errors.UserError, match="two scales"):
        sample.Guidance.parse(4.0, "sex=2,demographics=3").chain()
    with pytest.raises(errors.UserError, match="group=scale"):
        sample.Guidance.parse(4.0, "findings")


def test_batched_sampling_equals_unbatched_bitwise():
    """At a given --batch_size an image's pixels depend only on its condition and seed: not
    on --num, on the batch it lands in or its place there (the last batch is padded), bit
    for bit. Across batch sizes XLA picks other matmul blockings: equal to float rounding."""
    model, params = _model_params()
    conds, seeds = [A, B, A, B, A], [7, 8, 9, 10, 11]
    sampler = Sampler(_cfg(), model, batch_size=4)
    batched = sampler.generate(params, conds, seeds)
    assert batched.shape == (5, RES, RES)
    for i in range(5):
        np.testing.assert_array_equal(sampler.generate(params, conds[i:i + 1], seeds[i:i + 1])[0],
                                      batched[i], err_msg=f"image {i}")
    np.testing.assert_array_equal(sampler.generate(params, conds[::-1], seeds[::-1]),
                                  batched[::-1])
    other = Sampler(_cfg(), model, batch_size=2).generate(params, conds, seeds)
    np.testing.assert_allclose(other, batched, rtol=1e-4, atol=1e-5)


def _run_dir(tmp_path, cfg):
    """A run directory with one checkpoint of a random state whose EMA differs from its
    parameters (and a config.json), as training leaves it."""
    model = build_model(cfg)
    tx = step_lib.make_optimizer(cfg)
    state = nn.unbox(jax.jit(step_lib.init_fn(cfg, model, tx))(jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    # Every float array random (zeros would compress on disk and hide what is read).
    noise = lambda tree: jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype)
        if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
    state = state.replace(params=noise(state.params), ema_params=noise(state.params),
                          opt_state=noise(state.opt_state))
    mngr = checkpoint.manager(tmp_path / "checkpoints", async_save=False)
    checkpoint.save(mngr, 3, state, None, force=True)
    mngr.wait_until_finished()
    mngr.close()
    (tmp_path / "config.json").write_text(cfg.to_json())
    return state


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_ema_only_restore_equals_the_full_restore_and_reads_less(tmp_path):
    cfg = _cfg()
    cfg.model.width = 128           # ~1M parameters: array bytes dominate the metadata read
    state = _run_dir(tmp_path, cfg)
    sampler = Sampler(cfg)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    full_restore = lambda: checkpoint.restore_params(tmp_path / "checkpoints",
                                                     step_lib.abstract_state(cfg, device))
    sampler.restore(tmp_path), full_restore()      # first calls import and cache code
    before = _bytes_read()
    params, step = sampler.restore(tmp_path)
    ema_bytes = _bytes_read() - before
    before = _bytes_read()
    _, full = full_restore()
    full_bytes = _bytes_read() - before
    assert step == 3
    for got, want, via_full in zip(jax.tree.leaves(params), jax.tree.leaves(state.ema_params),
                                   jax.tree.leaves(full.ema_params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(via_full))
    # params, EMA and two Adam moments are saved: the EMA alone is about a quarter.
    assert 0 < ema_bytes < 0.5 * full_bytes, (ema_bytes, full_bytes)
    with pytest.raises(errors.UserError, match="no checkpoint for step 5"):
        sampler.restore(tmp_path, 5)


def test_runs_of_another_token_layout_are_refused(tmp_path):
    cfg = _cfg()
    _run_dir(tmp_path, cfg)
    old = json.loads((tmp_path / "config.json").read_text())
    del old["data"]["token_layout"]                   # written before the layout existed
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(errors.UserError) as e:
        sample.read_config(tmp_path)
    msg = str(e.value)
    assert "condition-token layout 1" in msg and f"layout {conditioning.LAYOUT}" in msg
    assert "\n" not in msg
    with pytest.raises(errors.UserError, match="condition-token layout 1"):
        trainer.check_resumable(_cfg(), tmp_path)


def test_unlisted_defaults_and_warnings_follow_the_training_data(phantom_data):
    """On the phantom every finding is mostly negative and the view is never LATERAL; on a
    CheXpert-like mixture source unlisted findings default to unmentioned."""
    from cxr_rf.data import stats
    marginals = stats.training_marginals([(phantom_data(16), 1.0)])
    assert stats.unlisted_defaults(marginals) == {f: conditioning.NEGATIVE
                                                  for f in conditioning.FINDINGS}
    asked = Conditions.parse("", sex="F", view="LATERAL", source="chexpert")
    assert stats.unseen(asked.requested(), marginals) == ["view=LATERAL", "source=chexpert"]
    never = {f for f, st in marginals["findings"].items() if st["uncertain"] == 0}
    if never:                        # a small dataset: some finding is never uncertain
        f = sorted(never)[0]
        assert stats.unseen(Conditions.parse(f"{f}=uncertain").requested(), marginals) == [
            f"{f}=uncertain"]
    chexpert_like = {"findings": {f: {"unmentioned": 0.8, "positive": 0.1, "negative": 0.05,
                                      "uncertain": 0.05} for f in conditioning.FINDINGS}}
    chexpert_like["findings"]["No Finding"] = {"unmentioned": 0.1, "positive": 0.9,
                                               "negative": 0.0, "uncertain": 0.0}
    defaults = stats.unlisted_defaults(chexpert_like)
    assert set(defaults.values()) == {conditioning.UNMENTIONED}   # No Finding: not "positive"
    c = Conditions.parse("Cardiomegaly", unlisted=defaults)
    assert c.describe()["findings"]["Edema"] == "unmentioned"
