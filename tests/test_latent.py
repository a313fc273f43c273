"""Latent mode: cached latents (python -m cxr_rf.data.encode) equal on-the-fly encoding, the
encoding resumes into the dataset an uninterrupted one writes, a tiny latent MMDiT trains on
them end to end and samples decoded pixel images, and mismatches are one-line errors."""
import os
import subprocess
import sys

import numpy as np
import pytest

from cxr_rf import errors, sample
from cxr_rf import train as train_cli
from cxr_rf import trainer as trainer_lib
from cxr_rf.autoencoder import Autoencoder
from cxr_rf.autoencoder import train as ae_train
from cxr_rf.data import encode, pipeline, schema

import tiny  # noqa: E402  (tests/tiny.py, on sys.path via conftest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny autoencoder of tests/tiny.py, 2 steps, no GAN.
TINY_AE = {**tiny.TINY_AE, "ae_loss.gan_start": 100, "train.steps": 2}


@pytest.fixture(scope="module")
def ae_run(phantom_data, tmp_path_factory):
    sys.path.insert(0, ROOT)
    try:
        from experiments import ae_smoke
    finally:
        sys.path.remove(ROOT)
    c = ae_smoke.get_config()
    for key, value in TINY_AE.items():
        section, name = key.split(".")
        c[section][name] = value
    c.data.dir = phantom_data(16)
    wd = tmp_path_factory.mktemp("ae")
    ae_train.run(c, wd)
    return str(wd)


