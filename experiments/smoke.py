"""CPU smoke run: converts 512 phantom radiographs (64²) and trains a tiny MMDiT for a few
minutes on 2 CPU cores, then writes a labelled sample grid. The main job of the README:

    python -m cxr_rf.train --config experiments/smoke.py --workdir runs/smoke
    python -m cxr_rf.sample --workdir runs/smoke --num 8 --findings Cardiomegaly --sex F --age 70 --view PA --out runs/smoke/samples/cli
"""
from cxr_rf import config


def get_config(arg=None):
    del arg
    c = config.base()
    c.data.num = 512
    c.data.resolution = 64
    c.model.update(patch=4, width=96, depth=3, heads=3)
    c.train.update(steps=400, batch_size=32, log_every=20, eval_every=100, ckpt_every=100,
                   sample_every=200)
    c.optim.update(lr=1.5e-3, warmup_steps=40)
    c.sample.steps = 20
    return c
