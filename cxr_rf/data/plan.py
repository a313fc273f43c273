"""Deterministic assignment of a source's Items to splits and shards ("units").

A plan depends only on the source's Items (in their order) and the shard settings, never on
pixels, so an interrupted conversion can recompute it, recognise its own work by the plan's
fingerprint, and skip the units already written. Splits are per patient: the official split
when the source gives one, else a hash of the raw patient id.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Iterable

from cxr_rf.data.sources import Item, Reject

SPLIT_FRACTIONS = (("train", 0.90), ("validation", 0.05), ("test", 0.05))
SPLITS = tuple(s for s, _ in SPLIT_FRACTIONS)
DEFAULT_SHARD_SIZE = 1000  # images per shard when the shard count is not given


def patient_split(patient_key: str) -> str:
    """Deterministic patient-level split (train 90 / validation 5 / test 5) from any stable id."""
    h = int.from_bytes(hashlib.sha256(f"split\x00{patient_key}".encode("utf-8")).digest()[:8], "big")
    u = h / 2.0 ** 64
    edge = 0.0
    for split, frac in SPLIT_FRACTIONS:
        edge += frac
        if u < edge:
            return split
    return SPLIT_FRACTIONS[-1][0]


@dataclasses.dataclass(frozen=True)
class Unit:
    """One shard of one split: the Items it holds, in source order."""
    split: str
    index: int
    items: tuple[Item, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"


@dataclasses.dataclass(frozen=True)
class Plan:
    units: tuple[Unit, ...]
    rejects: tuple[Reject, ...]     # found before any pixel is read (source + planning)
    fingerprint: str                # changes with any Item, reject or setting that shapes output

    @property
    def num_items(self) -> int:
        return sum(len(u.items) for u in self.units)


def make_plan(entries: Iterable[Item | Reject], *, shards: int | None = None,
              shard_size: int = DEFAULT_SHARD_SIZE, settings: dict[str, Any] | None = None) -> Plan:
    """Group Items by split and deal each split round-robin into shards; Items that cannot
    be split (no patient id, unknown split name) become Rejects.

    ``shards`` fixes the number of shards per split (fewer when a split has fewer Items);
    otherwise each split gets ceil(n / shard_size). ``settings`` (resolution, fit, salt digest,
    ...) enter the fingerprint so a resume never mixes output made under other settings.
    """
    by_split: dict[str, list[Item]] = {s: [] for s in SPLITS}
    rejects: list[Reject] = []
    digest = hashlib.sha256(json.dumps(settings or {}, sort_keys=True).encode())
    for e in entries:
        digest.update(_entry_key(e))
        if isinstance(e, Reject):
            rejects.append(e)
        elif not isinstance(e, Item):
            raise TypeError(f"a source yielded {type(e).__name__}; expected Item or Reject")
        elif e.split is not None and e.split not in by_split:
            rejects.append(Reject(e.path, f"unknown split {e.split!r}; expected one of {', '.join(SPLITS)}"))
        elif not e.patient_id:
            rejects.append(Reject(e.path, "no patient id (needed for the patient-level split)"))
        else:
            by_split[e.split or patient_split(e.patient_id)].append(e)
    units: list[Unit] = []
    for split, items in by_split.items():
        n = len(items)
        if not n:
            continue
        k = min(n, shards) if shards else math.ceil(n / shard_size)
        # Round-robin: every shard samples the whole source order (sources often list one
        # hospital, year or patient range after another), and sizes differ by at most one.
        units += [Unit(split, j, tuple(items[j::k])) for j in range(k)]
    digest.update(json.dumps([(u.name, len(u.items)) for u in units]).encode())
    return Plan(units=tuple(units), rejects=tuple(rejects), fingerprint=digest.hexdigest())


def _entry_key(e: Item | Reject) -> bytes:
    if isinstance(e, Reject):
        return json.dumps(["reject", e.path, e.reason]).encode()
    values = [getattr(e, f) for f in _ITEM_FIELDS]
    try:
        values[_ITEM_FIELDS.index("findings")] = [int(x) for x in e.findings]
    except (TypeError, ValueError):  # malformed findings: the worker rejects the Item later
        values[_ITEM_FIELDS.index("findings")] = repr(e.findings)
    return json.dumps(values, default=str).encode()


_ITEM_FIELDS = tuple(f.name for f in dataclasses.fields(Item))

