"""python -m cxr_rf.evaluate control (cxr_rf.evaluation.control): the measurement path and its ceiling on real phantoms,
the grouping and matching of ``control`` against a stand-in sampler that draws real phantoms
(analytic: it must reach the ceiling), the command on a tiny trained run, and bad inputs
(one ``error:`` line, exit 2, nothing written)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr_rf import cli, conditioning, evaluate, outputs
from cxr_rf.evaluation import control
from cxr_rf.data import imaging, phantom

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- pieces

def test_demographics_are_fixed_by_the_seed_and_in_range():
    a = control.demographics(40, seed=3)
    assert a == control.demographics(40, seed=3)
    assert a[:10] == control.demographics(10, seed=3)     # entry i does not depend on num
    assert a != control.demographics(40, seed=4)
    assert {d["sex"] for d in a} == {"M", "F"} and {d["view"] for d in a} == {"PA", "AP"}
    assert all(40 <= d["age"] <= 85 for d in a)


def test_positive_and_negative_conditions_differ_only_in_findings():
    d = {"sex": "F", "age": 65.0, "view": "PA"}
    pos = control.condition("Cardiomegaly", True, d)
    neg = control.condition("Cardiomegaly", False, d)
    i = conditioning.FINDINGS.index("Cardiomegaly")
    assert pos.findings[i] == conditioning.POSITIVE and neg.findings[i] == conditioning.NEGATIVE
    for c in (pos, neg):
        assert (c.sex, c.age, c.view, c.race, c.source) == ("F", 65.0, "PA", None, None)
    n = len(conditioning.FINDINGS)
    tp, tn = pos.tokens(), neg.tokens()
    np.testing.assert_array_equal(tp[n:], tn[n:])
    # Unlisted findings take the run's training defaults.
    unlisted = {f: conditioning.UNMENTIONED for f in conditioning.FINDINGS}
    c = control.condition("Cardiomegaly", True, d, unlisted)
    assert c.findings[conditioning.FINDINGS.index("Edema")] == conditioning.UNMENTIONED


def test_samples_and_real_phantoms_are_measured_the_same_way():
    """A real phantom in the model's [-1, 1] form measures exactly as its uint16 image
    upsampled to 128 px; 128 px and up are measured as they are."""
    demos = control.demographics(2, seed=0)
    x = control.real_images("Cardiomegaly", True, demos, 64)
    assert x.shape == (2, 64, 64) and x.dtype == np.float32 and -1 <= x.min() < x.max() <= 1
    img = phantom.generate(control.REAL_SEED, 1, 64, findings={"Cardiomegaly": True},
                           **demos[1]).image
    want = phantom.measure(imaging.fit_square(img, 128))
    got = control.measure_images(x)[1]
    assert got == want
    big = phantom.generate(0, 0, 128).image
    assert control.measure_images(big[None] * (2 / 65535) - 1)[0] == phantom.measure(big)


def test_compare_counts_nans_and_summarises():
    def m(ctr):
        return {"ctr": ctr}
    r = control.compare("Cardiomegaly", [m(0.6), m(0.55), m(np.nan)], [m(0.4), m(0.5)],
                         n_boot=50)
    assert r["auroc"] == 1.0
    assert r["pos"]["score"]["nan"] == 1 and r["pos"]["score"]["n"] == 2
    assert r["pos"]["ctr"]["mean"] == pytest.approx(0.575)
    assert r["neg"]["score"]["mean"] == pytest.approx(0.45)
    eff = control.SCORES["Pleural Effusion"]
    assert eff({"cp_blunting_left": 0.01, "cp_blunting_right": 0.05}) == 0.05
    assert np.isnan(eff({"cp_blunting_left": np.nan, "cp_blunting_right": 0.05}))


@pytest.mark.parametrize("finding, num", [("Cardiomegaly", 12), ("Pleural Effusion", 12),
                                          ("Pneumothorax", 40)])
def test_real_phantom_ceiling_at_64_px(finding, num):
    """The measurements separate real 64 px phantoms with and without the finding (the
    condition for a finding to be in SCORES; Pneumothorax is the weakest, ~0.93 at N=200)."""
    demos = control.demographics(num, seed=0)
    pos = control.measure_images(control.real_images(finding, True, demos, 64))
    neg = control.measure_images(control.real_images(finding, False, demos, 64))
    r = control.compare(finding, pos, neg, n_boot=100)
    assert r["auroc"] >= 0.9, r["auroc"]
    assert r["pos"]["score"]["nan"] == r["neg"]["score"]["nan"] == 0
    assert r["pos"]["score"]["mean"] > r["neg"]["score"]["mean"]


# ----------------------------------------------------------------------------- control

class PhantomSampler:
    """Stands in for ``Sampler``: 'samples' the real phantom of the request (finding states
    of the measurable findings forced as the condition says, its demographics, phantom
    index seed - SEED0), so ``control`` must find the ceiling's separation."""

    SEED0 = 5

    def __init__(self, resolution):
        self.resolution = resolution
        self.calls = []

    def generate(self, params, conditions, seeds, *, steps=None, guidance=None, method=None):
        self.calls.append(dict(conditions=list(conditions), seeds=list(seeds), steps=steps,
                               cfg_scale=guidance.scale, method=method))
        out = []
        for c, sd in zip(conditions, seeds):
            forced = {f: c.findings[conditioning.FINDINGS.index(f)] == conditioning.POSITIVE
                      for f in control.SCORES}
            img = phantom.generate(control.REAL_SEED, sd - self.SEED0, self.resolution,
                                   findings=forced, sex=c.sex, age=c.age, view=c.view).image
            out.append(img.astype(np.float32) * (2 / 65535) - 1)
        return np.stack(out)


