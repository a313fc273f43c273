"""Counterfactual edits measured on phantoms, where the true counterfactual exists.

For N phantom patients (``phantom.generate(REAL_SEED, i, R, findings={f: start}, sex, age,
view)``, demographics ``control.demographics(num, seed)``) and each finding f of
``FINDINGS`` (the two the phantom measures reliably at small sizes), two directions:

    add      the study rendered with f forced absent, edited to f=positive
    remove   the study rendered with f forced present, edited to f=negative

The factual conditions are the study's own record (its 14 finding labels as the converted
dataset stores them, sex, age, race, view, source "phantom"); the counterfactual changes f
only (and "No Finding", recomputed) — a plain edit, no causal propagation, so the phantom
rendered with f flipped (``findings={f: not start}``, every other variable of the study the
same) is the TRUE counterfactual. Every editor of ``METHODS`` is a row:

    invert     abduction by full inversion (t0 = 1) + prediction (``cxr_rf.edit.edit``)
    partial    the same from t0 = PARTIAL_T0 (0.6)
    flowedit   FlowEdit, inversion-free, from t0 = ``edit.FLOWEDIT_T0``

Measured per row (``control.SCORES`` via ``control.measure_images``: CTR, max costophrenic
blunting; PSNR in dB on [-1, 1], peak-to-peak 2):

    effectiveness   AUROC of the score, edited vs original, oriented so that 1 = every edit
                    moved the score the intended way relative to the originals (add: edited
                    > original; remove: original > edited); the mean signed score change
                    (edited - original) next to the true counterfactual's change
    identity        PSNR of the edit to the true counterfactual; references: the original's
                    PSNR to it (what doing nothing scores) and a plain sample from noise
                    with the target conditions (what ignoring the image scores)
    reversibility   edit, then edit back to the factual conditions (the same editor; the
                    inversion methods abduct the edited image under the target conditions):
                    PSNR to the original
    composition     the null edit (target = factual conditions): PSNR to the original
                    (FlowEdit's null edit is exactly the identity: 106 dB, the PSNR cap)

Guidance: abduction at CFG 1, prediction with contrast guidance at the run's ``sample.cfg``
/ ``sample.guidance`` (``cxr_rf.edit`` explains both; ``guidance`` replaces it); FlowEdit
with the same guidance for both velocities; the reference sample with it as ordinary CFG. ``python -m cxr_rf.evaluate
edits`` writes ``edits.json`` and ``edits.md``; the library entry point is ``edits(cfg,
sampler, params, ...)``, ``table(result)`` its markdown, ``contact_sheet(images, result)``
(with ``return_images``) original / edited / true counterfactual triples.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import numpy as np

from cxr_rf import conditioning as cond
from cxr_rf import edit as edit_lib
from cxr_rf import errors, metrics
from cxr_rf.conditioning import Conditions
from cxr_rf.data import phantom
from cxr_rf.evaluation import control

FINDINGS = ("Cardiomegaly", "Pleural Effusion")
DIRECTIONS = {"add": False, "remove": True}      # direction -> the original's state of f
PARTIAL_T0 = 0.6
REAL_SEED = control.REAL_SEED


@dataclasses.dataclass(frozen=True)
class Method:
    """One editor: ``kind`` "invert" (abduction + prediction) or "flowedit", from ``t0``."""
    kind: str
    t0: float


METHODS: dict[str, Method] = {
    "invert": Method("invert", 1.0),
    "partial": Method("invert", PARTIAL_T0),
    "flowedit": Method("flowedit", edit_lib.FLOWEDIT_T0),
}


# ----------------------------------------------------------------------------- pieces

def factual(study: phantom.PhantomStudy) -> Conditions:
    """The conditions of a phantom study's own record (what the dataset stores for it)."""
    return Conditions(tuple(int(s) for s in study.findings), study.sex, float(study.age),
                      study.race, study.view, "phantom")


