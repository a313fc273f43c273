"""The train state and the pure, jittable train/eval steps (reused by train, bench and aot)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from flax import struct

from cxr_rf import flow, sharding


@struct.dataclass
class TrainState:
    """Everything a step reads and writes. A pytree; checkpointed whole."""
    step: jax.Array          # int32 scalar
    params: Any              # f32 master weights
    ema_params: Any
    opt_state: Any
    rng: jax.Array           # base PRNG key; step keys are fold_in(rng, step), so resume is exact
    # Consecutive skipped (non-finite) updates; in the state so a resumed run keeps counting.
    nonfinite_streak: jax.Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))


@dataclasses.dataclass(frozen=True)
class FlowSettings:
    """The flow knobs the step needs, as hashable static values."""
    prediction: str = "v"
    t_mean: float = 0.0
    t_std: float = 1.0
    shift: float = 1.0
    t_eps: float = 0.05

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> "FlowSettings":
        """Resolve the automatic (token-count) shift from the data resolution and patch size."""
        f = cfg.flow
        return cls(f.prediction, float(f.t_mean), float(f.t_std), train_shift(cfg), float(f.t_eps))


def train_shift(cfg: ml_collections.ConfigDict, resolution: int | None = None) -> float:
    """SD3 resolution shift: fixed when ``flow.shift`` > 0, else sqrt(tokens / base_tokens)."""
    if cfg.flow.shift > 0:
        return float(cfg.flow.shift)
    res = resolution or cfg.data.resolution
    tokens = (res // cfg.model.patch) ** 2
    return max(1.0, flow.resolution_shift(tokens, cfg.flow.base_tokens))


def lr_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup to ``optim.lr``, then cosine decay to 1% over ``train.steps``."""
    o = cfg.optim
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
        decay_steps=max(cfg.train.steps, o.warmup_steps + 1), end_value=o.lr * 0.01)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW on ``lr_schedule`` with global-norm clipping.

    Weight decay applies to matrices only (ndim >= 2), not to norms, biases or gains.
    """
    o = cfg.optim
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
        optax.adamw(lr_schedule(cfg), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                    mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)),
    )


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
               resolution: int, num_tokens: int, in_channels: int = 1):
    """A fresh TrainState, with params still boxed with their logical axis names.

    Call through ``jax.eval_shape`` to get the abstract, logically annotated state; call
    ``nn.unbox`` on the result before use.
    """
    init_rng, state_rng = jax.random.split(rng)
    x = jnp.zeros((1, resolution, resolution, in_channels), jnp.float32)
    tokens = jnp.zeros((1, num_tokens), jnp.int32)
    params = model.init(init_rng, x, jnp.zeros((1,)), tokens)["params"]
    opt_state = tx.init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=opt_state, rng=state_rng,
                      nonfinite_streak=jnp.zeros((), jnp.int32))


def _apply_fn(model: nn.Module, params, tokens_BL) -> Callable:
    return lambda x_t, t_B: model.apply({"params": params}, x_t, t_B, tokens_BL)


def loss_fn(params, model: nn.Module, batch: dict, rng: jax.Array, fs: FlowSettings, t_B=None):
    """Rectified-flow loss on one batch; returns (loss, aux)."""
    return flow.rf_loss(_apply_fn(model, params, batch["tokens"]), batch["image"], rng,
                        prediction=fs.prediction, t_mean=fs.t_mean, t_std=fs.t_std,
                        shift=fs.shift, t_eps=fs.t_eps, t_B=t_B)


def _draw(rng: jax.Array, x0: jax.Array, fs: FlowSettings):
    """t_B and noise for the whole batch, drawn exactly as ``flow.rf_loss`` draws them, so the
    loss does not depend on how the batch is split into microbatches."""
    rng_t, rng_eps = jax.random.split(rng)
    t_B = flow.sample_t(rng_t, x0.shape[0], mean=fs.t_mean, std=fs.t_std, shift=fs.shift)
    return t_B, jax.random.normal(rng_eps, x0.shape, dtype=x0.dtype)


def _micro_loss(params, model: nn.Module, mb: dict, fs: FlowSettings) -> jax.Array:
    """Rectified-flow loss of one microbatch with its pre-drawn t and noise (rf_loss's arithmetic)."""
    x0, t_B, eps = mb["image"], mb["t"], mb["eps"]
    acc = jnp.promote_types(x0.dtype, jnp.float32)
    x_t = flow.interpolate(x0, eps, t_B)
    out = model.apply({"params": params}, x_t, t_B, mb["tokens"])
    v_pred = flow.velocity_from_output(out.astype(acc), x_t.astype(acc), t_B.astype(acc),
                                       prediction=fs.prediction, t_eps=fs.t_eps)
    return jnp.mean(jnp.square(v_pred - (eps - x0).astype(acc)))


def _split_micro(x: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [m, B/m, ...] with microbatch i = examples i::m, so every microbatch keeps the
    batch's (data, fsdp) split instead of living on one slice of the devices."""
    b = x.shape[0]
    x = jnp.swapaxes(x.reshape((b // m, m) + x.shape[1:]), 0, 1)
    return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))


def loss_and_grads(params, batch: dict, rng: jax.Array, *, model: nn.Module,
                   fs: FlowSettings, microbatches: int = 1):
    """Mean loss and gradients over the batch, accumulated over ``microbatches`` in float32."""
    t_B, eps = _draw(rng, batch["image"], fs)
    data = {"image": batch["image"], "tokens": batch["tokens"], "t": t_B, "eps": eps}
    grad_fn = jax.value_and_grad(_micro_loss)
    if microbatches == 1:
        return grad_fn(params, model, data, fs)
    micro = jax.tree.map(lambda x: _split_micro(x, microbatches), data)

    def body(carry, mb):
        loss, grads = grad_fn(params, model, mb, fs)
        acc_loss, acc_grads = carry
        return (acc_loss + loss, jax.tree.map(lambda a, g: a + g.astype(jnp.float32),
                                              acc_grads, grads)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
    grads = jax.tree.map(lambda g, p: (g / microbatches).astype(p.dtype), grads, params)
    return loss / microbatches, grads


def train_step(state: TrainState, batch: dict, *, model: nn.Module,
               tx: optax.GradientTransformation, fs: FlowSettings, ema_decay: float,
               microbatches: int = 1):
    """One optimizer step: RF loss -> grads -> AdamW -> EMA. Pure; jit with static kwargs.

    A step whose loss or gradients are not finite changes nothing but ``step`` and
    ``nonfinite_streak`` (the update is skipped and counted in the metrics); the loop stops
    the run when the streak gets long.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    loss, grads = loss_and_grads(state.params, batch, rng, model=model, fs=fs,
                                 microbatches=microbatches)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # EMA warm-up: early on, the average would mostly remember the (zero-output) init.
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    params, ema, opt_state = keep((params, ema, opt_state),
                                  (state.params, state.ema_params, state.opt_state))
    streak = jnp.where(ok, 0, state.nonfinite_streak + 1).astype(jnp.int32)
    metrics = {"loss": loss, "grad_norm": grad_norm, "param_norm": optax.tree.norm(params),
               "skipped": 1.0 - ok.astype(jnp.float32), "nonfinite_streak": streak}
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                              opt_state=opt_state, nonfinite_streak=streak)
    return new_state, metrics


def eval_step(params, batch: dict, *, model: nn.Module, fs: FlowSettings,
              timesteps: tuple[float, ...], seed: int = 0) -> jax.Array:
    """Validation loss at each fixed timestep (fixed noise), shape [len(timesteps)].

    Fixed timesteps remove the sampling noise of t, so the curve is comparable across runs
    and tracks sample quality (SD3, section 5).
    """
    b = batch["image"].shape[0]
    rng = jax.random.PRNGKey(seed)
    losses = [loss_fn(params, model, batch, rng, fs, t_B=jnp.full((b,), t, jnp.float32))[0]
              for t in timesteps]
    return jnp.stack(losses)
