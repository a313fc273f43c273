"""Rectified-flow tests against analytic truth: Gaussian (and Gaussian-mixture) targets.

For x0 ~ N(mu, S), eps ~ N(0, I), x_t = (1-t) x0 + t eps is Gaussian with mean m_t = (1-t) mu and
covariance C_t = (1-t)^2 S + t^2 I. With K_t = Cov(eps - x0, x_t) = t I - (1-t) S and
Cov(x0, x_t) = (1-t) S, the joint-Gaussian conditioning formulas give
    v*(x, t)      = E[eps - x0 | x_t = x] = -mu + K_t C_t^{-1} (x - m_t)
    E[x0 | x_t=x] = mu + (1-t) S C_t^{-1} (x - m_t)
    min loss(t)   = tr(Cov(eps - x0) - K_t C_t^{-1} K_t^T) / D,  Cov(eps - x0) = I + S.
All of these are functions of S, hence diagonal in S's eigenbasis (S = U diag(lam) U^T). Since
C_1 = I and C_t commutes with S, the ODE flow map is linear: x_t - m_t = C_t^{1/2} (x_1 - m_1), so
the exact sample for noise eps is x0 = mu + S^{1/2} eps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_rf import flow

MU = np.array([1.0, -0.5])
SIGMA = np.array([[1.5, 0.6], [0.6, 0.8]])  # correlated; eigenvalues ~1.84 and ~0.46


class Gaussian:
    """Closed-form quantities of the rectified flow for a Gaussian target N(mu, S) (flattened dims)."""

    def __init__(self, mu, sigma):
        self.mu = np.asarray(mu, np.float64)
        self.lam, self.U = np.linalg.eigh(np.asarray(sigma, np.float64))
        self.sqrt_sigma = self.U @ np.diag(np.sqrt(self.lam)) @ self.U.T

    def _apply(self, x, t_B, diag_fn, offset_fn):
        """offset_fn(t) + U diag(diag_fn(t, lam)) U^T (x - m_t), batched over B, any trailing shape."""
        dt = x.dtype
        B = x.shape[0]
        x_BD = x.reshape(B, -1)
        t = jnp.asarray(t_B, dt)[:, None]
        mu, U, lam = (jnp.asarray(a, dt) for a in (self.mu, self.U, self.lam))
        y = (x_BD - (1.0 - t) * mu[None]) @ U
        out = offset_fn(mu)[None] + (diag_fn(t, lam[None]) * y) @ U.T
        return out.reshape(x.shape)

    @staticmethod
    def _c(t, lam):
        return (1.0 - t) ** 2 * lam + t**2

    def v_star(self, x, t_B):
        return self._apply(x, t_B, lambda t, l: (t - (1.0 - t) * l) / self._c(t, l), lambda mu: -mu)

    def x0_star(self, x, t_B):
        return self._apply(x, t_B, lambda t, l: (1.0 - t) * l / self._c(t, l), lambda mu: mu)

    def min_loss(self, t_B):
        t = np.asarray(t_B, np.float64)[:, None]
        lam = self.lam[None]
        k = t - (1.0 - t) * lam
        return np.mean(1.0 + lam - k**2 / self._c(t, lam), axis=1)

    def sample_exact(self, eps):
        return self.mu + eps @ self.sqrt_sigma.T

    def draw(self, rng, n):
        return self.sample_exact(np.asarray(jax.random.normal(rng, (n, len(self.mu))), np.float64))


GAUSS = Gaussian(MU, SIGMA)


def rf_loss(apply_fn, x0, rng, *, t_B=None, **settings):
    """The training loss as the step computes it: ``flow.draw`` then ``flow.loss`` (the one
    definition), returning (mean loss, {"loss_B", "t_B"})."""
    fs = flow.FlowSettings(**{"shift": 1.0, **settings})
    t_B, eps = flow.draw(rng, x0, fs, t_B)
    loss_B = flow.loss(apply_fn, x0, t_B, eps, fs)
    return jnp.mean(loss_B), {"loss_B": loss_B, "t_B": t_B}


def test_shift_t_properties():
    t = jnp.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(flow.shift_t(t, 1.0), t, atol=1e-7)
    for s in (0.5, 3.0, 6.0):
        ts = flow.shift_t(t, s)
        assert float(ts[0]) == 0.0 and float(ts[-1]) == 1.0
        assert bool(jnp.all(jnp.diff(ts) > 0))
        np.testing.assert_allclose(ts, s * t / (1 + (s - 1) * t), rtol=1e-6)
    assert bool(jnp.all(flow.shift_t(t[1:-1], 3.0) > t[1:-1]))  # shift>1 moves towards noise
    assert flow.resolution_shift(4 * 256, 256) == 2.0
    assert flow.resolution_shift(256, 256) == 1.0
    with pytest.raises(ValueError, match="positive"):
        flow.resolution_shift(0, 256)


def test_timesteps_grid():
    g = flow.timesteps(10)
    assert g.shape == (11,) and float(g[0]) == 1.0 and float(g[-1]) == 0.0
    np.testing.assert_allclose(g, np.linspace(1, 0, 11), atol=1e-6)
    gs = flow.timesteps(10, 3.0)
    assert float(gs[0]) == 1.0 and float(gs[-1]) == 0.0 and bool(jnp.all(jnp.diff(gs) < 0))
    np.testing.assert_allclose(gs, flow.shift_t(g, 3.0), rtol=1e-6)


def test_sample_t_logit_normal():
    rng = jax.random.PRNGKey(0)
    t = flow.sample_t(rng, 100_000, mean=0.5, std=0.8)
    logit = np.log(np.asarray(t, np.float64)) - np.log1p(-np.asarray(t, np.float64))
    assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 0.8) < 0.02
    t0 = flow.sample_t(rng, 100_000)
    t3 = flow.sample_t(rng, 100_000, shift=3.0)
    np.testing.assert_allclose(t3, flow.shift_t(t0, 3.0), rtol=1e-6)  # same rng: shift applied after
    assert float(t3.mean()) > float(t0.mean()) + 0.1
    assert bool(jnp.all((t3 > 0) & (t3 < 1)))


def test_interpolate_broadcast_and_endpoints():
    x0 = jnp.ones((3, 4, 4, 2))
    eps = -jnp.ones((3, 4, 4, 2))
    x_t = flow.interpolate(x0, eps, jnp.array([0.0, 0.25, 1.0]))
    np.testing.assert_allclose(x_t[:, 0, 0, 0], [1.0, 0.5, -1.0])
    assert x_t.shape == x0.shape


@pytest.mark.parametrize("prediction", ["v", "x"])
def test_rf_loss_attains_analytic_minimum(prediction):
    n = 200_000
    rng_x, rng_loss, rng_t = jax.random.split(jax.random.PRNGKey(1), 3)
    x0 = jnp.asarray(GAUSS.draw(rng_x, n), jnp.float32)
    # Fixed timesteps (validation mode), kept above t_eps so x-prediction is exact.
    t_B = jax.random.uniform(rng_t, (n,), minval=0.06, maxval=0.98)
    opt = GAUSS.v_star if prediction == "v" else GAUSS.x0_star
    loss_fn = jax.jit(lambda f, x, r: rf_loss(f, x, r, prediction=prediction, t_B=t_B),
                      static_argnums=0)
    loss, aux = loss_fn(opt, x0, rng_loss)
    np.testing.assert_array_equal(aux["t_B"], t_B)
    assert aux["loss_B"].shape == (n,)
    expected = GAUSS.min_loss(t_B).mean()
    assert abs(float(loss) - expected) < 5 * _stderr(aux["loss_B"]), (float(loss), expected)
    # A perturbed field (constant offset delta in v-space) costs exactly +delta^2 in expectation.
    delta = 0.1
    if prediction == "v":
        pert = lambda x, t: GAUSS.v_star(x, t) + delta
    else:  # v = (x_t - x̂)/t, so x̂ - delta*t shifts v by +delta
        pert = lambda x, t: GAUSS.x0_star(x, t) - delta * t[:, None]
    loss_p, aux_p = loss_fn(pert, x0, rng_loss)  # same rng: paired comparison
    assert float(loss_p) > float(loss)
    gap = float(loss_p) - float(loss)
    assert abs(gap - delta**2) < 5 * _stderr(aux_p["loss_B"] - aux["loss_B"]), gap


def _stderr(loss_B):
    """Monte-Carlo standard error of a batch mean."""
    return float(jnp.std(loss_B)) / np.sqrt(loss_B.shape[0])


def test_rf_loss_sampled_t_matches_analytic():
    n = 200_000
    rng_x, rng_loss = jax.random.split(jax.random.PRNGKey(2))
    x0 = jnp.asarray(GAUSS.draw(rng_x, n), jnp.float32)
    loss, aux = jax.jit(lambda x, r: rf_loss(GAUSS.v_star, x, r, shift=3.0))(x0, rng_loss)
    assert float(aux["t_B"].mean()) > 0.6  # shifted logit-normal
    expected = GAUSS.min_loss(aux["t_B"]).mean()
    assert abs(float(loss) - expected) < 5 * _stderr(aux["loss_B"]), (float(loss), expected)


def test_x_prediction_gives_v_star():
    g4 = Gaussian(np.array([0.5, -1.0, 0.0, 2.0]), np.diag([0.3, 1.0, 2.0, 0.7]))
    x = jax.random.normal(jax.random.PRNGKey(3), (64, 2, 2, 1))  # image-shaped, D = 4
    t_B = jnp.linspace(0.06, 1.0, 64)
    v = flow.velocity_from_output(g4.x0_star(x, t_B), x, t_B, prediction="x", t_eps=0.05)
    np.testing.assert_allclose(v, g4.v_star(x, t_B), rtol=1e-4, atol=1e-4)
    v_id = flow.velocity_from_output(g4.v_star(x, t_B), x, t_B, prediction="v")
    np.testing.assert_array_equal(v_id, g4.v_star(x, t_B))


@pytest.mark.parametrize("method,steps,shift",
                         [("euler", 256, 1.0), ("euler", 256, 3.0), ("heun", 16, 1.0), ("heun", 16, 3.0)])
def test_sampling_recovers_gaussian_moments(method, steps, shift):
    eps = jax.random.normal(jax.random.PRNGKey(4), (20_000, 2))
    x0 = jax.jit(lambda e: flow.sample(GAUSS.v_star, e, steps=steps, method=method, shift=shift))(eps)
    x0 = np.asarray(x0, np.float64)
    np.testing.assert_allclose(x0.mean(0), MU, atol=0.05)
    np.testing.assert_allclose(np.cov(x0.T), SIGMA, atol=0.08)


def _log_log_slope(velocity_fn, eps, exact, method, shift, ns):
    errs = []
    for n in ns:
        out = jax.jit(lambda e: flow.sample(velocity_fn, e, steps=n, method=method, shift=shift))(eps)
        errs.append(float(jnp.sqrt(jnp.mean((out - exact) ** 2))))
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0], errs


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_convergence_order(shift):
    """Endpoint error vs the exact flow map: Euler O(1/N), Heun O(1/N^2).

    Heun's midpoint last step (see flow.integrate) reaches its asymptotic slope a little later with
    shift=3 (slope ~1.7 over N=8..64, ~1.93 over N=32..256), hence the finer Heun grids.
    """
    with jax.enable_x64(True):
        eps = jax.random.normal(jax.random.PRNGKey(5), (32, 2), dtype=jnp.float64)
        exact = jnp.asarray(GAUSS.sample_exact(np.asarray(eps)))  # exact linear flow map
        p_euler, e_euler = _log_log_slope(GAUSS.v_star, eps, exact, "euler", shift, [16, 32, 64, 128])
        p_heun, e_heun = _log_log_slope(GAUSS.v_star, eps, exact, "heun", shift, [32, 64, 128, 256])
    assert 0.8 < p_euler < 1.2, (p_euler, e_euler)
    assert 1.8 < p_heun < 2.2, (p_heun, e_heun)
    assert e_heun[-1] < 1e-4, e_heun  # sanity: the finest Heun grid is accurate


def test_invert_then_sample_round_trips():
    with jax.enable_x64(True):
        x0 = jnp.asarray(GAUSS.draw(jax.random.PRNGKey(6), 64))
        kw = dict(steps=128, method="heun", shift=3.0)
        x1 = jax.jit(lambda x: flow.invert(GAUSS.v_star, x, **kw))(x0)
        back = jax.jit(lambda x: flow.sample(GAUSS.v_star, x, **kw))(x1)
        # The exact inverse flow map whitens: x1 = S^{-1/2} (x0 - mu).
        want_x1 = np.linalg.solve(GAUSS.sqrt_sigma, (np.asarray(x0) - MU).T).T
        np.testing.assert_allclose(x1, want_x1, atol=5e-4)  # O(h^2) discretisation, h~3/128 at t=0
        np.testing.assert_allclose(back, x0, atol=5e-5)


def test_gaussian_mixture_weights_recovered():
    """1-D mixture: v* is the posterior-weighted mix of the components' Gaussian velocities."""
    # [1, K] rows, so every broadcast against [B, 1] is explicit (rank promotion raises).
    w, m, s2 = jnp.array([[0.3, 0.7]]), jnp.array([[-2.0, 2.0]]), jnp.array([[0.09, 0.09]])

    def v_mix(x, t_B):
        x, t = x[:, :1], t_B[:, None]
        c = (1 - t) ** 2 * s2 + t**2  # [B, K] marginal variances of x_t per component
        logp = jnp.log(w) - 0.5 * jnp.log(c) - 0.5 * (x - (1 - t) * m) ** 2 / c
        post = jax.nn.softmax(logp, axis=1)
        v_k = -m + (t - (1 - t) * s2) / c * (x - (1 - t) * m)
        return jnp.sum(post * v_k, axis=1, keepdims=True)

    eps = jax.random.normal(jax.random.PRNGKey(7), (20_000, 1))
    x0 = jax.jit(lambda e: flow.sample(v_mix, e, steps=32, method="heun"))(eps)
    assert abs(float(jnp.mean(x0 < 0)) - 0.3) < 0.015
    np.testing.assert_allclose(jnp.std(x0[x0 > 0]), 0.3, atol=0.02)


