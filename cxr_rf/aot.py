"""Plan a run on a TPU topology without the TPU: compile the exact train step ahead of time.

    python -m cxr_rf.aot --config experiments/cxr_xl.py --topology v5p:4x4x4 \
        [--per_device_batch 16] [--stage N] [--mfu 0.4] [--max_hbm_fraction 0.9] \
        [--json plan.json] [--hlo step.hlo] [--config.x=y ...]

Needs libtpu (``pip install -e '.[tpu]'``), not a TPU: libtpu describes any topology
("v5e:4x4", "v5p:4x4x4", "v6e:8x8", "v4:2x2x2"; chips per axis) and XLA:TPU compiles the
sharded step for it, with the slice's wrap-around links where it has them (``torus_wrap``).
Reports, for one resolution stage (default: the last, largest one):

- the mesh, global / per-device batch, microbatches and remat of that stage;
- per-chip memory of the compiled step (arguments, outputs, aliased = donated state written
  in place, temporaries, code) against the HBM XLA can use on that chip (measured from
  libtpu, e.g. 15.75 GiB of v5e's 16): it fits when it needs at most ``--max_hbm_fraction``
  (0.9) of that, because the runtime reserves more HBM when the program loads than the
  compile-time check counts;
- FLOPs per step per chip from XLA's cost analysis beside the analytic estimate;
- the bytes the step's collectives move per chip (``collective_bytes``) and the time they
  take on the slice's inter-chip links (``ici_bytes_per_s``);
- step time, images/s and image tokens/s projected at a model-FLOPs utilisation (MFU), the
  step time once the collectives are counted (overlapped with compute: the larger of the
  two; not overlapped: their sum), and the chip-hours of the whole run (every stage's steps
  × its step time at that MFU).

Autoencoder configs (``task == "autoencoder"``, ``cxr_rf.autoencoder``): the same report for
``AETrainer``'s GAN-phase step (generator + discriminator updates, the larger of its two
programs), compiled from abstract inputs (``AETrainer.abstract_inputs``: no init, no data),
and, unless ``--norecon_phase``, the reconstruction-only step of the steps before
``gan_start`` (its memory, FLOPs and fit; the plan fits when both do). There is no analytic
FLOP formula for the conv autoencoder: step time, images/s and the run's chip-hours use the
compiled FLOPs (no loops or remat there, so XLA counts every op once; they include the
discriminator and the optimizers), per phase: gan_start steps of the reconstruction program,
train.steps − gan_start of the GAN one. The architecture is the config's (``init_from``'s
FLUX.2 weights are not read), and a perceptual term (``ae_loss.perceptual_features``) loads
its extractor from that folder as training does.

Exit status: 0 fits, 1 does not fit ("does not fit: X GiB > Y GiB = 90% of Z GiB usable
HBM"), 2 bad input (topology, config, stage) or libtpu missing, 3 an unexpected failure
(with its traceback).

Semantics worth knowing (measured with libtpu 0.0.42.1 / jax 0.10.2):
- ``cost_analysis()["flops"]`` is per device: the cost of the partitioned (SPMD) program one
  device runs, not of the global computation.
- It counts the body of a while loop once, whatever its trip count: with ``model.scan`` the
  (depth-1) scanned blocks count as one block, and with microbatches > 1 the whole gradient
  computation counts as one microbatch. The analytic column it is compared with counts the
  same way ("as XLA counts"); the projections use the analytic FLOPs of the whole step.
  The collective count below does multiply by trip counts.
- MFU counts model FLOPs (3× forward per training step); rematerialised recompute is not
  model work, so remat lowers the achievable MFU rather than raising the step's FLOPs.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import sys
import time
from typing import Any

import ml_collections

from cxr_rf import config as config_lib
from cxr_rf import errors, hardware

TPU_EXTRA = "install the tpu extra: pip install -e '.[tpu]'"
TOPOLOGY_RE = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+){1,2})$")
ACCELERATOR_TYPE_RE = re.compile(r"^(v\d+[a-z]*|v5litepod)-(\d+)$")
EXAMPLES = "e.g. v5e:4x4, v5p:2x2x2, v6e:8x8, v4:2x2x2"
GiB = 2**30
# Share of the usable HBM a plan may fill: XLA's compile-time limit (e.g. 15.75 GiB on v5e) is
# not all the runtime grants when the program loads (issue 10: runs that passed a tight
# compile-time check failed at the runtime's reservation).
MAX_HBM_FRACTION = 0.9


class PlanError(errors.UserError):
    """Bad input to the planner (topology, config, stage, missing libtpu): one line, exit 2."""


# ----------------------------------------------------------------------------- arithmetic
# Pure functions (no JAX, no libtpu): tested everywhere.

def train_flops_factor(remat: str) -> float:
    """FLOPs of a training step in forwards: forward + backward (2×) = 3, plus one forward of
    the blocks recomputed on backward for "full" and "save_attn" (which keeps only the
    attention outputs). "dots" recomputes only elementwise ops; "dots_no_batch" recomputes
    the attention matmuls (~10% of a forward at 512², patch 16), counted here as 3."""
    return 4.0 if remat in ("full", "save_attn") else 3.0


def model_side(cfg: ml_collections.ConfigDict, resolution: int) -> int:
    """The side of the model's input for a stage at ``resolution`` pixels: the pixels, or
    for a latent run (``data.latents``) the latent grid (``step.grid_size``)."""
    from cxr_rf import step as step_lib
    c = cfg.copy_and_resolve_references()
    c.data.resolution = int(resolution)
    return step_lib.grid_size(c)


def model_flops_per_image(cfg: ml_collections.ConfigDict, resolution: int) -> float:
    """Model FLOPs of one training image (3× the analytic forward; what MFU is measured on)."""
    from cxr_rf.model import ModelConfig, flops_per_image
    return 3.0 * flops_per_image(ModelConfig.from_config(cfg), resolution)


def xla_counted_forward(cfg: ml_collections.ConfigDict, resolution: int) -> float:
    """The analytic forward FLOPs of one image counted as XLA's cost analysis counts them: a
    scanned stack of L = depth-1 blocks is one while loop whose body (``scan_unroll`` = u
    blocks) counts once, plus the L mod u blocks JAX runs outside it."""
    from cxr_rf.model import ModelConfig, flops_per_image
    mcfg = ModelConfig.from_config(cfg)
    if mcfg.scan and mcfg.depth > 2:
        blocks, unroll = mcfg.depth - 1, min(mcfg.scan_unroll, mcfg.depth - 1)
        mcfg = dataclasses.replace(mcfg, depth=unroll + blocks % unroll + 1)
    return flops_per_image(mcfg, resolution)


def step_seconds(model_flops_per_step: float, chips: int, peak_per_chip: float,
                 mfu: float) -> float:
    """Seconds per step when ``chips`` chips of ``peak_per_chip`` FLOP/s run at ``mfu``."""
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    return model_flops_per_step / (chips * peak_per_chip * mfu)


def run_cost(cfg: ml_collections.ConfigDict, chips: int, peak_per_chip: float,
             mfu: float) -> dict:
    """Every stage's steps × step time at ``mfu`` on ``chips`` chips: per-stage rows and the
    totals in chip-hours and wall-clock hours (chip-hours do not depend on the chip count at
    a fixed MFU)."""
    rows = []
    for st in config_lib.stages(cfg):
        steps = st.end - st.start
        flops = model_flops_per_image(cfg, model_side(cfg, st.resolution)) * st.batch_size
        dt = step_seconds(flops, chips, peak_per_chip, mfu)
        rows.append({"stage": st.index, "resolution": st.resolution, "batch_size": st.batch_size,
                     "steps": steps, "step_s": dt, "hours": steps * dt / 3600,
                     "chip_hours": steps * dt * chips / 3600,
                     "images": steps * st.batch_size})
    return {"stages": rows, "chip_hours": sum(r["chip_hours"] for r in rows),
            "hours": sum(r["hours"] for r in rows), "chips": chips, "mfu": mfu}


def memory_total(mem: dict) -> int:
    """Bytes one device holds while the step runs: arguments + outputs − aliased (donated
    state written in place) + temporaries + generated code."""
    return (mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]
            + mem["code"])


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = r"([\d.]+)([KMGT]?)i?B?"
# XLA:TPU's compile-time out-of-memory errors, e.g. "Ran out of memory in memory space hbm.
# Used 215.17G of 31.25G hbm." and "Ran out of memory on HBM, the total memory required for
# HLO temporaries (120.83G) exceeds available HBM (15.75G)." (sizes in GiB).
_OOM_PATTERNS = (re.compile(rf"Used {_SIZE} of {_SIZE} hbm"),
                 re.compile(rf"\({_SIZE}\) exceeds available HBM \({_SIZE}\)"))


def parse_hbm_oom(message: str) -> tuple[int, int] | None:
    """(needed, available) bytes per device from XLA:TPU's compile-time out-of-memory error;
    None when ``message`` is not one."""
    for pattern in _OOM_PATTERNS:
        m = pattern.search(message)
        if m:
            return (int(float(m.group(1)) * _UNITS[m.group(2)]),
                    int(float(m.group(3)) * _UNITS[m.group(4)]))
    return None


def check_topology_name(name: str) -> None:
    """Refuse names libtpu cannot read, with the form it wants (Cloud TPU accelerator types
    such as v5p-128 count TensorCores, not chips, and are not topologies)."""
    if TOPOLOGY_RE.match(name):
        return
    acc = ACCELERATOR_TYPE_RE.match(name)
    if acc:
        raise PlanError(f"{name!r} is a Cloud TPU accelerator type; --topology takes chips per "
                        f"axis ({EXAMPLES}); v4/v5p types count 2 TensorCores per chip "
                        f"(v5p-128 = 64 chips = v5p:4x4x4), v5e/v6e types count chips "
                        f"(v6e-16 = v6e:4x4)")
    raise PlanError(f"bad topology {name!r}: expected GENERATION:AxB or AxBxC ({EXAMPLES})")


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """("v5p", (4, 4, 4)) from "v5p:4x4x4" (checked by ``check_topology_name``)."""
    check_topology_name(name)
    generation, dims = name.split(":")
    return generation, tuple(int(d) for d in dims.split("x"))


def torus_wrap(generation: str, dims: tuple[int, ...]) -> tuple[bool, bool, bool] | None:
    """Which axes of a slice have wrap-around links (libtpu's ``wrap``: 3 flags), as Cloud TPU
    builds slices and MaxText's accelerator_to_spec_map passes them: v4/v5p slices of whole
    4x4x4 cubes (every axis a multiple of 4) are full 3D tori, smaller ones are meshes; on
    v5e/v6e an axis wraps when it spans the whole 16-chip side of the pod (16x16 both, 8x16
    the 16 only). None for generations this table does not know (libtpu's default)."""
    if generation in ("v4", "v5p"):
        full = len(dims) == 3 and all(d % 4 == 0 for d in dims)
        return (full, full, full)
    if generation in ("v5e", "v6e"):
        flags = [d == 16 for d in dims] + [False] * (3 - len(dims))
        return tuple(flags[:3])
    return None


def ici_bytes_per_s(chip: hardware.Chip, dims: tuple[int, ...],
                    wrap: tuple[bool, ...] | None) -> float | None:
    """Bytes/s one chip can receive over ICI in a collective that spans every axis of the
    slice: each axis longer than 1 brings two links (both neighbours) when it wraps around,
    and, without wrap-around, effectively one (the chips at the ends of the line have a single
    neighbour, and a bandwidth-optimal collective runs at the pace of its slowest chip). Each
    link carries ``ici_link_one_way`` into the chip. An upper bound on what a collective over
    part of the axes gets; None where the table has no ICI figure."""
    if chip.ici is None:
        return None
    wrap = wrap or (False,) * len(dims)
    links = sum((2 if w else 1) for d, w in zip(dims, wrap) if d > 1)
    return chip.ici_link_one_way * links


# ----------------------------------------------------------------------------- collectives
# What the compiled step moves between chips, read from ``compiled.as_text()`` (the optimised,
# partitioned HLO one device runs). How it is counted:
# - every all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute (and their
#   async "-start" forms; "-done" halves are not counted again) of every computation reachable
#   from ENTRY, times how often that computation runs: a while body runs its trip count times
#   (nested loops multiply: microbatch scan × layer scan), any other called computation once
#   per call;
# - trip counts: the while's known_trip_count when XLA printed one, else the constant N of its
#   condition "counter < N" (JAX's scans count from 0 by 1); a loop whose count cannot be read
#   counts once and is reported in ``unknown_trip_counts``;
# - payload: all-gather its (gathered) result, reduce-scatter its (unscattered) operand,
#   all-reduce / all-to-all / collective-permute their result, in bytes. XLA:TPU writes a
#   reduce-scatter as a fusion of an all-reduce whose result is dynamic-sliced to the shard
#   ("all-reduce-scatter"): counted as the reduce-scatter it runs as;
# - wire bytes per device, what a bandwidth-optimal algorithm sends (= receives) over a group
#   of n devices: (n-1)/n × payload for all-gather, reduce-scatter and all-to-all, 2(n-1)/n ×
#   payload for all-reduce (a reduce-scatter then an all-gather), the payload for a
#   collective-permute. n is the replica group's size (explicit groups, iota "[g,n]<=[...]",
#   or mesh['a'=4,...] {'a'} groups);
# - fusions and async wrappers run inside their caller: their collectives count with it, and
#   the copies of one asynchronous collective that XLA:TPU spreads over a chain of fusions
#   (same chain_id and channel_id) count once, in the outermost computation holding one, even
#   where the chain's steps sit in a loop nested in it.

_COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                     "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+[a-z]*)?)\[([^\]]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*->.*\{\s*$")
_CALLED = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)="
                     r"%?([\w.\-]+)")
