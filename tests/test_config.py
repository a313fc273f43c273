"""Shared experiment defaults: resolution stages, the corpora mixture, data.root resolution."""
import pytest

from cxr_rf import config as config_lib
from cxr_rf import step as step_lib
from cxr_rf import trainer as trainer_lib


def _staged(stages, steps=100, resolution=64):
    c = config_lib.base()
    c.data.resolution = resolution
    c.train.update(steps=steps, stages=stages)
    return c


def test_no_stages_is_one_stage_at_the_data_resolution():
    c = config_lib.base()
    (s,) = config_lib.stages(c)
    assert (s.start, s.end, s.resolution, s.batch_size) == (0, c.train.steps, 64, 32)


def test_stages_cover_the_run_and_carry_their_batch():
    c = _staged(((0, 32, 64), (40, 64)))
    a, b = config_lib.stages(c)
    assert (a.start, a.end, a.resolution, a.batch_size) == (0, 40, 32, 64)
    assert (b.start, b.end, b.resolution, b.batch_size) == (40, 100, 64, 32)
    assert [config_lib.stage_at([a, b], k).index for k in (0, 1, 40, 41, 100)] == [0, 0, 0, 1, 1]
    sc = config_lib.for_stage(c, a)
    assert (sc.data.resolution, sc.train.batch_size, c.data.resolution) == (32, 64, 64)


def test_shift_follows_the_token_count_of_each_stage():
    c = _staged(((0, 32), (40, 64)))
    c.flow.base_tokens = 64                      # patch 4: 32² -> 64 tokens, 64² -> 256
    shifts = [step_lib.flow_settings(config_lib.for_stage(c, s)).shift
              for s in config_lib.stages(c)]
    assert shifts == [1.0, 2.0]                  # sqrt(256 / 64)


@pytest.mark.parametrize("stages, needle", [
    (((10, 64),), "must start at step 0"),
    (((0, 32), (0, 64)), "increasing start steps"),
    (((0, 32), (100, 64)), "not before train.steps=100"),
    (((0, 64), (50, 32)), "must equal data.resolution=64"),
    (((0,),), "(start_step, resolution[, batch_size])"),
])
def test_bad_stages_are_one_line_errors(stages, needle):
    with pytest.raises(ValueError, match=None) as e:
        config_lib.stages(_staged(stages))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_corpus_mixture_weights():
    mix = dict(config_lib.corpus_mixture())
    assert set(mix) == {n for n, _ in config_lib.CORPORA}
    assert abs(sum(mix.values()) - 1) < 1e-3 and mix["mimic_cxr_jpg"] > mix["vindr_cxr"]
    flat = dict(config_lib.corpus_mixture(temperature=1e9))     # -> uniform
    assert max(flat.values()) - min(flat.values()) < 1e-3
    with pytest.raises(ValueError, match="unknown corpora"):
        config_lib.corpus_mixture(["mimic", "chexpert"])


def test_relative_mixture_dirs_are_under_data_root(tmp_path):
    c = config_lib.base()
    c.data.update(root="gs://bucket/cxr", mixture=(("chexpert", 0.5), ("/mnt/nih", 0.5)))
    assert trainer_lib.ensure_data(c, tmp_path) == [("gs://bucket/cxr/chexpert", 0.5),
                                              ("/mnt/nih", 0.5)]


# Cloud paths: checkpoints/logs go to gs:// directly; ArrayRecord data needs a filesystem path.

def test_url_datasets_are_refused_in_one_line():
    from cxr_rf.data import pipeline
    with pytest.raises(ValueError, match="gcsfuse") as e:
        pipeline.parse_mixture([("/mnt/a", 1.0), ("gs://bucket/cxr/chexpert", 1.0)])
    assert "\n" not in str(e.value)


def test_conversion_into_a_url_is_refused():
    from cxr_rf.data import convert
    from cxr_rf.data.sources import SourceOptions
    with pytest.raises(convert.UsageError, match="is a URL"):
        convert.convert("phantom", "gs://bucket/cxr/phantom", SourceOptions(num=4, resolution=32))


def test_phantom_data_is_not_converted_into_a_url_workdir():
    from etils import epath
    with pytest.raises(ValueError, match="set data.dir"):
        trainer_lib.ensure_data(config_lib.base(), epath.Path("gs://bucket/runs/smoke"))


def test_a_url_data_dir_is_refused_before_any_io(tmp_path):
    c = config_lib.base()
    c.data.dir = "gs://bucket/cxr/phantom"
    with pytest.raises(ValueError, match="gcsfuse"):
        trainer_lib.ensure_data(c, tmp_path)


def test_model_and_flow_settings_come_from_the_config_in_one_line():
    """ModelConfig(**cfg.model, ...) and FlowSettings(**cfg.flow): every key is a field (so a
    knob is declared once), unknown keys and bad values fail in one line."""
    import dataclasses
    from cxr_rf import flow
    from cxr_rf.model import ModelConfig
    c = config_lib.base()
    c.model.update(pos_embed="rope", rope_theta=500.0)
    m = ModelConfig.from_config(c)
    assert (m.rope_theta, m.pos_embed) == (500.0, "rope")
    assert {f.name for f in dataclasses.fields(ModelConfig)} - {"report_len", "vocab_size"} \
        == set(c.model.keys())
    assert {f.name for f in dataclasses.fields(flow.FlowSettings)} == set(c.flow.keys())
    for key, value in (("scan_unroll", 0), ("depth", 0)):
        bad = config_lib.base()
        bad.model[key] = value
        with pytest.raises(ValueError, match=f"model config: {key} must be >= 1, got 0$"):
            ModelConfig.from_config(bad)
    c.model.rope_thetta = 1.0
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['rope_thetta'\]"):
        ModelConfig.from_config(c)
    for key, value, needle in (("t_std", 0.0, "t_std"), ("shift", float("nan"), "shift"),
                               ("prediction", "eps", "v, x"), ("t_eps", 1.5, "t_eps")):
        bad = config_lib.base().flow
        bad[key] = value
        with pytest.raises(ValueError, match=needle) as e:
            flow.FlowSettings(**bad)
        assert "\n" not in str(e.value)
    fs = flow.FlowSettings(**config_lib.base().flow)
    assert fs.shift == 0 and fs.at(4 * fs.base_tokens).shift == 2.0
    assert fs.at(fs.base_tokens // 4).shift == 1.0             # never below 1
    with pytest.raises(ValueError, match="automatic"):
        fs.resolved_shift
