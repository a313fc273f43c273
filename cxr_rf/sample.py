"""Generate radiographs from a trained run.

    python -m cxr_rf.sample --workdir DIR [--step N] --num 8 \
        --findings "Cardiomegaly,Pleural Effusion" --sex F --age 70 --view PA \
        --steps 28 --cfg 4.0 --seed 0 --out DIR

Loads the EMA parameters of the run's checkpoint, writes one PNG per image, grid.png and
manifest.jsonl. Image i uses noise from PRNGKey(seed + i), so the same arguments give the
same pixels and an image does not depend on how many others were asked for.
"""
from __future__ import annotations

import functools
import json
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from etils import epath
from flax import linen as nn

from cxr_rf import checkpoint, cli, conditioning, errors, flow, outputs
from cxr_rf import step as step_lib
from cxr_rf.conditioning import Conditions
from cxr_rf.model import build_model

# The fixed prompts of the periodic training grids: one per main finding, varied demographics.
DEMO_CONDITIONS: tuple[Conditions, ...] = (
    Conditions.parse("", sex="M", age=35, view="PA"),
    Conditions.parse("Cardiomegaly", sex="F", age=75, view="PA"),
    Conditions.parse("Pleural Effusion", sex="M", age=68, view="AP"),
    Conditions.parse("Pneumothorax", sex="M", age=24, view="PA"),
    Conditions.parse("Lung Lesion", sex="F", age=62, view="PA"),
    Conditions.parse("Consolidation,Lung Opacity", sex="F", age=50, view="AP"),
    Conditions.parse("Support Devices", sex="M", age=80, view="AP"),
    Conditions.parse("Atelectasis", sex="F", age=45, view="PA"),
)


class Sampler:
    """Samples a model with given parameters; the compiled sampler is cached per settings."""

    def __init__(self, cfg: ml_collections.ConfigDict, model: nn.Module | None = None):
        self.cfg = cfg
        self.model = model or build_model(cfg)
        self.resolution = cfg.data.resolution
        self.report_len = cfg.data.report_len
        self.fs = step_lib.flow_settings(cfg)   # the shift of the resolution it samples at

    @functools.partial(jax.jit, static_argnums=(0,), static_argnames=("steps", "method"))
    def _generate(self, params, noise_BHWC, tokens_BL, guidance, *, steps: int, method: str):
        uncond_BL = jnp.broadcast_to(jnp.asarray(conditioning.null_tokens(self.report_len)),
                                     tokens_BL.shape)
        apply = lambda x, t, tok: self.model.apply({"params": params}, x, t, tok)
        velocity = flow.guided_velocity_fn(apply, tokens_BL, uncond_BL, guidance,
                                           prediction=self.fs.prediction, t_eps=self.fs.t_eps)
        return flow.sample(velocity, noise_BHWC, steps=steps, method=method, shift=self.fs.shift)

    def generate(self, params, conditions: Sequence[Conditions], seeds: Sequence[int], *,
                 steps: int | None = None, cfg_scale: float | None = None,
                 method: str | None = None) -> np.ndarray:
        """Images [B, R, R] in [-1, 1], one per (condition, seed) pair."""
        if len(conditions) != len(seeds):
            raise ValueError(f"need one seed per condition, got {len(seeds)} for {len(conditions)}")
        s = self.cfg.sample
        shape = (self.resolution, self.resolution, self.cfg.model.in_channels)
        noise = jnp.stack([jax.random.normal(jax.random.PRNGKey(int(sd)), shape) for sd in seeds])
        tokens = jnp.asarray(np.stack([c.tokens(report_len=self.report_len) for c in conditions]))
        out = self._generate(params, noise, tokens, float(s.cfg if cfg_scale is None else cfg_scale),
                             steps=int(steps or s.steps), method=method or s.method)
        return np.asarray(jax.device_get(out))[..., 0]

    def grid(self, params, path: str | epath.Path, step: int | None = None) -> np.ndarray:
        """The labelled grid of DEMO_CONDITIONS (seed i for row i) written to ``path``."""
        conds = DEMO_CONDITIONS[: self.cfg.sample.grid]
        images = self.generate(params, conds, list(range(len(conds))))
        path = epath.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        labels = [c.label() for c in conds]
        if step is not None:
            labels[0] = f"step {step}: {labels[0]}"
        with path.open("wb") as f:
            outputs.grid(images, labels).save(f, format="PNG")
        return images