@pytest.fixture(scope="module")
def latents(ae_run, phantom_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lat") / "latents"
    encode.encode(phantom_data(16), out, ae_run, batch_size=5)   # 5: a padded last batch
    return str(out)


def _records(path, split):
    src = pipeline.open_source(path, split)
    return [src[i] for i in range(len(src))]


def test_cached_latents_equal_on_the_fly_encoding(ae_run, latents, phantom_data):
    """Every split: the stored float16 latent is the f32 normalised posterior mean of the
    same image rounded to float16: |stored - ref| <= 2^-11 |ref| (half an ulp) + 1e-5 (f32
    differences between batch shapes). The other fields are unchanged."""
    ae_cfg, variables = ae_train.load_autoencoder(ae_run)
    model = Autoencoder(ae_cfg)
    info = schema.latent_info(latents)
    assert info["shape"] == [8, 8, 4] and info["dtype"] == "float16" and info["factor"] == 2
    assert info["autoencoder"]["fingerprint"] == encode.fingerprint(variables)
    assert info["autoencoder"]["run"] == os.path.abspath(ae_run)
    decode = pipeline.DecodeExample(16)
    for split in ("train", "validation", "test"):
        pix, lat = _records(phantom_data(16), split), _records(latents, split)
        assert len(pix) == len(lat) > 0
        x = np.stack([decode.map(r)["image"] for r in pix])
        mean, _ = model.apply(variables, x, method=Autoencoder.encode)
        ref = np.asarray(model.apply(variables, mean, method=Autoencoder.normalize))
        got = np.stack([np.asarray(r["latent"]) for r in lat])
        assert got.dtype == np.float16 and got.shape == ref.shape
        err = np.abs(got.astype(np.float32) - ref)
        assert (err <= 2.0 ** -11 * np.abs(ref) + 1e-5).all(), err.max()
        for a, b in zip(pix, lat):
            fa, fb = schema.from_example(a, decode=False), schema.from_example(b, decode=False)
            assert fa["image_png"] == fb["image_png"]
            np.testing.assert_array_equal(fa["findings"], fb["findings"])
            assert {k: fa[k] for k in schema.TEXT_FIELDS} == {k: fb[k] for k in schema.TEXT_FIELDS}
            assert fa["age"] == fb["age"]


def _files(path):
    return {p: open(os.path.join(path, p), "rb").read() for p in sorted(os.listdir(path))}


def test_interrupted_encoding_resumes_to_the_same_dataset(ae_run, phantom_data, tmp_path,
                                                          monkeypatch):
    src = phantom_data(16)
    encode.encode(src, tmp_path / "full", ae_run, batch_size=8, dtype="float32")
    done = []

    def stop_after_two(name):
        done.append(name)
        if len(done) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(encode, "_shard_done", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        encode.encode(src, tmp_path / "part", ae_run, batch_size=8, dtype="float32")
    assert not (tmp_path / "part" / "dataset_info.json").exists()
    monkeypatch.setattr(encode, "_shard_done", lambda name: done.append(name))
    encode.encode(src, tmp_path / "part", ae_run, batch_size=8, dtype="float32")
    assert len(done) == 6                      # 2 + the 4 unfinished of 6 shards
    full, part = _files(tmp_path / "full"), _files(tmp_path / "part")
    assert full.keys() == part.keys()
    for name in full:
        if name.endswith(".json") and name != "stats.json":
            continue       # TFDS metadata names its own directory
        assert full[name] == part[name], name
    with pytest.raises(errors.UserError, match="not empty"):       # a finished dataset
        encode.encode(src, tmp_path / "part", ae_run, batch_size=8, dtype="float32")


def _latent_cfg(tiny_config, latents, **data):
    c = tiny_config(16, steps=2, ckpt_every=2)
    c.data.update(dir=latents, latents=True, **data)
    c.model.update(patch=2, in_channels=4)
    c.sample.update(steps=2, grid=2)
    return c


def test_tiny_latent_run_end_to_end(tiny_config, latents, ae_run, tmp_path):
    c = _latent_cfg(tiny_config, latents)
    c.train.sample_every = 2                   # the training grid decodes too
    wd = tmp_path / "run"
    train_cli.run(c, wd)
    assert (wd / "samples" / "step_0000002.png").exists()
    cfg, model, params, step = sample.load(wd)
    assert step == 2 and cfg.data.latent_factor == 2
    assert cfg.data.autoencoder == os.path.abspath(ae_run) and cfg.data.autoencoder_step == 2
    assert cfg.model.in_channels == 4 and model.cfg.in_channels == 4
    sampler = sample.Sampler(cfg, model, batch_size=2)
    conds = list(sample.DEMO_CONDITIONS[:3])
    images = sampler.generate(params, conds, [0, 1, 2], steps=2)
    assert images.shape == (3, 16, 16) and images.dtype == np.float32
    assert np.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    assert images.std() > 0
    # The loader's batches are the latents.
    batch = next(iter(trainer_lib.make_loader(cfg, latents, "train", train=False)))
    assert batch["image"].shape == (8, 8, 8, 4) and batch["image"].dtype == np.float32


def test_mismatches_are_one_line_errors(tiny_config, latents, phantom_data, tmp_path):
    cases = []
    c = _latent_cfg(tiny_config, latents)
    c.model.in_channels = 3
    cases.append((lambda: trainer_lib.ensure_data(c, tmp_path), "4-channel latents, but "
                  "model.in_channels=3"))
    c2 = _latent_cfg(tiny_config, phantom_data(16))
    cases.append((lambda: trainer_lib.ensure_data(c2, tmp_path), "is a pixel dataset"))
    c3 = _latent_cfg(tiny_config, latents, latent_factor=2)
    c3.train.update(steps=4, stages=((0, 8), (2, 16)))
    cases.append((lambda: trainer_lib.config_lib.stages(c3), "trains at one resolution"))
    c4 = _latent_cfg(tiny_config, latents, latent_factor=2,
                     autoencoder=str(tmp_path / "missing"))
    cases.append((lambda: sample.Sampler(c4), "does not exist"))
    c6 = _latent_cfg(tiny_config, latents, latent_factor=2, autoencoder_fingerprint="0" * 64)
    cases.append((lambda: sample.Sampler(c6), "is not the one this run's latents were encoded"))
    c5 = _latent_cfg(tiny_config, "", autoencoder="")
    cases.append((lambda: trainer_lib.ensure_data(c5, tmp_path), "needs data.autoencoder"))
    cases.append((lambda: encode.encode(phantom_data(16), tmp_path / "x", tmp_path / "nope"),
                  "does not exist"))
    for fn, needle in cases:
        with pytest.raises(errors.UserError) as e:
            fn()
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cli_bad_autoencoder_is_one_line(phantom_data, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "cxr_rf.data.encode", "--autoencoder",
                        str(tmp_path / "nope"), "--input", phantom_data(16), "--output",
                        str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "does not exist" in lines[0]
