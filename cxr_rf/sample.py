"""Generate radiographs from a trained run.

    python -m cxr_rf.sample --workdir DIR [--step N] --num 8 \
        --findings "Cardiomegaly,Pleural Effusion" --sex F --age 70 --view PA \
        [--steps 28 --cfg 4.0 --method euler] [--guidance "findings=5,demographics=2"] \
        --seed 0 --out DIR

Restores only the EMA parameters of the run's checkpoint, replicated on every local device,
or sharded over them (FSDP) when they do not fit one, and samples ``--num`` images in batches
of ``--batch_size`` split over the local devices (one compiled program whatever ``--num``).
Writes one image per sample (``--format png8|png16|dicom``, ``cxr_rf.export``: marked synthetic,
the conditions inside), grid.png and manifest.jsonl. Image i uses noise from
PRNGKey(seed + i), so the same arguments give the same pixels and an image does not depend
on how many others were asked for or on the batch it landed in.

Conditions: a group left unset (``--sex``, ``--age``, ``--race``, ``--view``, ``--source``,
``--report``) is *not specified*, its null token, which classifier-free-guidance training
taught the model as "any"; ``unknown`` is a value records carry. Unlisted findings take their
most common state in the run's training data (its ``stats.json``), and a requested value that
never occurs there is reported in one warning line.

Latent runs (``data.latents``): the model samples normalised latents on its grid
(``data.resolution // data.latent_factor``); the Sampler loads the run's autoencoder once
(``data.autoencoder`` at ``data.autoencoder_step``, else the one the run's dataset records, and
refuses one whose parameter fingerprint differs from ``data.autoencoder_fingerprint``),
denormalises and decodes them in float32 to pixel images [N, R, R] clipped to [-1, 1], so
everything downstream (PNGs, grids, evaluate) sees pixels as for a pixel-space run.

Guidance (``Guidance``): ``--cfg`` is the overall scale; ``--guidance`` gives condition
groups their own, e.g. findings 5 and demographics (sex, age, race) 2. The branches form a
chain, unconditional first, each adding one set of groups (those at the overall scale
first, then the named sets in order), combined as v = v_0 + Σ_k s_k (v_k − v_{k−1})
(``flow.chained_guidance``); all branches are one batched network call per step, and equal
scales are exactly plain CFG.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import flags
from etils import epath
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from cxr_rf import checkpoint, cli, conditioning, errors, flow, outputs, sharding
from cxr_rf import config as config_lib
from cxr_rf import step as step_lib
from cxr_rf.conditioning import Conditions
from cxr_rf.data import stats as data_stats
from cxr_rf.model import MMDiT, abstract_params, build_model

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
SHARD_MODES = ("auto", "replicated", "fsdp")
# "auto" replicates the parameters when they take at most this fraction of a device's memory
# (the rest holds activations of a batch and XLA's buffers); otherwise they are sharded.
REPLICATE_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: an overall ``scale`` and per-group scales.

    ``groups`` holds (group or group set, scale) pairs in chain order; a group set is a name
    of ``conditioning.GROUP_SETS`` (``demographics`` = sex, age, race). See the module
    docstring for the formula.
    """
    scale: float = 4.0
    groups: tuple[tuple[str, float], ...] = ()

    @classmethod
    def parse(cls, scale: float, spec: str = "") -> "Guidance":
        """From ``--cfg`` and ``--guidance "findings=5,demographics=2"``."""
        items = []
        for item in filter(None, (x.strip() for x in spec.split(","))):
            name, eq, value = (x.strip() for x in item.partition("="))
            try:
                v = float(value) if eq else math.nan
            except ValueError:
                v = math.nan
            if not (math.isfinite(v) and v >= 0):
                raise errors.UserError(f"--guidance item {item!r} must be group=scale with a "
                                       "finite scale >= 0, e.g. findings=5,demographics=2")
            conditioning.expand_groups([name])
            items.append((name, v))
        if not (math.isfinite(scale) and scale >= 0):
            raise errors.UserError(f"guidance scale must be finite and >= 0, got {scale}")
        return cls(float(scale), tuple(items))

    @classmethod
    def for_run(cls, sample_cfg, scale: float | None = None,
                spec: str | None = None) -> "Guidance":
        """``scale`` and ``spec`` where given, else the run's ``sample.cfg`` and
        ``sample.guidance``; validated whole (a group given two scales is refused here)."""
        g = cls.parse(float(sample_cfg.cfg if scale is None else scale),
                      sample_cfg.get("guidance", "") if spec is None else spec)
        g.chain()
        return g

    def chain(self) -> tuple[list[tuple[str, ...]], list[float]]:
        """(group sets, scales) of the branches after the unconditional one; empty when
        every scale is 1 (the conditional prediction alone, one branch)."""
        sets, scales, seen = [], [], set()
        for name, s in self.groups:
            groups = conditioning.expand_groups([name])
            if seen & set(groups):
                raise errors.UserError(f"--guidance gives {sorted(seen & set(groups))} two scales")
            seen |= set(groups)
            sets.append(groups)
            scales.append(s)
        rest = tuple(g for g in conditioning.GROUPS if g not in seen)
        if rest:
            sets.insert(0, rest)
            scales.insert(0, self.scale)
        if all(s == 1.0 for s in scales):
            return [], []
        return sets, scales

    def branches(self, tokens_BL: np.ndarray) -> tuple[np.ndarray, tuple[float, ...]]:
        """(token rows [K+1, B, L] of every branch, the K scales) for conditions ``tokens_BL``."""
        sets, scales = self.chain()
        if not sets:
            return tokens_BL[None], ()
        rows, kept = [conditioning.keep_only(tokens_BL, [])], []
        for groups in sets:
            kept += groups
            rows.append(conditioning.keep_only(tokens_BL, kept))
        return np.stack(rows), tuple(scales)

    def describe(self) -> dict:
        return {"cfg": self.scale, "groups": dict(self.groups)}


