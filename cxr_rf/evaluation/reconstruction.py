"""How well a latent autoencoder keeps what matters in a radiograph, measured on phantoms.

For N phantom patients rendered at a resolution R (``phantom.generate``: ground truth known),
each image goes through encode (posterior mean) → decode, and the reconstruction is compared
with its original:

    pixels      PSNR (on [0, 1]) and SSIM (Gaussian window, ``autoencoder.losses.ssim``)
    features    FD of reconstructions against originals in a feature space (optional), the
                same estimator as ``evaluate fidelity``
    measures    the error of ``phantom.measure`` on the reconstruction against the original:
                CTR and costophrenic blunting (left, right): what a clinician reads
    findings    per finding f: the patient rendered with f forced on and off differs by the
                finding's own signal d = x_on − x_off (a device's line, an effusion's
                meniscus, vessel-like marks); its **retention** is
                ⟨R(x_on) − R(x_off), d⟩ / ⟨d, d⟩ (1 = the finding survives whole, 0 = erased)
                and the **residual** ‖(R(x_on) − R(x_off)) − d‖ / ‖d‖ (0 = exact). Thin
                structures (support devices, fractures) are where an f8/f16 autoencoder loses
                first.
    speed       encode and decode images/s on this host (batch ``batch_size``, compiled once)

``reconstruction(Codec(ae_cfg, variables), resolution, ...)`` returns the JSON-friendly dict;
``table`` the markdown. The CLI is ``python -m cxr_rf.evaluate reconstruction --autoencoder RUN``.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cxr_rf import conditioning as cond
from cxr_rf import errors
from cxr_rf.data import phantom

MEASURES = ("ctr", "cp_blunting_left", "cp_blunting_right")
SIGNAL_FINDINGS = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Support Devices",
                   "Fracture", "Lung Lesion", "Consolidation", "Edema")


class Codec:
    """Encode (posterior mean) and decode of an autoencoder, jitted once per batch shape;
    images in and out are float32 [B, R, R] in [0, 1]."""

    def __init__(self, ae_cfg, variables, batch_size: int = 16, resolution: int | None = None):
        from cxr_rf.autoencoder.model import Autoencoder
        if resolution is not None and resolution % ae_cfg.factor:
            raise errors.UserError(f"resolution {resolution} is not a multiple of the "
                                   f"autoencoder's downsampling factor {ae_cfg.factor}")
        self.model, self.v, self.batch_size = Autoencoder(ae_cfg), variables, int(batch_size)
        self._enc = jax.jit(lambda v, x: self.model.apply(v, x, method="encode")[0])
        self._dec = jax.jit(lambda v, z: self.model.apply(v, z, method="decode"))

    def _batched(self, fn, x: np.ndarray) -> np.ndarray:
        out = []
        for s in range(0, len(x), self.batch_size):
            part = x[s:s + self.batch_size]
            pad = self.batch_size - len(part)
            y = fn(self.v, jnp.asarray(np.pad(part, [(0, pad)] + [(0, 0)] * (part.ndim - 1))))
            out.append(np.asarray(y)[:len(part)])
        return np.concatenate(out)

    def encode(self, images01_BxRxR: np.ndarray) -> np.ndarray:
        x = (images01_BxRxR.astype(np.float32) * 2 - 1)[..., None]
        return self._batched(self._enc, x)

    def decode(self, z: np.ndarray) -> np.ndarray:
        y = self._batched(self._dec, z)[..., 0]
        return np.clip((y + 1) * 0.5, 0.0, 1.0).astype(np.float32)

    def __call__(self, images01_BxRxR: np.ndarray) -> np.ndarray:
        return self.decode(self.encode(images01_BxRxR))


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of [0, 1] images [B, H, W] (inf for identical images)."""
    mse = np.mean((a.astype(np.float64) - b) ** 2, axis=(1, 2))
    with np.errstate(divide="ignore"):
        return 10 * np.log10(1.0 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from cxr_rf.autoencoder import losses
    w = min(11, a.shape[1])
    return np.asarray(losses.ssim(jnp.asarray(a[..., None] * 2 - 1), jnp.asarray(b[..., None] * 2 - 1),
                                  window=w if w % 2 else w - 1))


def _stats(x) -> dict:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return {"n": 0, "mean": None, "p95": None}
    return {"n": int(x.size), "mean": float(x.mean()), "p95": float(np.percentile(x, 95))}


def _render(seed: int, idx: Sequence[int], resolution: int, **overrides) -> np.ndarray:
    return np.stack([phantom.generate(seed, int(i), resolution, **overrides).image
                     for i in idx]).astype(np.float32) / np.float32(65535.0)


def _measure(images01: np.ndarray) -> list[dict]:
    from cxr_rf.evaluation import control
    return control.measure_images(images01 * 2 - 1)


def reconstruction(codec, resolution: int, *, num: int = 64, seed: int = 4321,
                   per_finding: int = 16, findings: Sequence[str] = SIGNAL_FINDINGS,
                   extractor=None, return_images: bool = False):
    """The reconstruction report (module docstring) of ``codec`` (a ``Codec``, or anything
    with ``encode``/``decode``/``__call__`` on [0, 1] images and a ``batch_size``) on ``num``
    phantoms of ``seed`` (held out: the training conversions use seed 0) at ``resolution``,
    ``per_finding`` patients per finding for the retention. With ``return_images`` also
    (originals, reconstructions)."""
    if num < 2 or per_finding < 1:
        raise errors.UserError(f"num must be >= 2 and per_finding >= 1, got {num}, {per_finding}")
    bad = [f for f in findings if f not in cond.FINDINGS]
    if bad:
        raise errors.UserError(f"unknown findings {bad}; choose from {', '.join(cond.FINDINGS)}")
    batch_size = codec.batch_size
    x = _render(seed, range(num), resolution)
    codec(x[:batch_size])                                   # compile both programs first
    t0 = time.perf_counter()
    z = codec.encode(x)
    t1 = time.perf_counter()
    r = codec.decode(z)
    t2 = time.perf_counter()
    p, s = psnr(r, x), ssim(r, x)
    out = {"resolution": resolution, "num": num, "seed": seed, "latent_shape": list(z.shape[1:]),
           "compression": float(resolution * resolution / np.prod(z.shape[1:])),
           "psnr": {"mean": float(np.mean(p)), "min": float(np.min(p))},
           "ssim": {"mean": float(np.mean(s)), "min": float(np.min(s))},
           "speed": {"encode_images_per_s": num / (t1 - t0), "decode_images_per_s": num / (t2 - t1),
                     "batch_size": batch_size, "device": jax.devices()[0].device_kind}}
    mo, mr = _measure(x), _measure(r)
    out["measures"] = {k: _stats([abs(a[k] - b[k]) for a, b in zip(mo, mr)]) for k in MEASURES}
    if extractor is not None:
        from cxr_rf import fidelity as fd
        fo, fr = extractor(x), extractor(r)
        out["fd"] = {"space": extractor.name, "value": fd.fid(fo, fr), "n": num}
    out["findings"] = {}
    idx = range(per_finding)
    for f in findings:
        on = _render(seed + 1, idx, resolution, findings={f: True})
        off = _render(seed + 1, idx, resolution, findings={f: False})
        d = (on - off).reshape(len(on), -1).astype(np.float64)
        rd = (codec(on) - codec(off)).reshape(len(on), -1).astype(np.float64)
        energy = (d * d).sum(1)
        keep = energy > 1e-12          # a finding the renderer could not place for a patient
        ret = (rd * d).sum(1)[keep] / energy[keep]
        res = np.linalg.norm(rd - d, axis=1)[keep] / np.sqrt(energy[keep])
        out["findings"][f] = {"patients": int(keep.sum()), "retention": _stats(ret),
                              "residual": _stats(res),
                              "signal_rms": float(np.sqrt(energy[keep].mean() / d.shape[1]))
                              if keep.any() else None}
    return (out, (x, r)) if return_images else out


def table(result: dict) -> str:
    def n(x, d=3):
        return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{d}f}"
    sp = result["speed"]
    lines = [f"# Reconstruction on held-out phantoms at {result['resolution']}²", "",
             f"{result['num']} phantoms (seed {result['seed']}); latent {result['latent_shape']} "
             f"({n(result['compression'], 1)}× fewer values). PSNR {n(result['psnr']['mean'], 2)} dB "
             f"(min {n(result['psnr']['min'], 2)}), SSIM {n(result['ssim']['mean'])}"
             + (f", FD ({result['fd']['space']}) {n(result['fd']['value'], 4)}" if "fd" in result else "")
             + f". Encode {n(sp['encode_images_per_s'], 1)} img/s, decode "
             f"{n(sp['decode_images_per_s'], 1)} img/s ({sp['device']}, batch {sp['batch_size']}).", "",
             "| measurement | mean abs error | p95 |", "|---|---|---|"]
    for k, v in result["measures"].items():
        lines.append(f"| {k} | {n(v['mean'], 4)} | {n(v['p95'], 4)} |")
    lines += ["", "| finding | patients | signal rms | retention mean (1 = kept) | residual mean "
              "(0 = exact) |", "|---|---|---|---|---|"]
    for f, v in result["findings"].items():
        lines.append(f"| {f} | {v['patients']} | {n(v['signal_rms'], 4)} | "
                     f"{n(v['retention']['mean'])} | {n(v['residual']['mean'])} |")
    return "\n".join(lines) + "\n"
