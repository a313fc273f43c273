"""Counterfactual editing of radiographs with a trained run: abduction, action, prediction.

    python -m cxr_rf.edit --workdir RUN --image IN.png|IN.dcm \
        --conditions "Cardiomegaly=negative" --sex F --age 70 --view PA \
        --set "Cardiomegaly=positive,age=30" --out DIR \
        [--strength 1.0] [--method invert|flowedit] [--mask MASK.png] [--steps N] \
        [--cfg C] [--guidance G] [--solver heun|euler] [--causal MODEL.json | --no-propagate] \
        [--format png16|png8|dicom] [--seed S]

Pearl's three steps, on both halves of a study:

  * metadata: the intervention ``--set`` goes through the structural causal model of the
    metadata (``cxr_rf.causal``: exact Gumbel-max abduction, ``do()``, recomputed descendants),
    fitted on the run's training metadata (``causal.Graph.default()``; cached in
    ``RUN/causal.json`` when the run directory is writable) or read from ``--causal``;
    ``--no-propagate`` is the plain edit (only the set variables, and the deterministic
    "No Finding", change).
  * image: *abduction* is ``invert``: the flow ODE integrated backwards from the image
    (t = 0 -> t0) under the FACTUAL conditions, giving the noise that explains the image;
    *prediction* is ``regenerate``: the ODE integrated forwards (t0 -> 0) from that noise under
    the counterfactual conditions.

Guidance choices (what the vector fields are):

  * Abduction uses the plain conditional velocity, CFG scale 1 (``ABDUCT_GUIDANCE``). Guidance
    extrapolates between two fields, which is not the velocity of any flow from the data: an
    image is not (in general) on a CFG trajectory, and inverting under CFG does not land on the
    noise the image came from (a null edit would not reproduce it). ``abduct_guidance`` allows
    another scale (for study, not as a default).
  * Prediction uses *contrast guidance* by default (``mode="contrast"``): the guidance chain of
    ``sample.Guidance`` (the run's ``sample.cfg`` / ``sample.guidance``, or ``--cfg`` /
    ``--guidance``) built from the FACTUAL conditions up to the counterfactual ones instead of
    from the null branch: branch 0 = factual tokens, branch k = branch k-1 with the k-th group
    set swapped to the counterfactual's, v = v_0 + sum_k s_k (v_k - v_{k-1}) (``flow
    .chained_guidance``). Equal scales give v_fact + s (v_cf - v_fact). Why: (1) for a null
    edit (same conditions) every difference is zero and the field IS the abduction field, so
    composition holds up to the solver error whatever the scale; (2) the scale amplifies only
    what the intervention changes (the finding), not everything the conditions say, so the
    image keeps its identity; (3) scale 1 is the plain conditional model (the textbook
    counterfactual), and the run's scale is what it was tuned to follow conditions at.
    ``mode="cfg"`` is ordinary CFG against the null branch (as ``sample``), which breaks
    composition at scales != 1 (the reconstruction PSNR then shows by how much).

Other editors (baselines of ``cxr_rf.evaluation.edits``):

  * partial inversion: ``t0 < 1`` (``--strength``): invert only to noise level t0 and
    regenerate from there (SDEdit-like, with the deterministic abducted noise).
  * ``flowedit``: FlowEdit (Kulikov et al. 2024, "FlowEdit: Inversion-Free Text-Based Editing
    Using Pre-Trained Flow Models", Algorithm 1), inversion-free: z = x_src; for each step
    t_i -> t_{i-1} of the grid from t0 down to 0: draw n_avg noises N, z_src = (1 - t_i) x_src
    + t_i N, z_tar = z + z_src - x_src, V = mean over N of [v(z_tar, t_i | target) - v(z_src,
    t_i | source)] (each with its own CFG against the null branch, as published), z += (t_{i-1}
    - t_i) V. The noise is drawn per image from ``seed``. A null edit (same conditions and
    guidance) returns the input exactly: its V is identically zero.
  * keep mask (``mask``, 1 = may change): "RePaint-lite". After every prediction step the
    pixels outside the mask are replaced by the original moved to that noise level along the
    abducted straight line, x_known(t) = (1 - t/t0) x + (t/t0) z_t0, so the masked region
    is generated in the context of the kept one; at t = 0 x_known is the original itself, so
    outside a binary mask the output equals the input exactly (bitwise). A soft mask blends.

Solvers: ``method`` "heun" (default: second order, so the inversion's round trip error falls
as 1/steps^2) or "euler". The step grid over [0, t0] is the sampling grid's shift applied to
``steps`` uniform steps over [0, u0], u0 the unshifted time of t0 (t0 = 1: exactly
``flow.timesteps``). The inversion's first step evaluates the velocity at t = 0 (exact for
v-prediction, clamped by t_eps for x-prediction).

Library (images are float32 [B, R, R] or [R, R] in [-1, 1] at the run's resolution;
``conditions`` one ``Conditions`` or one per image):

    invert(sampler, params, images, conditions, *, steps=None, method="heun", t0=1.0,
           guidance=None) -> noise at t0, [B, R, R]
    regenerate(sampler, params, z_t0, conditions, *, t0=1.0, steps=None, method="heun",
               guidance=None, source=None, mode="contrast", mask=None, original=None) -> images
    edit(sampler, params, images, source, target, *, t0=1.0, steps=None, method="heun",
         guidance=None, abduct_guidance=None, mode="contrast", mask=None,
         reconstruct=True) -> EditResult(edited, reconstruction, noise, psnr)
    flowedit(sampler, params, images, source, target, *, t0=FLOWEDIT_T0, steps=None,
             n_avg=1, guidance=None, source_guidance=None, seed=0) -> images
    inpaint(sampler, params, images, source, target, mask, **edit_kwargs) -> EditResult
    psnr(a, b) -> dB per image (peak-to-peak 2 of [-1, 1]; MSE floored at 1e-10)
    ode_invert(velocity_fn, x, *, steps, method, shift, t0)      the pure ODE parts the
    ode_regenerate(velocity_fn, z, *, steps, method, shift, t0, mask=None, original=None)
                                                                 programs run (any field)
    grid(steps, shift, t0) -> times [steps + 1] from t0 to 0
    contrast_branches(guidance, source_BL, target_BL) -> (branch tokens, scales)
    causal_model(cfg, workdir, path=None) -> (causal.Model, where it came from)

Each is one jitted program per (model, flow settings, steps, solver, kind), compiled once per
batch shape; images go in chunks of the sampler's batch size (the last chunk padded). Latent
runs (``data.latents``) are refused: editing one needs the autoencoder's encoder.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from etils import epath

from cxr_rf import causal, cli, conditioning, errors, export, flow, outputs
from cxr_rf.conditioning import Conditions

METHODS = ("invert", "flowedit")
SOLVERS = flow.METHODS
MODES = ("contrast", "cfg")
ABDUCT_GUIDANCE = 1.0          # abduction: the plain conditional field (see the module doc)
FLOWEDIT_T0 = 0.66             # FlowEdit's n_max / T = 33 / 50 (the paper's SD3 setting)
PSNR_FLOOR_MSE = 1e-10         # PSNR of identical images: 10 log10(4 / 1e-10) = 106 dB


# ------------------------------------------------------------------------- helpers

def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), per image over the leading axis;
    the MSE is floored at ``PSNR_FLOOR_MSE`` so identical images give a finite 106 dB."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim == 2:
        a, b = a[None], b[None]
    mse = np.mean(np.square(a - b).reshape(len(a), -1), axis=1)
    return 10.0 * np.log10(4.0 / np.maximum(mse, PSNR_FLOOR_MSE))


def unshift_t(t, shift: float):
    """The inverse of ``flow.shift_t``: u with shift_t(u, shift) = t."""
    return t / (shift - (shift - 1.0) * t)


def grid(steps: int, shift: float, t0=1.0):
    """Times [steps + 1] from t0 down to 0: ``steps`` uniform steps in unshifted time over
    [0, unshift(t0)], then the shift (t0 = 1: ``flow.timesteps(steps, shift)``)."""
    u0 = unshift_t(jnp.asarray(t0, jnp.float32), shift)
    return flow.shift_t(jnp.linspace(1.0, 0.0, int(steps) + 1) * u0, shift)


def ode_invert(velocity_fn, x, *, steps: int, method: str = "heun", shift: float = 1.0,
               t0=1.0):
    """Abduction as a pure function: integrate dx/dt = velocity_fn t = 0 -> t0 on ``grid``."""
    return flow.integrate(velocity_fn, x, grid(steps, shift, t0)[::-1], method=method)


def ode_regenerate(velocity_fn, z, *, steps: int, method: str = "heun", shift: float = 1.0,
                   t0=1.0, mask=None, original=None):
    """Prediction as a pure function: integrate t0 -> 0 on ``grid``. With ``mask`` (1 = may
    change, shaped like z) and ``original``: after every step the pixels outside the mask
    are set to (1 - t/t0) original + (t/t0) z (RePaint-lite; exactly the original at t = 0)."""
    ts = grid(steps, shift, t0)
    if mask is None:
        return flow.integrate(velocity_fn, z, ts, method=method)

    def body(i, x):
        x = flow.integrate(velocity_fn, x, jax.lax.dynamic_slice(ts, (i,), (2,)), method=method)
        a = (ts[i + 1] / t0).astype(x.dtype)
        known = (1.0 - a) * original + a * z
        return mask * x + (1.0 - mask) * known
    return jax.lax.fori_loop(0, int(steps), body, z)


def _check_sampler(sampler) -> None:
    if sampler.cfg.data.get("latents", False):
        raise errors.UserError("editing a latent run (data.latents=True) is not supported: "
                               "abduction needs the autoencoder's encoder")


def _check_t0(t0: float) -> float:
    t0 = float(t0)
    if not (math.isfinite(t0) and 0.0 < t0 <= 1.0):
        raise errors.UserError(f"strength (t0) must be in (0, 1], got {t0}")
    return t0


def _as_batch(images) -> tuple[np.ndarray, bool]:
    x = np.asarray(images, np.float32)
    single = x.ndim == 2
    if single:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"images must be [R, R] or [B, R, R], got shape {x.shape}")
    return x, single


def _conds(conditions, n: int) -> list[Conditions]:
    if isinstance(conditions, Conditions):
        return [conditions] * n
    conditions = list(conditions)
    if len(conditions) != n:
        raise ValueError(f"need one Conditions per image: {len(conditions)} for {n}")
    return conditions


def _tokens(sampler, conditions: Sequence[Conditions]) -> np.ndarray:
    return np.stack([c.tokens(report_len=sampler.cfg.data.report_len) for c in conditions])


def _guidance(sampler, guidance):
    """A ``sample.Guidance`` from None (the run's), a number (that overall scale) or one."""
    from cxr_rf import sample
    if guidance is None:
        return sample.Guidance.for_run(sampler.cfg.sample)
    if isinstance(guidance, (int, float)):
        return sample.Guidance.parse(float(guidance))
    return guidance


def contrast_branches(guidance, source_BL: np.ndarray, target_BL: np.ndarray):
    """(token rows [K+1, B, L], K scales) of contrast guidance: branch 0 the source (factual)
    tokens, branch k branch k-1 with the groups of the k-th set of ``guidance.chain()`` taken
    from the target. Every scale 1 (or no chain): the target alone, one branch."""
    sets, scales = guidance.chain()
    if not sets:
        return target_BL[None], ()
    sl = conditioning.group_slices(source_BL.shape[-1] - conditioning.NUM_STRUCTURED)
    rows, cur = [source_BL], source_BL.copy()
    for groups in sets:
        cur = cur.copy()
        for g in groups:
            cur[:, sl[g]] = target_BL[:, sl[g]]
        rows.append(cur)
    return np.stack(rows), tuple(scales)


def _branches(sampler, guidance, conditions, source, mode):
    if mode not in MODES:
        raise errors.UserError(f"unknown guidance mode {mode!r}; allowed: {', '.join(MODES)}")
    g = _guidance(sampler, guidance)
    tgt = _tokens(sampler, conditions)
    if mode == "contrast" and source is not None:
        return contrast_branches(g, _tokens(sampler, source), tgt)
    return g.branches(tgt)


# ------------------------------------------------------------------------- programs

@functools.lru_cache(maxsize=None)
def _program(model, fs: flow.FlowSettings, steps: int, method: str, kind: str):
    """The jitted integrator of one (model, flow settings, steps, solver, kind):
    kind "invert" (0 -> t0), "regenerate" (t0 -> 0) or "inpaint" (t0 -> 0 with the keep mask
    applied after every step). Shapes (batch, branches) are traced per call shape."""

    def velocity(params, branches_KBL, scales_K):
        apply = lambda x, t, tok: model.apply({"params": params}, x, t, tok)
        return flow.guided_velocity_fn(apply, list(branches_KBL), list(scales_K),
                                       prediction=fs.prediction, t_eps=fs.t_eps)

    def run(params, x_BHWC, branches_KBL, scales_K, t0, original_BHWC, mask_BHWC):
        v = velocity(params, branches_KBL, scales_K)
        if kind == "invert":
            return ode_invert(v, x_BHWC, steps=steps, method=method, shift=fs.shift, t0=t0)
        return ode_regenerate(v, x_BHWC, steps=steps, method=method, shift=fs.shift, t0=t0,
                              mask=mask_BHWC if kind == "inpaint" else None,
                              original=original_BHWC)

    return jax.jit(run)


@functools.lru_cache(maxsize=None)
def _flowedit_program(model, fs: flow.FlowSettings, steps: int, n_avg: int):
    """The jitted FlowEdit of one (model, flow settings, steps, n_avg) (see the module doc)."""

    def run(params, x_BHWC, src_KBL, src_scales, tgt_KBL, tgt_scales, seeds_B, t0):
        apply = lambda x, t, tok: model.apply({"params": params}, x, t, tok)
        v_src = flow.guided_velocity_fn(apply, list(src_KBL), list(src_scales),
                                        prediction=fs.prediction, t_eps=fs.t_eps)
        v_tgt = flow.guided_velocity_fn(apply, list(tgt_KBL), list(tgt_scales),
                                        prediction=fs.prediction, t_eps=fs.t_eps)
        ts = grid(steps, fs.shift, t0)
        batch = x_BHWC.shape[0]
        keys_B = jax.vmap(jax.random.PRNGKey)(seeds_B)

        def body(i, z):
            t, t_next = ts[i], ts[i + 1]
            t_B = jnp.full((batch,), t, jnp.float32)

            def one(k, acc):
                noise = jax.vmap(lambda key: jax.random.normal(
                    jax.random.fold_in(jax.random.fold_in(key, i), k), x_BHWC.shape[1:]))(keys_B)
                z_src = (1.0 - t) * x_BHWC + t * noise
                z_tar = z + z_src - x_BHWC
                return acc + v_tgt(z_tar, t_B) - v_src(z_src, t_B)
            dv = jax.lax.fori_loop(0, n_avg, one, jnp.zeros_like(z)) / n_avg
            return z + (t_next - t) * dv
        return jax.lax.fori_loop(0, steps, body, x_BHWC)

    return jax.jit(run)


def _chunks(sampler, n: int):
    bs = max(1, int(sampler.batch_size))
    for start in range(0, n, bs):
        idx = np.minimum(np.arange(start, start + bs), n - 1)   # pad: repeat the last row
        yield idx, min(bs, n - start)


def _run(sampler, params, kind, steps, method, x, branches, scales, t0, original=None,
         mask=None):
    program = _program(sampler.model, sampler.fs, int(steps), method, kind)
    x4 = x[..., None]
    orig4 = x4 if original is None else np.asarray(original, np.float32)[..., None]
    mask4 = (np.ones_like(x4) if mask is None
             else np.broadcast_to(np.asarray(mask, np.float32), x.shape)[..., None])
    scales = jnp.asarray(scales, jnp.float32)
    out = []
    for idx, keep in _chunks(sampler, len(x)):
        y = program(params, x4[idx], branches[:, idx], scales, jnp.float32(t0), orig4[idx],
                    np.ascontiguousarray(mask4[idx]))
        out.append(np.asarray(jax.device_get(y))[:keep, ..., 0])
    return np.concatenate(out)


# ------------------------------------------------------------------------- library

def invert(sampler, params, images, conditions, *, steps: int | None = None,
           method: str = "heun", t0: float = 1.0, guidance=None) -> np.ndarray:
    """Abduction: the noise at t0 of ``images`` ([B, R, R] or [R, R] in [-1, 1]), by
    integrating the flow ODE t = 0 -> t0 under ``conditions`` (the factual ones) with CFG
    ``guidance`` (default ``ABDUCT_GUIDANCE`` = 1, the conditional field: see the module doc)."""
    _check_sampler(sampler)
    t0 = _check_t0(t0)
    x, single = _as_batch(images)
    g = _guidance(sampler, ABDUCT_GUIDANCE if guidance is None else guidance)
    branches, scales = g.branches(_tokens(sampler, _conds(conditions, len(x))))
    z = _run(sampler, params, "invert", steps or sampler.cfg.sample.steps, method, x,
             branches, scales, t0)
    return z[0] if single else z


def regenerate(sampler, params, z_t0, conditions, *, t0: float = 1.0, steps: int | None = None,
               method: str = "heun", guidance=None, source=None, mode: str = "contrast",
               mask=None, original=None) -> np.ndarray:
    """Prediction: integrate t0 -> 0 from ``z_t0`` under ``conditions``. Guidance
    ``guidance`` (None: the run's ``sample.cfg``/``sample.guidance``; a number: that scale;
    or a ``sample.Guidance``); with ``source`` (the factual conditions) and mode "contrast"
    the chain runs from the source to ``conditions`` (module doc), else from the null branch.
    ``mask`` ([R, R] or [B, R, R], 1 = may change) with ``original`` (the images): keep-mask
    prediction, outside the mask the output is the original."""
    _check_sampler(sampler)
    t0 = _check_t0(t0)
    z, single = _as_batch(z_t0)
    conds = _conds(conditions, len(z))
    src = None if source is None else _conds(source, len(z))
    branches, scales = _branches(sampler, guidance, conds, src, mode)
    steps = steps or sampler.cfg.sample.steps
    if mask is not None:
        if original is None:
            raise ValueError("a keep mask needs the original images")
        orig, _ = _as_batch(original)
        m = np.asarray(mask, np.float32)
        if m.shape[-2:] != z.shape[-2:]:
            raise errors.UserError(f"mask is {m.shape[-2:]}, the images {z.shape[-2:]}")
        out = _run(sampler, params, "inpaint", steps, method, z, branches, scales, t0,
                   orig, m)
    else:
        out = _run(sampler, params, "regenerate", steps, method, z, branches, scales, t0)
    return out[0] if single else out


@dataclasses.dataclass
class EditResult:
    """``edited`` images; ``reconstruction`` (regenerated under the factual conditions with
    the same settings: what a null edit gives) and its ``psnr`` vs the input (dB per image),
    None without ``reconstruct``; ``noise`` the abducted noise at t0."""
    edited: np.ndarray
    reconstruction: np.ndarray | None
    noise: np.ndarray
    psnr: np.ndarray | None


def edit(sampler, params, images, source, target, *, t0: float = 1.0,
         steps: int | None = None, method: str = "heun", guidance=None, abduct_guidance=None,
         mode: str = "contrast", mask=None, reconstruct: bool = True) -> EditResult:
    """Counterfactual edit of ``images`` from the factual conditions ``source`` to ``target``:
    ``invert`` under the source (scale ``abduct_guidance``, default 1), ``regenerate`` under
    the target (``guidance``, ``mode``; ``mask``: keep-mask). ``reconstruct`` also regenerates
    under the source and reports the PSNR of that null edit against the input."""
    x, single = _as_batch(images)
    z = invert(sampler, params, x, source, steps=steps, method=method, t0=t0,
               guidance=abduct_guidance)
    kw = dict(t0=t0, steps=steps, method=method, guidance=guidance, source=source, mode=mode,
              mask=mask, original=x if mask is not None else None)
    edited = regenerate(sampler, params, z, target, **kw)
    recon = p = None
    if reconstruct:
        recon = regenerate(sampler, params, z, source, **kw)
        p = psnr(recon, x)
    if single:
        return EditResult(edited[0], None if recon is None else recon[0], z[0], p)
    return EditResult(edited, recon, z, p)


def inpaint(sampler, params, images, source, target, mask, **kwargs) -> EditResult:
    """``edit`` with a keep mask (1 = may change; outside it the input is kept exactly)."""
    return edit(sampler, params, images, source, target, mask=mask, **kwargs)


def flowedit(sampler, params, images, source, target, *, t0: float = FLOWEDIT_T0,
             steps: int | None = None, n_avg: int = 1, guidance=None, source_guidance=None,
             seed: int = 0) -> np.ndarray:
    """FlowEdit (inversion-free; module doc) of ``images`` from ``source`` to ``target``
    conditions: ``steps`` Euler steps over [0, t0] (as published), ``n_avg`` noise samples
    averaged per step, CFG ``guidance`` for the target velocity and ``source_guidance``
    (default: the same) for the source one, each against the null branch. Image i draws its
    noise from PRNGKey(seed + i)."""
    _check_sampler(sampler)
    t0 = _check_t0(t0)
    if int(n_avg) < 1:
        raise errors.UserError(f"n_avg must be >= 1, got {n_avg}")
    x, single = _as_batch(images)
    g_t = _guidance(sampler, guidance)
    g_s = g_t if source_guidance is None else _guidance(sampler, source_guidance)
    src, sc_s = g_s.branches(_tokens(sampler, _conds(source, len(x))))
    tgt, sc_t = g_t.branches(_tokens(sampler, _conds(target, len(x))))
    steps = int(steps or sampler.cfg.sample.steps)
    program = _flowedit_program(sampler.model, sampler.fs, steps, int(n_avg))
    seeds = (np.arange(len(x)) + int(seed)).astype(np.uint32)
    out = []
    for idx, keep in _chunks(sampler, len(x)):
        y = program(params, x[idx][..., None], src[:, idx], jnp.asarray(sc_s, jnp.float32),
                    tgt[:, idx], jnp.asarray(sc_t, jnp.float32), seeds[idx], jnp.float32(t0))
        out.append(np.asarray(jax.device_get(y))[:keep, ..., 0])
    out = np.concatenate(out)
    if g_s == g_t and src.shape == tgt.shape:
        # A null edit's velocity difference is identically zero: the input, exactly (the two
        # network calls would otherwise leave float32 rounding of ~1e-7).
        same = np.all(src == tgt, axis=(0, 2))
        out[same] = x[same]
    return out[0] if single else out


# ------------------------------------------------------------------------- causal model

def causal_model(cfg, workdir, path: str | None = None) -> tuple[causal.Model, str]:
    """(the metadata SCM, where it came from): ``path`` when given; else RUN/causal.json when
    it exists; else ``causal.Graph.default()`` fitted on the run's training-split metadata
    (every source of the run, records pooled), saved to RUN/causal.json when possible."""
    if path:
        return causal.Model.load(path), path
    cache = epath.Path(workdir) / "causal.json"
    if cache.exists():
        return causal.Model.load(os.fspath(cache)), os.fspath(cache)
    from cxr_rf import trainer
    from cxr_rf.evaluation import sets
    metas = []
    for d, _ in trainer.data_sources(cfg, epath.Path(workdir)):
        metas += sets.ReferenceSet(d, "train").metas
    model = causal.fit(causal.Graph.default(), metas)
    try:
        model.save(os.fspath(cache))
        where = f"fitted on {len(metas)} training records, saved to {cache}"
    except errors.UserError:
        where = f"fitted on {len(metas)} training records (not cached: {cache} not writable)"
    return model, where


# ------------------------------------------------------------------------- CLI

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Command-line flags (defined only when run as a program)."""
    flags.DEFINE_string("workdir", None, "Run directory with checkpoints/.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_string("image", None, "The image to edit: PNG/JPEG or DICOM, any size (fit "
                        "to the run's resolution, aspect kept, padded).")
    flags.DEFINE_string("conditions", "", "The image's factual findings, as sample's "
                        "--findings: Name or Name=state, comma separated; unlisted findings "
                        "take their most common state in the training data.")
    flags.DEFINE_string("sex", None, f"Factual sex, one of {conditioning.SEXES}.")
    flags.DEFINE_string("age", None, "Factual age in years, or 'unknown'.")
    flags.DEFINE_string("race", None, f"Factual race, one of {conditioning.RACES}.")
    flags.DEFINE_string("view", None, f"Factual view, one of {conditioning.VIEWS}.")
    flags.DEFINE_string("source", None, f"Factual source, one of {conditioning.SOURCES}.")
    flags.DEFINE_string("report", None, "Factual report text (runs with reports).")
    flags.DEFINE_string("set", None, "The intervention: 'Cardiomegaly=positive,age=30,...' "
                        "(causal.parse_set).")
    flags.DEFINE_string("out", None, "Output directory.")
    flags.DEFINE_float("strength", None, "t0, the noise level edited from, in (0, 1] "
                       f"(default: 1 for invert, {FLOWEDIT_T0} for flowedit).")
    flags.DEFINE_enum("method", "invert", list(METHODS), "invert (abduction + prediction) "
                      "or flowedit (inversion-free).")
    flags.DEFINE_string("mask", None, "Keep mask image (invert only): white = may change, "
                        "black = kept exactly; the input's size or the run's resolution.")
    flags.DEFINE_integer("steps", None, "ODE steps over [0, t0] (default: the run's "
                         "sample.steps).")
    flags.DEFINE_float("cfg", None, "Prediction guidance scale (default: the run's "
                       "sample.cfg); contrast guidance from the factual conditions.")
    flags.DEFINE_string("guidance", None, "Per-group prediction guidance (as sample's; "
                        "default: the run's sample.guidance).")
    flags.DEFINE_enum("mode", "contrast", list(MODES), "Prediction guidance: contrast (from "
                      "the factual conditions) or cfg (from the null branch).")
    flags.DEFINE_float("abduct_cfg", ABDUCT_GUIDANCE, "Abduction (inversion) guidance scale.")
    flags.DEFINE_enum("solver", "heun", list(SOLVERS), "ODE solver of inversion and "
                      "prediction.")
    flags.DEFINE_integer("n_avg", 1, "flowedit: noise samples averaged per step.")
    flags.DEFINE_string("causal", None, "Fitted causal model JSON (causal.Model.save); "
                        "default: RUN/causal.json, fitted on the run's training data.")
    flags.DEFINE_boolean("no-propagate", False, "Plain edit: only the --set variables change "
                         "(no causal propagation to their descendants).")
    flags.DEFINE_enum("format", "png16", list(export.FORMATS), "Output file format.")
    flags.DEFINE_integer("seed", 0, "Seed of the causal abduction and of flowedit's noise.")
    flags.DEFINE_integer("batch_size", None, "Sampler batch size.")
    cli.check_number("step", 0)
    cli.check_number("steps", 1)
    cli.check_number("strength", 0, 1, lo_open=True)
    cli.check_number("cfg", 0)
    cli.check_number("abduct_cfg", 0)
    cli.check_number("n_avg", 1)
    cli.check_number("seed", 0, 2**32, hi_open=True)
    cli.check_number("batch_size", 1)


def _read_image(path: str, flag: str) -> np.ndarray:
    if not os.path.exists(path):
        raise errors.UserError(f"{flag} {path} does not exist")
    if os.path.isdir(path):
        raise errors.UserError(f"{flag} {path} is a directory")
    from cxr_rf.data import imaging
    return imaging.read(path)


def main(argv):
    from cxr_rf import sample
    from cxr_rf.data import imaging
    from cxr_rf.data import stats as data_stats
    cli.no_arguments(argv)
    cli.require("workdir", "image", "set", "out")
    cli.input_dir(FLAGS.workdir, "--workdir")
    cli.output_dir(FLAGS.out, "--out")
    propagate = not FLAGS["no-propagate"].value
    if FLAGS.causal and not os.path.isfile(FLAGS.causal):
        raise errors.UserError(f"--causal {FLAGS.causal} does not exist")
    if FLAGS.mask and FLAGS.method != "invert":
        raise errors.UserError("--mask needs --method invert")
    do = causal.parse_set(FLAGS.set)
    kwargs = dict(sex=FLAGS.sex, age=sample._age(FLAGS.age), race=FLAGS.race, view=FLAGS.view,
                  source=FLAGS.source, report=FLAGS.report)
    Conditions.parse(FLAGS.conditions, **kwargs)          # bad conditions fail early
    raw = _read_image(FLAGS.image, "--image")
    raw_mask = _read_image(FLAGS.mask, "--mask") if FLAGS.mask else None
    cfg = sample.read_config(FLAGS.workdir)
    r = int(cfg.data.resolution)
    if raw_mask is not None and raw_mask.shape not in (raw.shape, (r, r)):
        raise errors.UserError(f"--mask is {raw_mask.shape[1]}x{raw_mask.shape[0]}, the image "
                               f"{raw.shape[1]}x{raw.shape[0]} (and the run {r}x{r}): give a "
                               "mask of either size")
    s = cfg.sample
    steps = int(FLAGS.steps or s.steps)
    t0 = FLAGS.strength or (1.0 if FLAGS.method == "invert" else FLOWEDIT_T0)
    guidance = sample.Guidance.for_run(s, FLAGS.cfg, FLAGS.guidance)
    if FLAGS.report is not None and not cfg.data.report_len:
        raise errors.UserError("--report needs a run trained with reports (data.report_len > 0)")
    if cfg.data.get("latents", False):
        raise errors.UserError("editing a latent run (data.latents=True) is not supported: "
                               "abduction needs the autoencoder's encoder")
    marginals, unlisted = sample.training_defaults(cfg, FLAGS.workdir)
    factual = Conditions.parse(FLAGS.conditions, unlisted=unlisted, **kwargs)
    scm, scm_from = causal_model(cfg, FLAGS.workdir, FLAGS.causal)
    rng = np.random.default_rng(FLAGS.seed)
    target, cf = causal.edit(scm, factual, do, rng, propagate=propagate)
    if marginals is not None and (missing := data_stats.unseen(target.requested(), marginals)):
        print(f"warning: never in this run's training data, so the model has not learnt it: "
              f"{', '.join(missing)}", file=sys.stderr)
    from cxr_rf.data import pipeline
    image = pipeline.to_model_range(imaging.fit_square(raw, r))[..., 0]
    mask = None
    if raw_mask is not None:
        m = raw_mask if raw_mask.shape == (r, r) else imaging.fit_square(raw_mask, r)
        mask = (m >= 32768).astype(np.float32)

    sampler = sample.Sampler(cfg, batch_size=FLAGS.batch_size or 1)
    params, ckpt_step = sampler.restore(FLAGS.workdir, FLAGS.step)
    start = time.perf_counter()
    if FLAGS.method == "invert":
        res = edit(sampler, params, image, factual, target, t0=t0, steps=steps,
                   method=FLAGS.solver, guidance=guidance, abduct_guidance=FLAGS.abduct_cfg,
                   mode=FLAGS.mode, mask=mask)
        edited, recon, rec_psnr = res.edited, res.reconstruction, float(res.psnr[0])
    else:
        edited = flowedit(sampler, params, image, factual, target, t0=t0, steps=steps,
                          n_avg=FLAGS.n_avg, guidance=guidance, seed=FLAGS.seed)
        recon, rec_psnr = image, None        # a null FlowEdit is exactly the identity
    seconds = time.perf_counter() - start

    settings = {"method": FLAGS.method, "strength": t0, "steps": steps, "solver":
                FLAGS.solver if FLAGS.method == "invert" else "euler",
                "guidance": guidance.describe(), "mode": FLAGS.mode if FLAGS.method == "invert"
                else "cfg", "abduct_cfg": FLAGS.abduct_cfg, "n_avg": FLAGS.n_avg,
                "mask": FLAGS.mask, "seed": FLAGS.seed, "propagate": propagate,
                "causal_model": scm_from, "format": FLAGS.format}
    generator = {"name": "cxr_rf", "version": export.version(), "workdir": str(FLAGS.workdir),
                 "checkpoint_step": ckpt_step, "edit": settings}
    out = epath.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    study = export.new_study()
    files = {}
    for k, (name, img, c) in enumerate((("original", image, factual),
                                        ("reconstruction", recon, factual),
                                        ("edited", edited, target)), 1):
        path = export.write(out / name, img, c, fmt=FLAGS.format,
                            generator={**generator, "role": name}, study={**study, "instance": k})
        files[name] = path.name
    sheet = outputs.grid([image, recon, edited, np.clip(edited - image, -1, 1)],
                         [f"original | {factual.label()}", "reconstruction | null edit",
                          f"edited | {target.label()}", "edited - original | "],
                         cols=4)
    with (out / "side_by_side.png").open("wb") as f:
        sheet.save(f, format="PNG")
    files["side_by_side"] = "side_by_side.png"
    record = {"image": os.path.abspath(FLAGS.image), "workdir": str(FLAGS.workdir),
              "checkpoint_step": ckpt_step, "set": FLAGS.set, "do": do,
              "conditions_before": factual.describe(), "conditions_after": target.describe(),
              "causal_changes": cf.changes, "inversion_psnr_db": rec_psnr,
              "settings": settings, "files": files, "seconds": seconds,
              "study": study}
    (out / "edit.json").write_text(json.dumps(outputs.to_json(record), indent=1) + "\n")
    psnr_text = "n/a (flowedit)" if rec_psnr is None else f"{rec_psnr:.1f} dB"
    changes = ", ".join(f"{c['variable']} {c['from']}->{c['to']}" for c in cf.changes)
    print(f"edited {FLAGS.image}: {changes or 'no change'}; reconstruction PSNR {psnr_text}; "
          f"wrote {', '.join(files.values())} and edit.json to {out}")


if __name__ == "__main__":
    cli.run(main, _define_flags)