def _toy_apply(calls):
    def apply_fn(x, t_B, tok_BL):
        calls.append(x.shape[0])  # Python side effect: counts calls (traces under jit)
        return x * tok_BL.mean(axis=1)[:, None, None, None] + t_B[:, None, None, None]

    return apply_fn


@pytest.mark.parametrize("prediction", ["v", "x"])
def test_guided_velocity_fn(prediction):
    calls = []
    apply_fn = _toy_apply(calls)
    x = jax.random.normal(jax.random.PRNGKey(8), (3, 4, 4, 1))
    t_B = jnp.array([0.2, 0.5, 0.9])
    cond = jnp.array([[1.0, 3.0], [2.0, 2.0], [0.0, 4.0]])
    uncond = jnp.zeros((1, 2))  # a single null-token row, broadcast to the batch
    to_v = lambda out: flow.velocity_from_output(out, x, t_B, prediction=prediction)
    v_c = to_v(apply_fn(x, t_B, cond))
    v_u = to_v(apply_fn(x, t_B, jnp.zeros((3, 2))))
    for scale, want in [(1.0, v_c), (0.0, v_u), (4.0, v_u + 4.0 * (v_c - v_u))]:
        calls.clear()
        fn = flow.guided_velocity_fn(apply_fn, [uncond, cond], [scale], prediction=prediction)
        np.testing.assert_allclose(fn(x, t_B), want, rtol=1e-5, atol=1e-5)
        assert calls == [6]  # one batched call on [uncond; cond]
    np.testing.assert_allclose(flow.cfg_velocity(v_c, v_u, 2.5), v_u + 2.5 * (v_c - v_u), rtol=1e-6)


