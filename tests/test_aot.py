"""Ahead-of-time planning (cxr_rf.aot) and the accelerator tables (cxr_rf.hardware).

The compile tests need libtpu (not a TPU) and run the CLI in a subprocess, so libtpu never
loads into the pytest process; without libtpu they skip, saying so. The tables, the topology
name checks and the projection arithmetic run everywhere.
"""
import importlib.util
import json
import os
import runpy
import subprocess
import sys

import pytest

from cxr_rf import aot, hardware
from cxr_rf import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")
GiB = 2**30


# ----------------------------------------------------------------------------- hardware

# Every device_kind the table knows, with its own row's name and dense bf16 peak.
KINDS = [
    ("TPU v5 lite", "TPU v5e", 197e12), ("TPU v5e", "TPU v5e", 197e12),
    ("TPU v5", "TPU v5p", 459e12), ("TPU v5p", "TPU v5p", 459e12),
    ("TPU v6 lite", "TPU v6e", 918e12), ("TPU v6e", "TPU v6e", 918e12),
    ("TPU v4", "TPU v4", 275e12), ("TPU v3", "TPU v3", 123e12),
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989.5e12),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756.5e12),
    ("NVIDIA H100 NVL", "NVIDIA H100 NVL", 835.5e12),
    ("NVIDIA H200", "NVIDIA H200 SXM", 989.5e12),
    ("NVIDIA H200 NVL", "NVIDIA H200 NVL", 835.5e12),
    ("NVIDIA GH200 480GB", "NVIDIA GH200 96GB", 989.5e12),
    ("NVIDIA B200", "NVIDIA B200", 2250e12),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", "NVIDIA A100 80GB", 312e12),
    ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 40GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", "NVIDIA A100 40GB", 312e12),
    ("NVIDIA L40S", "NVIDIA L40S", 362.05e12),
    ("NVIDIA L40", "NVIDIA L40", 181.05e12),
    ("NVIDIA L4", "NVIDIA L4", 121e12),
]


@pytest.mark.parametrize("kind, name, bf16", KINDS)
def test_each_kind_maps_to_its_own_row(kind, name, bf16):
    c = hardware.chip(kind)
    assert c.name == name and hardware.peak_flops(kind, "bfloat16") == pytest.approx(bf16)
    assert c.source                                       # every row says where it is from
    assert {k for k, _, _ in KINDS if hardware.chip(k) is c} == set(c.kinds)


def test_the_table_lists_exactly_these_kinds():
    assert sorted(k for c in hardware.CHIPS for k in c.kinds) == sorted(k for k, _, _ in KINDS)


@pytest.mark.parametrize("kind", [
    "NVIDIA H100", "H100", "NVIDIA H100 SXM5 80GB", "NVIDIA H100 80GB HBM3 ",   # not exact
    "nvidia h100 80gb hbm3", "NVIDIA H200 SXM", "NVIDIA GH200 144G HBM3e", "NVIDIA H20",
    "NVIDIA L40G", "NVIDIA L4 ", "NVIDIA A10G", "NVIDIA A10", "NVIDIA A100", "NVIDIA B100",
    "NVIDIA GB200", "TPU v5 litepod", "TPU v5 lite ", "TPU v7", "TPU v6", "cpu",
])
def test_near_miss_kinds_are_refused(kind):
    with pytest.raises(ValueError, match=rf"^unknown accelerator device_kind {kind!r}; known: "):
        hardware.chip(kind)


def test_hardware_f32_usable_hbm_ici():
    GB = 1e9
    assert hardware.peak_flops("NVIDIA H100 80GB HBM3", "float32") == 494.5e12   # TF32 dense
    assert hardware.peak_flops("NVIDIA H100 PCIe", "float32") == 378e12
    assert hardware.peak_flops("TPU v5 lite", "float32") == 197e12
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        hardware.peak_flops("TPU v4", "int8")
    usable = {k: hardware.chip(k).hbm_usable / GiB for k in ("TPU v5 lite", "TPU v6 lite",
                                                             "TPU v5", "TPU v4")}
    assert usable == pytest.approx({"TPU v5 lite": 15.75, "TPU v6 lite": 31.25, "TPU v5": 95.74,
                                    "TPU v4": 30.75}, abs=0.005)
    # Cloud TPU's bidirectional ICI per chip; one link one way = that / (2 × links).
    assert [hardware.chip(k).ici / GB for k in ("TPU v5 lite", "TPU v6 lite", "TPU v5")] \
        == [400, 800, 1200]
    assert hardware.chip("TPU v5").ici_link_one_way == 100 * GB
    assert hardware.chip("TPU v5 lite").ici_link_one_way == 50 * GB
    assert hardware.chip("NVIDIA H200").ici is None


