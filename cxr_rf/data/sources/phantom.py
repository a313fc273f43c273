"""The procedural phantom (cxr_rf.data.phantom) as a source: no files, pixels rendered on demand.

An Item's path is ``phantom://SEED/INDEX``; ``items`` fills the metadata from the cheap
``phantom.describe`` and this module's ``load`` renders the pixels in the converter's worker
processes, so planning splits and shards costs milliseconds and rendering runs in parallel.
"""
from __future__ import annotations

import re
from typing import Iterator

import numpy as np

from cxr_rf.data.sources import Item, SourceError

NAME = "phantom"
MAPPING = """\
| phantom field | Record field |
|---|---|
| findings (generated CheXpert-style codes) | findings, unchanged |
| sex, age, race, view, site, report | same names, unchanged |
| patient_id, study_id | salted hash of the generator's ids |
"""
_PATH = re.compile(r"^phantom://(-?\d+)/(\d+)$")


def items(input_dir: str | None, opts) -> Iterator[Item]:
    """``opts.num`` phantom studies of ``opts.seed``, split by patient hash."""
    if input_dir:
        raise SourceError("the phantom source takes no --input")
    if opts.num is None or opts.num <= 0:
        raise SourceError(f"the phantom source needs --num > 0; got {opts.num}")
    from cxr_rf.data import phantom  # imported late: only this source needs it
    for index in range(opts.num):
        meta = phantom.describe(opts.seed, index)
        age = -1.0 if meta["age"] is None else float(meta["age"])
        yield Item(path=f"phantom://{opts.seed}/{index}", split=None,
                   findings=np.asarray(meta["findings"], np.int8), sex=meta["sex"], age=age,
                   race=meta["race"], view=meta["view"], source=NAME, site=meta["site"],
                   patient_id=str(meta["patient_id"]), study_id=str(meta["study_id"]),
                   report=meta["report"])


def load(item: Item, resolution: int, fit: str) -> np.ndarray:
    """Render the study at ``resolution`` (already square, so ``fit`` has nothing to do)."""
    from cxr_rf.data import phantom
    m = _PATH.match(item.path)
    if not m:
        raise ValueError(f"not a phantom path: {item.path!r}")
    return phantom.generate(int(m.group(1)), int(m.group(2)), resolution).image
