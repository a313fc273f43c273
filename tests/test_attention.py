"""Attention implementations (cxr_rf/model/attention.py): each one that runs on a CPU equals a
float64 numpy reference, values and gradients, with and without a key mask, in f32 and bf16;
masked keys get exactly zero weight; names are checked; the model agrees across them; and
splash compiles for a TPU topology into a Mosaic kernel (libtpu, no TPU).

splash runs here in Pallas interpret mode; cudnn needs a GPU and is checked only where one is
lent (here: its CPU fallback to xla, and the auto choice per platform).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_rf import conditioning, errors
from cxr_rf.model import MMDiT, ModelConfig, abstract_params, attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_IMPLS = ("xla", "matmul", "blocked", "splash")
B, T, S, N, K = 2, 12, 19, 2, 8


def _inputs(dtype, masked: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k, v, g = (rng.standard_normal(shape).astype(np.float32)
                  for shape in [(B, T, N, K), (B, S, N, K), (B, S, N, K), (B, T, N, K)])
    # Round to the input dtype first, so the reference sees exactly what the kernel sees.
    q, k, v, g = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q, k, v, g))
    keep = None
    if masked:
        keep = np.ones((B, S), bool)
        keep[0, 13:] = False          # a padded tail (report padding)
        keep[1, :] = False
        keep[1, 5] = True             # a row where exactly one key is kept
    return q, k, v, g, keep


def _reference(q, k, v, g, keep):
    """float64 attention and its vjp with cotangent g: (out, dq, dk, dv)."""
    q, k, v, g = (x.astype(np.float64) for x in (q, k, v, g))
    scale = 1 / np.sqrt(q.shape[-1])
    s = np.einsum("btnk,bsnk->bnts", q, k) * scale
    if keep is not None:
        s = np.where(keep[:, None, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnk->btnk", p, v)
    dp = np.einsum("btnk,bsnk->bnts", g, v)
    ds = p * (dp - np.sum(dp * p, -1, keepdims=True)) * scale
    dq = np.einsum("bnts,bsnk->btnk", ds, k)
    dk = np.einsum("bnts,btnk->bsnk", ds, q)
    dv = np.einsum("bnts,btnk->bsnk", p, g)
    return out, dq, dk, dv


@functools.lru_cache(maxsize=None)
def _vjp_fn(impl):
    """jit of (out, dq, dk, dv) of ``impl`` with cotangent g: one compile per implementation,
    dtype and mask presence, shared by the tests."""
    def run(q, k, v, g, keep):
        out, vjp = jax.vjp(lambda q, k, v: attention.attention(q, k, v, keep,
                                                               implementation=impl), q, k, v)
        return (out, *vjp(g))
    return jax.jit(run)


def _run(impl, dtype, q, k, v, g, keep):
    """(out, dq, dk, dv) of ``impl`` in float64 numpy."""
    keep = None if keep is None else jnp.asarray(keep)
    got = _vjp_fn(impl)(*(jnp.asarray(x, dtype) for x in (q, k, v, g)), keep)
    assert all(x.dtype == dtype for x in got)
    return tuple(np.asarray(x, np.float64) for x in got)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles smaller than T and S (with padding, and key tiles that are wholly masked in the
    one-key row), so the blocked path's online softmax and tiled backward really run."""
    monkeypatch.setattr(attention, "BLOCK_Q", 5)
    monkeypatch.setattr(attention, "BLOCK_K", 4)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 5e-6), (jnp.bfloat16, 1.5e-2)],
                         ids=["f32", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_equals_float64_reference_values_and_grads(impl, masked, dtype, tol, small_tiles):
    q, k, v, g, keep = _inputs(dtype, masked)
    got = _run(impl, dtype, q, k, v, g, keep)
    for name, a, want in zip(("out", "dq", "dk", "dv"), got, _reference(q, k, v, g, keep)):
        err = np.max(np.abs(a - want)) / max(1.0, np.max(np.abs(want)))
        assert err < tol, (impl, name, err)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_masked_keys_get_exactly_zero_weight(impl, small_tiles):
    """Whatever the masked keys and values hold, the output is bit-identical and their
    gradients are exactly zero."""
    q, k, v, g, keep = _inputs(jnp.float32, masked=True)
    k2, v2 = k.copy(), v.copy()
    k2[~keep], v2[~keep] = 1e3, -7.0
    out, _, dk, dv = _run(impl, jnp.float32, q, k, v, g, keep)
    out2 = _run(impl, jnp.float32, q, k2, v2, g, keep)[0]
    np.testing.assert_array_equal(out, out2)
    assert not dk[~keep].any() and not dv[~keep].any()


def test_bad_names_are_one_line_errors():
    allowed = "auto, xla, matmul, cudnn, splash, blocked"
    with pytest.raises(errors.UserError, match=rf"^model config: unknown attention 'flash'; "
                                               rf"allowed: {allowed}$"):
        ModelConfig(attention="flash")
    x = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match=rf"^unknown attention 'cuda'; allowed: {allowed}$"):
        attention.attention(x, x, x, implementation="cuda")


