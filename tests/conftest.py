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