@functools.lru_cache(maxsize=None)
def _program(model: MMDiT, fs: flow.FlowSettings, steps: int, method: str,
             shape: tuple[int, ...]):
    """The jitted sampler of one (model, flow settings, steps, method): shared by every
    Sampler, so a new Sampler (a new training stage, a test) does not compile again."""

    def run(params, seeds_B, branches_KBL, scales_K):
        noise_BHWC = jax.vmap(lambda s: jax.random.normal(jax.random.PRNGKey(s), shape))(seeds_B)
        apply = lambda x, t, tok: model.apply({"params": params}, x, t, tok)
        velocity = flow.guided_velocity_fn(apply, list(branches_KBL), list(scales_K),
                                           prediction=fs.prediction, t_eps=fs.t_eps)
        return flow.sample(velocity, noise_BHWC, steps=steps, method=method, shift=fs.shift)

    return jax.jit(run)


@functools.lru_cache(maxsize=None)
def _decoder(ae_cfg):
    """The jitted latent -> pixel decoder of one autoencoder config: denormalise, decode in
    float32, clip to [-1, 1]."""
    from cxr_rf.autoencoder.model import Autoencoder
    model = Autoencoder(ae_cfg)

    def run(variables, z_BhwZ):
        z = model.apply(variables, z_BhwZ, method=Autoencoder.denormalize)
        return jnp.clip(model.apply(variables, z, method=Autoencoder.decode), -1.0, 1.0)

    return jax.jit(run)


def _data_latent_info(cfg: ml_collections.ConfigDict) -> dict | None:
    """The ``latent`` record of the run's (first) dataset when it can be found from the config
    alone (``data.dir`` or ``data.mixture``), else None."""
    from cxr_rf.data import schema
    d = cfg.data
    if d.get("mixture"):
        first, root = str(d.mixture[0][0]), d.get("root", "")
        path = first if not root or first.startswith("/") else str(epath.Path(root) / first)
    elif d.get("dir"):
        path = str(d.dir)
    else:
        return None
    if "://" in path or not epath.Path(path).exists():
        return None
    return schema.latent_info(path)


def latent_autoencoder(cfg: ml_collections.ConfigDict):
    """(AEConfig, variables) of a latent run's autoencoder, checked against the run: its
    fingerprint (when the run or its data records one), factor and channel count. Bad or
    missing paths are one-line UserErrors."""
    from cxr_rf.data import encode
    d = cfg.data
    run = str(d.get("autoencoder", "") or "")
    step = int(d.get("autoencoder_step", 0) or 0)
    fp = str(d.get("autoencoder_fingerprint", "") or "")
    if not run or not fp:
        info = _data_latent_info(cfg)
        if info is not None:
            ae = info["autoencoder"]
            run, step, fp = run or ae["run"], step or int(ae["step"]), fp or ae["fingerprint"]
    if not run:
        raise errors.UserError("this latent run (data.latents=True) names no autoencoder to "
                               "decode its samples: set data.autoencoder to the autoencoder run")
    ae_cfg, variables, step, record = encode.load(run, step or None)
    if fp and record["fingerprint"] != fp:
        raise errors.UserError(f"the autoencoder {record['run']} (step {step}) is not the one "
                               f"this run's latents were encoded with (fingerprint "
                               f"{record['fingerprint'][:12]} != {fp[:12]}); point "
                               "data.autoencoder at that run")
    factor = int(d.get("latent_factor", 0) or 0)
    if (factor and ae_cfg.factor != factor) or ae_cfg.packed_channels != int(cfg.model.in_channels):
        raise errors.UserError(f"the autoencoder {record['run']} makes factor-{ae_cfg.factor}, "
                               f"{ae_cfg.packed_channels}-channel latents, but the run has "
                               f"data.latent_factor={factor}, model.in_channels="
                               f"{cfg.model.in_channels}")
    return ae_cfg, variables