_CALLED_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")


def _array_bytes(shape: str) -> list[float]:
    """Bytes of each array in an HLO shape ("f32[4,8]{1,0}" or a tuple of them)."""
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        if dtype.startswith("f8"):
            size = 1
        elif dtype in _DTYPE_BYTES:
            size = _DTYPE_BYTES[dtype]
        else:
            continue
        n = 1
        for d in dims.replace("<=", "").split(","):
            if d.strip():
                n *= int(d)
        out.append(n * size)
    return out


def _split_instruction(line: str):
    """(name, result shape, opcode, rest) of an HLO instruction line, or None."""
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    i = m.end()
    if line.startswith("(", i):               # tuple shape: up to the matching parenthesis
        depth = 0
        for j in range(i, len(line)):
            depth += {"(": 1, ")": -1}.get(line[j], 0)
            if depth == 0:
                break
        shape, rest = line[i:j + 1], line[j + 1:]
    else:
        k = line.find(" ", i)
        if k < 0:
            return None
        shape, rest = line[i:k], line[k:]
    op = re.match(r"\s*([a-z][\w\-]*)\(", rest)
    if not op:
        return None
    return m.group(1), shape, op.group(1), rest[op.end():]


def _group_size(text: str, num_devices: int) -> int:
    """Devices per replica group of a collective instruction."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", text)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        n = 1
        for axis in re.findall(r"'([^']+)'", m.group(2)):
            n *= sizes.get(axis, 1)
        return n
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", text)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([^}]*)\}", text)
    if m:
        return len([x for x in m.group(1).split(",") if x.strip()])
    return num_devices                          # replica_groups={} or none: every device


def _parse_module(hlo: str):
    """({computation: [instruction lines]}, entry name, num_partitions)."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    m = re.search(r"num_partitions=(\d+)", hlo)
    partitions = int(m.group(1)) if m else 1
    for line in hlo.splitlines():
        if current is None:
            h = _HEADER.match(line)
            if h:
                current = h.group(2)
                comps[current] = []
                if h.group(1):
                    entry = current
        elif line.rstrip() == "}":
            current = None
        elif line[:1] not in (" ", "\t") and comps[current]:
            # A continuation of the instruction above: attributes that hold newlines (the
            # Pallas/Mosaic kernels' frontend_attributes print a JSON string over several
            # lines, one of them starting with "}}"). Taking that for the end of the
            # computation dropped every instruction after a splash kernel.
            comps[current][-1] += line
        elif line.strip():
            comps[current].append(line)
    return comps, entry, partitions


