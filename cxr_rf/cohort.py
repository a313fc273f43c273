"""Synthetic cohorts: a dataset of generated radiographs whose metadata follows a spec.

    python -m cxr_rf.cohort --workdir RUN --spec experiments/cohorts/NAME.json --out DIR \\
        [--step N] [--batch_size B] [--shards K] [--steps S --cfg C --guidance G --method M]
    python -m cxr_rf.cohort stress --cohort DIR --classifier CLF --out DIR [--bootstrap 1000]
    python -m cxr_rf.cohort stress --workdir RUN --attribute sex [--values M,F] [--n 200] \\
        --classifier CLF --out DIR            (makes the matched cohort in OUT/cohort first)

The spec (JSON; ``load_spec``/``check_spec``; every error is one line naming the key)::

    {"name": "older_cardiomegaly",            optional, free text
     "n": 200,                                total number of images (> 0)
     "seed": 0,                               conditions and noise seeds follow from it
     "split": "train",                        the dataset's one split (default "train")
     "findings": {"Cardiomegaly": 0.3},       P(positive); otherwise negative
     "unlisted": "training",                  state of the findings not listed: "training"
                                              (their most common state in the run's training
                                              data, as ``python -m cxr_rf.sample`` does),
                                              "negative" or "unmentioned"
     "age": {"normal": [60, 15], "clip": [18, 95]} | {"uniform": [40, 80]} | 70 | "unknown",
     "sex": {"M": 0.5, "F": 0.5} | "F",       a distribution over the vocabulary, or one value
     "race": {...} | "White", "view": {...} | "PA", "source": {...} | "phantom",
     "pairs": {"vary": "sex", "values": ["M", "F"]},   optional: matched sets (below)
     "sampling": {"steps": 28, "cfg": 4.0, "guidance": "findings=5", "method": "heun"}}

An attribute left out is *not specified* when sampling (its null token: the model's "any") and
stored as ``unknown`` (age -1). "No Finding" is derived as in ``Conditions.parse`` (positive
exactly when no other finding is) unless the spec gives it a prevalence of its own. Ages are
drawn in years, clipped to ``clip`` (a normal's default clip is [0, 120]) and rounded to the
conditioning's 0.1-year resolution, so the stored age is exactly the requested one.

Matched sets (``pairs``): the n images form n / len(values) groups (n must divide). A group's
attributes are drawn once from the spec and shared by its members, and so is its noise seed;
member k takes ``values[k]`` for the varied attribute (sex, race, view, source, age, or a
finding, whose values are states: ["positive", "negative"]). They differ in nothing else, but
for "No Finding" when a finding is varied (it follows the other findings). The varied
attribute must not also have a distribution in the spec.

Determinism: group g draws from ``np.random.default_rng([seed, g])`` in a fixed order and its
noise seed is ``(base + g) mod 2**32`` with ``base`` drawn from the seed: the same spec gives
the same conditions and seeds, row g does not depend on n, and seeds are distinct within a
cohort. With the same run, checkpoint and sampling settings the pixels are the same, too.

The output is a converted dataset (``cxr_rf.data.convert``'s format: ``dataset_info.json``,
``features.json``, ``stats.json``, ``stats.txt``, ArrayRecord shards of 16-bit PNG records,
one split, "train" unless the spec names another: what the Grain pipeline trains on and the
reference a classifier is trained on; ``evaluate ... --reference COHORT --split train`` reads
it) plus ``manifest.jsonl``, one row per record in record order: ``index``, ``pair`` (the
group), ``arm`` (the varied value, null without pairs), ``seed`` (noise), ``conditions``
(``Conditions.describe()``, what the model was asked for), ``patient_id``, ``study_id``.

How records say they are synthetic: ``site`` is ``"synthetic:<run directory name>@<step>"``,
``patient_id`` ``"syn-<cohort fingerprint[:8]>-<group>"`` (a group is one "patient", so a
per-patient split never separates a matched set), ``study_id`` ``"syn-<fp[:8]>-<index>"``, and
``stats.json`` has a ``synthetic`` section (run, checkpoint step, sampling settings, the spec,
the fingerprint). ``source`` stays what the image was conditioned on (``unknown`` if not
specified): ``conditioning.SOURCES`` are token ids checkpoints depend on, so "synthetic" is no
source.

Resumable: the cohort is cut into ``--shards`` contiguous shards (default one per 1000 images),
each generated in Sampler batches and written to ``OUT/.work/`` and renamed when complete; a
rerun after a kill checks the fingerprint (spec, run config and checkpoint step, sampling
settings, resolution, shard count) and generates only the shards not done; the result is
byte-identical to an uninterrupted run (``dataset_info.json`` is written last). An --out that
holds a cohort or unfinished work of another fingerprint, or anything else, is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cxr_rf import cli, errors
from cxr_rf import conditioning as cond
from cxr_rf.conditioning import Conditions

VERSION = 1
WORK = ".work"
MANIFEST = "manifest.jsonl"
DEFAULT_SHARD_SIZE = 1000
SCALARS: dict[str, tuple[str, ...]] = {
    "sex": cond.SEXES, "race": cond.RACES, "view": cond.VIEWS, "source": cond.SOURCES}
ATTRIBUTES = ("sex", "age", "race", "view", "source")
UNLISTED_MODES = ("training", "negative", "unmentioned")
SAMPLING_KEYS = ("steps", "cfg", "guidance", "method")
SPEC_KEYS = ("name", "n", "seed", "split", "findings", "unlisted", *ATTRIBUTES, "pairs",
             "sampling")
DEFAULT_AGE_CLIP = (0.0, 120.0)
# Default arms of ``stress --attribute A`` without --values.
DEFAULT_VALUES = {"sex": ["M", "F"], "view": ["PA", "AP"], "race": ["White", "Black"],
                  "age": [40, 75], "source": ["unknown", "phantom"]}


class SpecError(errors.UserError):
    """A cohort spec that cannot be used (one line naming the key)."""


def _fail(msg: str) -> SpecError:
    return SpecError(f"cohort spec: {msg}")


# ----------------------------------------------------------------------------- the spec

def load_spec(path: str | os.PathLike) -> dict:
    """The checked spec of a JSON file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SpecError(f"cohort spec {path} does not exist")
    try:
        with open(path) as f:
            spec = json.load(f)
    except ValueError as e:
        raise SpecError(f"cohort spec {path} is not valid JSON: {e}") from None
    return check_spec(spec)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_categorical(key: str, v: Any, allowed: Sequence[str]) -> None:
    if isinstance(v, str):
        if v not in allowed:
            raise _fail(f"{key}: unknown value {v!r}; valid: {', '.join(allowed)}")
        return
    if not isinstance(v, dict) or not v:
        raise _fail(f"{key} must be one value or a non-empty {{value: probability}} object; "
                    f"got {v!r}")
    for value, p in v.items():
        if value not in allowed:
            raise _fail(f"{key}: unknown value {value!r}; valid: {', '.join(allowed)}")
        if not _number(p) or not 0.0 <= p <= 1.0:
            raise _fail(f"{key}[{value!r}] must be a probability in [0, 1]; got {p!r}")
    total = sum(v.values())
    if abs(total - 1.0) > 1e-6:
        raise _fail(f"{key}: probabilities must sum to 1; they sum to {total:g}")


