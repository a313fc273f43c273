"""Plan a run on a TPU topology without the TPU: compile the exact train step ahead of time.

    python -m cxr_rf.aot --config experiments/cxr_xl.py --topology v5p:4x4x4 \
        [--per_device_batch 16] [--stage N] [--mfu 0.4] [--json plan.json] [--config.x=y ...]

Needs libtpu (``pip install -e '.[tpu]'``), not a TPU: libtpu describes any topology
("v5e:4x4", "v5p:4x4x4", "v6e:8x8", "v4:2x2x2"; chips per axis) and XLA:TPU compiles the
sharded step for it. Reports, for one resolution stage (default: the last, largest one):

- the mesh, global / per-device batch, microbatches and remat of that stage;
- per-chip memory of the compiled step (arguments, outputs, aliased = donated state written
  in place, temporaries, code) against the chip's HBM (``cxr_rf.hardware``);
- FLOPs per step per chip from XLA's cost analysis beside the analytic estimate;
- step time, images/s and image tokens/s projected at a model-FLOPs utilisation (MFU), and
  the chip-hours of the whole run (every stage's steps × its step time at that MFU).

Exit status: 0 fits, 1 does not fit ("does not fit: X GiB > Y GiB HBM"), 2 bad input
(topology, config, stage) or libtpu missing, 3 an unexpected failure (with its traceback).

Semantics worth knowing (measured with libtpu 0.0.42.1 / jax 0.10.2):
- ``cost_analysis()["flops"]`` is per device: the cost of the partitioned (SPMD) program one
  device runs, not of the global computation.
- It counts the body of a while loop once, whatever its trip count: with ``model.scan`` the
  (depth-1) scanned blocks count as one block, and with microbatches > 1 the whole gradient
  computation counts as one microbatch. The analytic column it is compared with counts the
  same way ("as XLA counts"); the projections use the analytic FLOPs of the whole step.
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


def model_flops_per_image(cfg: ml_collections.ConfigDict, resolution: int) -> float:
    """Model FLOPs of one training image (3× the analytic forward; what MFU is measured on)."""
    from cxr_rf.model import ModelConfig, flops_per_image
    return 3.0 * flops_per_image(ModelConfig.from_config(cfg), resolution)


def xla_counted_forward(cfg: ml_collections.ConfigDict, resolution: int) -> float:
    """The analytic forward FLOPs of one image counted as XLA's cost analysis counts them: a
    scanned stack of (depth-1) blocks is one while loop whose body counts once."""
    from cxr_rf.model import ModelConfig, flops_per_image
    mcfg = ModelConfig.from_config(cfg)
    if mcfg.scan and mcfg.depth > 2:
        mcfg = dataclasses.replace(mcfg, depth=2)
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
        flops = model_flops_per_image(cfg, st.resolution) * st.batch_size
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


# ----------------------------------------------------------------------------- compiling

@dataclasses.dataclass(frozen=True)
class Topology:
    """Abstract devices of a TPU topology (compile-only: no TPU needed)."""
    name: str
    devices: tuple
    device_kind: str
    chips: int

    @property
    def devices_per_chip(self) -> int:
        return len(self.devices) // self.chips


def tpu_topology(name: str) -> Topology:
    """The devices of a topology name such as "v5p:2x2x2", via libtpu."""
    check_topology_name(name)
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError(f"libtpu is not installed: {TPU_EXTRA}")
    import jax
    from jax.experimental import topologies
    try:
        desc = topologies.get_topology_desc(topology_name=name, platform="tpu")
    except (jax.errors.JaxRuntimeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"bad topology {name!r}: {first} ({EXAMPLES})") from None
    devices = tuple(desc.devices)
    chips = len({tuple(getattr(d, "coords", (d.id,))) for d in devices})
    return Topology(name, devices, devices[0].device_kind, chips)


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


def _compile(trainer):
    """The compiled train step (XLA:TPU, for the topology's devices)."""
    from cxr_rf import sharding
    with sharding.use(trainer.mesh):
        return trainer.jitted_step.lower(*trainer.abstract_inputs()).compile()


def plan(cfg: ml_collections.ConfigDict, topology: str, *, stage: int | None = None,
         per_device_batch: int | None = None, mfu: float = 0.4) -> dict:
    """Compile the train step of one stage for ``topology`` and project time and cost.

    Returns a JSON-able dict (see the module docstring); ``fits`` says whether the step's
    per-chip memory is within the chip's HBM. Raises PlanError for bad input.
    """
    from cxr_rf import sharding
    from cxr_rf.trainer import Trainer

    topo = tpu_topology(topology)
    chip = hardware.chip(topo.device_kind)
    shape = sharding.mesh_shape(cfg.mesh, len(topo.devices))
    mesh = dict(zip(sharding.MESH_AXES, shape))
    shards = mesh["data"] * mesh["fsdp"]
    run_cfg, st, scfg = _stage_config(cfg, stage, per_device_batch, shards)
    dtype = str(scfg.model.dtype)
    peak = hardware.peak_flops(topo.device_kind, dtype)
    hbm_device = chip.hbm // topo.devices_per_chip
    t0 = time.perf_counter()
    trainer = Trainer(scfg, topo.devices)   # bad mesh / batch / model: UserError (exit 2)

    b, r, micro = scfg.train.batch_size, scfg.data.resolution, int(scfg.train.microbatches)
    dpc = topo.devices_per_chip
    out: dict[str, Any] = {
        "topology": topology, "device_kind": topo.device_kind, "chip": chip.name,
        "chips": topo.chips, "devices": len(topo.devices), "devices_per_chip": dpc,
        "mesh": mesh, "stage": st.index, "stages": len(config_lib.stages(run_cfg)),
        "stage_steps": [st.start, st.end], "resolution": r, "global_batch": b,
        "per_device_batch": b // shards, "images_per_chip": b / topo.chips,
        "microbatches": micro, "remat": str(scfg.model.remat), "dtype": dtype,
        "hbm_bytes_per_chip": chip.hbm, "hbm_bytes_per_device": hbm_device,
        "peak_flops_per_chip": peak, "mfu": mfu,
    }
    try:
        compiled = _compile(trainer)
    except Exception as e:  # XLA:TPU refuses a program that exceeds HBM at compile time
        oom = parse_hbm_oom(str(e))
        if oom is None:
            raise
        out.update(compile_s=time.perf_counter() - t0, fits=False, memory=None,
                   memory_total_bytes_per_device=oom[0], memory_total_bytes_per_chip=oom[0] * dpc,
                   xla_hbm_limit_bytes_per_device=oom[1])
        return _project(out, run_cfg, scfg, topo, peak, mfu, compiled=None)
    out["compile_s"] = time.perf_counter() - t0
    m = compiled.memory_analysis()
    mem = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
           "code": m.generated_code_size_in_bytes}
    total = memory_total(mem)
    out.update(memory=mem, memory_total_bytes_per_device=total,
               memory_total_bytes_per_chip=total * dpc,
               xla_peak_bytes_per_device=int(getattr(m, "peak_memory_in_bytes", 0) or 0),
               fits=total <= hbm_device, headroom=1 - total / hbm_device)
    return _project(out, run_cfg, scfg, topo, peak, mfu, compiled=compiled)


