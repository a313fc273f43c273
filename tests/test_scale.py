"""Scale-out: sharded == 1-device, placement by RULES, replication check, non-finite guard,
gradient accumulation, SIGTERM / kill -9 resume, resharded restore, corrupted checkpoints,
2 processes x 2 devices == 1 process x 4 devices.

Multi-device and multi-process checks run in subprocesses (tests/scale_worker.py, the CLI,
launch/local_multiprocess.sh) so this process keeps its single CPU device.
"""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import tiny as tiny_run
from cxr_rf import checkpoint, sharding, train
from cxr_rf import trainer as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = tiny_run.PATH
WORKER = os.path.join(ROOT, "tests", "scale_worker.py")
# Subprocesses inherit the session's persistent compilation cache (tests/conftest.py): the
# same tiny step, compiled by many runs and restarts, compiles once.
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
ENV.pop("XLA_FLAGS", None)


def tiny(**train_kw):
    """The 16² tiny run config (tests/tiny.py) with ``train.*`` overrides."""
    return tiny_run.load(16, **train_kw)


@pytest.fixture(scope="module")
def data_dir(phantom_data):
    return phantom_data(16)


def _run(args, timeout=300, check=True):
    r = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{args[:3]} failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                             f"{r.stderr[-3000:]}")
    return r


def _last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


# --- (a) sharding ---------------------------------------------------------------------------

@pytest.mark.slow
def test_8_device_mesh_equals_1_device_and_params_follow_rules():
    """data=2, fsdp=2, tensor=2: same losses/params as 1 device; placements; microbatches;
    an all-fsdp mesh compiles to the per-device FLOPs/temporaries of an all-data one."""
    out = _last_json(_run([sys.executable, WORKER, "sharded"]).stdout)
    assert out["ok"] and out["params_checked"] > 50


def test_sampler_sharded_or_replicated_over_8_devices_equals_1_device():
    """The sampler for models that do not fit one device (parameters FSDP-sharded over the
    local devices) and the data-parallel one give the single-device images."""
    out = _last_json(_run([sys.executable, WORKER, "sampler"]).stdout)
    assert out["ok"], out


@pytest.mark.xfail(strict=True, reason="open: one example per batch shard on a (2,2,2) mesh "
                   "gives wrong outputs on two shards (BUILD_NOTES, Scale-out); strict, so a "
                   "fix shows up as XPASS and this marker must go", raises=AssertionError)
def test_one_example_per_batch_shard_on_a_3_axis_mesh_equals_1_device():
    r = _run([sys.executable, WORKER, "one_per_shard"], check=False)
    if r.returncode:        # a crash is a failure, not the expected discrepancy
        pytest.fail(f"worker failed ({r.returncode}):\n{r.stderr[-3000:]}")
    out = _last_json(r.stdout)
    assert out["ok"], out["max_abs_diff_per_example"]


def test_replication_check_refuses_mostly_replicated_large_models():
    from cxr_rf import config
    from cxr_rf.model import abstract_params, build_model
    c = config.base()
    c.model.update(width=1024, depth=8, heads=8)
    boxed = abstract_params(build_model(c), 64)
    model_sharded = jax.sharding.AbstractMesh((2, 2, 2), sharding.MESH_AXES)
    frac, total = sharding.replicated_fraction(boxed, model_sharded)
    assert total >= 100e6 and frac < 0.02
    sharding.check_replication(boxed, model_sharded)
    data_only = jax.sharding.AbstractMesh((8, 1, 1), sharding.MESH_AXES)
    with pytest.raises(ValueError, match=r"100.0% of the \d+M parameters are replicated"):
        sharding.check_replication(boxed, data_only)
    sharding.check_replication(boxed, data_only, max_fraction=1.0)    # explicitly allowed
    small = abstract_params(build_model(config.base()), 64)
    sharding.check_replication(small, data_only)                       # < 100M: not refused


def test_microbatches_that_do_not_split_fail_before_compiling():
    mesh = jax.sharding.AbstractMesh((2, 2, 1), sharding.MESH_AXES)
    sharding.check_batch(16, mesh, microbatches=2)
    with pytest.raises(ValueError, match="microbatch 2 .* not divisible by data\\*fsdp = 4"):
        sharding.check_batch(8, mesh, microbatches=4)
    with pytest.raises(ValueError, match="not divisible into 3 microbatches"):
        sharding.check_batch(16, mesh, microbatches=3)


