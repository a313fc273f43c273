"""What runs write for people: PNGs, labelled grids, manifests, TensorBoard scalars, progress."""
from __future__ import annotations

import json
import math
import textwrap
from typing import Iterable, Mapping, Sequence

import numpy as np
import tqdm
from etils import epath
from PIL import Image, ImageDraw, ImageFont


def to_uint(x: np.ndarray, bits: int = 8) -> np.ndarray:
    """[-1, 1] floats -> uint8 or uint16 pixels (clipped)."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    top = (1 << bits) - 1
    x = np.clip((np.asarray(x, np.float32) + 1.0) * 0.5, 0.0, 1.0)
    return np.round(x * top).astype(np.uint8 if bits == 8 else np.uint16)


def write_png(path: str | epath.Path, x_HW: np.ndarray, bits: int = 8) -> None:
    """One grayscale image in [-1, 1] as an 8- or 16-bit PNG."""
    px = to_uint(np.squeeze(x_HW), bits)
    img = Image.fromarray(px, mode="L") if bits == 8 else Image.fromarray(px)
    with epath.Path(path).open("wb") as f:
        img.save(f, format="PNG")


def grid(images: Sequence[np.ndarray], labels: Sequence[str] | None = None,
         cols: int | None = None, tile: int = 128) -> Image.Image:
    """A labelled contact sheet of [-1, 1] grayscale images (each upscaled to ``tile``).

    A label is "first part | second part" (findings | demographics); each part is wrapped to
    the tile's width, never cut, and every tile gets room for the longest label.
    """
    n = len(images)
    cols = cols or min(n, 4)
    rows = math.ceil(n / cols)
    font = ImageFont.load_default()
    width = max(tile // 6, 8)            # characters of the default font per tile
    lines = [[line for part in label.split(" | ")
              for line in (textwrap.wrap(part, width) or [""])] for label in (labels or [])]
    text_h = 12 * max((len(x) for x in lines), default=0)
    sheet = Image.new("L", (cols * tile, rows * (tile + text_h)), color=0)
    draw = ImageDraw.Draw(sheet)
    for i, x in enumerate(images):
        r, c = divmod(i, cols)
        im = Image.fromarray(to_uint(np.squeeze(x)), mode="L").resize((tile, tile), Image.BILINEAR)
        sheet.paste(im, (c * tile, r * (tile + text_h) + text_h))
        for k, line in enumerate(lines[i] if lines else ()):
            draw.text((c * tile + 2, r * (tile + text_h) + 12 * k), line, fill=255, font=font)
    return sheet


def to_json(obj):
    """``obj`` with NaN/inf floats as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_manifest(path: str | epath.Path, rows: Iterable[Mapping]) -> None:
    """One JSON object per line."""
    with epath.Path(path).open("w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


class MetricWriter:
    """TensorBoard scalars via tensorboardX (no TensorFlow).

    Local event files are flushed at every call. On gs:// tensorboardX re-uploads the whole
    events object at each flush (and GCS allows about one write per second per object), so
    there the writer flushes every ``remote_flush_secs`` and on close instead.
    """

    def __init__(self, logdir: str | epath.Path, remote_flush_secs: int = 60):
        from tensorboardX import SummaryWriter
        self._remote = "://" in str(logdir)
        self._w = SummaryWriter(str(logdir), flush_secs=remote_flush_secs)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self._w.add_scalar(k, v, step)
        if not self._remote:
            self._w.flush()

    def close(self) -> None:
        self._w.close()


def progress(start: int, total: int, enabled: bool = True) -> tqdm.tqdm:
    """Step progress bar with ETA; disabled bars still track ``n``."""
    return tqdm.tqdm(initial=start, total=total, disable=not enabled, unit="step",
                     dynamic_ncols=True, desc="train")
