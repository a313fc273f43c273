"""Look at a converted dataset before training on it: counts, labels, pictures, pixel checks.

    python -m cxr_rf.data.inspect DIR [--out DIR/inspect] [--per_source 16] [--sample 256] \
        [--seed 0]

Two passes over the dataset; pixels in memory are at most one source's sampled images (plus
the thumbnails of the sheets):

1. every record of every split, metadata only (``schema.from_example(decode=False)``, read in
   chunks): per-split counts in the ``stats`` shape (``stats.count``), per-source counts by
   split and site, ages; they are compared with ``stats.json`` beside the dataset. Meanwhile
   a seeded reservoir keeps the positions of ``max(--sample, --per_source)`` uniformly random
   records per source (positions only, no pixels).
2. those records, decoded: per-image pixel measures (``image_measures``), pooled and per-image
   intensity histograms, and a contact sheet of ``--per_source`` of them.

Writes into ``--out`` (default ``DIR/inspect``), created only once everything was read:

    report.txt            what is also printed: tables, per-source pixel summary and flags
    inspect.json          the numbers (``inspect_dataset``'s return value)
    contact_<source>.png  labelled sheet: split, site, view | sex, age | positive findings
    histograms.png        per source: each sampled image's histogram (thin) and the pooled one

Flags (``source_flags``; thresholds in ``THRESHOLDS``) are hints that a converter or a source
mis-decoded pixels, measured on the images scaled to [0, 1] (value / 65535):

    dark / bright  the source's median image mean is below DARK_MEAN (above BRIGHT_MEAN), or,
                   when there are 2+ other sources, more than MEAN_GAP below (above) the
                   median of their medians.
    inverted       more than INVERTED_FRACTION of the images have a border band (outer 1/8)
                   brighter than their centre (central half) by BORDER_MARGIN: in MONOCHROME2
                   the periphery (air, padding) is darker than the thorax; an inverted
                   MONOCHROME1 film is the other way round.
    clipped        the median image has more than CLIP_HIGH of its pixels at its maximum value,
                   or more than CLIP_LOW at its minimum (looser: padding and air are black).
    wrapped        more than WRAPPED_FRACTION of the images are wrap-like: their 4-neighbour
                   steps from >= WRAP_HIGH straight to <= WRAP_LOW of the full range (the dark
                   side not the image's minimum, so padding and black shutters do not count)
                   add up to WRAP_STEPS x (H + W) or more. Values that overflowed 16 bits (or
                   a signed/unsigned mix-up) turn a smooth bright region into such a
                   white-to-black contour; anatomy has no one-pixel jump across most of the
                   range. In the histogram this is a bright body that ends abruptly at the top
                   and reappears as a separate low mode.
"""
from __future__ import annotations

import json
import math
import os
from array import array
from typing import Any, Iterable, Mapping

import numpy as np

from cxr_rf import cli, errors, outputs
from cxr_rf import conditioning as cond
from cxr_rf.data import schema, stats as stats_lib

SPLIT_ORDER = ("train", "validation", "test")
HIST_BINS = 64
CHUNK = 256          # records read per __getitems__ call in the counting pass
TILE = 128           # contact-sheet tile side
THRESHOLDS: dict[str, float] = {
    "DARK_MEAN": 0.15,
    "BRIGHT_MEAN": 0.85,
    "MEAN_GAP": 0.2,
    "BORDER_MARGIN": 0.02,
    "INVERTED_FRACTION": 0.5,
    "CLIP_HIGH": 0.05,
    "CLIP_LOW": 0.3,
    "WRAP_HIGH": 0.8,
    "WRAP_LOW": 0.2,
    "WRAP_STEPS": 0.25,
    "WRAPPED_FRACTION": 0.2,
}
FLAGS_ORDER = ("dark", "bright", "inverted", "clipped", "wrapped")


# --------------------------------------------------------------------------- pixels

