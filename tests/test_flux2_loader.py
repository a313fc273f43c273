"""The FLUX.2 autoencoder loader against PyTorch diffusers 0.42.1 ``AutoencoderKLFlux2``.

tests/fixtures/flux2_ae_tiny/ is a tiny random ``AutoencoderKLFlux2`` (widths 8/16, 2 levels,
2 res blocks, latent 4 -> 16 packed channels, 16 x 24 px) and ``reference.npz`` holds diffusers'
outputs; ``scripts/make_flux2_ae_fixture.py`` made it (its docstring lists the keys).
"""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from cxr_rf import errors
from cxr_rf.autoencoder import Autoencoder, depth_to_space, flux2, space_to_depth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "flux2_ae_tiny")
TOL = 1e-4


def _nhwc(a_BxCxHxW):
    return np.ascontiguousarray(a_BxCxHxW.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def ref():
    return {k: _nhwc(v) for k, v in np.load(os.path.join(FIXTURE, "reference.npz")).items()}


@pytest.fixture(scope="module")
def rgb():
    return flux2.load(FIXTURE, gray=False)


@pytest.fixture(scope="module")
def gray():
    return flux2.load(FIXTURE)


def _close(a, b, tol=TOL):
    a = np.asarray(a)
    assert a.shape == b.shape and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=0, atol=tol)
    return float(np.abs(a - b).max())


def test_config_and_statistics(rgb, gray):
    cfg, v = gray
    assert (cfg.in_channels, cfg.channels, cfg.channel_mult, cfg.num_res_blocks) == (1, 8, (1, 2), 2)
    assert (cfg.latent_channels, cfg.space_to_depth, cfg.packed_channels, cfg.factor) == (4, 2, 16, 4)
    assert cfg.use_quant_conv and cfg.mid_attention and rgb[0].in_channels == 3
    t = load_file(os.path.join(FIXTURE, "diffusion_pytorch_model.safetensors"))
    np.testing.assert_array_equal(np.asarray(v["latent_stats"]["shift"]), t["bn.running_mean"])
    np.testing.assert_allclose(np.asarray(v["latent_stats"]["scale"]),
                               np.sqrt(t["bn.running_var"] + 1e-4), rtol=1e-6)


def test_encode_parity(ref, rgb):
    cfg, v = rgb
    model = Autoencoder(cfg)
    mean, logvar = model.apply(v, ref["x_rgb"], method="encode")
    _close(mean, ref["packed"])                                  # Flux2 _patchify_latents order
    _close(depth_to_space(mean, 2), ref["mean"])
    _close(depth_to_space(logvar, 2), ref["logvar"])
    _close(model.apply(v, mean, method="normalize"), ref["normed"])   # the transformer's input


def test_decode_parity(ref, rgb):
    cfg, v = rgb
    model = Autoencoder(cfg)
    _close(model.apply(v, space_to_depth(jnp.asarray(ref["z"]), 2), method="decode"), ref["dec"])
    z = model.apply(v, jnp.asarray(ref["normed"]), method="denormalize")
    _close(model.apply(v, z, method="decode"), ref["dec_normed"])


def test_gray_first_conv_is_rgb_on_replicated_gray(ref, rgb, gray):
    (cfg_rgb, v_rgb), (cfg, v) = rgb, gray
    k_rgb = np.asarray(v_rgb["params"]["encoder"]["conv_in"]["kernel"])
    np.testing.assert_allclose(np.asarray(v["params"]["encoder"]["conv_in"]["kernel"]),
                               k_rgb.sum(axis=2, keepdims=True), rtol=0, atol=1e-7)
    # The whole encoder: gray model on g == RGB model on (g, g, g): in Flax, and against diffusers.
    mean, logvar = Autoencoder(cfg).apply(v, ref["x_gray"], method="encode")
    mean3, logvar3 = Autoencoder(cfg_rgb).apply(v_rgb, np.repeat(ref["x_gray"], 3, -1),
                                                method="encode")
    _close(mean, np.asarray(mean3), 1e-5)
    _close(logvar, np.asarray(logvar3), 1e-5)
    _close(depth_to_space(mean, 2), ref["mean_gray"])
    _close(depth_to_space(logvar, 2), ref["logvar_gray"])