def with_finding(c: Conditions, finding: str, present: bool) -> Conditions:
    """``c`` with ``finding`` positive/negative and "No Finding" recomputed (positive iff no
    other finding is positive; else negative)."""
    codes = list(c.findings)
    codes[cond.FINDINGS.index(finding)] = cond.POSITIVE if present else cond.NEGATIVE
    nf = cond.FINDINGS.index("No Finding")
    any_pos = any(s == cond.POSITIVE for i, s in enumerate(codes) if i != nf)
    codes[nf] = cond.NEGATIVE if any_pos else cond.POSITIVE
    return dataclasses.replace(c, findings=tuple(codes))


def phantoms(finding: str, present: bool, demos: Sequence[dict], resolution: int,
             seed: int = REAL_SEED) -> tuple[np.ndarray, list[Conditions]]:
    """(images [N, R, R] in [-1, 1], factual conditions) of the studies (seed, i) with
    ``demos[i]`` and ``finding`` forced on/off."""
    studies = [phantom.generate(seed, i, resolution, findings={finding: bool(present)}, **d)
               for i, d in enumerate(demos)]
    imgs = np.stack([s.image for s in studies]).astype(np.float32)
    return imgs * np.float32(2.0 / 65535.0) - np.float32(1.0), [factual(s) for s in studies]


def _scores(finding: str, images: np.ndarray) -> list[float]:
    return [control.SCORES[finding](m) for m in control.measure_images(images)]


def _psnr(a, b) -> list[float]:
    return [float(v) for v in edit_lib.psnr(a, b)]


def _run_method(m: Method, sampler, params, x, src, tgt, *, steps, solver, guidance, mode,
                seed):
    """(edited, edited back, null edit) of ``x`` from ``src`` to ``tgt`` by method ``m``."""
    if m.kind == "flowedit":
        kw = dict(t0=m.t0, steps=steps, guidance=guidance, seed=seed)
        edited = edit_lib.flowedit(sampler, params, x, src, tgt, **kw)
        back = edit_lib.flowedit(sampler, params, edited, tgt, src, **kw)
        null = edit_lib.flowedit(sampler, params, x, src, src, **kw)
        return edited, back, null
    kw = dict(t0=m.t0, steps=steps, method=solver, guidance=guidance, mode=mode)
    res = edit_lib.edit(sampler, params, x, src, tgt, **kw)
    back = edit_lib.edit(sampler, params, res.edited, tgt, src, reconstruct=False, **kw).edited
    return res.edited, back, res.reconstruction


# ----------------------------------------------------------------------------- edits

