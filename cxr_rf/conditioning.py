"""The condition vocabulary and its mapping to context tokens.

A study's structured metadata becomes a fixed-length row of integer token ids:

    [14 finding tokens | sex | age | race | view | source | report bytes ...]

Every group has its own null token ("not specified"), distinct from the data value "unknown"
(a record that says it does not know). Classifier-free guidance trains the nulls by dropping
groups (``dropout``: all groups at once, and each group on its own) and the sampler's
unconditional row is ``null_tokens``. All groups share one embedding table in the model;
``vocab_size`` is its size. The first ``NUM_STRUCTURED`` tokens are the structured metadata the
model pools for adaLN; report tokens (UTF-8 bytes, optional) only enter joint attention, and
padding bytes are masked there.

Age is continuous: a known age is the id ``vocab_size() + round(years * AGE_STEPS_PER_YEAR)``,
outside the table; the model embeds the row ``age_value`` plus Fourier features of the years
(``age_years``), so "30 years younger" is a meaningful edit rather than a move between bins.
``AGE_BINS`` only remain for the printed marginals of a dataset.

``LAYOUT`` numbers the token layout. Runs record it (``data.token_layout``); a checkpoint
trained on another layout is refused, because its embedding rows would mean other things.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from cxr_rf import errors

# 1: decade age bins, no joint drop.  2: continuous age, "not specified" nulls in sampling,
# joint drop-everything in training, report padding masked.
LAYOUT = 2

FINDINGS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)
# Stored as int8 codes in this order. "unmentioned" is never the same as "negative".
STATES: tuple[str, ...] = ("unmentioned", "positive", "negative", "uncertain")
UNMENTIONED, POSITIVE, NEGATIVE, UNCERTAIN = range(4)
# A finding code only conditions use (never stored): not specified, i.e. the finding's null token.
UNSPECIFIED = len(STATES)
REQUEST_STATES: tuple[str, ...] = STATES + ("unspecified",)
SEXES: tuple[str, ...] = ("unknown", "M", "F")
RACES: tuple[str, ...] = ("unknown", "White", "Black", "Asian", "Other")
VIEWS: tuple[str, ...] = ("unknown", "PA", "AP", "LATERAL")
# The one list of sources: ``cxr_rf.data.sources`` has a module for each name but "unknown"
# and derives its list from this one. The position is the token id, which trained checkpoints
# depend on (tests/test_sources.py pins it): append only, and know that a new source still
# grows ``vocab_size`` and moves the report ids behind it.
SOURCES: tuple[str, ...] = (
    "unknown", "phantom", "mimic_cxr_jpg", "chexpert", "nih_cxr14", "padchest", "vindr_cxr",
    "brax", "rexgradient", "openi", "dicom_dir",
)
# Ages are years in [0, MAX_AGE); a known age is resolved to 1/AGE_STEPS_PER_YEAR years.
MAX_AGE = 150.0
AGE_STEPS_PER_YEAR = 10
# The age slot's table rows: a record's "unknown", the row every known age adds its Fourier
# features to, then the null.
AGE_ROWS: tuple[str, ...] = ("unknown", "value")
# Age bins in years, [lo, hi), for the printed marginals of a dataset only. Bin 0 is "unknown".
AGE_EDGES: tuple[int, ...] = (0, 20, 30, 40, 50, 60, 70, 80, 200)
AGE_BINS: tuple[str, ...] = ("unknown",) + tuple(
    f"{lo}-{hi - 1}" if hi < 200 else f"{lo}+" for lo, hi in zip(AGE_EDGES[:-1], AGE_EDGES[1:]))

GROUPS: tuple[str, ...] = ("findings", "sex", "age", "race", "view", "source", "report")
# Names for several groups at once (per-group guidance, dropping).
GROUP_SETS: dict[str, tuple[str, ...]] = {"demographics": ("sex", "age", "race")}
NUM_STRUCTURED = len(FINDINGS) + 5
AGE_POS = len(FINDINGS) + 1          # the age slot's position in a token row

# Vocabulary layout: each finding has 4 states + null; each scalar group its values + null;
# report tokens are 256 bytes + pad + null.
_FINDING_VOCAB = len(STATES) + 1
_SCALARS: dict[str, tuple[str, ...]] = {
    "sex": SEXES, "age": AGE_ROWS, "race": RACES, "view": VIEWS, "source": SOURCES}
_SIZES = {
    "findings": len(FINDINGS) * _FINDING_VOCAB,
    **{g: len(v) + 1 for g, v in _SCALARS.items()},
    "report": 256 + 2,
}
_OFFSETS = dict(zip(GROUPS, np.cumsum([0] + [_SIZES[g] for g in GROUPS[:-1]]).tolist()))
REPORT_PAD = 256
_REPORT_NULL = 257


class ConditionError(errors.UserError):
    """A condition name or value outside the vocabulary."""


def check_layout(cfg, where: str) -> None:
    """UserError unless a run's config (``data.token_layout``; runs before it existed are
    layout 1) was trained on this code's token layout."""
    layout = int(cfg.data.get("token_layout", 1))
    if layout != LAYOUT:
        raise ConditionError(
            f"{where} was trained with condition-token layout {layout}, this cxr_rf reads "
            f"layout {LAYOUT} (continuous age, trained null tokens, masked report padding): its "
            "embeddings mean other things here; retrain it, or use the cxr_rf that trained it")


