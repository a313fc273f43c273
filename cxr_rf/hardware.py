"""Published per-chip numbers of the accelerators we plan for: dense peak FLOP/s, HBM, and
(TPUs) inter-chip interconnect bandwidth.

Looked up by the exact ``jax.Device.device_kind`` string: a near-miss name is another chip
(H100 PCIe runs bf16 at 756 TFLOP/s, H100 SXM at 989; L4 is not L40), so a kind that is not
listed is refused, never mapped to its nearest neighbour. Used by ``cxr_rf.bench`` (MFU on
real devices; unknown kinds fall back to a measured matmul there) and ``cxr_rf.aot`` (memory
fit, projected step time and collective time on TPU topologies compiled ahead of time).

Where the numbers come from: every row names its source. TPU kinds ("TPU v5 lite" = v5e,
"TPU v5" = v5p, "TPU v6 lite" = v6e, "TPU v4") are what libtpu 0.0.42.1 reports for the
compile-only devices of each generation; GPU kinds are the CUDA device names JAX reports
(what ``nvidia-smi --query-gpu=name`` prints); none of the GPU strings was checked on a
GPU when this table was written.
"""
from __future__ import annotations

import dataclasses

from cxr_rf import errors

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip.

    ``kinds``: the exact device_kind strings of this chip. Peaks are dense (no sparsity) per
    chip; ``f32`` is what an f32 matmul runs at under XLA's default precision (TF32 on GPUs;
    TPUs run f32 matmuls as bf16 passes). ``hbm``: the datasheet capacity. ``hbm_usable``:
    what XLA:TPU lets one chip's program use (the "available HBM" of its compile-time
    out-of-memory error, libtpu 0.0.42.1; ``tests/test_aot.py`` re-measures it), None where
    not measured. ``ici``: bidirectional inter-chip interconnect bandwidth per chip (bytes/s)
    over ``ici_links`` links; None where not planned. ``devices_per_chip``: JAX devices the
    runtime presents per chip by default (2 for TPU v3, one per TensorCore).
    """
    name: str
    kinds: tuple[str, ...]
    bf16: float
    f32: float
    hbm: int
    source: str
    hbm_usable: int | None = None
    ici: float | None = None
    ici_links: int | None = None
    devices_per_chip: int = 1

    @property
    def ici_link_one_way(self) -> float | None:
        """Bytes/s one link carries in one direction."""
        return None if self.ici is None else self.ici / (2 * self.ici_links)


_TPU_V5E = ("https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GB HBM, 400 GBps "
            "bidirectional ICI per chip, 4 ICI ports)")
_TPU_V5P = ("https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GiB HBM, 1200 GBps "
            "bidirectional ICI per chip, 3D torus)")
_TPU_V6E = ("https://cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16, 32 GB HBM, 800 GBps "
            "bidirectional ICI per chip, 4 ICI ports)")
# Google's v4 page gives no per-chip ICI figure; the JAX scaling book's table gives 9e10 B/s
# bidirectional per link and 6 links (3D torus): https://jax-ml.github.io/scaling-book/tpus/
_TPU_V4 = ("https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, 32 GiB HBM); ICI: "
           "https://jax-ml.github.io/scaling-book/tpus/ (9e10 B/s bidirectional per link, "
           "6 links)")
_TPU_V3 = ("https://cloud.google.com/tpu/docs/v3 (123 TFLOP/s bf16 per chip, 32 GiB HBM, "
           "2 TensorCores)")
_H100 = "https://www.nvidia.com/en-us/data-center/h100/ datasheet"
_H100_PCIE = "NVIDIA H100 Tensor Core GPU datasheet (2022), PCIe column"
_H200 = "https://www.nvidia.com/en-us/data-center/h200/ datasheet"
_GH200 = ("https://www.nvidia.com/en-us/data-center/grace-hopper-superchip/ datasheet (96 GB "
          "HBM3 with 480 GB LPDDR5X)")
_B200 = ("https://www.nvidia.com/en-us/data-center/hgx/ HGX B200 (8 GPUs: 36 PF bf16, 18 PF "
         "TF32 with sparsity; 1.44 TB HBM3e)")
_A100 = "https://www.nvidia.com/en-us/data-center/a100/ datasheet"
_L40S = "https://www.nvidia.com/en-us/data-center/l40s/ datasheet"
_L40 = "https://www.nvidia.com/en-us/data-center/l40/ datasheet"
_L4 = "https://www.nvidia.com/en-us/data-center/l4/ datasheet"

CHIPS: tuple[Chip, ...] = (
    # "TPU v5e"/"TPU v5p"/"TPU v6e" are the generation names, kept as aliases: they cannot
    # name another chip.
    Chip("TPU v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 918e12, 32 * GiB, _TPU_V6E,
         hbm_usable=int(31.25 * GiB), ici=800e9, ici_links=4),
    Chip("TPU v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 197e12, 16 * GiB, _TPU_V5E,
         hbm_usable=int(15.75 * GiB), ici=400e9, ici_links=4),
    Chip("TPU v5p", ("TPU v5", "TPU v5p"), 459e12, 459e12, 95 * GiB, _TPU_V5P,
         hbm_usable=102800042229, ici=1200e9, ici_links=6),          # 95.74 GiB
    Chip("TPU v4", ("TPU v4",), 275e12, 275e12, 32 * GiB, _TPU_V4,
         hbm_usable=int(30.75 * GiB), ici=6 * 90e9, ici_links=6),     # megacore: 1 device/chip
    Chip("TPU v3", ("TPU v3",), 123e12, 123e12, 32 * GiB, _TPU_V3, devices_per_chip=2),
    # NVIDIA: written as the datasheet prints them; "x / 2" is half a figure quoted with
    # sparsity (A100, L40S and L40 datasheets print the dense figure as well).
    Chip("NVIDIA H100 SXM", ("NVIDIA H100 80GB HBM3",), 1979e12 / 2, 989e12 / 2, 80 * GiB, _H100),
    Chip("NVIDIA H100 PCIe", ("NVIDIA H100 PCIe",), 1513e12 / 2, 756e12 / 2, 80 * GiB, _H100_PCIE),
    Chip("NVIDIA H100 NVL", ("NVIDIA H100 NVL",), 1671e12 / 2, 835e12 / 2, 94 * GiB, _H100),
    Chip("NVIDIA H200 SXM", ("NVIDIA H200",), 1979e12 / 2, 989e12 / 2, 141 * GiB, _H200),
    Chip("NVIDIA H200 NVL", ("NVIDIA H200 NVL",), 1671e12 / 2, 835e12 / 2, 141 * GiB, _H200),
    Chip("NVIDIA GH200 96GB", ("NVIDIA GH200 480GB",), 1979e12 / 2, 989e12 / 2, 96 * GiB, _GH200),
    Chip("NVIDIA B200", ("NVIDIA B200",), 36e15 / 8 / 2, 18e15 / 8 / 2, 180 * GiB, _B200),
    Chip("NVIDIA A100 80GB", ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"),
         312e12, 156e12, 80 * GiB, _A100),
    Chip("NVIDIA A100 40GB", ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"),
         312e12, 156e12, 40 * GiB, _A100),
    Chip("NVIDIA L40S", ("NVIDIA L40S",), 362.05e12, 183e12, 48 * GiB, _L40S),
    Chip("NVIDIA L40", ("NVIDIA L40",), 181.05e12, 90.5e12, 48 * GiB, _L40),
    Chip("NVIDIA L4", ("NVIDIA L4",), 242e12 / 2, 120e12 / 2, 24 * GiB, _L4),
)

_BY_KIND: dict[str, Chip] = {k: c for c in CHIPS for k in c.kinds}
assert len(_BY_KIND) == sum(len(c.kinds) for c in CHIPS), "a device_kind is listed twice"

# Per JAX device (exact kind, bf16, f32): what cxr_rf.bench reads.
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = tuple(
    (k, c.bf16 / c.devices_per_chip, c.f32 / c.devices_per_chip) for c in CHIPS for k in c.kinds)


def chip(device_kind: str) -> Chip:
    """The table entry of a device_kind (exact match); a UserError naming the known kinds
    when there is none."""
    c = _BY_KIND.get(device_kind)
    if c is None:
        known = ", ".join(sorted(_BY_KIND))
        raise errors.UserError(f"unknown accelerator device_kind {device_kind!r}; known: {known}")
    return c


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float:
    """Dense peak FLOP/s of one chip for matmuls in ``dtype`` ("bfloat16" or "float32")."""
    c = chip(device_kind)
    if dtype not in ("bfloat16", "float32"):
        raise errors.UserError(f"unknown dtype {dtype!r}; allowed: bfloat16, float32")
    return c.bf16 if dtype == "bfloat16" else c.f32
