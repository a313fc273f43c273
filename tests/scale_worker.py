"""Multi-device checks that need their own process (forced CPU device count set before jax).

    python tests/scale_worker.py MODE [ARGS...]

Modes (each prints one JSON line on success and exits non-zero with the reason otherwise):
    sharded            8 devices: (data=2, fsdp=2, tensor=2) steps == 1-device steps; every
                       parameter (and its EMA / Adam moments) placed as the RULES say.
    reshard DATA WD    8 devices: save on 8, restore on 8, 4 and 1: bitwise the same values.
    reference DATA OUT 4 devices, one process, fed the batches two processes would read:
                       the reference for the 2-process x 2-device run.
"""
import os
import sys

if __name__ == "__main__":
    _DEVICES = {"sharded": 8, "reshard": 8, "reference": 4}[sys.argv[1]]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={_DEVICES}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402


def tiny_config(steps=4):
    """tests/scale_config.py (width 32, depth 2, 16² images, batch 8) with ``steps``."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "scale_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "scale_config.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.train.steps = steps
    return c


def _batches(cfg, n):
    from cxr_rf import conditioning
    rng = np.random.default_rng(0)
    b, r = cfg.train.batch_size, cfg.data.resolution
    tokens = np.tile(conditioning.null_tokens(cfg.data.report_len), (b, 1))
    return [{"image": rng.uniform(-1, 1, (b, r, r, 1)).astype(np.float32), "tokens": tokens}
            for _ in range(n)]


def _steps(trainer, batches):
    state = trainer.init_state()
    losses = []
    for batch in batches:
        state, m = trainer.train_step(state, batch)
        losses.append(float(m["loss"]))
    return state, losses


def _expected_spec(names):
    """The mesh spec the RULES table gives for logical ``names``, derived independently."""
    from cxr_rf.sharding import RULES
    table = dict(RULES)
    out = []
    for n in names:
        out.append(table[n] if n is not None else None)
    while out and out[-1] is None:
        out.pop()
    return jax.sharding.PartitionSpec(*out)


def sharded():
    from cxr_rf import train
    from cxr_rf.model import abstract_params
    cfg = tiny_config()
    cfg.mesh.update(data=2, fsdp=2, tensor=2)
    big = train.Trainer(cfg)
    one_cfg = tiny_config()
    one_cfg.mesh.update(data=1, fsdp=1, tensor=1)
    one = train.Trainer(one_cfg, devices=jax.devices()[:1])
    batches = _batches(cfg, 3)
    s8, l8 = _steps(big, batches)
    s1, l1 = _steps(one, batches)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6)

    # Placement: every parameter where its logical names say, and EMA / Adam moments alike.
    boxed = abstract_params(big.model, cfg.data.resolution)
    names = jax.tree.leaves(nn.get_partition_spec(boxed),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(s8.params)]
    checked = 0
    for path, spec, p, e in zip(paths, names, jax.tree.leaves(s8.params),
                                jax.tree.leaves(s8.ema_params), strict=True):
        want = _expected_spec(tuple(spec))
        got = p.sharding.spec
        while got and got[-1] is None:
            got = jax.sharding.PartitionSpec(*tuple(got)[:-1])
        assert got == want, f"{path}: {got} != {want} (logical {spec})"
        assert e.sharding.spec == p.sharding.spec, path
        shard = p.addressable_shards[0].data.shape
        split = [p.shape[i] // shard[i] for i in range(p.ndim)]
        assert np.prod(split) == np.prod([big.mesh.shape[a] for a in jax.tree.leaves(tuple(want))
                                          if a]), (path, split)
        checked += 1
    fc1 = s8.params["last_block"]["x_mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec[:2] == ("fsdp", "tensor"), fc1.sharding.spec
    mu = s8.opt_state[1][0].mu            # chain(clip, adamw) -> adamw's ScaleByAdamState
    for a, b in zip(jax.tree.leaves(mu), jax.tree.leaves(s8.params)):
        assert a.sharding.spec == b.sharding.spec
    # Gradient accumulation on the mesh: 2 microbatches == the whole batch.
    acc_cfg = tiny_config()
    acc_cfg.mesh.update(data=2, fsdp=2, tensor=2)
    acc_cfg.train.microbatches = 2
    sa, la = _steps(train.Trainer(acc_cfg), batches[:1])
    np.testing.assert_allclose(la, l8[:1], rtol=1e-5)
    # Activations follow the batch over fsdp too: an all-fsdp mesh compiles to the per-device
    # FLOPs and temporaries of an all-data mesh (with no activation constraints GSPMD
    # replicated them over fsdp: 1.75x the FLOPs and 4.6x the temporaries at this size).
    costs = {axis: _step_cost(axis) for axis in ("data", "fsdp")}
    assert abs(costs["fsdp"][0] / costs["data"][0] - 1) < 0.1, costs
    assert costs["fsdp"][1] < 1.3 * costs["data"][1], costs
    print(json.dumps({"ok": True, "params_checked": checked, "loss_8": l8, "loss_1": l1,
                      "costs": costs}))


def _step_cost(axis: str) -> tuple[float, float]:
    """(FLOPs, temporary bytes) per device of the compiled train step with all 8 devices on
    ``axis``, at a width and batch where activations dominate."""
    from cxr_rf import conditioning, sharding, train
    cfg = tiny_config()
    cfg.mesh.update(data=1, fsdp=1, tensor=1, max_replicated=1.0)
    cfg.mesh[axis] = 8
    cfg.model.update(width=64, heads=2)
    cfg.data.resolution = 32
    cfg.train.batch_size = 64
    trainer = train.Trainer(cfg)
    b, r = cfg.train.batch_size, cfg.data.resolution
    with sharding.use(trainer.mesh):
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             jax.eval_shape(trainer.init_state), trainer.state_sharding)
        batch = {"image": jax.ShapeDtypeStruct((b, r, r, 1), np.float32,
                                               sharding=trainer.batch_sharding),
                 "tokens": jax.ShapeDtypeStruct((b, conditioning.num_tokens(0)), np.int32,
                                                sharding=trainer.batch_sharding)}
        compiled = trainer.jitted_step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]), float(compiled.memory_analysis().temp_size_in_bytes)


def reshard(data_dir, workdir):
    """Save on 8 devices (2, 2, 2); restore state + data iterator on 4 (1, 2, 2) and on 1:
    the restored values are bitwise the saved ones, laid out on the new mesh."""
    from cxr_rf import checkpoint, train
    cfg = tiny_config(steps=2)
    cfg.data.dir = data_dir
    cfg.mesh.update(data=2, fsdp=2, tensor=2)
    train.run(cfg, workdir)
    mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
    saved = None
    for n, mesh in ((8, dict(data=2, fsdp=2, tensor=2)), (4, dict(data=1, fsdp=2, tensor=2)),
                    (1, dict(data=1, fsdp=1, tensor=1))):
        c = tiny_config(steps=2)
        c.data.dir = data_dir
        c.mesh.update(**mesh)
        trainer = train.Trainer(c, devices=jax.devices()[:n])
        abstract = jax.eval_shape(trainer.init_state)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, trainer.state_sharding)
        data_iter = iter(train.make_loader(c, data_dir, "train", train=True))
        step, state = checkpoint.restore_latest(mngr, abstract, data_iter)
        assert step == 2, step
        leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
        assert all(len(x.sharding.device_set) == n for x in jax.tree.leaves(state))
        fc1 = state.params["last_block"]["x_mlp"]["fc1"]["kernel"]
        if n == 4:
            assert fc1.sharding.spec[:2] == ("fsdp", "tensor"), fc1.sharding.spec
        batch = next(data_iter)["image"]
        if saved is None:
            saved = (leaves, batch)
        for a, b in zip(leaves, saved[0], strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(batch, saved[1])   # the iterator resumed at the same place
    mngr.close()
    print(json.dumps({"ok": True}))


def reference(data_dir, out):
    """Two processes' loaders concatenated in process order == the 2-process global batch."""
    from cxr_rf import train
    from cxr_rf.data import pipeline
    cfg = tiny_config(steps=4)
    cfg.data.dir = data_dir
    cfg.mesh.update(data=2, fsdp=2, tensor=1)
    trainer = train.Trainer(cfg)
    d = cfg.data
    its = [iter(pipeline.make_loader(
        data_dir, "train", global_batch=cfg.train.batch_size, seed=cfg.seed,
        resolution=d.resolution, report_len=d.report_len, cond_dropout=dict(d.cond_dropout),
        worker_count=0, prefetch=d.prefetch, shuffle=True, process_index=i, process_count=2))
        for i in range(2)]
    state = trainer.init_state()
    losses = []
    for _ in range(cfg.train.steps):
        parts = [next(it) for it in its]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in ("image", "tokens")}
        state, m = trainer.train_step(state, batch)
        losses.append(float(m["loss"]))
    np.savez(out, *[np.asarray(x) for x in jax.tree.leaves(state.params)])
    print(json.dumps({"ok": True, "losses": losses}))


if __name__ == "__main__":
    {"sharded": sharded, "reshard": reshard, "reference": reference}[sys.argv[1]](*sys.argv[2:])
