"""Benchmarks, each ending with one JSON line for scripts.

``train``: images/s (total and per device), analytic model FLOPs, MFU and peak memory of the
real (sharded) train step on the configured mesh.

    python -m cxr_rf.bench train --config experiments/bench.py [--steps 20] \
        [--config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2] \
        [--peer_python ~/peer-venv/bin/python [--peer_dir ../shared/peer] [--rounds 2]]

``sample``: images/s of the Sampler's own compiled program (28-step Euler, CFG 4: conditional
and unconditional rows in one batched model call per step) at the config's shape with random
parameters, ``--batch`` images per call (default: the config's train.batch_size); counts JAX
traces and XLA compiles during the timed calls (``compiles_after_warmup`` must be 0).

    python -m cxr_rf.bench sample --config experiments/bench.py [--steps 2] [--sample_steps 28] \
        [--cfg 4] [--peer_python ~/peer-venv/bin/python]

With ``--peer_python`` (train, sample) the diffusers peer script (``--peer_dir``, default
``../shared/peer`` beside the repository: diffusers_step.py, diffusers_sample.py) runs in that
Python at the same shape (image = data.resolution, patch, width, depth, heads, text_len = the
context tokens, batch): ``--rounds`` times ours then the peer, alternating so that a change in
the machine's load hits both sides; each side is the median of its rounds, and the JSON line
holds both, their ratio (ours / peer) and the load average.

``data``: images/s of the real Grain training pipeline (``pipeline.make_loader`` over
ArrayRecord: decode, CFG dropout, batching) per ``--workers`` count, per core, and the
headroom of a host's cores over what one accelerator host consumes (``CONSUMERS``: the AOT
projection of a config on a topology; ``--step_s`` etc. override it). Reads ``--data_dir``
(converting ``--num`` phantoms at ``--resolution`` into it first when it is empty or missing;
without it, into a temporary directory).

    python -m cxr_rf.bench data --resolution 512 --workers 0,1,2 [--cores 1] [--data_dir DIR] \
        [--consumer cxr_xl@v5p] [--host_cores 208]

``attention``: milliseconds of one joint-attention call, forward and forward+backward (the
gradient of <out, g> w.r.t. q, k, v), per ``model.attention`` implementation, at the config's
shape (B = train.batch_size, T = S = image + context tokens, N = heads, K = head dim; a few
report keys masked per row) or ``--shape B,T,S,N,K``: the minimum over ``--rounds`` of the
median of ``--steps`` calls, implementations interleaved so load changes hit all alike.

    python -m cxr_rf.bench attention --config experiments/bench.py [--impls matmul,xla,blocked]

``checkpoint``: what the checkpoint fingerprints cost. The whole TrainState (params, EMA,
Adam moments, moved off its init so writes are realistic) is saved and restored through plain
Orbax and through ``cxr_rf.checkpoint`` (fingerprints at save, verification at restore) in a
temporary directory on local disk; seconds are medians of ``--steps`` repeats (saves are
synchronous, so they include the write). ``fingerprint_first_s`` includes compiling the
reduction, paid once per process and state layout.

    python -m cxr_rf.bench checkpoint --config experiments/bench.py [--steps 5]

MFU is against the device's peak: a table of published dense peaks for known GPUs/TPUs, a
matmul measured in the same process on CPU (forced CPU devices share the host's cores, so the
host's measured peak is split between them).
"""
from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from cxr_rf import cli, conditioning, errors, hostheap
from cxr_rf import step as step_lib
from cxr_rf.hardware import PEAK_FLOPS
from cxr_rf.model import flops_per_image, ModelConfig

FLAGS = flags.FLAGS


def matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
    """Achievable matmul FLOP/s on the default device: a jitted n×n @ n×n, best of repeats."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_peak(dtype) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    dev = jax.devices()[0]
    bf16 = dtype == jnp.bfloat16
    for kind, p16, p32 in PEAK_FLOPS:
        if kind == dev.device_kind:     # exact: a near-miss name is another chip
            return (p16 if bf16 else p32), f"table ({kind})"
    measured = matmul_peak(dtype=dtype)
    if dev.platform == "cpu":
        return measured / jax.local_device_count(), "measured matmul (host, split over devices)"
    return measured, "measured matmul"


def peak_memory(trainer) -> tuple[int, str]:
    """(peak bytes on one device, source): the allocator's peak where the runtime reports it
    (GPU/TPU), else XLA's compiled memory analysis of the step (arguments + temporaries)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device allocator peak"
    from cxr_rf import sharding
    with sharding.use(trainer.mesh):
        m = trainer.jitted_step.lower(*trainer.abstract_inputs()).compile().memory_analysis()
    if m is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes \
        - m.alias_size_in_bytes
    return int(total), "XLA memory analysis of the step"


def load_average() -> float:
    """The 1-minute load average (reported beside every timing on a shared machine)."""
    return round(os.getloadavg()[0], 2)


class CompileCounter:
    """Counts, while active, the JAX traces and XLA compiles of this process (jax.monitoring
    events). A persistent-cache hit counts as a compile too: a program had to be looked up,
    which a warm jit cache never does."""
    EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "traces",
              "/jax/core/compile/backend_compile_duration": "compiles"}

    def __init__(self):
        self.traces = self.compiles = 0

    def _listener(self, event: str, duration_secs: float, **_) -> None:
        name = self.EVENTS.get(event)
        if name:
            setattr(self, name, getattr(self, name) + 1)

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)


# ----------------------------------------------------------------------------- the peer

PEER_SCRIPTS = {"train": "diffusers_step.py", "sample": "diffusers_sample.py"}
_PEER_RATE = re.compile(r"images_per_s=([0-9.eE+-]+)")


