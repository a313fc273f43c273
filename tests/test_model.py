"""MMDiT: zero init, conditioning paths, scan == loop, remat == none, analytic counts."""
from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import inspect
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_rf import conditioning
from cxr_rf.model import (MMDiT, ModelConfig, abstract_params, approx_param_count, build_model,
                          flops_per_image, init_params, param_count)
from cxr_rf.model import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 16
# depth 3 -> two scanned blocks + the context_pre_only block; report bytes exercise the
# attention-only context path.
TINY = ModelConfig(patch=4, width=32, depth=3, heads=2, report_len=4)


@functools.lru_cache(maxsize=None)
def _apply(mcfg: ModelConfig):
    return jax.jit(MMDiT(mcfg).apply)


@functools.lru_cache(maxsize=None)
def _init(mcfg: ModelConfig):
    """Unboxed params at init, plus a perturbed copy with every leaf nonzero-random."""
    params = nn.meta.unbox(jax.jit(lambda r: init_params(MMDiT(mcfg), r, RES))(jax.random.key(0)))
    rng = np.random.default_rng(1)
    # Zero-init modulation/final layers would hide t and context; perturb everything. (numpy
    # noise: an eager jax.random call per leaf shape would compile dozens of tiny programs.)
    noisy = jax.tree.map(lambda a: jnp.asarray(
        np.asarray(a, np.float32) + 0.1 * rng.standard_normal(a.shape), a.dtype), params)
    return params, noisy


def _inputs(mcfg: ModelConfig, res: int | tuple[int, int] = RES, batch: int = 4):
    """Fixed inputs; one batch size everywhere so jitted applies are shared between tests."""
    h, w = (res, res) if isinstance(res, int) else res
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (batch, h, w, mcfg.in_channels)), jnp.float32)
    t = jnp.linspace(0.2, 0.8, batch).astype(jnp.float32)
    row = conditioning.Conditions.parse("Cardiomegaly", sex="F", age=70, view="PA",
                                        report="cardiomegaly").tokens(mcfg.report_len)
    tok = jnp.asarray(np.stack([row] * batch), jnp.int32)
    return x, t, tok


def _trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def test_zero_at_init_then_depends_on_t_and_tokens():
    params, noisy = _init(TINY)
    x, t, tok = _inputs(TINY)
    out = _apply(TINY)({"params": params}, x, t, tok)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert float(jnp.abs(out).max()) == 0.0  # zero-init final projection

    # rows: reference, other t, other structured token (pooled + attention), other report byte
    # (attention only: report bytes are not pooled, so this checks the joint attention path).
    x = jnp.broadcast_to(x[:1], x.shape)
    t = jnp.asarray([0.3, 0.7, 0.3, 0.3], jnp.float32)
    sex = conditioning.group_slices(TINY.report_len)["sex"].start
    tok = np.array(tok)
    tok[2, sex] += 1
    tok[3, conditioning.NUM_STRUCTURED] += 1
    out = np.asarray(_apply(TINY)({"params": noisy}, x, t, jnp.asarray(tok)))
    assert np.abs(out[0]).max() > 0
    for i in (1, 2, 3):
        assert np.abs(out[i] - out[0]).max() > 1e-4, f"row {i} did not change the output"


def test_context_pre_only_last_block_has_no_context_outputs():
    params, _ = _init(TINY)
    last = params["last_block"]
    assert not {"ctx_q", "ctx_out", "ctx_mlp"} & set(last)
    assert {"ctx_k", "ctx_v", "x_q", "x_out", "x_mlp"} <= set(last)
    assert last["ctx_mod"]["proj"]["kernel"].shape == (TINY.width, 2 * TINY.width)
    assert params["blocks"]["ctx_mod"]["proj"]["kernel"].shape == (
        TINY.depth - 1, TINY.width, 6 * TINY.width)


