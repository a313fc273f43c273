"""The condition vocabulary and its mapping to context tokens.

A study's structured metadata becomes a fixed-length row of integer token ids:

    [14 finding tokens | sex | age bin | race | view | source | report bytes ...]

Every group has its own null token, so classifier-free guidance can drop each group
independently (``drop``) and the fully unconditional row is ``null_tokens``. All groups share
one embedding table in the model; ``vocab_size`` is its size. The first ``NUM_STRUCTURED``
tokens are the structured metadata the model pools for adaLN; report tokens (UTF-8 bytes,
optional) only enter joint attention.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from cxr_rf import errors

FINDINGS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)
# Stored as int8 codes in this order. "unmentioned" is never the same as "negative".
STATES: tuple[str, ...] = ("unmentioned", "positive", "negative", "uncertain")
UNMENTIONED, POSITIVE, NEGATIVE, UNCERTAIN = range(4)
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
# Age bins in years: [lo, hi). Bin 0 is "unknown".
AGE_EDGES: tuple[int, ...] = (0, 20, 30, 40, 50, 60, 70, 80, 200)
AGE_BINS: tuple[str, ...] = ("unknown",) + tuple(
    f"{lo}-{hi - 1}" if hi < 200 else f"{lo}+" for lo, hi in zip(AGE_EDGES[:-1], AGE_EDGES[1:]))

GROUPS: tuple[str, ...] = ("findings", "sex", "age", "race", "view", "source", "report")
NUM_STRUCTURED = len(FINDINGS) + 5

# Vocabulary layout: each finding has 4 states + null; each scalar group its values + null;
# report tokens are 256 bytes + pad + null.
_FINDING_VOCAB = len(STATES) + 1
_SIZES = {
    "findings": len(FINDINGS) * _FINDING_VOCAB,
    "sex": len(SEXES) + 1,
    "age": len(AGE_BINS) + 1,
    "race": len(RACES) + 1,
    "view": len(VIEWS) + 1,
    "source": len(SOURCES) + 1,
    "report": 256 + 2,
}
_OFFSETS = dict(zip(GROUPS, np.cumsum([0] + [_SIZES[g] for g in GROUPS[:-1]]).tolist()))
REPORT_PAD = 256
_REPORT_NULL = 257


class ConditionError(errors.UserError):
    """A condition name or value outside the vocabulary."""


def vocab_size() -> int:
    """Size of the shared context-token embedding table."""
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


def _index(value: str, allowed: Sequence[str], what: str) -> int:
    if value not in allowed:
        raise ConditionError(f"unknown {what} {value!r}; valid: {', '.join(allowed)}")
    return allowed.index(value)


def age_bin(age: float | None) -> int:
    """Index into AGE_BINS; None, NaN or negative ages are 'unknown' (0)."""
    if age is None or not math.isfinite(age) or age < 0:
        return 0
    return int(np.searchsorted(AGE_EDGES, age, side="right"))


def null_tokens(report_len: int = 0) -> np.ndarray:
    """The fully dropped (unconditional) token row."""
    nulls = [_OFFSETS["findings"] + i * _FINDING_VOCAB + len(STATES) for i in range(len(FINDINGS))]
    for g, values in zip(GROUPS[1:-1], (SEXES, AGE_BINS, RACES, VIEWS, SOURCES)):
        nulls.append(_OFFSETS[g] + len(values))
    nulls += [_OFFSETS["report"] + _REPORT_NULL] * report_len
    return np.asarray(nulls, np.int32)


def encode(findings: np.ndarray, sex: str = "unknown", age: float | None = None,
           race: str = "unknown", view: str = "unknown", source: str = "unknown",
           report: str = "", report_len: int = 0) -> np.ndarray:
    """Token row for one study. ``findings`` holds 14 state codes (see STATES)."""
    findings = np.asarray(findings)
    if findings.shape != (len(FINDINGS),) or findings.min() < 0 or findings.max() >= len(STATES):
        raise ConditionError(
            f"findings must be {len(FINDINGS)} state codes in 0..{len(STATES) - 1}, got {findings!r}")
    toks = [_OFFSETS["findings"] + i * _FINDING_VOCAB + int(s) for i, s in enumerate(findings)]
    toks.append(_OFFSETS["sex"] + _index(sex, SEXES, "sex"))
    toks.append(_OFFSETS["age"] + age_bin(age))
    toks.append(_OFFSETS["race"] + _index(race, RACES, "race"))
    toks.append(_OFFSETS["view"] + _index(view, VIEWS, "view"))
    toks.append(_OFFSETS["source"] + _index(source, SOURCES, "source"))
    if report_len:
        b = list(report.encode("utf-8")[:report_len])
        b += [REPORT_PAD] * (report_len - len(b))
        toks += [_OFFSETS["report"] + x for x in b]
    return np.asarray(toks, np.int32)


def drop(tokens: np.ndarray, dropped: Mapping[str, bool | np.ndarray]) -> np.ndarray:
    """Replace the groups marked in ``dropped`` by their null tokens.

    ``tokens`` is [..., L]; each value of ``dropped`` is a bool or a bool array over the
    leading dims, so a batch can drop each group per example.
    """
    report_len = tokens.shape[-1] - NUM_STRUCTURED
    nulls = null_tokens(report_len)
    out = np.array(tokens, copy=True)
    for group, mask in dropped.items():
        if group not in GROUPS:
            raise ConditionError(f"unknown condition group {group!r}; valid: {', '.join(GROUPS)}")
        sl = group_slices(report_len)[group]
        mask = np.asarray(mask, bool)[..., None]
        out[..., sl] = np.where(mask, nulls[sl], out[..., sl])
    return out


def dropout(tokens: np.ndarray, rng: np.random.Generator,
            probs: Mapping[str, float]) -> np.ndarray:
    """Classifier-free-guidance dropout: each group dropped independently with its probability."""
    lead = tokens.shape[:-1]
    return drop(tokens, {g: rng.random(lead) < p for g, p in probs.items() if p > 0})


@dataclasses.dataclass(frozen=True)
class Conditions:
    """User-facing conditions for sampling; validated on construction."""
    findings: tuple[int, ...]
    sex: str = "unknown"
    age: float | None = None
    race: str = "unknown"
    view: str = "unknown"
    source: str = "unknown"

    @classmethod
    def parse(cls, findings: str = "", *, sex: str = "unknown", age: float | None = None,
              race: str = "unknown", view: str = "unknown", source: str = "unknown") -> "Conditions":
        """From a comma list such as ``"Cardiomegaly,Pleural Effusion=uncertain"``.

        Listed findings are positive unless ``=state`` says otherwise; unlisted ones are
        negative, and "No Finding" is positive when nothing else is positive.
        """
        states = {f: NEGATIVE for f in FINDINGS}
        for item in (s.strip() for s in findings.split(",")):
            if not item:
                continue
            name, _, state = (x.strip() for x in item.partition("="))
            _index(name, FINDINGS, "finding")
            states[name] = _index(state or "positive", STATES, f"state for {name!r}")
        if "No Finding" not in findings:
            any_pos = any(v == POSITIVE for k, v in states.items() if k != "No Finding")
            states["No Finding"] = NEGATIVE if any_pos else POSITIVE
        sex_map = {"male": "M", "female": "F"}
        sex = sex_map.get(sex.lower(), sex.upper() if sex.lower() in ("m", "f") else sex)
        view = view.upper() if view.lower() in ("pa", "ap", "lateral") else view
        _index(sex, SEXES, "sex")
        _index(race, RACES, "race")
        _index(view, VIEWS, "view")
        _index(source, SOURCES, "source")
        if age is not None and not (0 <= age < 150):
            raise ConditionError(f"age must be in [0, 150) years, got {age}")
        return cls(tuple(states[f] for f in FINDINGS), sex, age, race, view, source)

    def tokens(self, report: str = "", report_len: int = 0) -> np.ndarray:
        """Token row for these conditions."""
        return encode(np.asarray(self.findings), self.sex, self.age, self.race, self.view,
                      self.source, report, report_len)

    def describe(self) -> dict:
        """JSON-friendly form (for manifests)."""
        return {
            "findings": {f: STATES[s] for f, s in zip(FINDINGS, self.findings)},
            "sex": self.sex, "age": self.age, "race": self.race, "view": self.view,
            "source": self.source,
        }

    def label(self) -> str:
        """Short human label (for sample grids)."""
        pos = [f for f, s in zip(FINDINGS, self.findings) if s == POSITIVE]
        age = "?" if self.age is None else f"{self.age:g}"
        return f"{', '.join(pos) or 'none'} | {self.sex} {age}y {self.view}"
