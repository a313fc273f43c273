"""The process heap for XLA:CPU compute: keep freed memory instead of returning it to the OS.

Why: XLA:CPU allocates each execution's temporaries and non-donated outputs with malloc, from
its own worker threads. glibc serves a block that large from a thread's arena by mmap and
gives it back by munmap when it is freed, so every execution starts on fresh pages and the
kernel zero-fills each 4 KiB page on first touch. On the shared bench shape that was 226k page
faults (~0.9 GB) per train step, about a fifth of the step: elementwise fusions ran at a third
of their speed because they were paying for the kernel's page zeroing. With one arena, mmap
off and no trimming, the heap keeps what a step freed and the next step reuses it:
0 faults per step, the same numerics (BUILD_NOTES "Train-step and sampling benchmarks").

When: only where XLA computes on the host CPU, only in the commands that run a long loop of
compiled steps (``cli.run(..., host_heap=True)``: train, bench), and before JAX starts its CPU
client (a thread picks its arena at its first malloc, so the setting must precede the threads).
The one arena costs XLA's multi-threaded compiler 10-20% (a `sample` of 8 images: 7.0-7.4 s
against 6.2-6.3 s; the test suite, all compiles: ~15%), so commands that mostly compile keep
glibc's defaults. An accelerator host keeps them too: there the device allocator holds the big
buffers, and one arena would serialise the malloc of the host threads that feed the device.

In those commands ``CXR_RF_HOST_HEAP=keep`` keeps freed memory on any host and ``default``
never; unset means: keep when JAX will compute on the CPU (``JAX_PLATFORMS`` starting with
``cpu``, or unset on a host without TPU or GPU device files).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import platform
import sys
from typing import Mapping

from cxr_rf import errors

ENV = "CXR_RF_HOST_HEAP"
CHOICES = ("keep", "default")

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# mallopt takes an int, which glibc converts to its size_t threshold: -1 is SIZE_MAX, i.e. never
# trim. The largest positive int (2 GiB) is not enough: the scanned bench model frees 2.3 GB
# of temporaries per step, and a 2 GiB threshold gave it back (and re-faulted it) every step.
_NEVER_TRIM = -1

# Device files of the accelerators JAX picks before the CPU when JAX_PLATFORMS is unset.
_ACCELERATOR_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")

_STATE = "default"   # what configure() did in this process: "default" or "kept"


def wants_keep(environ: Mapping[str, str] | None = None,
               device_globs: tuple[str, ...] = _ACCELERATOR_DEVICES) -> bool:
    """Whether this process should keep freed memory (see the module docstring). Decided from
    the environment and device files only: JAX must not be initialised to decide."""
    env = os.environ if environ is None else environ
    choice = env.get(ENV, "").strip().lower()
    if choice:
        if choice not in CHOICES:
            raise errors.UserError(f"{ENV}={env[ENV]!r} is not allowed; use one of "
                                   f"{', '.join(CHOICES)} (or leave it unset)")
        return choice == "keep"
    platforms = [p.strip().lower() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    return not any(glob.glob(pattern) for pattern in device_globs)


def _glibc():
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def keep_freed_memory() -> bool:
    """One malloc arena, no mmap'd blocks, never trim the heap top. Returns
    whether glibc accepted all three (False off glibc). Call before JAX starts."""
    global _STATE
    libc = _glibc()
    if libc is None:
        return False
    ok = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
    if ok:
        _STATE = "kept"
    return ok


def configure(environ: Mapping[str, str] | None = None) -> str:
    """Apply the heap setting this process wants (``wants_keep``); returns ``state()``."""
    if wants_keep(environ) and keep_freed_memory():
        logging.info("host heap: one arena, freed memory kept for reuse (XLA:CPU compute; "
                     "%s=default turns this off)", ENV)
    return state()


def state() -> str:
    """"kept" when ``keep_freed_memory`` took effect in this process, else "default"."""
    return _STATE
