"""Shared experiment defaults. Every ``experiments/*.py`` starts from ``base()`` and changes
only the lines that differ, so a diff between two experiments is the experiment."""
from __future__ import annotations

import dataclasses

import ml_collections

from cxr_rf import conditioning, errors


def base() -> ml_collections.ConfigDict:
    """The default configuration: a tiny pixel-space model on phantom data."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = d = ml_collections.ConfigDict()
    d.dir = ""                 # converted dataset; "" = <workdir>/data (converted on first run)
    # Training mixture over converted corpora: ((dir, weight), ...); overrides d.dir when set.
    # Relative dirs are under d.root: root "gs://b/cxr", mixture (("mimic_cxr_jpg", 0.6),
    # ("chexpert", 0.4)) reads gs://b/cxr/mimic_cxr_jpg and gs://b/cxr/chexpert.
    d.mixture = ()
    d.root = ""
    d.source = "phantom"       # what to convert when the dataset is missing
    d.num = 512                # phantom images to convert
    d.phantom_seed = 0
    d.resolution = 64
    d.shards = 4
    d.worker_count = 0         # Grain worker processes (0 = in the main process)
    d.prefetch = 2             # Grain per-worker buffer
    d.report_len = 0           # report bytes appended to the context (0 = structured only)
    # Classifier-free guidance dropout: "all" drops every group at once (the unconditional
    # row the sampler guides against, SD3-style); each group is also dropped on its own, which
    # teaches the nulls of per-group guidance and of conditions left unspecified.
    d.cond_dropout = ml_collections.ConfigDict(dict(
        all=0.1, findings=0.1, sex=0.1, age=0.1, race=0.1, view=0.1, source=0.1, report=0.1))
    # The condition-token layout the run trains on (conditioning.LAYOUT); checkpoints of
    # another layout are refused.
    d.token_layout = conditioning.LAYOUT
    # Latent mode: train on latents cached by ``python -m cxr_rf.data.encode`` (batches hold the
    # normalised latent [h, w, Z] instead of pixels) and decode samples with the autoencoder.
    # d.resolution stays the PIXEL side (what samples, grids and evaluation are in); the model's
    # grid is d.resolution // d.latent_factor, model.in_channels = Z (checked against the data).
    d.latents = False
    d.latent_factor = 0        # pixels per latent cell (autoencoder factor); 0 = from the data
    # The autoencoder run (its workdir). With an empty d.dir the phantom set is converted and
    # encoded with it into <workdir>/latents; otherwise filled in from the dataset's record.
    d.autoencoder = ""
    d.autoencoder_step = 0     # 0 = newest / the one the data records
    d.autoencoder_fingerprint = ""   # filled from the data; sampling refuses another autoencoder
    d.encode_batch = 32        # images per encoder batch when encoding the phantom set

    c.model = m = ml_collections.ConfigDict()
    m.patch = 4
    m.width = 64
    m.depth = 2
    m.heads = 2
    m.mlp_ratio = 4.0
    m.in_channels = 1
    m.qk_norm = True
    m.pos_embed = "sincos"     # "sincos" (2D, any resolution) or "rope" (2D axial)
    m.rope_theta = 10_000.0    # rotary base frequency (pos_embed "rope")
    m.scan = True              # nn.scan over blocks
    # Blocks per trip of that scan (>= depth-1: all). Unrolled, the per-block residuals are
    # static slices instead of stacked buffers that are zero-filled, copied and dynamically
    # sliced every step (~20% of a CPU bench step); the compile grows with it, so the deep
    # configs keep 1. The parameters keep the scanned layout either way.
    m.scan_unroll = 1
    m.remat = "none"           # none | full | dots | dots_no_batch | save_attn (see model/layers.py)
    # auto | xla | matmul | cudnn | splash | blocked (model/attention.py); auto: cudnn on GPU
    # (bf16/f16), splash on TPU, on CPU blocked from 256 keys on and matmul below (measured).
    m.attention = "auto"
    m.dtype = "float32"        # compute dtype; params stay in m.param_dtype
    m.param_dtype = "float32"

    c.flow = f = ml_collections.ConfigDict()
    f.prediction = "v"         # "v" or "x" (x-prediction under the v-loss, for large patches)
    f.t_mean = 0.0             # logit-normal timestep sampling
    f.t_std = 1.0
    f.shift = 0.0              # 0 = SD3 resolution shift from token count; >0 = fixed shift
    f.base_tokens = 256        # token count at which the automatic shift is 1
    f.t_eps = 0.05             # x-prediction: v = (x_t - x̂) / max(t, t_eps)

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 1e-3
    o.warmup_steps = 50
    o.b1 = 0.9
    o.b2 = 0.95
    o.weight_decay = 0.0
    o.grad_clip = 1.0
    o.ema_decay = 0.999

    c.train = t = ml_collections.ConfigDict()
    t.steps = 1000
    t.batch_size = 32          # global batch
    # Progressive resolution: ((start_step, resolution[, batch_size]), ...) from step 0; the last
    # stage's resolution is data.resolution. () = data.resolution and batch_size throughout.
    # Each stage trains, evaluates and samples at its resolution with its own timestep shift.
    t.stages = ()
    t.log_every = 10
    t.eval_every = 200         # validation loss at fixed timesteps
    t.eval_batches = 2
    t.eval_timesteps = (0.1, 0.3, 0.5, 0.7, 0.9)
    t.ckpt_every = 200
    t.ckpt_keep = 3            # the last K checkpoints ...
    t.ckpt_keep_period = 0     # ... plus every M-th step's forever (0 = none)
    t.ckpt_async = True        # save in the background while training continues
    # A workdir whose checkpoints are all unreadable stops the run; True starts fresh instead.
    t.fresh_start_if_unreadable = False
    t.stop_at = 0              # stop after this step with a checkpoint, as a preemption would (0 = no)
    t.microbatches = 1         # gradient accumulation: the global batch in this many pieces
    t.max_nonfinite = 10       # stop after this many consecutive skipped (non-finite) steps
    t.sample_every = 500
    t.progress = True

    c.sample = s = ml_collections.ConfigDict()
    s.steps = 28
    s.cfg = 4.0
    s.guidance = ""            # per-group scales over s.cfg, e.g. "findings=6" (sample.Guidance)
    s.method = "euler"         # "euler" or "heun"
    s.batch_size = 16          # images per sampler batch (python -m cxr_rf.sample --batch_size)
    s.grid = 8                 # images in the periodic training grid

    # One axis may be -1 (the remaining devices). max_replicated: refuse meshes leaving more than
    # this fraction of a >=100M-parameter model unsplit over fsdp/tensor (1.0 = allow).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, max_replicated=0.02))
    return c


def sd3_size(depth: int) -> dict:
    """SD3's size rule: width = 64·depth, heads = depth (head dim 64)."""
    return dict(depth=depth, width=64 * depth, heads=depth)


