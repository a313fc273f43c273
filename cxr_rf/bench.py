"""Benchmarks, each ending with one JSON line for scripts.

``train``: images/s (total and per device), analytic model FLOPs, MFU and peak memory of the
real (sharded) train step on the configured mesh.

    python -m cxr_rf.bench train --config experiments/bench.py [--steps 20] \
        [--config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2]

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
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from cxr_rf import cli, conditioning, errors
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


def bench_train(cfg, steps: int, warmup: int) -> dict:
    """Time the jitted train step on synthetic batches of the configured shape."""
    from cxr_rf.trainer import Trainer
    trainer = Trainer(cfg)
    state = trainer.init_state()
    b = cfg.train.batch_size
    shapes = step_lib.dummy_batch(cfg)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, shapes["image"].shape).astype(np.float32),
             "tokens": np.broadcast_to(conditioning.null_tokens(cfg.data.report_len),
                                       shapes["tokens"].shape)}
    for _ in range(warmup):
        state, m = trainer.train_step(state, batch)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = trainer.train_step(state, batch)
    jax.block_until_ready(state)
    dt = (time.perf_counter() - t0) / steps
    # Training = forward + backward ≈ 3× the forward matmul FLOPs (no remat recompute counted).
    fpi = 3 * flops_per_image(ModelConfig.from_config(cfg), step_lib.grid_size(cfg))
    dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
    n = trainer.mesh.size
    peak_dev, peak_src = device_peak(dtype)
    mem, mem_src = peak_memory(trainer)
    return {"images_per_s": b / dt, "images_per_s_per_device": b / dt / n, "step_s": dt,
            "flops_per_image": fpi, "achieved_flops": fpi * b / dt, "peak_flops": peak_dev * n,
            "peak_source": peak_src, "mfu": fpi * b / dt / (peak_dev * n), "devices": n,
            "mesh": dict(trainer.mesh.shape), "platform": jax.devices()[0].platform,
            "device_kind": jax.devices()[0].device_kind, "peak_memory_bytes": mem,
            "memory_source": mem_src, "loss": float(np.asarray(m["loss"].addressable_data(0)))}


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


def _define_flags() -> None:
    """Command-line flags (defined only when run as a program)."""
    cli.define_config("config", "Experiment file.")
    flags.DEFINE_integer("steps", 20, "Timed steps (after warm-up); checkpoint: repeats.")
    flags.DEFINE_integer("warmup", 3, "Untimed steps (the first compiles).")
    cli.check_number("steps", 1)
    cli.check_number("warmup", 0)


def main(argv):
    # A bad mesh / batch / model config is an errors.UserError from the config's own checks:
    # one line through cli.run; anything else keeps its traceback.
    if len(argv) != 2 or argv[1] not in ("train", "checkpoint"):
        raise errors.UserError("name the benchmark: python -m cxr_rf.bench train|checkpoint "
                               "--config experiments/NAME.py [--steps N]")
    cli.require("config")
    if argv[1] == "checkpoint":
        print(json.dumps(bench_checkpoint(FLAGS.config, FLAGS.steps)))
        return
    r = bench_train(FLAGS.config, FLAGS.steps, FLAGS.warmup)
    print(f"train step: {r['images_per_s']:.2f} images/s = {r['images_per_s_per_device']:.2f} per "
          f"device ({r['step_s'] * 1e3:.1f} ms/step) on {r['devices']} {r['device_kind']} "
          f"device(s), mesh {r['mesh']}")
    print(f"model FLOPs/image (fwd+bwd, analytic): {r['flops_per_image'] / 1e9:.3f} GFLOP")
    print(f"achieved: {r['achieved_flops'] / 1e9:.2f} GFLOP/s of peak "
          f"{r['peak_flops'] / 1e9:.2f} GFLOP/s ({r['peak_source']}) = MFU {100 * r['mfu']:.1f}%")
    print(f"peak memory per device: {r['peak_memory_bytes'] / 2**20:.1f} MiB ({r['memory_source']})")
    print(json.dumps({k: r[k] for k in ("images_per_s", "images_per_s_per_device", "flops_per_image",
                                        "achieved_flops", "peak_flops", "mfu", "mesh",
                                        "peak_memory_bytes")}))


if __name__ == "__main__":
    cli.run(main, _define_flags)
