"""The Flax DINOv2 (Rad-DINO) against PyTorch ``transformers`` 4.57.6.

tests/fixtures/dinov2_tiny/ is a tiny random ``Dinov2Model`` (hidden 16, 2 layers, patch 14,
42 px = 3x3 patches) with a non-ImageNet ``BitImageProcessor``, and ``reference.npz`` holds
transformers' outputs; ``scripts/make_dinov2_fixture.py`` made it (its docstring lists the keys).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cxr_rf import errors
from cxr_rf.features import dinov2, get

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "dinov2_tiny")
TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(FIXTURE, "reference.npz")))


@pytest.fixture(scope="module")
def extractor():
    return get("raddino", FIXTURE, protocol="chexgenbench", batch_size=4)


def _images(ref, k):
    return ref[f"images_{k}_u16"].astype(np.float32) / 65535


def _nhwc(pv_BxCxHxW):
    return np.ascontiguousarray(pv_BxCxHxW.transpose(0, 2, 3, 1))


def _upsized(pv_BxSxSxC):
    """The fixture's 42 -> 70 px tiling (first 28 rows, then columns, appended)."""
    pv = np.concatenate([pv_BxSxSxC, pv_BxSxSxC[:, :28]], axis=1)
    return np.concatenate([pv, pv[:, :, :28]], axis=2)


@pytest.mark.parametrize("protocol", ["default", "chexgenbench"])
@pytest.mark.parametrize("k", ["a", "b"])
def test_preprocess_matches_processor(ref, extractor, protocol, k):
    pixels = dinov2.preprocess(_images(ref, k), extractor.processor, protocol)
    assert pixels.dtype == np.float32 and pixels.shape == (len(ref[f"images_{k}_u16"]), 42, 42, 3)
    np.testing.assert_allclose(pixels, _nhwc(ref[f"pv_{protocol}_{k}"]), rtol=0, atol=1e-6)


def test_processor_fields_read_from_file(extractor):
    p = extractor.processor
    assert extractor.resolution == 42 and p.size == {"shortest_edge": 48}
    assert p.image_mean == [0.5307, 0.4812, 0.4413] and p.image_std == [0.2583, 0.2921, 0.2337]


@pytest.mark.parametrize("tag", ["native", "up", "down"])
def test_forward_parity(ref, extractor, tag):
    pv = _nhwc(ref["pv_chexgenbench_a"])
    x = {"native": pv, "up": _upsized(pv), "down": pv[:, :28, :28]}[tag]
    pooled, hidden = extractor.embed_pixels(x)
    assert hidden.shape == ref[f"hidden_{tag}"].shape     # 1 + 9, 1 + 25, 1 + 4 tokens
    np.testing.assert_allclose(pooled, ref[f"pooler_{tag}"], rtol=0, atol=TOL)
    np.testing.assert_allclose(hidden, ref[f"hidden_{tag}"], rtol=0, atol=TOL)


def test_interpolation_is_torch_bicubic():
    # rows sum to 1; the 3 -> 5 weights differ from an antialiased / a = -0.5 cubic
    w = dinov2._cubic_weights_GxP(5, 3)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
    assert np.allclose(dinov2._cubic_weights_GxP(3, 3), np.eye(3))


def test_extractor_end_to_end(ref, extractor):
    assert (extractor.name, extractor.dim, extractor.protocol) == ("raddino", 16, "chexgenbench")
    feats = extractor(_images(ref, "a"))
    assert feats.dtype == np.float32 and feats.shape == (2, 16)
    np.testing.assert_allclose(feats, ref["pooler_native"], rtol=0, atol=TOL)
    # more images than one batch (4): padded and chunked, same rows
    many = np.concatenate([_images(ref, "a")] * 3)
    np.testing.assert_allclose(extractor(many), np.concatenate([feats] * 3), rtol=0, atol=1e-6)
    np.testing.assert_allclose(extractor.hidden_states(_images(ref, "a")), ref["hidden_native"],
                               rtol=0, atol=TOL)
    assert extractor(np.zeros((0, 42, 42), np.float32)).shape == (0, 16)
    default = get("raddino", FIXTURE, batch_size=3)
    assert default.protocol == "default" and default.batch_size == 3
    pooled, _ = default.embed_pixels(_nhwc(ref["pv_default_b"]))
    np.testing.assert_allclose(default(_images(ref, "b")), pooled, rtol=0, atol=1e-6)
    with pytest.raises(errors.UserError, match="must be finite values in"):
        extractor(np.full((1, 42, 42), 2.0, np.float32))