def test_control_groups_matches_and_reaches_the_ceiling(tiny_config):
    cfg = tiny_config(64)
    cfg.sample.update(steps=7, cfg=2.5, method="heun")
    fake = PhantomSampler(64)
    num, findings = 8, ["Cardiomegaly", "Pleural Effusion"]
    result, images = control.control(cfg, None, None, num=num, seed=PhantomSampler.SEED0,
                                      findings=findings, sampler=fake, return_images=True)
    # One generate call; the two negative groups are the same requests and sampled once.
    assert len(fake.calls) == 1
    call = fake.calls[0]
    assert (call["steps"], call["cfg_scale"], call["method"]) == (7, 2.5, "heun")
    assert len(call["seeds"]) == num * (len(findings) + 1)
    assert result["settings"]["images_sampled"] == num * 3
    demos = control.demographics(num, PhantomSampler.SEED0)
    assert result["demographics"] == demos
    for c, sd in zip(call["conditions"], call["seeds"]):    # seed i <-> demographics i
        d = demos[sd - PhantomSampler.SEED0]
        assert (c.sex, c.age, c.view) == (d["sex"], d["age"], d["view"])
    assert set(result["findings"]) == set(findings) == set(images)
    for f in findings:
        e = result["findings"][f]
        assert images[f]["pos"].shape == images[f]["neg"].shape == (num, 64, 64)
        assert e["samples"]["auroc"] >= 0.9 and e["real"]["auroc"] >= 0.9
        lo, hi = e["samples"]["ci95"]
        assert lo <= e["samples"]["auroc"] <= hi
        assert len(e["samples"]["scores"]["pos"]) == num
    # The md table and strict JSON.
    md = control.table(result)
    assert md.count("\n| Cardiomegaly | ctr |") == 1 and "| Pleural Effusion |" in md
    json.dumps(outputs.to_json(result), allow_nan=False)
    # Other sampling settings are passed through.
    control.control(cfg, None, None, num=2, steps=3, cfg_scale=1.0, method="euler",
                     seed=PhantomSampler.SEED0, findings=["Pneumothorax"], sampler=fake,
                     real=False)
    assert (fake.calls[-1]["steps"], fake.calls[-1]["cfg_scale"],
            fake.calls[-1]["method"]) == (3, 1.0, "euler")


def test_control_refuses_bad_arguments(tiny_config):
    cfg = tiny_config(64)
    fake = PhantomSampler(64)
    with pytest.raises(control.errors.UserError, match="measurable findings: Cardiomegaly"):
        control.control(cfg, None, None, findings=["Edema"], sampler=fake)
    with pytest.raises(control.errors.UserError, match="num must be >= 2"):
        control.control(cfg, None, None, num=1, sampler=fake)
    assert not fake.calls