def default_peer_dir() -> str:
    """``../shared/peer`` beside the repository (where the shared benchmark scripts live)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.normpath(os.path.join(root, "..", "shared", "peer"))


def peer_script(bench: str, peer_dir: str | None = None) -> str:
    """Path of the peer script of ``bench``; a one-line UserError when it is missing."""
    path = os.path.join(peer_dir or default_peer_dir(), PEER_SCRIPTS[bench])
    if not os.path.isfile(path):
        raise errors.UserError(f"peer script {path} not found: --peer_dir must be the folder "
                               f"holding {' and '.join(PEER_SCRIPTS.values())}")
    return path


def peer_shape(cfg) -> list[str]:
    """The peer scripts' shape arguments for a config: the same pixels, patch, width, depth,
    heads, context length and batch (the peer embeds text_len vectors of width text_dim where
    we embed as many tokens at the model width)."""
    if cfg.data.get("latents", False) or int(cfg.model.in_channels) != 1:
        raise errors.UserError("the diffusers peer samples 1-channel pixel images: compare a "
                               "pixel-space config (data.latents=False, model.in_channels=1)")
    m = cfg.model
    shape = {"image": cfg.data.resolution, "patch": m.patch, "width": m.width,
             "depth": m.depth, "heads": m.heads,
             "text_len": conditioning.num_tokens(cfg.data.report_len), "text_dim": m.width}
    return [f"--{k}={int(v)}" for k, v in shape.items()]


def run_peer(python: str, script: str, args: list[str]) -> float:
    """Run a peer script in its own Python and return the images/s it prints."""
    try:
        p = subprocess.run([python, script, *args], capture_output=True, text=True)
    except OSError as e:
        raise errors.UserError(f"--peer_python {python} cannot be run: {e.strerror}") from None
    m = _PEER_RATE.search(p.stdout)
    if p.returncode or not m:
        lines = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()
        raise errors.RunError(f"peer {os.path.basename(script)} failed (exit {p.returncode}): "
                              f"{lines[-1]}")
    return float(m.group(1))


def alternate(ours, peer, rounds: int) -> dict:
    """``rounds`` × (ours(), then peer() when given), so that load drifts on a shared machine
    hit both sides; medians per side (images/s) and their ratio, and the best round of each
    side and their ratio (other jobs only ever slow a round down, and torch's intra-op pool
    suffers more from them than XLA's: on a shared box the best rounds are the fairer pair)."""
    a, b = [], []
    for _ in range(rounds):
        a.append(ours())
        if peer is not None:
            b.append(peer())
    out = {"images_per_s": float(statistics.median(a)), "rounds_images_per_s": a,
           "best_images_per_s": float(max(a))}
    if b:
        out.update(peer_images_per_s=float(statistics.median(b)), peer_rounds_images_per_s=b,
                   ratio=float(statistics.median(a) / statistics.median(b)),
                   peer_best_images_per_s=float(max(b)), best_ratio=float(max(a) / max(b)))
    return out


def _peer_runner(bench: str, cfg, batch: int, extra: list[str], python: str | None,
                 peer_dir: str | None):
    if python is None:
        return None
    script = peer_script(bench, peer_dir)
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise errors.UserError(f"--peer_python {python} is not an executable file")
    args = [*peer_shape(cfg), f"--batch={batch}", *extra]
    return lambda: run_peer(python, script, args)


# ----------------------------------------------------------------------------- benchmarks

def bench_train(cfg, steps: int, warmup: int, rounds: int = 1,
                peer_python: str | None = None, peer_dir: str | None = None) -> dict:
    """Time the jitted train step on synthetic batches of the configured shape; with
    ``peer_python``, alternate with the diffusers train step at the same shape."""
    from cxr_rf.trainer import Trainer
    b = cfg.train.batch_size
    peer = _peer_runner("train", cfg, b, [f"--steps={steps}"], peer_python, peer_dir)
    trainer = Trainer(cfg)
    state = trainer.init_state()
    shapes = step_lib.dummy_batch(cfg)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, shapes["image"].shape).astype(np.float32),
             "tokens": np.broadcast_to(conditioning.null_tokens(cfg.data.report_len),
                                       shapes["tokens"].shape)}
    for _ in range(warmup):
        state, m = trainer.train_step(state, batch)
    jax.block_until_ready(state)

    def ours() -> float:
        # Each round starts with one untimed step, as the peer script's does (one per process):
        # the first steps after the other side's round run slower (caches, the kernel still
        # releasing the other process's memory), for either side.
        nonlocal state, m
        state, m = jax.block_until_ready(trainer.train_step(state, batch))
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = trainer.train_step(state, batch)
        jax.block_until_ready(state)
        return b * steps / (time.perf_counter() - t0)

    load = load_average()
    r = alternate(ours, peer, rounds)
    dt = b / r["images_per_s"]
    # Training = forward + backward ≈ 3× the forward matmul FLOPs (no remat recompute counted).
    fpi = 3 * flops_per_image(ModelConfig.from_config(cfg), step_lib.grid_size(cfg))
    dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
    n = trainer.mesh.size
    peak_dev, peak_src = device_peak(dtype)
    mem, mem_src = peak_memory(trainer)
    return {**r, "images_per_s_per_device": b / dt / n, "step_s": dt,
            "flops_per_image": fpi, "achieved_flops": fpi * b / dt, "peak_flops": peak_dev * n,
            "peak_source": peak_src, "mfu": fpi * b / dt / (peak_dev * n), "devices": n,
            "mesh": dict(trainer.mesh.shape), "platform": jax.devices()[0].platform,
            "device_kind": jax.devices()[0].device_kind, "peak_memory_bytes": mem,
            "memory_source": mem_src, "loss": float(np.asarray(m["loss"].addressable_data(0))),
            "load_avg": [load, load_average()], "host_heap": hostheap.state()}


def sample_program(cfg, batch: int, steps: int, scale: float):
    """(call, sampler, program) at the config's shape with random parameters: ``call()``
    generates ``batch`` images by Euler with CFG ``scale`` through ``Sampler.generate``;
    ``program`` is the jitted function it runs (for its cache size)."""
    from flax import linen as nn
    from cxr_rf import sample as sample_lib
    from cxr_rf.model import init_params
    sampler = sample_lib.Sampler(cfg, batch_size=batch)
    boxed = jax.jit(init_params, static_argnums=(0, 2))(sampler.model, jax.random.PRNGKey(0),
                                                        sampler.side)
    params = jax.device_put(nn.unbox(boxed), sampler.param_shardings)
    conds = [sample_lib.DEMO_CONDITIONS[i % len(sample_lib.DEMO_CONDITIONS)]
             for i in range(sampler.batch_size)]
    seeds = list(range(sampler.batch_size))
    guidance = sample_lib.Guidance(scale=scale)
    shape = (sampler.side, sampler.side, cfg.model.in_channels)
    program = sample_lib._program(sampler.model, sampler.fs, steps, "euler", shape)

    def call():
        return sampler.generate(params, conds, seeds, steps=steps, guidance=guidance,
                                method="euler")

    return call, sampler, program