def test_auto_and_cudnn_resolve_per_platform(caplog):
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert attention.resolve("auto", bf16, 64, "gpu") == "cudnn"
    assert attention.resolve("auto", f32, 64, "gpu") == "xla"           # cuDNN flash: bf16/f16
    assert attention.resolve("auto", bf16, 256, "gpu") == "xla"         # head dim > 128
    assert attention.resolve("auto", bf16, 64, "tpu") == "splash"
    assert attention.resolve("auto", f32, 64, "cpu", kv_len=320) == "blocked"     # measured
    assert attention.resolve("auto", f32, 64, "cpu", kv_len=83) == "matmul"      # smoke run
    assert attention.resolve("blocked", f32, 64, "tpu") == "blocked"
    # An explicit cudnn where cuDNN cannot run falls back to xla, with ONE warning per reason.
    attention._warned.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert attention.resolve("cudnn", f32, 64, "gpu") == "xla"
        assert attention.resolve("cudnn", bf16, 64, "gpu") == "cudnn"
    warnings = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert warnings == ["attention 'cudnn' falls back to 'xla': inputs are float32; cuDNN "
                        "flash attention takes bf16/f16"]
    # On this CPU it runs (as xla) rather than failing.
    q, k, v, g, keep = _inputs(jnp.bfloat16, masked=True)
    np.testing.assert_array_equal(_run("cudnn", bf16, q, k, v, g, keep)[0],
                                  _run("xla", bf16, q, k, v, g, keep)[0])


def test_splash_pads_to_its_blocks():
    assert [attention._splash_block(n) for n in (128, 256, 384, 512, 640, 1152, 2048)] == \
        [128, 256, 384, 512, 128, 384, 512]
    assert attention._tiles(320, 128) == (112, 3) and attention._tiles(320, 512) == (320, 1)
    assert attention._tiles(320, 64) == (64, 5) and attention._tiles(1043, 64) == (64, 17)


def test_model_output_is_the_same_with_every_cpu_implementation(small_tiles):
    """The tiny model (report bytes, so the key mask matters) with noisy weights: every CPU
    implementation gives the matmul output."""
    base = ModelConfig(patch=4, width=32, depth=2, heads=2, report_len=4)
    # Random weights of the right shapes (no init compile): nothing is zero, so t, the
    # context and every attention path reach the output.
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype),
                          nn.meta.unbox(abstract_params(MMDiT(base), 16)))
    x = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 1)), jnp.float32)
    t = jnp.asarray([0.3, 0.7], jnp.float32)
    tok = jnp.asarray(np.stack([conditioning.Conditions.parse(
        "Cardiomegaly", sex="F", age=70, view="PA", report=r).tokens(4) for r in ("ab", "")]),
        jnp.int32)
    outs = {impl: np.asarray(jax.jit(MMDiT(dataclasses.replace(base, attention=impl)).apply)(
        {"params": params}, x, t, tok)) for impl in CPU_IMPLS}
    assert np.abs(outs["matmul"]).max() > 0.1
    for impl, out in outs.items():
        np.testing.assert_allclose(out, outs["matmul"], atol=2e-5, rtol=1e-5, err_msg=impl)


HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install -e '.[tpu]')")
def test_splash_compiles_for_tpu_into_a_mosaic_kernel(tmp_path):
    """The train step of a small model with attention=splash, compiled for v5e:2x2 by the AOT
    planner: the optimised HLO calls the Pallas (Mosaic) kernel, and memory is reported."""
    out, hlo = tmp_path / "plan.json", tmp_path / "step.hlo"
    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)   # the CLI picks cpu for its own (default) backend
    env.pop("XLA_FLAGS", None)
    r = subprocess.run(
        [sys.executable, "-m", "cxr_rf.aot", "--config", "experiments/smoke.py", "--topology",
         "v5e:2x2", "--json", str(out), "--hlo", str(hlo), "--config.model.attention=splash",
         "--config.model.depth=2", "--config.model.width=64", "--config.model.heads=2",
         "--config.train.batch_size=8"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    text = hlo.read_text()
    assert 'custom_call_target="tpu_custom_call"' in text
    p = json.loads(out.read_text())
    assert p["memory_total_bytes_per_device"] > 0 and p["memory"]["temporaries"] >= 0
