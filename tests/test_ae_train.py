"""The latent autoencoder trained with the MMDiT's machinery (cxr_rf.autoencoder.step/train):
resumed == uninterrupted bitwise, the GAN switching on at gan_start, the loss falling, the CLI
run through ``python -m cxr_rf.train`` read back by ``load_autoencoder``, bad run directories."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cxr_rf import checkpoint, errors
from cxr_rf import train as train_cli
from cxr_rf.autoencoder import Autoencoder
from cxr_rf.autoencoder import step as ae_step
from cxr_rf.autoencoder import train as ae_train

import tiny  # noqa: E402  (tests/tiny.py, on sys.path via conftest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(ROOT, "experiments", "ae_smoke.py")

# The tiny autoencoder run of tests/tiny.py, its GAN on from step 2.
TINY = {**tiny.TINY_AE, "ae_loss.gan_start": 2, "ae_optim.lr": 1e-3, "ae_optim.disc_lr": 1e-3}


def tiny_ae(data_dir=None, **overrides):
    """experiments/ae_smoke.py with the TINY overrides (and ``overrides``, dotted keys)."""
    from experiments import ae_smoke
    c = ae_smoke.get_config()
    for key, value in {**TINY, **overrides}.items():
        section, name = key.split(".")
        c[section][name] = value
    if data_dir:
        c.data.dir = data_dir
    return c


@pytest.fixture(scope="module", autouse=True)
def _experiments_importable():
    sys.path.insert(0, ROOT)
    yield
    sys.path.remove(ROOT)


@pytest.fixture
def data16(phantom_data):
    return phantom_data(16)


def _final_state(cfg, *workdirs):
    """(step, AEState) of the latest checkpoint of each run directory."""
    abstract = checkpoint.abstract(ae_step.AETrainer(cfg).init_state())
    out = [checkpoint.restore_params(w / "checkpoints", abstract) for w in workdirs]
    return out if len(out) > 1 else out[0]


def test_resumed_run_equals_uninterrupted(tmp_path, data16):
    """6 steps (GAN from step 3) == 3 steps, stop, resume to 6: every array of the state
    (generator, latent stats, discriminator, both Adam states, EMA) and the data iterator."""
    c = tiny_ae(data16, **{"train.steps": 6})
    m_full = ae_train.run(c, tmp_path / "full")
    part = train_cli.run(c, tmp_path / "part", stop_at=3)     # through the train.py dispatch
    assert part["d_loss"] > 0                                  # the GAN phase had begun
    m_resumed = ae_train.run(c, tmp_path / "part")
    assert m_resumed["l1"] == m_full["l1"] and m_resumed["d_loss"] == m_full["d_loss"]
    (s_a, a), (s_b, b) = _final_state(c, tmp_path / "full", tmp_path / "part")
    assert s_a == s_b == 6 and int(a.step) == 6
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(path))
    # The statistics were computed at the last step (not the 0/1 of init).
    assert not np.allclose(np.asarray(a.latent_stats["scale"]), 1.0)
    data = [(run / "checkpoints" / "6" / "data" / "process_0-of-1.json").read_text()
            for run in (tmp_path / "full", tmp_path / "part")]
    assert data[0] == data[1]


@pytest.fixture(scope="module")
def trajectory(phantom_data):
    """30 steps on phantom data with the GAN from step 25: per-step metrics, and the
    discriminator's parameters after each step."""
    c = tiny_ae(phantom_data(16), **{"ae_loss.gan_start": 24, "train.steps": 30})
    trainer = ae_step.AETrainer(c)
    it = iter(ae_train.trainer_lib.make_loader(c, c.data.dir, "train", train=True))
    state, metrics, discs = trainer.init_state(), [], []
    disc0 = jax.device_get(state.disc_params)
    for step in range(1, 31):
        state, m = trainer.train_step(state, next(it), step)
        metrics.append(jax.device_get(m))
        discs.append(jax.device_get(state.disc_params))
    return metrics, disc0, discs


