"""Label and demographic marginals of a converted dataset, and their printed table.

Counts are plain nested dicts of ints (JSON-ready): per split, then merged into a total, with
the rejects of the conversion beside them. ``stats.json`` and ``stats.txt`` beside a dataset
are ``build`` and ``format_stats`` of the same numbers.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

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
          rejects: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The stats document: per-split counts, their total and (optionally) the rejects summary."""
    order = [s for s in ("train", "validation", "test") if s in splits]
    order += sorted(set(splits) - set(order))
    out = {"name": name, "resolution": int(resolution), "splits": {s: dict(splits[s]) for s in order},
           "total": merge(splits[s] for s in order)}
    if rejects is not None:
        out["rejects"] = dict(rejects)
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
    rejects = stats.get("rejects")
    if rejects is not None:
        lines += ["", f"rejected {rejects['count']} of {rejects['inputs']} inputs "
                      f"({100 * rejects['fraction']:.2f}%)"]
        for reason, n in list(rejects["reasons"].items())[:_TOP]:
            lines.append(f"{n:>10}  {reason}")
        if len(rejects["reasons"]) > _TOP:
            lines.append(f"{'':>10}  ... {len(rejects['reasons']) - _TOP} more reasons")
    return "\n".join(lines)
