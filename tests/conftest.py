"""Suite-wide setup: one persistent XLA compilation cache for this pytest session and every
process it starts (CLI and multi-device subprocesses inherit the environment).

Many tests compile the same tiny train step several times: a run, its resumed twin, the CLI
twice. In-process jit caches do not survive a new Trainer or a new process; this cache does,
so each distinct program compiles once per session. Set before jax is imported.
"""
import atexit
import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="cxr_rf_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The suite runs on the CPU, also where libtpu is installed (CI installs the tpu extra for the
# AOT planner's tests): with JAX_PLATFORMS unset, every JAX process would load libtpu, take
# /tmp/libtpu_lockfile for its lifetime (so that the next one fails with "Internal error when
# accessing libtpu multi-process lockfile") and print its TPU-initialisation errors on stderr.
# Tests that want JAX to pick the backend pop it for their subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Implicit rank promotion hides shape bugs ([B] + [B, 1] silently becomes [B, B]); the whole
# suite, and every process it starts, runs with it as an error.
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")

import pytest  # noqa: E402

import tiny  # noqa: E402  (tests/tiny.py: the tiny run config)


@pytest.fixture
def tiny_config():
    """``tiny_config(resolution=16, **train_overrides)``: a fresh tiny run config."""
    return tiny.load


@pytest.fixture(scope="session")
def phantom_data(tmp_path_factory):
    """``phantom_data(resolution)``: the tiny run's converted phantom dataset at that
    resolution, converted once per session and shared (read-only) by every test."""
    made = {}

    def get(resolution: int = 16) -> str:
        if resolution not in made:
            from cxr_rf.data import convert
            d = tmp_path_factory.mktemp(f"phantom{resolution}")
            c = tiny.load(resolution)
            convert.convert_phantom(d, num=c.data.num, resolution=resolution, seed=0,
                                    shards=c.data.shards)
            made[resolution] = str(d)
        return made[resolution]
    return get


@pytest.fixture
def synthetic_batch():
    """``synthetic_batch(cfg, seed=0)``: random images, varied valid conditions."""
    return tiny.synthetic_batch