def test_chained_guidance_is_cfg_with_equal_scales_and_weights_each_step_otherwise():
    """Three branches (null, + demographics, + findings): equal scales telescope to plain
    CFG between the ends; unequal scales weight each step, in one batched call."""
    calls = []
    apply_fn = _toy_apply(calls)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 1))
    t_B = jnp.array([0.3, 0.8])
    b0, b1, b2 = jnp.zeros((1, 2)), jnp.array([[1.0, 0.0], [0.5, 0.5]]), jnp.array(
        [[1.0, 3.0], [2.0, 2.0]])
    v0, v1, v2 = (apply_fn(x, t_B, jnp.broadcast_to(b, (2, 2))) for b in (b0, b1, b2))
    for s in (1.0, 3.0, 7.5):
        calls.clear()
        chained = flow.guided_velocity_fn(apply_fn, [b0, b1, b2], [s, s])(x, t_B)
        assert calls == [6]
        np.testing.assert_allclose(chained, flow.cfg_velocity(v2, v0, s), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            chained, flow.guided_velocity_fn(apply_fn, [b0, b2], [s])(x, t_B), rtol=1e-5,
            atol=1e-5)
    got = flow.guided_velocity_fn(apply_fn, [b0, b1, b2], [2.0, 5.0])(x, t_B)
    np.testing.assert_allclose(got, v0 + 2.0 * (v1 - v0) + 5.0 * (v2 - v1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one scale per branch"):
        flow.guided_velocity_fn(apply_fn, [b0, b1, b2], [2.0])


@pytest.mark.parametrize("method,traces", [("euler", 1), ("heun", 2)])
def test_sampler_compiles_one_loop_body(method, traces):
    calls = []
    fn = flow.guided_velocity_fn(_toy_apply(calls), [jnp.zeros((2, 3)), jnp.ones((2, 3))], [2.0])
    out = jax.jit(lambda e: flow.sample(fn, e, steps=50, method=method))(jnp.ones((2, 4, 4, 1)))
    assert out.shape == (2, 4, 4, 1) and bool(jnp.all(jnp.isfinite(out)))
    assert len(calls) == traces  # the body is traced once, not once per step


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sample_never_evaluates_at_t0_and_keeps_dtype(method):
    """x-prediction velocities are undefined at t=0; the samplers must not ask for them."""
    poisoned = lambda x, t_B: jnp.where((t_B == 0)[:, None], jnp.nan, GAUSS.v_star(x, t_B))
    eps = jnp.ones((4, 2), jnp.bfloat16)
    out = jax.jit(lambda e: flow.sample(poisoned, e, steps=5, method=method, shift=3.0))(eps)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
    _, aux = rf_loss(GAUSS.v_star, eps, jax.random.PRNGKey(0))
    assert aux["t_B"].dtype == jnp.float32 and aux["loss_B"].dtype == jnp.float32


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="euler, heun"):
        flow.sample(GAUSS.v_star, jnp.zeros((2, 2)), steps=4, method="rk4")
    with pytest.raises(ValueError, match="euler, heun"):
        flow.invert(GAUSS.v_star, jnp.zeros((2, 2)), steps=4, method="dpm")
    with pytest.raises(ValueError, match="v, x"):
        flow.velocity_from_output(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), prediction="eps")
    with pytest.raises(ValueError, match="v, x"):
        flow.FlowSettings(prediction="eps")
    with pytest.raises(ValueError, match="v, x"):
        flow.guided_velocity_fn(lambda *a: a[0], [jnp.zeros(1), jnp.zeros(1)], [1.0],
                                prediction="noise")
    with pytest.raises(ValueError, match="steps"):
        flow.timesteps(0)


