"""Conditional accuracy: does a classifier read in the samples the findings they were asked for?

The model-independent twin of ``control``: for each finding, N seeds with matched demographics
(``control.demographics``) are sampled with the finding ``=positive`` and ``=negative``
(``control.paired_requests``: same noise, other findings at the run's unlisted defaults), and
the classifier's probability for that finding separates the two groups with an AUROC and a
95% bootstrap interval. Beside it, the ceiling: the same classifier's AUROC on real images of a
reference set, rows with the finding positive against rows with it negative. It works on any
data (not only the phantom), and a sample AUROC near the real one means the model draws the
finding as clearly as real radiographs show it — to the classifier.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from cxr_rf import conditioning as cond
from cxr_rf import errors, metrics
from cxr_rf.evaluation import control as control_lib
from cxr_rf.evaluation.sets import ImageSet

BOOTSTRAP = 1000


def _auroc_entry(pos, neg, seed: int) -> dict:
    lo, hi = metrics.bootstrap_ci(pos, neg, n=BOOTSTRAP, seed=seed)
    return {"auroc": metrics.auroc(pos, neg), "ci95": [lo, hi], "n_pos": len(pos),
            "n_neg": len(neg), "mean_pos": float(np.mean(pos)) if len(pos) else None,
            "mean_neg": float(np.mean(neg)) if len(neg) else None}


def real_ceiling(classifier, real: ImageSet, findings: Sequence[str], *, batch_size: int = 64,
                 seed: int = 0) -> dict:
    """{finding: AUROC entry} of the classifier on ``real``: positive vs negative rows
    (uncertain and unmentioned rows left out); None where a class is missing."""
    probs = np.concatenate([classifier.predict(x) for _, x in real.batches(batch_size)])
    f_NxF = real.findings()
    out = {}
    for f in findings:
        j = cond.FINDINGS.index(f)
        pos, neg = probs[f_NxF[:, j] == cond.POSITIVE, j], probs[f_NxF[:, j] == cond.NEGATIVE, j]
        out[f] = _auroc_entry(pos, neg, seed) if len(pos) and len(neg) else None
    return out


def conditional(cfg, sampler, params, classifier, *, num: int = 32,
                findings: Sequence[str] | None = None, seed: int = 0,
                unlisted: dict[str, int] | None = None, real: ImageSet | None = None,
                **generate_kwargs) -> dict:
    """The conditional accuracy of a run (``sampler``/``params``) read by ``classifier``
    (``cxr_rf.features.classifier``): {"settings", "findings": {f: {"samples": entry,
    "real": entry | None}}, "timing_s"}; entries are {"auroc", "ci95", "n_pos", "n_neg",
    "mean_pos", "mean_neg"}. ``findings`` default: every finding but "No Finding"."""
    findings = list(findings or [f for f in cond.FINDINGS if f != "No Finding"])
    bad = [f for f in findings if f not in cond.FINDINGS]
    if bad:
        raise errors.UserError(f"unknown findings {bad}; choose from {', '.join(cond.FINDINGS)}")
    if num < 2:
        raise errors.UserError(f"num must be >= 2 (two groups of num images), got {num}")
    demos = control_lib.demographics(num, seed)
    seeds = [seed + i for i in range(num)]
    conds, req_seeds, where = control_lib.paired_requests(findings, demos, seeds, unlisted,
                                                          cfg.data.report_len)
    t0 = time.perf_counter()
    images = sampler.generate(params, conds, req_seeds, **generate_kwargs)
    t1 = time.perf_counter()
    x01 = np.clip((images + 1.0) * 0.5, 0.0, 1.0).astype(np.float32)
    probs = np.concatenate([classifier.predict(x01[s:s + 64]) for s in range(0, len(x01), 64)])
    ceiling = real_ceiling(classifier, real, findings, seed=seed) if real is not None else {}
    out = {}
    for f in findings:
        j = cond.FINDINGS.index(f)
        out[f] = {"samples": _auroc_entry(probs[where[f, True], j], probs[where[f, False], j], seed),
                  "real": ceiling.get(f)}
    return {"settings": {"num": num, "seed": seed, "images_sampled": len(conds),
                         "classifier": getattr(classifier, "path", None),
                         "real": real.name if real is not None else None},
            "findings": out,
            "timing_s": {"sample": t1 - t0, "classify": time.perf_counter() - t1}}


def table(result: dict) -> str:
    """Markdown: one row per finding."""
    def cell(e):
        if e is None:
            return "-"
        lo, hi = e["ci95"]
        a = e["auroc"]
        return ("n/a" if a is None or not np.isfinite(a)
                else f"{a:.2f} [{lo:.2f}, {hi:.2f}]" if lo is not None and np.isfinite(lo)
                else f"{a:.2f}")
    lines = ["| finding | AUROC samples [95% CI] | AUROC real | n real pos/neg |", "|---|---|---|---|"]
    for f, e in result["findings"].items():
        r = e["real"]
        lines.append(f"| {f} | {cell(e['samples'])} | {cell(r)} | "
                     f"{'-' if r is None else str(r['n_pos']) + '/' + str(r['n_neg'])} |")
    return "\n".join(lines) + "\n"