def test_scanned_equals_unrolled():
    _, noisy = _init(TINY)
    loop = dataclasses.replace(TINY, scan=False)
    unrolled = {k: v for k, v in noisy.items() if k != "blocks"}
    for i in range(TINY.depth - 1):
        unrolled[f"blocks_{i}"] = jax.tree.map(lambda a: a[i], noisy["blocks"])
    # Same tree as the loop model's own init.
    shapes = jax.tree.map(lambda a: a.shape, nn.meta.unbox(abstract_params(MMDiT(loop), RES)))
    assert jax.tree.map(lambda a: a.shape, unrolled) == shapes
    x, t, tok = _inputs(TINY)
    np.testing.assert_allclose(_apply(loop)({"params": unrolled}, x, t, tok),
                               _apply(TINY)({"params": noisy}, x, t, tok), rtol=1e-5, atol=1e-5)


def test_scan_unroll_keeps_the_parameters_and_the_function():
    """``scan_unroll`` (all blocks in one trip of the scan) changes the program, not the model:
    the same scanned parameter tree, the same outputs and the same gradients."""
    _, noisy = _init(TINY)
    one_trip = dataclasses.replace(TINY, scan_unroll=TINY.depth - 1)
    shapes = lambda m: jax.tree.map(lambda a: a.shape, nn.meta.unbox(abstract_params(MMDiT(m),
                                                                                     RES)))
    assert shapes(one_trip) == shapes(TINY)
    x, t, tok = _inputs(TINY)

    def value_and_grad(mcfg):
        loss = lambda p: jnp.mean(MMDiT(mcfg).apply({"params": p}, x, t, tok) ** 2)
        return jax.jit(jax.value_and_grad(loss))(noisy)

    (l1, g1), (l2, g2) = value_and_grad(TINY), value_and_grad(one_trip)
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g2, g1)
    assert float(jnp.abs(g1["blocks"]["x_q"]["kernel"]).max()) > 1e-3   # gradients do flow


def test_each_row_of_a_batch_is_computed_alone():
    """Row i of a batched forward pass equals row i run alone: nothing (pooling, norms,
    attention) mixes examples. Every row has its own image, t, structured tokens and report,
    so conditioning pooled over the batch, or a norm over it, changes some row."""
    _, noisy = _init(TINY)
    x, _, _ = _inputs(TINY)
    t = jnp.asarray([0.9, 0.15, 0.6, 0.35], jnp.float32)
    conds = [conditioning.Conditions.parse(f, sex=s, age=a, view=v) for f, s, a, v in (
        ("Cardiomegaly", "F", 70, "PA"), ("", "M", 30, "AP"),
        ("Pneumothorax=uncertain,Fracture", "M", 25, "PA"), ("Pleural Effusion", "F", 85, "AP"))]
    tok = jnp.asarray(np.stack([dataclasses.replace(c, report=r).tokens(TINY.report_len)
                                for c, r in zip(conds, ("enlarged heart", "normal", "", "fluid"))]),
                      jnp.int32)
    apply = _apply(TINY)
    full = np.asarray(apply({"params": noisy}, x, t, tok))
    for i in range(len(conds)):
        alone = np.asarray(apply({"params": noisy}, x[i:i + 1], t[i:i + 1], tok[i:i + 1]))
        np.testing.assert_allclose(full[i], alone[0], rtol=1e-5, atol=1e-5, err_msg=f"row {i}")
    # Reordering the batch reorders the outputs (same shape, so also the same program).
    rev = np.asarray(apply({"params": noisy}, x[::-1], t[::-1], tok[::-1]))
    np.testing.assert_allclose(rev[::-1], full, rtol=1e-5, atol=1e-5)
    # The rows are far apart compared with the tolerance, so equality above means something.
    assert min(np.abs(full[i] - full[j]).max() for i in range(4) for j in range(i)) > 0.1


