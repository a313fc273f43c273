"""The host heap setting for XLA:CPU compute (cxr_rf/hostheap.py): when it applies, that every
command applies it before JAX starts, and that it removes the per-execution page faults it
exists for (counted by the kernel, not timed)."""
import os
import subprocess
import sys
import textwrap

import pytest

from cxr_rf import errors, hostheap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("env, devices, want", [
    ({}, [], True),                                      # no accelerator: JAX computes on CPU
    ({}, ["accel0"], False),                             # a TPU VM
    ({}, ["nvidia0"], False),                            # a GPU host
    ({"JAX_PLATFORMS": "cpu"}, ["nvidia0"], True),       # told to use the CPU
    ({"JAX_PLATFORMS": " CPU ,tpu"}, [], True),
    ({"JAX_PLATFORMS": "tpu,cpu"}, [], False),           # the first platform decides
    ({"JAX_PLATFORMS": "cuda"}, [], False),
    ({"CXR_RF_HOST_HEAP": "keep", "JAX_PLATFORMS": "tpu"}, ["accel0"], True),
    ({"CXR_RF_HOST_HEAP": "Default", "JAX_PLATFORMS": "cpu"}, [], False),
])
def test_wants_keep(tmp_path, env, devices, want):
    for name in devices:
        (tmp_path / name).touch()
    globs = (str(tmp_path / "accel*"), str(tmp_path / "nvidia[0-9]*"))
    assert hostheap.wants_keep(env, globs) is want


def test_bad_choice_is_one_line():
    with pytest.raises(errors.UserError, match=r"^CXR_RF_HOST_HEAP='always' is not allowed; "
                                               r"use one of keep, default"):
        hostheap.wants_keep({"CXR_RF_HOST_HEAP": "always"})


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", hostheap.ENV)}
    full.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


_FAULTS = """
    import resource
    from cxr_rf import hostheap
    if {keep}:
        assert hostheap.keep_freed_memory()
    import jax, jax.numpy as jnp
    k = jax.random.PRNGKey(0)
    x = jax.random.normal(k, (4096, 1024))
    w = jax.random.normal(k, (1024, 1024)) / 32
    # A small training loop: its temporaries (16 MB each) are what XLA:CPU mallocs per call.
    grad = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(jnp.tanh(x @ w) @ w) ** 2)))
    for _ in range(3):
        grad(w, x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        w = w - 1e-6 * grad(w, x).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10, float(w.sum()))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc settings")
def test_kept_heap_removes_page_faults():
    """With glibc's defaults every step of a small jitted training loop maps fresh pages for
    its temporaries and faults on each 4 KiB of them (~19k faults per step here); with the
    heap kept they are reused (0 to 2k: the heap still grows while it settles)."""
    faults, values = {}, set()
    for keep in (False, True):
        r = _python(_FAULTS.format(keep=keep))
        assert r.returncode == 0, r.stderr[-2000:]
        n, total = map(float, r.stdout.split())
        faults[keep] = n
        values.add(total)
    assert len(values) == 1, values                  # the same numbers
    assert faults[False] > 10_000, faults            # the problem is still what it was
    assert faults[True] < 0.3 * faults[False], faults


_COMMAND = """
    from cxr_rf import cli, hostheap
    def main(argv):
        import jax
        jax.devices()
        print("heap", hostheap.state())
    cli.run(main, host_heap={host_heap})
"""


@pytest.mark.parametrize("host_heap, choice, out", [
    (True, None, "heap kept"), (True, "default", "heap default"), (True, "keep", "heap kept"),
    (False, None, "heap default"), (False, "keep", "heap default")])
def test_commands_configure_before_jax(host_heap, choice, out):
    """A step-loop command (train, bench: host_heap=True) keeps freed memory on the CPU; the
    others, which mostly compile, keep glibc's defaults whatever the environment says."""
    env = {} if choice is None else {"CXR_RF_HOST_HEAP": choice}
    r = _python(_COMMAND.format(host_heap=host_heap), **env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == out


def test_command_refuses_bad_choice():
    r = _python(_COMMAND.format(host_heap=True), CXR_RF_HOST_HEAP="sometimes")
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: CXR_RF_HOST_HEAP='sometimes' is not allowed; use one "
                                "of keep, default (or leave it unset)")
    assert r.stdout == ""
