"""The autoencoder's train state and its pure, jitted generator + discriminator step.

The MMDiT's machinery (``cxr_rf.step``/``cxr_rf.trainer``) with the autoencoder's objective:

    AEState        step, generator params (+ LoRA factors), latent_stats, discriminator params,
                   the two optimizer states, the EMA of the trainable generator tree, rng
    train_step     one generator update (L1/SSIM/perceptual + KL [+ adaptive-weight GAN]) and,
                   once the GAN is on, one discriminator hinge update on stop_gradient(x̂)
    AETrainer      the mesh, the models, the compiled steps and the validation metrics

Config sections (``config_sections`` adds them to ``config.base()``; experiments override):

    c.task = "autoencoder"
    c.autoencoder   AEConfig fields + init_from ("" or a FLUX.2 diffusers folder: ``flux2.load``;
                    its own config then replaces these fields), lora_rank (0 = full
                    fine-tuning), lora_alpha (0 = rank)
    c.ae_loss       LossWeights fields + perceptual_features ("" = no perceptual term, else a
                    local folder) and perceptual_extractor ("raddino" | "cxr_classifier")
    c.ae_disc       PatchDiscriminator fields (width, layers, norm, groups)
    c.ae_optim      Adam for both nets (lr, disc_lr, b1, b2, warmup_steps, grad_clip,
                    weight_decay), ema_decay (0 = no EMA)
    c.train         the MMDiT's loop settings (steps, batch_size, log/eval/ckpt/sample_every,
                    eval_batches, ...) plus stats_batches (training batches for latent_stats)

The discriminator before ``gan_start``: TWO compiled programs, chosen on the host from the
step number (``AETrainer.train_step``). The reconstruction phase compiles without any
discriminator forward, backward or Adam update (disc params and state pass through
unchanged); the GAN phase (state.step >= gan_start, i.e. from the (gan_start+1)-th update)
has both updates. A ``lax.cond`` would keep one program but traces both branches and keeps
the discriminator's buffers live in every step; the host-side switch costs one extra compile
at gan_start. The metrics have the same keys in both (GAN terms 0 before).

Determinism: every random draw (posterior sample) comes from ``fold_in(state.rng, state.step)``,
so a resumed run repeats the uninterrupted one bitwise.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from flax import struct

from cxr_rf import errors, sharding
from cxr_rf.autoencoder import losses as L
from cxr_rf.autoencoder import lora as lora_lib
from cxr_rf.autoencoder.discriminator import PatchDiscriminator
from cxr_rf.autoencoder.model import STATS, AEConfig, Autoencoder

TASK = "autoencoder"
EXTRACTORS = ("raddino", "cxr_classifier")
_AE_EXTRA = ("init_from", "lora_rank", "lora_alpha")
_LOSS_EXTRA = ("perceptual_features", "perceptual_extractor")


# --------------------------------------------------------------------------------------------
# Config sections.
# --------------------------------------------------------------------------------------------

def config_sections(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``c`` (a ``config.base()``) with the autoencoder task and its default sections."""
    c.task = TASK
    c.autoencoder = ml_collections.ConfigDict(dict(
        dataclasses.asdict(AEConfig()), init_from="", lora_rank=0, lora_alpha=0.0))
    c.ae_loss = ml_collections.ConfigDict(dict(
        dataclasses.asdict(L.LossWeights()), perceptual_features="",
        perceptual_extractor="raddino"))
    c.ae_disc = ml_collections.ConfigDict(dict(width=64, layers=3, norm="group", groups=32))
    # taming: Adam(betas 0.5, 0.9), the same learning rate for both nets, no decay.
    c.ae_optim = ml_collections.ConfigDict(dict(
        lr=1e-4, disc_lr=1e-4, b1=0.5, b2=0.9, warmup_steps=0, grad_clip=0.0,
        weight_decay=0.0, ema_decay=0.999))
    c.train.stats_batches = 8
    c.train.eval_batches = 2
    c.sample.grid = 8                    # originals + reconstructions in the periodic grid
    return c


