"""Shared experiment defaults. Every ``experiments/*.py`` starts from ``base()`` and changes
only the lines that differ, so a diff between two experiments is the experiment."""
from __future__ import annotations

import ml_collections


def base() -> ml_collections.ConfigDict:
    """The default configuration: a tiny pixel-space model on phantom data."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = d = ml_collections.ConfigDict()
    d.dir = ""                 # converted dataset; "" = <workdir>/data (converted on first run)
    # Training mixture over converted corpora: ((dir, weight), ...); overrides d.dir when set.
    # e.g. (("gs://b/cxr/mimic_cxr_jpg", 0.4), ("gs://b/cxr/chexpert", 0.3), ("gs://b/cxr/nih", 0.3))
    d.mixture = ()
    d.source = "phantom"       # what to convert when the dataset is missing
    d.num = 512                # phantom images to convert
    d.phantom_seed = 0
    d.resolution = 64
    d.shards = 4
    d.worker_count = 0         # Grain worker processes (0 = in the main process)
    d.prefetch = 2             # Grain per-worker buffer
    d.report_len = 0           # report bytes appended to the context (0 = structured only)
    # Classifier-free guidance: each condition group dropped independently.
    d.cond_dropout = ml_collections.ConfigDict(dict(
        findings=0.1, sex=0.1, age=0.1, race=0.1, view=0.1, source=0.1, report=0.1))

    c.model = m = ml_collections.ConfigDict()
    m.patch = 4
    m.width = 64
    m.depth = 2
    m.heads = 2
    m.mlp_ratio = 4.0
    m.in_channels = 1
    m.qk_norm = True
    m.pos_embed = "sincos"     # "sincos" (2D, any resolution) or "rope" (2D axial)
    m.scan = True              # nn.scan over blocks
    m.remat = "none"           # none | full | dots | dots_no_batch | save_attn (see model/layers.py)
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
    s.method = "euler"         # "euler" or "heun"
    s.grid = 8                 # images in the periodic training grid

    # One axis may be -1 (the remaining devices). max_replicated: refuse meshes leaving more than
    # this fraction of a >=100M-parameter model unsplit over fsdp/tensor (1.0 = allow).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, max_replicated=0.02))
    return c