def test_to_json_is_strict():
    out = outputs.to_json({"a": float("nan"), "b": [np.float32(1.5), np.int64(2), np.inf],
                            "c": np.bool_(True)})
    assert out == {"a": None, "b": [1.5, 2, None], "c": True}


# ----------------------------------------------------------------------------- the command

# tiny_run: the shared tiny run of tests/conftest.py (read-only).

def test_command_writes_json_markdown_and_sheet(tiny_run, tmp_path, capsys):
    out = tmp_path / "ev"
    code = cli.call(evaluate, ["control", f"--workdir={tiny_run}", "--num=2", "--steps=2",
                               f"--out={out}", "--findings=Cardiomegaly,Pleural Effusion"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| finding | score | AUROC [95% CI] samples | AUROC real |" in printed
    assert sorted(p.name for p in out.iterdir()) == ["control.json", "control.md", "control.png"]
    r = json.loads((out / "control.json").read_text())    # strict JSON: NaN written as null
    assert r["checkpoint_step"] == 2 and r["command"] == "control"
    assert r["settings"]["num"] == 2 and r["settings"]["steps"] == 2
    assert r["settings"]["cfg_scale"] == tiny_run_cfg(tiny_run).sample.cfg
    assert set(r["findings"]) == {"Cardiomegaly", "Pleural Effusion"}
    for e in r["findings"].values():
        assert set(e) == {"score", "measurements", "samples", "real"}
        for g in (e["samples"], e["real"]):
            assert set(g) == {"auroc", "ci95", "pos", "neg", "scores"}
            assert len(g["scores"]["pos"]) == len(g["scores"]["neg"]) == 2
    md = (out / "control.md").read_text()
    assert md.count("\n| Cardiomegaly |") == 1 and md.count("\n| Pleural Effusion |") == 1
    # The default output directory is inside the run (a copy: the shared run is read-only).
    run = shutil.copytree(tiny_run, tmp_path / "run")
    assert cli.call(evaluate, ["control", f"--workdir={run}", "--num=2", "--steps=1",
                               "--findings=Cardiomegaly"]) == 0
    assert (run / "eval" / "control" / "control.json").exists()


def test_all_writes_every_section_metrics_and_a_report(tiny_run, tmp_path, capsys):
    """``evaluate all`` end to end on the tiny run, every section at toy sizes: a classifier is
    trained when none is given, the samples of each split are generated once and reused by a
    second call, and the report links what it shows."""
    out = tmp_path / "all"
    args = ["all", f"--workdir={tiny_run}", f"--out={out}", "--num=2", "--steps=1",
            "--reference_num=4", "--privacy_prompts=3", "--privacy_seeds=2", "--utility_num=6",
            "--classifier_steps=3", "--bootstrap=2", "--batch_size=4"]
    assert cli.call(evaluate, args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["sections"]) == {"control", "edits", "conditional", "fidelity", "privacy",
                                  "utility"}
    assert m["checkpoint_step"] == 2
    fid = m["sections"]["fidelity"]["cxr_classifier"]
    assert fid["n_real"] == fid["n_fake"] == 4 and fid["overall"]["fd"] >= 0
    pv = m["sections"]["privacy"]
    assert pv["samples"]["sets"]["samples"]["n"] == 6
    assert pv["control_copies"]["spaces"]["pixels"]["copy_rate"]["rate"] == 1.0
    assert set(m["sections"]["utility"]["models"]) == {"real", "synthetic", "real+synthetic"}
    assert (out / "classifier" / "config.json").exists()
    assert len(list((out / "samples" / "privacy").glob("*.png"))) == 3 * 2
    assert len(list((out / "samples" / "utility").glob("*.png"))) == 6
    md = (out / "report.md").read_text()
    assert "## Utility" in md and "## Privacy" in md and "## Control" in md
    assert "## Counterfactual edits" in md
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') >= 5
    # A second run reuses the classifier, samples and features: same numbers.
    capsys.readouterr()
    assert cli.call(evaluate, args) == 0
    assert "training one" not in capsys.readouterr().out
    again = json.loads((out / "metrics.json").read_text())
    for r in (m, again):
        del r["sections"]["fidelity"]["cxr_classifier"]["timing_s"]
    assert again["sections"]["fidelity"] == m["sections"]["fidelity"]


def tiny_run_cfg(run):
    from cxr_rf import sample
    return sample.read_config(run)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


BAD = [
    ([], "name the evaluation (all, control"),
    (["fd", "--workdir={run}"], "unknown evaluation 'fd'; allowed: all, control"),
    (["control", "extra", "--workdir={run}"], "unexpected arguments: extra"),
    (["control"], "--workdir is required"),
    (["control", "--workdir=nowhere"], "--workdir nowhere does not exist"),
    (["control", "--workdir={file}"], "--workdir afile is not a directory"),
    (["control", "--workdir={empty}"], "no config.json"),
    (["control", "--workdir={nockpt}"], "has no MMDiT checkpoints yet"),
    (["control", "--workdir={run}", "--num=1"], "--num=1: must be an integer >= 2"),
    (["control", "--workdir={run}", "--steps=0"], "--steps=0: must be an integer >= 1"),
    (["control", "--workdir={run}", "--cfg=nan"], "--cfg=nan: must be a finite number >= 0"),
    (["control", "--workdir={run}", "--seed=-1"], "--seed=-1: must be an integer in [0"),
    (["control", "--workdir={run}", "--seed=4294967295", "--num=2"], "--seed + --num"),
    (["control", "--workdir={run}", "--method=rk4"], "--method"),
    (["control", "--workdir={run}", "--findings=Edema"], "cannot measure 'Edema'"),
    (["control", "--workdir={run}", "--out={file}"], "--out afile exists and is not a directory"),
    (["control", "--workdir={run}", "--step=7"], "no checkpoint for step 7"),
    (["all"], "all: pass --workdir RUN or --samples DIR"),
    (["fidelity", "--samples=nowhere"], "--samples nowhere does not exist"),
    (["fidelity", "--samples={empty}"], "has no manifest.jsonl"),
    (["all", "--workdir={run}", "--samples={empty}"], "not both"),
    (["privacy", "--samples={empty}"], "--workdir is required"),
    (["fidelity", "--workdir={run}", "--features=inception"], "--features: unknown ['inception']"),
    (["fidelity", "--workdir={run}", "--features=raddino"], "needs a local folder of weights"),
    (["fidelity", "--workdir={run}", "--raddino={empty}"], "config.json"),
    (["fidelity", "--workdir={run}", "--reference={empty}"], "no converted dataset"),
    (["train-classifier", "--out=x"], "--data is required"),
    (["train-classifier", "--data={empty}", "--out=x"], "no converted dataset"),
    (["all", "--workdir={run}", "--protocol=inception"], "--protocol"),
]


@pytest.mark.parametrize("args, needle", BAD, ids=[" ".join(a)[:40] or "none" for a, _ in BAD])
def test_bad_input_is_one_line_and_writes_nothing(args, needle, tiny_run, tmp_path,
                                                  monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "nockpt").mkdir()
    (tmp_path / "nockpt" / "config.json").write_text(tiny_run_cfg(tiny_run).to_json())
    argv = [a.format(run=tiny_run, file="afile", empty="empty", nockpt="nockpt") for a in args]
    before, run_before = _files(tmp_path), _files(tiny_run)
    assert cli.call(evaluate, argv) == 2
    err = capsys.readouterr()
    lines = [x for x in err.err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err.err
    assert err.out == ""
    assert _files(tmp_path) == before and _files(tiny_run) == run_before


def test_module_entry_point_fails_in_one_line(tmp_path):
    """``python -m cxr_rf.evaluate`` itself: an unknown subcommand is one line, exit 2."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, "-m", "cxr_rf.evaluate", "fid", "--workdir=x"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr == ("error: unknown evaluation 'fid'; allowed: all, control, conditional, "
                        "fidelity, privacy, utility, edits, train-classifier, reconstruction\n")
    assert r.stdout == "" and not any(tmp_path.iterdir())
