"""ladder: a compute-matched scaling ladder of SD3-sized MMDiTs (width 64·depth, depth heads) in
pixel space on 200k procedural phantom radiographs at 64² (patch 4: 256 image tokens), bf16,
global batch 256, one GPU per rung.

Every rung trains on the same number of image tokens per parameter (TOKENS_PER_PARAM, exact
parameter count from cxr_rf.model.mmdit), so data D ∝ N and training compute C ∝ N²
(Chinchilla-style). The five trained rungs d2…d6 span ~2.8 decades of compute; d8 is the
"next" rung whose loss the fit predicts before it is run (it is a valid config too).

    rung  params   steps   images   train FLOPs (3×fwd)
    d2     1.13M    1100    0.28M    2.4e14
    d3     3.80M    3700    0.95M    2.5e15
    d4     9.05M    8800    2.25M    1.4e16
    d5    17.77M   17400    4.45M    5.1e16
    d6    30.85M   30100    7.71M    1.5e17
    d8    73.61M   71900   18.41M    8.3e17   (next: predicted)

Wall time is not measured yet: at an assumed 100 TFLOP/s achieved on one H200 (bf16) d6 is
~25 min and d2…d6 together ~36 min; d8 ~2.3 h. Convert the data once (the trainer would
otherwise convert 200k phantoms on one core into every workdir), train the rungs, then fit:

    python -m cxr_rf.data.convert --source phantom --num 200000 --resolution 64 --shards 32 \
        --workers 16 --output runs/ladder/data
    for r in d2 d3 d4 d5 d6; do
        python -m cxr_rf.train --config experiments/ladder.py:$r --workdir runs/ladder/$r \
            --config.data.dir=runs/ladder/data
    done
    python -m cxr_rf.scaling --runs runs/ladder/d? --predict d8 \
        --out runs/ladder/scaling.png --json runs/ladder/scaling.json

Hyperparameters that change with the rung: steps (compute matching), learning rate ∝ 1/width
(1e-3 at width 256; a standard-parametrisation heuristic, not tuned per rung), warmup 5% of
the steps, EMA horizon 5% of the steps, validation every ~1/15 of the run (~15 points).
"""
from __future__ import annotations

import re

from cxr_rf import config, errors
from cxr_rf.model import mmdit

RUNGS = ("d2", "d3", "d4", "d5", "d6")   # the trained ladder, smallest first
NEXT = "d8"                              # the rung the fit predicts
TOKENS_PER_PARAM = 64                    # training image tokens per parameter, every rung
RESOLUTION = 64
PATCH = 4
BATCH = 256
STEP_ROUND = 100                         # steps are rounded to a multiple of this
EVAL_POINTS = 15                         # validation points per run (about)


def depth_of(rung: str | None) -> int:
    """The depth of a rung name ``d<depth>`` (None or "" = the smallest rung)."""
    name = (rung or RUNGS[0]).strip()
    m = re.fullmatch(r"d(\d+)", name)
    if not m or not 2 <= int(m.group(1)) <= 38:
        raise errors.UserError(f"ladder rung must be d<depth> with depth 2..38 (planned: "
                         f"{', '.join(RUNGS)}, next {NEXT}); got {rung!r}")
    return int(m.group(1))


def tokens_per_image(resolution: int = RESOLUTION, patch: int = PATCH) -> int:
    """Image tokens per training example."""
    return (resolution // patch) ** 2


def steps_for(params: int) -> int:
    """Training steps giving TOKENS_PER_PARAM image tokens per parameter at BATCH, rounded."""
    exact = TOKENS_PER_PARAM * params / (BATCH * tokens_per_image())
    return max(STEP_ROUND, STEP_ROUND * round(exact / STEP_ROUND))


def get_config(arg: str | None = None):
    """The config of rung ``arg`` ("d2" … "d6", "d8"; default the smallest)."""
    depth = depth_of(arg)
    c = config.base()
    c.data.update(source="phantom", num=200_000, resolution=RESOLUTION, shards=32, worker_count=8,
                  prefetch=4)
    c.model.update(patch=PATCH, dtype="bfloat16", **config.sd3_size(depth))
    params = mmdit.param_count(mmdit.ModelConfig.from_config(c))
    steps = steps_for(params)
    eval_every = max(10, 10 * round(steps / EVAL_POINTS / 10))
    c.optim.update(lr=1e-3 * 256 / c.model.width, warmup_steps=steps // 20,
                   ema_decay=1.0 - 20.0 / steps)
    c.train.update(steps=steps, batch_size=BATCH, log_every=50, eval_every=eval_every,
                   eval_batches=4, ckpt_every=5 * eval_every, sample_every=steps // 2)
    return c
