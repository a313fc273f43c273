"""optim.clipped_adamw: optax's chain(clip_by_global_norm, adamw), bit for bit and state for
state; ``keep`` false leaves the state as it was; and what it exists for (no copies of the
moments in the compiled update)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cxr_rf import optim, step as step_lib

KW = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=step_lib.decay_mask, max_norm=1.0)
SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=2, decay_steps=10)


def _params():
    rng = np.random.default_rng(0)
    shapes = {"x_q": {"kernel": (8, 2, 4), "bias": (2, 4)}, "fc": {"kernel": (8, 16)},
              "norm": {"scale": (4,)}}
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32), shapes,
                        is_leaf=lambda s: isinstance(s, tuple))


def _grads(params, scale, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype),
                        params)


@pytest.mark.parametrize("max_norm,weight_decay", [(1.0, 0.1), (0.0, 0.1), (1.0, 0.0)])
def test_clipped_adamw_equals_optax_bit_for_bit(max_norm, weight_decay):
    kw = dict(KW, max_norm=max_norm, weight_decay=weight_decay)
    ours = optim.clipped_adamw(SCHEDULE, **kw)
    ref = optim.reference(SCHEDULE, **kw)
    params = _params()
    s_ours, s_ref = ours.init(params), ref.init(params)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_ref)   # checkpoints restore
    up_ours, up_ref = jax.jit(ours.update), jax.jit(ref.update)
    # Clipped (norm ~100), then below the threshold, then clipped again; warm-up and decay.
    for k, scale in enumerate([30.0, 0.01, 0.05, 10.0, 0.02]):
        g = _grads(params, scale, k)
        u_ours, s_ours = up_ours(g, s_ours, params)
        u_ref, s_ref = up_ref(g, s_ref, params)
        for a, b in zip(jax.tree.leaves((u_ours, s_ours)), jax.tree.leaves((u_ref, s_ref))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"step {k}")
        params = optax.apply_updates(params, u_ours)
    assert int(s_ours[1][0].count) == 5 and float(jnp.abs(u_ours["fc"]["kernel"]).max()) > 0


def test_keep_false_returns_the_state_unchanged():
    tx = optim.clipped_adamw(SCHEDULE, **KW)
    params = _params()
    state = jax.jit(tx.update)(_grads(params, 0.1, 0), tx.init(params), params)[1]
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), _grads(params, 0.1, 1))
    _, kept = jax.jit(lambda g, s, p, ok: tx.update(g, s, p, keep=ok))(bad, state, params,
                                                                         jnp.array(False))
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _moment_copies(tx, skip_inside: bool) -> int:
    """Copies of a moment in the compiled update with the train step's skip, params and state
    donated as in the step: ``skip_inside`` passes it to the update as ``keep`` (how
    ``step.train_step`` calls ``clipped_adamw``), else selects afterwards (how it called optax)."""
    params = _params()

    def update(params, state, grads, ok):
        if skip_inside:
            updates, new_state = tx.update(grads, state, params, keep=ok)
        else:
            updates, new_state = tx.update(grads, state, params)
            new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)
        new_params = jax.tree.map(lambda p, u: jnp.where(ok, p + u, p), params, updates)
        return jax.lax.optimization_barrier(new_params), new_state

    hlo = jax.jit(update, donate_argnums=(0, 1)).lower(
        params, tx.init(params), _grads(params, 1.0, 0), jnp.array(True)).compile().as_text()
    moments = set(re.findall(r"%([\w.\-]*(?:mu|nu)[\w.\-]*) = \S+ parameter\(", hlo))
    copied = re.findall(r"= \S+ copy\(%([\w.\-]+)\)", hlo)
    return sum(c in moments for c in copied)


def test_the_update_reads_stored_moments_instead_of_copying_them():
    """What the module exists for: optax's update, kept or not after the fact, makes XLA copy
    the moments before overwriting them in place; the skip inside the update does not."""
    assert _moment_copies(optim.reference(SCHEDULE, **KW), skip_inside=False) > 0  # can fail
    assert _moment_copies(optim.clipped_adamw(SCHEDULE, **KW), skip_inside=True) == 0
