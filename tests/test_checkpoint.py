"""Checkpoint fingerprints: corrupted contents are unreadable, never restored silently.

Orbax decodes a checkpoint whose array bytes were altered (bit rot, a bad copy between
buckets) without complaint; the fingerprints saved with it are what catch that. The bit flips
here go into the middle of the largest data file of the state, i.e. into array data.
"""
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny
from cxr_rf import checkpoint, config, sample
from cxr_rf import trainer as trainer_lib


# --- the fingerprint itself ------------------------------------------------------------------

def _tree():
    rng = np.random.default_rng(0)
    return {
        "f32": jnp.asarray(rng.standard_normal((7, 5)), jnp.float32),
        "bf16": jnp.asarray(rng.standard_normal((3, 4, 2)), jnp.bfloat16),
        "i32": jnp.asarray(rng.integers(-9, 9, (6,)), jnp.int32),
        "i8": jnp.asarray(rng.integers(-9, 9, (5,)), jnp.int8),
        "bool": jnp.asarray(rng.integers(0, 2, (4,)), bool),
        "key": jax.random.PRNGKey(3),
        "typed_key": jax.random.key(4),
        "scalar": jnp.zeros((), jnp.int32),
    }


def _flip(x, index, bit):
    """``x`` with one bit of one element flipped (on the host, through its raw bytes)."""
    typed = jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    raw = np.array(jax.random.key_data(x) if typed else x)
    flat = raw.reshape(-1).view(np.uint8)
    byte = index * raw.dtype.itemsize + bit // 8
    flat[byte] ^= np.uint8(1 << (bit % 8))
    return jax.random.wrap_key_data(raw) if typed else jnp.asarray(raw)


