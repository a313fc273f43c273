"""Counterfactual editing (cxr_rf.edit) and its phantom measurement (cxr_rf.evaluation.edits).

The solver tests use the closed-form velocity of a Gaussian target (tests/test_flow.py), whose
flow map is known; the rest use the suite's tiny run trained for 2 steps (numbers meaningless,
shapes, files and exactness properties not).
"""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cxr_rf import cli, edit, sample
from cxr_rf.evaluation import edits as edits_lib
from test_flow import GAUSS

import jax


# ----------------------------------------------------------------------------- analytic

def _round_trip_error(steps, method, t0, shift=3.0):
    x0 = jnp.asarray(GAUSS.draw(jax.random.PRNGKey(0), 64), jnp.float32)
    z = edit.ode_invert(GAUSS.v_star, x0, steps=steps, method=method, shift=shift, t0=t0)
    back = edit.ode_regenerate(GAUSS.v_star, z, steps=steps, method=method, shift=shift, t0=t0)
    return float(jnp.max(jnp.abs(back - x0))), x0, z


@pytest.mark.parametrize("t0", [1.0, 0.6])
def test_gaussian_round_trip_error_falls_with_steps_heun_faster(t0):
    err = {m: [_round_trip_error(n, m, t0)[0] for n in (8, 16, 32)] for m in ("euler", "heun")}
    for m, e in err.items():
        assert e[0] > e[1] > e[2], (m, e)
    # Euler is first order (halves per doubling), Heun second (about a quarter, or better).
    assert all(a / b > 1.6 for a, b in zip(err["euler"], err["euler"][1:])), err
    assert all(a / b > 3.0 for a, b in zip(err["heun"], err["heun"][1:])), err
    assert all(h < e / 10 for h, e in zip(err["heun"], err["euler"])), err
    assert err["heun"][-1] < 2e-3


def test_gaussian_full_inversion_finds_the_exact_noise():
    """At t0 = 1 the abducted noise is the exact one, S^(-1/2) (x0 - mu), to solver error."""
    _, x0, z = _round_trip_error(32, "heun", 1.0)
    inv_sqrt = GAUSS.U @ np.diag(GAUSS.lam ** -0.5) @ GAUSS.U.T
    exact = (np.asarray(x0, np.float64) - GAUSS.mu) @ inv_sqrt.T
    assert np.max(np.abs(np.asarray(z) - exact)) < 5e-3


def test_grid_at_t0_one_is_the_sampling_grid_and_partial_ends_at_t0():
    from cxr_rf import flow
    np.testing.assert_allclose(edit.grid(7, 2.5), flow.timesteps(7, 2.5), atol=1e-6)
    g = edit.grid(5, 2.5, 0.6)
    assert abs(float(g[0]) - 0.6) < 1e-6 and float(g[-1]) == 0.0
    assert np.all(np.diff(np.asarray(g)) < 0)


def test_gaussian_keep_mask_is_exact_outside():
    x0 = jnp.asarray(GAUSS.draw(jax.random.PRNGKey(1), 16), jnp.float32)
    z = jnp.asarray(np.random.default_rng(0).normal(size=x0.shape), jnp.float32)
    mask = jnp.asarray(np.tile([1.0, 0.0], (16, 1)), jnp.float32)     # dim 0 may change
    out = edit.ode_regenerate(GAUSS.v_star, z, steps=6, method="heun", shift=1.0, t0=1.0,
                              mask=mask, original=x0)
    np.testing.assert_array_equal(np.asarray(out[:, 1]), np.asarray(x0[:, 1]))
    assert not np.allclose(out[:, 0], x0[:, 0])


def test_psnr():
    a = np.zeros((2, 4, 4))
    b = a.copy()
    b[1] += 0.2
    p = edit.psnr(a, b)
    assert p[0] == pytest.approx(106.0206, abs=1e-3)
    assert p[1] == pytest.approx(10 * np.log10(4 / 0.04))


# ----------------------------------------------------------------------------- tiny run

@pytest.fixture(scope="module")
def loaded(tiny_run):
    """(cfg, Sampler, EMA params) of the shared tiny run (tests/conftest.py)."""
    cfg = sample.read_config(tiny_run)
    sampler = sample.Sampler(cfg, batch_size=4)
    params, _ = sampler.restore(tiny_run)
    return cfg, sampler, params


