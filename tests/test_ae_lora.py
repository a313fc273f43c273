"""LoRA (cxr_rf.autoencoder.lora): exact identity at init, the merge formula, a conv LoRA as a
kxk conv to r channels then a 1x1 conv, frozen base, and a toy fit with optax."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cxr_rf.autoencoder import lora as lora_lib


def _normal(seed, shape, scale=1.0):   # numpy test data: eager jax.random compiles per shape
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _params():
    """A small tree as Flax lays it out: a Dense and a Conv (kernels + biases), one 1-D leaf."""
    return {"dense": {"kernel": _normal(0, (6, 5)), "bias": _normal(1, (5,))},
            "block": {"conv": {"kernel": _normal(2, (3, 3, 4, 7)), "bias": _normal(3, (7,))},
                      "norm": {"scale": jnp.ones((7,))}}}


def _with_random_b(lora, seed=10):
    f = {k: {"a": v["a"], "b": _normal(seed + i, v["b"].shape)}
         for i, (k, v) in enumerate(sorted(lora.factors.items()))}
    return lora.replace(factors=f)


def test_init_selects_kernels_and_zero_b_is_exact_identity():
    params = _params()
    lora = lora_lib.init_lora(params, rank=2, alpha=4.0, rng=jax.random.PRNGKey(0))
    assert set(lora.factors) == {"dense/kernel", "block/conv/kernel"}
    assert lora.factors["dense/kernel"]["a"].shape == (6, 2)
    assert lora.factors["dense/kernel"]["b"].shape == (2, 5)
    assert lora.factors["block/conv/kernel"]["a"].shape == (3 * 3 * 4, 2)
    assert lora.factors["block/conv/kernel"]["b"].shape == (2, 7)
    assert lora.scale == 2.0
    # scale is static: not a leaf (the optimiser and gradients never see it).
    assert len(jax.tree.leaves(lora)) == 4
    assert lora_lib.num_params(lora) == 6 * 2 + 2 * 5 + 36 * 2 + 2 * 7
    assert np.all(np.abs(np.asarray(lora.factors["dense/kernel"]["a"])) <= 1 / np.sqrt(6))
    merged = lora_lib.apply_lora(params, lora)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert lora_lib.init_lora(params, rank=3, rng=jax.random.PRNGKey(0)).scale == 1.0


def test_select_and_errors():
    params = _params()
    only_conv = lambda path, leaf: path[-1] == "kernel" and leaf.ndim == 4   # noqa: E731
    lora = lora_lib.init_lora(params, rank=1, select=only_conv, rng=jax.random.PRNGKey(0))
    assert set(lora.factors) == {"block/conv/kernel"}
    with pytest.raises(ValueError, match="selected no parameter"):
        lora_lib.init_lora(params, rank=1, select=lambda p, x: False, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=">= 2 axes"):
        lora_lib.init_lora(params, rank=1, select=lambda p, x: p[-1] == "bias",
                           rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="rank"):
        lora_lib.init_lora(params, rank=0, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="not in the tree"):
        lora_lib.apply_lora({"dense": params["dense"]}, lora)


def test_merge_matches_manual_and_conv_factorisation():
    params = _params()
    lora = _with_random_b(lora_lib.init_lora(params, rank=2, alpha=3.0, rng=jax.random.PRNGKey(1)))
    merged = jax.jit(lora_lib.apply_lora)(params, lora)
    s = 3.0 / 2
    fd, fc = lora.factors["dense/kernel"], lora.factors["block/conv/kernel"]
    want_dense = (np.asarray(params["dense"]["kernel"])
                  + s * np.asarray(fd["a"]) @ np.asarray(fd["b"]))
    np.testing.assert_allclose(merged["dense"]["kernel"], want_dense, rtol=1e-5, atol=1e-6)
    want_conv = (np.asarray(params["block"]["conv"]["kernel"])
                 + s * (np.asarray(fc["a"]) @ np.asarray(fc["b"])).reshape(3, 3, 4, 7))
    np.testing.assert_allclose(merged["block"]["conv"]["kernel"], want_conv, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(merged["dense"]["bias"], params["dense"]["bias"])
    np.testing.assert_array_equal(merged["block"]["norm"]["scale"], params["block"]["norm"]["scale"])
    # The conv LoRA is a 3x3 conv to r channels (A) then a 1x1 conv to the outputs (B).
    x = _normal(20, (1, 6, 6, 4))
    conv = lambda inp, k: jax.lax.conv_general_dilated(   # noqa: E731
        inp, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)
    base_out = conv(x, params["block"]["conv"]["kernel"])
    low = conv(conv(x, fc["a"].reshape(3, 3, 4, 2)), fc["b"].reshape(1, 1, 2, 7))
    np.testing.assert_allclose(conv(x, merged["block"]["conv"]["kernel"]), base_out + s * low,
                               rtol=1e-4, atol=1e-4)
    # Dtype is kept (a bf16 base stays bf16).
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    assert lora_lib.apply_lora(p16, lora)["dense"]["kernel"].dtype == jnp.bfloat16


def test_gradients_reach_only_the_factors():
    params = _params()
    lora = _with_random_b(lora_lib.init_lora(params, rank=2, rng=jax.random.PRNGKey(2)))
    x = _normal(21, (3, 6))

    def loss(p, lo):
        m = lora_lib.apply_lora(p, lo)
        h = x @ m["dense"]["kernel"] + m["dense"]["bias"][None]
        return jnp.sum(h**2) + jnp.sum(m["block"]["conv"]["kernel"] ** 2)

    g_base, g_lora = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, lora)
    assert all(float(jnp.max(jnp.abs(a))) == 0.0 for a in jax.tree.leaves(g_base))
    assert all(float(jnp.max(jnp.abs(a))) > 0.0 for a in jax.tree.leaves(g_lora))
    assert jax.tree.structure(g_lora) == jax.tree.structure(lora)


def test_optax_trains_low_rank_dense_fit():
    # A Dense layer whose target differs from the pretrained weights by a rank-2 update: a
    # rank-2 LoRA trained with Adam reaches it; the base never moves.
    d_in, d_out, n = 16, 12, 64
    model = nn.Dense(d_out)
    base = {"kernel": _normal(30, (d_in, d_out), 0.3), "bias": _normal(31, (d_out,), 0.1)}
    target = {"kernel": base["kernel"] + _normal(32, (d_in, 2), 0.5) @ _normal(33, (2, d_out), 0.5),
              "bias": base["bias"]}
    x = _normal(34, (n, d_in))
    y = model.apply({"params": target}, x)
    lora = lora_lib.init_lora(base, rank=2, rng=jax.random.PRNGKey(3))
    tx = optax.adam(3e-2)

    def loss_fn(lo):
        return jnp.mean((model.apply({"params": lora_lib.apply_lora(base, lo)}, x) - y) ** 2)

    @jax.jit
    def train(lo):
        def step(carry, _):
            lo, opt = carry
            loss, g = jax.value_and_grad(loss_fn)(lo)
            upd, opt = tx.update(g, opt, lo)
            return (optax.apply_updates(lo, upd), opt), loss
        (lo, _), losses = jax.lax.scan(step, (lo, tx.init(lo)), None, length=400)
        return lo, losses

    trained, losses = train(lora)
    first, last = float(losses[0]), float(loss_fn(trained))
    assert first > 0.1 and last < 1e-3 * first, (first, last)
    merged = lora_lib.apply_lora(base, trained)
    np.testing.assert_allclose(merged["kernel"], target["kernel"], atol=0.05)
    np.testing.assert_array_equal(merged["bias"], base["bias"])