def test_gan_starts_at_gan_start(trajectory):
    metrics, disc0, discs = trajectory
    same = lambda a, b: all(np.array_equal(x, y) for x, y in  # noqa: E731
                            zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    for i, m in enumerate(metrics[:24]):       # steps 1..24: reconstruction only
        assert m["d_loss"] == 0 and m["g_loss"] == 0 and m["adaptive_weight"] == 0, (i + 1, m)
        assert same(discs[i], disc0)
    for i, m in enumerate(metrics[24:], start=24):   # steps 25..30: both nets
        assert m["d_loss"] > 0 and m["g_loss"] != 0 and m["adaptive_weight"] > 0, (i + 1, m)
        assert m["gan_factor"] == 1
    assert not same(discs[24], disc0)


def test_loss_falls_on_phantoms(trajectory):
    metrics = trajectory[0]
    first = np.mean([m["l1"] for m in metrics[:3]])
    late = np.mean([m["l1"] for m in metrics[20:24]])
    assert late < 0.6 * first, (first, late)
    assert metrics[23]["psnr"] > metrics[0]["psnr"] + 3


def _flag(key, value):
    if isinstance(value, tuple):
        value = "(" + ",".join(map(str, value)) + ")"
    return f"--config.{key}={value}"


def test_cli_run_writes_checkpoints_grid_config_and_loads(tmp_path):
    wd = tmp_path / "ae"
    flags = [_flag(k, v) for k, v in {**TINY, "train.steps": 3, "train.eval_every": 3,
                                      "train.sample_every": 3}.items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "cxr_rf.train", f"--config={EXPERIMENT}",
                        f"--workdir={wd}", *flags], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads(r.stdout.strip().splitlines()[-1])["final"]
    assert final["val_psnr"] > 0 and 0 < final["val_ssim"] <= 1
    saved = json.loads((wd / "config.json").read_text())
    assert saved["task"] == "autoencoder" and saved["autoencoder"]["channels"] == 8
    assert (wd / "samples" / "step_0000003.png").exists()
    assert list((wd / "tensorboard").iterdir())
    assert 3 in {int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()}

    cfg, variables = ae_train.load_autoencoder(wd)
    assert (cfg.channels, cfg.latent_channels, cfg.factor) == (8, 4, 2)
    x = np.linspace(-1, 1, 2 * 16 * 16, dtype=np.float32).reshape(2, 16, 16, 1)
    model = Autoencoder(cfg)
    mean, _ = model.apply(variables, x, method=Autoencoder.encode)
    assert mean.shape == (2, 8, 8, 4)
    z = model.apply(variables, mean, method=Autoencoder.normalize)
    back = model.apply(variables, model.apply(variables, z, method=Autoencoder.denormalize),
                       method=Autoencoder.decode)
    assert back.shape == x.shape and np.isfinite(np.asarray(back)).all()
    assert not np.allclose(np.asarray(variables["latent_stats"]["scale"]), 1.0)


def test_load_autoencoder_bad_paths_are_one_line(tmp_path, tiny_config):
    cases = {tmp_path / "missing": "does not exist", tmp_path: "no config.json"}
    mmdit = tmp_path / "mmdit"
    (mmdit / "checkpoints" / "2").mkdir(parents=True)
    (mmdit / "config.json").write_text(tiny_config().to_json())
    cases[mmdit] = "is a mmdit run, not an autoencoder run"
    empty_ae = tmp_path / "ae_untrained"
    empty_ae.mkdir()
    (empty_ae / "config.json").write_text(tiny_ae().to_json())
    cases[empty_ae] = "no autoencoder checkpoints"
    for path, needle in cases.items():
        with pytest.raises(errors.UserError) as e:
            ae_train.load_autoencoder(path)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


FLUX2_FIXTURE = os.path.join(ROOT, "tests", "fixtures", "flux2_ae_tiny")
DINO_FIXTURE = os.path.join(ROOT, "tests", "fixtures", "dinov2_tiny")


@pytest.mark.slow
def test_init_from_flux2_with_lora(tmp_path, data16):
    """init_from: FLUX.2's architecture and weights (the base stays frozen under LoRA);
    config.json records the loaded architecture; load_autoencoder merges the LoRA."""
    from cxr_rf.autoencoder import flux2
    c = tiny_ae(data16, **{"train.steps": 2, "autoencoder.init_from": FLUX2_FIXTURE,
                           "autoencoder.lora_rank": 2, "ae_loss.gan_start": 100})
    _, pretrained = flux2.load(FLUX2_FIXTURE)
    ae_train.run(c, tmp_path / "ft")
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())["autoencoder"]
    assert (saved["space_to_depth"], saved["use_quant_conv"],
            saved["latent_channels"]) == (2, True, 4)
    _, state = _final_state(c, tmp_path / "ft")
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(pretrained["params"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(np.abs(np.asarray(f["b"])).max() > 0 for f in state.lora.factors.values())
    cfg, variables = ae_train.load_autoencoder(tmp_path / "ft")
    assert cfg.factor == 4 and cfg.packed_channels == 16
    k = lambda p: np.asarray(p["decoder"]["conv_out"]["kernel"])  # noqa: E731
    assert not np.array_equal(k(variables["params"]), k(pretrained["params"]))


def test_perceptual_raddino_feature_fn_is_differentiable():
    from cxr_rf.autoencoder import losses
    c = tiny_ae(**{"ae_loss.perceptual": 0.1, "ae_loss.perceptual_features": DINO_FIXTURE})
    fn, params = ae_step.perceptual_features(c)
    rng = np.random.default_rng(0)
    x, y = (rng.uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32) for _ in range(2))
    d, g = jax.value_and_grad(lambda a: losses.perceptual(lambda im: fn(params, im), a, y))(x)
    assert float(d) > 0 and np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0
    off = tiny_ae(**{"ae_loss.perceptual": 0.0, "ae_loss.perceptual_features": DINO_FIXTURE})
    assert ae_step.perceptual_features(off) == (None, None)
