"""Grain pipeline: batches, determinism, process sharding, CFG dropout, iterator checkpoints."""
import itertools
import sys

import numpy as np
import pytest

from cxr_rf import conditioning as cond
from cxr_rf import config
from cxr_rf import errors
from cxr_rf.data import imaging, pipeline, schema
from cxr_rf.data.schema import Record
from cxr_rf.data.writer import DatasetWriter

RES, N = 16, 24


def make_record(i: int) -> Record:
    """Record ``i`` has a constant image of value 2000*(i+1), so batches reveal their ids."""
    return Record(
        image=np.full((RES, RES), 2000 * (i + 1), np.uint16),
        findings=np.asarray([(i * 7 + k) % 4 for k in range(14)], np.int8),
        sex=cond.SEXES[i % 3], age=30.0 + i, race=cond.RACES[i % 5], view=cond.VIEWS[i % 4],
        source="phantom", site="a", patient_id=f"p{i}", study_id=f"s{i}", report=f"r{i}")


def ids(batch) -> list[int]:
    """Record ids of a batch, read back from the constant pixel values."""
    v = (batch["image"][:, 0, 0, 0].astype(np.float64) + 1.0) * 65535.0 / 2.0
    return [int(round(x / 2000.0)) - 1 for x in v]


def clean_tokens(i: int, report_len: int = 0) -> np.ndarray:
    """Record ``i``'s token row before any dropout."""
    r = make_record(i)
    return cond.encode(r.findings, r.sex, r.age, r.race, r.view, r.source, r.report, report_len)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "ds"
    with DatasetWriter(out, resolution=RES, num_shards=3) as w:
        for i in range(N):
            w.add("train", make_record(i))
    return str(out)


def loader(data_dir, **kw):
    args = dict(global_batch=4, seed=0, resolution=RES, process_index=0, process_count=1)
    args.update(kw)
    return pipeline.make_loader(data_dir, "train", **args)


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
               for x, y in zip(a, b, strict=True))


def test_no_tensorflow():
    assert "tensorflow" not in sys.modules


def test_batch_contents(data_dir):
    batches = list(loader(data_dir, num_epochs=1, report_len=8))
    assert len(batches) == N // 4
    b = batches[0]
    assert b["image"].shape == (4, RES, RES, 1) and b["image"].dtype == np.float32
    assert b["tokens"].shape == (4, cond.num_tokens(8)) and b["tokens"].dtype == np.int32
    assert b["findings"].shape == (4, 14) and b["findings"].dtype == np.int8
    for b in batches:
        assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
        for row, i in enumerate(ids(b)):
            r = make_record(i)
            assert np.array_equal(b["findings"][row], r.findings)
            assert np.array_equal(b["tokens"][row], clean_tokens(i, 8))
    assert sorted(itertools.chain(*map(ids, batches))) == list(range(N))


def test_resize_on_load(data_dir):
    b = next(iter(loader(data_dir, resolution=8)))
    assert b["image"].shape == (4, 8, 8, 1)


def test_deterministic_and_seeded(data_dir):
    a = take(iter(loader(data_dir, seed=3)), 8)
    b = take(iter(loader(data_dir, seed=3)), 8)
    c = take(iter(loader(data_dir, seed=4)), 8)
    assert same(a, b)
    assert [ids(x) for x in a] != [ids(x) for x in c]


def test_two_processes_cover_each_epoch(data_dir):
    per_proc = []
    for p in range(2):
        it = iter(loader(data_dir, process_index=p, process_count=2, num_epochs=2, seed=1))
        got = list(itertools.chain(*map(ids, it)))
        assert len(got) == N  # 2 epochs x 12 examples
        e1, e2 = got[:N // 2], got[N // 2:]
        assert sorted(e1) == sorted(e2) and len(set(e1)) == N // 2 and e1 != e2  # reshuffled
        per_proc.append(set(e1))
    assert per_proc[0].isdisjoint(per_proc[1]) and per_proc[0] | per_proc[1] == set(range(N))


def test_cond_dropout_rates(data_dir):
    probs = {"sex": 0.5, "view": 1.0, "findings": 0.0}
    batches = list(loader(data_dir, num_epochs=20, global_batch=8, cond_dropout=probs))
    tokens = np.concatenate([b["tokens"] for b in batches])
    clean = np.stack([clean_tokens(i) for i in itertools.chain(*map(ids, batches))])
    sl, nulls = cond.group_slices(), cond.null_tokens()
    sex_null = np.all(tokens[:, sl["sex"]] == nulls[sl["sex"]], axis=1)
    assert abs(sex_null.mean() - 0.5) < 0.08, sex_null.mean()  # 480 draws: ~3.5 sigma
    assert np.all(tokens[~sex_null, sl["sex"]] == clean[~sex_null, sl["sex"]])
    assert np.all(tokens[:, sl["view"]] == nulls[sl["view"]])
    for g in ("findings", "age", "race", "source"):
        assert np.array_equal(tokens[:, sl[g]], clean[:, sl[g]]), g
    again = np.concatenate([b["tokens"] for b in loader(
        data_dir, num_epochs=20, global_batch=8, cond_dropout=probs)])
    assert np.array_equal(tokens, again)  # per-record rng: deterministic


def test_joint_dropout_emits_the_unconditional_row(data_dir):
    """What the real pipeline emits with the default config's dropout: ~10% all-null rows
    (the row CFG guides against; per-group drops alone would give ~1e-6), per-group nulls on
    top, and nothing else changed."""
    probs = dict(config.base().data.cond_dropout)
    assert probs["all"] == 0.1
    batches = list(loader(data_dir, num_epochs=100, global_batch=8, cond_dropout=probs))
    tokens = np.concatenate([b["tokens"] for b in batches])
    clean = np.stack([clean_tokens(i) for i in itertools.chain(*map(ids, batches))])
    nulls, sl = cond.null_tokens(), cond.group_slices()
    uncond = np.all(tokens == nulls, axis=1)
    n = len(tokens)
    assert abs(uncond.mean() - 0.1) < 4 * (0.09 / n) ** 0.5, uncond.mean()
    rest = tokens[~uncond]
    for g in ("findings", "sex", "age", "race", "view", "source"):
        null = np.all(rest[:, sl[g]] == nulls[sl[g]], axis=1)
        assert abs(null.mean() - 0.1) < 4 * (0.09 / len(rest)) ** 0.5, (g, null.mean())
        kept = rest[~null][:, sl[g]]
        assert np.array_equal(kept, clean[~uncond][~null][:, sl[g]]), g


def test_resume_from_state(data_dir):
    ref = take(iter(loader(data_dir, cond_dropout={"sex": 0.5})), 12)
    it = iter(loader(data_dir, cond_dropout={"sex": 0.5}))
    take(it, 5)
    state = it.get_state()
    fresh = iter(loader(data_dir, cond_dropout={"sex": 0.5}))
    fresh.set_state(state)
    assert same(take(fresh, 7), ref[5:])


def test_resume_with_orbax(data_dir, tmp_path):
    import grain
    import orbax.checkpoint as ocp
    ref = take(iter(loader(data_dir, cond_dropout={"age": 0.5})), 10)
    it = iter(loader(data_dir, cond_dropout={"age": 0.5}))
    take(it, 4)
    state = {"w": np.arange(3.0)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    fresh = iter(loader(data_dir, cond_dropout={"age": 0.5}))
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.latest_step() == 4
        restored = mngr.restore(4, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state), data=grain.checkpoint.CheckpointRestore(fresh)))
    assert np.array_equal(restored.state["w"], state["w"]) and restored.data is fresh
    assert same(take(fresh, 6), ref[4:])