def _check_age_value(key: str, v: Any) -> None:
    if v == "unknown":
        return
    if not _number(v) or not 0.0 <= v < cond.MAX_AGE:
        raise _fail(f"{key} must be a number of years in [0, {cond.MAX_AGE:g}) or 'unknown'; "
                    f"got {v!r}")


def _pair_of_numbers(key: str, v: Any) -> tuple[float, float]:
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(x) for x in v)):
        raise _fail(f"{key} must be two numbers [a, b]; got {v!r}")
    return float(v[0]), float(v[1])


def _check_age(v: Any) -> None:
    if not isinstance(v, dict):
        return _check_age_value("age", v)
    kinds = [k for k in ("normal", "uniform") if k in v]
    extra = set(v) - {"normal", "uniform", "clip"}
    if len(kinds) != 1 or extra:
        raise _fail("age must be a number, 'unknown', {\"normal\": [mean, sd], \"clip\": [lo, hi]} "
                    f"or {{\"uniform\": [lo, hi]}}; got {v!r}")
    a, b = _pair_of_numbers(f"age.{kinds[0]}", v[kinds[0]])
    if kinds[0] == "normal":
        if b <= 0:
            raise _fail(f"age.normal: the standard deviation must be > 0; got {b:g}")
        lo, hi = _pair_of_numbers("age.clip", v.get("clip", DEFAULT_AGE_CLIP))
    else:
        if "clip" in v:
            raise _fail("age.clip goes with age.normal; a uniform age has its own bounds")
        lo, hi = a, b
    if not 0.0 <= lo < hi < cond.MAX_AGE:
        raise _fail(f"age bounds must satisfy 0 <= lo < hi < {cond.MAX_AGE:g}; got [{lo:g}, {hi:g}]")