# The converted public corpora of a CXR7-style training set (each converted with
# ``python -m cxr_rf.data.convert --source NAME --output <data.root>/NAME``) and the approximate
# number of images in their public releases (about 1.2M in all).
CORPORA = (("mimic_cxr_jpg", 377_110), ("chexpert", 223_414), ("rexgradient", 273_004),
           ("padchest", 160_868), ("nih_cxr14", 112_120), ("brax", 40_967),
           ("vindr_cxr", 18_000))


def corpus_mixture(names=None, temperature: float = 1.0) -> tuple:
    """((name, weight), ...) over CORPORA: weight ∝ images^(1/temperature); 1 = every image
    equally likely, larger temperatures up-weight the small corpora."""
    sizes = dict(CORPORA)
    names = names or [n for n, _ in CORPORA]
    unknown = sorted(set(names) - set(sizes))
    if unknown:
        raise errors.UserError(f"unknown corpora {unknown}; known: {sorted(sizes)}")
    w = {n: sizes[n] ** (1.0 / temperature) for n in names}
    total = sum(w.values())
    return tuple((n, round(w[n] / total, 4)) for n in names)


def foundation(depth: int) -> ml_collections.ConfigDict:
    """The RadiT-class recipe shared by experiments/cxr_*.py: an SD3-sized pixel-space MMDiT
    on the converted corpora mixture, bf16 compute on an FSDP mesh, 256² → 512² progressive
    training on 1.6T image tokens. A variant sets the depth and the few lines that differ."""
    c = base()
    d = c.data                 # set d.root: where the converted corpora live (/mnt/cxr, gs://B/cxr)
    d.mixture = corpus_mixture()
    d.source = ""              # nothing converts automatically
    d.resolution = 512
    d.worker_count = 16        # Grain decode processes per host
    d.prefetch = 4
    # No recompute; activation memory is cut with train.microbatches (sized by python -m cxr_rf.aot).
    c.model.update(patch=16, mlp_ratio=4.0, dtype="bfloat16", remat="none", **sd3_size(depth))
    c.flow.prediction = "x"    # large pixel patches: predict x, take the loss on v (reference)
    c.optim.update(lr=1e-4, warmup_steps=10_000, weight_decay=0.0, ema_decay=0.9999)
    # RadiT XL's budget of 1.6T image tokens: 250k steps at 256² (256 tokens per image), then
    # 1.475M at 512² (1024 tokens per image).
    c.train.update(steps=1_725_000, batch_size=1024, log_every=100, eval_every=5_000,
                   eval_batches=8, ckpt_every=2_000, ckpt_keep=3, ckpt_keep_period=50_000,
                   sample_every=25_000, stages=((0, 256), (250_000, 512)))
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c