def bench_sample(cfg, calls: int, warmup: int, rounds: int = 1, batch: int | None = None,
                 steps: int = 28, scale: float = 4.0, peer_python: str | None = None,
                 peer_dir: str | None = None) -> dict:
    """images/s of Euler sampling with CFG through the Sampler; compiles after warm-up."""
    from cxr_rf import sample as sample_lib
    n = jax.local_device_count()
    b = -(-(batch or cfg.train.batch_size) // n) * n       # the Sampler's rounding
    peer = _peer_runner("sample", cfg, b, [f"--steps={steps}", f"--reps={calls}"],
                        peer_python, peer_dir)              # checked before compiling
    call, sampler, program = sample_program(cfg, b, steps, scale)
    tokens = np.stack([conditioning.null_tokens(cfg.data.report_len)] * b)
    branches = sample_lib.Guidance(scale=scale).branches(tokens)[0].shape[0]
    with CompileCounter() as warm:
        for _ in range(max(warmup, 1)):        # the first call compiles
            call()
    cache_before = program._cache_size()

    def ours() -> float:
        jax.block_until_ready(call())    # untimed, as the peer script's first call
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        return b * calls / (time.perf_counter() - t0)

    load = load_average()
    with CompileCounter() as timed:
        r = alternate(ours, peer, rounds)
    return {**r, "batch": b, "ode_steps": steps, "cfg": scale, "method": "euler",
            "branches": int(branches), "rows_per_model_call": int(branches) * b,
            "compiles_warmup": warm.compiles, "compiles_after_warmup": timed.compiles,
            "traces_after_warmup": timed.traces,
            "program_cache_size": [cache_before, program._cache_size()],
            "platform": jax.devices()[0].platform, "devices": sampler.mesh.size,
            "load_avg": [load, load_average()], "host_heap": hostheap.state()}


def _timed(fn) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def bench_checkpoint(cfg, repeats: int) -> dict:
    """Save/restore seconds of the run's TrainState with and without fingerprints."""
    import tempfile
    import orbax.checkpoint as ocp
    from cxr_rf import checkpoint
    from cxr_rf.trainer import Trainer
    state = Trainer(cfg).init_state()
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    state = jax.block_until_ready(jax.tree.unflatten(tree, [
        x + 0.01 * jax.random.normal(k, x.shape, x.dtype)
        if jnp.issubdtype(x.dtype, jnp.floating) else x for x, k in zip(leaves, keys)]))
    abstract = checkpoint.abstract(state)
    row = {"arrays": len(leaves), "state_mb": round(sum(x.nbytes for x in leaves) / 2**20, 1),
           "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
           "fingerprint_first_s": _timed(lambda: checkpoint.fingerprints(state))}
    times = {k: [] for k in ("fingerprint_s", "save_plain_s", "save_fingerprinted_s",
                             "restore_plain_s", "restore_verified_s")}
    plain = lambda a: ocp.args.Composite(state=a)
    with tempfile.TemporaryDirectory() as d:
        mngr = checkpoint.manager(d, keep=2 * repeats + 2, async_save=False)
        for i in range(repeats):
            a, b = 2 * i + 1, 2 * i + 2      # a: plain Orbax, b: with fingerprints
            times["fingerprint_s"].append(_timed(lambda: checkpoint.fingerprints(state)))
            times["save_plain_s"].append(_timed(
                lambda: mngr.save(a, args=plain(ocp.args.StandardSave(state)))))
            times["save_fingerprinted_s"].append(
                _timed(lambda: checkpoint.save(mngr, b, state, None, force=True)))
            mngr.wait_until_finished()
            times["restore_plain_s"].append(_timed(
                lambda: mngr.restore(a, args=plain(ocp.args.StandardRestore(abstract)))["state"]))
            times["restore_verified_s"].append(
                _timed(lambda: checkpoint.restore(mngr, abstract, None, b)[1]))
        mngr.close()
    row.update({k: round(float(np.median(v)), 3) for k, v in times.items()})
    row["fingerprint_first_s"] = round(row["fingerprint_first_s"], 3)
    return row


# What one accelerator host consumes, from the AOT plans (BUILD_NOTES, "AOT plans: what fits
# where", 512² stage at MFU 0.4): step seconds, global batch, chips of the slice and chips per
# host. A measured step replaces a projection with --step_s.
CONSUMERS = {
    "cxr_b@v5p": dict(step_s=0.571, global_batch=1024, chips=8, chips_per_host=4),
    "cxr_xl@v5p": dict(step_s=0.281, global_batch=1024, chips=64, chips_per_host=4),
    "cxr_3b@v5p": dict(step_s=0.323, global_batch=1024, chips=128, chips_per_host=4),
    "cxr_8b@v5p": dict(step_s=0.197, global_batch=1024, chips=512, chips_per_host=4),
}
CONSUMER_SOURCE = "BUILD_NOTES AOT plans (512² stage, step s at MFU 0.4)"
# A v5p TPU VM: 4 chips, 208 vCPUs, 448 GB (Cloud TPU v5p docs, "VM, host and slice
# properties"; only half of the vCPUs when the input pipeline is NUMA-bound to one socket).
HOST_CORES_SOURCE = "Cloud TPU v5p docs: 208 vCPUs per 4-chip v5p host"


def host_demand(consumer: str, **overrides) -> dict:
    """Images/s one accelerator host must be fed for ``consumer`` (a ``CONSUMERS`` key);
    ``overrides`` (step_s, global_batch, chips, chips_per_host) that are not None win."""
    if consumer not in CONSUMERS:
        raise errors.UserError(f"unknown --consumer {consumer!r}; allowed: {', '.join(CONSUMERS)}")
    c = {**CONSUMERS[consumer], **{k: v for k, v in overrides.items() if v is not None}}
    if c["chips"] % c["chips_per_host"]:
        raise errors.UserError(f"--chips {c['chips']} is not a multiple of --chips_per_host "
                               f"{c['chips_per_host']}")
    hosts = c["chips"] // c["chips_per_host"]
    return {**c, "hosts": hosts, "images_per_s_per_host": c["global_batch"] / hosts / c["step_s"]}


def phantom_dataset(data_dir: str | None, num: int, resolution: int, scratch: str) -> str:
    """A converted dataset to read: ``data_dir`` when it holds one, else ``num`` phantoms at
    ``resolution`` converted into it (or into ``scratch`` without it)."""
    from cxr_rf.data import convert
    path = data_dir or os.path.join(scratch, "phantom")
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        return path
    if os.path.isdir(path) and os.listdir(path):
        raise errors.UserError(f"--data_dir {path} is neither a converted dataset nor empty")
    print(f"converting {num} phantoms at {resolution}² into {path}", file=sys.stderr)
    convert.convert_phantom(path, num=num, resolution=resolution, shards=1)
    return path


def bench_data(cfg, data_dir: str, resolution: int, workers: list[int], batches: int,
               warmup: int, batch: int, demand: dict, host_cores: int) -> dict:
    """Images/s of the training pipeline per worker count, per core, and a host's headroom.

    Cores are the CPUs this process may run on (``--cores`` pins it, and so its workers):
    the loader decodes in ``prefetch`` threads in every process, so even 0 workers can use
    more than one core; per-core rates are measured pinned to one."""
    from cxr_rf.data import pipeline
    cores = len(os.sched_getaffinity(0))
    rows = []
    for n in workers:
        it = iter(pipeline.make_loader(
            data_dir, "train", global_batch=batch, seed=cfg.seed, resolution=resolution,
            report_len=cfg.data.report_len, cond_dropout=dict(cfg.data.cond_dropout),
            worker_count=n, prefetch=cfg.data.prefetch, shuffle=True, process_index=0,
            process_count=1))
        # Drain what was read ahead while starting (prefetch batches in this process; in each
        # worker, its read-ahead and its output buffer), so the timed batches come at the
        # rate they are made, not out of full buffers.
        for _ in range(warmup + (2 * n + 1) * max(cfg.data.prefetch, 1)):
            next(it)
        load = load_average()
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        rate = batch * batches / (time.perf_counter() - t0)
        del it
        per_core = rate / cores
        rows.append({"workers": n, "images_per_s": rate, "cores": cores,
                     "images_per_s_per_core": per_core,
                     "host_images_per_s": per_core * host_cores,
                     "headroom": per_core * host_cores / demand["images_per_s_per_host"],
                     "cores_needed_per_host": demand["images_per_s_per_host"] / per_core,
                     "load_avg": [load, load_average()]})
    return {"resolution": resolution, "batch": batch, "data_dir": data_dir, "rows": rows,
            "host_demand": demand, "host_cores": host_cores, "prefetch": cfg.data.prefetch}


def bench_attention(cfg, impls: list[str], shape: tuple[int, ...] | None, reps: int,
                    rounds: int) -> dict:
    """Wall milliseconds of each attention implementation, forward and forward+backward."""
    from cxr_rf.model import attention
    for name in impls:
        try:
            attention.check_name(name)
        except ValueError as e:
            raise errors.UserError(f"--impls: {e}") from None
    m = ModelConfig.from_config(cfg)
    if shape is None:
        side = step_lib.grid_size(cfg) // m.patch
        s = side * side + conditioning.num_tokens(cfg.data.report_len)
        shape = (cfg.train.batch_size, s, s, m.heads, m.head_dim)
    b, t, s, n, k = shape
    dtype = jnp.dtype(m.dtype)
    rng = np.random.default_rng(0)
    q, key, v, g = (jnp.asarray(rng.standard_normal(x), dtype)
                    for x in ((b, t, n, k), (b, s, n, k), (b, s, n, k), (b, t, n, k)))
    keep = jnp.asarray(np.arange(s)[None] < (s - np.arange(b) % 4 * 5)[:, None])
    programs = {}
    for name in impls:
        def f(q, key, v, name=name):
            return attention.attention(q, key, v, keep, implementation=name)
        fwd = jax.jit(f)
        bwd = jax.jit(jax.grad(lambda q, key, v, f=f: jnp.sum(f(q, key, v).astype(jnp.float32)
                                                              * g), argnums=(0, 1, 2)))
        for fn in (fwd, bwd):
            jax.block_until_ready(fn(q, key, v))            # compile outside the timing
        programs[name] = (fwd, bwd)
    ms = {name: ([], []) for name in impls}
    for _ in range(rounds):
        for name in impls:
            for i, fn in enumerate(programs[name]):
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(q, key, v))
                    times.append(time.perf_counter() - t0)
                ms[name][i].append(1e3 * statistics.median(times))
    flops = 4 * b * n * t * s * k                            # QKᵀ and PV, forward
    rows = {name: {"runs": attention.resolve(name, dtype, k, kv_len=s),
                   "fwd_ms": min(f), "fwd_bwd_ms": min(fb),
                   "fwd_gflop_s": flops / min(f) / 1e6} for name, (f, fb) in ms.items()}
    return {"shape": {"B": b, "T": t, "S": s, "N": n, "K": k}, "dtype": dtype.name,
            "platform": jax.devices()[0].platform, "impls": rows, "load_avg": load_average()}