def _fits(nbytes: int, device) -> bool:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:      # the CPU reports no limit
        return True
    return nbytes <= REPLICATE_FRACTION * stats["bytes_limit"]


class Sampler:
    """Samples a model with given parameters over the local devices, in fixed-size batches.

    ``shard``: "replicated" puts the parameters on every device and splits each batch over
    them (data parallel); "fsdp" shards the parameters over the devices by the model's
    logical axes (for models that do not fit one device), the batch likewise; "auto" picks
    replicated when they fit (``REPLICATE_FRACTION`` of a device's memory).
    """

    def __init__(self, cfg: ml_collections.ConfigDict, model: nn.Module | None = None, *,
                 devices: Sequence | None = None, shard: str = "auto",
                 batch_size: int | None = None):
        if shard not in SHARD_MODES:
            raise errors.UserError(f"unknown shard mode {shard!r}; allowed: {', '.join(SHARD_MODES)}")
        self.cfg = cfg
        self.model = model or build_model(cfg)
        self.resolution = cfg.data.resolution       # pixels: what generate returns
        self.side = step_lib.grid_size(cfg)         # the model's side (latent grid or pixels)
        self.report_len = cfg.data.report_len
        self.fs = step_lib.flow_settings(cfg)   # the shift of the resolution it samples at
        devices = list(devices or jax.local_devices())
        boxed = abstract_params(self.model, self.side)
        nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(nn.unbox(boxed)))
        if shard == "auto":
            shard = "replicated" if _fits(nbytes, devices[0]) else "fsdp"
        self.shard = shard
        n = len(devices)
        axes = {"data": n, "fsdp": 1} if shard == "replicated" else {"data": 1, "fsdp": n}
        self.mesh = sharding.make_mesh({**axes, "tensor": 1}, devices)
        if shard == "fsdp":
            sharding.check_divisible(boxed, self.mesh)
        self.param_shardings = sharding.logical_sharding(boxed, self.mesh)
        self._abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            nn.unbox(boxed), self.param_shardings)
        size = int(batch_size or cfg.sample.get("batch_size", 16))
        if size < 1:
            raise errors.UserError(f"batch_size must be >= 1, got {size}")
        self.batch_size = -(-size // n) * n                 # a multiple of the devices
        self._rows = NamedSharding(self.mesh, P(("data", "fsdp")))
        self._branch_rows = NamedSharding(self.mesh, P(None, ("data", "fsdp")))
        self._ae = None
        if cfg.data.get("latents", False):          # loaded once, replicated on the devices
            ae_cfg, variables = latent_autoencoder(cfg)
            if self.side * ae_cfg.factor != self.resolution:
                raise errors.UserError(f"latent grid {self.side} x factor {ae_cfg.factor} != "
                                       f"data.resolution={self.resolution}")
            self._ae = (_decoder(ae_cfg),
                        jax.device_put(variables, NamedSharding(self.mesh, P())))

    def restore(self, workdir: str | epath.Path, step: int | None = None):
        """(EMA parameters placed for this sampler, checkpoint step) of a run; only the EMA
        arrays are read."""
        return checkpoint.restore_field(epath.Path(workdir) / "checkpoints", "ema_params",
                                        self._abstract, step)[::-1]

    def generate(self, params, conditions: Sequence[Conditions], seeds: Sequence[int], *,
                 steps: int | None = None, cfg_scale: float | None = None,
                 guidance: Guidance | None = None, method: str | None = None,
                 progress: bool = False) -> np.ndarray:
        """Images [N, R, R] in [-1, 1] (pixels; decoded for a latent run), one per (condition,
        seed) pair. Guidance is
        ``guidance``, else ``cfg_scale`` (default: the run's ``sample.cfg``) with the run's
        per-group ``sample.guidance``."""
        if len(conditions) != len(seeds):
            raise ValueError(f"need one seed per condition, got {len(seeds)} for {len(conditions)}")
        if guidance is not None and cfg_scale is not None:
            raise ValueError("pass guidance or cfg_scale, not both")
        s = self.cfg.sample
        guidance = guidance or Guidance.for_run(s, cfg_scale)
        shape = (self.side, self.side, self.cfg.model.in_channels)
        program = _program(self.model, self.fs, int(steps or s.steps), method or s.method, shape)
        params = jax.device_put(params, self.param_shardings)
        tokens = np.stack([c.tokens(report_len=self.report_len) for c in conditions])
        branches, scales = guidance.branches(tokens)
        scales = jnp.asarray(scales, jnp.float32)
        seeds = np.asarray([int(x) for x in seeds], np.int64)
        if seeds.size and (seeds.min() < 0 or seeds.max() >= 2**32):
            raise errors.UserError("seeds must be in [0, 2**32)")
        seeds = seeds.astype(np.uint32)
        n, bs, out = len(seeds), self.batch_size, []
        pending = None          # (device array, images kept) of the batch dispatched last
        for start in tqdm.tqdm(range(0, n, bs), disable=not progress, unit="batch",
                               desc="sample", dynamic_ncols=True):
            # A short last batch repeats its last image (same shapes, no recompile); the
            # repeats are dropped.
            idx = np.minimum(np.arange(start, start + bs), n - 1)
            x = program(params, jax.device_put(seeds[idx], self._rows),
                        jax.device_put(branches[:, idx], self._branch_rows), scales)
            if self._ae is not None:
                x = self._ae[0](self._ae[1], x)             # latents -> pixels [B, R, R, 1]
            # Fetch the previous batch only now that this one is queued: the device computes
            # while the host copies, and at most two batches are held on the device.
            if pending is not None:
                out.append(np.asarray(jax.device_get(pending[0]))[: pending[1], ..., 0])
            pending = (x, min(bs, n - start))
        if pending is not None:
            out.append(np.asarray(jax.device_get(pending[0]))[: pending[1], ..., 0])
        r = self.resolution
        return np.concatenate(out) if out else np.zeros((0, r, r), np.float32)

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


def read_config(workdir: str | epath.Path) -> ml_collections.ConfigDict:
    """The config of a run directory, refused (one line) unless this code can sample it."""
    cfg = config_lib.read_run(workdir, "mmdit")
    conditioning.check_layout(cfg, str(workdir))
    return cfg


def load(workdir: str | epath.Path, step: int | None = None, **sampler_kwargs):
    """(config, model, EMA params, checkpoint step) of a run directory; the parameters are
    placed for ``Sampler(cfg, **sampler_kwargs)``."""
    cfg = read_config(workdir)
    sampler = Sampler(cfg, **sampler_kwargs)
    params, step = sampler.restore(workdir, step)
    return cfg, sampler.model, params, step


def training_defaults(cfg: ml_collections.ConfigDict, workdir: str | epath.Path):
    """(the run's training marginals, the states of unlisted findings), from the stats.json
    of its data (``data.stats``); (None, None) when a source has none."""
    from cxr_rf import trainer   # the data layout of a run; imported late (it pulls in Grain)
    marginals = data_stats.training_marginals(trainer.data_sources(cfg, epath.Path(workdir)))
    if marginals is None:
        return None, None
    return marginals, data_stats.unlisted_defaults(marginals)


FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Command-line flags (defined only when run as a program, so importing stays side-effect free)."""
    flags.DEFINE_string("workdir", None, "Run directory with checkpoints/.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_integer("num", 8, "Number of images.")
    flags.DEFINE_string("findings", "", "Comma list of findings, Name or Name=state (state: "
                        f"{', '.join(conditioning.REQUEST_STATES)}; default positive). Unlisted "
                        "findings take their most common state in the training data. Valid "
                        "names: " + ", ".join(conditioning.FINDINGS))
    flags.DEFINE_string("sex", None, f"One of {conditioning.SEXES} (default: not specified).")
    flags.DEFINE_string("age", None, "Age in years, or 'unknown' (default: not specified).")
    flags.DEFINE_string("race", None, f"One of {conditioning.RACES} (default: not specified).")
    flags.DEFINE_string("view", None, f"One of {conditioning.VIEWS} (default: not specified).")
    flags.DEFINE_string("source", None, f"One of {conditioning.SOURCES} (default: not specified).")
    flags.DEFINE_string("report", None, "Report text (runs with data.report_len > 0; default: "
                        "not specified).")
    flags.DEFINE_integer("steps", None, "ODE steps (default: the run's sample.steps).")
    flags.DEFINE_float("cfg", None, "Classifier-free guidance scale, 1 = none (default: the "
                       "run's sample.cfg).")
    flags.DEFINE_string("guidance", None, "Per-group guidance scales, group=scale,... (groups: "
                        f"{', '.join(conditioning.GROUPS + tuple(conditioning.GROUP_SETS))}); "
                        "the others use --cfg (default: the run's sample.guidance).")
    flags.DEFINE_enum("method", None, ["euler", "heun"], "ODE solver (default: the run's "
                      "sample.method).")
    flags.DEFINE_integer("seed", 0, "Image i uses seed + i.")
    flags.DEFINE_integer("batch_size", None, "Images per batch (default: the run's "
                         "sample.batch_size), rounded up to a multiple of the local devices.")
    flags.DEFINE_enum("shard", "auto", list(SHARD_MODES), "Parameter placement over the local "
                      "devices: replicated, fsdp (sharded), or auto (replicated if they fit).")
    flags.DEFINE_enum("format", "png8", ["png8", "png16", "dicom"], "Single images as 8- or "
                      "16-bit PNGs (conditions in a text chunk) or DICOM Secondary Capture marked "
                      "synthetic (cxr_rf/export.py).")
    flags.DEFINE_string("out", None, "Output directory.")
    cli.check_number("step", 0)
    cli.check_number("num", 1)
    cli.check_number("steps", 1)
    cli.check_number("cfg", 0)
    cli.check_number("batch_size", 1)
    # PRNGKey keeps the low 32 bits of a seed (without x64): larger seeds repeat smaller ones.
    cli.check_number("seed", 0, 2**32, hi_open=True)


def _age(value: str | None):
    if value is None or value == "unknown":
        return value
    try:
        return float(value)
    except ValueError:
        raise errors.UserError(f"--age must be a number of years or 'unknown', got {value!r}") from None


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
    kwargs = dict(sex=FLAGS.sex, age=_age(FLAGS.age), race=FLAGS.race, view=FLAGS.view,
                  source=FLAGS.source, report=FLAGS.report)
    Conditions.parse(FLAGS.findings, **kwargs)        # bad conditions fail before the restore
    cfg = read_config(FLAGS.workdir)
    s = cfg.sample
    steps, method = FLAGS.steps or s.steps, FLAGS.method or s.method
    guidance = Guidance.for_run(s, FLAGS.cfg, FLAGS.guidance)   # before the restore, too
    if FLAGS.report is not None and not cfg.data.report_len:
        raise errors.UserError(f"--report needs a run trained with reports (data.report_len > 0); "
                               f"{FLAGS.workdir} has report_len 0")
    marginals, unlisted = training_defaults(cfg, FLAGS.workdir)
    cond = Conditions.parse(FLAGS.findings, unlisted=unlisted, **kwargs)
    if marginals is not None and (missing := data_stats.unseen(cond.requested(), marginals)):
        print(f"warning: never in this run's training data, so the model has not learnt it: "
              f"{', '.join(missing)}", file=sys.stderr)
    sampler = Sampler(cfg, shard=FLAGS.shard, batch_size=FLAGS.batch_size)
    params, step = sampler.restore(FLAGS.workdir, FLAGS.step)
    seeds = [FLAGS.seed + i for i in range(FLAGS.num)]
    images = sampler.generate(params, [cond] * len(seeds), seeds, steps=steps,
                              guidance=guidance, method=method, progress=True)
    out = epath.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    from cxr_rf import export
    rows = []
    study = export.new_study() if FLAGS.format == "dicom" else None
    for i, (seed, img) in enumerate(zip(seeds, images)):
        settings = {"seed": seed, "steps": steps, "method": method, **guidance.describe(),
                    "checkpoint_step": step}
        path = export.write(out / f"{i:04d}", img, cond, fmt=FLAGS.format,
                            generator={"workdir": str(FLAGS.workdir), **settings},
                            study=None if study is None else {**study, "instance": i + 1})
        rows.append({"file": path.name, **settings, "workdir": str(FLAGS.workdir),
                     "conditions": cond.describe()})
    with (out / "grid.png").open("wb") as f:
        outputs.grid(list(images), [f"seed {s}: {cond.label()}" for s in seeds]).save(f, format="PNG")
    outputs.write_manifest(out / "manifest.jsonl", rows)
    print(f"wrote {len(images)} images, grid.png and manifest.jsonl to {out} (checkpoint step {step})")


if __name__ == "__main__":
    cli.run(main, _define_flags)
