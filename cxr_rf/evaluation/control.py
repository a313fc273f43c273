"""The analytic control: does the model draw what it is asked for, measured on the phantom.

For every finding the phantom can measure (``SCORES``), N seeds with matched demographics are
sampled once with the finding ``=positive`` and once ``=negative`` (same noise per seed, other
findings unlisted), every image is measured with ``cxr_rf.data.phantom.measure`` and the
finding's score separates the two groups with an AUROC (95% bootstrap interval). The same is
computed on real phantoms rendered at the run's resolution with the same demographics and the
finding forced on/off: the ceiling a perfect model would reach with this measurement.
``python -m cxr_rf.evaluate control`` writes ``control.json``, ``control.md`` (the table) and
``control.png`` (positive/negative pairs). The matched pairs (``paired_requests``) are also
what ``conditional`` scores with a classifier instead of a measurement.

Images below 128 px are upsampled to 128 px (``imaging.fit_square``, Lanczos) before they
are measured, samples and real phantoms alike: the measurements are accurate from 128 px.
The library entry point is ``control(cfg, model, params, ...)``.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import ml_collections
import numpy as np

from cxr_rf import errors, metrics, outputs
from cxr_rf.conditioning import Conditions
from cxr_rf.data import imaging, phantom

MEASURE_RESOLUTION = 128      # phantom.measure is accurate from here up
REAL_SEED = 1234              # the phantom seed of the real (ceiling) studies
BOOTSTRAP = 1000              # bootstrap resamples of each AUROC interval
AGE_RANGE = (40.0, 85.0)      # ages of the matched demographics, years


def _max(*values: float) -> float:
    """The largest value, NaN if any is NaN (an unreadable side makes the score unreadable)."""
    return float("nan") if any(math.isnan(v) for v in values) else float(max(values))


@dataclasses.dataclass(frozen=True)
class Score:
    """How a finding is read from ``phantom.measure``'s dict: one number, higher = present."""
    name: str                         # what the score is, as written in the table
    keys: tuple[str, ...]             # measurements reported per group (mean ± sd)
    fn: Callable[[dict], float]

    def __call__(self, m: dict) -> float:
        return float(self.fn(m))


# The findings whose real phantoms at 64 px (upsampled to 128) separate present from absent
# with AUROC >= 0.9, measured with this module's ceiling (``real_images`` + ``measure_images``,
# N=200 per group, demographics seeds 0 and 7): Cardiomegaly 0.995/0.992, Pleural Effusion
# 1.0/1.0, Pneumothorax 0.926/0.925 (0.95 at 128 and 256 px). Support Devices is not here: ET/NG
# tubes and ECG electrodes, the only devices of about a third of positive phantoms, are at or
# below the pixel scale at 64 px (an ET tube lifts the tracheal lumen by ~0.04 of the display
# range); the best simple detector tried, a Hessian ridge percentile inside the lungs, reached
# AUROC ~0.75.
SCORES: dict[str, Score] = {
    "Cardiomegaly": Score("ctr", ("ctr",), lambda m: m["ctr"]),
    "Pleural Effusion": Score(
        "max(cp_blunting_left, cp_blunting_right)", ("cp_blunting_left", "cp_blunting_right"),
        lambda m: _max(m["cp_blunting_left"], m["cp_blunting_right"])),
    "Pneumothorax": Score(
        "max(ptx_lucency_left, ptx_lucency_right)", ("ptx_lucency_left", "ptx_lucency_right"),
        lambda m: _max(m["ptx_lucency_left"], m["ptx_lucency_right"])),
}


# ----------------------------------------------------------------------------- pieces

def demographics(num: int, seed: int = 0) -> list[dict]:
    """``num`` matched demographics {sex, age, view}, a fixed function of ``seed``: seed i of
    every group (positive, negative, real on/off) gets entry i."""
    rng = np.random.default_rng([int(seed), 0xDE40])
    out = []
    for _ in range(int(num)):
        sex = "M" if rng.random() < 0.5 else "F"
        age = float(np.round(rng.uniform(*AGE_RANGE), 1))
        view = "PA" if rng.random() < 0.5 else "AP"
        out.append({"sex": sex, "age": age, "view": view})
    return out


def condition(finding: str, present: bool, demo: dict,
              unlisted: dict[str, int] | None = None) -> Conditions:
    """``finding=positive|negative`` with every other finding unlisted (``unlisted``: the
    run's training defaults, ``sample.training_defaults``), the demographics of ``demo``,
    race and source not specified."""
    state = "positive" if present else "negative"
    return Conditions.parse(f"{finding}={state}", sex=demo["sex"], age=demo["age"],
                            view=demo["view"], unlisted=unlisted)


def real_images(finding: str, present: bool, demos: Sequence[dict], resolution: int,
                seed: int = REAL_SEED) -> np.ndarray:
    """Phantom studies (seed, index i) with ``demos[i]`` and ``finding`` forced on/off, as the
    model sees them in training: float32 [N, R, R] in [-1, 1]."""
    imgs = [phantom.generate(seed, i, resolution, findings={finding: bool(present)}, **d).image
            for i, d in enumerate(demos)]
    return np.stack(imgs).astype(np.float32) * np.float32(2.0 / 65535.0) - np.float32(1.0)


