"""Rectified flow (SD3 recipe): interpolation, timestep sampling, loss, ODE samplers, CFG, inversion.

Conventions used throughout:
  * t in [0, 1]; t = 0 is data x0, t = 1 is Gaussian noise eps.
  * x_t = (1 - t) * x0 + t * eps, so the velocity dx_t/dt is v = eps - x0.
  * Sampling integrates the ODE dx/dt = v(x, t) from t = 1 down to t = 0; inversion goes 0 -> 1.
  * A "velocity_fn" is any callable (x, t_B) -> v with v shaped like x; t_B has shape [batch].

Everything here is a pure function of arrays and callables (no Flax modules), so it composes
with jit / pjit / scan and is reused by the train step, the sampler CLI and the benchmarks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from cxr_rf import errors

PREDICTIONS = ("v", "x")
METHODS = ("euler", "heun")

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise errors.UserError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise errors.UserError(f"unknown sampling method {method!r}; allowed: {', '.join(METHODS)}")


def _bcast(t_B: jax.Array, x: jax.Array) -> jax.Array:
    """Reshape a per-example t_B to [B, 1, 1, ...] so it broadcasts against x."""
    t_B = jnp.asarray(t_B)
    return t_B.reshape(t_B.shape + (1,) * (x.ndim - t_B.ndim))


def interpolate(x0: jax.Array, eps: jax.Array, t_B: jax.Array) -> jax.Array:
    """x_t = (1 - t) x0 + t eps, with t_B broadcast over all trailing dims of x0."""
    t = _bcast(t_B, x0).astype(x0.dtype)
    return (1.0 - t) * x0 + t * eps


def shift_t(t, shift):
    """SD3 resolution shift shift*t / (1 + (shift-1)*t): monotone, fixes 0 and 1, identity at shift=1.

    shift > 1 moves timesteps towards the noise end (t=1), which larger images need because
    their many correlated pixels keep the signal recognisable at a given noise level.
    """
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(num_tokens: int, base_tokens: int) -> float:
    """SD3 automatic shift alpha = sqrt(num_tokens / base_tokens) (1.0 at the base resolution)."""
    if num_tokens <= 0 or base_tokens <= 0:
        raise errors.UserError(f"token counts must be positive, got {num_tokens=}, {base_tokens=}")
    return float((num_tokens / base_tokens) ** 0.5)


@dataclasses.dataclass(frozen=True)
class FlowSettings:
    """The flow knobs of an experiment, ``cfg.flow`` one to one: ``FlowSettings(**cfg.flow)``.

    Frozen and hashable, so a jitted step takes it as a static argument. ``shift == 0`` means
    automatic (SD3): sqrt(image tokens / base_tokens), at least 1; ``at(num_tokens)`` resolves
    it for a resolution, and the step only ever sees resolved settings.
    """
    prediction: str = "v"      # network output: "v" (velocity) or "x" (clean image x̂)
    t_mean: float = 0.0        # logit-normal timesteps: sigmoid(t_mean + t_std * n)
    t_std: float = 1.0
    shift: float = 0.0         # SD3 timestep shift; 0 = automatic from the token count
    base_tokens: int = 256     # token count at which the automatic shift is 1
    t_eps: float = 0.05        # x-prediction: v = (x_t - x̂) / max(t, t_eps)

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise errors.UserError(f"flow.prediction {self.prediction!r} is unknown; allowed: "
                                   f"{', '.join(PREDICTIONS)}")
        for name, ok, allowed in (
                ("t_mean", math.isfinite(self.t_mean), "a finite number"),
                ("t_std", math.isfinite(self.t_std) and self.t_std > 0, "> 0"),
                ("shift", math.isfinite(self.shift) and self.shift >= 0, ">= 0 (0 = automatic)"),
                ("base_tokens", self.base_tokens >= 1, ">= 1"),
                ("t_eps", 0 < self.t_eps < 1, "in (0, 1)")):
            if not ok:
                raise errors.UserError(f"flow.{name} = {getattr(self, name)!r} must be {allowed}")

    def at(self, num_tokens: int) -> "FlowSettings":
        """These settings with the automatic shift resolved for ``num_tokens`` image tokens."""
        if self.shift > 0:
            return self
        return dataclasses.replace(
            self, shift=max(1.0, resolution_shift(num_tokens, self.base_tokens)))

    @property
    def resolved_shift(self) -> float:
        """The shift to apply; refuses unresolved (automatic) settings instead of using 0."""
        if self.shift <= 0:
            raise ValueError("FlowSettings.shift is 0 (automatic): resolve it with "
                             ".at(num_tokens) before drawing timesteps or sampling")
        return self.shift


def sample_t(rng: jax.Array, batch: int, *, mean: float = 0.0, std: float = 1.0,
             shift: float = 1.0) -> jax.Array:
    """Training timesteps t_B: logit-normal sigmoid(mean + std * n), n ~ N(0, 1), then shift_t."""
    n_B = jax.random.normal(rng, (batch,), dtype=jnp.float32)
    return shift_t(jax.nn.sigmoid(mean + std * n_B), shift)


def velocity_from_output(out: jax.Array, x_t: jax.Array, t_B: jax.Array, *, prediction: str,
                         t_eps: float = 0.05) -> jax.Array:
    """Network output -> velocity: "v" gives out; "x" (clean image x̂) gives (x_t - x̂) / max(t, t_eps).

    From x_t = (1-t) x0 + t eps, eps - x0 = (x_t - x0) / t exactly; the floor t_eps keeps the
    division (and its gradient) bounded near t = 0, where the x-prediction carries no velocity info.
    """
    _check_prediction(prediction)
    if prediction == "v":
        return out
    t = jnp.maximum(_bcast(t_B, x_t), t_eps).astype(x_t.dtype)
    return (x_t - out) / t


def draw(rng: jax.Array, x0: jax.Array, fs: FlowSettings, t_B: jax.Array | None = None):
    """(t_B, eps) for a batch x0: logit-normal timesteps with the shift, and Gaussian noise.

    Drawn for the WHOLE batch before any split into microbatches, so the loss does not depend
    on how the batch is split. With ``t_B`` given (validation at fixed timesteps) only the
    noise is drawn, and it is the same noise as when t is drawn too.
    """
    rng_t, rng_eps = jax.random.split(rng)
    if t_B is None:
        t_B = sample_t(rng_t, x0.shape[0], mean=fs.t_mean, std=fs.t_std, shift=fs.resolved_shift)
    return t_B, jax.random.normal(rng_eps, x0.shape, dtype=x0.dtype)


def loss(apply_fn: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array, t_B: jax.Array,
         eps: jax.Array, fs: FlowSettings) -> jax.Array:
    """THE rectified-flow loss (training, validation and the analytic tests all call this):
    per-example MSE in v-space, ``loss_B`` of shape [B], mean over all non-batch dims.

    apply_fn(x_t, t_B) returns the network output: v, or x̂ when ``fs.prediction == "x"``
    (turned into v by ``velocity_from_output``, so both are trained on the same v-loss).
    """
    batch = x0.shape[0]
    # t and the loss arithmetic stay in float32 (at least) even for bf16 data: a bf16 t has only
    # ~3 significant digits and a bf16 residual would round the small late-training losses.
    acc = jnp.promote_types(x0.dtype, jnp.float32)
    t_B = jnp.broadcast_to(jnp.asarray(t_B, dtype=acc), (batch,))
    x_t = interpolate(x0, eps, t_B)
    out = apply_fn(x_t, t_B)
    v_pred = velocity_from_output(out.astype(acc), x_t.astype(acc), t_B, prediction=fs.prediction,
                                  t_eps=fs.t_eps)
    target = (eps - x0).astype(acc)
    return jnp.mean(jnp.square(v_pred - target).reshape(batch, -1), axis=1)


def timesteps(steps: int, shift: float = 1.0) -> jax.Array:
    """Sampling grid of shape [steps+1] from 1.0 down to 0.0: uniform, then shift_t (endpoints stay exact)."""
    if int(steps) < 1:
        raise errors.UserError(f"steps must be >= 1, got {steps}")
    return shift_t(jnp.linspace(1.0, 0.0, int(steps) + 1), shift)


def integrate(velocity_fn: VelocityFn, x: jax.Array, ts: jax.Array, *, method: str = "euler") -> jax.Array:
    """Integrate dx/dt = velocity_fn(x, t_B) along the grid ts (either direction); returns x at ts[-1].

    "euler": one velocity evaluation per step, first order.
    "heun": predictor-corrector (trapezoid), two evaluations per step, second order. A step whose
    target time is exactly 0 uses the explicit midpoint rule instead (also two evaluations and
    second order) so the velocity is never evaluated at t = 0, where the x-prediction velocity is
    undefined (clamped by t_eps). Global error stays O(h^2) either way.
    The loop is a lax.fori_loop, so one body is compiled whatever the number of steps.
    """
    _check_method(method)
    # The ODE state and time grid are kept in float32 (or float64) even for bf16 inputs: a bf16 grid
    # cannot even represent 28 distinct steps accurately, and rounding the state each step adds up.
    acc = jnp.promote_types(x.dtype, jnp.float32)
    ts = jnp.asarray(ts, dtype=acc)
    steps = ts.shape[0] - 1
    batch = x.shape[0]

    def vel(x_, t):
        return velocity_fn(x_, jnp.full((batch,), t, dtype=acc)).astype(acc)

    def euler_body(i, x_):
        t, t_next = ts[i], ts[i + 1]
        return x_ + (t_next - t) * vel(x_, t)

    def heun_body(i, x_):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        v1 = vel(x_, t)
        to_zero = t_next == 0.0
        # Same two evaluations either way; only where the second one is taken and how it is used differ.
        t2 = jnp.where(to_zero, t + 0.5 * dt, t_next)
        v2 = vel(x_ + (t2 - t) * v1, t2)
        return x_ + dt * jnp.where(to_zero, v2, 0.5 * (v1 + v2))

    body = euler_body if method == "euler" else heun_body
    return jax.lax.fori_loop(0, steps, body, x.astype(acc)).astype(x.dtype)


def sample(velocity_fn: VelocityFn, x1: jax.Array, *, steps: int, method: str = "euler",
           shift: float = 1.0) -> jax.Array:
    """Generate x0 from noise x1 by integrating t = 1 -> 0 on timesteps(steps, shift).

    Network evaluations: `steps` for euler, 2*steps for heun (see `integrate` for the last step).
    """
    _check_method(method)
    return integrate(velocity_fn, x1, timesteps(steps, shift), method=method)


def invert(velocity_fn: VelocityFn, x0: jax.Array, *, steps: int, method: str = "euler",
           shift: float = 1.0) -> jax.Array:
    """Map an image x0 to its noise x1 by integrating t = 0 -> 1 on the reversed sampling grid.

    The first step evaluates the velocity at t = 0 (unavoidable for an explicit solver), which is
    exact for v-prediction but only approximate for x-prediction (t_eps clamp).
    """
    _check_method(method)
    return integrate(velocity_fn, x0, timesteps(steps, shift)[::-1], method=method)


def cfg_velocity(v_cond: jax.Array, v_uncond: jax.Array, scale: float) -> jax.Array:
    """Classifier-free guidance: v_uncond + scale * (v_cond - v_uncond) (scale 1 = conditional)."""
    return v_uncond + scale * (v_cond - v_uncond)


def chained_guidance(v_K1: Sequence[jax.Array], scales_K: Sequence) -> jax.Array:
    """Per-group guidance along a chain of branches (one formula for all of CFG):

        v = v_0 + sum_k s_k (v_k - v_{k-1}),   k = 1..K

    where branch 0 is unconditional and branch k adds the k-th set of condition groups to
    branch k-1 (the last branch is fully conditional). Each scale s_k multiplies what adding
    that set changes, given the sets before it. With every s_k = s the sum telescopes to plain
    CFG, v_0 + s (v_K - v_0); K = 1 is plain CFG.
    """
    if len(v_K1) != len(scales_K) + 1:
        raise ValueError(f"need one scale per branch after the first: {len(v_K1)} branches, "
                         f"{len(scales_K)} scales")
    v = v_K1[0]
    for prev, cur, s in zip(v_K1[:-1], v_K1[1:], scales_K):
        v = v + s * (cur - prev)
    return v


def guided_velocity_fn(apply_fn: Callable, branches: Sequence, scales: Sequence,
                       prediction: str = "v", t_eps: float = 0.05) -> VelocityFn:
    """velocity_fn(x, t_B) guided along ``branches`` (see ``chained_guidance``), from
    apply_fn(x_BHWC, t_B, context) -> network output.

    ``branches`` are K+1 contexts, unconditional first; ``scales`` the K guidance scales
    (plain CFG: ``[uncond, cond], [scale]``). All branches run as ONE batched call (fewer
    launches, better MXU/GPU utilisation). A branch may be an array or a pytree with
    batch-leading leaves; a batch of 1 is broadcast to the last branch's batch. x-prediction
    outputs are turned into velocities first, so guidance is always applied in v-space.
    """
    _check_prediction(prediction)
    if len(branches) != len(scales) + 1:
        raise ValueError(f"need one scale per branch after the first: {len(branches)} "
                         f"branches, {len(scales)} scales")
    k1 = len(branches)

    def stack(*leaves):
        full = leaves[-1].shape
        return jnp.concatenate([jnp.broadcast_to(leaf, full) for leaf in leaves], axis=0)

    ctx = jax.tree.map(stack, *branches)

    def velocity_fn(x: jax.Array, t_B: jax.Array) -> jax.Array:
        x_KB = jnp.concatenate([x] * k1, axis=0)
        t_KB = jnp.concatenate([t_B] * k1, axis=0)
        out_KB = apply_fn(x_KB, t_KB, ctx)
        v_KB = velocity_from_output(out_KB, x_KB, t_KB, prediction=prediction, t_eps=t_eps)
        return chained_guidance(jnp.split(v_KB, k1, axis=0), scales)

    return velocity_fn