def ae_config(cfg: ml_collections.ConfigDict) -> AEConfig:
    """``AEConfig`` of the run (its ``autoencoder`` section without the training extras)."""
    if "autoencoder" not in cfg:
        raise errors.UserError("config has no 'autoencoder' section (task=autoencoder needs one)")
    d = {k: v for k, v in cfg.autoencoder.to_dict().items() if k not in _AE_EXTRA}
    fields = {f.name for f in dataclasses.fields(AEConfig)}
    if unknown := sorted(set(d) - fields):
        raise errors.UserError(f"autoencoder config: unknown field(s) {unknown}")
    return AEConfig(**d)


def loss_weights(cfg: ml_collections.ConfigDict) -> L.LossWeights:
    d = {k: v for k, v in cfg.ae_loss.to_dict().items() if k not in _LOSS_EXTRA}
    fields = {f.name for f in dataclasses.fields(L.LossWeights)}
    if unknown := sorted(set(d) - fields):
        raise errors.UserError(f"ae_loss: unknown field(s) {unknown}")
    return L.LossWeights(**d)


def discriminator(cfg: ml_collections.ConfigDict) -> PatchDiscriminator:
    d = cfg.ae_disc
    return PatchDiscriminator(width=int(d.width), layers=int(d.layers), norm=str(d.norm),
                              groups=int(d.groups))


def _schedule(lr: float, warmup: int) -> optax.Schedule:
    return optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else optax.constant_schedule(lr)


def make_optimizer(cfg: ml_collections.ConfigDict, disc: bool = False
                   ) -> optax.GradientTransformation:
    """Adam(W) with a linear warmup to a constant rate, optional global-norm clipping."""
    o = cfg.ae_optim
    lr = _schedule(o.disc_lr if disc else o.lr, int(o.warmup_steps))
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
        optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))


# --------------------------------------------------------------------------------------------
# Perceptual features (frozen; passed to the step as an argument, never checkpointed).
# --------------------------------------------------------------------------------------------

def perceptual_features(cfg: ml_collections.ConfigDict
                        ) -> tuple[Callable | None, Any]:
    """(feature_fn(feat_params, images_BxHxW in [0,1]) -> feats, feat_params) of
    ``ae_loss.perceptual_features``, or (None, None) when the perceptual term is off.

    raddino: the DINOv2 token features (last hidden state after the final LayerNorm) of the
    image resized (bilinear, anti-aliased) to the processor's side, replicated to RGB and
    normalised with the processor's mean/std; cxr_classifier: the classifier's pooled
    penultimate features through its own (jnp) preprocessing."""
    lw = cfg.ae_loss
    folder = str(lw.get("perceptual_features", "") or "")
    if not folder or not lw.perceptual:
        return None, None
    kind = str(lw.get("perceptual_extractor", "raddino"))
    if kind not in EXTRACTORS:
        raise errors.UserError(f"ae_loss.perceptual_extractor {kind!r}; choose one of "
                               f"{', '.join(EXTRACTORS)}")
    if kind == "cxr_classifier":
        from cxr_rf.features import classifier
        ext = classifier.load(folder)
        model, r = classifier.build(ext.cfg), ext.resolution

        def fn(p, images_BxHxW):
            return model.apply({"params": p}, classifier.preprocess(images_BxHxW, r))[0]
        return fn, jax.device_get(ext.params)
    from cxr_rf.features import dinov2
    ext = dinov2.load(folder)
    model, s, proc = dinov2.Dinov2(ext.cfg), ext.resolution, ext.processor
    mean = jnp.broadcast_to(jnp.asarray(proc.image_mean, jnp.float32), (3,)).reshape(1, 1, 1, 3)
    std = jnp.broadcast_to(jnp.asarray(proc.image_std, jnp.float32), (3,)).reshape(1, 1, 1, 3)

    def fn(p, images_BxHxW):
        b = images_BxHxW.shape[0]
        x = jax.image.resize(images_BxHxW, (b, s, s), "linear", antialias=True)
        x = (jnp.repeat(x[..., None], 3, axis=-1) - mean) / std
        return model.apply({"params": p}, x)[1]
    return fn, jax.device_get(ext.params)


# --------------------------------------------------------------------------------------------
# State.
# --------------------------------------------------------------------------------------------