def load(workdir: str | epath.Path, step: int | None = None):
    """(config, model, EMA params, checkpoint step) of a run directory, restored onto this
    process's first device."""
    workdir = epath.Path(workdir)
    if not workdir.exists():
        raise errors.UserError(f"workdir {workdir} does not exist")
    cfg_path = workdir / "config.json"
    if not cfg_path.exists():
        raise errors.UserError(f"{workdir} is not a cxr_rf run (no config.json); train first")
    cfg = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.exists() or not any(ckpt_dir.iterdir()):
        raise errors.UserError(f"{workdir} has no checkpoints yet; train first")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    step, state = checkpoint.restore_params(ckpt_dir, step_lib.abstract_state(cfg, device), step)
    return cfg, build_model(cfg), state.ema_params, step


FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Command-line flags (defined only when run as a program, so importing stays side-effect free)."""
    flags.DEFINE_string("workdir", None, "Run directory with checkpoints/.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_integer("num", 8, "Number of images.")
    flags.DEFINE_string("findings", "", "Comma list of positive findings (Name or Name=state); "
                        "unlisted ones are negative. Valid names: " + ", ".join(conditioning.FINDINGS))
    flags.DEFINE_string("sex", "unknown", f"One of {conditioning.SEXES}.")
    flags.DEFINE_float("age", None, "Age in years (default unknown).")
    flags.DEFINE_string("race", "unknown", f"One of {conditioning.RACES}.")
    flags.DEFINE_string("view", "PA", f"One of {conditioning.VIEWS}.")
    flags.DEFINE_string("source", "unknown", f"One of {conditioning.SOURCES}.")
    flags.DEFINE_integer("steps", 28, "ODE steps.")
    flags.DEFINE_float("cfg", 4.0, "Classifier-free guidance scale (1 = none).")
    flags.DEFINE_enum("method", "euler", ["euler", "heun"], "ODE solver.")
    flags.DEFINE_integer("seed", 0, "Image i uses seed + i.")
    flags.DEFINE_enum("bits", "8", ["8", "16"], "PNG bit depth of single images.")
    flags.DEFINE_string("out", None, "Output directory.")
    cli.check_number("step", 0)
    cli.check_number("num", 1)
    cli.check_number("age", 0, 150, hi_open=True)
    cli.check_number("steps", 1)
    cli.check_number("cfg", 0)
    # PRNGKey keeps the low 32 bits of a seed (without x64): larger seeds repeat smaller ones.
    cli.check_number("seed", 0, 2**32, hi_open=True)


def main(argv):
    # Bad input (errors.UserError: flags, conditions, run directory) and an unreadable
    # checkpoint (RunError) end in one line through cli.run; anything else keeps its traceback.
    cli.no_arguments(argv)
    cli.require("workdir", "out")
    if FLAGS.seed + FLAGS.num > 2**32:
        raise errors.UserError(f"--seed + --num must be <= 2**32 (seeds are 32-bit), got "
                               f"{FLAGS.seed} + {FLAGS.num}")
    cli.input_dir(FLAGS.workdir, "--workdir")
    cli.output_dir(FLAGS.out, "--out")
    cond = Conditions.parse(FLAGS.findings, sex=FLAGS.sex, age=FLAGS.age, race=FLAGS.race,
                            view=FLAGS.view, source=FLAGS.source)
    cfg, model, params, step = load(FLAGS.workdir, FLAGS.step)
    seeds = [FLAGS.seed + i for i in range(FLAGS.num)]
    images = Sampler(cfg, model).generate(params, [cond] * len(seeds), seeds, steps=FLAGS.steps,
                                          cfg_scale=FLAGS.cfg, method=FLAGS.method)
    out = epath.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (seed, img) in enumerate(zip(seeds, images)):
        name = f"{i:04d}.png"
        outputs.write_png(out / name, img, bits=int(FLAGS.bits))
        rows.append({"file": name, "seed": seed, "steps": FLAGS.steps, "cfg": FLAGS.cfg,
                     "method": FLAGS.method, "checkpoint_step": step, "workdir": str(FLAGS.workdir),
                     "conditions": cond.describe()})
    with (out / "grid.png").open("wb") as f:
        outputs.grid(list(images), [f"seed {s}: {cond.label()}" for s in seeds]).save(f, format="PNG")
    outputs.write_manifest(out / "manifest.jsonl", rows)
    print(f"wrote {len(images)} images, grid.png and manifest.jsonl to {out} (checkpoint step {step})")


if __name__ == "__main__":
    cli.run(main, _define_flags)
