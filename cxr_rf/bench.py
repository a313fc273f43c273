"""Benchmarks. ``train``: images/s, analytic model FLOPs and achieved FLOP/s of the real train
step against a matmul peak measured in the same process.

    python -m cxr_rf.bench train --config experiments/bench.py [--steps 20] [--config.mesh.data=1]

Ends with one JSON line for scripts.
"""
from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from cxr_rf import conditioning
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


def bench_train(cfg, steps: int, warmup: int) -> dict:
    """Time the jitted train step on synthetic batches of the configured shape."""
    from cxr_rf.train import Trainer
    trainer = Trainer(cfg)
    state = trainer.init_state()
    b, r = cfg.train.batch_size, cfg.data.resolution
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (b, r, r, cfg.model.in_channels)).astype(np.float32),
             "tokens": np.tile(conditioning.null_tokens(cfg.data.report_len), (b, 1))}
    for _ in range(warmup):
        state, m = trainer.train_step(state, batch)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = trainer.train_step(state, batch)
    jax.block_until_ready(state)
    dt = (time.perf_counter() - t0) / steps
    # Training = forward + backward ≈ 3× the forward matmul FLOPs (no remat recompute counted).
    fpi = 3 * flops_per_image(ModelConfig.from_config(cfg), r)
    dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
    peak = matmul_peak(dtype=dtype) * jax.device_count()
    return {"images_per_s": b / dt, "step_s": dt, "flops_per_image": fpi,
            "achieved_flops": fpi * b / dt, "peak_flops": peak,
            "mfu": fpi * b / dt / peak, "devices": jax.device_count(),
            "platform": jax.devices()[0].platform, "loss": float(m["loss"])}


def _define_flags() -> None:
    """Command-line flags (defined only when run as a program)."""
    config_flags.DEFINE_config_file("config", None, "Experiment file.")
    flags.DEFINE_integer("steps", 20, "Timed steps (after warm-up).")
    flags.DEFINE_integer("warmup", 3, "Untimed steps (the first compiles).")


def main(argv):
    if len(argv) != 2 or argv[1] not in ("train",):
        sys.exit("usage: python -m cxr_rf.bench train --config experiments/NAME.py [--steps N]")
    if FLAGS.config is None:
        sys.exit("error: --config is required")
    r = bench_train(FLAGS.config, FLAGS.steps, FLAGS.warmup)
    print(f"train step: {r['images_per_s']:.2f} images/s ({r['step_s'] * 1e3:.1f} ms/step) on "
          f"{r['devices']} {r['platform']} device(s)")
    print(f"model FLOPs/image (fwd+bwd, analytic): {r['flops_per_image'] / 1e9:.3f} GFLOP")
    print(f"achieved: {r['achieved_flops'] / 1e9:.2f} GFLOP/s of measured matmul peak "
          f"{r['peak_flops'] / 1e9:.2f} GFLOP/s = {100 * r['mfu']:.1f}%")
    print(json.dumps({k: r[k] for k in ("images_per_s", "flops_per_image", "achieved_flops",
                                        "peak_flops", "mfu")}))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