def test_bench_reads_the_table_exactly():
    from cxr_rf import bench
    assert bench.PEAK_FLOPS is hardware.PEAK_FLOPS
    per_device = {k: v for k, v, _ in hardware.PEAK_FLOPS}
    assert per_device["TPU v3"] == 61.5e12          # 2 devices per v3 chip
    assert per_device["TPU v5 lite"] == 197e12 and per_device["TPU v5"] == 459e12
    assert len(per_device) == len(hardware.PEAK_FLOPS)
    src = open(os.path.join(ROOT, "cxr_rf", "bench.py")).read()
    assert "if kind == dev.device_kind:" in src     # exact match there too


# ----------------------------------------------------------------------------- names, arithmetic

@pytest.mark.parametrize("name", ["v5e:4x4", "v5p:2x2x2", "v6e:8x8", "v4:2x2x2"])
def test_topology_names_accepted(name):
    aot.check_topology_name(name)


@pytest.mark.parametrize("name, message", [
    ("v5p-128", "Cloud TPU accelerator type.*v5p:4x4x4"),
    ("v5litepod-16", "Cloud TPU accelerator type"),
    ("4x4", "bad topology '4x4': expected GENERATION:AxB or AxBxC"),
    ("v5e:4", "bad topology"),
])
def test_topology_names_refused(name, message):
    with pytest.raises(aot.PlanError, match=message):
        aot.check_topology_name(name)


def test_projection_arithmetic():
    # 1e15 FLOPs on 10 chips of 1e14 FLOP/s at 50% MFU: 2 s.
    assert aot.step_seconds(1e15, 10, 1e14, 0.5) == pytest.approx(2.0)
    with pytest.raises(aot.PlanError, match="--mfu must be in"):
        aot.step_seconds(1e15, 10, 1e14, 0.0)
    assert aot.train_flops_factor("none") == aot.train_flops_factor("dots") == 3.0
    assert aot.train_flops_factor("full") == 4.0


def test_run_cost_sums_the_stages():
    from cxr_rf.model import ModelConfig, flops_per_image
    cfg = config_lib.base()
    cfg.data.resolution = 64
    cfg.train.update(steps=300, batch_size=16, stages=((0, 32, 64), (100, 64)))
    run = aot.run_cost(cfg, chips=8, peak_per_chip=1e12, mfu=0.5)
    fwd = {r: flops_per_image(ModelConfig.from_config(cfg), r) for r in (32, 64)}
    want = [100 * 3 * fwd[32] * 64, 200 * 3 * fwd[64] * 16]   # steps × model FLOPs per step
    got = [s["chip_hours"] for s in run["stages"]]
    assert got == pytest.approx([w / (1e12 * 0.5) / 3600 for w in want])
    assert run["chip_hours"] == pytest.approx(sum(got))
    assert run["hours"] == pytest.approx(run["chip_hours"] / 8)
    assert [s["batch_size"] for s in run["stages"]] == [64, 16]


def test_xla_counted_forward_counts_one_scanned_block():
    from cxr_rf.model import ModelConfig, flops_per_image
    cfg = config_lib.base()
    cfg.model.update(depth=5, scan=True)
    two = dict(cfg.model.to_dict(), depth=2)
    c2 = config_lib.base()
    c2.model.update(two)
    assert aot.xla_counted_forward(cfg, 64) == flops_per_image(ModelConfig.from_config(c2), 64)
    cfg.model.scan = False
    assert aot.xla_counted_forward(cfg, 64) == flops_per_image(ModelConfig.from_config(cfg), 64)


def test_memory_total_and_oom_parsing():
    mem = {"arguments": 10, "outputs": 9, "aliased": 8, "temporaries": 5, "code": 1}
    assert aot.memory_total(mem) == 17
    assert aot.parse_hbm_oom("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                             "required for HLO temporaries (120.50G) exceeds available HBM "
                             "(15.75G).") == (int(120.5 * GiB), int(15.75 * GiB))
    assert aot.parse_hbm_oom("Ran out of memory in memory space hbm. Used 2.5G of 31.25G hbm.") \
        == (int(2.5 * GiB), int(31.25 * GiB))
    assert aot.parse_hbm_oom("INVALID_ARGUMENT: something else") is None


def test_libtpu_missing_is_a_one_line_error(monkeypatch):
    find_spec = importlib.util.find_spec       # CI has libtpu: look as if it had not
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
    with pytest.raises(aot.PlanError, match=r"install the tpu extra: pip install -e '\.\[tpu\]'"):
        aot.tpu_topology("v5p:2x2x2")