def image_measures(image: np.ndarray) -> dict[str, float]:
    """Per-image numbers the flags are made of, for a uint16 [H, W] image.

    mean, border (outer band of width max(1, min(H, W) // 8)) and centre (central half)
    means on [0, 1]; hi_frac / lo_frac: shares of pixels equal to the image's max / min;
    wrap_steps: white-to-black neighbour steps (see the module docstring) / (H + W).
    """
    img = np.asarray(image)
    h, w = img.shape
    x = img.astype(np.float32) / np.float32(65535.0)
    b = max(1, min(h, w) // 8)
    inner = np.zeros((h, w), bool)
    inner[b:h - b, b:w - b] = True
    border = x[~inner] if (~inner).any() else x.ravel()
    centre = x[h // 4:h - h // 4, w // 4:w - w // 4]
    if centre.size == 0:
        centre = x
    lo, hi = img.min(), img.max()
    n = float(img.size)
    hi_t = np.uint16(round(THRESHOLDS["WRAP_HIGH"] * 65535))
    lo_t = np.uint16(round(THRESHOLDS["WRAP_LOW"] * 65535))
    steps = 0
    for a, c in ((img[:, :-1], img[:, 1:]), (img[:-1, :], img[1:, :])):
        bright = np.maximum(a, c)
        dark = np.minimum(a, c)
        steps += int(np.count_nonzero((bright >= hi_t) & (dark <= lo_t) & (dark != lo)))
    return {
        "mean": float(x.mean()),
        "border": float(border.mean()),
        "centre": float(centre.mean()),
        "hi_frac": float(np.count_nonzero(img == hi) / n),
        "lo_frac": float(np.count_nonzero(img == lo) / n),
        "wrap_steps": steps / float(h + w),
    }


def histogram(image: np.ndarray, bins: int = HIST_BINS) -> np.ndarray:
    """Counts of the image's values (scaled to [0, 1]) in ``bins`` equal bins."""
    idx = (np.asarray(image, np.uint32) * bins) >> 16     # 0..bins-1, exact for uint16
    return np.bincount(idx.ravel(), minlength=bins).astype(np.int64)


def summarize_measures(measures: list[dict[str, float]]) -> dict[str, Any]:
    """A source's sampled images -> the medians and fractions its flags compare."""
    if not measures:
        return {"sampled": 0}
    col = {k: np.asarray([m[k] for m in measures], np.float64) for k in measures[0]}
    t = THRESHOLDS
    return {
        "sampled": len(measures),
        "median_mean": float(np.median(col["mean"])),
        "median_border_minus_centre": float(np.median(col["border"] - col["centre"])),
        "frac_border_brighter": float(np.mean(col["border"] > col["centre"] + t["BORDER_MARGIN"])),
        "median_hi_frac": float(np.median(col["hi_frac"])),
        "median_lo_frac": float(np.median(col["lo_frac"])),
        "frac_wrap_like": float(np.mean(col["wrap_steps"] >= t["WRAP_STEPS"])),
    }


def source_flags(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """{source: {flag: reason}} from ``summarize_measures`` of every source (see THRESHOLDS)."""
    t = THRESHOLDS
    means = {s: v["median_mean"] for s, v in summaries.items() if v.get("sampled")}
    out: dict[str, dict[str, str]] = {}
    for s, v in summaries.items():
        flags: dict[str, str] = {}
        out[s] = flags
        if not v.get("sampled"):
            continue
        m = v["median_mean"]
        others = [x for o, x in means.items() if o != s]
        ref = float(np.median(others)) if len(others) >= 2 else None
        if m < t["DARK_MEAN"]:
            flags["dark"] = f"median image mean {m:.3f} < {t['DARK_MEAN']}"
        elif ref is not None and m < ref - t["MEAN_GAP"]:
            flags["dark"] = f"median image mean {m:.3f}, other sources {ref:.3f}"
        if m > t["BRIGHT_MEAN"]:
            flags["bright"] = f"median image mean {m:.3f} > {t['BRIGHT_MEAN']}"
        elif ref is not None and m > ref + t["MEAN_GAP"]:
            flags["bright"] = f"median image mean {m:.3f}, other sources {ref:.3f}"
        if v["frac_border_brighter"] > t["INVERTED_FRACTION"]:
            flags["inverted"] = (f"{100 * v['frac_border_brighter']:.0f}% of images have a border "
                                 f"brighter than the centre (MONOCHROME1 not inverted?)")
        if v["median_hi_frac"] > t["CLIP_HIGH"] or v["median_lo_frac"] > t["CLIP_LOW"]:
            flags["clipped"] = (f"median image has {100 * v['median_hi_frac']:.1f}% of pixels at "
                                f"its max, {100 * v['median_lo_frac']:.1f}% at its min")
        if v["frac_wrap_like"] > t["WRAPPED_FRACTION"]:
            flags["wrapped"] = (f"{100 * v['frac_wrap_like']:.0f}% of images have white-to-black "
                                f"steps (values wrapped past 16 bits?)")
    return out


# --------------------------------------------------------------------------- reading

def _open(data_dir: str):
    """(builder, ordered split names) of a converted cxr_rf dataset; UserError otherwise."""
    data_dir = schema.filesystem_path(data_dir, "dataset")
    if not os.path.exists(data_dir):
        raise errors.UserError(f"dataset directory {data_dir} does not exist")
    if not os.path.isdir(data_dir):
        raise errors.UserError(f"dataset directory {data_dir} is not a directory")
    if not os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
        raise errors.UserError(f"{data_dir} is not a converted dataset (dataset_info.json "
                               f"missing); run python -m cxr_rf.data.convert first")
    import tensorflow_datasets as tfds
    try:
        builder = tfds.builder_from_directory(data_dir)
        keys = set(builder.info.features.keys())
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is the user's directory
        raise errors.UserError(f"{data_dir} is not a readable converted dataset: "
                               f"{' '.join(str(e).split())[:200]}") from None
    missing = {"image_png", "findings", "age", *schema.TEXT_FIELDS} - keys
    if missing:
        raise errors.UserError(f"{data_dir} is a TFDS dataset but not a cxr_rf one (no "
                               f"{', '.join(sorted(missing))} features)")
    names = list(builder.info.splits)
    order = [s for s in SPLIT_ORDER if s in names] + sorted(set(names) - set(SPLIT_ORDER))
    return builder, order


class _Reservoir:
    """Seeded uniform sample of k items from a stream of unknown length (Algorithm R)."""

    def __init__(self, k: int, rng: np.random.Generator):
        self.k, self.rng, self.seen, self.items = k, rng, 0, []

    def add(self, item) -> None:
        if len(self.items) < self.k:
            self.items.append(item)
        else:
            j = int(self.rng.integers(0, self.seen + 1))
            if j < self.k:
                self.items[j] = item
        self.seen += 1


def _age_summary(ages: Iterable[array]) -> dict[str, Any]:
    """{known, unknown, min, max, median} of ages (arrays of years; -1 unknown)."""
    parts = [np.frombuffer(a, np.float32) for a in ages]
    a = np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)
    known = a[a >= 0]
    out: dict[str, Any] = {"known": int(known.size), "unknown": int(a.size - known.size)}
    if known.size:
        out.update(min=float(known.min()), max=float(known.max()),
                   median=float(np.median(known)))
    return out


def _diff_stats(doc: Mapping[str, Any], splits: Mapping[str, Any]) -> list[str]:
    """Where stats.json and the counted records disagree, one line each."""
    out = []
    theirs = doc.get("splits", {})
    for split in sorted(set(theirs) | set(splits)):
        a, b = theirs.get(split), splits.get(split)
        if a is None or b is None:
            out.append(f"split {split}: " + ("not in stats.json" if a is None
                                             else "in stats.json but not in the dataset"))
            continue
        if a.get("count") != b["count"]:
            out.append(f"split {split}: stats.json counts {a.get('count')} records, the dataset "
                       f"has {b['count']}")
        for key in ("findings", "sex", "age", "race", "view", "source", "site"):
            x = {k: v for k, v in (a.get(key) or {}).items() if v}
            y = {k: v for k, v in b[key].items() if v}
            if x != y:
                if key == "findings":
                    bad = sorted(f for f in set(x) | set(y) if x.get(f) != y.get(f))
                    out.append(f"split {split}: findings differ for {', '.join(bad)}")
                else:
                    out.append(f"split {split}: {key} differs (stats.json {x}, records {y})")
    return out


def _label(ex: Mapping[str, Any], split: str) -> str:
    """Contact-sheet caption: split site view | sex age | positive findings."""
    pos = [f for f, s in zip(cond.FINDINGS, ex["findings"]) if int(s) == cond.POSITIVE]
    age = "age ?" if ex["age"] < 0 else f"{ex['age']:g}y"
    return (f"{split} {ex['site'] or '-'} {ex['view']} | {ex['sex']} {age} | "
            f"{', '.join(pos) if pos else 'no positive findings'}")


def _safe_name(source: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in source) or "unknown"


# --------------------------------------------------------------------------- the report

def inspect_dataset(data_dir: str, out_dir: str | None = None, *, per_source: int = 16,
                    sample: int = 256, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Inspect the converted dataset at ``data_dir``, write the report files into ``out_dir``
    (default ``data_dir/inspect``) and return the ``inspect.json`` document.

    Bad input (no such directory, not a converted dataset, per_source/sample < 1, an output
    path that is a file) raises ``errors.UserError`` before anything is written.
    """
    for what, v in (("per_source", per_source), ("sample", sample)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise errors.UserError(f"--{what} must be an integer >= 1; got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise errors.UserError(f"--seed must be an integer >= 0; got {seed!r}")
    builder, split_names = _open(data_dir)
    out_dir = os.fspath(out_dir) if out_dir is not None else os.path.join(data_dir, "inspect")
    cli.output_dir(out_dir, "--out")
    import tqdm

    rng = np.random.default_rng(seed)
    keep = max(per_source, sample)
    splits: dict[str, dict[str, Any]] = {}
    by_source: dict[str, dict[str, Any]] = {}
    ages: dict[str, array] = {}
    reservoirs: dict[str, _Reservoir] = {}
    sources = {s: builder.as_data_source(s) for s in split_names}
    total = sum(len(src) for src in sources.values())
    bar = tqdm.tqdm(total=total, unit="rec", desc="count", disable=not progress)
    for split in split_names:
        src = sources[split]
        counts = splits[split] = stats_lib.empty_counts()
        for start in range(0, len(src), CHUNK):
            idx = list(range(start, min(start + CHUNK, len(src))))
            for i, raw in zip(idx, src.__getitems__(idx)):
                ex = schema.from_example(raw, decode=False)
                stats_lib.count(counts, ex)
                s = ex["source"]
                if s not in by_source:
                    by_source[s] = {"count": 0, "splits": {}, "sites": {}}
                    ages[s] = array("f")
                    reservoirs[s] = _Reservoir(keep, rng)
                b = by_source[s]
                b["count"] += 1
                b["splits"][split] = b["splits"].get(split, 0) + 1
                site = ex["site"] or "unknown"
                b["sites"][site] = b["sites"].get(site, 0) + 1
                ages[s].append(ex["age"])
                reservoirs[s].add((split, i))
            bar.update(len(idx))
    bar.close()
    order = sorted(by_source, key=lambda s: (-by_source[s]["count"], s))
    for s in order:
        by_source[s]["age"] = _age_summary([ages[s]])
    report: dict[str, Any] = {
        "dataset": os.path.abspath(data_dir),
        "name": builder.info.name,
        "resolution": int((builder.info.metadata or {}).get("resolution", 0) or 0),
        "per_source": int(per_source), "sample": int(sample), "seed": int(seed),
        "splits": splits,
        "total": stats_lib.merge(splits[s] for s in split_names),
        "age": _age_summary([ages[s] for s in order]),
        "by_source": {s: by_source[s] for s in order},
    }
    del ages
    stats_path = os.path.join(data_dir, "stats.json")
    if os.path.isfile(stats_path):
        try:
            diffs = _diff_stats(json.loads(open(stats_path).read()), splits)
        except (ValueError, AttributeError, TypeError) as e:
            diffs = [f"stats.json is unreadable: {e}"]
        report["stats_json"] = {"present": True, "agrees": not diffs, "differences": diffs}
    else:
        report["stats_json"] = {"present": False, "agrees": None, "differences": []}

    # Pass 2: the sampled records, one source at a time.
    import matplotlib
    matplotlib.use("Agg")
    pixels: dict[str, dict[str, Any]] = {}
    sheets = {}
    hists: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}
    bar = tqdm.tqdm(total=sum(len(r.items) for r in reservoirs.values()), unit="img",
                    desc="pixels", disable=not progress)
    for s in order:
        items = reservoirs[s].items
        show = set(int(j) for j in rng.permutation(len(items))[:per_source])
        measures, per_image, pooled = [], [], np.zeros(HIST_BINS, np.int64)
        tiles, labels = [], []
        items = sorted(items, key=lambda x: (split_names.index(x[0]), x[1]))  # file order
        for j, (split, i) in enumerate(items):
            ex = schema.from_example(sources[split][i])
            img = ex.pop("image")
            measures.append(image_measures(img))
            h = histogram(img)
            pooled += h
            per_image.append(h / max(h.sum(), 1))
            if j in show:
                tiles.append(_tile(img))
                labels.append(_label(ex, split))
            bar.update(1)
        summary = summarize_measures(measures)
        summary["histogram"] = (pooled / max(pooled.sum(), 1)).round(6).tolist()
        pixels[s] = summary
        hists[s] = (pooled, per_image)
        sheets[s] = outputs.grid(tiles, labels, tile=TILE)
    bar.close()
    flags = source_flags(pixels)
    for s in order:
        pixels[s]["flags"] = flags[s]
    report["pixels"] = pixels
    report["flags"] = {s: sorted(flags[s], key=FLAGS_ORDER.index) for s in order}
    report["thresholds"] = dict(THRESHOLDS)
    report["histogram_bins"] = HIST_BINS

    # Everything was read: now write.
    os.makedirs(out_dir, exist_ok=True)
    files = []
    for s in order:
        name = f"contact_{_safe_name(s)}.png"
        sheets[s].save(os.path.join(out_dir, name), format="PNG")
        files.append(name)
    _plot_histograms(os.path.join(out_dir, "histograms.png"), order, hists, report["flags"])
    files.append("histograms.png")
    report["files"] = files + ["inspect.json", "report.txt"]
    report["out"] = os.path.abspath(out_dir)
    with open(os.path.join(out_dir, "inspect.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "report.txt"), "w") as f:
        f.write(format_report(report) + "\n")
    return report


def _tile(img: np.ndarray) -> np.ndarray:
    """uint16 image -> [-1, 1] float32 at most TILE x TILE (for outputs.grid)."""
    from PIL import Image
    h, w = img.shape
    if max(h, w) > TILE:
        f = Image.fromarray(img.astype(np.float32), mode="F").resize((TILE, TILE), Image.BILINEAR)
        x = np.asarray(f, np.float32)
    else:
        x = img.astype(np.float32)
    return x * np.float32(2.0 / 65535.0) - np.float32(1.0)


def _plot_histograms(path: str, order: list[str],
                     hists: Mapping[str, tuple[np.ndarray, list[np.ndarray]]],
                     flags: Mapping[str, list[str]]) -> None:
    from matplotlib.figure import Figure
    n = len(order)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), dpi=100)
    centres = (np.arange(HIST_BINS) + 0.5) / HIST_BINS
    for k, s in enumerate(order):
        ax = fig.add_subplot(rows, cols, k + 1)
        pooled, per_image = hists[s]
        for h in per_image[:64]:
            ax.plot(centres, h, color="tab:blue", alpha=0.15, linewidth=0.7)
        ax.plot(centres, pooled / max(pooled.sum(), 1), color="black", linewidth=1.6,
                label=f"all {len(per_image)} sampled")
        title = s + (f"  [{', '.join(flags[s])}]" if flags[s] else "")
        ax.set_title(title, fontsize=9, color="tab:red" if flags[s] else "black")
        ax.set_xlim(0, 1)
        ax.set_xlabel("pixel value / 65535", fontsize=8)
        ax.set_ylabel("fraction of pixels", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, format="png")


def format_report(report: Mapping[str, Any]) -> str:
    """The printed report: stats tables, sources x sites, ages, stats.json check, pixel flags."""
    lines = [f"dataset {report['dataset']} ({report['name']}, {report['resolution']}px): "
             f"{report['total']['count']} records", ""]
    lines.append(stats_lib.format_stats({"splits": report["splits"], "total": report["total"]}))
    lines += ["", f"{'source':<16}{'records':>9}  splits / sites"]
    for s, b in report["by_source"].items():
        sp = ", ".join(f"{k} {v}" for k, v in b["splits"].items())
        sites = sorted(b["sites"].items(), key=lambda kv: -kv[1])
        st = ", ".join(f"{k} {v}" for k, v in sites[:8]) + (
            f", ... {len(sites) - 8} more" if len(sites) > 8 else "")
        lines.append(f"{s:<16}{b['count']:>9}  {sp} / {st}")
    lines += ["", "age (years, known ages only):"]
    for s, a in [("all", report["age"])] + [(s, b["age"]) for s, b in report["by_source"].items()]:
        if a["known"]:
            lines.append(f"  {s:<14} min {a['min']:.1f}  median {a['median']:.1f}  max "
                         f"{a['max']:.1f}  ({a['known']} known, {a['unknown']} unknown)")
        else:
            lines.append(f"  {s:<14} no known ages ({a['unknown']} unknown)")
    sj = report["stats_json"]
    lines.append("")
    if not sj["present"]:
        lines.append("stats.json: none beside the dataset (nothing to compare)")
    elif sj["agrees"]:
        lines.append("stats.json: agrees with the records")
    else:
        lines.append("stats.json DISAGREES with the records:")
        lines += [f"  {d}" for d in sj["differences"]]
    lines += ["", f"{'pixels (sampled)':<16}{'n':>5}{'mean':>7}{'brd-ctr':>9}{'brd>ctr':>9}"
                  f"{'@max':>7}{'@min':>7}{'wrap':>7}  flags"]
    for s, p in report["pixels"].items():
        if not p.get("sampled"):
            continue
        lines.append(f"{s:<16}{p['sampled']:>5}{p['median_mean']:>7.3f}"
                     f"{p['median_border_minus_centre']:>9.3f}{p['frac_border_brighter']:>9.2f}"
                     f"{p['median_hi_frac']:>7.3f}{p['median_lo_frac']:>7.3f}"
                     f"{p['frac_wrap_like']:>7.2f}  {', '.join(report['flags'][s]) or '-'}")
    flagged = {s: p["flags"] for s, p in report["pixels"].items() if p.get("flags")}
    if flagged:
        lines += ["", "flags (heuristics; look at the contact sheets before trusting them):"]
        for s, fl in flagged.items():
            for name in report["flags"][s]:
                lines.append(f"  {s}: {name}: {fl[name]}")
    else:
        lines += ["", "flags: none"]
    if "out" in report:
        lines += ["", f"wrote {', '.join(report['files'])} to {report['out']}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI

def _define_flags() -> None:
    """Command-line flags (defined only when run as a program, so importing stays side-effect
    free)."""
    from absl import flags
    flags.DEFINE_string("out", None, "Output directory (default: DIR/inspect).")
    flags.DEFINE_integer("per_source", 16, "Random records per source on its contact sheet.")
    flags.DEFINE_integer("sample", 256, "Random records per source decoded for the pixel "
                         "histograms and flags (at least --per_source are read).")
    flags.DEFINE_integer("seed", 0, "Seed of the random samples.")
    flags.DEFINE_boolean("progress", True, "Progress bars (on a terminal).")
    cli.check_number("per_source", 1)
    cli.check_number("sample", 1)
    cli.check_number("seed", 0)


def main(argv: list[str]) -> int:
    from absl import flags
    f = flags.FLAGS
    args = list(argv[1:])
    if len(args) != 1:
        raise errors.UserError("give one dataset directory: python -m cxr_rf.data.inspect DIR "
                               "[--out DIR] [--per_source 16] [--sample 256] [--seed 0]"
                               + (f" (got {' '.join(args)})" if args else ""))
    import sys
    report = inspect_dataset(args[0], f.out, per_source=f.per_source, sample=f.sample,
                             seed=f.seed, progress=f.progress and sys.stderr.isatty())
    print(format_report(report))
    return 0


if __name__ == "__main__":
    cli.run(main, _define_flags)
