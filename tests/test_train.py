"""End to end: phantom -> ArrayRecord -> Grain -> jitted step -> Orbax -> sample, through the CLIs,
plus the equivalences that make checkpoints trustworthy (resumed == uninterrupted)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cxr_rf import train
from cxr_rf import trainer as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_same_ema(run_a, run_b, step):
    """Both runs' latest checkpoints are at ``step`` and hold bitwise equal EMA params."""
    from cxr_rf import sample
    (_, _, ema_a, step_a), (_, _, ema_b, step_b) = sample.load(run_a), sample.load(run_b)
    assert step_a == step_b == step
    for a, b in zip(jax.tree.leaves(ema_a), jax.tree.leaves(ema_b), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture
def data_dir(phantom_data):
    return phantom_data(32)


def test_resumed_run_equals_uninterrupted(tmp_path, data_dir, tiny_config):
    full = tiny_config(32, steps=6)
    full.data.dir = data_dir
    m_full = train.run(full, tmp_path / "full")
    # Interrupted after step 3 (checkpoint at 2 and 3), then the same command again.
    train.run(full, tmp_path / "part", stop_at=3)
    m_resumed = train.run(full, tmp_path / "part")
    assert m_resumed["loss"] == m_full["loss"]
    assert_same_ema(tmp_path / "full", tmp_path / "part", 6)


def test_training_reduces_validation_loss(tmp_path, data_dir, tiny_config):
    c = tiny_config(32, steps=60)
    c.data.dir = data_dir
    c.train.update(eval_every=60, log_every=20, ckpt_every=60)
    c.optim.update(lr=2e-3, ema_decay=0.0)
    first = trainer_lib.Trainer(c)
    before = first.evaluate(first.init_state().ema_params, data_dir).mean()
    after = train.run(c, tmp_path / "run")["val_loss"]
    assert after < 0.8 * before, (before, after)


def _cli(*args, check=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    if check and r.returncode:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def test_cli_train_resume_sample(tmp_path):
    """The README's main job in miniature, through the real command lines."""
    wd = tmp_path / "run"
    exp = os.path.join(ROOT, "experiments", "smoke.py")
    flags = ["--config.data.num=32", "--config.data.resolution=32", "--config.data.shards=2",
             "--config.model.width=32", "--config.model.depth=2", "--config.model.heads=2",
             "--config.train.batch_size=8", "--config.train.log_every=2",
             "--config.train.eval_every=0", "--config.train.ckpt_every=2",
             "--config.train.sample_every=3", "--config.sample.steps=2", "--config.sample.grid=2"]
    _cli("cxr_rf.train", f"--config={exp}", f"--workdir={wd}", "--config.train.steps=3", *flags)
    assert (wd / "data" / "dataset_info.json").exists()
    assert (wd / "samples" / "step_0000003.png").exists()
    assert list((wd / "tensorboard").iterdir())
    kept = {p.name: p.stat().st_mtime_ns for p in (wd / "checkpoints").iterdir()}
    r = _cli("cxr_rf.train", f"--config={exp}", f"--workdir={wd}", "--config.train.steps=4", *flags)
    assert json.loads(r.stdout.strip().splitlines()[-1])["final"]["loss"] > 0
    # The rerun resumes (it does not retrain from scratch over the old checkpoints).
    assert "resuming from step 3" in r.stderr, r.stderr[-2000:]
    steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 4 and 3 in steps
    assert all((wd / "checkpoints" / n).stat().st_mtime_ns == t for n, t in kept.items()
               if n.isdigit() and (wd / "checkpoints" / n).exists())

    out = tmp_path / "samples"
    args = ["cxr_rf.sample", f"--workdir={wd}", "--num=2", "--findings=Cardiomegaly,Pleural Effusion",
            "--sex=F", "--age=70", "--view=PA", "--steps=3", "--cfg=4.0", "--seed=0"]
    _cli(*args, f"--out={out}", "--format=png16")
    rows = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [0, 1] and rows[0]["checkpoint_step"] == 4
    assert rows[0]["conditions"]["findings"]["Cardiomegaly"] == "positive"
    assert (out / "grid.png").exists()
    # Same arguments -> identical pixels, here as synthetic DICOMs; the evaluation reads both.
    _cli(*args, f"--out={tmp_path / 'again'}", "--format=dicom")
    import pydicom
    from cxr_rf import export
    from cxr_rf.evaluation import sets
    for i in range(2):
        a = sets.FolderSet(out).images([i])[0]
        b = sets.FolderSet(tmp_path / "again").images([i])[0]
        np.testing.assert_array_equal(a, b)
        ds = pydicom.dcmread(tmp_path / "again" / f"000{i}.dcm")
        assert ds.ConversionType == "SYN" and "SYNTHETIC" in ds.ImageComments
        assert ds.PatientSex == "F" and ds.PatientAge == "070Y" and ds.ViewPosition == "PA"
        meta = export.read_png_metadata(out / f"000{i}.png")
        assert meta["conditions"]["findings"]["Pleural Effusion"] == "positive"
    assert a.std() > 0


@pytest.mark.parametrize("args, needle", [
    (["--workdir=/nonexistent/run", "--out=/tmp/x"], "does not exist"),
    (["--workdir={empty}", "--out=/tmp/x"], "no config.json"),
    (["--workdir={empty}", "--out=/tmp/x", "--findings=Cardiomegally"], "unknown finding 'Cardiomegally'"),
    (["--workdir={empty}", "--out=/tmp/x", "--sex=X"], "unknown sex 'X'"),
])
def test_sample_cli_errors_are_one_line(tmp_path, args, needle):
    args = [a.replace("{empty}", str(tmp_path)) for a in args]
    r = _cli("cxr_rf.sample", *args, check=False)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()
    assert needle in last[-1] and "Traceback" not in r.stderr, r.stderr


def test_progressive_resolution_resumes_across_the_stage_boundary(tmp_path, data_dir,
                                                                  tiny_config):
    """16² then 32²: each stage trains at its resolution with its token-count shift, and a run
    stopped exactly at the boundary resumes into the next stage as if never stopped."""
    c = tiny_config(32, steps=5)
    c.data.dir = data_dir
    c.train.update(stages=((0, 16), (3, 32)))
    c.flow.base_tokens = 16             # 16² / patch 4 = 16 tokens -> shift 1; 32² -> 64 -> 2
    m_full = train.run(c, tmp_path / "full")
    m_part = train.run(c, tmp_path / "part", stop_at=3)
    assert (m_part["resolution"], m_part["shift"]) == (16, 1.0)      # logged at step 2
    m_resumed = train.run(c, tmp_path / "part")
    assert (m_resumed["resolution"], m_resumed["shift"]) == (32, 2.0)
    assert m_resumed["loss"] == m_full["loss"]
    assert_same_ema(tmp_path / "full", tmp_path / "part", 5)