# --- (b) step: accumulation and the non-finite guard -----------------------------------------

def perturbed(state, seed=0, scale=0.02):
    """``state`` with every parameter moved off its initial value (EMA alike): adaLN-Zero
    gates and the zero-init output start at 0, so from the init most gradients are exactly 0
    and an equivalence test would compare mostly untouched weights."""
    rng = np.random.default_rng(seed)
    host = jax.tree.map(lambda p: np.asarray(p) + scale * rng.standard_normal(p.shape).astype(
        np.float32), state.params)
    # Two device copies: params and EMA are donated separately by the step.
    put = lambda: jax.tree.map(lambda h, p: jax.device_put(h, p.sharding), host, state.params)
    return state.replace(params=put(), ema_params=put())


def changed_fraction(before, after) -> float:
    """Fraction of parameter arrays whose values changed."""
    pairs = list(zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))
    return sum(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs) / len(pairs)


def _no_warmup(c):
    c.optim.warmup_steps = 0       # learning rate > 0 from the first step
    return c


def test_gradient_accumulation_equals_whole_batch_and_nonfinite_is_skipped(synthetic_batch):
    """4 microbatches == the whole batch over 4 steps with no warm-up, from perturbed weights
    and with a different condition per example: losses, gradient norms and every parameter
    (which all move, so the comparison has teeth: a conditioning pooled over the batch, or a
    microbatch split that mixes up examples, fails it)."""
    whole = trainer_lib.Trainer(_no_warmup(tiny()))
    acc = trainer_lib.Trainer(_no_warmup(tiny(microbatches=4)))
    batches = [synthetic_batch(whole.cfg, s) for s in range(4)]
    s1 = perturbed(whole.init_state())
    s4 = perturbed(acc.init_state())
    start = jax.device_get(s1.params)
    for b in batches:
        s1, m1 = whole.train_step(s1, b)
        s4, m4 = acc.train_step(s4, b)
        np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
    assert changed_fraction(start, s1.params) == 1.0
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)

    before = jax.device_get(s1)
    bad = dict(batches[0], image=np.full_like(batches[0]["image"], np.nan))
    state, m = whole.train_step(s1, bad)
    assert float(m["skipped"]) == 1.0 and int(m["nonfinite_streak"]) == 1
    assert int(state.step) == int(before.step) + 1
    for a, b in zip(jax.tree.leaves((before.params, before.ema_params, before.opt_state)),
                    jax.tree.leaves((state.params, state.ema_params, state.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state, m = whole.train_step(state, bad)
    assert int(m["nonfinite_streak"]) == 2
    state, m = whole.train_step(state, batches[1])
    assert float(m["skipped"]) == 0.0 and int(state.nonfinite_streak) == 0
    trainer_lib.check_streak(2, 3, step=7)
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite steps .* step 7"):
        trainer_lib.check_streak(3, 3, step=7)


def test_run_stops_after_k_consecutive_nonfinite_steps(tmp_path, data_dir):
    c = tiny(steps=6, log_every=1, max_nonfinite=2)
    c.data.dir = data_dir
    c.optim.lr = float("nan")       # every update non-finite from the first step
    with pytest.raises(FloatingPointError, match="2 consecutive non-finite steps"):
        train.run(c, tmp_path / "run")


# --- (c) SIGTERM and kill -9 ---------------------------------------------------------------

def _cli_args(workdir, data_dir, steps):
    return [sys.executable, "-m", "cxr_rf.train", f"--config={CONFIG}", f"--workdir={workdir}",
            f"--config.data.dir={data_dir}", f"--config.train.steps={steps}",
            "--config.train.ckpt_every=1", "--config.train.log_every=4"]


def _ckpt_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(p) for p in os.listdir(d) if p.isdigit()) if os.path.isdir(d) else []


def _start_and_wait(args, until_step, timeout=240):
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not any(s >= until_step for s in _ckpt_steps(args[4].split("=", 1)[1])):
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {until_step}:\n{proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for a checkpoint")
        time.sleep(0.02)
    return proc


@pytest.mark.slow
def test_sigterm_saves_and_exits_0_then_kill_9_resume_is_bitwise(tmp_path, data_dir):
    steps = 16
    full = tiny(steps=steps, ckpt_every=steps, log_every=4)   # checkpoints do not change results
    full.data.dir = data_dir
    m_full = train.run(full, tmp_path / "full")
    wd = tmp_path / "part"
    args = _cli_args(wd, data_dir, steps)

    proc = _start_and_wait(args, until_step=3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = _last_json(out)["final"]["preempted"]
    assert 3 <= stopped < steps and _ckpt_steps(wd)[-1] == stopped, (stopped, _ckpt_steps(wd))

    proc = _start_and_wait(args, until_step=stopped + 2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = _ckpt_steps(wd)[-1]
    assert stopped < killed_at < steps, killed_at

    m_resumed = _last_json(_run(args).stdout)["final"]
    assert m_resumed["loss"] == m_full["loss"]
    s_full = _restore(tmp_path / "full", full)
    s_part = _restore(wd, full)
    assert int(s_full.step) == int(s_part.step) == steps
    for a, b in zip(jax.tree.leaves(s_full), jax.tree.leaves(s_part)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _restore(workdir, cfg):
    trainer = trainer_lib.Trainer(cfg)
    abstract = checkpoint.abstract(trainer.init_state())
    return checkpoint.restore_params(os.path.join(workdir, "checkpoints"), abstract)[1]


# --- (d) restore onto other meshes; corrupted checkpoints ------------------------------------

@pytest.mark.slow
def test_save_on_8_devices_restore_on_4_and_1(tmp_path, data_dir):
    out = _last_json(_run([sys.executable, WORKER, "reshard", data_dir, str(tmp_path)]).stdout)
    assert out["ok"]


def _corrupt(workdir, step):
    """Garble every file of a checkpoint's state item (the run's weights)."""
    root = os.path.join(workdir, "checkpoints", str(step), "state")
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "wb") as fh:
                fh.write(b"not a checkpoint")


def test_corrupted_latest_falls_back_loudly_and_unreadable_stops(tmp_path, data_dir, caplog):
    c = tiny(steps=4)
    c.data.dir = data_dir
    wd = tmp_path / "run"
    m_full = train.run(c, wd)           # checkpoints at 2 and 4
    _corrupt(wd, 4)
    with caplog.at_level(logging.WARNING):
        m = train.run(c, wd)            # falls back to step 2, retrains 3 and 4
    warned = [r.getMessage() for r in caplog.records if "UNREADABLE" in r.getMessage()]
    assert warned and "STEP 4" in warned[0] and "falling back to step 2" in warned[0], warned
    assert m["loss"] == m_full["loss"]
    assert (wd / "checkpoints" / "4.unreadable").exists() and _ckpt_steps(wd)[-1] == 4

    for s in _ckpt_steps(wd):
        _corrupt(wd, s)
    with pytest.raises(checkpoint.RestoreError, match="no readable checkpoint"):
        train.run(c, wd)
    c.train.fresh_start_if_unreadable = True       # only when asked
    mngr = checkpoint.manager(wd / "checkpoints")
    start, _ = trainer_lib.restore_or_start(c, mngr, trainer_lib.Trainer(c).init_state(), None)
    assert start == 0 and not mngr.all_steps()     # the unreadable ones were moved aside
    mngr.close()


# --- (e) two processes x two devices ---------------------------------------------------------

@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_equal_one_process(tmp_path, data_dir):
    ref = tmp_path / "ref.npz"
    r = _run([sys.executable, WORKER, "reference", data_dir, str(ref)])
    ref_losses = _last_json(r.stdout)["losses"]
    wd = tmp_path / "mp"
    launch = [os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", CONFIG, str(wd),
              f"--config.data.dir={data_dir}", "--config.mesh.data=2", "--config.mesh.fsdp=2",
              "--config.train.log_every=1"]
    env = dict(ENV, DEVICES_PER_PROCESS="2", PYTHON=sys.executable)
    first = subprocess.run(launch + ["--config.train.stop_at=2"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _ckpt_steps(wd) == [2]
    second = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    final = _last_json(second.stdout)["final"]
    np.testing.assert_allclose(final["loss"], ref_losses[-1], rtol=1e-5)
    state = _restore(wd, tiny())
    want = np.load(ref)
    for i, a in enumerate(jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), want[f"arr_{i}"], rtol=1e-4, atol=1e-6)