def _project(out: dict, run_cfg, scfg, topo: Topology, peak: float, mfu: float,
             compiled) -> dict:
    """Add FLOPs, the projected step time / throughput and the whole-run cost to ``out``."""
    b, r, micro = scfg.train.batch_size, scfg.data.resolution, int(scfg.train.microbatches)
    factor = train_flops_factor(str(scfg.model.remat))
    fwd = model_flops_per_image(scfg, r) / 3.0
    counted = factor * xla_counted_forward(scfg, r) * (b / micro) / topo.chips
    out.update(
        analytic_flops_per_step_per_chip=factor * fwd * b / topo.chips,
        analytic_flops_as_xla_counts_per_chip=counted,
        model_flops_per_step=3.0 * fwd * b)
    if compiled is not None:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0)) * topo.devices_per_chip
        out.update(compiled_flops_per_step_per_chip=flops, flops_ratio=flops / counted)
    dt = step_seconds(out["model_flops_per_step"], topo.chips, peak, mfu)
    tokens = (r // scfg.model.patch) ** 2
    out.update(step_s=dt, images_per_s=b / dt, tokens_per_s=b * tokens / dt,
               image_tokens=tokens, run=run_cost(run_cfg, topo.chips, peak, mfu))
    return out


# ----------------------------------------------------------------------------- report

def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def report(p: dict) -> list[str]:
    """Human-readable lines of a plan."""
    lines = [
        f"topology {p['topology']}: {p['chips']} chips of {p['chip']} ({p['device_kind']}; "
        f"{p['devices_per_chip']} device(s)/chip, {_gib(p['hbm_bytes_per_chip'])} HBM, "
        f"{p['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s {p['dtype']})",
        f"stage {p['stage']} of {p['stages']} (steps {p['stage_steps'][0]}-{p['stage_steps'][1]}) "
        f"at {p['resolution']}²; mesh data={p['mesh']['data']} fsdp={p['mesh']['fsdp']} "
        f"tensor={p['mesh']['tensor']}",
        f"batch: global {p['global_batch']} = {p['per_device_batch']} per device "
        f"(× data·fsdp {p['mesh']['data'] * p['mesh']['fsdp']}), microbatches "
        f"{p['microbatches']}, remat {p['remat']}",
    ]
    if p["memory"]:
        m = p["memory"]
        lines.append(
            "memory per device: " + ", ".join(f"{k} {_gib(v)}" for k, v in m.items())
            + f" -> total {_gib(p['memory_total_bytes_per_device'])} of "
            f"{_gib(p['hbm_bytes_per_device'])} HBM ({100 * p['headroom']:.0f}% headroom); "
            f"XLA peak {_gib(p['xla_peak_bytes_per_device'])}")
        lines.append(
            f"FLOPs per step per chip: compiled {p['compiled_flops_per_step_per_chip'] / 1e12:.3f} T"
            f" vs analytic {p['analytic_flops_as_xla_counts_per_chip'] / 1e12:.3f} T as XLA "
            f"counts them (loop bodies once) = ratio {p['flops_ratio']:.2f}; whole step "
            f"(analytic) {p['analytic_flops_per_step_per_chip'] / 1e12:.3f} T")
    else:
        lines.append(f"memory per device: XLA refused to compile: needs at least "
                     f"{_gib(p['memory_total_bytes_per_device'])} of "
                     f"{_gib(p['xla_hbm_limit_bytes_per_device'])} usable HBM")
    lines.append(
        f"projected at MFU {p['mfu']:.2f}: {p['step_s']:.3f} s/step, "
        f"{p['images_per_s']:.0f} images/s, {p['tokens_per_s'] / 1e6:.2f}M image tokens/s")
    run = p["run"]
    for s in run["stages"]:
        lines.append(f"  stage {s['stage']}: {s['steps']} steps at {s['resolution']}², batch "
                     f"{s['batch_size']}: {s['step_s']:.3f} s/step, {s['hours']:.0f} h, "
                     f"{s['chip_hours']:.0f} chip-hours")
    lines.append(f"whole run at MFU {run['mfu']:.2f}: {run['chip_hours']:.0f} chip-hours "
                 f"= {run['hours']:.0f} h ({run['hours'] / 24:.1f} days) on {run['chips']} chips")
    lines.append(f"compiled in {p['compile_s']:.0f} s")
    return lines


def verdict(p: dict) -> str:
    """The one-line fit verdict."""
    used = p["memory_total_bytes_per_device"]
    cap = p.get("xla_hbm_limit_bytes_per_device") or p["hbm_bytes_per_device"]
    if p["fits"]:
        return f"fits: {_gib(used)} <= {_gib(cap)} HBM per device"
    return f"does not fit: {_gib(used)} > {_gib(cap)} HBM per device"


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
    flags.DEFINE_string("json", None, "Write every number of the plan to this JSON file.")
    cli.check_number("per_device_batch", 1)
    cli.check_number("stage", 0)
    cli.check_number("mfu", 0, 1, lo_open=True)


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
    p = plan(flags_.config, flags_.topology, stage=flags_.stage,
             per_device_batch=flags_.per_device_batch, mfu=flags_.mfu)
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


if __name__ == "__main__":
    _quiet_environment()
    from cxr_rf import cli
    # Exit status 1 is this command's "does not fit", and also what Python exits with after an
    # uncaught exception: a crash exits 3 instead (with its traceback) so it cannot read as one.
    cli.run(main, _define_flags, crash_status=3)