@pytest.mark.parametrize("depth,policies", [
    # depth 2: the scanned block (production path, prevent_cse=False) + the last block.
    (2, ("full",)),
    # depth 1: only the (unscanned) context_pre_only block; every policy, at a third of the
    # compile cost of a scanned model (CPU compile time dominates this file).
    (1, ("full", "dots", "dots_no_batch", "save_attn")),
])
def test_remat_policies_match_no_remat(depth, policies):
    mcfg = dataclasses.replace(TINY, depth=depth)
    rng = np.random.default_rng(2)
    noisy = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype),
                         nn.meta.unbox(abstract_params(MMDiT(mcfg), RES)))
    x, t, tok = _inputs(mcfg, batch=1)

    def loss_and_grad(policy):
        model = MMDiT(dataclasses.replace(mcfg, remat=policy))
        loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, tok) ** 2)
        return jax.jit(jax.value_and_grad(loss))(noisy)

    def has_checkpoint(policy):  # remat really wraps the blocks (cheap: tracing only)
        model = MMDiT(dataclasses.replace(mcfg, remat=policy))
        jaxpr = str(jax.make_jaxpr(model.apply)({"params": noisy}, x, t, tok))
        return re.search(r"\b(remat\d*|checkpoint)\[", jaxpr) is not None

    assert not has_checkpoint("none") and has_checkpoint(policies[-1])
    ref_loss, ref_grad = loss_and_grad("none")
    assert float(ref_loss) > 0
    for policy in policies:
        loss, grad = loss_and_grad(policy)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        _trees_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_runs_at_other_and_rectangular_resolution(pos_embed):
    mcfg = dataclasses.replace(TINY, pos_embed=pos_embed)
    # No parameter depends on the position scheme or the resolution: one tree serves all.
    assert (jax.tree.map(lambda a: a.shape, abstract_params(MMDiT(mcfg), 8))
            == jax.tree.map(lambda a: a.shape, abstract_params(MMDiT(TINY), 32)))
    _, noisy = _init(TINY)
    x, t, tok = _inputs(mcfg, res=(8, 24))  # initialised at 16x16, run at 8x24
    out = _apply(mcfg)({"params": noisy}, x, t, tok)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.abs(out).max()) > 0


def test_bf16_compute_close_to_f32():
    _, noisy = _init(TINY)
    bf16 = dataclasses.replace(TINY, dtype="bfloat16")
    x, t, tok = _inputs(TINY)
    ref = _apply(TINY)({"params": noisy}, x, t, tok)
    out = _apply(bf16)({"params": noisy}, x, t, tok)
    assert out.dtype == jnp.float32
    err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert err < 0.05, err