def _trip_count(while_line: str, comps: dict[str, list[str]]) -> int | None:
    """Iterations of a while loop: its known_trip_count, else N of a condition "i < N"."""
    m = re.search(r'known_trip_count[^0-9]*?"?n"?\s*:\s*"?(\d+)', while_line)
    if m:
        return int(m.group(1))
    cond = re.search(r"\bcondition=%?([\w.\-]+)", while_line)
    lines = comps.get(cond.group(1), []) if cond else []
    constants = {}
    for line in lines:
        parts = _split_instruction(line)
        if parts and parts[2] == "constant":
            c = re.match(r"\s*(-?\d+)\)", parts[3])
            if c:
                constants[parts[0]] = int(c.group(1))
    for line in lines:
        parts = _split_instruction(line)
        if parts and line.lstrip().startswith("ROOT") and parts[2] == "compare":
            args = re.findall(r"%([\w.\-]+)", parts[3].split(")")[0])
            direction = re.search(r"direction=(\w+)", parts[3])
            d = direction.group(1) if direction else ""
            if len(args) == 2 and d == "LT" and args[1] in constants:
                return constants[args[1]]
            if len(args) == 2 and d == "GT" and args[0] in constants:
                return constants[args[0]]
    return None


def _sliced_all_reduces(instructions) -> set[str]:
    """All-reduces of one computation whose results are only ever dynamic-sliced (directly or
    through get-tuple-element): XLA:TPU's form of a reduce-scatter, one or several combined
    (fusion computations named "all-reduce-scatter...")."""
    operands = {name: re.findall(r"%([\w.\-]+)", rest.split("),")[0])
                for name, _, _, rest in instructions}
    ops = {name: op for name, _, op, _ in instructions}
    users: dict[str, list[str]] = {}
    for name, args in operands.items():
        for a in args:
            users.setdefault(a, []).append(name)

    def only_sliced(name: str) -> bool:
        us = users.get(name, [])
        return bool(us) and all(
            (ops[u] == "dynamic-slice" and operands[u][:1] == [name])
            or (ops[u] == "get-tuple-element" and only_sliced(u)) for u in us)

    return {name for name, op in ops.items() if op == "all-reduce" and only_sliced(name)}