@pytest.mark.parametrize("name, wrap", [
    # As MaxText's accelerator_to_spec_map gives them (v5p-128 = 4x4x4 -> all three, ...).
    ("v5p:4x4x4", (True, True, True)), ("v5p:4x4x8", (True, True, True)),
    ("v5p:8x8x16", (True, True, True)), ("v4:4x4x4", (True, True, True)),
    ("v5p:2x2x1", (False, False, False)), ("v5p:2x2x2", (False, False, False)),
    ("v5p:2x4x4", (False, False, False)), ("v4:2x2x4", (False, False, False)),
    ("v5e:16x16", (True, True, False)), ("v6e:16x16", (True, True, False)),
    ("v5e:8x16", (False, True, False)), ("v6e:8x16", (False, True, False)),
    ("v5e:8x8", (False, False, False)), ("v6e:8x8", (False, False, False)),
    ("v5e:4x4", (False, False, False)), ("v3:4x4", None),
])
def test_torus_wrap(name, wrap):
    assert aot.torus_wrap(*aot.parse_topology(name)) == wrap


def test_ici_bandwidth_into_a_chip():
    v5p, v5e = hardware.chip("TPU v5"), hardware.chip("TPU v5 lite")

    def bw(chip, name):
        gen, dims = aot.parse_topology(name)
        return aot.ici_bytes_per_s(chip, dims, aot.torus_wrap(gen, dims))
    assert bw(v5p, "v5p:4x4x4") == 6 * 100e9           # torus: 2 links per axis
    assert bw(v5p, "v5p:2x2x2") == 3 * 100e9           # no wrap-around: 1 per axis
    assert bw(v5p, "v5p:2x2x1") == 2 * 100e9           # an axis of 1 has no link
    assert bw(v5e, "v5e:4x4") == 2 * 50e9
    assert bw(v5e, "v5e:16x16") == 4 * 50e9
    assert bw(v5e, "v5e:8x16") == 3 * 50e9
    assert aot.ici_bytes_per_s(hardware.chip("NVIDIA H200"), (8,), None) is None


def test_fit_limit_and_comm_step():
    assert aot.fit_limit(100) == 90 and aot.fit_limit(100, 0.5) == 50
    with pytest.raises(aot.PlanError, match="--max_hbm_fraction must be in"):
        aot.fit_limit(100, 1.5)
    assert aot.comm_step_seconds(2.0, 3.0) == {"step_s_overlapped": 3.0, "step_s_serial": 5.0}
    assert aot.comm_step_seconds(2.0, 0.5)["step_s_overlapped"] == 2.0
    assert aot.comm_step_seconds(2.0, None) == {"step_s_overlapped": None, "step_s_serial": None}


def test_verdict_states_both_numbers():
    p = {"memory": {}, "memory_total_bytes_per_device": int(14.5 * GiB), "fits": False,
         "hbm_limit_bytes_per_device": int(0.9 * 15.75 * GiB), "max_hbm_fraction": 0.9,
         "hbm_usable_bytes_per_device": int(15.75 * GiB)}
    assert aot.verdict(p) == ("does not fit: 14.50 GiB > 14.17 GiB = 90% of 15.75 GiB usable "
                              "HBM per device")
    p.update(memory_total_bytes_per_device=int(14 * GiB), fits=True)
    assert aot.verdict(p).startswith("fits: 14.00 GiB <= 14.17 GiB = 90% of 15.75 GiB")
    p.update(memory=None, xla_hbm_limit_bytes_per_device=int(15.75 * GiB))
    assert aot.verdict(p) == "does not fit: 14.00 GiB > 15.75 GiB usable HBM per device"


# ----------------------------------------------------------------------------- collectives