def edits(cfg, sampler, params, *, num: int = 32, seed: int = 0, steps: int | None = None,
          solver: str = "heun", guidance=None, mode: str = "contrast",
          findings: Sequence[str] | None = None, methods: Sequence[str] | None = None,
          reference: bool = True, return_images: bool = False):
    """The edits evaluation of ``params`` (EMA parameters of a run with ``cfg``; ``sampler``
    a ``sample.Sampler`` of it, or None to build one). ``num`` patients per (finding,
    direction); ``findings`` a subset of ``FINDINGS``, ``methods`` of ``METHODS`` (default:
    all); ``steps`` (default: the run's ``sample.steps``) over [0, t0]; ``solver`` of the
    inversion methods; ``guidance`` (a ``sample.Guidance``, a number = that overall scale,
    None = the run's ``sample.cfg``/``sample.guidance``) of prediction (``mode``, see
    ``cxr_rf.edit``), of FlowEdit's two velocities and of the reference samples (ordinary
    CFG); ``reference=False`` skips the plain samples. Returns a JSON-ready dict:
    {"command", "settings", "demographics", "rows": [{"method", "finding", "direction",
    "t0", "effectiveness": {"auroc", "mean_change", "truth_mean_change", "scores": {...}},
    "identity": {"psnr_edit_truth", "psnr_original_truth", "psnr_sample_truth"},
    "reversibility": {"psnr"}, "composition": {"psnr"}, "seconds"}], "timing_s"} with every
    PSNR entry a ``metrics.summary`` ({"mean", "sd", "n", "nan"}) plus its "values"; with
    ``return_images`` also {(method, finding, direction): {"original", "edited", "truth"}}.
    """
    from cxr_rf import sample
    findings = list(dict.fromkeys(FINDINGS if findings is None else findings))
    methods = list(dict.fromkeys(METHODS if methods is None else methods))
    bad = [f for f in findings if f not in control.SCORES] + [m for m in methods
                                                               if m not in METHODS]
    if bad or not findings or not methods:
        raise errors.UserError(f"cannot evaluate {', '.join(map(repr, bad)) or 'nothing'}; "
                               f"findings: {', '.join(control.SCORES)}; methods: "
                               f"{', '.join(METHODS)}")
    num, seed = control.check_num_seed(num, seed)
    if sampler is None:
        sampler = sample.Sampler(cfg)
    s = cfg.sample
    steps = int(steps or s.steps)
    guidance = edit_lib._guidance(sampler, guidance)     # None: the run's; a number: a scale
    resolution = int(cfg.data.resolution)
    demos = control.demographics(num, seed)
    seeds = [seed + i for i in range(num)]
    t_start = time.perf_counter()
    rows, images, timing = [], {}, {"reference": 0.0, "measure": 0.0}
    for f in findings:
        for direction, start in DIRECTIONS.items():
            x, src = phantoms(f, start, demos, resolution)
            truth, _ = phantoms(f, not start, demos, resolution)
            tgt = [with_finding(c, f, not start) for c in src]
            t = time.perf_counter()
            s_orig, s_truth = _scores(f, x), _scores(f, truth)
            timing["measure"] += time.perf_counter() - t
            ref_psnr = None
            if reference:
                t = time.perf_counter()
                ref = sampler.generate(params, tgt, seeds, steps=steps, guidance=guidance)
                timing["reference"] += time.perf_counter() - t
                ref_psnr = _psnr(ref, truth)
            for name in methods:
                m = METHODS[name]
                t = time.perf_counter()
                edited, back, null = _run_method(m, sampler, params, x, src, tgt, steps=steps,
                                                 solver=solver, guidance=guidance, mode=mode,
                                                 seed=seed)
                seconds = time.perf_counter() - t
                t = time.perf_counter()
                s_edit = _scores(f, edited)
                timing["measure"] += time.perf_counter() - t
                up, down = (s_edit, s_orig) if not start else (s_orig, s_edit)
                change = np.asarray(s_edit) - np.asarray(s_orig)
                tchange = np.asarray(s_truth) - np.asarray(s_orig)
                rows.append({
                    "method": name, "kind": m.kind, "t0": m.t0, "finding": f,
                    "direction": direction, "score": control.SCORES[f].name,
                    "effectiveness": {
                        "auroc": metrics.auroc(up, down),
                        "mean_change": metrics.summary(change),
                        "truth_mean_change": metrics.summary(tchange),
                        "scores": {"original": s_orig, "edited": s_edit, "truth": s_truth}},
                    "identity": {
                        "psnr_edit_truth": _summary(_psnr(edited, truth)),
                        "psnr_original_truth": _summary(_psnr(x, truth)),
                        "psnr_sample_truth": None if ref_psnr is None else _summary(ref_psnr)},
                    "reversibility": {"psnr": _summary(_psnr(back, x))},
                    "composition": {"psnr": _summary(_psnr(null, x))},
                    "seconds": seconds,
                })
                if return_images:
                    images[name, f, direction] = {"original": x, "edited": edited,
                                                  "truth": truth}
    timing["total"] = time.perf_counter() - t_start
    result = {
        "command": "edits",
        "settings": {"num": num, "seed": seed, "steps": steps, "solver": solver,
                     "guidance": guidance.describe(), "mode": mode,
                     "abduct_cfg": edit_lib.ABDUCT_GUIDANCE, "resolution": resolution,
                     "measure_resolution": max(resolution, control.MEASURE_RESOLUTION),
                     "real_seed": REAL_SEED, "findings": findings,
                     "methods": {n: dataclasses.asdict(METHODS[n]) for n in methods},
                     "reference": reference, "psnr_cap_db": float(edit_lib.psnr(
                         np.zeros((1, 1)), np.zeros((1, 1)))[0])},
        "demographics": demos,
        "rows": rows,
        "timing_s": timing,
    }
    return (result, images) if return_images else result