def _collective_record(p, line: str, devices: int, scattered: set[str]):
    """(kind, chain, payload bytes, wire bytes) of one collective instruction, or None."""
    name, shape, op, rest = p
    base = op[:-6] if op.endswith("-start") else op
    if base not in _COLLECTIVE_KINDS:
        return None
    chain = re.search(r'chain_id="([^"]+)"', line)
    channel = re.search(r"channel_id=(\d+)", line)
    chain = (chain.group(1), channel and channel.group(1)) if chain else None
    sizes = _array_bytes(shape)
    if base == "collective-permute":
        payload = sizes[0] if sizes else 0
        return base, chain, payload, payload
    if op.endswith("-start") and base == "all-gather":
        payload = max(sizes, default=0)             # (operand, gathered result)
    elif op.endswith("-start"):
        payload = sizes[0] if sizes else 0
    else:
        payload = sum(sizes)
    n = _group_size(rest, devices)
    kind = base
    if base == "reduce-scatter":
        payload *= n                                # its result is one shard
    elif base == "all-reduce" and name in scattered:
        kind = "reduce-scatter"                     # XLA:TPU's all-reduce-scatter
    factor = (n - 1) / n if n > 0 else 0.0
    return kind, chain, payload, payload * factor * (2 if kind == "all-reduce" else 1)


def collective_bytes(hlo: str, num_devices: int | None = None) -> dict:
    """Collectives of an optimised HLO module, per device, counted as described above:
    {"by_kind": {kind: {"executions", "payload_bytes", "wire_bytes"}}, "wire_bytes",
    "payload_bytes", "unknown_trip_counts"}.

    XLA:TPU runs a collective asynchronously as a chain of fusions (start, steps that overlap
    it with compute, done), each of which holds a copy of the collective instruction with the
    same ``chain_id``: a chain counts once per execution of the outermost computation it
    appears in (where it starts and ends), not again for the steps it places inside loops
    nested there (e.g. the next layer's weights gathered during a windowed matmul loop).
    """
    comps, entry, partitions = _parse_module(hlo)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    devices = num_devices or partitions
    parsed = {name: [(line, _split_instruction(line)) for line in lines]
              for name, lines in comps.items()}
    unknown: set[tuple[str, str]] = set()        # (computation, while) of unread trip counts
    memo: dict[tuple, dict] = {}

    def inline(name: str, stack: tuple) -> list:
        """Collectives of ``name`` and of the fusions / async wrappers it calls (they run as
        part of its own execution): [(kind, chain, payload, wire)]."""
        if name in stack or name not in parsed:
            return []
        rows = [p for _, p in parsed[name] if p]
        scattered = _sliced_all_reduces(rows)
        out = []
        for line, p in parsed[name]:
            if p is None or p[2].endswith("-done"):
                continue                            # a -done half: its -start is counted
            rec = _collective_record(p, line, devices, scattered)
            if rec:
                out.append(rec)
            if p[2] == "fusion" or p[2].endswith("-start"):
                for key, callee in _CALLED.findall(p[3]):
                    if key == "calls":
                        out += inline(callee, stack + (name,))
        return out

    def total(name: str, stack: tuple = (), scope: frozenset = frozenset()) -> dict:
        """Collectives of one execution of ``name``; ``scope``: the chains its callers run
        (their steps may sit in loops inside ``name``; each runs once, with its caller)."""
        if (name, scope) in memo:
            return memo[(name, scope)]
        if name in stack or name not in parsed:
            return {}
        acc: dict = {}
        seen_chains = set(scope)
        for kind, chain, payload, wire in inline(name, ()):
            if chain is not None:
                if chain in seen_chains:
                    continue
                seen_chains.add(chain)
            _add(acc, kind, 1, payload, wire)
        inner = frozenset(seen_chains)
        for line, p in parsed[name]:
            if p is None or p[2] == "fusion" or p[2].endswith("-start") \
                    or p[2].endswith("-done"):
                continue                            # inlined above
            op, rest = p[2], p[3]
            trip = 1
            if op == "while":
                trip = _trip_count(line, comps)
                if trip is None:
                    unknown.add((name, p[0]))
                    trip = 1
            callees = [c for key, c in _CALLED.findall(rest)
                       if key not in ("condition", "to_apply")]
            for group in _CALLED_LISTS.findall(rest):
                callees += re.findall(r"%?([\w.\-]+)", group)
            for callee in callees:
                mult = trip if op == "while" else 1
                for kind, (e, pb, wb) in total(callee, stack + (name,), inner).items():
                    _add(acc, kind, e * mult, pb * mult, wb * mult)
        memo[(name, scope)] = acc
        return acc

    acc = total(entry)
    by_kind = {k: {"executions": int(v[0]), "payload_bytes": v[1], "wire_bytes": v[2]}
               for k, v in sorted(acc.items())}
    return {"by_kind": by_kind,
            "payload_bytes": sum(v["payload_bytes"] for v in by_kind.values()),
            "wire_bytes": sum(v["wire_bytes"] for v in by_kind.values()),
            "unknown_trip_counts": len(unknown)}


def _add(acc: dict, kind: str, executions: float, payload: float, wire: float) -> None:
    row = acc.setdefault(kind, [0.0, 0.0, 0.0])
    row[0] += executions
    row[1] += payload
    row[2] += wire


# ----------------------------------------------------------------------------- compiling

@dataclasses.dataclass(frozen=True)
class Topology:
    """Abstract devices of a TPU topology (compile-only: no TPU needed)."""
    name: str
    devices: tuple
    device_kind: str
    chips: int
    dims: tuple[int, ...] = ()
    wrap: tuple[bool, bool, bool] | None = None

    @property
    def devices_per_chip(self) -> int:
        return len(self.devices) // self.chips


def tpu_topology(name: str) -> Topology:
    """The devices of a topology name such as "v5p:2x2x2", via libtpu, with the slice's
    wrap-around links (``torus_wrap``) and, on v4/v5p, one device per chip (megacore) as the
    runtime presents them."""
    generation, dims = parse_topology(name)
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError(f"libtpu is not installed: {TPU_EXTRA}")
    import jax
    from jax.experimental import topologies
    wrap = torus_wrap(generation, dims)
    options: dict[str, Any] = {}
    if wrap is not None:
        options["wrap"] = wrap
    if generation in ("v4", "v5p"):
        # libtpu's default for v4 is one device per TensorCore; TPU VMs run v4 and v5p as
        # megacore (one device per chip), which is what a run will see.
        options["chip_config_name"] = "megacore"
    try:
        desc = topologies.get_topology_desc(topology_name=name, platform="tpu", **options)
    except (jax.errors.JaxRuntimeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"bad topology {name!r}: {first} ({EXAMPLES})") from None
    devices = tuple(desc.devices)
    chips = len({tuple(getattr(d, "coords", (d.id,))) for d in devices})
    return Topology(name, devices, devices[0].device_kind, chips, dims, wrap)