# The HLO forms XLA:TPU prints (libtpu 0.0.42.1), by hand: a microbatch loop (trip count only
# in its condition, 3) around a layer loop (known_trip_count 4) that all-gathers a bf16[64,32]
# over mesh groups of 4 and reduce-scatters an f32[64,32] as TPU's all-reduce-scatter fusion;
# outside them an all-reduce of a tuple over iota groups of 2, an async all-gather, a
# collective-permute-start/done pair, an all-to-all over explicit groups of 8, and one
# asynchronous all-gather of f32[32,10] spread over three fusions of one chain_id; and, once
# per microbatch, a chain started in the microbatch body whose steps XLA placed in the layer
# loop (it runs once per microbatch, not once per layer).
SYNTHETIC_HLO = """HloModule jit_step, is_scheduled=true, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%all-reduce-scatter.1 (input.1: f32[64,32]) -> f32[16,32] {
  %input.1 = f32[64,32]{1,0:T(8,128)} parameter(0)
  %all-reduce.7 = f32[64,32]{1,0:T(8,128)} all-reduce(%input.1), channel_id=3, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, use_global_device_ids=true, to_apply=%add
  %pid = u32[] partition-id()
  %c16 = u32[] constant(16)
  %off = u32[]{:T(128)} multiply(%pid, %c16)
  %c0 = u32[] constant(0)
  ROOT %dynamic-slice.1 = f32[16,32]{1,0:T(8,128)} dynamic-slice(%all-reduce.7, %off, %c0), dynamic_slice_sizes={16,32}
}

%chain_start (c.0: f32[4,10]) -> f32[32,10] {
  %c.0 = f32[4,10]{1,0} parameter(0)
  ROOT %all-gather.8 = f32[32,10]{1,0} all-gather(%c.0), channel_id=9, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, frontend_attributes={chain_id="5"}
}

%chain_step (c.1: f32[4,10]) -> f32[32,10] {
  %c.1 = f32[4,10]{1,0} parameter(0)
  ROOT %all-gather.9 = f32[32,10]{1,0} all-gather(%c.1), channel_id=9, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, frontend_attributes={chain_id="5"}
}

%chain6_start (c.2: f32[4,10]) -> f32[32,10] {
  %c.2 = f32[4,10]{1,0} parameter(0)
  ROOT %all-gather.10 = f32[32,10]{1,0} all-gather(%c.2), channel_id=11, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, frontend_attributes={chain_id="6"}
}

%chain6_step (c.3: f32[4,10]) -> f32[32,10] {
  %c.3 = f32[4,10]{1,0} parameter(0)
  ROOT %all-gather.11 = f32[32,10]{1,0} all-gather(%c.3), channel_id=11, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, frontend_attributes={chain_id="6"}
}

%layer_body (p: (s32[], bf16[16,32])) -> (s32[], bf16[16,32]) {
  %p = (s32[]{:T(128)}, bf16[16,32]{1,0}) parameter(0)
  %w = bf16[16,32]{1,0:T(8,128)(2,1)} get-tuple-element(%p), index=1
  %all-gather.1 = bf16[64,32]{1,0:T(8,128)(2,1)} all-gather(%w), channel_id=1, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={0}, use_global_device_ids=true
  %g = f32[64,32]{1,0} convert(%all-gather.1)
  %fusion.9 = f32[16,32]{1,0:T(8,128)} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.1
  %gs = f32[4,10]{1,0} slice(%g), slice={[0:4], [0:10]}
  %fusion.10 = f32[32,10]{1,0} fusion(%gs), kind=kCustom, calls=%chain6_step
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], bf16[16,32]) tuple(%i, %w)
}

%layer_cond (p.1: (s32[], bf16[16,32])) -> pred[] {
  %p.1 = (s32[], bf16[16,32]) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %n.1 = s32[] constant(4)
  ROOT %lt = pred[] compare(%i.1, %n.1), direction=LT
}

%micro_body (q: (s32[], bf16[16,32])) -> (s32[], bf16[16,32]) {
  %q = (s32[], bf16[16,32]) parameter(0)
  %qw = bf16[16,32]{1,0} get-tuple-element(%q), index=1
  %qf = f32[16,32]{1,0} convert(%qw)
  %qs = f32[4,10]{1,0} slice(%qf), slice={[0:4], [0:10]}
  %fusion.11 = f32[32,10]{1,0} fusion(%qs), kind=kCustom, calls=%chain6_start
  ROOT %while.1 = (s32[], bf16[16,32]) while(%q), condition=%layer_cond, body=%layer_body, backend_config={"known_trip_count":{"n":"4"}}
}

%micro_cond (q.1: (s32[], bf16[16,32])) -> pred[] {
  %q.1 = (s32[], bf16[16,32]) parameter(0)
  %j = s32[]{:T(128)} get-tuple-element(%q.1), index=0
  %constant.9 = s32[]{:T(128)} constant(3)
  ROOT %lt.1 = pred[]{:T(512)} compare(%j, %constant.9), direction=LT, metadata={op_name="jit(step)/while/cond/lt"}
}

ENTRY %main (x: (s32[], bf16[16,32]), y: f32[100], z: f32[8,10]) -> f32[100] {
  %x = (s32[], bf16[16,32]) parameter(0)
  %while.2 = (s32[], bf16[16,32]) while(%x), condition=%micro_cond, body=%micro_body
  %y = f32[100]{0} parameter(1)
  %z = f32[8,10]{1,0} parameter(2)
  %all-reduce.2 = (f32[100]{0:T(128)}, f32[8,10]{1,0}, /*index=2*/f32[8,10]{1,0}) all-reduce(%y, %z, %z), channel_id=5, replica_groups=[4,2]<=[8], use_global_device_ids=true, to_apply=%add
  %all-gather-start = (f32[8,10]{1,0}, f32[64,10]{1,0}) all-gather-start(%z), channel_id=6, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %all-gather-done = f32[64,10]{1,0} all-gather-done(%all-gather-start)
  %collective-permute-start = (f32[8,10]{1,0}, f32[8,10]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%z), channel_id=7, source_target_pairs={{0,1},{1,2}}
  %collective-permute-done = f32[8,10]{1,0} collective-permute-done(%collective-permute-start)
  %all-to-all = f32[8,10]{1,0} all-to-all(%z), channel_id=8, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %zs = f32[4,10]{1,0} slice(%z), slice={[0:4], [0:10]}
  %fusion.1 = f32[32,10]{1,0} fusion(%zs), kind=kCustom, calls=%chain_start
  %fusion.2 = f32[32,10]{1,0} fusion(%zs), kind=kCustom, calls=%chain_step
  %fusion.3 = f32[32,10]{1,0} fusion(%zs), kind=kCustom, calls=%chain_step
  ROOT %out = f32[100]{0} get-tuple-element(%all-reduce.2), index=0
}
"""


