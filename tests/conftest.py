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


def _snapshot(root) -> dict:
    """{relative path: (size, mtime_ns)} of every file below ``root``."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.relpath(os.path.join(dirpath, f), root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, phantom_data):
    """The workdir (a ``pathlib.Path``) of the tiny run at 16 px trained for 2 steps (one
    checkpoint, step 2) on ``phantom_data(16)``: trained once per session and shared by every
    test that samples, edits or evaluates a run. Read-only: a test that writes into its
    workdir (``evaluate``'s default output, ``edit``'s causal.json) copies it first
    (``shutil.copytree(tiny_run, tmp_path / "run")``); a write into the shared one fails the
    session at teardown."""
    from cxr_rf import train
    cfg = tiny.load(16, steps=2, ckpt_every=2)
    cfg.data.dir = phantom_data(16)
    d = tmp_path_factory.mktemp("tiny_run")
    train.run(cfg, d)
    before = _snapshot(d)
    yield d
    assert _snapshot(d) == before, "a test wrote into the shared tiny_run: copy it first"


@pytest.fixture
def synthetic_batch():
    """``synthetic_batch(cfg, seed=0)``: random images, varied valid conditions."""
    return tiny.synthetic_batch