# ---------------------------------------------------------------- guided sampling, closed forms
# An "apply function" whose output depends on the context tokens, one value per row: the
# conditional rows differ from each other and from the null row, so a sampler that drops the
# condition, the guidance scale, the shift or the x-prediction conversion lands elsewhere.
COND_BL = jnp.array([[3, 1, 4], [1, 5, 9], [2, 6, 5]], jnp.int32)
NULL_1L = jnp.array([[7, 7, 7]], jnp.int32)       # one null row, broadcast to the batch


def _level_B(tok_BL):
    """A per-row scalar of the tokens (-0.2, 0.5, 0.3 for COND_BL; 1.1 for the null row)."""
    return 0.1 * jnp.sum(tok_BL, axis=1).astype(jnp.float32) - 1.0


def _per_row(v_B, x):
    return jnp.broadcast_to(v_B.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("scale", [1.0, 4.0])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_guided_x_prediction_sample_is_the_guided_clean_image(method, scale, shift):
    """x-prediction of a constant clean image m(tokens): v = (x - m) / t, whose flow is the
    straight line x_t = m + t (x_1 - m). Every Euler or Heun step (the midpoint last step
    too) has exactly the line's slope, so on any grid the sample is exactly the guided image
    m_u + s (m_c - m_u), row by row."""
    apply = lambda x, t_B, tok: _per_row(_level_B(tok), x)
    x1 = jax.random.normal(jax.random.PRNGKey(9), (3, 4, 4, 1))
    fn = flow.guided_velocity_fn(apply, [NULL_1L, COND_BL], [scale], prediction="x")
    x0 = jax.jit(lambda e: flow.sample(fn, e, steps=4, method=method, shift=shift))(x1)
    m_c, m_u = _level_B(COND_BL), _level_B(NULL_1L)
    want = m_u + scale * (m_c - m_u)
    np.testing.assert_allclose(x0, _per_row(want, x1), atol=2e-5)
    # Read as a velocity instead, the same network output gives x_1 - m (the straight path
    # under constant velocity m): a different image.
    fn_v = flow.guided_velocity_fn(apply, [NULL_1L, COND_BL], [scale], prediction="v")
    x0_v = jax.jit(lambda e: flow.sample(fn_v, e, steps=4, method=method, shift=shift))(x1)
    np.testing.assert_allclose(x0_v, x1 - _per_row(want, x1), atol=2e-5)


def _euler_sum(steps, shift):
    """sum_i (t_{i+1} - t_i) t_i on the shifted grid, written out from the SD3 formula."""
    u = 1.0 - np.arange(steps + 1) / steps
    t = shift * u / (1.0 + (shift - 1.0) * u)
    return float(np.sum(np.diff(t) * t[:-1]))


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_guided_v_sample_follows_the_shifted_grid(scale):
    """v = k(tokens) * t. Heun (trapezoid, and the midpoint last step) integrates a velocity
    linear in t exactly: x_0 = x_1 - k/2 on any grid. Euler gives x_1 + k sum_i dt_i t_i,
    which depends on the grid, so it sees the shift: 4 steps give -0.625 k unshifted and
    -0.6725 k at shift 3."""
    apply = lambda x, t_B, tok: _per_row(_level_B(tok) * t_B, x)
    x1 = jax.random.normal(jax.random.PRNGKey(10), (3, 4, 4, 1))
    fn = flow.guided_velocity_fn(apply, [NULL_1L, COND_BL], [scale])
    k_c, k_u = _level_B(COND_BL), _level_B(NULL_1L)
    k = k_u + scale * (k_c - k_u)
    run = jax.jit(lambda e, method, shift: flow.sample(fn, e, steps=4, method=method, shift=shift),
                  static_argnums=(1, 2))
    assert _euler_sum(4, 1.0) == pytest.approx(-0.625)
    assert _euler_sum(4, 3.0) == pytest.approx(-0.6725)
    got = {}
    for shift in (1.0, 3.0):
        got[shift] = run(x1, "euler", shift)
        np.testing.assert_allclose(got[shift], x1 + _per_row(k * _euler_sum(4, shift), x1),
                                   atol=2e-5)
        np.testing.assert_allclose(run(x1, "heun", shift), x1 - _per_row(k / 2, x1), atol=2e-5)
    assert float(jnp.abs(got[3.0] - got[1.0]).min()) > 0.005      # every row sees the shift