def test_collective_bytes_of_hand_written_hlo():
    c = aot.collective_bytes(SYNTHETIC_HLO)
    k = c["by_kind"]
    runs = 3 * 4                                       # microbatches × layers
    assert k["all-gather"]["executions"] == runs + 2 + 3
    assert k["all-gather"]["payload_bytes"] == (runs * 64 * 32 * 2 + 64 * 10 * 4
                                                + 32 * 10 * 4 + 3 * 32 * 10 * 4)
    assert k["all-gather"]["wire_bytes"] == (runs * 64 * 32 * 2 * 3 / 4 + 64 * 10 * 4 * 7 / 8
                                             + 32 * 10 * 4 * 7 / 8 + 3 * 32 * 10 * 4 * 7 / 8)
    assert k["reduce-scatter"] == {"executions": runs, "payload_bytes": runs * 64 * 32 * 4,
                                   "wire_bytes": runs * 64 * 32 * 4 * 3 / 4}
    tuple_bytes = (100 + 80 + 80) * 4
    assert k["all-reduce"] == {"executions": 1, "payload_bytes": tuple_bytes,
                               "wire_bytes": tuple_bytes * 2 * 1 / 2}      # groups of 2
    assert k["collective-permute"] == {"executions": 1, "payload_bytes": 320, "wire_bytes": 320}
    assert k["all-to-all"] == {"executions": 1, "payload_bytes": 320, "wire_bytes": 320 * 7 / 8}
    assert c["wire_bytes"] == sum(v["wire_bytes"] for v in k.values())
    assert c["unknown_trip_counts"] == 0


def test_an_instruction_over_several_lines_keeps_the_rest_of_its_computation():
    """A Pallas kernel (splash attention) prints its frontend_attributes over several lines,
    one starting with "}}": the collectives after it in ENTRY still count."""
    kernel = ('  %splash = f32[8,10]{1,0} custom-call(%z), custom_call_target="tpu_custom_call", '
              'frontend_attributes={kernel_metadata={\n'
              '"xprof_metadata":"{\\"block_q\\": 128}"\n'
              '}}, metadata={op_name="jit(step)/splash"}\n')
    hlo = SYNTHETIC_HLO.replace("  %all-reduce.2 = ", kernel + "  %all-reduce.2 = ")
    assert "\n}}, metadata" in hlo
    assert aot.collective_bytes(hlo) == aot.collective_bytes(SYNTHETIC_HLO)


def test_collective_bytes_unknown_trip_count_counts_once():
    hlo = SYNTHETIC_HLO.replace("direction=LT, metadata", "direction=NE, metadata")
    c = aot.collective_bytes(hlo)
    assert c["unknown_trip_counts"] == 1
    assert c["by_kind"]["reduce-scatter"]["executions"] == 4


_SHARDED_PROGRAM = r"""
import json, sys
from functools import partial
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from cxr_rf import aot

n, M, L, k, m = 8, 2, 3, 16, 32
mesh = Mesh(np.array(jax.devices()), ("x",))


@jax.jit
@partial(jax.shard_map, mesh=mesh, in_specs=(P(None, None, "x"), P("x")), out_specs=P(),
         check_vma=False)
def f(w, g):
    def outer(c, wm):                       # M iterations, each scanning L layers
        def inner(c, wl):
            full = jax.lax.all_gather(wl, "x", axis=0, tiled=True)       # f32[n*k, m]
            return c + jnp.sum(jnp.sin(full)), None
        return jax.lax.scan(inner, c, wm)[0], None
    c = jax.lax.scan(outer, jnp.float32(0), w)[0]
    s = jax.lax.psum(g, "x")                                              # f32[k, m]
    r = jax.lax.psum_scatter(g, "x", scatter_dimension=0, tiled=True)     # from f32[k, m]
    p = jax.lax.ppermute(g, "x", perm=[(i, (i + 1) % n) for i in range(n)])
    a = jax.lax.all_to_all(g, "x", 0, 0, tiled=True)
    out = c + sum(jnp.sum(jnp.cos(v)) for v in (s, r, p, a))
    return jax.lax.psum(out, "x")                                         # f32[]


args = (jax.ShapeDtypeStruct((M, L, n * k, m), jnp.float32),
        jax.ShapeDtypeStruct((n * k, m), jnp.float32))
hlo = f.lower(*args).compile().as_text()
json.dump({"counted": aot.collective_bytes(hlo), "while": hlo.count(" while(")}, sys.stdout)
"""