@struct.dataclass
class AEState:
    """Everything a step reads and writes. A pytree; checkpointed whole.

    ``params`` are the generator's parameters (with LoRA: the frozen base). The trainable tree
    is ``lora`` when present, else ``params``; ``opt_state`` and ``ema`` are of that tree.
    ``latent_stats`` (the model's "latent_stats" collection) is 0/1 (or FLUX.2's) during
    training and set from the training images' posterior means at the last step.
    """
    step: jax.Array
    params: Any
    latent_stats: Any
    disc_params: Any
    opt_state: Any
    disc_opt_state: Any
    rng: jax.Array
    lora: Any = None
    ema: Any = None
    nonfinite_streak: jax.Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))

    @property
    def trainable(self):
        return self.params if self.lora is None else self.lora

    def generator_params(self, use_ema: bool = False) -> Any:
        """The generator's plain parameters (LoRA merged; the EMA when asked and kept)."""
        t = self.ema if use_ema and self.ema is not None else self.trainable
        return t if self.lora is None else lora_lib.apply_lora(self.params, t)


def _merge(base, lora, trainable):
    """The generator parameters of a trainable tree ``trainable`` (LoRA or full)."""
    return trainable if lora is None else lora_lib.apply_lora(base, trainable)


def _with_last_kernel(params, kernel):
    dec = dict(params["decoder"])
    dec["conv_out"] = dict(dec["conv_out"], kernel=kernel)
    return dict(params, decoder=dec)


def psnr(x, y) -> jax.Array:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2): [B]."""
    mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def train_step(state: AEState, batch: dict, feat_params: Any = None, *, model: Autoencoder,
               disc: PatchDiscriminator, tx: optax.GradientTransformation,
               disc_tx: optax.GradientTransformation, weights: L.LossWeights,
               feature_fn: Callable | None, ema_decay: float, gan: bool):
    """One step. Pure; jit with the keyword arguments static.

    ``gan`` False (before gan_start): the generator's reconstruction + KL update only.
    ``gan`` True: the generator loss with the adaptive-weight hinge term (λ from the decoder's
    last conv kernel, ``losses.last_layer_grads_vjp``), and the discriminator's hinge update on
    stop_gradient of the same reconstruction (both nets see the pre-update parameters, as in
    taming). A non-finite loss or gradient skips both updates (counted in
    ``nonfinite_streak``)."""
    x = batch["image"]
    rng = jax.random.fold_in(state.rng, state.step)
    ffn = None if feature_fn is None else functools.partial(feature_fn, feat_params)
    dpar = state.disc_params

    def gen_loss(trainable):
        p = _merge(state.params, state.lora, trainable)
        mean, logvar = model.apply({"params": p}, x, method=Autoencoder.encode)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)
        decode = lambda k: model.apply({"params": _with_last_kernel(p, k)}, z,  # noqa: E731
                                       method=Autoencoder.decode)
        kernel = p["decoder"]["conv_out"]["kernel"]
        if not gan:
            recon = decode(kernel)
            loss, m = L.total_generator_loss(recon, x, mean, logvar, state.step, weights,
                                             feature_fn=ffn)
            return loss, (m, recon)
        rec_fn = lambda r: L.reconstruction_loss(r, x, weights, feature_fn=ffn)[0]  # noqa: E731
        gan_fn = lambda r: L.g_hinge(disc.apply({"params": dpar}, r))                # noqa: E731
        recon, g_rec, g_gan = L.last_layer_grads_vjp(decode, kernel, rec_fn, gan_fn)
        loss, m = L.total_generator_loss(
            recon, x, mean, logvar, state.step, weights,
            logits_fake=disc.apply({"params": dpar}, recon), feature_fn=ffn,
            grad_rec=g_rec, grad_gan=g_gan)
        return loss, (m, recon)

    (loss, (m, recon)), grads = jax.value_and_grad(gen_loss, has_aux=True)(state.trainable)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    zero = jnp.zeros((), jnp.float32)
    metrics = {k: m[k] for k in ("l1", "kl", "rec_loss", "loss")}
    metrics.update({k: m[k] for k in ("ssim", "perceptual") if k in m})
    metrics.update(g_loss=m.get("g_loss", zero), adaptive_weight=m.get("adaptive_weight", zero),
                   gan_factor=m.get("gan_factor", zero), d_loss=zero, logits_real=zero,
                   logits_fake=zero, grad_norm=grad_norm,
                   psnr=jnp.mean(psnr(jax.lax.stop_gradient(recon), x)))
    disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
    if gan:
        fake = jax.lax.stop_gradient(recon)

        def d_loss_fn(dp):
            logits = disc.apply({"params": dp}, jnp.concatenate([x, fake], axis=0))
            real_l, fake_l = jnp.split(logits, 2, axis=0)
            return L.discriminator_loss(real_l, fake_l, state.step, weights)

        (d_loss, dm), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(dpar)
        d_updates, disc_opt_state = disc_tx.update(d_grads, state.disc_opt_state, dpar)
        disc_params = optax.apply_updates(dpar, d_updates)
        ok = ok & jnp.isfinite(d_loss) & jnp.isfinite(optax.tree.norm(d_grads))
        metrics.update(d_loss=dm["d_loss"], logits_real=dm["logits_real"],
                       logits_fake=dm["logits_fake"])

    ema = state.ema
    if ema is not None:
        decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, trainable)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    trainable, ema, opt_state, disc_params, disc_opt_state = keep(
        (trainable, ema, opt_state, disc_params, disc_opt_state),
        (state.trainable, state.ema, state.opt_state, state.disc_params, state.disc_opt_state))
    streak = jnp.where(ok, 0, state.nonfinite_streak + 1).astype(jnp.int32)
    metrics.update(skipped=1.0 - ok.astype(jnp.float32), nonfinite_streak=streak)
    new = state.replace(step=state.step + 1, opt_state=opt_state, ema=ema,
                        disc_params=disc_params, disc_opt_state=disc_opt_state,
                        nonfinite_streak=streak)
    new = new.replace(params=trainable) if state.lora is None else new.replace(lora=trainable)
    return new, metrics


def eval_step(params, x, *, model: Autoencoder) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(psnr [B], ssim [B], reconstruction) of the posterior-mean reconstruction."""
    recon, _, _ = model.apply({"params": params}, x)
    ssim = L.ssim(recon, x) if min(x.shape[1:3]) >= 11 else jnp.full((x.shape[0],), jnp.nan)
    return psnr(recon, x), ssim, recon