def vocab_size() -> int:
    """Size of the shared context-token embedding table (known ages lie beyond it)."""
    return sum(_SIZES.values())


def num_tokens(report_len: int = 0) -> int:
    """Length of a token row: the structured tokens plus ``report_len`` report bytes."""
    return NUM_STRUCTURED + report_len


def group_slices(report_len: int = 0) -> dict[str, slice]:
    """Positions of each group in a token row."""
    n = len(FINDINGS)
    out = {"findings": slice(0, n)}
    for i, g in enumerate(GROUPS[1:-1]):
        out[g] = slice(n + i, n + i + 1)
    out["report"] = slice(NUM_STRUCTURED, NUM_STRUCTURED + report_len)
    return out


def expand_groups(names: Sequence[str]) -> tuple[str, ...]:
    """Group names with the ``GROUP_SETS`` aliases (``demographics``) expanded, in order."""
    out: list[str] = []
    for name in names:
        if name not in GROUPS and name not in GROUP_SETS:
            raise ConditionError(f"unknown condition group {name!r}; valid: "
                                 f"{', '.join(GROUPS + tuple(GROUP_SETS))}")
        out += [g for g in GROUP_SETS.get(name, (name,)) if g not in out]
    return tuple(out)


def _index(value: str, allowed: Sequence[str], what: str) -> int:
    if value not in allowed:
        raise ConditionError(f"unknown {what} {value!r}; valid: {', '.join(allowed)}")
    return allowed.index(value)


def age_bin(age: float | None) -> int:
    """Index into AGE_BINS (dataset marginals); None, NaN or negative ages are 'unknown' (0)."""
    if age is None or not math.isfinite(age) or age < 0:
        return 0
    return int(np.searchsorted(AGE_EDGES, age, side="right"))


def age_token(age: float | str | None) -> int:
    """The age slot's id: a number of years in [0, MAX_AGE) (continuous, beyond the table),
    "unknown" (or a stored -1 / NaN: the record does not know) or None (not specified)."""
    base = _OFFSETS["age"]
    if age is None:
        return base + len(AGE_ROWS)
    if isinstance(age, str):
        if age != "unknown":
            raise ConditionError(f"age must be a number of years, 'unknown' or unset; got {age!r}")
        return base
    age = float(age)
    if math.isnan(age) or age == -1.0:
        return base
    if not 0.0 <= age < MAX_AGE:
        raise ConditionError(f"age must be in [0, {MAX_AGE:g}) years, got {age:g}")
    return vocab_size() + int(round(age * AGE_STEPS_PER_YEAR))


def age_value_row() -> int:
    """The table row every known age embeds (its years add Fourier features on top)."""
    return _OFFSETS["age"] + AGE_ROWS.index("value")


def age_years(tokens):
    """Years of the ids ``age_token`` gave known ages (numpy or jax arrays; meaningless for
    other ids, which are < ``vocab_size()``)."""
    return (tokens - vocab_size()) / AGE_STEPS_PER_YEAR


def report_pad_id() -> int:
    """The id of report padding (masked in attention; not the null report)."""
    return _OFFSETS["report"] + REPORT_PAD