def test_bf16_head_outputs_float32_values():
    """The final modulation and projection run in float32 under bf16 compute: the outputs
    are not bf16 values cast up (which would leave a 16-bit PNG ~8 bits)."""
    _, noisy = _init(TINY)
    out = np.asarray(_apply(dataclasses.replace(TINY, dtype="bfloat16"))(
        {"params": noisy}, *_inputs(TINY)))
    assert out.dtype == np.float32
    as_bf16 = np.asarray(jnp.asarray(out).astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(out != as_bf16) > 0.9


def test_report_padding_is_masked():
    """A short report's padding gets zero attention: changing what the padding positions
    carry (their learned positions) leaves every output bit unchanged, while changing a
    position that holds a report byte moves the output."""
    _, noisy = _init(TINY)
    x, t, _ = _inputs(TINY)
    row = conditioning.Conditions.parse("Cardiomegaly", sex="F", age=70, view="PA",
                                        report="ab").tokens(TINY.report_len)
    tok = jnp.asarray(np.stack([row] * x.shape[0]), jnp.int32)
    ref = np.asarray(_apply(TINY)({"params": noisy}, x, t, tok))
    pad_rows = conditioning.NUM_STRUCTURED + np.arange(2, TINY.report_len)   # after "ab"
    byte_row = conditioning.NUM_STRUCTURED + 1                               # "b"

    def moved(rows):
        pos = np.asarray(noisy["ctx_pos"]).copy()
        # A random direction (a constant shift would be normalised away by LayerNorm).
        pos[rows] += 3.0 * np.random.default_rng(2).standard_normal(pos[rows].shape)
        return np.asarray(_apply(TINY)({"params": {**noisy, "ctx_pos": jnp.asarray(pos)}},
                                       x, t, tok))

    np.testing.assert_array_equal(moved(pad_rows), ref)
    assert np.abs(moved([byte_row]) - ref).max() > 1e-3


def test_age_enters_continuously():
    """Known ages embed through Fourier features: 0.1 year changes the output far less than
    30 years, and a known age differs from a record's 'unknown' and from the null."""
    _, noisy = _init(TINY)
    x, t, _ = _inputs(TINY)

    def out(age):
        row = conditioning.Conditions.parse("Cardiomegaly", sex="F", age=age,
                                            view="PA").tokens(TINY.report_len)
        tok = jnp.asarray(np.stack([row] * x.shape[0]), jnp.int32)
        return np.asarray(_apply(TINY)({"params": noisy}, x, t, tok))

    base = out(70.0)
    near, far = np.abs(out(70.1) - base).mean(), np.abs(out(40.0) - base).mean()
    assert far > 1e-3 and near < 0.2 * far, (near, far)
    assert np.abs(out("unknown") - base).mean() > 1e-3 and np.abs(out(None) - base).mean() > 1e-3


CONFIGS = [
    TINY,
    dataclasses.replace(TINY, scan=False),
    dataclasses.replace(TINY, qk_norm=False, report_len=0),
    dataclasses.replace(TINY, pos_embed="rope", report_len=16, remat="dots"),
    dataclasses.replace(TINY, depth=1),
    ModelConfig(patch=2, width=48, depth=4, heads=3, mlp_ratio=2.5, in_channels=3,
                param_dtype="bfloat16"),
]


def _leaf_count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.meta.unbox(tree)))


@pytest.mark.parametrize("mcfg", CONFIGS, ids=lambda c: f"{c.pos_embed}-d{c.depth}-s{c.scan}"
                         f"-qk{c.qk_norm}-r{c.report_len}")
def test_param_count_formula_and_logical_names(mcfg):
    boxed = abstract_params(MMDiT(mcfg), RES)
    assert _leaf_count(boxed) == param_count(mcfg)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == leaf.value.ndim and all(leaf.names), leaf.names
        assert leaf.value.dtype == jnp.dtype(mcfg.param_dtype)
    if mcfg.scan and mcfg.depth > 1:
        spec = nn.get_partition_spec(boxed)["blocks"]["x_q"]["kernel"]
        assert tuple(spec) == ("layers", "embed", "heads", "kv")


def _experiment_configs():
    paths = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))
    return [p for p in paths if not os.path.basename(p).startswith("_")]


@pytest.mark.skipif(not _experiment_configs(), reason="no experiments/*.py yet")
@pytest.mark.parametrize("path", _experiment_configs(), ids=os.path.basename)
def test_param_count_formula_matches_experiment(path):
    spec = importlib.util.spec_from_file_location(f"exp_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    required = [q for q in inspect.signature(module.get_config).parameters.values()
                if q.default is inspect.Parameter.empty]
    cfg = module.get_config(None) if required else module.get_config()
    mcfg = ModelConfig.from_config(cfg)
    model = build_model(cfg)
    assert model.cfg == mcfg
    assert _leaf_count(abstract_params(model, int(cfg.data.resolution))) == param_count(mcfg)
    assert flops_per_image(mcfg, int(cfg.data.resolution)) > 0
    if mcfg.width == 64 * mcfg.depth and mcfg.depth >= 12:     # SD3-sized: the 36·d·(64d)² rule
        assert abs(approx_param_count(mcfg) / param_count(mcfg) - 1) < 0.03


@pytest.mark.parametrize("name, low, high", [
    ("cxr_b", 0.25e9, 0.35e9), ("cxr_xl", 1.3e9, 1.5e9), ("cxr_3b", 2.9e9, 3.5e9),
    ("cxr_8b", 7.5e9, 8.5e9)])