def encode_means(params, x, *, model: Autoencoder) -> jax.Array:
    return model.apply({"params": params}, x, method=Autoencoder.encode)[0]


# --------------------------------------------------------------------------------------------
# The compiled steps of a run.
# --------------------------------------------------------------------------------------------

class AETrainer:
    """The mesh, the autoencoder and discriminator, and their compiled steps (the
    autoencoder's ``trainer.Trainer``). Batches are split over (data, fsdp); the parameters
    follow ``sharding.RULES`` (autoencoder convs replicated)."""

    def __init__(self, cfg: ml_collections.ConfigDict, devices=None, *, init_from=None):
        """``init_from``: (AEConfig, variables) of pretrained weights (``flux2.load``)."""
        self.cfg = cfg
        self.mesh = sharding.make_mesh(cfg.mesh, devices)
        sharding.check_batch(cfg.train.batch_size, self.mesh)
        self.ae_cfg = init_from[0] if init_from else ae_config(cfg)
        self.pretrained = init_from[1] if init_from else None
        self.model = Autoencoder(self.ae_cfg)
        self.disc = discriminator(cfg)
        self.weights = loss_weights(cfg)
        self.tx, self.disc_tx = make_optimizer(cfg), make_optimizer(cfg, disc=True)
        self.feature_fn, feat_params = perceptual_features(cfg)
        r = cfg.data.resolution
        self.ae_cfg.latent_shape(r, r)
        self.lora_rank = int(cfg.autoencoder.get("lora_rank", 0) or 0)
        alpha = float(cfg.autoencoder.get("lora_alpha", 0.0) or 0.0) or None
        self.ema_decay = float(cfg.ae_optim.ema_decay)

        def init(rng):
            k_ae, k_d, k_l, k_s = jax.random.split(rng, 4)
            x = jnp.zeros((1, r, r, self.ae_cfg.in_channels), jnp.float32)
            v = self.model.init(k_ae, x)
            params, stats = v["params"], v[STATS]
            dp = self.disc.init(k_d, x)["params"]
            lora = None
            if self.lora_rank:
                lora = lora_lib.init_lora(nn.unbox(params), self.lora_rank, alpha, rng=k_l)
            trainable = params if lora is None else lora
            return AEState(step=jnp.zeros((), jnp.int32), params=params, latent_stats=stats,
                           disc_params=dp, opt_state=self.tx.init(trainable),
                           disc_opt_state=self.disc_tx.init(dp), rng=k_s, lora=lora,
                           ema=trainable if self.ema_decay > 0 else None)

        with sharding.use(self.mesh):
            boxed = jax.eval_shape(init, jax.random.PRNGKey(cfg.seed))
            self.state_sharding = sharding.logical_sharding(boxed, self.mesh)
            self._init = jax.jit(lambda rng: nn.unbox(init(rng)),
                                 out_shardings=self.state_sharding)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        rep = sharding.replicated(self.mesh)
        self.feat_params = None if feat_params is None else jax.device_put(feat_params, rep)
        kw = dict(model=self.model, disc=self.disc, tx=self.tx, disc_tx=self.disc_tx,
                  weights=self.weights, feature_fn=self.feature_fn, ema_decay=self.ema_decay)
        self._steps = {gan: jax.jit(functools.partial(train_step, gan=gan, **kw),
                                    in_shardings=(self.state_sharding, self.batch_sharding,
                                                  None),
                                    out_shardings=(self.state_sharding, rep), donate_argnums=0)
                       for gan in (False, True)}
        self._eval = jax.jit(functools.partial(eval_step, model=self.model),
                             out_shardings=rep)
        self._means = jax.jit(functools.partial(encode_means, model=self.model), out_shardings=rep)

    def init_state(self) -> AEState:
        """A fresh, sharded AEState (with the pretrained weights and statistics when given)."""
        with sharding.use(self.mesh):
            state = self._init(jax.random.PRNGKey(self.cfg.seed))
        if self.pretrained is not None:
            put = lambda new, old: jax.device_put(  # noqa: E731
                jax.tree.map(lambda n, o: jnp.asarray(n, o.dtype), new, old),
                jax.tree.map(lambda o: o.sharding, old))
            params = put(self.pretrained["params"], state.params)
            stats = put(self.pretrained[STATS], state.latent_stats)
            ema = state.ema if state.lora is not None or state.ema is None else params
            state = state.replace(params=params, latent_stats=stats, ema=ema)
        return state

    def abstract_inputs(self) -> tuple:
        """(state, batch, feat_params) ShapeDtypeStructs with the step's input shardings: what
        ``_steps[gan].lower`` takes to compile without data or init (``cxr_rf.aot``)."""
        with sharding.use(self.mesh):
            shapes = jax.eval_shape(self._init, jax.random.PRNGKey(self.cfg.seed))
        sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
        state = jax.tree.map(sds, shapes, self.state_sharding)
        r = self.cfg.data.resolution
        batch = {"image": jax.ShapeDtypeStruct(
            (self.cfg.train.batch_size, r, r, self.ae_cfg.in_channels), jnp.float32,
            sharding=self.batch_sharding)}
        feats = jax.tree.map(lambda a: sds(a, a.sharding), self.feat_params)
        return state, batch, feats

    def gan_on(self, step: int) -> bool:
        """Whether the (1-based) ``step`` trains the discriminator and the GAN term."""
        return step - 1 >= self.weights.gan_start

    def global_batch(self, local: dict) -> dict:
        return {"image": jax.make_array_from_process_local_data(
            self.batch_sharding, np.asarray(local["image"], np.float32))}

    def train_step(self, state: AEState, local_batch: dict, step: int):
        """(state, metrics) of the (1-based) ``step``: the program of its phase."""
        with sharding.use(self.mesh):
            return self._steps[self.gan_on(step)](state, self.global_batch(local_batch),
                                                  self.feat_params)

    def reconstruct(self, params, local_images) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(psnr [B], ssim [B], reconstructions) of a batch of images (posterior means)."""
        with sharding.use(self.mesh):
            out = self._eval(params, self.global_batch({"image": local_images})["image"])
        return tuple(np.asarray(o.addressable_data(0)) for o in out)

    def means(self, params, local_images) -> np.ndarray:
        with sharding.use(self.mesh):
            out = self._means(params, self.global_batch({"image": local_images})["image"])
        return np.asarray(out.addressable_data(0))