def _define_flags() -> None:
    """Command-line flags (defined only when run as a program)."""
    cli.define_config("config", "Experiment file (data: optional, default config.base()).")
    flags.DEFINE_integer("steps", None, "Timed steps per round (after warm-up): train 20 steps; "
                         "sample 2 sampler calls; data 20 batches; checkpoint: 5 repeats.")
    flags.DEFINE_integer("warmup", None, "Untimed steps, calls or batches first (train 3, "
                         "sample 1, data 3; the first compiles).")
    flags.DEFINE_integer("rounds", 2, "train/sample: timed rounds, alternating ours and the "
                         "peer's; medians per side.")
    flags.DEFINE_string("peer_python", None, "train/sample: a Python with torch and diffusers; "
                        "runs the peer script at the same shape, side by side.")
    flags.DEFINE_string("peer_dir", None, "Folder of the peer scripts (default: ../shared/peer "
                        "beside the repository).")
    flags.DEFINE_integer("batch", None, "sample/data: images per call or batch (default: the "
                         "config's train.batch_size).")
    flags.DEFINE_integer("sample_steps", 28, "sample: Euler steps.")
    flags.DEFINE_float("cfg", 4.0, "sample: classifier-free guidance scale.")
    flags.DEFINE_integer("resolution", None, "data: training resolution (default: the config's "
                         "data.resolution).")
    flags.DEFINE_list("workers", ["0"], "data: Grain worker counts to measure, e.g. 0,1,2.")
    flags.DEFINE_string("data_dir", None, "data: a converted dataset to read, or an empty or "
                        "new folder to convert --num phantoms into (default: a temporary one).")
    flags.DEFINE_integer("num", 256, "data: phantoms to convert when --data_dir holds none.")
    flags.DEFINE_string("consumer", "cxr_xl@v5p", "data: the host demand, one of "
                        + ", ".join(CONSUMERS) + f" ({CONSUMER_SOURCE}).")
    flags.DEFINE_float("step_s", None, "data: step seconds replacing the consumer's.")
    flags.DEFINE_integer("global_batch", None, "data: global batch replacing the consumer's.")
    flags.DEFINE_integer("chips", None, "data: chips of the slice replacing the consumer's.")
    flags.DEFINE_integer("chips_per_host", None, "data: chips per host replacing the consumer's.")
    flags.DEFINE_integer("cores", None, "data: pin the benchmark (and its workers) to this "
                         "many CPUs; per-core rates divide by it (default: all it may use).")
    flags.DEFINE_integer("host_cores", 208, f"data: CPU cores of one host ({HOST_CORES_SOURCE}).")
    flags.DEFINE_list("impls", ["matmul", "xla", "blocked"], "attention: implementations "
                      "(model.attention names) to time.")
    flags.DEFINE_list("shape", None, "attention: B,T,S,N,K instead of the config's shape.")
    for name, lo in (("steps", 1), ("warmup", 0), ("rounds", 1), ("batch", 1),
                     ("sample_steps", 1), ("cfg", 0), ("resolution", 1), ("num", 1),
                     ("global_batch", 1), ("chips", 1), ("chips_per_host", 1),
                     ("cores", 1), ("host_cores", 1)):
        cli.check_number(name, lo)
    cli.check_number("step_s", 0, lo_open=True)