def _phantom_pair():
    x, src = edits_lib.phantoms("Cardiomegaly", False,
                                [{"sex": "F", "age": 70.0, "view": "PA"},
                                 {"sex": "M", "age": 50.0, "view": "AP"}], 16)
    tgt = [edits_lib.with_finding(c, "Cardiomegaly", True) for c in src]
    return x, src, tgt


def _perturbed(params, scale=0.05):
    """The tiny run's parameters plus Gaussian noise: after 2 training steps the zero-initialised
    output layer leaves an almost constant velocity, which every solver integrates exactly;
    the perturbed MMDiT has a nonlinear field (the solver's error shows)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    return jax.tree.unflatten(tree, [l + scale * jax.random.normal(k, l.shape, l.dtype)
                                     for l, k in zip(leaves, keys)])


def test_invert_regenerate_reproduces_the_input(loaded):
    cfg, sampler, params = loaded
    noisy = _perturbed(params)
    x, src, tgt = _phantom_pair()
    p = {}
    for method in ("euler", "heun"):
        r = edit.edit(sampler, noisy, x, src, tgt, steps=8, method=method)
        assert r.edited.shape == r.reconstruction.shape == r.noise.shape == x.shape
        np.testing.assert_allclose(r.psnr, edit.psnr(r.reconstruction, x))
        p[method] = r.psnr
    # measured: euler 45 dB, heun 67 dB (2 steps: 33 and 52; the analytic tests above check
    # the convergence orders)
    assert np.all(p["heun"] > 55.0) and np.all(p["heun"] > p["euler"] + 10.0), p
    # A partial inversion stops at t0 and also comes back.
    z = edit.invert(sampler, noisy, x, src, steps=8, t0=0.5)
    back = edit.regenerate(sampler, noisy, z, src, steps=8, t0=0.5, source=src, guidance=1.0)
    assert np.all(edit.psnr(back, x) > 55.0)
    # Contrast guidance of a null edit is the abduction field whatever the scale.
    same = edit.regenerate(sampler, noisy, z, src, steps=8, t0=0.5, source=src, guidance=4.0)
    np.testing.assert_allclose(same, back, atol=1e-5)
    # Single images work the same as a batch.
    one = edit.edit(sampler, noisy, x[0], src[0], tgt[0], steps=8)
    np.testing.assert_allclose(one.edited, edit.edit(sampler, noisy, x, src, tgt,
                                                     steps=8).edited[0], atol=1e-5)


def test_keep_mask_leaves_the_outside_unchanged(loaded):
    cfg, sampler, params = loaded
    x, src, tgt = _phantom_pair()
    mask = np.zeros((16, 16), np.float32)
    mask[4:12, 4:12] = 1.0
    r = edit.inpaint(sampler, params, x, src, tgt, mask, steps=8, method="heun")
    np.testing.assert_array_equal(r.edited[:, mask == 0], x[:, mask == 0])
    np.testing.assert_array_equal(r.reconstruction[:, mask == 0], x[:, mask == 0])
    assert not np.array_equal(r.edited[:, mask == 1], x[:, mask == 1])


def test_flowedit_null_edit_is_identity_and_edit_moves(loaded):
    cfg, sampler, params = loaded
    params = _perturbed(params)        # a field that depends on the conditions
    x, src, tgt = _phantom_pair()
    same = edit.flowedit(sampler, params, x, src, src, steps=3, n_avg=2)
    np.testing.assert_array_equal(same, x)
    moved = edit.flowedit(sampler, params, x, src, tgt, steps=3, n_avg=2, seed=1)
    assert moved.shape == x.shape and np.all(np.isfinite(moved))
    assert not np.array_equal(moved, x)
    np.testing.assert_array_equal(
        moved, edit.flowedit(sampler, params, x, src, tgt, steps=3, n_avg=2, seed=1))


def _png(path, side, value=30000):
    Image.fromarray(np.full((side, side), value, np.uint16)).save(path)
    return path


def test_cli_null_edit_writes_files_and_edit_json(tiny_run, tmp_path):
    from cxr_rf import export
    tiny_run = shutil.copytree(tiny_run, tmp_path / "run")    # edit caches causal.json in it
    img = _png(tmp_path / "in.png", 40)
    out = tmp_path / "out"
    args = [f"--workdir={tiny_run}", f"--image={img}", "--conditions=Cardiomegaly=negative",
            "--sex=F", "--age=70", "--view=PA", "--set=Cardiomegaly=negative", f"--out={out}",
            "--steps=8"]
    assert cli.call(edit, args) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["edit.json", "edited.png", "original.png", "reconstruction.png",
                     "side_by_side.png"]
    rec = json.loads((out / "edit.json").read_text())
    assert rec["conditions_before"] == rec["conditions_after"]
    assert rec["causal_changes"] == []
    assert rec["inversion_psnr_db"] > 30
    assert rec["settings"]["method"] == "invert" and rec["settings"]["strength"] == 1.0
    assert (tiny_run / "causal.json").exists()          # the fitted SCM is cached in the run
    metas = [export.read_png_metadata(out / f"{n}.png") for n in
             ("original", "reconstruction", "edited")]
    assert len({m["study"]["study_uid"] for m in metas}) == 1
    assert [m["study"]["instance"] for m in metas] == [1, 2, 3]
    assert Image.open(out / "edited.png").size == (16, 16)

    # A real intervention with propagation reports its changes with their reasons; DICOM out.
    out2 = tmp_path / "out2"
    assert cli.call(edit, args[:-3] + ["--set=Cardiomegaly=positive", f"--out={out2}",
                                       "--steps=2", "--format=dicom", "--method=flowedit"]) == 0
    rec = json.loads((out2 / "edit.json").read_text())
    assert rec["conditions_after"]["findings"]["Cardiomegaly"] == "positive"
    assert rec["causal_changes"][0]["variable"] == "Cardiomegaly"
    assert all("via" in c for c in rec["causal_changes"])
    assert (out2 / "edited.dcm").exists() and rec["inversion_psnr_db"] is None


@pytest.mark.parametrize("case", ["missing_image", "bad_set", "mask_size", "format",
                                  "strength"])
def test_cli_bad_input_is_one_line_exit_2_nothing_written(tiny_run, tmp_path, capfd, case):
    img = _png(tmp_path / "in.png", 40)
    out = tmp_path / "out"
    args = {"--workdir": tiny_run, "--image": img, "--set": "Cardiomegaly=positive",
            "--out": out, "--steps": 2}
    extra = []
    if case == "missing_image":
        args["--image"] = tmp_path / "nope.png"
    elif case == "bad_set":
        args["--set"] = "Cardiomegaly=sometimes"
    elif case == "mask_size":
        extra = [f"--mask={_png(tmp_path / 'mask.png', 23, 65535)}"]
    elif case == "format":
        extra = ["--format=tiff"]
    else:
        extra = ["--strength=0"]
    capfd.readouterr()
    code = cli.call(edit, [f"{k}={v}" for k, v in args.items()] + extra)
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists()


def test_edits_measurement_end_to_end(loaded):
    cfg, sampler, params = loaded
    r, images = edits_lib.edits(cfg, sampler, params, num=2, seed=0, steps=8,
                                return_images=True)
    assert edits_lib.contact_sheet(images, r).size[0] == 3 * 128
    assert r["command"] == "edits"
    assert r["settings"]["num"] == 2 and r["settings"]["steps"] == 8
    assert [(x["method"], x["finding"], x["direction"]) for x in r["rows"]] == [
        (m, f, d) for f in edits_lib.FINDINGS for d in ("add", "remove")
        for m in edits_lib.METHODS]
    for row in r["rows"]:
        assert set(row["effectiveness"]) == {"auroc", "mean_change", "truth_mean_change",
                                             "scores"}
        assert all(len(v) == 2 for v in row["effectiveness"]["scores"].values())
        for g in (row["identity"]["psnr_edit_truth"], row["identity"]["psnr_original_truth"],
                  row["identity"]["psnr_sample_truth"], row["reversibility"]["psnr"],
                  row["composition"]["psnr"]):
            assert set(g) == {"mean", "sd", "n", "nan", "values"} and g["n"] == 2
        if row["method"] == "flowedit":        # a null FlowEdit is exactly the identity
            assert row["composition"]["psnr"]["mean"] == pytest.approx(r["settings"]["psnr_cap_db"])
        # the true counterfactual moves the score the intended way (the phantom's ceiling)
        sign = 1 if row["direction"] == "add" else -1
        assert sign * row["effectiveness"]["truth_mean_change"]["mean"] > 0
    md = edits_lib.table(r)
    assert md.count("\n| invert | 1 | Cardiomegaly | add |") == 1
    assert len([l for l in md.splitlines() if l.startswith("| ")]) == 1 + len(r["rows"])
    json.dumps(__import__("cxr_rf.outputs", fromlist=["to_json"]).to_json(r), allow_nan=False)
