"""Label and demographic marginals of a converted dataset, and their printed table.

Counts are plain nested dicts of ints (JSON-ready): per split, then merged into a total, with
the conversion's report beside them: ``rejects`` (unusable inputs; ``inputs`` and ``fraction``
leave the excluded out), ``excluded`` (inputs a source dropped on purpose) and ``flags``
(images converted with a noted property, e.g. ``burned_in_annotation``). ``excluded`` and
``flags`` are absent from older stats.json files; ``format_stats`` prints either. Reasons
never carry ids. ``stats.json`` and ``stats.txt`` beside a dataset are ``build`` and
``format_stats`` of the same numbers.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from etils import epath

from cxr_rf import conditioning as cond

# The Record fields the marginals are counted over (all but pixels, ids and report).
META_FIELDS = ("findings", "sex", "age", "race", "view", "source", "site")
_SPARSE = ("source", "site")  # open-ended values: only those seen are listed
_TOP = 10


def empty_counts() -> dict[str, Any]:
    """Zero counts over the full vocabulary (so every table has the same rows)."""
    return {
        "count": 0,
        "findings": {f: {s: 0 for s in cond.STATES} for f in cond.FINDINGS},
        "sex": {v: 0 for v in cond.SEXES},
        "age": {v: 0 for v in cond.AGE_BINS},
        "race": {v: 0 for v in cond.RACES},
        "view": {v: 0 for v in cond.VIEWS},
        "source": {},
        "site": {},
    }


def count(counts: dict[str, Any], meta: Mapping[str, Any]) -> None:
    """Add one record's ``META_FIELDS`` (a mapping) to ``counts`` in place."""
    counts["count"] += 1
    for f, s in zip(cond.FINDINGS, meta["findings"]):
        counts["findings"][f][cond.STATES[int(s)]] += 1
    counts["age"][cond.AGE_BINS[cond.age_bin(meta["age"])]] += 1
    for key in ("sex", "race", "view", "source", "site"):
        value = meta[key] or "unknown"
        counts[key][value] = counts[key].get(value, 0) + 1


