"""The train state and the pure, jittable train/eval steps (reused by train, bench and aot).

The loss is ``flow.loss`` (one definition for training, validation and the analytic tests);
this module adds what a step needs around it: the optimizer, microbatch accumulation, EMA and
the non-finite guard.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from flax import struct

from cxr_rf import conditioning, errors, flow, optim, sharding
from cxr_rf.model import build_model, init_params


Batch = dict[str, Any]    # {"image": [B, H, W, C] float32 in [-1, 1], "tokens": [B, L] int32}


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


def lr_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup to ``optim.lr``, then cosine decay to 1% over ``train.steps``."""
    o = cfg.optim
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
        decay_steps=max(cfg.train.steps, o.warmup_steps + 1), end_value=o.lr * 0.01)


def decay_mask(params: Any) -> Any:
    """True for the parameters weight decay applies to: the projection kernels (Dense and
    DenseGeneral ``kernel``), by name. Not biases, norm scales, the token table or the
    learned context positions. (A rank test would also catch the scanned blocks' biases and
    norm scales, which carry a leading layer axis.)"""
    def is_kernel(path, _):
        # The last dict key: boxed (nn.Partitioned) leaves add an attribute step after it.
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return bool(keys) and keys[-1] == "kernel"
    return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """AdamW on ``lr_schedule`` with global-norm clipping; weight decay on ``decay_mask``.
    optax's numbers and state, in the passes ``optim.clipped_adamw`` orders; its update takes
    ``keep`` (the train step's skip)."""
    o = cfg.optim
    return optim.clipped_adamw(lr_schedule(cfg), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                               mask=decay_mask, max_norm=o.grad_clip)


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
               resolution: int) -> TrainState:
    """A fresh TrainState, with params still boxed with their logical axis names.

    Call through ``jax.eval_shape`` for the abstract, logically annotated state (what
    ``abstract_state`` does); ``nn.unbox`` the result before use.
    """
    init_rng, state_rng = jax.random.split(rng)
    params = init_params(model, init_rng, resolution)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=tx.init(params), rng=state_rng,
                      nonfinite_streak=jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------------------------
# Shapes of a run: the one definition of the state and of a batch (train, sample, aot, bench).
# --------------------------------------------------------------------------------------------

def grid_size(cfg: ml_collections.ConfigDict) -> int:
    """The side of the model's input: ``data.resolution`` pixels, or in latent mode
    (``data.latents``) the latent grid ``data.resolution // data.latent_factor``."""
    d = cfg.data
    if not d.get("latents", False):
        return int(d.resolution)
    f = int(d.get("latent_factor", 0) or 0)
    if f < 1:
        raise errors.UserError("data.latent_factor is not set: give the autoencoder's factor "
                               "(pixels per latent cell) or let the trainer read it from the data")
    if int(d.resolution) % f:
        raise errors.UserError(f"data.resolution={d.resolution} is not a multiple of "
                               f"data.latent_factor={f}")
    return int(d.resolution) // f


def dummy_batch(cfg: ml_collections.ConfigDict, batch_size: int | None = None) -> Batch:
    """ShapeDtypeStructs of a global training batch of ``cfg`` (``train.batch_size`` unless
    given): ``image`` [B, R, R, C] float32 in [-1, 1] (R = ``grid_size``: the latent grid in
    latent mode, C = model.in_channels), ``tokens`` [B, L] int32."""
    b = cfg.train.batch_size if batch_size is None else batch_size
    r, c = grid_size(cfg), cfg.model.in_channels
    return {"image": jax.ShapeDtypeStruct((b, r, r, c), jnp.float32),
            "tokens": jax.ShapeDtypeStruct((b, conditioning.num_tokens(cfg.data.report_len)),
                                           jnp.int32)}