def test_collective_bytes_of_a_sharded_program_on_8_cpu_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-c", _SHARDED_PROGRAM], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["while"] == 2                       # both scans stayed loops
    k = out["counted"]["by_kind"]
    n, M, L, km = 8, 2, 3, 16 * 32 * 4             # km: bytes of one device's f32[k, m]
    layer = n * km                                 # one gathered layer, f32[n*k, m]
    assert k["all-gather"] == {"executions": M * L, "payload_bytes": M * L * layer,
                               "wire_bytes": M * L * layer * (n - 1) / n}
    assert k["all-reduce"] == {"executions": 2, "payload_bytes": km + 4,
                               "wire_bytes": (km + 4) * 2 * (n - 1) / n}
    assert k["reduce-scatter"] == {"executions": 1, "payload_bytes": km,
                                   "wire_bytes": km * (n - 1) / n}
    assert k["collective-permute"] == {"executions": 1, "payload_bytes": km, "wire_bytes": km}
    assert k["all-to-all"] == {"executions": 1, "payload_bytes": km,
                               "wire_bytes": km * (n - 1) / n}
    assert out["counted"]["unknown_trip_counts"] == 0


# ----------------------------------------------------------------------------- compiling (libtpu)

def _aot(*args, tmp_path):
    """Run the CLI in a fresh process (libtpu loads there, not in pytest)."""
    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)   # the CLI picks cpu for its own (default) backend
    env.pop("XLA_FLAGS", None)       # forced host device counts etc. do not apply
    return subprocess.run([sys.executable, "-m", "cxr_rf.aot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


_LIBTPU_FACTS = r"""
import json
from jax._src import xla_bridge
from cxr_rf import aot, hardware

out = {"usable": {}, "topologies": {}}
for name in ["v5e:2x2", "v5p:2x2x1", "v6e:2x2", "v4:2x2x1"]:
    t = aot.tpu_topology(name)
    out["usable"][t.device_kind] = aot.usable_hbm_per_device(t.devices[0])
for name in ["v5p:4x4x4", "v5p:2x2x2", "v6e:8x8", "v6e:16x16", "v5e:16x16", "v5e:4x4",
             "v4:4x4x4"]:
    t = aot.tpu_topology(name)
    out["topologies"][name] = {"chips": t.chips, "devices": len(t.devices),
                               "chip": hardware.chip(t.device_kind).name, "wrap": t.wrap}
# libtpu takes the wrap flags (a different topology), it does not ignore them.
fp = lambda **kw: xla_bridge.make_pjrt_tpu_topology("v5p:4x4x4", **kw).fingerprint()
out["wrap_changes_topology"] = fp(wrap=(True, True, True)) != fp()
out["no_wrap_is_default"] = fp(wrap=(False, False, False)) == fp()
print(json.dumps(out))
"""


@needs_libtpu
def test_libtpu_topologies_tori_and_usable_hbm():
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               TPU_MIN_LOG_LEVEL="3", TPU_STDERR_LOG_LEVEL="3", TPU_WORKER_HOSTNAMES="localhost")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-c", _LIBTPU_FACTS], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    # What XLA:TPU lets a program use is what the table says (and below the nominal HBM).
    for kind, usable in out["usable"].items():
        assert usable == hardware.chip(kind).hbm_usable < hardware.chip(kind).hbm * 1.01, kind
    assert sorted(out["usable"]) == ["TPU v4", "TPU v5", "TPU v5 lite", "TPU v6 lite"]
    t = out["topologies"]
    want = {"v5p:4x4x4": (64, "TPU v5p", [True] * 3), "v5p:2x2x2": (8, "TPU v5p", [False] * 3),
            "v6e:8x8": (64, "TPU v6e", [False] * 3), "v6e:16x16": (256, "TPU v6e",
                                                                   [True, True, False]),
            "v5e:16x16": (256, "TPU v5e", [True, True, False]),
            "v5e:4x4": (16, "TPU v5e", [False] * 3), "v4:4x4x4": (64, "TPU v4", [True] * 3)}
    for name, (chips, chip, wrap) in want.items():
        # one device per chip everywhere (v4 as megacore, as TPU VMs run it)
        assert t[name] == {"chips": chips, "devices": chips, "chip": chip, "wrap": wrap}, name
    assert out["wrap_changes_topology"] and out["no_wrap_is_default"]


@pytest.mark.slow
@needs_libtpu
def test_fsdp_microbatch_plan_compiles_fits_and_counts_collectives(tmp_path):
    from cxr_rf.model import ModelConfig, param_count
    out = tmp_path / "plan.json"
    r = _aot("--config", "experiments/smoke.py", "--topology", "v5e:2x2", "--json", str(out),
             "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.train.microbatches=2",
             tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    p = json.loads(out.read_text())
    assert r.stdout.strip().splitlines()[-1] == aot.verdict(p)
    assert aot.verdict(p).startswith("fits: ") and "= 90% of 15.75 GiB usable HBM" in aot.verdict(p)
    smoke = runpy.run_path(os.path.join(ROOT, "experiments", "smoke.py"))["get_config"]()
    batch = smoke.train.batch_size
    assert p["chips"] == 4 and p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert (p["global_batch"], p["per_device_batch"], p["microbatches"]) == (batch, batch // 4, 2)
    mem = p["memory"]
    assert all(mem[k] > 0 for k in ("arguments", "outputs", "temporaries", "code"))
    assert 0 < mem["aliased"] <= mem["outputs"]                 # the donated state
    total = p["memory_total_bytes_per_device"]
    assert sum(mem.values()) - 2 * mem["aliased"] == total
    assert p["hbm_bytes_per_device"] == 16 * GiB and p["hbm_usable_source"] == "libtpu"
    assert p["hbm_usable_bytes_per_device"] == int(15.75 * GiB)
    assert p["hbm_limit_bytes_per_device"] == int(0.9 * 15.75 * GiB)
    assert p["fits"] == (total <= p["hbm_limit_bytes_per_device"])
    assert p["fraction_of_usable"] == pytest.approx(total / (15.75 * GiB))
    # XLA's per-device count vs the analytic count of the same program (scan body once).
    assert 0.8 < p["flops_ratio"] < 1.5, p["flops_ratio"]
    # FSDP with 2 microbatches: the f32 gradients are reduce-scattered once per microbatch
    # (XLA pads some shapes to tiles: up to 1.5×), the weights gathered at least once.
    params = param_count(ModelConfig.from_config(smoke))
    c = p["collectives"]["by_kind"]
    # (At 2.3M parameters XLA combines the reduce-scatters into 16 MiB buffers and all-reduces
    # the rest; the two together carry every gradient.)
    grads = c["reduce-scatter"]["payload_bytes"] + c.get("all-reduce", {}).get("payload_bytes", 0)
    assert 0.95 <= grads / (2 * 4 * params) < 1.5
    assert c["reduce-scatter"]["wire_bytes"] == pytest.approx(
        c["reduce-scatter"]["payload_bytes"] * 3 / 4)
    assert c["all-gather"]["payload_bytes"] >= 2 * 2 * params * 0.5
    assert p["collectives"]["unknown_trip_counts"] == 0
    # v5e:2x2 has no wrap-around: 2 axes × 1 link × 50 GB/s into each chip.
    assert p["torus_wrap"] == [False, False, False] and p["ici_bytes_per_s_per_chip"] == 1e11
    assert p["comm_s"] == pytest.approx(p["collective_wire_bytes_per_chip"] / 1e11)
    assert p["step_s_overlapped"] == max(p["step_s"], p["comm_s"])
    assert p["step_s_serial"] == pytest.approx(p["step_s"] + p["comm_s"])
    assert p["run"]["stages"][0]["steps"] == smoke.train.steps


@pytest.mark.slow
@needs_libtpu
def test_non_fit_on_a_torus_exits_1_with_the_message(tmp_path):
    # The rolled scan: 16384 images per chip then need more than the whole HBM (one trip of
    # the smoke recipe's scan needs less: 90.6 GiB, a fit-rule refusal with another message).
    r = _aot("--config", "experiments/smoke.py", "--topology", "v5p:4x4x4",
             "--per_device_batch", "16384", "--config.model.scan_unroll=1", tmp_path=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert "wrap-around xyz" in lines[0], lines[0]
    assert lines[-1].startswith("does not fit: ") \
        and lines[-1].endswith("GiB > 95.74 GiB usable HBM per device"), lines[-1]


@needs_libtpu
@pytest.mark.parametrize("args, message", [
    (["--topology", "v9:2x2"], "error: bad topology 'v9:2x2'"),
    (["--topology", "v5p-16"], "error: 'v5p-16' is a Cloud TPU accelerator type"),
    (["--topology", "v5e:2x2", "--stage", "3"], "error: --stage 3 does not exist"),
    (["--topology", "v5e:2x2", "--config.mesh.tensor=3"], "error: mesh "),
])
def test_bad_input_exits_2_with_one_line(args, message, tmp_path):
    r = _aot("--config", "experiments/smoke.py", *args, tmp_path=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert r.stderr.strip().splitlines()[-1].startswith(message), r.stderr[-1000:]
    assert "Traceback" not in r.stderr


def test_latent_runs_are_costed_on_their_latent_grid():
    """A latent experiment's FLOPs are those of its latent grid (512 px / 16 = 32²), not of
    its pixels: the model side and run_cost agree with the formula at 32."""
    cfg = runpy.run_path(os.path.join(ROOT, "experiments", "cxr_b_latent.py"))["get_config"]()
    assert aot.model_side(cfg, 512) == 32
    cost = aot.run_cost(cfg, chips=64, peak_per_chip=1e15, mfu=0.5)
    st = cost["stages"][-1]
    want = aot.model_flops_per_image(cfg, 32) * st["batch_size"] / (64 * 1e15 * 0.5)
    assert st["step_s"] == pytest.approx(want)


def test_autoencoder_run_cost_splits_the_two_phases():
    """Steps before gan_start are costed at the reconstruction program's FLOPs, the rest at
    the GAN program's; without the former, at the GAN one's (an upper bound)."""
    cost = aot.autoencoder_run_cost(steps=200, gan_start=50, batch=8, recon_flops=1e15,
                                    gan_flops=2e15, chips=4, peak_per_chip=1e16, mfu=0.5)
    rec, gan = cost["stages"]
    assert (rec["phase"], rec["steps"], rec["step_s"]) == ("reconstruction", 50, 0.2)
    assert (gan["phase"], gan["steps"], gan["step_s"]) == ("gan", 150, 0.4)
    assert cost["chip_hours"] == pytest.approx((50 * 0.2 + 150 * 0.4) * 4 / 3600)
    upper = aot.autoencoder_run_cost(steps=200, gan_start=50, batch=8, recon_flops=None,
                                     gan_flops=2e15, chips=4, peak_per_chip=1e16, mfu=0.5)
    assert upper["stages"][0]["flops_of"] == "gan" and upper["stages"][0]["step_s"] == 0.4
    # gan_start past the end: one phase.
    assert [r["phase"] for r in aot.autoencoder_run_cost(
        10, 50, 8, 1e15, 2e15, 4, 1e16, 0.5)["stages"]] == ["reconstruction"]


@pytest.mark.slow
@needs_libtpu
def test_autoencoder_plan_compiles_both_programs_and_fits(tmp_path):
    """task=autoencoder: the GAN-phase step (and the reconstruction-only one) of the AE smoke
    config compiled for v5e:2x2 from abstract inputs, with memory, compiled FLOPs, the
    collectives of its data-parallel gradients, a run cost over both phases and a verdict.
    (Shrunk to 32² so that the two compiles stay short.)"""
    out = tmp_path / "plan.json"
    r = _aot("--config", "experiments/ae_smoke.py", "--topology", "v5e:2x2", "--json", str(out),
             "--config.data.resolution=32", "--config.train.batch_size=8", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    p = json.loads(out.read_text())
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == aot.verdict(p) and lines[-1].startswith("fits: ")
    assert "autoencoder GAN-phase step (steps 300-400" in lines[1], lines[1]
    assert any("vs analytic n/a" in x for x in lines)
    assert p["task"] == "autoencoder" and p["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert (p["global_batch"], p["per_device_batch"], p["resolution"]) == (8, 2, 32)
    mem = p["memory"]
    # (At 32², batch 2 per device, XLA:TPU reports no temporaries beyond the buffers.)
    assert all(mem[k] > 0 for k in ("arguments", "outputs", "code")) and mem["temporaries"] >= 0
    assert 0 < mem["aliased"] <= mem["outputs"]                 # the donated state
    assert p["memory_total_bytes_per_device"] == aot.memory_total(mem)
    rp = p["recon_phase"]
    assert rp["fits"] and 0 < rp["memory_total_bytes_per_device"]
    # The GAN step adds the discriminator's forward/backward and update to the same generator.
    assert 0 < rp["compiled_flops_per_step_per_chip"] < p["compiled_flops_per_step_per_chip"]
    assert p["analytic_flops_per_step_per_chip"] is None and p["flops_ratio"] is None
    assert p["model_flops_per_step"] == p["compiled_flops_per_step_per_chip"] * 4
    assert p["step_s"] == pytest.approx(p["compiled_flops_per_step_per_chip"] / (197e12 * 0.4))
    # Data parallel: the replicated gradients are all-reduced.
    assert p["collectives"]["by_kind"]["all-reduce"]["payload_bytes"] > 0
    rec, gan = p["run"]["stages"]
    assert (rec["phase"], rec["steps"], gan["phase"], gan["steps"]) == (
        "reconstruction", 300, "gan", 100)
    assert rec["step_s"] < gan["step_s"] == pytest.approx(p["step_s"])
