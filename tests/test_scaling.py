"""Scaling ladder and fit: experiments/ladder.py is compute-matched, the event-file reader
round-trips what tensorboardX writes, and the fit recovers a known law L = a·C^(−b) + c from
synthetic runs (config.json of the real ladder rungs + val/loss written by SummaryWriter)."""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboardX import FileWriter, SummaryWriter
from tensorboardX.proto import summary_pb2, tensor_pb2

from cxr_rf import cli
from cxr_rf import config as config_lib
from cxr_rf import scaling
from cxr_rf.model import mmdit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRUTH = dict(a=4.0e3, b=0.3, c=0.05)     # L(d2) ≈ 0.243 … L(d6) ≈ 0.078, L(d8) ≈ 0.067
NOISE = 0.002                            # relative, seeded


def _ladder():
    spec = importlib.util.spec_from_file_location("ladder_under_test",
                                                  os.path.join(ROOT, "experiments", "ladder.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LADDER = _ladder()


def law(C):
    return TRUTH["a"] * np.asarray(C, np.float64) ** -TRUTH["b"] + TRUTH["c"]


def expected_flops(cfg, step):
    """Independent of cxr_rf.scaling: 3 × forward FLOPs × images, one stage."""
    mcfg = mmdit.ModelConfig.from_config(cfg)
    return 3.0 * mmdit.flops_per_image(mcfg, cfg.data.resolution) * cfg.train.batch_size * step


def eval_steps(cfg):
    t = cfg.train
    steps = list(range(t.eval_every, t.steps + 1, t.eval_every))
    return steps if steps[-1] == t.steps else steps + [t.steps]


def write_run(run_dir, cfg, rng, loss_fn=law):
    """A run directory as cxr_rf.train leaves it: config.json + val/loss (and other) scalars."""
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
    w = SummaryWriter(os.path.join(run_dir, "tensorboard"))
    for step in eval_steps(cfg):
        loss = float(loss_fn(expected_flops(cfg, step)) * (1 + NOISE * rng.standard_normal()))
        w.add_scalar("train/loss", loss * 1.1, step)
        w.add_scalar("val/loss", loss, step)
    w.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ladder")
    rng = np.random.default_rng(0)
    dirs = []
    for rung in LADDER.RUNGS:
        d = str(root / rung)
        write_run(d, LADDER.get_config(rung), rng)
        dirs.append(d)
    return dirs


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- the ladder

def test_ladder_rungs_are_compute_matched():
    assert len(LADDER.RUNGS) >= 5
    cfgs = [LADDER.get_config(r) for r in LADDER.RUNGS + (LADDER.NEXT,)]
    params = [scaling.params_of(c) for c in cfgs]
    assert params == sorted(params) and len(set(params)) == len(params)
    for rung, c, n in zip(LADDER.RUNGS + (LADDER.NEXT,), cfgs, params):
        depth = int(rung[1:])
        assert (c.model.depth, c.model.width, c.model.heads) == (depth, 64 * depth, depth)
        assert c.data.source == "phantom" and c.data.resolution in (64, 128)
        assert not c.train.stages and c.train.steps % LADDER.STEP_ROUND == 0
        tokens = c.train.steps * c.train.batch_size * (c.data.resolution // c.model.patch) ** 2
        exact_steps = LADDER.TOKENS_PER_PARAM * n / (c.train.batch_size * LADDER.tokens_per_image())
        # tokens/param is the ladder's constant up to rounding the steps to STEP_ROUND
        assert abs(tokens / n - LADDER.TOKENS_PER_PARAM) <= (
            LADDER.TOKENS_PER_PARAM * (LADDER.STEP_ROUND / 2) / exact_steps + 1e-9), rung
        points = len(eval_steps(c))
        assert 10 <= points <= 20, (rung, points)
    compute = [expected_flops(c, c.train.steps) for c in cfgs]
    assert compute == sorted(compute)
    assert compute[len(LADDER.RUNGS) - 1] / compute[0] > 100      # > 2 decades to fit over


def test_ladder_default_and_bad_rung():
    assert LADDER.get_config().model.depth == LADDER.get_config(LADDER.RUNGS[0]).model.depth
    assert LADDER.get_config(None).to_dict() == LADDER.get_config(LADDER.RUNGS[0]).to_dict()
    with pytest.raises(ValueError, match="d<depth>"):
        LADDER.get_config("big")


# --------------------------------------------------------------------------- event files

def test_reader_round_trips_summary_writer(tmp_path):
    w = SummaryWriter(str(tmp_path / "tensorboard"))
    values = {s: 1.0 / (s + 3) for s in range(0, 200, 10)}
    for s, v in values.items():
        w.add_scalar("val/loss", v, s)
        w.add_scalar("val/loss_t0.5", 2 * v, s)
    w.close()
    got = scaling.read_scalars(tmp_path, "val/loss")
    assert list(got) == sorted(values)
    assert all(got[s] == float(np.float32(v)) for s, v in values.items())
    assert scaling.read_scalars(tmp_path, "missing") == {}


def test_reader_resumed_run_latest_value_wins(tmp_path):
    logdir = str(tmp_path / "tensorboard")
    first = SummaryWriter(logdir, filename_suffix=".first")
    for s in range(10, 60, 10):
        first.add_scalar("val/loss", 1.0, s)
    first.close()
    second = SummaryWriter(logdir, filename_suffix=".second")      # resumed from step 20
    for s in range(30, 90, 10):
        second.add_scalar("val/loss", 2.0, s)
    second.close()
    assert len(scaling.event_files(tmp_path)) == 2
    got = scaling.read_scalars(tmp_path, "val/loss")
    assert got == {10: 1.0, 20: 1.0, 30: 2.0, 40: 2.0, 50: 2.0, 60: 2.0, 70: 2.0, 80: 2.0}


def test_reader_tensor_scalars_truncated_tail_and_corruption(tmp_path):
    fw = FileWriter(str(tmp_path))
    for s in (1, 2):
        value = summary_pb2.Summary.Value(
            tag="val/loss", tensor=tensor_pb2.TensorProto(dtype=1, float_val=[0.25 * s]))
        fw.add_summary(summary_pb2.Summary(value=[value]), s)
    fw.close()
    (path,) = scaling.event_files(tmp_path)
    assert scaling.read_scalars(tmp_path, "val/loss") == {1: 0.25, 2: 0.5}
    data = path.read_bytes()
    for tail in (data[:5], data[:20]):                    # a writer killed mid-record
        path.write_bytes(data + tail)
        assert scaling.read_scalars(tmp_path, "val/loss") == {1: 0.25, 2: 0.5}
    corrupt = bytearray(data)
    corrupt[-6] ^= 0xFF                                   # flip a byte of the last payload
    path.write_bytes(bytes(corrupt))
    with pytest.raises(scaling.ScalingError, match="CRC mismatch"):
        scaling.read_scalars(tmp_path, "val/loss")


# --------------------------------------------------------------------------- compute and fit

def test_compute_per_logged_point_and_stages(runs):
    run = scaling.load_run(runs[0])
    assert run.name == LADDER.RUNGS[0] and run.params == scaling.params_of(run.cfg)
    np.testing.assert_allclose(run.compute, [expected_flops(run.cfg, s) for s in run.steps],
                               rtol=1e-12)
    old = json.loads(run.cfg.to_json_best_effort())       # a run written before train.stages
    del old["train"]["stages"]
    cfg = scaling.config_from_json(json.dumps(old))
    assert tuple(cfg.train.stages) == () and cfg.train.steps == run.cfg.train.steps
    np.testing.assert_allclose(scaling.train_flops(cfg, run.steps), run.compute, rtol=1e-12)

    c = config_lib.base()
    c.data.resolution = 64
    c.train.update(steps=100, batch_size=8, stages=((0, 32, 16), (40, 64)))
    mcfg = mmdit.ModelConfig.from_config(c)
    f32, f64 = (3 * mmdit.flops_per_image(mcfg, r) for r in (32, 64))
    np.testing.assert_allclose(scaling.train_flops(c, [0, 40, 70, 100]),
                               [0, 40 * 16 * f32, 40 * 16 * f32 + 30 * 8 * f64,
                                40 * 16 * f32 + 60 * 8 * f64], rtol=1e-12)


def test_fit_recovers_exact_law():
    C = np.logspace(14, 17.5, 6)
    fit = scaling.fit_power_law(C, law(C))
    assert math.isclose(fit.b, TRUTH["b"], rel_tol=1e-6)
    assert math.isclose(fit.c, TRUTH["c"], rel_tol=1e-6)
    assert math.isclose(fit.a, TRUTH["a"], rel_tol=1e-4)


def test_fit_uncertainty_is_calibrated():
    # Over seeds, the truth lies inside the reported 95% band (Student t, n − 3 dof) about as
    # often as claimed: the covariance is scaled by the residuals and propagated correctly.
    C = np.array([expected_flops(LADDER.get_config(r), LADDER.get_config(r).train.steps)
                  for r in LADDER.RUNGS])
    nxt = LADDER.get_config(LADDER.NEXT)
    c_next = expected_flops(nxt, nxt.train.steps)
    hits = {"b": 0, "c": 0, "pred": 0}
    seeds = 40
    b_hat, sigma_b = [], []
    for seed in range(seeds):
        rng = np.random.default_rng(100 + seed)
        fit = scaling.fit_power_law(C, law(C) * (1 + 0.005 * rng.standard_normal(len(C))))
        t = fit.t95()
        mean, sd = fit.predict(c_next)
        hits["b"] += abs(fit.b - TRUTH["b"]) <= t * fit.sigma[1]
        hits["c"] += abs(fit.c - TRUTH["c"]) <= t * fit.sigma[2]
        hits["pred"] += abs(mean - law(c_next)) <= t * sd
        b_hat.append(fit.b)
        sigma_b.append(fit.sigma[1])
    assert all(h >= 0.8 * seeds for h in hits.values()), hits
    # ... and the bands are not merely wide: the reported σ matches the spread over seeds
    ratio = np.std(b_hat) / np.sqrt(np.mean(np.square(sigma_b)))
    assert 0.5 < ratio < 2.0, ratio


def test_fit_of_ladder_runs_and_prediction(runs, tmp_path):
    loaded = [scaling.load_run(d) for d in runs]
    fit = scaling.fit_power_law([r.compute[-1] for r in loaded], [r.loss[-1] for r in loaded])
    t = fit.t95()
    assert fit.n == len(LADDER.RUNGS) and fit.dof == fit.n - 3
    assert abs(fit.b - TRUTH["b"]) <= min(0.02, t * fit.sigma[1]), (fit.b, fit.sigma[1])
    assert abs(fit.c - TRUTH["c"]) <= min(0.003, t * fit.sigma[2]), (fit.c, fit.sigma[2])
    assert abs(fit.log_a - math.log(TRUTH["a"])) <= t * fit.sigma_log_a
    pred = scaling.predict(fit, LADDER.NEXT, LADDER.get_config(LADDER.NEXT))
    truth = float(law(expected_flops(LADDER.get_config(LADDER.NEXT),
                                     LADDER.get_config(LADDER.NEXT).train.steps)))
    assert abs(pred.loss - truth) <= 0.02 * truth
    assert pred.lo95 <= truth <= pred.hi95 and pred.sigma > 0
    assert pred.params == scaling.params_of(LADDER.get_config(LADDER.NEXT))

    out = tmp_path / "scaling.png"
    scaling.plot(loaded, fit, [pred], "final", "val/loss", out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.size == (960, 660)
        assert len(np.unique(np.asarray(im.convert("L")))) > 20     # something was drawn


def test_cli_end_to_end(runs, tmp_path):
    out, js = tmp_path / "fit.png", tmp_path / "fit.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cxr_rf.scaling", "--runs", *runs, "--predict",
         f"{LADDER.NEXT},experiments/ladder.py:{LADDER.NEXT}", "--out", str(out),
         "--json", str(js)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "fit: L(C) = a·C^(-b) + c" in text
    b, sigma_b = map(float, re.search(r"\n  b = (\S+) ± (\S+)\n", text).groups())
    c, sigma_c = map(float, re.search(r"\n  c = (\S+) ± (\S+)\n", text).groups())
    assert abs(b - TRUTH["b"]) < 0.02 and abs(c - TRUTH["c"]) < 0.003 and sigma_b > 0 < sigma_c
    for rung in LADDER.RUNGS:
        assert f"\n{rung} " in text
    assert text.count(f"{LADDER.NEXT} ") >= 2 and "95%" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(js.read_text())
    assert [r["name"] for r in report["runs"]] == list(LADDER.RUNGS)
    assert abs(report["fit"]["b"] - TRUTH["b"]) < 0.02
    p1, p2 = report["predictions"]
    assert p1["loss"] == p2["loss"] and p1["compute"] == p2["compute"]
    assert all(len(r["curve"]["loss"]) >= 10 for r in report["runs"])


def test_cli_min_point(runs, tmp_path, capsys):
    # a run whose loss rises at the end: --point min takes the minimum, final the last value
    cfg = LADDER.get_config(LADDER.RUNGS[-1])
    last = cfg.train.steps
    bumped = str(tmp_path / "bumped")
    write_run(bumped, cfg, np.random.default_rng(1),
              loss_fn=lambda C: law(C) + (0.05 if C >= expected_flops(cfg, last) else 0.0))
    # --runs takes a comma-separated list; run directories may also follow the flags (a glob)
    assert cli.call(scaling, ["--runs", ",".join([*runs[:-1], bumped]), "--point", "min",
                              "--json", str(tmp_path / "m.json")]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "m.json").read_text())["runs"]}
    assert rows["bumped"]["step"] < last and rows["bumped"]["loss"] < 0.1
    capsys.readouterr()
    assert cli.call(scaling, ["--runs", *runs[:-1], bumped, "--json",
                              str(tmp_path / "f.json")]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "f.json").read_text())["runs"]}
    assert rows["bumped"]["step"] == last and rows["bumped"]["loss"] > 0.1


