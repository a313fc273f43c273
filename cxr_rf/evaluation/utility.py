"""Utility of synthetic images, CheXGenBench-style: does a classifier trained on them work on
real radiographs?

Three classifiers (``cxr_rf.features.classifier``), one recipe (architecture, steps, batch,
learning rate, seed), differing only in their training set:

    real             the real training images
    synthetic        images generated for the same metadata (their conditions are the labels)
    real+synthetic   both, concatenated

each tested on the held-out real ``test`` set: AUROC per finding with a 95% bootstrap
interval, the macro AUROC over the findings that could be scored, and subgroup gaps (macro
AUROC per sex / age band / race / view / source value, and the max - min gap over the groups
with at least ``min_group`` images).

Labels follow the classifier's rule (``classifier.targets``): positive vs negative, with
unmentioned (and a generated image's unspecified findings) left out of both training and
scoring, and uncertain per ``uncertain``.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from cxr_rf import conditioning as cond
from cxr_rf import errors
from cxr_rf.evaluation.sets import SUBGROUPS, ConcatSet, ImageSet, group_value
from cxr_rf.features import classifier as clf_mod

MODELS = ("real", "synthetic", "real+synthetic")


def _macro(per_finding: dict) -> float | None:
    scored = [v["auroc"] for v in per_finding.values() if v["auroc"] is not None]
    return float(np.mean(scored)) if scored else None


def score(probs_NxF: np.ndarray, test: ImageSet, *, uncertain: str = "ignore",
          n_boot: int = 1000, seed: int = 0, min_group: int = 20) -> dict:
    """One classifier's test report (the per-model dict of ``utility``'s schema)."""
    codes = test.findings()
    per = clf_mod.finding_aurocs(probs_NxF, codes, uncertain, ci=n_boot, seed=seed)
    out: dict[str, Any] = {"auroc": per, "macro_auroc": _macro(per),
                           "n_scored": sum(v["auroc"] is not None for v in per.values())}
    subgroups = {}
    for attr in SUBGROUPS:
        values = np.array([group_value(m, attr) or "unspecified" for m in test.metas])
        groups = {}
        for g in sorted(set(values.tolist())):
            sel = values == g
            sub = clf_mod.finding_aurocs(probs_NxF[sel], codes[sel], uncertain)
            groups[g] = {"n": int(sel.sum()), "macro_auroc": _macro(sub)}
        eligible = {g: v["macro_auroc"] for g, v in groups.items()
                    if v["n"] >= min_group and v["macro_auroc"] is not None}
        entry: dict[str, Any] = {"groups": groups, "min_count": int(min_group)}
        if len(eligible) >= 2:
            lo, hi = min(eligible, key=eligible.get), max(eligible, key=eligible.get)
            entry.update(gap=float(eligible[hi] - eligible[lo]), best=hi, worst=lo)
        else:
            entry.update(gap=None, best=None, worst=None,
                         reason=f"fewer than 2 groups with >= {min_group} images and a macro AUROC")
        subgroups[attr] = entry
    out["subgroups"] = subgroups
    return out


def utility(real_train: ImageSet, synthetic: ImageSet, test: ImageSet, *, steps: int = 600,
            batch_size: int = 64, seed: int = 0, lr: float = 2e-3, resolution: int | None = None,
            uncertain: str = "ignore", widths: Sequence[int] = (32, 64, 128, 256),
            n_boot: int = 1000, min_group: int = 20, devices=None, out_dir: str | None = None,
            progress: bool = True) -> dict:
    """Train on real, synthetic and real+synthetic with one recipe; test each on ``test``.

    ``resolution`` None: the real training set's resolution, at most 128. ``out_dir``: where
    to keep the three classifiers (``out_dir/<model>/``, loadable with ``classifier.load``);
    None keeps them in memory only.

    Returns (JSON-friendly; floats, ints, str, None)::

        {"findings": [14 names], "uncertain": str, "n_boot": int,
         "recipe": {"steps", "batch_size", "lr", "seed", "resolution", "widths"},
         "sets": {"real": {"name", "n"}, "synthetic": {...}, "real+synthetic": {...},
                  "test": {...}},
         "models": {"real" | "synthetic" | "real+synthetic": {
             "auroc": {finding: {"auroc": float, "ci95": [lo, hi], "n_pos", "n_neg"}
                       | {"auroc": None, "ci95": None, "n_pos", "n_neg", "reason": str}},
             "macro_auroc": float | None,   # mean over the scored findings
             "n_scored": int,
             "subgroups": {"sex" | "age" | "race" | "view" | "source": {
                 "groups": {value: {"n": int, "macro_auroc": float | None}},
                 "min_count": int,
                 "gap": float | None, "best": value | None, "worst": value | None
                 [, "reason": str when gap is None]}}}}}
    """
    clf_mod.check_uncertain(uncertain)
    for what, s in (("real training set", real_train), ("synthetic set", synthetic),
                    ("test set", test)):
        if len(s) == 0:
            raise errors.UserError(f"utility: the {what} {getattr(s, 'name', '')!r} is empty")
    res = int(resolution or min(128, real_train.resolution))
    both = ConcatSet([real_train, synthetic], name="real+synthetic")
    train_sets = {"real": real_train, "synthetic": synthetic, "real+synthetic": both}
    report: dict[str, Any] = {
        "findings": list(cond.FINDINGS), "uncertain": uncertain, "n_boot": int(n_boot),
        "recipe": {"steps": int(steps), "batch_size": int(batch_size), "lr": float(lr),
                   "seed": int(seed), "resolution": res, "widths": [int(w) for w in widths]},
        "sets": {k: {"name": str(getattr(s, "name", "")), "n": len(s)}
                 for k, s in {**train_sets, "test": test}.items()},
        "models": {},
    }
    for key, s in train_sets.items():
        if progress:
            print(f"utility: training on {key} ({len(s)} images)", flush=True)
        model = clf_mod.train(s, out_dir=None if out_dir is None else os.path.join(out_dir, key),
                              steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                              resolution=res, uncertain=uncertain, widths=widths,
                              devices=devices, progress=progress)
        probs = model.predict_set(test)
        report["models"][key] = score(probs, test, uncertain=uncertain, n_boot=n_boot,
                                      seed=seed, min_group=min_group)
        if progress:
            m = report["models"][key]["macro_auroc"]
            print(f"utility: {key}: macro AUROC on {test.name} "
                  f"{'n/a' if m is None else f'{m:.3f}'}", flush=True)
    return report
