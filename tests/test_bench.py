"""The benchmark command's machinery, cheaply: the sampler program does not compile again for
a call of the same shape, the peer scripts are found, run with the bench shape and parsed,
ours and the peer's alternate, and the per-host data demand follows the AOT projection.
(The timings themselves are commands, never tests.)"""
from __future__ import annotations

import os
import stat
import sys

import jax
import numpy as np
import pytest

from cxr_rf import bench, cli, conditioning, config, errors
from cxr_rf.sample import DEMO_CONDITIONS, Guidance

BENCH_CONFIG = os.path.join(os.path.dirname(__file__), "..", "experiments", "bench.py")


def _tiny_cfg():
    cfg = config.base()
    cfg.data.resolution = 16
    cfg.model.update(width=32, depth=2, heads=2, patch=4)
    return cfg


def test_a_second_sampler_call_of_the_same_shape_does_not_compile():
    call, sampler, program = bench.sample_program(_tiny_cfg(), batch=2, steps=2, scale=4.0)
    call()                                          # compiles (or reads the session cache)
    # The program is shared by every Sampler of this model (other tests' batch sizes too):
    # what counts is that it does not grow.
    size = program._cache_size()
    with bench.CompileCounter() as again:
        call()
    assert (again.compiles, again.traces) == (0, 0)
    assert program._cache_size() == size
    with bench.CompileCounter() as new:             # the counter does see a new program
        jax.jit(lambda x: x * 3 + 1)(np.ones(5, np.float32))
    assert new.compiles >= 1 and new.traces >= 1


def test_other_conditions_seeds_and_scale_reuse_the_program():
    call, sampler, program = bench.sample_program(_tiny_cfg(), batch=2, steps=2, scale=4.0)
    call()
    # Other parameter values of the same shapes (only shapes matter for compiling).
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), sampler._abstract)
    sampler.generate(params, DEMO_CONDITIONS[:2], [0, 1], steps=2, method="euler",
                     guidance=Guidance(scale=4.0))
    size = program._cache_size()
    with bench.CompileCounter() as again:
        # A short batch (padded to the batch size), other seeds, another scale.
        sampler.generate(params, DEMO_CONDITIONS[3:4], [77], steps=2, method="euler",
                         guidance=Guidance(scale=2.5))
    assert (again.compiles, again.traces) == (0, 0)
    assert program._cache_size() == size


def _fake_peer(tmp_path, body: str) -> str:
    """A peer folder whose two scripts run ``body`` (argv is written to args.txt)."""
    d = tmp_path / "peer"
    d.mkdir()
    for name in bench.PEER_SCRIPTS.values():
        (d / name).write_text("import sys\n"
                              f"open({str(d / 'args.txt')!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
                              + body)
    return str(d)


def test_the_peer_runs_at_the_bench_shape_and_its_rate_is_parsed(tmp_path):
    d = _fake_peer(tmp_path, "print('params=1.00M step_s=0.100 images_per_s=80.00')\n")
    cfg = cli_config()
    run = bench._peer_runner("train", cfg, 8, ["--steps=3"], sys.executable, d)
    assert run() == 80.0
    args = (tmp_path / "peer" / "args.txt").read_text().split()
    assert args == ["--image=64", "--patch=4", "--width=384", "--depth=6", "--heads=6",
                    "--text_len=64", "--text_dim=384", "--batch=8", "--steps=3"]


def test_a_failing_peer_is_one_line(tmp_path):
    d = _fake_peer(tmp_path, "raise SystemExit('no module named diffusers')\n")
    run = bench._peer_runner("sample", cli_config(), 8, [], sys.executable, d)
    with pytest.raises(errors.RunError, match=r"diffusers_sample.py failed \(exit 1\): no module"):
        run()


def test_ours_and_the_peer_alternate_and_medians_and_bests_are_reported():
    order = []
    ours = iter([1.0, 3.0, 2.0])
    theirs = iter([4.0, 4.0, 1.0])
    r = bench.alternate(lambda: order.append("ours") or next(ours),
                        lambda: order.append("peer") or next(theirs), rounds=3)
    assert order == ["ours", "peer"] * 3
    assert (r["images_per_s"], r["peer_images_per_s"], r["ratio"]) == (2.0, 4.0, 0.5)
    assert (r["best_images_per_s"], r["peer_best_images_per_s"], r["best_ratio"]) == (3.0, 4.0,
                                                                                     0.75)
    assert "ratio" not in bench.alternate(lambda: 1.0, None, rounds=2)


def test_missing_peer_scripts_and_python_are_one_line_errors(tmp_path, capsys):
    from cxr_rf import bench as module
    code = cli.call(module, ["train", f"--config={BENCH_CONFIG}", f"--peer_python={sys.executable}",
                             f"--peer_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "diffusers_step.py not found: --peer_dir must be the folder" in err[0]
    exe = tmp_path / "python"
    exe.write_text("")
    exe.chmod(exe.stat().st_mode & ~stat.S_IXUSR)
    with pytest.raises(errors.UserError, match="not an executable file"):
        bench._peer_runner("train", cli_config(), 8, [], str(exe), _fake_peer(tmp_path, ""))


def test_the_host_demand_follows_the_aot_projection():
    d = bench.host_demand("cxr_xl@v5p")
    assert d["hosts"] == 16                               # 64 chips, 4 per v5p host
    assert d["images_per_s_per_host"] == pytest.approx(1024 / 16 / 0.281)
    assert bench.host_demand("cxr_xl@v5p", step_s=0.5)["images_per_s_per_host"] == \
        pytest.approx(1024 / 16 / 0.5)
    with pytest.raises(errors.UserError, match="allowed: cxr_b@v5p"):
        bench.host_demand("cxr_xl@v9")


def test_the_data_bench_reads_the_training_pipeline(phantom_data):
    cfg = _tiny_cfg()
    r = bench.bench_data(cfg, phantom_data(16), 16, [0], batches=2, warmup=1, batch=4,
                         demand=bench.host_demand("cxr_xl@v5p"), host_cores=208)
    (row,) = r["rows"]
    assert row["workers"] == 0 and row["cores"] == len(os.sched_getaffinity(0))
    assert row["images_per_s"] > 0
    assert row["headroom"] == pytest.approx(row["images_per_s_per_core"] * 208 /
                                            (1024 / 16 / 0.281))


def cli_config():
    """experiments/bench.py's config (the shared benchmark shape)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_experiment", BENCH_CONFIG)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m.get_config()


def test_the_attention_bench_times_each_implementation_at_the_model_shape(capsys):
    cfg = _tiny_cfg()                               # 16 px, patch 4: 16 image + context tokens
    r = bench.bench_attention(cfg, ["matmul", "auto"], None, reps=1, rounds=1)
    s = 16 + conditioning.num_tokens(cfg.data.report_len)
    assert r["shape"] == {"B": cfg.train.batch_size, "T": s, "S": s, "N": 2, "K": 16}
    assert r["impls"]["auto"]["runs"] == "matmul"   # short sequences on a CPU
    assert all(v["fwd_ms"] > 0 and v["fwd_bwd_ms"] > 0 for v in r["impls"].values())
    assert bench.bench_attention(cfg, ["blocked"], (2, 9, 300, 2, 8), 1, 1)["impls"][
        "blocked"]["runs"] == "blocked"
    from cxr_rf import bench as module
    for args, msg in ((["--impls=matmul,flash"], "--impls: unknown attention 'flash'; allowed"),
                      (["--shape=2,3"], "--shape 2,3: expected five positive integers")):
        code = cli.call(module, ["attention", f"--config={BENCH_CONFIG}", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and msg in err[0], err
