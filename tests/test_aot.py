"""Ahead-of-time planning (cxr_rf.aot) and the accelerator tables (cxr_rf.hardware).

The compile tests need libtpu (not a TPU) and run the CLI in a subprocess, so libtpu never
loads into the pytest process; without libtpu they skip, saying so. The tables, the topology
name checks and the projection arithmetic run everywhere.
"""
import importlib.util
import json
import os
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

@pytest.mark.parametrize("kind, bf16, hbm", [
    ("TPU v5 lite", 197e12, 16 * GiB),          # v5e as JAX names it
    ("TPU v5", 459e12, 95 * GiB),               # v5p reports plain "TPU v5"
    ("TPU v5p", 459e12, 95 * GiB),
    ("TPU v6 lite", 918e12, 32 * GiB),          # v6e (Trillium)
    ("TPU v4", 275e12, 32 * GiB),
    ("NVIDIA H100 80GB HBM3", 989e12, 80 * GiB),
    ("NVIDIA H200", 989e12, 141 * GiB),
    ("NVIDIA A100-SXM4-80GB", 312e12, 80 * GiB),
    ("NVIDIA A100-SXM4-40GB", 312e12, 40 * GiB),
])
def test_hardware_tables(kind, bf16, hbm):
    assert hardware.peak_flops(kind, "bfloat16") == bf16
    assert hardware.chip(kind).hbm == hbm


def test_hardware_f32_and_unknown_kinds():
    assert hardware.peak_flops("NVIDIA H100 80GB HBM3", "float32") == 494e12   # TF32
    assert hardware.peak_flops("TPU v5 lite", "float32") == 197e12
    with pytest.raises(ValueError, match="unknown accelerator device_kind 'cpu'; known: "):
        hardware.chip("cpu")
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        hardware.peak_flops("TPU v4", "int8")


def test_bench_reads_the_moved_table():
    from cxr_rf import bench
    assert bench.PEAK_FLOPS is hardware.PEAK_FLOPS
    per_device = {k: v for k, v, _ in hardware.PEAK_FLOPS}
    assert per_device["TPU v3"] == 61.5e12          # 2 devices per v3 chip
    assert per_device["TPU v5 lite"] == 197e12
    # "TPU v5 lite" must match before the plain "TPU v5" of v5p.
    kinds = [k for k, _, _ in hardware.PEAK_FLOPS]
    assert kinds.index("TPU v5 lite") < kinds.index("TPU v5")


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
    if HAS_LIBTPU:
        pytest.skip("libtpu is installed here; the missing-libtpu error is tested without it")
    with pytest.raises(aot.PlanError, match=r"install the tpu extra: pip install -e '\.\[tpu\]'"):
        aot.tpu_topology("v5p:2x2x2")


# ----------------------------------------------------------------------------- compiling (libtpu)

def _aot(*args, tmp_path):
    """Run the CLI in a fresh process (libtpu loads there, not in pytest)."""
    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)   # the CLI picks cpu for its own (default) backend
    env.pop("XLA_FLAGS", None)       # forced host device counts etc. do not apply
    return subprocess.run([sys.executable, "-m", "cxr_rf.aot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@needs_libtpu
def test_smoke_config_compiles_and_fits(tmp_path):
    out = tmp_path / "plan.json"
    r = _aot("--config", "experiments/smoke.py", "--topology", "v5e:2x2", "--json", str(out),
             tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith("fits: ")
    p = json.loads(out.read_text())
    assert p["chips"] == 4 and p["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert p["global_batch"] == 32 and p["per_device_batch"] == 8
    mem = p["memory"]
    assert all(mem[k] > 0 for k in ("arguments", "outputs", "temporaries", "code"))
    assert 0 < mem["aliased"] <= mem["outputs"]                 # the donated state
    assert sum(mem.values()) - 2 * mem["aliased"] == p["memory_total_bytes_per_device"]
    assert p["memory_total_bytes_per_device"] < p["hbm_bytes_per_device"] == 16 * GiB
    # XLA's per-device count vs the analytic count of the same program (scan body once).
    assert 0.8 < p["flops_ratio"] < 1.5, p["flops_ratio"]
    assert p["run"]["stages"][0]["steps"] == 400


@pytest.mark.slow
@needs_libtpu
def test_non_fit_exits_1_with_the_message(tmp_path):
    r = _aot("--config", "experiments/smoke.py", "--topology", "v5e:2x2",
             "--per_device_batch", "8192", tmp_path=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("does not fit: ") and last.endswith("GiB HBM per device"), last


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