def test_read_ahead_is_bounded_by_prefetch(data_dir, monkeypatch):
    """The loader decodes at most ``prefetch`` batches ahead of the consumer (Grain's default
    buffered 500 batches, gigabytes at 512²)."""
    import time
    decoded = []
    original = pipeline.DecodeExample.map
    monkeypatch.setattr(pipeline.DecodeExample, "map",
                        lambda self, el: decoded.append(1) or original(self, el))
    it = iter(loader(data_dir, prefetch=2, cond_dropout={}))
    next(it)
    time.sleep(0.5)                     # let the read-ahead threads fill what they may
    assert len(decoded) <= (1 + 2) * 4


def test_worker_process_matches_inline(data_dir):
    a = take(iter(loader(data_dir, cond_dropout={"sex": 0.5})), 6)
    it = iter(loader(data_dir, cond_dropout={"sex": 0.5}, worker_count=1))
    assert same(take(it, 3), a[:3])
    state = it.get_state()
    fresh = iter(loader(data_dir, cond_dropout={"sex": 0.5}, worker_count=1))
    fresh.set_state(state)
    assert same(take(fresh, 3), a[3:])


def test_errors(data_dir, tmp_path):
    with pytest.raises(ValueError, match="multiple of process_count"):
        loader(data_dir, global_batch=5, process_count=2)
    with pytest.raises(ValueError, match="split 'test' not in dataset"):
        pipeline.make_loader(data_dir, "test", global_batch=4, seed=0, resolution=RES,
                             process_index=0, process_count=1)
    with pytest.raises(errors.UserError, match="no converted dataset"):
        loader(str(tmp_path))
    with pytest.raises(ValueError, match="unknown group 'colour'"):
        loader(data_dir, cond_dropout={"colour": 0.1})
    with pytest.raises(ValueError, match="probability"):
        loader(data_dir, cond_dropout={"sex": 1.5})
    example = schema.to_example(make_record(0))
    example["image_png"] = imaging.encode_png(np.zeros((8, 16), np.uint16))
    with pytest.raises(ValueError, match="not square"):
        pipeline.DecodeExample(RES).map(example)


@pytest.fixture(scope="module")
def second_dir(tmp_path_factory):
    """A second dataset whose records have ids 24..31 (pixel values tell them apart)."""
    out = tmp_path_factory.mktemp("pipe2") / "ds"
    with DatasetWriter(out, resolution=RES, num_shards=2) as w:
        for i in range(N, 32):
            w.add("train", make_record(i))
    return str(out)


def test_mixture_follows_weights_and_resumes(data_dir, second_dir):
    mix = [(data_dir, 3.0), (second_dir, 1.0)]
    batches = take(iter(loader(mix, cond_dropout={"sex": 0.3})), 50)
    seen = [i for b in batches for i in ids(b)]
    share = np.mean([i >= N for i in seen])
    assert abs(share - 0.25) < 0.03, share                     # weights 3:1
    assert set(seen) == set(range(32))     # every record of both sources
    assert same(batches[:10], take(iter(loader(mix, cond_dropout={"sex": 0.3})), 10))
    it = iter(loader(mix, cond_dropout={"sex": 0.3}))
    take(it, 7)
    fresh = iter(loader(mix, cond_dropout={"sex": 0.3}))
    fresh.set_state(it.get_state())
    assert same(take(fresh, 5), batches[7:12])


def test_bad_mixture(data_dir):
    with pytest.raises(ValueError, match="weight > 0"):
        loader([(data_dir, 0.0)])
    with pytest.raises(ValueError, match="endless stream"):
        loader([(data_dir, 1.0), (data_dir, 1.0)], num_epochs=1)