def flow_settings(cfg: ml_collections.ConfigDict) -> flow.FlowSettings:
    """``cfg.flow`` with the automatic timestep shift resolved for the model's token count at
    ``data.resolution`` (its latent grid in latent mode)."""
    return flow.FlowSettings(**cfg.flow).at((grid_size(cfg) // cfg.model.patch) ** 2)


def init_fn(cfg: ml_collections.ConfigDict, model: nn.Module, tx):
    """rng -> a fresh TrainState with params still boxed with their logical axis names."""
    return functools.partial(init_state, model, tx, resolution=grid_size(cfg))


def abstract_state(cfg: ml_collections.ConfigDict, shardings: Any = None) -> TrainState:
    """ShapeDtypeStructs of the run's TrainState (no memory, no compute); ``shardings`` (a
    matching tree, or one Sharding for every leaf) is attached when given, e.g. to restore
    onto one device or to compile for abstract devices."""
    boxed = jax.eval_shape(init_fn(cfg, build_model(cfg), make_optimizer(cfg)),
                           jax.random.PRNGKey(0))
    state = nn.unbox(boxed)
    if shardings is None:
        return state
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, state)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        state, shardings)


def loss_fn(params, model: nn.Module, mb: dict, fs: flow.FlowSettings) -> jax.Array:
    """Mean rectified-flow loss (``flow.loss``) of the model on a (micro)batch whose timesteps
    ``t`` and noise ``eps`` were drawn beforehand (``flow.draw``)."""
    apply = lambda x_t, t_B: model.apply({"params": params}, x_t, t_B, mb["tokens"])
    return jnp.mean(flow.loss(apply, mb["image"], mb["t"], mb["eps"], fs))


def _split_micro(x: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [m, B/m, ...] with microbatch i = examples i::m, so every microbatch keeps the
    batch's (data, fsdp) split instead of living on one slice of the devices."""
    b = x.shape[0]
    x = jnp.swapaxes(x.reshape((b // m, m) + x.shape[1:]), 0, 1)
    return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))


def loss_and_grads(params, batch: dict, rng: jax.Array, *, model: nn.Module,
                   fs: flow.FlowSettings, microbatches: int = 1):
    """Mean loss and gradients over the batch, accumulated over ``microbatches`` in float32."""
    t_B, eps = flow.draw(rng, batch["image"], fs)
    data = {"image": batch["image"], "tokens": batch["tokens"], "t": t_B, "eps": eps}
    grad_fn = jax.value_and_grad(loss_fn)
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
               tx: optax.GradientTransformation, fs: flow.FlowSettings, ema_decay: float,
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
    # Skip or keep, decided from the loss and the gradients alone: finite gradients give finite
    # AdamW moments and updates (a finite norm bounds every g², so v cannot overflow). Known
    # before the update, the select fuses into the passes that write the new tensors; a check
    # of the updates' own norm made XLA write every new tensor first and select in a second
    # pass (~7% of a CPU bench step).
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, keep=ok)
    params = jax.tree.map(lambda p, u: jnp.where(ok, optax.apply_updates(p, u), p),
                          state.params, updates)
    # The new params are written once, in place of the donated old ones, and the EMA reads
    # them there. Without the barrier XLA fuses the whole update into the EMA's pass too, which
    # then reads the old params after their buffer was overwritten, so it copied every
    # parameter at the start of the step (~20 ms of a 0.8 s CPU step; same values either way).
    params = jax.lax.optimization_barrier(params)
    # EMA warm-up: early on, the average would mostly remember the (zero-output) init.
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree.map(lambda e, p: jnp.where(ok, decay * e + (1.0 - decay) * p, e),
                       state.ema_params, params)
    streak = jnp.where(ok, 0, state.nonfinite_streak + 1).astype(jnp.int32)
    metrics = {"loss": loss, "grad_norm": grad_norm, "param_norm": optax.tree.norm(params),
               "skipped": 1.0 - ok.astype(jnp.float32), "nonfinite_streak": streak}
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                              opt_state=opt_state, nonfinite_streak=streak)
    return new_state, metrics


def eval_step(params, batch: dict, *, model: nn.Module, fs: flow.FlowSettings,
              timesteps: tuple[float, ...], seed: int = 0) -> jax.Array:
    """Validation loss at each fixed timestep (fixed noise), shape [len(timesteps)].

    Fixed timesteps remove the sampling noise of t, so the curve is comparable across runs
    and tracks sample quality (SD3, section 5).
    """
    b = batch["image"].shape[0]
    rng = jax.random.PRNGKey(seed)
    losses = []
    for t in timesteps:
        t_B, eps = flow.draw(rng, batch["image"], fs, t_B=jnp.full((b,), t, jnp.float32))
        losses.append(loss_fn(params, model, dict(batch, t=t_B, eps=eps), fs))
    return jnp.stack(losses)
