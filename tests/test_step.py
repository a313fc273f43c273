"""The train step's optimiser pieces against closed forms: the EMA warm-up, the learning-rate
schedule, global-norm clipping inside AdamW.

Each expectation is written out from the formula (not by calling the code under test twice),
so a changed constant, a dropped ``min`` or a clip in the wrong place fails here.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_rf import conditioning, config
from cxr_rf import step as step_lib
from cxr_rf.flow import FlowSettings
from cxr_rf.model import build_model

RES, BATCH = 16, 4
FS = FlowSettings(shift=1.0)     # a fixed shift: the step never sees an unresolved one


def _cfg(**optim):
    cfg = config.base()
    cfg.data.resolution = RES
    # Depth 1 (the last, context-pre-only block alone) halves the train step's compile time;
    # nothing checked here depends on the architecture.
    cfg.model.update(width=32, depth=1, heads=2, patch=4)
    cfg.optim.update(optim)
    return cfg


# ------------------------------------------------------------------ learning-rate schedule

def _lr_closed_form(s, lr, warmup, steps):
    """Linear 0 -> lr over ``warmup`` steps, then half a cosine from lr to lr/100 at ``steps``."""
    if s < warmup:
        return lr * s / warmup
    frac = min(s - warmup, steps - warmup) / (steps - warmup)
    end = 0.01 * lr
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * frac))


def test_lr_schedule_matches_closed_form():
    cfg = _cfg(lr=2e-3, warmup_steps=20)
    cfg.train.steps = 220
    sched = step_lib.lr_schedule(cfg)
    for s in (0, 1, 7, 19, 20, 21, 70, 120, 170, 219, 220, 500):
        want = _lr_closed_form(s, 2e-3, 20, 220)
        assert float(sched(s)) == pytest.approx(want, rel=1e-5, abs=1e-12), s
    # The landmarks, spelled out: 0 at step 0, the peak after warm-up, the midpoint of the
    # cosine halfway through the decay, 1% from the last step on.
    assert float(sched(0)) == 0.0
    assert float(sched(10)) == pytest.approx(1e-3, rel=1e-6)
    assert float(sched(20)) == pytest.approx(2e-3, rel=1e-6)
    assert float(sched(120)) == pytest.approx((2e-3 + 2e-5) / 2, rel=1e-5)
    assert float(sched(220)) == float(sched(10_000)) == pytest.approx(2e-5, rel=1e-5)


# ------------------------------------------------------------------ AdamW + clipping

def _adam_updates(grads, lrs, b1, b2, eps=1e-8):
    """Bias-corrected Adam (no weight decay) on a list of flat gradient vectors: the updates."""
    m = v = 0.0
    out = []
    for k, (g, lr) in enumerate(zip(grads, lrs), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(-lr * (m / (1 - b1 ** k)) / (np.sqrt(v / (1 - b2 ** k)) + eps))
    return out


def _run_tx(tx, grads_seq, params):
    state = tx.init(params)
    out = []
    for g in grads_seq:
        upd, state = tx.update(g, state, params)
        out.append(np.concatenate([np.ravel(np.asarray(x, np.float64))
                                   for x in jax.tree.leaves(upd)]))
    return out


def test_weight_decay_applies_to_kernels_by_name():
    """Decay reaches every projection kernel and nothing else: not the biases and norm
    scales of the scanned blocks (rank >= 2 there, from the layer axis), the token table,
    the context positions. Checked on the real tree and through the optimizer: with a zero
    gradient, only kernels move."""
    cfg = _cfg(lr=1e-2, warmup_steps=0, weight_decay=0.5)
    cfg.model.depth = 2                                  # a scanned block
    params = step_lib.abstract_state(cfg).params
    mask = step_lib.decay_mask(params)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert all(m == k.endswith("['kernel']") for k, m in flat.items()), flat
    assert not flat["['blocks']['x_q_norm']['scale']"] and not flat["['ctx_pos']"]
    assert params["blocks"]["x_q"]["bias"].ndim >= 2     # what a rank test would have caught
    ones = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), params)
    tx = step_lib.make_optimizer(cfg)
    upd, _ = tx.update(jax.tree.map(jnp.zeros_like, ones), tx.init(ones), ones)
    moved = {jax.tree_util.keystr(p): bool(jnp.any(u != 0))
             for p, u in jax.tree_util.tree_flatten_with_path(upd)[0]}
    assert moved == flat


def test_make_optimizer_clips_the_global_norm_before_adam():
    clip = 1.0
    cfg = _cfg(lr=1e-2, warmup_steps=2, grad_clip=clip, weight_decay=0.0)
    tx = step_lib.make_optimizer(cfg)
    lrs = [float(step_lib.lr_schedule(cfg)(s)) for s in range(3)]
    # Two leaves, a vector and a matrix: the clip is on the norm of the whole tree.
    params = {"a": jnp.zeros((3,), jnp.float32), "b": jnp.zeros((2, 2), jnp.float32)}
    rng = np.random.default_rng(0)

    def tree(flat):
        return {"a": jnp.asarray(flat[:3], jnp.float32),
                "b": jnp.asarray(flat[3:].reshape(2, 2), jnp.float32)}

    g_huge = 1e4 * rng.standard_normal(7)
    g_small = 0.3 * rng.standard_normal(7)          # below the clip norm: passes unchanged
    g_mid = 0.5 * rng.standard_normal(7)
    assert np.linalg.norm(g_small) < clip and np.linalg.norm(g_mid) < clip
    scaled = g_huge * clip / np.linalg.norm(g_huge)
    seq = [g_huge, g_small, g_mid]
    got = _run_tx(tx, [tree(g) for g in seq], params)
    # Adam is scale-invariant per step, so clipping shows in the *moments* it leaves behind:
    # the later updates equal Adam's on the clipped sequence, not on the raw one.
    want = _adam_updates([scaled, g_small, g_mid], lrs, cfg.optim.b1, cfg.optim.b2)
    raw = _adam_updates(seq, lrs, cfg.optim.b1, cfg.optim.b2)
    for k in range(3):
        np.testing.assert_allclose(got[k], want[k], rtol=2e-4, atol=1e-9)
    assert np.abs(raw[2] - want[2]).max() > 0.1 * np.abs(want[2]).max()   # and it matters
    # Same updates for the huge gradient as for that gradient scaled to norm grad_clip.
    same = _run_tx(tx, [tree(g) for g in (scaled, g_small, g_mid)], params)
    for a, b in zip(got, same):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-9)
    assert float(np.abs(got[0]).max()) == 0.0        # warm-up: step 0 has learning rate 0


# ------------------------------------------------------------------ EMA inside train_step

def _model_and_state():
    # No warm-up, so every step moves the params (a learning rate of 0 would hide the EMA).
    cfg = _cfg(lr=3e-3, warmup_steps=0)
    model = build_model(cfg)
    tx = step_lib.make_optimizer(cfg)
    batch = _batch(0)
    init = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), batch["image"][:1],
                                             jnp.zeros((1,)), batch["tokens"][:1])["params"])
    rng = np.random.default_rng(1)
    # adaLN-Zero and the zero-init output layer would keep most weights (and the loss's
    # dependence on them) still for the first steps; perturb every leaf so all of them move.
    params = jax.tree.map(lambda a: jnp.asarray(
        np.asarray(a) + 0.05 * rng.standard_normal(a.shape), a.dtype), init)
    # The EMA starts somewhere else than the params, so its starting point is checked too.
    ema = jax.tree.map(lambda a: jnp.asarray(0.02 * rng.standard_normal(a.shape), a.dtype), init)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema,
                                opt_state=tx.init(params), rng=jax.random.PRNGKey(2))
    return cfg, model, tx, state


def _batch(seed):
    rng = np.random.default_rng(seed)
    conds = [conditioning.Conditions.parse(f, sex=s, age=a, view=v) for f, s, a, v in (
        ("Cardiomegaly", "F", 70, "PA"), ("", "M", 30, "AP"),
        ("Pneumothorax", "M", 25, "PA"), ("Pleural Effusion", "F", 85, "AP"))]
    return {"image": jnp.asarray(rng.uniform(-1, 1, (BATCH, RES, RES, 1)), jnp.float32),
            "tokens": jnp.asarray(np.stack([c.tokens() for c in conds]), jnp.int32)}


def test_ema_follows_the_warmup_decay_closed_form():
    ema_decay = 0.25       # below (1+s)/(10+s) from s = 3 on: both branches of the min run
    _, model, tx, state = _model_and_state()
    step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx,
                                     fs=FS, ema_decay=ema_decay))
    e0 = state.ema_params
    seq = []
    n = 5
    for k in range(n):
        state, metrics = step(state, _batch(k))
        assert float(metrics["skipped"]) == 0.0
        seq.append(state.params)
    assert int(state.step) == n
    d = [min(ema_decay, (1 + s) / (10 + s)) for s in range(n)]
    assert d[:3] == [0.1, 2 / 11, 0.25] and d[3] == d[4] == 0.25
    # Unrolled: ema_n = prod(d) e_0 + sum_k (1 - d_k) prod_{j>k} d_j p_{k+1}.
    w0 = math.prod(d)
    w = [(1 - d[k]) * math.prod(d[k + 1:]) for k in range(n)]
    assert w0 + sum(w) == pytest.approx(1.0)
    moved = 0
    for path_leaf, e0_leaf, got, *ps in zip(jax.tree_util.tree_leaves_with_path(state.params),
                                             jax.tree.leaves(e0),
                                             jax.tree.leaves(state.ema_params),
                                             *(jax.tree.leaves(p) for p in seq)):
        ps = [np.asarray(p, np.float64) for p in ps]
        want = w0 * np.asarray(e0_leaf, np.float64) + sum(wk * p for wk, p in zip(w, ps))
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path_leaf[0]))
        moved += bool(np.abs(ps[-1] - ps[0]).max() > 1e-5)
    # The check has teeth only if the params actually move from step to step.
    assert moved == len(jax.tree.leaves(seq[0])), moved