def check_spec(spec: Any) -> dict:
    """``spec`` (a dict, as in the module doc) checked and normalised: defaults filled in.
    Raises SpecError (one line) on anything wrong."""
    if not isinstance(spec, dict):
        raise _fail(f"must be a JSON object; got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise _fail(f"unknown key {unknown[0]!r}; valid: {', '.join(SPEC_KEYS)}")
    out = dict(spec)
    n = spec.get("n")
    if not _int(n) or n <= 0:
        raise _fail(f"n must be a positive integer; got {n!r}")
    seed = out.setdefault("seed", 0)
    if not _int(seed) or not 0 <= seed < 2**32:
        raise _fail(f"seed must be an integer in [0, 2**32); got {seed!r}")
    if not isinstance(out.get("name", ""), str):
        raise _fail(f"name must be a string; got {out['name']!r}")
    from cxr_rf.data.writer import NAME_RE
    split = out.setdefault("split", "train")
    if not isinstance(split, str) or not NAME_RE.match(split):
        raise _fail(f"split must match {NAME_RE.pattern}; got {split!r}")
    findings = out.setdefault("findings", {})
    if not isinstance(findings, dict):
        raise _fail(f"findings must be an object {{finding: prevalence}}; got {findings!r}")
    for f, p in findings.items():
        if f not in cond.FINDINGS:
            raise _fail(f"unknown finding {f!r}; valid: {', '.join(cond.FINDINGS)}")
        if not _number(p) or not 0.0 <= p <= 1.0:
            raise _fail(f"findings[{f!r}]: prevalence must be in [0, 1]; got {p!r}")
    if out.setdefault("unlisted", "training") not in UNLISTED_MODES:
        raise _fail(f"unlisted must be one of {', '.join(UNLISTED_MODES)}; got {out['unlisted']!r}")
    for key, allowed in SCALARS.items():
        if key in out:
            _check_categorical(key, out[key], allowed)
    if "age" in out:
        _check_age(out["age"])
    sampling = out.setdefault("sampling", {})
    if not isinstance(sampling, dict) or set(sampling) - set(SAMPLING_KEYS):
        raise _fail(f"sampling must be an object with keys among {', '.join(SAMPLING_KEYS)}; "
                    f"got {sampling!r}")
    if "steps" in sampling and (not _int(sampling["steps"]) or sampling["steps"] < 1):
        raise _fail(f"sampling.steps must be a positive integer; got {sampling['steps']!r}")
    if "cfg" in sampling and (not _number(sampling["cfg"]) or sampling["cfg"] < 0):
        raise _fail(f"sampling.cfg must be a number >= 0; got {sampling['cfg']!r}")
    if "method" in sampling and sampling["method"] not in ("euler", "heun"):
        raise _fail(f"sampling.method must be euler or heun; got {sampling['method']!r}")
    if "guidance" in sampling and not isinstance(sampling["guidance"], str):
        raise _fail(f"sampling.guidance must be a string like 'findings=5'; got "
                    f"{sampling['guidance']!r}")
    if "pairs" in out:
        _check_pairs(out)
    return out


def _check_pairs(spec: dict) -> None:
    pairs = spec["pairs"]
    if not isinstance(pairs, dict) or set(pairs) != {"vary", "values"}:
        raise _fail(f"pairs must be {{\"vary\": ATTRIBUTE, \"values\": [...]}}; got {pairs!r}")
    vary, values = pairs["vary"], pairs["values"]
    if vary not in ATTRIBUTES and vary not in cond.FINDINGS:
        raise _fail(f"pairs.vary: unknown attribute {vary!r}; valid: {', '.join(ATTRIBUTES)} "
                    "or a finding")
    if not isinstance(values, list) or len(values) < 2:
        raise _fail(f"pairs.values must be a list of at least 2 values; got {values!r}")
    if len(set(map(json.dumps, values))) != len(values):
        raise _fail(f"pairs.values repeats a value: {values!r}")
    for v in values:
        if vary == "age":
            _check_age_value("pairs.values", v)
        elif vary in SCALARS:
            if v not in SCALARS[vary]:
                raise _fail(f"pairs.values: unknown {vary} {v!r}; valid: {', '.join(SCALARS[vary])}")
        elif v not in cond.STATES:
            raise _fail(f"pairs.values: {vary} takes finding states ({', '.join(cond.STATES)}); "
                        f"got {v!r}")
    in_spec = vary in spec if vary in ATTRIBUTES else vary in spec["findings"]
    if in_spec:
        raise _fail(f"pairs.vary {vary!r} also has a distribution in the spec; remove one")
    if spec["n"] % len(values):
        raise _fail(f"n ({spec['n']}) must be a multiple of the {len(values)} pairs.values")


# ----------------------------------------------------------------------------- conditions

@dataclasses.dataclass(frozen=True)
class Member:
    """One image of a cohort: its row, matched group, varied value, noise seed, conditions."""
    index: int
    pair: int
    arm: Any
    seed: int
    conditions: Conditions


def _categorical(rng: np.random.Generator, v: Any) -> str | None:
    u = rng.random()                      # always drawn: the stream does not depend on v
    if v is None or isinstance(v, str):
        return v
    edges = np.cumsum(list(v.values()))
    return list(v)[min(int(np.searchsorted(edges, u * edges[-1], side="right")), len(v) - 1)]


def _age(rng: np.random.Generator, v: Any) -> float | str | None:
    z, u = rng.standard_normal(), rng.random()
    if v is None or isinstance(v, str):
        return v
    if not isinstance(v, dict):
        return round(float(v), 1)
    if "normal" in v:
        mean, sd = v["normal"]
        lo, hi = v.get("clip", DEFAULT_AGE_CLIP)
        years = float(np.clip(mean + sd * z, lo, hi))
    else:
        lo, hi = v["uniform"]
        years = lo + (hi - lo) * u
    return min(round(years, 1), math.nextafter(cond.MAX_AGE, 0))


def noise_base(seed: int) -> int:
    return int(np.random.default_rng([int(seed), 2**31]).integers(0, 2**32))


def sample_conditions(spec: Mapping, unlisted: Mapping[str, int] | None = None) -> list[Member]:
    """The cohort's members (``check_spec`` is applied): conditions, groups, noise seeds.

    ``unlisted``: state codes of the findings the spec does not list when its ``unlisted`` is
    "training" (``sample.training_defaults``); None there means negative."""
    spec = check_spec(dict(spec))
    mode = spec["unlisted"]
    if mode == "negative" or (mode == "training" and unlisted is None):
        defaults = {f: cond.NEGATIVE for f in cond.FINDINGS}
    elif mode == "unmentioned":
        defaults = {f: cond.UNMENTIONED for f in cond.FINDINGS}
    else:
        defaults = {f: int(unlisted.get(f, cond.NEGATIVE)) for f in cond.FINDINGS}
    pairs = spec.get("pairs")
    values = pairs["values"] if pairs else [None]
    vary = pairs["vary"] if pairs else None
    k = len(values)
    base = noise_base(spec["seed"])
    out: list[Member] = []
    for g in range(spec["n"] // k):
        rng = np.random.default_rng([spec["seed"], g])
        states = {}
        for f in cond.FINDINGS:
            u = rng.random()
            if f in spec["findings"]:
                states[f] = "positive" if u < spec["findings"][f] else "negative"
        attrs = {"sex": _categorical(rng, spec.get("sex")), "age": _age(rng, spec.get("age")),
                 "race": _categorical(rng, spec.get("race")),
                 "view": _categorical(rng, spec.get("view")),
                 "source": _categorical(rng, spec.get("source"))}
        seed = (base + g) % 2**32
        for j, value in enumerate(values):
            s, a = dict(states), dict(attrs)
            if vary in cond.FINDINGS:
                s[vary] = value
            elif vary == "age":
                a["age"] = value if value == "unknown" else round(float(value), 1)
            elif vary is not None:
                a[vary] = value
            text = ",".join(f"{f}={st}" for f, st in s.items())
            c = Conditions.parse(text, unlisted=defaults, **a)
            out.append(Member(g * k + j, g, value, seed, c))
    return out


def record_fields(c: Conditions) -> dict:
    """The stored metadata of an image generated for ``c`` (not specified -> unknown)."""
    age = c.age
    return {"findings": np.asarray(c.findings, np.int8), "sex": c.sex or "unknown",
            "age": -1.0 if age is None or isinstance(age, str) else float(age),
            "race": c.race or "unknown", "view": c.view or "unknown",
            "source": c.source or "unknown"}


# ----------------------------------------------------------------------------- generation

def _hook_shard_done(name: str) -> None:
    """Called after each finished shard; tests replace it to interrupt a cohort."""


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_fingerprint(out: Path) -> str | None:
    for path in (out / "stats.json", out / WORK / "plan.json"):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        fp = doc.get("synthetic", doc).get("fingerprint") if isinstance(doc, dict) else None
        if fp:
            return fp
    return None


def _output_state(out: Path, fingerprint: str) -> str:
    """'fresh', 'resume' or 'done'; UserError for an --out of something else."""
    if not out.exists():
        return "fresh"
    if not out.is_dir():
        raise errors.UserError(f"--out {out} exists and is not a directory")
    entries = list(out.iterdir())
    if not entries or (len(entries) == 1 and entries[0].name == WORK and entries[0].is_dir()
                       and not (entries[0] / "plan.json").exists()):
        return "fresh"    # empty, or killed before its plan was written
    previous = _read_fingerprint(out)
    if previous is None:
        raise errors.UserError(f"--out {out} is not empty and holds no cohort; use another "
                               "directory")
    if previous != fingerprint:
        raise errors.UserError(f"--out {out} holds a cohort of another spec, run, checkpoint or "
                               f"sampling settings (fingerprint {previous[:12]} != "
                               f"{fingerprint[:12]}); use another --out or delete it")
    return "done" if (out / "dataset_info.json").exists() else "resume"


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    return [(n * i // shards, n * (i + 1) // shards) for i in range(shards)]


def generate(workdir: str | os.PathLike, spec: Mapping, out: str | os.PathLike, *,
             step: int | None = None, batch_size: int | None = None, shards: int | None = None,
             shard: str = "auto", steps: int | None = None, cfg_scale: float | None = None,
             guidance: str | None = None, method: str | None = None,
             progress: bool = False) -> dict:
    """Generate the cohort of ``spec`` with the run at ``workdir`` into the dataset ``out``
    (resuming unfinished work of the same fingerprint); returns its stats.json document.

    Sampling settings: the arguments, else the spec's ``sampling``, else the run's
    ``sample.*``."""
    from cxr_rf import outputs, sample
    from cxr_rf.data import schema
    from cxr_rf.data import stats as stats_lib
    from cxr_rf.data.writer import INFO_FILES, publish_split, shard_writer, write_info
    spec = check_spec(dict(spec))
    out = Path(schema.filesystem_path(out, "--out")).absolute()
    if shards is not None and (not _int(shards) or shards < 1):
        raise errors.UserError(f"shards must be a positive integer; got {shards!r}")
    shards = min(shards or max(1, -(-spec["n"] // DEFAULT_SHARD_SIZE)), spec["n"])
    cfg = sample.read_config(workdir)
    s, sp = cfg.sample, spec["sampling"]
    steps = int(steps or sp.get("steps") or s.steps)
    method = method or sp.get("method") or s.method
    g = sample.Guidance.for_run(s, cfg_scale if cfg_scale is not None else sp.get("cfg"),
                                guidance if guidance is not None else sp.get("guidance"))
    _, unlisted = sample.training_defaults(cfg, workdir)
    members = sample_conditions(spec, unlisted)
    sampler = sample.Sampler(cfg, shard=shard, batch_size=batch_size)
    params, ckpt_step = sampler.restore(workdir, step)
    run_name = os.path.basename(os.path.abspath(os.fspath(workdir)).rstrip("/"))
    settings = {"version": VERSION, "spec": spec, "run": run_name,
                "config": _digest(cfg.to_dict()), "checkpoint_step": int(ckpt_step),
                "steps": steps, "method": method, **g.describe(),
                "resolution": int(sampler.resolution), "shards": shards,
                "unlisted_defaults": unlisted}
    fingerprint = _digest(settings)
    state = _output_state(out, fingerprint)
    if state == "done":
        return json.loads((out / "stats.json").read_text())
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "plan.json").exists():
        _write_atomic(work / "plan.json", json.dumps({"fingerprint": fingerprint}))
    site = f"synthetic:{run_name}@{int(ckpt_step)}"
    tag = f"syn-{fingerprint[:8]}"
    feats = schema.features()
    bounds = shard_bounds(len(members), shards)
    name = "cxr"
    import tqdm
    todo = [i for i in range(shards) if not (work / f"shard{i:05d}.json").exists()]
    bar = tqdm.tqdm(total=len(members), initial=len(members) - sum(
        bounds[i][1] - bounds[i][0] for i in todo), disable=not progress, unit="img",
        desc="cohort", dynamic_ncols=True, file=sys.stderr)
    for i in todo:
        lo, hi = bounds[i]
        part = members[lo:hi]
        images = sampler.generate(params, [m.conditions for m in part], [m.seed for m in part],
                                  steps=steps, guidance=g, method=method)
        counts, rows = stats_lib.empty_counts(), []
        tmp = work / f"shard{i:05d}.array_record.tmp"
        w = shard_writer(tmp)
        try:
            for m, x in zip(part, images):
                rec = schema.Record(image=outputs.to_uint(x, 16), site=site,
                                    patient_id=f"{tag}-{m.pair:06d}",
                                    study_id=f"{tag}-{m.index:06d}", **record_fields(m.conditions))
                w.write(schema.to_bytes(rec, feats))
                stats_lib.count(counts, {k: getattr(rec, k) for k in stats_lib.META_FIELDS})
                rows.append(outputs.to_json({
                    "index": m.index, "pair": m.pair, "arm": m.arm, "seed": m.seed,
                    "conditions": m.conditions.describe(), "patient_id": rec.patient_id,
                    "study_id": rec.study_id}))
        finally:
            w.close()
        os.replace(tmp, work / f"shard{i:05d}.array_record")
        _write_atomic(work / f"shard{i:05d}.json", json.dumps({"counts": counts, "rows": rows}))
        bar.update(hi - lo)
        _hook_shard_done(f"shard{i:05d}")
    bar.close()
    # Finish: shards to their TFDS names, manifest, stats, metadata; dataset_info.json last.
    docs = [json.loads((work / f"shard{i:05d}.json").read_text()) for i in range(shards)]
    split = spec["split"]
    info = publish_split(out, name, split, [(work / f"shard{i:05d}.array_record",
                                             len(docs[i]["rows"])) for i in range(shards)])
    _write_atomic(out / MANIFEST, "".join(json.dumps(r, sort_keys=True) + "\n"
                                         for d in docs for r in d["rows"]))
    stats = stats_lib.build(name, sampler.resolution,
                            {split: stats_lib.merge(d["counts"] for d in docs)})
    stats["synthetic"] = {"fingerprint": fingerprint, "workdir": os.path.abspath(os.fspath(workdir)),
                          **settings}
    stats = outputs.to_json(stats)
    _write_atomic(out / "stats.json", json.dumps(stats, indent=1))
    _write_atomic(out / "stats.txt", stats_lib.format_stats(stats) + "\n")
    meta = work / "meta"
    shutil.rmtree(meta, ignore_errors=True)
    meta.mkdir()
    write_info(meta, name=name, resolution=sampler.resolution, split_infos=[info],
               description=f"cxr_rf synthetic cohort {spec.get('name', '')!r} from run "
                           f"{run_name} step {int(ckpt_step)}")
    for f in INFO_FILES:
        os.replace(meta / f, out / f)
    shutil.rmtree(work)
    return stats


def read_manifest(cohort_dir: str | os.PathLike) -> list[dict]:
    path = os.path.join(os.fspath(cohort_dir), MANIFEST)
    if not os.path.isfile(path):
        raise errors.UserError(f"{cohort_dir} is not a cohort: {MANIFEST} is missing "
                               "(make one with python -m cxr_rf.cohort)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- stress test

def _paired_gap(probs: np.ndarray, codes: np.ndarray, table: np.ndarray, a: int, b: int,
                n_boot: int, seed: int) -> tuple[float, tuple[float, float]]:
    """AUROC(arm b) - AUROC(arm a) of one finding over the groups ``table`` [G, K] (row
    indices), and its percentile bootstrap interval resampling groups (pairs stay together)."""
    from cxr_rf import metrics

    def gap(groups):
        vals = []
        for arm in (b, a):
            rows = table[groups, arm]
            c, p = codes[rows], probs[rows]
            vals.append(metrics.auroc(p[c == cond.POSITIVE], p[c == cond.NEGATIVE]))
        return vals[0] - vals[1]

    g = len(table)
    point = gap(np.arange(g))
    rng = np.random.default_rng(seed)
    boots = np.array([gap(rng.integers(0, g, g)) for _ in range(n_boot)])
    boots = boots[~np.isnan(boots)]
    if math.isnan(point) or not boots.size:
        return point, (math.nan, math.nan)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return point, (float(lo), float(hi))


def stress(cohort_dir: str | os.PathLike, classifier, *, n_boot: int = 1000,
           seed: int = 0) -> dict:
    """The classifier's behaviour across the arms of a matched cohort (made with ``pairs``).

    ``classifier``: a ``cxr_rf.features.classifier`` Classifier or the folder ``load`` reads.
    Labels are the records' finding states (positive vs negative; others left out). Returns::

        {"cohort", "attribute", "values", "groups", "n", "classifier", "bootstrap",
         "findings": {finding: {
             "arms": {value: {"auroc", "ci95": [lo, hi], "n_pos", "n_neg"}},
             "gaps": {"<value>-<first value>": {"gap", "ci95"}},    AUROC difference, paired
             "shift": {"<value>-<first value>": {"mean", "ci95"}}}}}  mean within-group change
                                                                       of the probability
    NaN (null in JSON) where an arm lacks a class; intervals are 95% percentile bootstraps
    (``n_boot`` resamples; arms: ``metrics.bootstrap_ci``, gaps and shifts: over groups)."""
    from cxr_rf import metrics
    from cxr_rf.evaluation.sets import ReferenceSet
    from cxr_rf.features import classifier as clf_lib
    cohort_dir = os.fspath(cohort_dir)
    rows = read_manifest(cohort_dir)
    stats = json.loads(Path(cohort_dir, "stats.json").read_text())
    syn = stats.get("synthetic") or {}
    pairs = (syn.get("spec") or {}).get("pairs")
    if not pairs:
        raise errors.UserError(f"{cohort_dir} is not a matched cohort (its spec has no "
                               "'pairs'); a stress test compares the arms of matched sets")
    split = syn["spec"].get("split", "train")
    ref = ReferenceSet(cohort_dir, split)
    if len(ref) != len(rows):
        raise errors.UserError(f"{cohort_dir}: {len(ref)} records but {len(rows)} manifest rows")
    clf_name = getattr(getattr(classifier, "cfg", None), "train_set", "")
    if isinstance(classifier, (str, os.PathLike)):
        clf_name = os.path.abspath(os.fspath(classifier))
        classifier = clf_lib.load(classifier)
    probs = classifier.predict_set(ref)
    codes = ref.findings()
    values = pairs["values"]
    k = len(values)
    table = np.arange(len(rows)).reshape(-1, k)      # group g, arm j -> row g * k + j
    if len(rows) % k or any(rows[i]["pair"] != i // k or rows[i]["arm"] != values[i % k]
                            for i in range(len(rows))):
        raise errors.UserError(f"{cohort_dir}/{MANIFEST} does not list matched groups of "
                               f"{k} in order; was it edited?")
    keys = [f"{v}-{values[0]}" for v in values[1:]]
    out = {"cohort": os.path.abspath(cohort_dir), "attribute": pairs["vary"], "values": values,
           "groups": len(table), "n": len(rows),
           "classifier": clf_name,
           "bootstrap": n_boot, "findings": {}}
    rng_seed = seed
    for fi, f in enumerate(cond.FINDINGS):
        p, c = probs[:, fi], codes[:, fi]
        arms = {}
        for j, v in enumerate(values):
            r = table[:, j]
            pos, neg = p[r][c[r] == cond.POSITIVE], p[r][c[r] == cond.NEGATIVE]
            arms[str(v)] = {"auroc": metrics.auroc(pos, neg),
                            "ci95": list(metrics.bootstrap_ci(pos, neg, n=max(n_boot, 1),
                                                              seed=rng_seed)),
                            "n_pos": int(pos.size), "n_neg": int(neg.size)}
        gaps, shifts = {}, {}
        for j, key in zip(range(1, k), keys):
            gap, ci = _paired_gap(p, c, table, 0, j, n_boot, rng_seed)
            gaps[key] = {"gap": gap, "ci95": list(ci)}
            d = p[table[:, j]] - p[table[:, 0]]
            rng = np.random.default_rng(rng_seed)
            boots = [d[rng.integers(0, d.size, d.size)].mean() for _ in range(n_boot)]
            shifts[key] = {"mean": float(d.mean()),
                           "ci95": [float(x) for x in np.percentile(boots, [2.5, 97.5])]
                           if boots else [math.nan, math.nan]}
        out["findings"][f] = {"arms": arms, "gaps": gaps, "shift": shifts}
    from cxr_rf import outputs
    return outputs.to_json(out)


def _fmt(x, digits=3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def stress_markdown(r: Mapping) -> str:
    """The stress report as a markdown table (one row per finding)."""
    values = [str(v) for v in r["values"]]
    keys = [f"{v}-{values[0]}" for v in values[1:]]
    head = (["finding"] + [f"AUROC {v} [95% CI] (pos/neg)" for v in values]
            + [f"gap {k} [95% CI]" for k in keys] + [f"Δp {k} [95% CI]" for k in keys])
    lines = [f"# Stress test: {r['attribute']} ({', '.join(values)})", "",
             f"{r['groups']} matched groups ({r['n']} images) of {r['cohort']}; each group shares "
             f"every other attribute and its noise seed. Gap: AUROC difference (bootstrap over "
             f"groups, {r['bootstrap']} resamples); Δp: mean within-group change of the "
             "predicted probability.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f, e in r["findings"].items():
        cells = [f]
        for v in values:
            a = e["arms"][v]
            cells.append(f"{_fmt(a['auroc'])} [{_fmt(a['ci95'][0])}, {_fmt(a['ci95'][1])}] "
                         f"({a['n_pos']}/{a['n_neg']})")
        for k in keys:
            gp = e["gaps"][k]
            cells.append(f"{_fmt(gp['gap'])} [{_fmt(gp['ci95'][0])}, {_fmt(gp['ci95'][1])}]")
        for k in keys:
            s = e["shift"][k]
            cells.append(f"{_fmt(s['mean'])} [{_fmt(s['ci95'][0])}, {_fmt(s['ci95'][1])}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stress_spec(attribute: str, values: Sequence | None, n: int, seed: int,
                marginals: Mapping | None) -> dict:
    """The default matched cohort of ``stress --workdir``: every finding at its training
    prevalence (positive fraction; none listed without marginals), age normal(60, 15) clipped
    to [18, 95], sex and view balanced, ``attribute`` varied over ``values``."""
    if values is None:
        values = (["positive", "negative"] if attribute in cond.FINDINGS
                  else DEFAULT_VALUES.get(attribute))
    findings = {}
    for f, states in ((marginals or {}).get("findings") or {}).items():
        p = float(states.get("positive", 0.0))
        if f != "No Finding" and 0 < p < 1:
            findings[f] = round(p, 4)
    spec = {"name": f"stress_{attribute}", "n": int(n), "seed": int(seed), "findings": findings,
            "age": {"normal": [60, 15], "clip": [18, 95]}, "sex": {"M": 0.5, "F": 0.5},
            "view": {"PA": 0.5, "AP": 0.5}, "pairs": {"vary": attribute, "values": values}}
    if attribute in spec:
        del spec[attribute]
    spec["findings"].pop(attribute, None)
    k = len(values or [])
    if k:
        spec["n"] = max(k, n // k * k)
    return check_spec(spec)


def write_stress(r: Mapping, out: str | os.PathLike) -> None:
    os.makedirs(out, exist_ok=True)
    Path(out, "stress.json").write_text(json.dumps(r, indent=1))
    Path(out, "stress.md").write_text(stress_markdown(r))


# ----------------------------------------------------------------------------- CLI

COMMANDS = ("generate", "stress")


def _define_flags() -> None:
    from absl import flags
    flags.DEFINE_string("workdir", None, "Run directory with checkpoints/.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_string("spec", None, "Cohort spec (JSON; see python -m cxr_rf.cohort's doc).")
    flags.DEFINE_string("out", None, "Output directory (generate: the dataset; stress: reports).")
    flags.DEFINE_integer("batch_size", None, "Images per Sampler batch (default: the run's).")
    flags.DEFINE_integer("shards", None, "ArrayRecord shards = resumable units (default: one "
                         f"per {DEFAULT_SHARD_SIZE} images).")
    flags.DEFINE_enum("format", "arrayrecord", ["arrayrecord"], "Output format.")
    flags.DEFINE_enum("shard", "auto", ["auto", "replicated", "fsdp"], "Parameter placement.")
    flags.DEFINE_integer("steps", None, "ODE steps (default: spec sampling.steps, else the run's).")
    flags.DEFINE_float("cfg", None, "Guidance scale (default: spec sampling.cfg, else the run's).")
    flags.DEFINE_string("guidance", None, "Per-group guidance (default: spec, else the run's).")
    flags.DEFINE_enum("method", None, ["euler", "heun"], "ODE solver.")
    flags.DEFINE_string("cohort", None, "stress: an existing matched cohort.")
    flags.DEFINE_string("classifier", None, "stress: a trained classifier folder.")
    flags.DEFINE_string("attribute", None, "stress --workdir: the varied attribute (sex, age, "
                        "race, view, source or a finding).")
    flags.DEFINE_string("values", None, "stress --workdir: comma list of the arms' values.")
    flags.DEFINE_integer("n", 200, "stress --workdir: images in the matched cohort.")
    flags.DEFINE_integer("seed", 0, "stress --workdir: the cohort's seed; bootstrap seed.")
    flags.DEFINE_integer("bootstrap", 1000, "stress: bootstrap resamples.")
    flags.DEFINE_boolean("progress", True, "Progress bar.")
    for name, lo in (("step", 0), ("batch_size", 1), ("shards", 1), ("steps", 1), ("cfg", 0),
                     ("n", 2), ("bootstrap", 1)):
        cli.check_number(name, lo)
    cli.check_number("seed", 0, 2**32, hi_open=True)


def _generate_kwargs(f) -> dict:
    return dict(step=f.step, batch_size=f.batch_size, shards=f.shards, shard=f.shard,
                steps=f.steps, cfg_scale=f.cfg, guidance=f.guidance, method=f.method,
                progress=f.progress)


def main(argv: list[str]) -> int:
    from absl import flags
    f = flags.FLAGS
    command = argv[1] if len(argv) > 1 else "generate"
    if command not in COMMANDS:
        raise errors.UserError(f"unknown command {command!r}; allowed: {', '.join(COMMANDS)} "
                               "(none: generate)")
    cli.no_arguments(argv[1:])
    cli.require("out")
    if command == "generate":
        cli.require("workdir", "spec")
        cli.input_dir(f.workdir, "--workdir")
        cli.output_dir(f.out, "--out")
        spec = load_spec(f.spec)
        stats = generate(f.workdir, spec, f.out, **_generate_kwargs(f))
        from cxr_rf.data import stats as stats_lib
        print(stats_lib.format_stats(stats))
        print(f"wrote a cohort of {stats['total']['count']} images (split "
              f"{spec['split']!r}) with {MANIFEST} to {os.path.abspath(f.out)}")
        return 0
    cli.require("classifier")
    cli.input_dir(f.classifier, "--classifier")
    cli.output_dir(f.out, "--out")
    from cxr_rf.features import classifier as clf_lib
    clf = clf_lib.load(f.classifier)
    if f.cohort:
        cli.input_dir(f.cohort, "--cohort")
        cohort = f.cohort
    else:
        if not f.workdir or not f.attribute:
            raise errors.UserError("stress needs --cohort DIR, or --workdir RUN and --attribute A")
        cli.input_dir(f.workdir, "--workdir")
        from cxr_rf import sample
        values = None
        if f.values:
            values = [v.strip() for v in f.values.split(",") if v.strip()]
            if f.attribute == "age":
                try:
                    values = [v if v == "unknown" else float(v) for v in values]
                except ValueError:
                    raise errors.UserError(f"--values for age must be numbers; got {f.values!r}") from None
        elif f.attribute not in DEFAULT_VALUES and f.attribute not in cond.FINDINGS:
            raise errors.UserError(f"--attribute {f.attribute!r}: unknown; valid: "
                                   f"{', '.join(ATTRIBUTES)} or a finding")
        marginals, _ = sample.training_defaults(sample.read_config(f.workdir), f.workdir)
        spec = stress_spec(f.attribute, values, f.n, f.seed, marginals)
        cohort = os.path.join(f.out, "cohort")
        generate(f.workdir, spec, cohort, **_generate_kwargs(f))
    r = stress(cohort, clf, n_boot=f.bootstrap, seed=f.seed)
    write_stress(r, f.out)
    print(stress_markdown(r))
    print(f"wrote stress.json and stress.md to {os.path.abspath(f.out)}")
    return 0


if __name__ == "__main__":
    cli.run(main, _define_flags)