def _main_error(argv, capsys) -> tuple[int, str]:
    code = cli.call(scaling, argv)
    return code, one_line_error(capsys.readouterr().err)


def test_bad_inputs_are_one_line_errors(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _main_error(["--runs", *runs, str(empty)], capsys)
    assert code == 2 and "no config.json" in err and str(empty) in err

    no_events = tmp_path / "no_events"
    no_events.mkdir()
    (no_events / "config.json").write_text(LADDER.get_config().to_json_best_effort())
    code, err = _main_error(["--runs", *runs, str(no_events)], capsys)
    assert code == 2 and "no TensorBoard event files" in err

    train_only = tmp_path / "train_only"
    train_only.mkdir()
    (train_only / "config.json").write_text(LADDER.get_config().to_json_best_effort())
    w = SummaryWriter(str(train_only / "tensorboard"))
    w.add_scalar("train/loss", 0.3, 10)
    w.close()
    code, err = _main_error(["--runs", *runs, str(train_only)], capsys)
    assert code == 2 and "no 'val/loss' scalars" in err

    code, err = _main_error(["--runs", *runs[:3]], capsys)
    assert code == 2 and "at least 4 runs" in err and "got 3" in err

    code, err = _main_error(["--runs", *runs, "--predict", "nonsense"], capsys)
    assert code == 2 and "--predict nonsense" in err
    code, err = _main_error(["--runs", *runs, "--predict", "d1"], capsys)
    assert code == 2 and "d<depth>" in err

    flat = []
    for i, rung in enumerate(LADDER.RUNGS):   # losses that do not fall with compute
        d = str(tmp_path / f"flat_{rung}")
        write_run(d, LADDER.get_config(rung), np.random.default_rng(i), loss_fn=lambda C: 0.1)
        flat.append(d)
    code, err = _main_error(["--runs", *flat], capsys)
    assert code == 1 and "did not converge" in err


def test_cli_error_in_subprocess_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cxr_rf.scaling", "--runs", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no config.json" in one_line_error(proc.stderr) and proc.stdout == ""
