"""metrics.json of ``evaluate all`` -> report.md, PNG plots and a self-contained report.html.

The report is a list of blocks (heading, paragraph, table, image) built once from the metrics
and rendered twice: as Markdown (images linked, next to the PNGs) and as HTML with every image
inlined (base64), so report.html opens anywhere on its own. Plots (``plots/``):

    conditional.png               per finding: classifier AUROC on samples vs on real images
    fidelity_findings_SPACE.png   per finding: FD of samples conditioned positive vs real positives
    fidelity_subgroups_SPACE.png  per subgroup attribute: FD per value with its interval and counts
    utility.png                   per finding: AUROC of classifiers trained on real/synthetic/both
    samples.png                   generated images beside random real ones

The privacy section brings its own PNGs (closest pairs, distance histograms); the control
section its contact sheet.
"""
from __future__ import annotations

import base64
import html
import math
import os
from typing import Any

import numpy as np

Block = tuple


def _n(x, d: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if x != 0 and (abs(x) >= 1000 or abs(x) < 0.01):
        return f"{x:.{max(d, 2)}g}"          # KD is ~1e-4..1e-2: keep its digits
    return f"{x:.{d}f}"


def _ci(e: dict | None, key: str = "auroc", d: int = 2) -> str:
    if not e or e.get(key) is None:
        return "-"
    ci = e.get("ci95") if key == "auroc" else e.get("fd_ci95")
    if ci and None not in ci:
        return f"{_n(e[key], d)} [{_n(ci[0], d)}, {_n(ci[1], d)}]"
    return _n(e[key], d)


# ----------------------------------------------------------------------------- plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _bars(path: str, labels: list[str], series: dict[str, tuple[list, list]], ylabel: str,
          title: str, hline: float | None = None) -> str:
    """Grouped horizontal-label bars: series {name: (values, (lo, hi) errors or None)}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(labels) + 2), 4))
    x = np.arange(len(labels))
    w = 0.8 / max(len(series), 1)
    for k, (name, (vals, errs)) in enumerate(series.items()):
        v = np.array([np.nan if a is None else a for a in vals], float)
        yerr = None
        if errs is not None:
            lo = np.array([np.nan if e is None or e[0] is None else e[0] for e in errs], float)
            hi = np.array([np.nan if e is None or e[1] is None else e[1] for e in errs], float)
            yerr = np.nan_to_num(np.stack([v - lo, hi - v]).clip(0))
        ax.bar(x + (k - (len(series) - 1) / 2) * w, np.nan_to_num(v), w, yerr=yerr, label=name,
               capsize=2)
    if hline is not None:
        ax.axhline(hline, color="gray", lw=0.8, ls="--")
    ax.set_xticks(x, labels, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _subgroup_plot(path: str, groups: dict, space: str) -> str | None:
    plt = _plt()
    attrs = [a for a, g in groups.items() if any("fd" in e for e in g.values())]
    if not attrs:
        return None
    fig, axes = plt.subplots(1, len(attrs), figsize=(3.2 * len(attrs), 3.6), squeeze=False)
    for ax, a in zip(axes[0], attrs):
        vals = [(v, e) for v, e in groups[a].items() if "fd" in e]
        y = np.array([e["fd"] for _, e in vals])
        err = None
        if all(e.get("fd_ci95") for _, e in vals):
            err = np.stack([y - [e["fd_ci95"][0] for _, e in vals],
                            [e["fd_ci95"][1] for _, e in vals] - y]).clip(0)
        ax.bar(range(len(vals)), y, yerr=err, capsize=2, color="tab:blue")
        ax.set_xticks(range(len(vals)), [f"{v}\n{e['n_real']}/{e['n_fake']}" for v, e in vals],
                      fontsize=7)
        ax.set_title(a, fontsize=9)
    axes[0][0].set_ylabel(f"FD ({space})")
    fig.suptitle("FD per subgroup (labels: value, n real / n generated)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def samples_png(path: str, generated, real, n: int = 8) -> str:
    """Row 1: the first ``n`` generated images; row 2: ``n`` real ones (evaluation sets)."""
    from cxr_rf import outputs
    k = min(n, len(generated), len(real))
    g = generated.images(range(k)) * 2 - 1
    r = real.images(range(k)) * 2 - 1
    labels = [f"generated {i}" for i in range(k)] + [f"real {i}" for i in range(k)]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    outputs.grid(list(g) + list(r), labels, cols=k).save(path, format="PNG")
    return path


# ----------------------------------------------------------------------------- blocks

def blocks(m: dict, out: str) -> list[Block]:
    """The report of metrics ``m`` as blocks; plots are written into ``out/plots``."""
    plots = os.path.join(out, "plots")
    rel = lambda p: os.path.relpath(p, out)   # noqa: E731
    b: list[Block] = [("h1", "Evaluation report")]
    who = (f"run `{m['workdir']}` (checkpoint step {m.get('checkpoint_step')})" if m.get("workdir")
           else f"samples `{m.get('samples')}`")
    b.append(("p", f"{who} against `{m['reference']}` (split `{m['split']}`), protocol "
                   f"`{m['protocol']}`, seed {m['seed']}. Timing: " + ", ".join(
                       f"{k} {v:.0f} s" for k, v in m.get("timing_s", {}).items()) + "."))
    s = m["sections"]
    if "samples_png" in m:
        b.append(("img", rel(m["samples_png"]), "Generated (top) and real (bottom) images"))

    if "control" in s:
        c = s["control"]
        b.append(("h2", "Control: analytic measurements on the phantom"))
        b.append(("p", "AUROC of the phantom measurement, samples asked for the finding vs its "
                       "absence (matched noise and demographics); 'real': real phantoms, the ceiling."))
        b.append(("table", ["finding", "score", "AUROC samples [95% CI]", "AUROC real"],
                  [[f, e["score"], _ci(e["samples"]), _ci(e.get("real"))]
                   for f, e in c["findings"].items()]))

    if "edits" in s:
        e = s["edits"]
        b.append(("h2", "Counterfactual edits against the true counterfactual phantom"))
        b.append(("p", "Effectiveness: AUROC of the finding's measurement, edited vs original, and "
                       "its mean change (the true counterfactual's in brackets). Identity: PSNR "
                       "(dB) to the true counterfactual of the edit / of the original / of a plain "
                       "sample. Reversibility: edit and back, PSNR to the original. Composition: "
                       "null edit, PSNR to the original."))
        ms = lambda x: _n((x or {}).get("mean"), 1)   # noqa: E731
        b.append(("table", ["method", "t0", "finding", "edit", "AUROC", "Δ score (truth)",
                            "PSNR→truth edit", "original", "sample", "reversibility", "composition"],
                  [[r["method"], f"{r['t0']:g}", r["finding"], r["direction"],
                    _n(r["effectiveness"]["auroc"], 2),
                    f"{_n(r['effectiveness']['mean_change']['mean'])} "
                    f"({_n(r['effectiveness']['truth_mean_change']['mean'])})",
                    ms(r["identity"]["psnr_edit_truth"]), ms(r["identity"]["psnr_original_truth"]),
                    ms(r["identity"]["psnr_sample_truth"]), ms(r["reversibility"]["psnr"]),
                    ms(r["composition"]["psnr"])] for r in e["rows"]]))

    if "conditional" in s:
        c = s["conditional"]
        b.append(("h2", "Conditional accuracy (classifier)"))
        b.append(("p", f"The classifier's probability for each finding on {c['settings']['num']} "
                       f"samples asked for it vs {c['settings']['num']} asked for its absence; "
                       f"'real': the same classifier on real positives vs negatives."))
        rows = [[f, _ci(e["samples"]), _ci(e["real"]),
                 "-" if not e["real"] else f"{e['real']['n_pos']}/{e['real']['n_neg']}"]
                for f, e in c["findings"].items()]
        b.append(("table", ["finding", "AUROC samples [95% CI]", "AUROC real", "real pos/neg"], rows))
        fs = list(c["findings"])
        p = _bars(os.path.join(plots, "conditional.png"), fs, {
            "samples": ([c["findings"][f]["samples"]["auroc"] for f in fs],
                        [c["findings"][f]["samples"]["ci95"] for f in fs]),
            "real": ([(c["findings"][f]["real"] or {}).get("auroc") for f in fs], None)},
            "AUROC", "Conditional accuracy per finding", hline=0.5)
        b.append(("img", rel(p), "Classifier AUROC per finding: samples vs real"))

    for space, f in s.get("fidelity", {}).items():
        o = f["overall"]
        b.append(("h2", f"Fidelity in {space} space ({f['protocol']} protocol)"))
        b.append(("p", f"{f['n_real']} real ({f['real']}) vs {f['n_fake']} generated ({f['fake']}), "
                       f"D = {f['dim']}. FD interval: ± 1.96 bootstrap standard errors "
                       f"({f['settings']['bootstrap']} Poisson replicates). FD grows as N shrinks: "
                       f"compare numbers at equal N."))
        b.append(("table", ["FD [95% CI]", "KD (mean ± sd)", "precision", "recall", "density",
                            "coverage"],
                  [[_ci(o, "fd", 4), f"{_n(o['kd']['mean'], 3)} ± {_n(o['kd']['sd'], 2)}",
                    _n(o["prdc"]["precision"]), _n(o["prdc"]["recall"]), _n(o["prdc"]["density"]),
                    _n(o["prdc"]["coverage"])]]))
        scored = {k: e for k, e in f["findings"].items() if "fd" in e}
        if scored:
            b.append(("table", ["finding", "n real / generated", "FD [95% CI]", "KD"],
                      [[k, f"{e['n_real']}/{e['n_fake']}", _ci(e, "fd", 4), _n(e["kd"]["mean"], 3)]
                       for k, e in scored.items()]))
            p = _bars(os.path.join(plots, f"fidelity_findings_{space}.png"), list(scored),
                      {"FD": ([e["fd"] for e in scored.values()],
                              [e.get("fd_ci95") for e in scored.values()])},
                      "FD", f"FD per finding (positives), {space}")
            b.append(("img", rel(p), f"FD per finding, {space}"))
        rows = [[a, v, f"{e['n_real']}/{e['n_fake']}", _ci(e, "fd", 4) if "fd" in e else e["skipped"]]
                for a, g in f["subgroups"].items() for v, e in g.items()]
        b.append(("table", ["attribute", "value", "n real / generated", "FD [95% CI]"], rows))
        p = _subgroup_plot(os.path.join(plots, f"fidelity_subgroups_{space}.png"), f["subgroups"], space)
        if p:
            b.append(("img", rel(p), f"FD per subgroup, {space}"))

    if "privacy" in s:
        pv = s["privacy"]
        b.append(("h2", "Privacy: distance to the nearest training image"))
        b.append(("p", "τ = the 1st percentile of held-out real images' nearest-training distances; "
                       "copy rate = samples closer than τ (Wilson 95%); flagged when its lower bound "
                       "exceeds 2 × 1%. AUROC < 0.5: samples sit closer to training images than unseen "
                       "real images do. Controls: perturbed training copies (must be flagged) and one "
                       "held-out half against the other (must not)."))
        rows = []
        for label, key in (("samples", "samples"), ("control: perturbed training copies",
                                                    "control_copies"),
                           ("control: held-out real", "control_heldout")):
            for space, r in pv.get(key, {}).get("spaces", {}).items():
                cr = r["copy_rate"]
                rows.append([label, space, _n(r["threshold"], 4),
                             f"{cr['rate']:.3f} [{cr['lo']:.3f}, {cr['hi']:.3f}]",
                             _n(r["auroc"], 2), _n(r["samples_nearest"]["median"], 4),
                             _n(r["heldout_nearest"]["median"], 4),
                             "-" if not r.get("prompt") else _n(r["prompt"]["median"], 4),
                             "YES" if r["flagged"] else "no"])
        b.append(("table", ["set", "space", "τ", "copy rate [95% CI]", "AUROC", "median NN",
                            "median NN held-out", "median to prompt image", "flagged"], rows))
        for space, r in pv.get("samples", {}).get("spaces", {}).items():
            for kind, cap in (("histogram", "distance distributions"), ("pairs", "closest pairs")):
                if (r.get("pngs") or {}).get(kind):
                    b.append(("img", rel(r["pngs"][kind]), f"{space}: {cap}"))

    if "utility" in s:
        u = s["utility"]
        b.append(("h2", "Utility: classifiers trained on real, synthetic and both"))
        b.append(("p", "Each trained with the same recipe and steps, tested on held-out real images; "
                       "AUROC per finding [95% bootstrap CI]."))
        arms = [a for a in ("real", "synthetic", "real+synthetic") if a in u.get("models", {})]
        fs = [f for f in u.get("findings", []) if any(
            (u["models"][a]["auroc"].get(f) or {}).get("auroc") is not None for a in arms)]
        rows = [[f] + [_ci(u["models"][a]["auroc"].get(f)) for a in arms] for f in fs]
        rows.append(["macro"] + [_n(u["models"][a].get("macro_auroc"), 3) for a in arms])
        b.append(("table", ["finding"] + [f"trained on {a}" for a in arms], rows))
        gaps = [[a, attr, _n(g.get("gap"), 3) if g.get("gap") is not None else g.get("reason", "-"),
                 ", ".join(f"{v}: {_n(x.get('macro_auroc'), 2)} (n={x.get('n')})"
                           for v, x in g.get("groups", {}).items())]
                for a in arms for attr, g in u["models"][a].get("subgroups", {}).items()]
        if gaps:
            b.append(("table", ["trained on", "attribute", "macro-AUROC gap", "per group"], gaps))
        if fs:
            p = _bars(os.path.join(plots, "utility.png"), fs,
                      {a: ([(u["models"][a]["auroc"].get(f) or {}).get("auroc") for f in fs],
                           [(u["models"][a]["auroc"].get(f) or {}).get("ci95") for f in fs])
                       for a in arms}, "AUROC on held-out real", "Utility per finding", hline=0.5)
            b.append(("img", rel(p), "Utility: AUROC per finding by training set"))
    return b


# ----------------------------------------------------------------------------- render

def to_markdown(bs: list[Block]) -> str:
    out = []
    for b in bs:
        if b[0] == "h1":
            out.append(f"# {b[1]}\n")
        elif b[0] == "h2":
            out.append(f"## {b[1]}\n")
        elif b[0] == "p":
            out.append(b[1] + "\n")
        elif b[0] == "table":
            head, rows = b[1], b[2]
            out.append("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
            out.extend("| " + " | ".join(str(c) for c in r) + " |" for r in rows)
            out.append("")
        elif b[0] == "img":
            out.append(f"![{b[2]}]({b[1]})\n")
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
        "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px "
        "solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}img{max-width:100%;"
        "border:1px solid #ddd}figure{margin:1em 0}figcaption{font-size:0.85em;color:#555}"
        "code{background:#f3f3f3;padding:0 3px}")


def _inline(text: str) -> str:
    """Escape, then `code` spans."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def to_html(bs: list[Block], out: str) -> str:
    body = []
    for b in bs:
        if b[0] in ("h1", "h2"):
            body.append(f"<{b[0]}>{_inline(b[1])}</{b[0]}>")
        elif b[0] == "p":
            body.append(f"<p>{_inline(b[1])}</p>")
        elif b[0] == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in r) + "</tr>"
                           for r in b[2])
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif b[0] == "img":
            with open(os.path.join(out, b[1]), "rb") as f:
                data = base64.b64encode(f.read()).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b[2])}">'
                        f"<figcaption>{_inline(b[2])}</figcaption></figure>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>cxr_rf evaluation</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def write(metrics: dict[str, Any], out) -> list[Block]:
    """report.md, report.html and plots/ of ``metrics`` into ``out``."""
    out = os.fspath(out)
    bs = blocks(metrics, out)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(to_markdown(bs))
    with open(os.path.join(out, "report.html"), "w") as f:
        f.write(to_html(bs, out))
    return bs