def null_tokens(report_len: int = 0) -> np.ndarray:
    """The fully dropped (unconditional) token row."""
    nulls = [_OFFSETS["findings"] + i * _FINDING_VOCAB + UNSPECIFIED for i in range(len(FINDINGS))]
    nulls += [_OFFSETS[g] + len(values) for g, values in _SCALARS.items()]
    nulls += [_OFFSETS["report"] + _REPORT_NULL] * report_len
    return np.asarray(nulls, np.int32)


def encode(findings: np.ndarray, sex: str | None = "unknown", age: float | str | None = -1.0,
           race: str | None = "unknown", view: str | None = "unknown",
           source: str | None = "unknown", report: str | None = "",
           report_len: int = 0) -> np.ndarray:
    """Token row for one study. ``findings`` holds 14 codes (see STATES; ``UNSPECIFIED`` is
    the finding's null); None for any other field is that group's null token. The defaults
    are what a record that knows nothing stores (``unknown``, age -1, no report)."""
    findings = np.asarray(findings)
    if (findings.shape != (len(FINDINGS),) or findings.min() < 0
            or findings.max() > UNSPECIFIED):
        raise ConditionError(f"findings must be {len(FINDINGS)} codes in 0..{UNSPECIFIED} "
                             f"({', '.join(REQUEST_STATES)}), got {findings!r}")
    toks = [_OFFSETS["findings"] + i * _FINDING_VOCAB + int(s) for i, s in enumerate(findings)]
    for g, value in (("sex", sex), ("age", age), ("race", race), ("view", view),
                     ("source", source)):
        if g == "age":
            toks.append(age_token(age))
        elif value is None:
            toks.append(_OFFSETS[g] + len(_SCALARS[g]))
        else:
            toks.append(_OFFSETS[g] + _index(value, _SCALARS[g], g))
    if report_len:
        if report is None:
            toks += [_OFFSETS["report"] + _REPORT_NULL] * report_len
        else:
            b = list(report.encode("utf-8")[:report_len])
            b += [REPORT_PAD] * (report_len - len(b))
            toks += [_OFFSETS["report"] + x for x in b]
    return np.asarray(toks, np.int32)


def drop(tokens: np.ndarray, dropped: Mapping[str, bool | np.ndarray]) -> np.ndarray:
    """Replace the groups marked in ``dropped`` by their null tokens.

    ``tokens`` is [..., L]; each value of ``dropped`` is a bool or a bool array over the
    leading dims, so a batch can drop each group per example. Keys are groups or
    ``GROUP_SETS`` names.
    """
    report_len = tokens.shape[-1] - NUM_STRUCTURED
    nulls = null_tokens(report_len)
    slices = group_slices(report_len)
    out = np.array(tokens, copy=True)
    for name, mask in dropped.items():
        for group in expand_groups([name]):
            sl = slices[group]
            m = np.asarray(mask, bool)[..., None]
            out[..., sl] = np.where(m, nulls[sl], out[..., sl])
    return out