def test_any_single_flipped_bit_changes_that_arrays_fingerprint_only():
    tree = _tree()
    base = checkpoint.fingerprints(tree)
    assert set(base) == set(tree) and all(len(v) == 16 for v in base.values())
    assert checkpoint.fingerprints(tree) == base                     # deterministic
    for name, x in tree.items():
        words = np.asarray(jax.random.key_data(x) if name == "typed_key" else x)
        bits = 1 if x.dtype == bool else 8 * words.dtype.itemsize
        for index in {0, words.size // 2, words.size - 1}:
            for bit in range(bits):
                changed = checkpoint.fingerprints({**tree, name: _flip(x, index, bit)})
                assert changed[name] != base[name], (name, index, bit)
                assert {k: v for k, v in changed.items() if k != name} == \
                    {k: v for k, v in base.items() if k != name}
    # Position matters: the same values in another order are another array.
    f = tree["f32"]
    swapped = f.at[0, 0].set(f[0, 1]).at[0, 1].set(f[0, 0])
    assert checkpoint.fingerprints({"f32": swapped})["f32"] != base["f32"]
    assert checkpoint.fingerprints({"f32": f.T})["f32"] != base["f32"]


def _fmix(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _block_sum(words, start, stop, key):
    """One device's share under a row split: the terms of rows [start, stop), each with its
    *global* position, summed mod 2**32."""
    row = int(np.prod(words.shape[1:]))
    pos = np.arange(start * row, stop * row, dtype=np.uint64)
    u = words[start:stop].reshape(-1) ^ (pos * checkpoint._G % 2**32).astype(np.uint32)
    return np.sum(_fmix(u ^ np.uint32(key)), dtype=np.uint32)


def test_fingerprint_is_a_sum_of_per_element_terms_so_any_split_gives_the_same_words():
    """The sharding-independence argument, checked against the device computation: the words
    are sums mod 2**32 of terms that depend only on an element's bits and global position, so
    summing per-shard partial sums (any split, any order) gives the same words. The real
    8 -> 4 -> 1 device restore (tests/scale_worker.py reshard) verifies them on other layouts."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal((12, 10)), jnp.float32)
    want = checkpoint.fingerprints({"x": x})["x"]
    words = np.asarray(x).view(np.uint32)
    with np.errstate(over="ignore"):
        for cuts in ([0, 12], [0, 6, 12], [0, 3, 6, 9, 12], [0, 1, 5, 12]):
            parts = [[_block_sum(words, a, b, key) for a, b in zip(cuts, cuts[1:])]
                     for key in (0, checkpoint._K)]
            got = "".join(f"{int(np.sum(p[::-1], dtype=np.uint32)):08x}" for p in parts)
            assert got == want, cuts
    # And on a (one-device) mesh with a NamedSharding: the same words as unsharded.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("a", "b"))
    spec = jax.sharding.PartitionSpec("a", "b")
    placed = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    assert checkpoint.fingerprints({"x": placed})["x"] == want


# --- a corrupted run checkpoint ----------------------------------------------------------------

def _largest_state_file(workdir, step):
    root = os.path.join(workdir, "checkpoints", str(step), "state")
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    return max(files, key=os.path.getsize)


def _flip_middle_byte(path):
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) // 2)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0x10]))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _moved(state, seed):
    """``state`` with every float array off its init (Adam moments included), per ``seed``."""
    rng = np.random.default_rng(seed)
    move = lambda x: (jax.device_put(np.asarray(x) + rng.standard_normal(x.shape).astype(
        x.dtype), x.sharding) if jnp.issubdtype(x.dtype, jnp.floating) else x)
    return jax.tree.map(move, state)


@pytest.fixture(scope="module")
def _saved_once(tmp_path_factory, phantom_data):
    c = tiny.load(16)
    c.data.dir = phantom_data(16)
    wd = tmp_path_factory.mktemp("ckpt") / "run"
    wd.mkdir()
    (wd / "config.json").write_text(c.to_json_best_effort(indent=2))
    state = trainer_lib.Trainer(c).init_state()
    mngr = checkpoint.manager(wd / "checkpoints", async_save=False)
    it = iter(trainer_lib.make_loader(c, c.data.dir, "train", train=True))
    saved = {}
    for step in (1, 2):
        next(it)
        state = _moved(state, step)
        assert checkpoint.save(mngr, step, state, it)
        saved[step] = _leaves(state)
    mngr.close()
    return c, wd, checkpoint.abstract(state), saved


@pytest.fixture
def saved_run(_saved_once, tmp_path):
    """A tiny run directory (a fresh copy per test) with checkpoints at steps 1 and 2: state,
    iterator and their fingerprints, saved by ``checkpoint.save`` as training does but
    without compiling a step. (config, workdir, abstract state, {step: saved leaves})."""
    c, wd, abstract, saved = _saved_once
    shutil.copytree(wd, tmp_path / "run")
    return c, tmp_path / "run", abstract, saved


def test_bit_flipped_checkpoint_is_refused_by_sample_and_skipped_loudly_on_resume(
        saved_run, caplog):
    c, wd, abstract, saved = saved_run
    ckpts = str(wd / "checkpoints")
    _flip_middle_byte(_largest_state_file(wd, 2))

    # The bug this guards against: Orbax alone restores the flipped checkpoint without a word,
    # with different values (so the flip landed in array data, not in metadata).
    raw = ocp.CheckpointManager(ckpts, item_names=checkpoint.ITEMS,
                                options=ocp.CheckpointManagerOptions(create=False))
    silently = raw.restore(2, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
    raw.close()
    assert sum(int((a != b).sum()) for a, b in zip(saved[2], _leaves(silently))) >= 1

    # sample reads only the EMA arrays (checkpoint.restore_field): it refuses the checkpoint,
    # in one line naming the step and the array, when the flip hit the EMA, and otherwise
    # restores the saved EMA exactly.
    ema = [i for i, (p, _) in enumerate(jax.tree_util.tree_flatten_with_path(silently)[0])
           if "ema_params" in jax.tree_util.keystr(p)]
    hit_ema = any((saved[2][i] != _leaves(silently)[i]).any() for i in ema)
    if hit_ema:
        with pytest.raises(checkpoint.RestoreError,
                           match=r"^step 2 in \S+: array \S+ does not match its fingerprint"):
            sample.load(wd)
    else:
        params = sample.load(wd)[2]
        for i, leaf in zip(ema, jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(saved[2][i], np.asarray(leaf))

    # A resumed run (train.run's restore) takes the loud fallback to step 1 and sets 2 aside.
    stages = trainer_lib.Stages(c, config.stages(c), c.data.dir)
    stages.enter(0)
    mngr = checkpoint.manager(ckpts)
    with caplog.at_level(logging.WARNING):
        start, state = trainer_lib.restore_or_start(c, mngr, abstract,
                                                    iter_for_step=stages.iterator_for)
    mngr.close()
    stages.close()
    warned = [r.getMessage() for r in caplog.records if "UNREADABLE" in r.getMessage()]
    assert warned and "STEP 2" in warned[0] and "falling back to step 1" in warned[0], warned
    assert "does not match its fingerprint" in warned[0]
    assert start == 1 and (wd / "checkpoints" / "2.unreadable").exists()
    for a, b in zip(saved[1], _leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    # An EMA array that does not match its saved fingerprint is refused, always.
    prints_file = wd / "checkpoints" / "1" / checkpoint.FINGERPRINT / "metadata"
    prints = json.loads(prints_file.read_text())
    name = next(k for k in prints["arrays"] if k.startswith("ema_params/"))
    prints["arrays"][name] = "0" * 16
    prints_file.write_text(json.dumps(prints))
    with pytest.raises(checkpoint.RestoreError,
                       match=rf"^step 1 in \S+: array {name} does not match its fingerprint") as e:
        sample.load(wd, step=1)
    assert "\n" not in str(e.value)


def test_altered_iterator_position_is_unreadable_and_old_checkpoints_restore_unverified(
        saved_run, caplog):
    c, wd, abstract, saved = saved_run
    ckpts = str(wd / "checkpoints")
    # A checkpoint whose saved data position was altered would resume on other batches.
    it_file = wd / "checkpoints" / "2" / "data" / "process_0-of-1.json"
    assert '"next_index": 2' in it_file.read_text()
    it_file.write_text(it_file.read_text().replace('"next_index": 2', '"next_index": 3'))
    mngr = checkpoint.manager(ckpts)
    it = iter(trainer_lib.make_loader(c, c.data.dir, "train", train=True))
    with pytest.raises(checkpoint.RestoreError,     # so restore_latest falls back, as above
                       match="step 2 .*: data iterator state of process 0 does not match"):
        checkpoint.restore(mngr, abstract, it, 2)
    mngr.close()

    # A checkpoint from before fingerprints (no such item) restores, with a one-line warning.
    shutil.rmtree(wd / "checkpoints" / "1" / checkpoint.FINGERPRINT)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        step, state = checkpoint.restore_params(ckpts, abstract, 1)
    assert step == 1
    for a, b in zip(saved[1], _leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [r.getMessage() for r in caplog.records if "no fingerprints" in r.getMessage()]