@dataclasses.dataclass(frozen=True)
class Stage:
    """One resolution stage: steps (start, end] at ``resolution`` with a global ``batch_size``."""
    index: int
    start: int
    end: int
    resolution: int
    batch_size: int


def stages(cfg: ml_collections.ConfigDict) -> list[Stage]:
    """The run's resolution stages in order (one stage when ``train.stages`` is empty)."""
    t, res = cfg.train, cfg.data.resolution
    spec = [tuple(s) for s in t.stages] or [(0, res)]
    for s in spec:
        if len(s) not in (2, 3):
            raise errors.UserError(f"train.stages entries are (start_step, resolution[, batch_size]); "
                             f"got {s}")
    starts = [int(s[0]) for s in spec]
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
        raise errors.UserError(f"train.stages must start at step 0 with increasing start steps; "
                         f"got starts {starts}")
    if starts[-1] >= t.steps:
        raise errors.UserError(f"train.stages: the last stage starts at {starts[-1]}, not before "
                         f"train.steps={t.steps}")
    if int(spec[-1][1]) != res:
        raise errors.UserError(f"train.stages: the last stage's resolution {spec[-1][1]} must equal "
                         f"data.resolution={res} (the resolution the model samples at)")
    if cfg.data.get("latents", False) and any(int(s[1]) != res for s in spec):
        raise errors.UserError(f"train.stages: a latent run (data.latents=True) trains at one "
                               f"resolution, data.resolution={res}, the one its latents were "
                               f"encoded at; got stage resolutions {[int(s[1]) for s in spec]}")
    ends = starts[1:] + [t.steps]
    return [Stage(i, a, e, int(s[1]), int(s[2]) if len(s) == 3 and s[2] else t.batch_size)
            for i, (s, a, e) in enumerate(zip(spec, starts, ends))]


def stage_at(schedule: list[Stage], step: int) -> Stage:
    """The stage of ``schedule`` (from ``stages``) that trains ``step`` (1-based; step 0, before
    training, is in the first)."""
    return next((s for s in schedule if step <= s.end), schedule[-1])


def for_stage(cfg: ml_collections.ConfigDict, stage: Stage) -> ml_collections.ConfigDict:
    """The config a stage trains with: ``cfg`` with its resolution and global batch."""
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.data.resolution = stage.resolution
    c.train.batch_size = stage.batch_size
    c.train.stages = ()
    return c


TASKS = {"mmdit": "MMDiT", "autoencoder": "autoencoder"}


def read_run(workdir, task: str = "mmdit") -> ml_collections.ConfigDict:
    """The saved config of a trained run of ``task``; one-line UserError when ``workdir`` is
    missing, not a run (no readable config.json), a run of another task, or has no
    checkpoint yet. What ``sample``, ``evaluate``, ``edit`` and the latent encoder read first."""
    import json
    from etils import epath
    workdir = epath.Path(workdir)
    if not workdir.exists():
        raise errors.UserError(f"workdir {workdir} does not exist")
    cfg_path = workdir / "config.json"
    if not cfg_path.exists():
        raise errors.UserError(f"{workdir} is not a cxr_rf run (no config.json); train first")
    try:
        cfg = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
    except ValueError as e:
        raise errors.UserError(f"{cfg_path} is not readable JSON: {e}".replace("\n", " ")) from None
    have = cfg.get("task", "mmdit")
    if have != task:
        raise errors.UserError(f"{workdir} is a {have} run, not an {TASKS[task]} run "
                               f"(its config.json has task={have!r})")
    ckpts = workdir / "checkpoints"
    if not ckpts.exists() or not any(p.name.isdigit() for p in ckpts.iterdir()):
        raise errors.UserError(f"{workdir} has no {TASKS[task]} checkpoints yet; train first")
    return cfg