_SHARDED = r"""
import json, sys
import jax, numpy as np
from cxr_rf.features import get
x = np.load(sys.argv[1])
one = get("raddino", sys.argv[2], protocol="chexgenbench", batch_size=8, devices=jax.devices()[:1])
eight = get("raddino", sys.argv[2], protocol="chexgenbench", batch_size=5)
assert eight.batch_size == 8 and eight.mesh.size == 8, (eight.batch_size, eight.mesh.size)
a, b = one(x), eight(x)
print(json.dumps({"devices": len(jax.devices()), "max_diff": float(np.abs(a - b).max())}))
"""


def test_sharded_over_8_devices_equals_1(ref, tmp_path):
    x = np.concatenate([_images(ref, "a")] * 5)        # 10 images: two batches of 8
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path / "x.npy"), FIXTURE],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["max_diff"] <= 1e-5, out


def _copy(tmp_path, drop=None):
    d = tmp_path / "model"
    shutil.copytree(FIXTURE, d)
    if drop:
        os.remove(d / drop)
    return d


@pytest.mark.parametrize("drop", ["config.json", "model.safetensors", "preprocessor_config.json"])
def test_missing_file_is_one_line(tmp_path, drop):
    with pytest.raises(errors.UserError) as e:
        get("raddino", str(_copy(tmp_path, drop)))
    msg = str(e.value)
    assert "\n" not in msg and drop in msg and "Hugging Face" in msg and "rad-dino" in msg


def test_missing_folder_is_one_line(tmp_path):
    with pytest.raises(errors.UserError, match="is not a directory.*Hugging Face") as e:
        get("raddino", str(tmp_path / "nowhere"))
    assert "\n" not in str(e.value)


def _edit_config(d, **changes):
    c = json.loads((d / "config.json").read_text())
    c.update(changes)
    (d / "config.json").write_text(json.dumps(c))


@pytest.mark.parametrize("changes, match", [
    ({"model_type": "vit"}, "model_type 'vit' is not supported"),
    ({"model_type": "dinov2_with_registers", "num_register_tokens": 4}, "not supported"),
    ({"num_register_tokens": 4}, "register tokens is not supported"),
    ({"num_hidden_layers": 3}, "has no weight 'encoder.layer.2.norm1.weight'"),
    ({"hidden_size": 32},
     r"'embeddings.cls_token' has shape \(1, 1, 16\), config.json implies \(1, 1, 32\)"),
    ({"image_size": 56},
     r"'embeddings.position_embeddings' has shape \(1, 10, 16\), config.json implies \(1, 17, 16\)"),
])
def test_bad_config_or_weights_is_one_line(tmp_path, changes, match):
    d = _copy(tmp_path)
    _edit_config(d, **changes)
    with pytest.raises(errors.UserError, match=match) as e:
        get("raddino", str(d))
    assert "\n" not in str(e.value)


def test_bad_protocol_and_processor(tmp_path):
    with pytest.raises(errors.UserError, match="unknown protocol"):
        dinov2.load(FIXTURE, protocol="imagenet")
    d = _copy(tmp_path)
    (d / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(errors.UserError, match="cannot read .*preprocessor_config.json") as e:
        get("raddino", str(d))
    assert "\n" not in str(e.value)