def merge(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum of several ``empty_counts``-shaped dicts."""
    total = empty_counts()
    for part in parts:
        total["count"] += part["count"]
        for f, states in part["findings"].items():
            for s, n in states.items():
                total["findings"][f][s] += n
        for key in ("sex", "age", "race", "view", "source", "site"):
            for v, n in part[key].items():
                total[key][v] = total[key].get(v, 0) + n
    return total


def build(name: str, resolution: int, splits: Mapping[str, Mapping[str, Any]],
          rejects: Mapping[str, Any] | None = None, excluded: Mapping[str, Any] | None = None,
          flags: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The stats document: per-split counts, their total and (optionally) the rejects summary,
    the excluded summary (``summarize_excluded``) and the flag counts."""
    order = [s for s in ("train", "validation", "test") if s in splits]
    order += sorted(set(splits) - set(order))
    out = {"name": name, "resolution": int(resolution), "splits": {s: dict(splits[s]) for s in order},
           "total": merge(splits[s] for s in order)}
    if rejects is not None:
        out["rejects"] = dict(rejects)
    if excluded is not None:
        out["excluded"] = dict(excluded)
    if flags is not None:
        out["flags"] = dict(sorted(flags.items()))
    return out


def summarize_rejects(reasons: Iterable[str], inputs: int) -> dict[str, Any]:
    """{count, inputs, fraction, reasons: {reason: n}} with reasons most frequent first."""
    tally: dict[str, int] = {}
    for r in reasons:
        tally[r] = tally.get(r, 0) + 1
    n = sum(tally.values())
    ordered = dict(sorted(tally.items(), key=lambda kv: (-kv[1], kv[0])))
    return {"count": n, "inputs": int(inputs), "fraction": n / inputs if inputs else 0.0,
            "reasons": ordered}


def summarize_excluded(reasons: Iterable[str]) -> dict[str, Any]:
    """{count, reasons: {reason: n}} of the inputs sources dropped on purpose."""
    tally = summarize_rejects(reasons, 0)
    return {"count": tally["count"], "reasons": tally["reasons"]}


def _reasons(tally: Mapping[str, int]) -> list[str]:
    lines = [f"{n:>10}  {reason}" for reason, n in list(tally.items())[:_TOP]]
    if len(tally) > _TOP:
        lines.append(f"{'':>10}  ... {len(tally) - _TOP} more reasons")
    return lines


def format_stats(stats: Mapping[str, Any]) -> str:
    """Human-readable table: split x source sizes, per-finding states, demographics, rejects."""
    splits = stats["splits"]
    total = stats["total"]
    sources = [s for s, n in sorted(total["source"].items(), key=lambda kv: -kv[1]) if n]
    lines = [f"{'split':<14}{'examples':>10}" + "".join(f"{s:>15}" for s in sources)]
    for split, counts in list(splits.items()) + [("total", total)]:
        lines.append(f"{split:<14}{counts['count']:>10}"
                     + "".join(f"{counts['source'].get(s, 0):>15}" for s in sources))
    lines.append("")
    states = ("positive", "negative", "uncertain", "unmentioned")
    lines.append(f"{'finding':<28}" + "".join(f"{s:>12}" for s in states))
    for f in cond.FINDINGS:
        lines.append(f"{f:<28}" + "".join(f"{total['findings'][f][s]:>12}" for s in states))
    lines.append("")
    for key in ("sex", "age", "race", "view", "source", "site"):
        items = list(total[key].items())
        if key in _SPARSE:
            items = [(v, n) for v, n in sorted(items, key=lambda kv: -kv[1]) if n]
        shown = " | ".join(f"{v} {n}" for v, n in items[:_TOP])
        more = f" | ... {len(items) - _TOP} more" if len(items) > _TOP else ""
        lines.append(f"{key + ':':<8}{shown}{more}")
    flags = stats.get("flags")
    if flags:
        lines.append(f"{'flags:':<8}" + " | ".join(f"{k} {n}" for k, n in flags.items()))
    rejects = stats.get("rejects")
    if rejects is not None:
        lines += ["", f"rejected {rejects['count']} of {rejects['inputs']} inputs "
                      f"({100 * rejects['fraction']:.2f}%)"]
        lines += _reasons(rejects["reasons"])
    excluded = stats.get("excluded")
    if excluded is not None and excluded["count"]:
        lines += ["", f"excluded {excluded['count']} inputs on purpose (not counted as rejected)"]
        lines += _reasons(excluded["reasons"])
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# What a run trained on: the sampler's defaults and warnings.
# --------------------------------------------------------------------------------------------

def training_marginals(sources: Iterable[tuple[str, float]]) -> dict[str, Any] | None:
    """Train-split marginals of a run's data as fractions, ``{"findings": {name: {state:
    p}}, "sex": {value: p}, "age": {bin: p}, ...}``, each source weighted by its mixture
    weight; None when a source has no ``stats.json`` (nothing to compare against)."""
    out: dict[str, Any] = {"findings": {f: {s: 0.0 for s in cond.STATES} for f in cond.FINDINGS}}
    sources = list(sources)
    total = sum(w for _, w in sources)
    for d, weight in sources:
        weight = weight / total
        path = epath.Path(d) / "stats.json"
        if not path.exists():
            return None
        doc = json.loads(path.read_text())
        counts = doc["splits"].get("train", doc["total"])
        n = max(counts["count"], 1)
        for f, states in counts["findings"].items():
            for s, k in states.items():
                out["findings"][f][s] += weight * k / n
        for key in ("sex", "age", "race", "view", "source"):
            for v, k in counts[key].items():
                out.setdefault(key, {})
                out[key][v] = out[key].get(v, 0.0) + weight * k / n
    return out


def unlisted_defaults(marginals: Mapping[str, Any]) -> dict[str, int]:
    """The state code an unlisted finding takes when sampling: its most common state in the
    training data (negative on the phantom, unmentioned on CheXpert-style corpora). For "No
    Finding", the most common state other than positive (it is positive only when nothing
    else is, which ``Conditions.parse`` decides)."""
    out = {}
    for f, states in marginals["findings"].items():
        ranked = sorted(states.items(), key=lambda kv: -kv[1])
        if f == "No Finding":
            ranked = [kv for kv in ranked if kv[0] != "positive"]
        out[f] = cond.STATES.index(ranked[0][0])
    return out


def unseen(requested: Mapping[str, Iterable[str]], marginals: Mapping[str, Any]) -> list[str]:
    """The requested values (``Conditions.requested()``) that never occur in the training
    data, as "group=value" / "Finding=state": the model has not learnt them."""
    out = []
    for group, values in requested.items():
        for value in values:
            if group == "findings":
                name, _, state = value.partition("=")
                seen = marginals["findings"].get(name, {}).get(state, 0.0)
            else:
                seen = marginals.get(group, {}).get(value, 0.0)
            if not seen > 0:
                out.append(value if group == "findings" else f"{group}={value}")
    return out