def keep_only(tokens: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    """``tokens`` with every group not in ``groups`` replaced by its null (a guidance branch)."""
    kept = set(expand_groups(groups))
    return drop(tokens, {g: True for g in GROUPS if g not in kept})


def dropout(tokens: np.ndarray, rng: np.random.Generator,
            probs: Mapping[str, float]) -> np.ndarray:
    """Classifier-free-guidance dropout of a token row (or a batch of rows).

    ``probs["all"]`` drops every group at once (the row the sampler guides against, as in
    SD3); otherwise each group is dropped independently with its own probability. Both draws
    are always made, so the random stream does not depend on the outcome.
    """
    lead = tokens.shape[:-1]
    joint = rng.random(lead) < probs.get("all", 0.0)
    per_group = {g: rng.random(lead) < p for g, p in probs.items() if g != "all" and p > 0}
    masks = {g: joint | per_group.get(g, False) for g in GROUPS}
    return drop(tokens, masks)


def _scalar(value: str | None, allowed: Sequence[str], what: str,
            aliases: Mapping[str, str] = {}) -> str | None:
    if value is None:
        return None
    value = aliases.get(value.lower(), value)
    _index(value, allowed, what)
    return value


@dataclasses.dataclass(frozen=True)
class Conditions:
    """User-facing conditions for sampling; validated on construction (through ``parse``).

    None means "not specified": the group's null token, which classifier-free-guidance
    training teaches the model as "any value". ``"unknown"`` is a data value (records that
    say they do not know), not the same thing. ``findings`` holds one code per FINDINGS entry,
    ``UNSPECIFIED`` for the finding's null.
    """
    findings: tuple[int, ...]
    sex: str | None = None
    age: float | str | None = None
    race: str | None = None
    view: str | None = None
    source: str | None = None
    report: str | None = None

    @classmethod
    def parse(cls, findings: str = "", *, sex: str | None = None,
              age: float | str | None = None, race: str | None = None, view: str | None = None,
              source: str | None = None, report: str | None = None,
              unlisted: Mapping[str, int] | None = None) -> "Conditions":
        """From a comma list such as ``"Cardiomegaly,Pleural Effusion=uncertain"``.

        Listed findings are positive unless ``=state`` says otherwise (a STATES name or
        ``unspecified``). Unlisted findings take ``unlisted[name]`` (the sampler passes the
        training data's most common state, ``data.stats.unlisted_defaults``), else negative;
        an unlisted "No Finding" is positive when nothing else is positive and otherwise
        takes its unlisted state (negative when that would be positive).
        """
        unlisted = dict(unlisted or {})
        states = {f: int(unlisted.get(f, NEGATIVE)) for f in FINDINGS}
        listed = set()
        for item in (s.strip() for s in findings.split(",")):
            if not item:
                continue
            name, _, state = (x.strip() for x in item.partition("="))
            _index(name, FINDINGS, "finding")
            states[name] = _index(state or "positive", REQUEST_STATES, f"state for {name!r}")
            listed.add(name)
        if "No Finding" not in listed:
            any_pos = any(v == POSITIVE for k, v in states.items() if k != "No Finding")
            otherwise = states["No Finding"]
            states["No Finding"] = (POSITIVE if not any_pos
                                    else NEGATIVE if otherwise == POSITIVE else otherwise)
        sex = _scalar(sex, SEXES, "sex", {"m": "M", "male": "M", "f": "F", "female": "F"})
        view = _scalar(view, VIEWS, "view", {"pa": "PA", "ap": "AP", "lateral": "LATERAL"})
        race = _scalar(race, RACES, "race")
        source = _scalar(source, SOURCES, "source")
        age_token(age)    # validates
        if age is not None and not isinstance(age, str):
            age = float(age)
        return cls(tuple(states[f] for f in FINDINGS), sex, age, race, view, source, report)

    def tokens(self, report_len: int = 0) -> np.ndarray:
        """Token row for these conditions."""
        return encode(np.asarray(self.findings), self.sex, self.age, self.race, self.view,
                      self.source, self.report, report_len)

    def describe(self) -> dict:
        """JSON-friendly form (for manifests); None = not specified."""
        return {
            "findings": {f: REQUEST_STATES[s] for f, s in zip(FINDINGS, self.findings)},
            "sex": self.sex, "age": self.age, "race": self.race, "view": self.view,
            "source": self.source, "report": self.report,
        }

    def requested(self) -> dict[str, list[str]]:
        """{group: [values]} of what these conditions ask for, in the data's vocabulary
        (``findings`` as "Name=state"), not-specified groups left out: what the sampler
        checks against the training marginals."""
        out = {"findings": [f"{f}={STATES[s]}" for f, s in zip(FINDINGS, self.findings)
                            if s != UNSPECIFIED]}
        for g in ("sex", "race", "view", "source"):
            if getattr(self, g) is not None:
                out[g] = [getattr(self, g)]
        if self.age is not None:
            out["age"] = [AGE_BINS[0 if isinstance(self.age, str) else age_bin(self.age)]]
        return out

    def label(self) -> str:
        """Human label for sample grids: every positive finding (uncertain ones with '?'),
        then the demographics ('-' = not specified)."""
        pos = [f + ("?" if s == UNCERTAIN else "") for f, s in zip(FINDINGS, self.findings)
               if s in (POSITIVE, UNCERTAIN) and f != "No Finding"]
        age = ("-" if self.age is None else "?" if isinstance(self.age, str)
               else f"{self.age:g}y")
        demo = " ".join(v or "-" for v in (self.sex, age, self.view))
        return f"{', '.join(pos) or 'no finding'} | {demo}"