def _summary(values: Sequence[float]) -> dict:
    return {**metrics.summary(values), "values": list(values)}


# ----------------------------------------------------------------------------- reports

def _num(x, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _ms(g: dict | None, digits: int = 1) -> str:
    if g is None:
        return "-"
    return f"{_num(g['mean'], digits)}±{_num(g['sd'], digits)}"


def table(result: dict) -> str:
    """The markdown table of an ``edits`` result (one row per method, finding, direction)."""
    s = result["settings"]
    g = s["guidance"]
    groups = "".join(f" ({k} {v:g})" for k, v in (g.get("groups") or {}).items())
    step = result.get("checkpoint_step")
    lines = [
        "# Edits: counterfactual editing measured against the true counterfactual phantom", "",
        f"{'checkpoint step ' + str(step) + ', ' if step is not None else ''}{s['num']} "
        f"phantom patients per finding and direction, {s['steps']} steps over [0, t0] "
        f"({s['solver']} for the inversion methods, Euler for FlowEdit), abduction CFG "
        f"{s['abduct_cfg']:g}, prediction {s['mode']} guidance CFG {g['cfg']:g}{groups}, seed "
        f"{s['seed']}, {s['resolution']} px (scores measured at {s['measure_resolution']} px). "
        "Effectiveness: AUROC of the finding's score, edited vs original (1 = every edit moved "
        "it the intended way), and the mean score change, edit (true counterfactual). "
        "Identity: PSNR (dB) to the true counterfactual of the edit / the original itself / a "
        "plain sample with the target conditions. Reversibility: edit and edit back, PSNR to "
        "the original. Composition: null edit, PSNR to the original "
        f"({s['psnr_cap_db']:.0f} dB = identical). Mean ± sd.", "",
        "| method | t0 | finding | edit | AUROC | Δ score edit (truth) | PSNR→truth edit "
        "| original | sample | reversibility | composition |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        e, i = r["effectiveness"], r["identity"]
        lines.append(
            f"| {r['method']} | {r['t0']:g} | {r['finding']} | {r['direction']} | "
            f"{_num(e['auroc'])} | {_num(e['mean_change']['mean'], 3)} "
            f"({_num(e['truth_mean_change']['mean'], 3)}) | {_ms(i['psnr_edit_truth'])} | "
            f"{_ms(i['psnr_original_truth'])} | {_ms(i['psnr_sample_truth'])} | "
            f"{_ms(r['reversibility']['psnr'])} | {_ms(r['composition']['psnr'])} |")
    return "\n".join(lines) + "\n"


def contact_sheet(images: dict, result: dict, patients: int = 1):
    """PIL image: per (method, finding, direction) of ``images`` (``edits(...,
    return_images=True)``), ``patients`` rows of original / edited / true counterfactual."""
    from cxr_rf import outputs
    tiles, labels = [], []
    for (name, f, d), g in images.items():
        for i in range(min(patients, len(g["original"]))):
            for key in ("original", "edited", "truth"):
                tiles.append(g[key][i])
                labels.append(f"{name} {f} {d} | {key} #{i}")
    return outputs.grid(tiles, labels, cols=3)