def test_gray_last_conv_is_mean_of_rgb(ref, gray):
    cfg, v = gray
    out = Autoencoder(cfg).apply(v, space_to_depth(jnp.asarray(ref["z"]), 2), method="decode")
    _close(out, ref["dec"].mean(-1, keepdims=True))


def _copy(tmp_path, drop=None):
    d = tmp_path / "vae"
    shutil.copytree(FIXTURE, d)
    if drop:
        os.remove(d / drop)
    return d


def _one_line(tmp_path_or_dir, match, **kw):
    with pytest.raises(errors.UserError, match=match) as e:
        flux2.load(str(tmp_path_or_dir), **kw)
    assert "\n" not in str(e.value)


def test_missing_folder_and_files(tmp_path):
    _one_line(tmp_path / "nowhere", "is not a directory.*AutoencoderKLFlux2.*nothing is downloaded")
    for drop in flux2.FILES:
        _one_line(_copy(tmp_path / drop, drop), f"{drop} not found.*FLUX.2")


def _edit(d, **changes):
    c = json.loads((d / "config.json").read_text())
    c.update(changes)
    (d / "config.json").write_text(json.dumps(c))
    return d


@pytest.mark.parametrize("changes, match", [
    ({"_class_name": "AutoencoderKL"}, "_class_name 'AutoencoderKL' is not supported"),
    ({"patch_size": [4, 4]}, r"patch_size \[4, 4\] is not supported"),
    ({"act_fn": "gelu"}, "act_fn 'gelu'"),
    ({"latent_channels": 8},
     r"'encoder.conv_out.weight' has shape \(8, 16, 3, 3\), config.json implies \(16, 16, 3, 3\)"),
    ({"layers_per_block": 3}, "has no weight 'encoder.down_blocks.0.resnets.2.norm1.weight'"),
    ({"block_out_channels": [8, 12]}, "multiples of the first width"),
])
def test_bad_config_or_weights_is_one_line(tmp_path, changes, match):
    _one_line(_edit(_copy(tmp_path), **changes), match)


def test_unreadable_files_are_one_line(tmp_path):
    d = _copy(tmp_path)
    (d / "config.json").write_text("{not json")
    _one_line(d, "cannot read .*config.json")
    d = _copy(tmp_path / "b")
    (d / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    _one_line(d, "cannot read .*diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("gray", [False, True])
def test_table_covers_the_full_size_flux2(gray):
    """The default AutoencoderKLFlux2 (FLUX.2's: f8, 32 latent channels -> 128 packed at f16):
    every tensor mapped once, every shape as the table's conversion expects (no weights)."""
    import jax
    from flax import linen as nn
    from flax.traverse_util import flatten_dict
    full = json.load(open(os.path.join(FIXTURE, "full_size_shapes.json")))
    cfg = flux2.config_from_diffusers({**full["config"], "_class_name": "AutoencoderKLFlux2"},
                                      gray=gray)
    assert (cfg.widths, cfg.latent_channels, cfg.factor, cfg.packed_channels) == \
        ((128, 256, 512, 512), 32, 16, 128)
    x = jax.ShapeDtypeStruct((1, 32, 32, cfg.in_channels), jnp.float32)
    shapes = flatten_dict(nn.unbox(jax.eval_shape(Autoencoder(cfg).init, jax.random.key(0), x)
                                   ["params"]))
    table = flux2.weight_map(cfg, rgb_to_gray=gray)
    assert set(table) == set(shapes)
    assert sorted({n for n, _ in table.values()} ^ set(full["shapes"])) == \
        ["bn.num_batches_tracked", "bn.running_mean", "bn.running_var"]
    for fpath, (name, convert) in table.items():
        assert flux2._torch_shape(convert, shapes[fpath].shape, 3) == tuple(full["shapes"][name])
    n = sum(int(np.prod(s.shape)) for s in shapes.values())
    # gray: conv_in loses 2 x 128 x 9 weights, conv_out 2 x (128 x 9 + 1)
    assert n == full["num_parameters"] - (2304 + 2306 if gray else 0) == (84041505 if gray else 84046115)