def measure_images(images: np.ndarray) -> list[dict]:
    """``phantom.measure`` of each [-1, 1] image, upsampled to MEASURE_RESOLUTION first when
    smaller (16-bit, Lanczos): the one path for samples and real phantoms."""
    out = []
    for x in images:
        u = outputs.to_uint(x, 16)
        if u.shape[0] < MEASURE_RESOLUTION:
            u = imaging.fit_square(u, MEASURE_RESOLUTION)
        out.append(phantom.measure(u))
    return out


def compare(finding: str, pos: Sequence[dict], neg: Sequence[dict], *, seed: int = 0,
            n_boot: int = BOOTSTRAP) -> dict:
    """AUROC of ``finding``'s score between measurement lists ``pos`` and ``neg``, its 95%
    bootstrap interval, and mean/sd/count/NaN count of the score and each measurement per
    group. NaN scores (unreadable images) are dropped and counted (``metrics``)."""
    score = SCORES[finding]
    sp = [score(m) for m in pos]
    sn = [score(m) for m in neg]
    lo, hi = metrics.bootstrap_ci(sp, sn, n=n_boot, seed=seed)

    def group(ms, s):
        return {"score": metrics.summary(s),
                **{k: metrics.summary([m[k] for m in ms]) for k in score.keys}}
    return {"auroc": metrics.auroc(sp, sn), "ci95": [lo, hi],
            "pos": group(pos, sp), "neg": group(neg, sn), "scores": {"pos": sp, "neg": sn}}


# ----------------------------------------------------------------------------- control

def paired_requests(findings: Sequence[str], demos: Sequence[dict], seeds: Sequence[int],
                    unlisted: dict[str, int] | None, report_len: int = 0):
    """The matched-pair sampling requests of ``findings``: for each finding and each i, the
    condition ``finding=positive`` and ``=negative`` with ``demos[i]`` and noise ``seeds[i]``.

    Identical (condition, seed) requests appear once (e.g. the negative groups when unlisted
    findings default to negative). Returns (conditions, seeds, where) with
    ``where[finding, present]`` the request index of each i.
    """
    slots, conds, req_seeds, where = {}, [], [], {}
    for f in findings:
        for present in (True, False):
            idx = []
            for sd, d in zip(seeds, demos):
                c = condition(f, present, d, unlisted)
                key = (c.tokens(report_len=report_len).tobytes(), sd)
                if key not in slots:
                    slots[key] = len(conds)
                    conds.append(c)
                    req_seeds.append(sd)
                idx.append(slots[key])
            where[f, present] = np.asarray(idx)
    return conds, req_seeds, where


def check_num_seed(num, seed, why: str = "") -> tuple[int, int]:
    """(num, seed) as ints: at least 2 images per group, seeds seed..seed+num-1 in uint32."""
    num, seed = int(num), int(seed)
    if num < 2:
        raise errors.UserError(f"num must be >= 2{why}, got {num}")
    if seed < 0 or seed + num > 2**32:
        raise errors.UserError(f"seed + num must be in [0, 2**32], got {seed} + {num}")
    return num, seed