def usable_hbm_per_device(device) -> int | None:
    """The HBM XLA:TPU lets one device's program use, read from the out-of-memory error of a
    program that needs 2 × 1 TiB (libtpu states its limit there; it is below the nominal
    capacity: 15.75 of v5e's 16 GiB). None when the error does not say."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    one = NamedSharding(Mesh(np.array([device]), ("d",)), PartitionSpec())
    f = jax.jit(lambda a: a + 1, in_shardings=one, out_shardings=one)
    try:
        f.lower(jax.ShapeDtypeStruct((2**38,), jnp.float32)).compile()
    except Exception as e:  # noqa: BLE001 - only the message matters
        oom = parse_hbm_oom(str(e))
        return oom[1] if oom else None
    return None


def _stage_config(cfg: ml_collections.ConfigDict, stage: int | None,
                  per_device_batch: int | None, batch_shards: int):
    """(run config with the batch override applied, the planned Stage, its training config)."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    if per_device_batch is not None:
        if per_device_batch < 1:
            raise PlanError(f"--per_device_batch must be >= 1, got {per_device_batch}")
        # Every stage trains at the same global batch: per-device × the batch shards.
        cfg.train.batch_size = per_device_batch * batch_shards
        cfg.train.stages = tuple((s[0], s[1]) for s in cfg.train.stages)
    all_stages = config_lib.stages(cfg)     # a bad schedule is a UserError (exit 2)
    index = len(all_stages) - 1 if stage is None else stage
    if not 0 <= index < len(all_stages):
        raise PlanError(f"--stage {stage} does not exist; stages: 0..{len(all_stages) - 1} "
                        f"(resolutions {[s.resolution for s in all_stages]})")
    st = all_stages[index]
    return cfg, st, config_lib.for_stage(cfg, st)


def _compile(trainer, gan: bool = True):
    """The compiled train step (XLA:TPU, for the topology's devices). An autoencoder run
    (``AETrainer``) has two programs: ``gan`` picks the GAN phase's (generator + discriminator
    updates, the larger) or the reconstruction-only one of the steps before ``gan_start``."""
    from cxr_rf import sharding
    step = trainer._steps[gan] if is_autoencoder(trainer.cfg) else trainer.jitted_step
    with sharding.use(trainer.mesh):
        return step.lower(*trainer.abstract_inputs()).compile()


def is_autoencoder(cfg: ml_collections.ConfigDict) -> bool:
    """Whether ``cfg`` trains the latent autoencoder (``task == "autoencoder"``)."""
    return str(cfg.get("task", "mmdit") or "mmdit") == "autoencoder"


def _memory(compiled) -> dict:
    """Per-device memory of a compiled program, by kind (see ``memory_total``)."""
    m = compiled.memory_analysis()
    return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
            "code": m.generated_code_size_in_bytes}