def test_radit_class_experiments_have_their_named_size(name, low, high):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    mcfg = ModelConfig.from_config(cfg)
    assert low <= param_count(mcfg) <= high
    assert (mcfg.width, mcfg.heads) == (64 * mcfg.depth, mcfg.depth)    # SD3 size rule
    assert cfg.data.resolution == 512


@pytest.mark.parametrize("depth,bound", [(12, 0.03), (24, 0.015), (38, 0.01)])
def test_approx_param_count_is_sd3_rule(depth, bound):
    mcfg = ModelConfig(patch=2, width=64 * depth, depth=depth, heads=depth)
    assert approx_param_count(mcfg) == 36 * depth * (64 * depth) ** 2
    gap = abs(approx_param_count(mcfg) - param_count(mcfg)) / param_count(mcfg)
    assert gap < bound, gap
    if depth == 24:
        assert 2.0e9 < param_count(mcfg) < 2.1e9  # SD3: "depth 24 ≈ 2B"


def test_flops_formula_against_xla_cost_analysis():
    # Unrolled (XLA counts a while-loop body once); XLA also counts elementwise ops, which the
    # formula ignores, so the formula sits slightly below.
    for mcfg in (ModelConfig(patch=2, width=128, depth=3, heads=4, scan=False),
                 ModelConfig(patch=2, width=128, depth=3, heads=4, scan=False,
                             pos_embed="rope", report_len=8)):
        model, res = MMDiT(mcfg), 32
        x, t, tok = _inputs(mcfg, res=res, batch=1)
        lowered = jax.jit(model.apply).lower({"params": abstract_params(model, res)}, x, t, tok)
        xla = lowered.cost_analysis()["flops"]
        ratio = flops_per_image(mcfg, res) / xla
        assert 0.9 < ratio <= 1.0, ratio


def test_layers_patchify_roundtrip_and_rope_is_relative():
    x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
    tok = layers.patchify(x, 4)
    assert tok.shape == (2, 6, 48)
    np.testing.assert_array_equal(tok[0, 1], x[0, :4, 4:8].reshape(-1))
    np.testing.assert_array_equal(layers.unpatchify(tok, 8, 12, 4, 3), x)

    cos, sin = layers.rope_2d(4, 4, 8)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)

    def score(i, j):  # rotated q at grid index i against rotated k at index j
        qi = layers.apply_rope(q, cos[i:i + 1], sin[i:i + 1])
        kj = layers.apply_rope(k, cos[j:j + 1], sin[j:j + 1])
        return float(jnp.sum(qi * kj))
    # Same 2D offset (+1 row, +1 col) at two places -> same score; other offset differs.
    np.testing.assert_allclose(score(0, 5), score(10, 15), rtol=1e-5)
    assert abs(score(0, 5) - score(0, 6)) > 1e-4
    np.testing.assert_allclose(jnp.linalg.norm(layers.apply_rope(
        jnp.broadcast_to(q, (1, 16, 1, 8)), cos, sin), axis=-1), jnp.linalg.norm(q), rtol=1e-5)


@pytest.mark.parametrize("kw,match", [
    (dict(width=30, heads=4), "not divisible by heads"),
    (dict(pos_embed="learned"), "unknown pos_embed 'learned'; allowed: sincos, rope"),
    (dict(remat="some"), "unknown remat policy 'some'; allowed: none, full, dots"),
    (dict(dtype="float16"), "unknown dtype 'float16'; allowed: float32, bfloat16"),
    (dict(width=40, heads=4, pos_embed="rope"), "head_dim"),
    (dict(depth=0), "depth must be >= 1"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kw)


def test_bad_inputs_raise():
    model = MMDiT(TINY)
    with pytest.raises(ValueError, match="resolution 18 is not a positive multiple of patch 4"):
        abstract_params(model, 18)
    with pytest.raises(ValueError, match="tokens shape"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 1)), jnp.zeros(1),
                       jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="unknown remat policy"):
        layers.remat_policy("nope")