BENCHES = ("train", "sample", "data", "checkpoint", "attention")


def _workers() -> list[int]:
    try:
        out = [int(w) for w in FLAGS.workers]
    except ValueError:
        out = [-1]
    if not out or min(out) < 0:
        raise errors.UserError(f"--workers must be integers >= 0, e.g. 0,1,2; got "
                               f"{','.join(FLAGS.workers)}")
    return out


def _peer_flags() -> dict:
    return {"peer_python": FLAGS.peer_python, "peer_dir": FLAGS.peer_dir}


def main(argv):
    # A bad mesh / batch / model config is an errors.UserError from the config's own checks:
    # one line through cli.run; anything else keeps its traceback.
    if len(argv) != 2 or argv[1] not in BENCHES:
        raise errors.UserError(f"name the benchmark: python -m cxr_rf.bench {'|'.join(BENCHES)} "
                               "--config experiments/NAME.py [--steps N]")
    bench = argv[1]
    if bench == "data":
        import tempfile
        from cxr_rf import config as config_lib
        cfg = FLAGS.config or config_lib.base()
        workers = _workers()
        if FLAGS.cores is not None:
            cpus = sorted(os.sched_getaffinity(0))
            if FLAGS.cores > len(cpus):
                raise errors.UserError(f"--cores {FLAGS.cores}: this process may use "
                                       f"{len(cpus)} CPUs")
            os.sched_setaffinity(0, cpus[:FLAGS.cores])     # workers inherit it
        resolution = FLAGS.resolution or cfg.data.resolution
        demand = host_demand(FLAGS.consumer, step_s=FLAGS.step_s, global_batch=FLAGS.global_batch,
                             chips=FLAGS.chips, chips_per_host=FLAGS.chips_per_host)
        with tempfile.TemporaryDirectory(prefix="cxr_rf_bench_") as scratch:
            path = phantom_dataset(FLAGS.data_dir, FLAGS.num, resolution, scratch)
            r = bench_data(cfg, path, resolution, workers, FLAGS.steps or 20,
                           3 if FLAGS.warmup is None else FLAGS.warmup,
                           FLAGS.batch or cfg.train.batch_size, demand, FLAGS.host_cores)
        for row in r["rows"]:
            print(f"data {resolution}²: {row['workers']} workers: {row['images_per_s']:.1f} "
                  f"images/s = {row['images_per_s_per_core']:.1f} per core; a "
                  f"{FLAGS.host_cores}-core host makes {row['host_images_per_s']:.0f}/s for "
                  f"{demand['images_per_s_per_host']:.0f}/s consumed ({FLAGS.consumer}): "
                  f"headroom {row['headroom']:.1f}x", file=sys.stderr)
        print(json.dumps(r))
        return
    cli.require("config")
    cfg = FLAGS.config
    if bench == "checkpoint":
        print(json.dumps(bench_checkpoint(cfg, FLAGS.steps or 5)))
        return
    if bench == "attention":
        shape = None
        if FLAGS.shape is not None:
            try:
                shape = tuple(int(x) for x in FLAGS.shape)
            except ValueError:
                shape = ()
            if len(shape) != 5 or min(shape) < 1:
                raise errors.UserError(f"--shape {','.join(FLAGS.shape)}: expected five "
                                       f"positive integers B,T,S,N,K")
        print(json.dumps(bench_attention(cfg, list(FLAGS.impls), shape, FLAGS.steps or 10,
                                         FLAGS.rounds)))
        return
    if bench == "sample":
        r = bench_sample(cfg, FLAGS.steps or 2, 1 if FLAGS.warmup is None else FLAGS.warmup,
                         FLAGS.rounds, FLAGS.batch, FLAGS.sample_steps, FLAGS.cfg,
                         **_peer_flags())
        print(json.dumps(r))
        return
    r = bench_train(cfg, FLAGS.steps or 20, 3 if FLAGS.warmup is None else FLAGS.warmup,
                    FLAGS.rounds, **_peer_flags())
    print(f"train step: {r['images_per_s']:.2f} images/s = {r['images_per_s_per_device']:.2f} per "
          f"device ({r['step_s'] * 1e3:.1f} ms/step) on {r['devices']} {r['device_kind']} "
          f"device(s), mesh {r['mesh']}")
    print(f"model FLOPs/image (fwd+bwd, analytic): {r['flops_per_image'] / 1e9:.3f} GFLOP")
    print(f"achieved: {r['achieved_flops'] / 1e9:.2f} GFLOP/s of peak "
          f"{r['peak_flops'] / 1e9:.2f} GFLOP/s ({r['peak_source']}) = MFU {100 * r['mfu']:.1f}%")
    print(f"peak memory per device: {r['peak_memory_bytes'] / 2**20:.1f} MiB ({r['memory_source']})")
    keys = ("images_per_s", "images_per_s_per_device", "flops_per_image", "achieved_flops",
            "peak_flops", "mfu", "mesh", "peak_memory_bytes", "rounds_images_per_s",
            "best_images_per_s", "peer_images_per_s", "peer_rounds_images_per_s", "ratio",
            "peer_best_images_per_s", "best_ratio", "load_avg", "host_heap")
    print(json.dumps({k: r[k] for k in keys if k in r}))


if __name__ == "__main__":
    cli.run(main, _define_flags, host_heap=True)