def _compiled_flops(compiled, devices_per_chip: int) -> float:
    """FLOPs per step per chip from XLA's cost analysis (per device × devices per chip)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) * devices_per_chip


def fit_limit(usable_bytes: int, fraction: float = MAX_HBM_FRACTION) -> int:
    """Bytes per device a plan may use: ``fraction`` of the HBM XLA can use."""
    if not 0 < fraction <= 1:
        raise PlanError(f"--max_hbm_fraction must be in (0, 1], got {fraction}")
    return int(usable_bytes * fraction)


def comm_step_seconds(compute_s: float, comm_s: float | None) -> dict:
    """Step time once the collectives are counted: overlapped with compute (the larger of
    the two; what XLA's async collectives aim for) and not overlapped (their sum)."""
    if comm_s is None:
        return {"step_s_overlapped": None, "step_s_serial": None}
    return {"step_s_overlapped": max(compute_s, comm_s), "step_s_serial": compute_s + comm_s}


def plan(cfg: ml_collections.ConfigDict, topology: str, *, stage: int | None = None,
         per_device_batch: int | None = None, mfu: float = 0.4,
         max_hbm_fraction: float = MAX_HBM_FRACTION, hlo_path: str | None = None,
         recon_phase: bool = True) -> dict:
    """Compile the train step of one stage for ``topology`` and project time and cost.

    Returns a JSON-able dict (see the module docstring); ``fits`` says whether the step's
    per-device memory is within ``max_hbm_fraction`` of the HBM XLA can use there. Raises
    PlanError for bad input.
    """
    from cxr_rf import sharding

    ae = is_autoencoder(cfg)
    topo = tpu_topology(topology)
    chip = hardware.chip(topo.device_kind)
    shape = sharding.mesh_shape(cfg.mesh, len(topo.devices))
    mesh = dict(zip(sharding.MESH_AXES, shape))
    shards = mesh["data"] * mesh["fsdp"]
    run_cfg, st, scfg = _stage_config(cfg, stage, per_device_batch, shards)
    dtype = str(scfg.autoencoder.dtype if ae else scfg.model.dtype)
    peak = hardware.peak_flops(topo.device_kind, dtype)
    dpc = topo.devices_per_chip
    hbm_device = chip.hbm // dpc
    usable, usable_source = usable_hbm_per_device(topo.devices[0]), "libtpu"
    if usable is None:
        usable = (chip.hbm_usable or chip.hbm) // dpc
        usable_source = "table"
    limit = fit_limit(usable, max_hbm_fraction)
    ici = ici_bytes_per_s(chip, topo.dims, topo.wrap)
    t0 = time.perf_counter()
    if ae:      # the config's architecture (init_from's FLUX.2 weights are not read here)
        from cxr_rf.autoencoder.step import AETrainer
        trainer = AETrainer(scfg, topo.devices)
    else:
        from cxr_rf.trainer import Trainer
        trainer = Trainer(scfg, topo.devices)   # bad mesh / batch / model: UserError (exit 2)

    b, r = scfg.train.batch_size, scfg.data.resolution
    micro = 1 if ae else int(scfg.train.microbatches)
    out: dict[str, Any] = {
        "task": "autoencoder" if ae else "mmdit", "topology": topology,
        "device_kind": topo.device_kind, "chip": chip.name,
        "chips": topo.chips, "devices": len(topo.devices), "devices_per_chip": dpc,
        "torus_wrap": list(topo.wrap) if topo.wrap is not None else None,
        "mesh": mesh, "stage": st.index, "stages": len(config_lib.stages(run_cfg)),
        "stage_steps": [st.start, st.end], "resolution": r, "global_batch": b,
        "per_device_batch": b // shards, "images_per_chip": b / topo.chips,
        "microbatches": micro, "remat": "none" if ae else str(scfg.model.remat), "dtype": dtype,
        "hbm_bytes_per_chip": chip.hbm, "hbm_bytes_per_device": hbm_device,
        "hbm_usable_bytes_per_device": usable, "hbm_usable_source": usable_source,
        "max_hbm_fraction": max_hbm_fraction, "hbm_limit_bytes_per_device": limit,
        "peak_flops_per_chip": peak, "ici_bytes_per_s_per_chip": ici, "mfu": mfu,
    }
    try:
        compiled = _compile(trainer)
    except Exception as e:  # XLA:TPU refuses a program that exceeds HBM at compile time
        oom = parse_hbm_oom(str(e))
        if oom is None:
            raise
        out.update(compile_s=time.perf_counter() - t0, fits=False, memory=None,
                   memory_total_bytes_per_device=oom[0], memory_total_bytes_per_chip=oom[0] * dpc,
                   xla_hbm_limit_bytes_per_device=oom[1], fraction_of_usable=oom[0] / usable,
                   fraction_of_nominal=oom[0] / hbm_device)
        return _project(out, run_cfg, scfg, topo, peak, mfu, compiled=None)
    out["compile_s"] = time.perf_counter() - t0
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(compiled.as_text())
    m = compiled.memory_analysis()
    mem = _memory(compiled)
    total = memory_total(mem)
    out.update(memory=mem, memory_total_bytes_per_device=total,
               memory_total_bytes_per_chip=total * dpc,
               xla_peak_bytes_per_device=int(getattr(m, "peak_memory_in_bytes", 0) or 0),
               fits=total <= limit, fraction_of_usable=total / usable,
               fraction_of_nominal=total / hbm_device)
    if ae and recon_phase:
        out["recon_phase"] = _recon_phase(trainer, topo, limit, usable)
        out["fits"] = out["fits"] and out["recon_phase"]["fits"]
    return _project(out, run_cfg, scfg, topo, peak, mfu, compiled=compiled)


def _recon_phase(trainer, topo: Topology, limit: int, usable: int) -> dict:
    """The autoencoder's other program, the reconstruction-only step before ``gan_start``:
    its memory, fit and compiled FLOPs (the GAN program is the one ``plan`` reports in full)."""
    t0 = time.perf_counter()
    try:
        compiled = _compile(trainer, gan=False)
    except Exception as e:  # noqa: BLE001 - only an out-of-memory refusal is an answer
        oom = parse_hbm_oom(str(e))
        if oom is None:
            raise
        return {"memory": None, "memory_total_bytes_per_device": oom[0], "fits": False,
                "fraction_of_usable": oom[0] / usable, "compiled_flops_per_step_per_chip": None,
                "compile_s": time.perf_counter() - t0}
    mem = _memory(compiled)
    total = memory_total(mem)
    return {"memory": mem, "memory_total_bytes_per_device": total, "fits": total <= limit,
            "fraction_of_usable": total / usable,
            "compiled_flops_per_step_per_chip": _compiled_flops(compiled, topo.devices_per_chip),
            "compile_s": time.perf_counter() - t0}


def _project(out: dict, run_cfg, scfg, topo: Topology, peak: float, mfu: float,
             compiled) -> dict:
    """Add FLOPs, collectives, the projected step time / throughput and the whole-run cost
    to ``out``."""
    if out.get("task") == "autoencoder":
        return _project_autoencoder(out, run_cfg, topo, peak, mfu, compiled)
    b, r, micro = scfg.train.batch_size, scfg.data.resolution, int(scfg.train.microbatches)
    factor = train_flops_factor(str(scfg.model.remat))
    side = model_side(scfg, r)                  # latent runs: the latent grid, not the pixels
    fwd = model_flops_per_image(scfg, side) / 3.0
    counted = factor * xla_counted_forward(scfg, side) * (b / micro) / topo.chips
    out.update(
        analytic_flops_per_step_per_chip=factor * fwd * b / topo.chips,
        analytic_flops_as_xla_counts_per_chip=counted,
        model_flops_per_step=3.0 * fwd * b)
    dt = step_seconds(out["model_flops_per_step"], topo.chips, peak, mfu)
    comm_s = None
    if compiled is not None:
        flops = _compiled_flops(compiled, topo.devices_per_chip)
        out.update(compiled_flops_per_step_per_chip=flops, flops_ratio=flops / counted)
        comm_s = _collectives(out, compiled, topo)
    tokens = (r // scfg.model.patch) ** 2
    out.update(step_s=dt, images_per_s=b / dt, tokens_per_s=b * tokens / dt,
               image_tokens=tokens, **comm_step_seconds(dt, comm_s),
               run=run_cost(run_cfg, topo.chips, peak, mfu))
    return out


def _collectives(out: dict, compiled, topo: Topology) -> float | None:
    """Add the compiled step's collectives to ``out``; their seconds on ICI (None: no figure)."""
    coll = collective_bytes(compiled.as_text(), len(topo.devices))
    wire_chip = coll["wire_bytes"] * topo.devices_per_chip
    ici = out["ici_bytes_per_s_per_chip"]
    comm_s = wire_chip / ici if ici else None
    out.update(collectives=coll, collective_wire_bytes_per_chip=wire_chip, comm_s=comm_s)
    return comm_s


def autoencoder_run_cost(steps: int, gan_start: int, batch: int, recon_flops: float | None,
                         gan_flops: float, chips: int, peak_per_chip: float,
                         mfu: float) -> dict:
    """The autoencoder run's two phases (steps before ``gan_start`` run the reconstruction
    program, the rest the GAN one) × their step time at ``mfu``, from the compiled FLOPs per
    step per chip of each program (the reconstruction phase at the GAN program's FLOPs when
    it was not compiled); the same shape as ``run_cost``."""
    recon_steps = max(0, min(int(gan_start), int(steps)))
    rows = []
    for phase, n, flops in (("reconstruction", recon_steps, recon_flops or gan_flops),
                            ("gan", int(steps) - recon_steps, gan_flops)):
        if n <= 0:
            continue
        dt = step_seconds(flops, 1, peak_per_chip, mfu)      # flops are per chip already
        rows.append({"stage": phase, "phase": phase, "batch_size": batch, "steps": n,
                     "flops_of": "gan" if phase == "gan" or not recon_flops else phase,
                     "step_s": dt, "hours": n * dt / 3600, "chip_hours": n * dt * chips / 3600,
                     "images": n * batch})
    return {"stages": rows, "chip_hours": sum(r["chip_hours"] for r in rows),
            "hours": sum(r["hours"] for r in rows), "chips": chips, "mfu": mfu}


def _project_autoencoder(out: dict, run_cfg, topo: Topology, peak: float, mfu: float,
                         compiled) -> dict:
    """``_project`` for the autoencoder: no analytic FLOP formula for its convolutions, so
    the projections use XLA's compiled FLOPs of the step (no loops, no remat: every op counts
    once; they include the discriminator's update and the optimizers), times the chips."""
    b = out["global_batch"]
    out.update(gan_start=int(run_cfg.ae_loss.gan_start), steps=int(run_cfg.train.steps),
               analytic_flops_per_step_per_chip=None,
               analytic_flops_as_xla_counts_per_chip=None, flops_ratio=None,
               image_tokens=None, tokens_per_s=None)
    if compiled is None:        # XLA refused the program: nothing to count
        out.update(compiled_flops_per_step_per_chip=None, model_flops_per_step=None,
                   step_s=None, images_per_s=None, run=None,
                   **comm_step_seconds(0.0, None))
        return out
    flops = _compiled_flops(compiled, topo.devices_per_chip)
    comm_s = _collectives(out, compiled, topo)
    dt = step_seconds(flops, 1, peak, mfu)
    recon = out.get("recon_phase") or {}
    out.update(compiled_flops_per_step_per_chip=flops, model_flops_per_step=flops * topo.chips,
               step_s=dt, images_per_s=b / dt, **comm_step_seconds(dt, comm_s),
               run=autoencoder_run_cost(run_cfg.train.steps, run_cfg.ae_loss.gan_start, b,
                                        recon.get("compiled_flops_per_step_per_chip"), flops,
                                        topo.chips, peak, mfu))
    return out


# ----------------------------------------------------------------------------- report

def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def report(p: dict) -> list[str]:
    """Human-readable lines of a plan."""
    wrap = p.get("torus_wrap")
    torus = ("wrap-around " + "".join("xyz"[i] for i, w in enumerate(wrap) if w)
             if wrap and any(wrap) else "no wrap-around")
    ae = p.get("task") == "autoencoder"
    mesh = (f"mesh data={p['mesh']['data']} fsdp={p['mesh']['fsdp']} "
            f"tensor={p['mesh']['tensor']}")
    where = (f"autoencoder GAN-phase step (steps {p['gan_start']}-{p['steps']}; before "
             f"gan_start the reconstruction-only step) at {p['resolution']}²; {mesh}"
             if ae and "gan_start" in p else
             f"autoencoder at {p['resolution']}²; {mesh}" if ae else
             f"stage {p['stage']} of {p['stages']} (steps {p['stage_steps'][0]}-"
             f"{p['stage_steps'][1]}) at {p['resolution']}²; {mesh}")
    lines = [
        f"topology {p['topology']}: {p['chips']} chips of {p['chip']} ({p['device_kind']}; "
        f"{p['devices_per_chip']} device(s)/chip, {_gib(p['hbm_bytes_per_chip'])} HBM, "
        f"{p['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s {p['dtype']}; {torus})",
        where,
        f"batch: global {p['global_batch']} = {p['per_device_batch']} per device "
        f"(× data·fsdp {p['mesh']['data'] * p['mesh']['fsdp']}), microbatches "
        f"{p['microbatches']}, remat {p['remat']}",
    ]
    usable = (f"{_gib(p['hbm_usable_bytes_per_device'])} usable ({p['hbm_usable_source']}) "
              f"of {_gib(p['hbm_bytes_per_device'])} nominal")
    if p["memory"]:
        m = p["memory"]
        lines.append(
            "memory per device: " + ", ".join(f"{k} {_gib(v)}" for k, v in m.items())
            + f" -> total {_gib(p['memory_total_bytes_per_device'])} = "
            f"{_pct(p['fraction_of_usable'])} of {usable} HBM "
            f"({_pct(p['fraction_of_nominal'])} of nominal; fits at <= "
            f"{_pct(p['max_hbm_fraction'])} of usable); XLA peak "
            f"{_gib(p['xla_peak_bytes_per_device'])}")
        rp = p.get("recon_phase")
        if rp and rp["memory"]:
            lines.append(
                f"reconstruction-only step (before gan_start): total "
                f"{_gib(rp['memory_total_bytes_per_device'])} = "
                f"{_pct(rp['fraction_of_usable'])} of usable "
                f"({'fits' if rp['fits'] else 'does not fit'}), compiled "
                f"{rp['compiled_flops_per_step_per_chip'] / 1e12:.3f} TFLOPs per step per chip")
        elif rp:
            lines.append(f"reconstruction-only step (before gan_start): XLA refused to compile: "
                         f"needs at least {_gib(rp['memory_total_bytes_per_device'])}")
        if ae:
            lines.append(
                f"FLOPs per step per chip: compiled "
                f"{p['compiled_flops_per_step_per_chip'] / 1e12:.3f} T vs analytic n/a (no "
                f"analytic formula for the conv autoencoder; the projections use the compiled "
                f"FLOPs)")
        else:
            lines.append(
                f"FLOPs per step per chip: compiled "
                f"{p['compiled_flops_per_step_per_chip'] / 1e12:.3f} T"
                f" vs analytic {p['analytic_flops_as_xla_counts_per_chip'] / 1e12:.3f} T as "
                f"XLA counts them (loop bodies once) = ratio {p['flops_ratio']:.2f}; whole "
                f"step (analytic) {p['analytic_flops_per_step_per_chip'] / 1e12:.3f} T")
        c = p["collectives"]
        kinds = ", ".join(f"{k} {v['executions']}× {_gib(v['wire_bytes'])}"
                          for k, v in c["by_kind"].items()) or "none"
        ici = p["ici_bytes_per_s_per_chip"]
        lines.append(
            f"collectives per step per chip (loop trip counts included): "
            f"{_gib(p['collective_wire_bytes_per_chip'])} over the wire ({kinds})"
            + (f"; {c['unknown_trip_counts']} loop(s) of unknown trip count counted once"
               if c["unknown_trip_counts"] else "")
            + (f" = {p['comm_s']:.3f} s at {ici / 1e9:.0f} GB/s ICI into each chip"
               if p["comm_s"] is not None else "; no ICI figure for this chip"))
    else:
        lines.append(f"memory per device: XLA refused to compile: needs at least "
                     f"{_gib(p['memory_total_bytes_per_device'])} of "
                     f"{_gib(p['xla_hbm_limit_bytes_per_device'])} usable HBM")
    if p["step_s"] is None:
        lines.append("projected: n/a (no compiled program to count the FLOPs of)")
    else:
        lines.append(
            f"projected at MFU {p['mfu']:.2f}: {p['step_s']:.3f} s/step, "
            f"{p['images_per_s']:.0f} images/s"
            + (f", {p['tokens_per_s'] / 1e6:.2f}M image tokens/s"
               if p.get("tokens_per_s") is not None else ""))
    if p.get("step_s_overlapped") is not None:
        lines.append(
            f"with the collectives: {p['step_s_overlapped']:.3f} s/step overlapped with "
            f"compute, {p['step_s_serial']:.3f} s/step if not "
            f"({'communication' if p['comm_s'] > p['step_s'] else 'compute'}-bound)")
    run = p["run"]
    for s in (run or {}).get("stages", []):
        what = (f"{s['phase']} phase: {s['steps']} steps"
                + (" (at the GAN step's FLOPs, an upper bound)"
                   if s["phase"] != s.get("flops_of", s["phase"]) else "") if "phase" in s else
                f"stage {s['stage']}: {s['steps']} steps at {s['resolution']}²")
        lines.append(f"  {what}, batch {s['batch_size']}: {s['step_s']:.3f} s/step, "
                     f"{s['hours']:.0f} h, {s['chip_hours']:.0f} chip-hours")
    if run:
        lines.append(f"whole run at MFU {run['mfu']:.2f}: {run['chip_hours']:.0f} chip-hours "
                     f"= {run['hours']:.0f} h ({run['hours'] / 24:.1f} days) on "
                     f"{run['chips']} chips")
    lines.append(f"compiled in {p['compile_s']:.0f} s")
    return lines


def verdict(p: dict) -> str:
    """The one-line fit verdict, against the plan's share of the usable HBM."""
    used = p["memory_total_bytes_per_device"]
    if p["memory"] is None:      # XLA refused it: its own limit is the one that was exceeded
        return (f"does not fit: {_gib(used)} > {_gib(p['xla_hbm_limit_bytes_per_device'])} "
                f"usable HBM per device")
    rule = (f"{_gib(p['hbm_limit_bytes_per_device'])} = {_pct(p['max_hbm_fraction'])} of "
            f"{_gib(p['hbm_usable_bytes_per_device'])} usable HBM per device")
    if p["fits"]:
        return f"fits: {_gib(used)} <= {rule}"
    return f"does not fit: {_gib(used)} > {rule}"


# ----------------------------------------------------------------------------- CLI

def _define_flags() -> None:
    """Command-line flags (defined only when run as a program)."""
    from absl import flags
    from cxr_rf import cli
    cli.define_config("config", "Experiment file (experiments/NAME.py).")
    flags.DEFINE_string("topology", None, f"TPU topology, chips per axis ({EXAMPLES}).")
    flags.DEFINE_integer("per_device_batch", None, "Global batch = this × data × fsdp, for "
                         "every stage (default: the config's batches).")
    flags.DEFINE_integer("stage", None, "Resolution stage to compile (default: the last).")
    flags.DEFINE_float("mfu", 0.4, "Model-FLOPs utilisation the projections assume.")
    flags.DEFINE_float("max_hbm_fraction", MAX_HBM_FRACTION,
                       "A plan fits when it needs at most this share of the HBM XLA can use.")
    flags.DEFINE_string("json", None, "Write every number of the plan to this JSON file.")
    flags.DEFINE_string("hlo", None, "Write the compiled step's optimised HLO (what the "
                        "collectives are counted from) to this file.")
    flags.DEFINE_bool("recon_phase", True, "Autoencoder runs: also compile the "
                      "reconstruction-only step of the steps before gan_start (its memory, "
                      "FLOPs and the cost of that phase; without it, that phase is costed at "
                      "the GAN step's FLOPs, an upper bound).")
    cli.check_number("per_device_batch", 1)
    cli.check_number("stage", 0)
    cli.check_number("mfu", 0, 1, lo_open=True)
    cli.check_number("max_hbm_fraction", 0, 1, lo_open=True)


def main(argv) -> None:
    # PlanError and the config's own checks are errors.UserError: one line, exit 2 through
    # cli.run, before anything compiles where the flags alone decide.
    from absl import flags
    from cxr_rf import cli
    flags_ = flags.FLAGS
    cli.no_arguments(argv)
    cli.require("config", "topology")
    if flags_.json:
        cli.output_file(flags_.json, "--json")
    if flags_.hlo:
        cli.output_file(flags_.hlo, "--hlo")
    p = plan(flags_.config, flags_.topology, stage=flags_.stage,
             per_device_batch=flags_.per_device_batch, mfu=flags_.mfu,
             max_hbm_fraction=flags_.max_hbm_fraction, hlo_path=flags_.hlo,
             recon_phase=flags_.recon_phase)
    print("\n".join(report(p)))
    if flags_.json:
        with open(flags_.json, "w") as f:
            json.dump(p, f, indent=2)
    print(verdict(p))
    sys.exit(0 if p["fits"] else 1)


def _quiet_environment() -> None:
    """Keep libtpu's start-up chatter off the console and the local TPU (if any) free: the
    plan compiles for abstract devices and runs nothing."""
    os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # one host compiles for all
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # libtpu takes /tmp/libtpu_lockfile for the life of the process so that two processes
    # cannot drive one TPU; a plan drives none, and without this two plans (or a plan next to
    # a test run) cannot run at once ("Internal error when accessing libtpu multi-process
    # lockfile").
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


if __name__ == "__main__":
    _quiet_environment()
    from cxr_rf import cli
    # Exit status 1 is this command's "does not fit", and also what Python exits with after an
    # uncaught exception: a crash exits 3 instead (with its traceback) so it cannot read as one.
    cli.run(main, _define_flags, crash_status=3)