def control(cfg: ml_collections.ConfigDict, model, params, *, num: int = 48,
            steps: int | None = None, cfg_scale: float | None = None, method: str | None = None,
            seed: int = 0, findings: Sequence[str] | None = None, sampler=None,
            guidance=None, unlisted: dict[str, int] | None = None, real: bool = True,
            return_images: bool = False):
    """The control evaluation of ``model``/``params`` (EMA parameters of a run with ``cfg``).

    ``findings``: a subset of ``SCORES`` (default: all). Sampling settings default to the
    run's ``cfg.sample``; ``guidance`` (a ``sample.Guidance``) replaces ``cfg_scale``;
    ``unlisted`` are the states of the findings not evaluated (``condition``); image i of each group uses noise seed ``seed + i`` and demographics
    ``demographics(num, seed)[i]``. Identical (condition, seed) requests are sampled once
    (e.g. the negative groups when unlisted findings default to negative), all in one
    ``Sampler.generate`` call. ``real=False`` skips the real-phantom ceiling. Returns a
    JSON-ready dict (NaN as float NaN; see ``outputs.to_json``); with ``return_images`` also
    {finding: {"pos": [N, R, R], "neg": [N, R, R]}} of the samples.
    """
    if isinstance(findings, str):
        findings = [findings]
    findings = list(dict.fromkeys(SCORES if findings is None else findings))
    bad = [f for f in findings if f not in SCORES]
    if bad or not findings:
        raise errors.UserError(f"cannot measure {', '.join(map(repr, bad)) or 'no findings'}; "
                               f"measurable findings: {', '.join(SCORES)}")
    num, seed = check_num_seed(num, seed, " (two groups of num images)")
    s = cfg.sample
    steps = int(steps or s.steps)
    from cxr_rf import sample   # jax and the model: imported late, so the CLI fails fast
    guidance = guidance or sample.Guidance.for_run(s, cfg_scale)
    method = method or s.method
    resolution = int(cfg.data.resolution)
    if sampler is None:
        sampler = sample.Sampler(cfg, model)
    demos = demographics(num, seed)
    seeds = [seed + i for i in range(num)]

    conds, req_seeds, where = paired_requests(findings, demos, seeds, unlisted,
                                              cfg.data.report_len)
    t0 = time.perf_counter()
    images = sampler.generate(params, conds, req_seeds, steps=steps, guidance=guidance,
                              method=method)
    t1 = time.perf_counter()
    measured = measure_images(images)
    t2 = time.perf_counter()

    result = {
        "command": "control",
        "settings": {"num": num, "steps": steps, "cfg_scale": guidance.scale,
                     "guidance": dict(guidance.groups), "method": method,
                     "seed": seed, "resolution": resolution,
                     "measure_resolution": max(resolution, MEASURE_RESOLUTION),
                     "real_seed": REAL_SEED if real else None,
                     "bootstrap": {"n": BOOTSTRAP, "level": 0.95, "seed": seed},
                     "images_sampled": len(conds)},
        "demographics": demos,
        "findings": {},
    }
    real_s = 0.0
    for f in findings:
        pos = [measured[i] for i in where[f, True]]
        neg = [measured[i] for i in where[f, False]]
        entry = {"score": SCORES[f].name, "measurements": list(SCORES[f].keys),
                 "samples": compare(f, pos, neg, seed=seed)}
        if real:
            t = time.perf_counter()
            rp = measure_images(real_images(f, True, demos, resolution))
            rn = measure_images(real_images(f, False, demos, resolution))
            real_s += time.perf_counter() - t
            entry["real"] = compare(f, rp, rn, seed=seed)
        result["findings"][f] = entry
    result["timing_s"] = {"sample": t1 - t0, "measure": t2 - t1, "real": real_s,
                          "total": time.perf_counter() - t0}
    if return_images:
        return result, {f: {"pos": images[where[f, True]], "neg": images[where[f, False]]}
                        for f in findings}
    return result


# ----------------------------------------------------------------------------- reports

def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _auroc_cell(g: dict | None) -> str:
    if g is None:
        return "-"
    lo, hi = g["ci95"]
    if not math.isfinite(g["auroc"]):
        return "n/a"
    return f"{g['auroc']:.2f} [{_num(lo, 2)}, {_num(hi, 2)}]"


def _means_cell(g: dict | None) -> str:
    if g is None:
        return "-"
    p, n = g["pos"]["score"], g["neg"]["score"]
    return f"{_num(p['mean'])}±{_num(p['sd'])} / {_num(n['mean'])}±{_num(n['sd'])}"


def _groups(guidance: dict | None) -> str:
    return "".join(f" ({g} {v:g})" for g, v in (guidance or {}).items())


def table(result: dict) -> str:
    """The markdown table of a ``control`` result (one row per finding)."""
    s = result["settings"]
    step = result.get("checkpoint_step")
    lines = ["# Control: does the model draw what it is asked for?", "",
             f"{'checkpoint step ' + str(step) + ', ' if step is not None else ''}"
             f"{s['num']} seeds per group, {s['steps']} {s['method']} steps, CFG "
             f"{s['cfg_scale']:g}{_groups(s.get('guidance'))}, seed {s['seed']}, {s['resolution']} px (measured at "
             f"{s['measure_resolution']} px). AUROC of the finding's score, positive vs "
             f"negative condition, with a 95% bootstrap interval; 'real': phantoms with the "
             f"same demographics and the finding forced on/off (the ceiling). Means ± sd of "
             f"the score, positive / negative.", "",
             "| finding | score | AUROC [95% CI] samples | AUROC real | mean pos/neg samples "
             "| mean pos/neg real | unmeasured pos/neg samples |",
             "|---|---|---|---|---|---|---|"]
    for f, e in result["findings"].items():
        sm, rl = e["samples"], e.get("real")
        lines.append(f"| {f} | {e['score']} | {_auroc_cell(sm)} | {_auroc_cell(rl)} | "
                     f"{_means_cell(sm)} | {_means_cell(rl)} | "
                     f"{sm['pos']['score']['nan']}/{sm['neg']['score']['nan']} |")
    return "\n".join(lines) + "\n"


def contact_sheet(images: dict, result: dict, pairs: int = 2):
    """PIL image: per finding, ``pairs`` seeds as (positive, negative) pairs, with scores."""
    tiles, labels = [], []
    seed0 = result["settings"]["seed"]
    for f, groups in images.items():
        sc = result["findings"][f]["samples"]["scores"]
        for i in range(min(pairs, len(groups["pos"]))):
            for sign, key in (("+", "pos"), ("-", "neg")):
                tiles.append(groups[key][i])
                labels.append(f"{f}{sign} s{seed0 + i} | score {_num(sc[key][i])}")
    return outputs.grid(tiles, labels, cols=2 * pairs)
