"""Published per-chip numbers of the accelerators we plan for: dense peak FLOP/s and HBM.

Looked up by ``jax.Device.device_kind`` (case-insensitive substring match, first match wins,
so the more specific names come first). Used by ``cxr_rf.bench`` (MFU on real devices) and
``cxr_rf.aot`` (memory fit and projected step time on TPU topologies compiled ahead of time).

device_kind strings as JAX reports them: v5e is "TPU v5 lite", v5p is "TPU v5", v6e
(Trillium) is "TPU v6 lite", v4 is "TPU v4"; GPUs report e.g. "NVIDIA H100 80GB HBM3".
"""
from __future__ import annotations

import dataclasses

from cxr_rf import errors

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip.

    ``match``: substrings that must all occur in the device_kind. Peaks are dense (no
    sparsity) per chip; ``f32`` is what an f32 matmul runs at under XLA's default precision
    (TF32 on GPUs; TPUs run f32 matmuls as bf16 passes). ``devices_per_chip``: how many JAX
    devices the runtime presents per chip by default (2 for TPU v2/v3, one per TensorCore).
    """
    name: str
    match: tuple[str, ...]
    bf16: float
    f32: float
    hbm: int
    devices_per_chip: int = 1


CHIPS: tuple[Chip, ...] = (
    Chip("TPU v6e", ("TPU v6 lite",), 918e12, 918e12, 32 * GiB),
    Chip("TPU v6e", ("TPU v6e",), 918e12, 918e12, 32 * GiB),
    Chip("TPU v5e", ("TPU v5 lite",), 197e12, 197e12, 16 * GiB),
    Chip("TPU v5e", ("TPU v5e",), 197e12, 197e12, 16 * GiB),
    Chip("TPU v5p", ("TPU v5p",), 459e12, 459e12, 95 * GiB),
    Chip("TPU v5p", ("TPU v5",), 459e12, 459e12, 95 * GiB),   # v5p reports plain "TPU v5"
    Chip("TPU v4", ("TPU v4",), 275e12, 275e12, 32 * GiB),
    Chip("TPU v3", ("TPU v3",), 123e12, 123e12, 32 * GiB, devices_per_chip=2),
    Chip("NVIDIA H200", ("H200",), 989e12, 494e12, 141 * GiB),
    Chip("NVIDIA H100", ("H100",), 989e12, 494e12, 80 * GiB),
    Chip("NVIDIA B200", ("B200",), 2250e12, 1100e12, 180 * GiB),
    Chip("NVIDIA A100 80GB", ("A100", "80GB"), 312e12, 156e12, 80 * GiB),
    Chip("NVIDIA A100 40GB", ("A100",), 312e12, 156e12, 40 * GiB),
    Chip("NVIDIA L40S", ("L40S",), 362e12, 183e12, 48 * GiB),
    Chip("NVIDIA L4", ("L4",), 121e12, 60e12, 24 * GiB),
    Chip("NVIDIA A10G", ("A10G",), 70e12, 35e12, 24 * GiB),
)

# Per JAX device (kind substring, bf16, f32), in match order: what cxr_rf.bench reads.
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = tuple(
    (c.match[0], c.bf16 / c.devices_per_chip, c.f32 / c.devices_per_chip)
    for c in CHIPS if len(c.match) == 1)


def chip(device_kind: str) -> Chip:
    """The table entry of a device_kind; a UserError (a topology or device this table does not
    know) naming the known kinds when there is none."""
    kind = device_kind.lower()
    for c in CHIPS:
        if all(m.lower() in kind for m in c.match):
            return c
    known = ", ".join(sorted({" + ".join(c.match) for c in CHIPS}))
    raise errors.UserError(f"unknown accelerator device_kind {device_kind!r}; known: {known}")


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float:
    """Dense peak FLOP/s of one chip for matmuls in ``dtype`` ("bfloat16" or "float32")."""
    c = chip(device_kind)
    if dtype not in ("bfloat16", "float32"):
        raise errors.UserError(f"unknown dtype {dtype!r}; allowed: bfloat16, float32")
    return c.bf16 if dtype == "bfloat16" else c.f32
