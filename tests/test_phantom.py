"""The phantom generator against its own analytic ground truth.

Geometry is checked by reading it back from the pixels with ``phantom.measure`` (no access to
the truth), effusions and pneumothoraces by comparing a study with its finding-free twin (same
seed and index, so identical anatomy and noise), labels and reports by their invariants.
"""
import re

import numpy as np
import pytest
from scipy import ndimage

from cxr_rf import conditioning as cond
from cxr_rf.data import phantom
from cxr_rf.data.phantom.patients import sample_study
from cxr_rf.data.phantom.report import NEGATIVE_TEXT

R = 160          # measurement tests; measure() needs >= 128 px
FULL = 65535
MAIN = ("No Finding", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Consolidation",
        "Atelectasis", "Pneumothorax", "Pleural Effusion", "Support Devices")
# How a report names each finding (positive sentences and "No ..." negatives alike).
KEYWORD = {
    "Enlarged Cardiomediastinum": r"cardiomediastinal|mediastinum", "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "opacity", "Lung Lesion": "nodule|mass", "Edema": "edema",
    "Consolidation": "consolidation", "Pneumonia": "pneumonia", "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax", "Pleural Effusion": "effusion",
    "Pleural Other": "pleural thickening", "Fracture": "fracture",
    "Support Devices": "support devices",
}


def _code(study, name):
    return int(study.findings[cond.FINDINGS.index(name)])


# ---------------------------------------------------------------- determinism and format

def test_deterministic_per_seed_and_index():
    a, b = phantom.generate(3, 7, 64), phantom.generate(3, 7, 64)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.findings, b.findings)
    assert a.report == b.report and a.truth["ctr"] == b.truth["ctr"]
    assert not np.array_equal(a.image, phantom.generate(3, 8, 64).image)
    assert not np.array_equal(a.image, phantom.generate(4, 7, 64).image)
    # The study (anatomy, labels, report) does not depend on the resolution.
    c = phantom.generate(3, 7, 128)
    np.testing.assert_array_equal(a.findings, c.findings)
    assert a.report == c.report and a.truth["ctr"] == c.truth["ctr"]


@pytest.mark.parametrize("res", [32, 64, 256])
def test_shape_dtype_and_range(res):
    s = phantom.generate(1, 2, res)
    assert s.image.shape == (res, res) and s.image.dtype == np.uint16
    r0, r1, c0, c1 = s.truth["field"]
    field = np.zeros((res, res), bool)
    field[r0:r1, c0:c1] = True
    assert (s.image[~field] == 0).all() and (s.image[field] >= 1).all()   # collimation
    assert s.image.max() > 0.8 * FULL                                    # 16-bit range used
    assert s.findings.dtype == np.int8 and s.findings.shape == (len(cond.FINDINGS),)
    assert set(s.findings.tolist()) <= set(range(len(cond.STATES)))
    assert s.sex in ("M", "F") and 18 <= s.age <= 95 and s.race in cond.RACES
    assert s.view in ("PA", "AP") and s.site in phantom.SITES
    assert re.match(r"EXAMINATION: .*\nFINDINGS: .*\nIMPRESSION: .+", s.report)


def test_studies_grouped_by_patient():
    st = [phantom.generate(0, i, 32) for i in range(6)]
    assert len({s.patient_id for s in st[:3]}) == 1 and st[0].patient_id == "phantom-0-0"
    assert st[3].patient_id == "phantom-0-1" and st[3].patient_id != st[2].patient_id
    assert len({s.study_id for s in st}) == 6
    for s in st[1:3]:
        assert (s.sex, s.age, s.race) == (st[0].sex, st[0].age, st[0].race)


def test_overrides_are_validated():
    with pytest.raises(ValueError, match="valid: findings, sex, age, race, view, site"):
        phantom.generate(0, 0, 64, colour="red")
    with pytest.raises(ValueError, match="Cardiomegaly"):
        phantom.generate(0, 0, 64, findings={"Cardiomegally": True})
    bad = [dict(findings={"Cardiomegaly": "yes"}), dict(findings={"Pneumothorax": "bilateral"}),
           dict(findings={"Consolidation": True, "Lung Opacity": False}),
           dict(findings={"No Finding": True, "Atelectasis": True}),
           dict(sex="X"), dict(age=12), dict(site="site_z"), dict(view="LATERAL"),
           dict(race="Martian")]
    for kw in bad:
        with pytest.raises(ValueError):
            phantom.generate(0, 0, 64, **kw)
    with pytest.raises(ValueError, match="resolution"):
        phantom.generate(0, 0, 8)


def test_override_changes_only_what_is_forced():
    base = phantom.generate(2, 4, 64, findings={"Pleural Effusion": False})
    forced = phantom.generate(2, 4, 64, findings={"Pleural Effusion": "left"})
    def demo(s):
        return s.sex, s.age, s.view, s.site, s.patient_id
    assert demo(base) == demo(forced)
    assert forced.truth["effusion_left"] and not forced.truth["effusion_right"]
    others = [f for f in cond.FINDINGS if f not in ("Pleural Effusion", "No Finding")]
    assert all(base.truth["present"][f] == forced.truth["present"][f] for f in others)
    assert base.truth["ctr"] == forced.truth["ctr"]
    s = phantom.generate(2, 4, 64, findings={"Cardiomegaly": True}, sex="F", age=70, site="site_b")
    assert (s.sex, s.age, s.site) == ("F", 70.0, "site_b") and s.truth["present"]["Cardiomegaly"]


# ---------------------------------------------------------------- measurement vs truth

@pytest.fixture(scope="module")
def ctr_cases():
    """36 studies over every site x view, half of them with cardiomegaly."""
    out = []
    for i in range(36):
        s = phantom.generate(11, i, R, site=phantom.SITES[i % 3], view=("PA", "AP")[i // 3 % 2],
                             findings={"Cardiomegaly": i // 6 % 2 == 0})
        out.append((s, phantom.measure(s.image)))
    return out


def test_measured_ctr_matches_truth(ctr_cases):
    err = np.array([m["ctr"] - s.truth["ctr"] for s, m in ctr_cases])
    assert np.isfinite(err).all()
    assert np.abs(err).mean() < 0.02, err
    assert np.abs(err).max() < 0.05, err


def test_cardiomegaly_read_from_pixels(ctr_cases):
    for s, _ in ctr_cases:   # truth and label agree with the CTR > 0.5 definition
        assert (s.truth["ctr"] > 0.5) == s.truth["present"]["Cardiomegaly"]
        assert (s.truth["ctr"] > 0.5) == (_code(s, "Cardiomegaly") == cond.POSITIVE)
    hits = [(m["ctr"] > 0.5) == s.truth["present"]["Cardiomegaly"] for s, m in ctr_cases]
    assert np.mean(hits) >= 0.95


def test_ap_view_magnifies_the_heart():
    ratios = []
    for i in range(6):
        pa = phantom.generate(13, i, R, view="PA", findings={"Cardiomegaly": False})
        ap = phantom.generate(13, i, R, view="AP", findings={"Cardiomegaly": False})
        assert pa.patient_id == ap.patient_id
        m_pa, m_ap = phantom.measure(pa.image)["ctr"], phantom.measure(ap.image)["ctr"]
        assert m_ap > m_pa
        ratios.append(m_ap / m_pa)
    assert 1.05 < np.mean(ratios) < 1.15


def test_effusion_sides_detected_across_sites():
    hits, score_pos, score_neg = [], [], []
    for i in range(36):
        side = ("left", "right", False, "bilateral")[i % 4]
        s = phantom.generate(17, i, R, site=phantom.SITES[i % 3],
                             findings={"Pleural Effusion": side})
        m = phantom.measure(s.image)
        hits.append(m["effusion_left"] == s.truth["effusion_left"]
                    and m["effusion_right"] == s.truth["effusion_right"])
        for sd in ("left", "right"):
            (score_pos if s.truth[f"effusion_{sd}"] else score_neg).append(m[f"cp_blunting_{sd}"])
    assert np.mean(hits) >= 0.95
    assert np.mean(score_pos) > np.mean(score_neg) + 0.03


def test_left_means_patient_left_image_right():
    """A left effusion (patient's left) is drawn, and measured, on the image's right."""
    kw = dict(site="site_a", view="PA")
    s = phantom.generate(19, 1, R, findings={"Pleural Effusion": "left"}, **kw)
    twin = phantom.generate(19, 1, R, findings={"Pleural Effusion": False}, **kw)
    fluid = phantom.truth_masks(19, 1, R, findings={"Pleural Effusion": "left"}, **kw)["effusion"]
    cols = np.nonzero(fluid)[1] / R
    assert fluid.sum() > 20 and (cols > s.truth["midline"]).all()
    brighter = s.image.astype(float) - twin.image.astype(float)
    mid = int(s.truth["midline"] * R)
    assert brighter[:, mid:].sum() > 20 * abs(brighter[:, :mid].sum())
    m = phantom.measure(s.image)
    assert m["effusion_left"] and not m["effusion_right"]
    assert "left pleural effusion" in s.report.lower()


def test_pneumothorax_space_has_no_lung_markings():
    """Beyond the pleural line there are no vessels: less fine texture than the same region
    of the finding-free twin (same anatomy, ribs and noise realisation)."""
    ratios = []
    for i in range(6):
        side = ("left", "right")[i % 2]
        s = phantom.generate(5, i, 256, findings={"Pneumothorax": side})
        twin = phantom.generate(5, i, 256, findings={"Pneumothorax": False})
        region = phantom.truth_masks(5, i, 256, findings={"Pneumothorax": side})["pneumothorax"]
        region = ndimage.binary_erosion(region, iterations=2)   # off the pleural line
        assert region.sum() > 30
        cols = np.nonzero(region)[1] / 256
        assert ((cols > s.truth["midline"]) == (side == "left")).all()

        def texture(img):
            f = img.astype(np.float32) / FULL
            return (f - ndimage.gaussian_filter(f, 1.0))[region].var()
        ratios.append(texture(s.image) / texture(twin.image))
        assert f"{side} apical pneumothorax" in s.report
    assert max(ratios) < 0.97 and np.mean(ratios) < 0.9, ratios


def test_demographics_change_anatomy():
    for i in range(4):
        kw = dict(findings={"Cardiomegaly": False}, view="PA", site="site_a")
        m, f = (phantom.generate(23, i, 192, sex=x, age=50, **kw) for x in ("M", "F"))
        assert f.truth["thoracic_width"] < m.truth["thoracic_width"]        # smaller thorax
        width = [phantom.measure(s.image)["thoracic_width"] for s in (f, m)]
        assert width[0] < width[1]
        young, old = (phantom.generate(23, i, 64, sex="M", age=a, **kw) for a in (25, 90))
        assert old.truth["ctr"] > young.truth["ctr"]                         # larger heart


# ---------------------------------------------------------------- sites

def test_sites_differ_measurably():
    stats = {site: [] for site in phantom.SITES}
    for i in range(3):
        for site in phantom.SITES:
            s = phantom.generate(21, i, 128, site=site, findings={"Support Devices": False})
            img = s.image.astype(np.float32) / FULL
            r0, r1, c0, c1 = s.truth["field"]
            f = img[r0:r1, c0:c1]
            bright = np.argwhere(img > 0.96)          # the burned-in side marker
            stats[site].append(dict(
                border=(img == 0).mean(), floor=np.percentile(f, 1),
                noise=np.median(np.abs(f - ndimage.median_filter(f, 3))),
                marker=bright.mean(0) / 128 if len(bright) else np.array([np.nan, np.nan])))
    mean = {site: {k: np.mean([d[k] for d in v], 0) for k in v[0]} for site, v in stats.items()}
    a, b, c = (mean[s] for s in phantom.SITES)
    assert a["border"] < c["border"] < b["border"]          # collimation
    assert b["floor"] > a["floor"] + 0.03 and b["floor"] > c["floor"] + 0.03   # exposure curve
    assert c["noise"] > 1.3 * a["noise"]                    # noise level
    assert (a["marker"] < 0.15).all()                       # "R" block top-left
    assert b["marker"][0] < 0.15 and b["marker"][1] > 0.85  # "L" glyph top-right
    assert (c["marker"] > 0.85).all()                       # "L" block bottom-right


# ---------------------------------------------------------------- labels and reports

@pytest.fixture(scope="module")
def draws():
    return [phantom.generate(7, i, 32) for i in range(300)]


def test_label_invariants(draws):
    for s in draws:
        code = {f: _code(s, f) for f in cond.FINDINGS}
        others = [f for f in cond.FINDINGS if f != "No Finding"]
        none_pos = all(code[f] != cond.POSITIVE for f in others)
        assert (code["No Finding"] == cond.POSITIVE) == none_pos
        assert s.truth["present"]["No Finding"] == none_pos
        for child, parent in (("Consolidation", "Lung Opacity"), ("Edema", "Lung Opacity"),
                              ("Pneumonia", "Consolidation"),
                              ("Cardiomegaly", "Enlarged Cardiomediastinum")):
            if code[child] == cond.POSITIVE:
                assert code[parent] == cond.POSITIVE
        for f in others:       # present findings are drawn visibly, hence labelled positive
            assert (code[f] == cond.POSITIVE) == s.truth["present"][f]
        eff = s.truth["effusion_left"] or s.truth["effusion_right"]
        assert eff == s.truth["present"]["Pleural Effusion"]


def test_reports_state_positives_and_negatives(draws):
    for s in draws:
        body = s.report.split("FINDINGS:")[1].split("IMPRESSION:")[0]
        sentences = [x.strip() for x in re.split(r"(?<=\.)\s+", body) if x.strip()]
        for f in cond.FINDINGS[1:]:
            key = re.compile(KEYWORD[f], re.I)
            said_pos = any(key.search(x) and not x.startswith("No ")
                           and "cannot be excluded" not in x for x in sentences)
            said_neg = any(key.search(x) and x.startswith("No ") for x in sentences)
            code = _code(s, f)
            if code == cond.POSITIVE:
                assert said_pos, (f, s.report)
            elif code == cond.NEGATIVE:
                assert said_neg, (f, s.report)
            else:
                assert NEGATIVE_TEXT[f] not in s.report
        if _code(s, "No Finding") == cond.POSITIVE:
            assert "No acute cardiopulmonary process" in s.report


def test_prevalence_and_label_noise_plausible(draws):
    n = len(draws)
    for f in MAIN:
        p = np.mean([s.truth["present"][f] for s in draws])
        assert 0.05 <= p <= 0.5, (f, p)
    absent = np.concatenate([s.findings[[not s.truth["present"][f] for f in cond.FINDINGS]]
                             for s in draws])
    assert 0.01 < np.mean(absent == cond.UNMENTIONED) < 0.1
    assert 0.005 < np.mean(absent == cond.UNCERTAIN) < 0.08
    races = [s.race for s in draws]
    assert 0.45 < races.count("unknown") / n < 0.75 and len(set(races)) == len(cond.RACES)
    assert {s.sex for s in draws} == {"M", "F"} and set(s.site for s in draws) == set(phantom.SITES)
    ap_dev = np.mean([s.view == "AP" for s in draws if s.truth["present"]["Support Devices"]])
    ap_none = np.mean([s.view == "AP" for s in draws if not s.truth["present"]["Support Devices"]])
    assert ap_dev > ap_none + 0.2        # portable AP films for lines-and-tubes patients


# ---------------------------------------------------------------- every finding in the pixels
# Each finding is rendered into a patient with and without it (``generate``'s ``findings``
# override; every other finding forced absent, view and site fixed), so anatomy, texture and
# noise are identical and the difference image is the finding alone. Exposure is monotone,
# so added attenuation can only brighten a pixel and removed attenuation only darken it.

CLEAN = {f: False for f in cond.FINDINGS if f != "No Finding"}
# Findings that the forced one implies (so they cannot also be forced absent).
IMPLIES = {"Consolidation": ("Lung Opacity",), "Edema": ("Lung Opacity",),
           "Pneumonia": ("Consolidation", "Lung Opacity"),
           "Cardiomegaly": ("Enlarged Cardiomediastinum",)}
PX = 128


def _with(name, value=True):
    """The findings override that adds ``name`` alone (with what it implies)."""
    return {**{k: v for k, v in CLEAN.items() if k not in IMPLIES.get(name, ())}, name: value}


def _twins(seed, index, name, value=True, n=PX, site="site_a"):
    """(study with the finding, its finding-free twin, difference in [0, 1] display units)."""
    kw = dict(view="PA", site=site)
    w = phantom.generate(seed, index, n, findings=_with(name, value), **kw)
    wo = phantom.generate(seed, index, n, findings=CLEAN, **kw)
    assert w.truth["present"][name] and not wo.truth["present"][name]
    return w, wo, (w.image.astype(np.float64) - wo.image.astype(np.float64)) / FULL


def _grid(n):
    """Pixel-centre coordinates (x as [1, n], y as [n, 1]) in image units."""
    c = (np.arange(n) + 0.5) / n
    return c[None, :], c[:, None]


def _on_side(x, s, side):
    """Columns on the patient's ``side`` (patient left = image right)."""
    return (x > s.truth["midline"]) == (side == "left")


def _brightened_only(d, tol=1.5 / FULL):
    """Only added density: no pixel darker than the rounding of the twin."""
    assert d.min() >= -tol, d.min()
    assert d.max() > 0.02


# Four studies over the three sites; between them every sided finding below falls on each
# side at least once, and the lesions include nodules and a mass.
CASES = [(31, i, site) for i, site in zip((0, 2, 6, 7), phantom.SITES + phantom.SITES[:1])]


@pytest.mark.parametrize("seed,index,site", CASES)
def test_lung_lesion_is_a_bright_nodule_at_its_site(seed, index, site):
    s, _, d = _twins(seed, index, "Lung Lesion", site=site)
    _brightened_only(d)
    x, y = _grid(PX)
    inside = np.zeros(d.shape, bool)
    for les in s.truth["details"]["lesions"]:
        r2 = (x - les["x"]) ** 2 + (y - les["y"]) ** 2
        core = r2 < (0.5 * les["r"]) ** 2
        assert d[core].mean() > 0.05, les          # dense at its centre
        assert _on_side(les["x"], s, les["side"])
        inside |= r2 < (1.3 * les["r"] + 1.5 / PX) ** 2   # lobulated masses reach ~1.15 r
    assert np.abs(d[~inside]).max() < 0.004        # and nowhere else


@pytest.mark.parametrize("name,key", [("Consolidation", "consolidation"),
                                      ("Lung Opacity", "ggo")])
@pytest.mark.parametrize("seed,index,site", CASES)
def test_airspace_opacity_brightens_its_lung_region(name, key, seed, index, site):
    s, _, d = _twins(seed, index, name, site=site)
    _brightened_only(d)
    p = s.truth["details"][key]
    x, y = _grid(PX)
    reach = 2.2 * p["r"] + 1.5 / PX
    box = (np.abs(x - p["x"]) <= reach) & (np.abs(y - p["y"]) <= reach)
    assert np.abs(d[~box]).max() < 0.004
    core = (x - p["x"]) ** 2 + (y - p["y"]) ** 2 < (0.5 * p["r"]) ** 2
    assert d[core].mean() > (0.05 if key == "consolidation" else 0.025), d[core].mean()
    assert _on_side(p["x"], s, p["side"]) and p["y"] < 0.6        # mid/upper lung


@pytest.mark.parametrize("seed,index,site", CASES)
def test_consolidation_is_denser_than_ground_glass(seed, index, site):
    c = _twins(seed, index, "Consolidation", site=site)[2]
    g = _twins(seed, index, "Lung Opacity", site=site)[2]
    assert np.percentile(c[c > 0], 90) > 1.5 * np.percentile(g[g > 0], 90)


def test_pneumonia_is_drawn_as_a_consolidation():
    for index in range(3):
        pna, _, d_pna = _twins(37, index, "Pneumonia")
        _, _, d_cons = _twins(37, index, "Consolidation")
        assert pna.truth["present"]["Consolidation"]
        np.testing.assert_array_equal(d_pna, d_cons)
        assert d_pna.max() > 0.05


@pytest.mark.parametrize("seed,index,site", CASES)
def test_edema_is_a_bilateral_perihilar_haze(seed, index, site):
    s, _, d = _twins(seed, index, "Edema", site=site)
    _brightened_only(d)
    a = sample_study(seed, index, dict(findings=_with("Edema"), view="PA", site=site)).anatomy
    x, y = _grid(PX)
    mid = s.truth["midline"]
    left, right = d[:, x[0] > mid].sum(), d[:, x[0] <= mid].sum()
    assert min(left, right) > 0.4 * max(left, right)            # both lungs
    for side in ("right", "left"):
        hx, hy = a.hila[side]
        near = (x - hx) ** 2 + (y - hy) ** 2 < 0.06 ** 2
        # Peripheral lung at the same rows, beyond the haze (two haze widths lateral).
        far = ((np.abs(x - hx) > 0.16) & _on_side(x, s, side) & (np.abs(y - hy) < 0.06)
               & (np.abs(x - mid) < a.H - 0.02))
        assert d[near].mean() > 0.015 and d[near].mean() > 3 * d[far].mean(), side


@pytest.mark.parametrize("seed,index,site", CASES)
def test_atelectasis_is_a_plate_and_lifts_its_hemidiaphragm(seed, index, site):
    # 256 px: the plate is point-sampled (not anti-aliased), and at 128 px one thinner than
    # ~1.3 px falls between pixel centres in places. Male patients: the breast shadows hang
    # from the right dome, so lifting the right dome also moves the left breast (a phantom
    # quirk, reported), which would blur "the other side is untouched".
    n, kw = 256, dict(view="PA", site=site, sex="M")
    w = phantom.generate(seed, index, n, findings=_with("Atelectasis"), **kw)
    wo = phantom.generate(seed, index, n, findings=CLEAN, **kw)
    d = (w.image.astype(np.float64) - wo.image.astype(np.float64)) / FULL
    at = w.truth["details"]["atelectasis"]
    side = at["side"]
    x, y = _grid(n)
    for f in (0.3, 0.5, 0.7):                  # the plate: a bright band along its segment
        px, py = at["x0"] + f * (at["x1"] - at["x0"]), at["y0"] + f * (at["y1"] - at["y0"])
        near = (x - px) ** 2 + (y - py) ** 2 < (at["th"] / 2 + 1 / n) ** 2
        assert d[near].max() > 0.05, f
    # Volume loss: that lung's base rises by the lift and denser tissue takes its place.
    lung_w = phantom.truth_masks(seed, index, n, findings=_with("Atelectasis"), **kw)
    lung_wo = phantom.truth_masks(seed, index, n, findings=CLEAN, **kw)
    lung_w, lung_wo = lung_w["pleural_space"], lung_wo["pleural_space"]
    lost, gained = lung_wo & ~lung_w, lung_w & ~lung_wo
    assert lost.sum() > 3 * gained.sum() + 50
    assert _on_side((np.nonzero(lost | gained)[1] + 0.5) / n, w, side).all()
    assert d[lost].mean() > 0.05
    mid, H = w.truth["midline"], w.truth["thoracic_width"] / 2
    lateral = (np.abs(x[0] - mid) > 0.5 * H) & (np.abs(x[0] - mid) < 0.8 * H)
    lateral &= _on_side(x[0], w, side)

    def base_row(lung):
        return np.max(np.nonzero(lung[:, lateral].any(1))[0])
    assert base_row(lung_wo) - base_row(lung_w) >= 0.015 * n        # lifted >= 0.018
    assert np.abs(d[:, ~_on_side(x[0], w, side)]).max() < 0.004     # the other side untouched


@pytest.mark.parametrize("seed,index,site", CASES)
def test_fracture_is_a_rib_discontinuity_on_its_side(seed, index, site):
    n = 256                                          # the cortical gap is ~2 px wide here
    s, _, d = _twins(seed, index, "Fracture", n=n, site=site)
    f = s.truth["details"]["fracture"]
    x, y = _grid(n)
    mid, H = s.truth["midline"], s.truth["thoracic_width"] / 2
    ax = np.abs(x - mid) / H + 0 * y                 # distance from the midline in half-widths
    changed = np.abs(d) > 1.5 / FULL
    assert changed.sum() > 10
    # Only the fractured rib on the stated side changes, and only from the break outward:
    # the medial part of the rib is intact.
    assert _on_side(x + 0 * y, s, f["side"])[changed].all()
    assert (ax[changed] > f["s"] - (0.0035 + 2 / n) / H).all()
    # At the break (a 0.007-wide gap) the rib is interrupted: bone removed, darker than the
    # intact twin, and no bone anywhere in those columns (a displaced but unbroken rib would
    # put its fragment there: brighter pixels).
    gap = (np.abs(ax - f["s"]) * H < 0.0033) & _on_side(x + 0 * y, s, f["side"])
    assert d[gap].min() < -0.02 and d[gap].max() < 0.1 * -d[gap].min()
    # Beyond it the lateral fragment is displaced (a step), so the change reaches laterally.
    assert ax[changed].max() > f["s"] + 0.05


@pytest.mark.parametrize("seed,index,site", CASES)
def test_pleural_other_is_an_apical_cap_on_its_side(seed, index, site):
    s, _, d = _twins(seed, index, "Pleural Other", site=site)
    _brightened_only(d)
    c = s.truth["details"]["pleural_other"]
    x, y = _grid(PX)
    changed = d > 1.5 / FULL
    assert _on_side(x + 0 * y, s, c["side"])[changed].all()
    assert (np.nonzero(changed)[0] / PX < 0.42).all()           # at the apex
    assert d.max() > 0.05


def test_support_devices_are_bright_at_their_places():
    x, y = _grid(PX)
    seen = set()
    for index in range(8):
        s, _, d = _twins(43, index, "Support Devices", site=phantom.SITES[index % 3])
        _brightened_only(d)
        dev = s.truth["details"]["devices"]
        a = sample_study(43, index, dict(findings=_with("Support Devices"),
                                         view="PA", site=phantom.SITES[index % 3])).anatomy
        cx = a.cx

        def peak(px, py, r):
            return d[(np.abs(x - px) < r) & (np.abs(y - py) < r)].max()
        for ex, ey in dev["ecg"]:                                  # electrodes: metal rings
            assert peak(ex, ey, 0.014) > 0.03
            seen.add("ecg")
        if dev["pm"]:                                              # pacemaker can
            sx = 1 if dev["pm"] == "left" else -1
            can = (np.abs(x - cx - sx * 0.24) < 0.025) & (np.abs(y - 0.2) < 0.015)
            assert d[can].mean() > 0.1
            seen.add("pm")
        if dev["cvc"]:                                             # line enters at the clavicle
            sx = 1 if dev["cvc"] == "left" else -1
            assert peak(cx + sx * 0.24, 0.195, 0.02) > 0.03
            seen.add("cvc")
        if dev["et"]:                                              # tube down the midline
            rows = np.arange(int(0.08 * PX), int((dev["et"] - 0.02) * PX))
            band = d[rows][:, np.abs(x[0] - cx + 0.004) < 0.012]
            assert (band.max(1) > 0.02).mean() > 0.9
            seen.add("et")
        if dev["ng"]:                                              # tip under the left dome
            assert peak(cx + 0.13, a.dome["left"] + 0.075, 0.025) > 0.03
            seen.add("ng")
    assert seen == {"ecg", "pm", "cvc", "et", "ng"}, seen


@pytest.mark.parametrize("seed,index,site", CASES)
def test_widened_mediastinum_keeps_the_heart(seed, index, site):
    s, wo, d = _twins(seed, index, "Enlarged Cardiomediastinum", site=site)
    assert not s.truth["present"]["Cardiomegaly"]
    assert s.truth["ctr"] == wo.truth["ctr"]                     # the heart is unchanged
    assert d[d > 0].sum() > 20 * -d[d < 0].sum()
    x, y = _grid(PX)
    changed = np.abs(d) > 1.5 / FULL
    rows, cols = np.nonzero(changed)
    mid = s.truth["midline"]
    # Upper mediastinum only: near the midline, above the heart's widest rows.
    assert (np.abs((cols + 0.5) / PX - mid) < 0.16).all() and (rows / PX < 0.55).all()
    upper = y < 0.5
    for side in ("right", "left"):          # right mediastinal border, left aortic knob
        assert d[upper & _on_side(x, s, side)].sum() > 0.3, side


@pytest.mark.parametrize("side", ["left", "right"])
def test_pneumothorax_is_lucent_on_its_side(side):
    s, _, d = _twins(43, 2, "Pneumothorax", side)
    region = phantom.truth_masks(43, 2, PX, findings={**CLEAN, "Pneumothorax": side},
                                 view="PA", site="site_a")["pneumothorax"]
    assert region.sum() > 20
    assert d[region].mean() < -0.01                    # darker: air without lung behind it
    assert _on_side((np.nonzero(region)[1] + 0.5) / PX, s, side).all()
    x, y = _grid(PX)
    assert np.abs(d[~_on_side(x + 0 * y, s, side)]).max() < 0.004   # the other lung untouched


def test_pneumothorax_lucency_measured_on_its_side():
    """measure()'s ptx_lucency_<side>: the same study with a pneumothorax reads higher on
    that side, the other side stays put, and the max over sides separates the two groups."""
    rises, others, pos, neg = [], [], [], []
    for i in range(16):
        side = ("left", "right")[i % 2]
        other = {"left": "right", "right": "left"}[side]
        m = phantom.measure(phantom.generate(23, i, 128, findings={"Pneumothorax": side}).image)
        t = phantom.measure(phantom.generate(23, i, 128, findings={"Pneumothorax": False}).image)
        rises.append(m[f"ptx_lucency_{side}"] - t[f"ptx_lucency_{side}"])
        others.append(abs(m[f"ptx_lucency_{other}"] - t[f"ptx_lucency_{other}"]))
        pos.append(max(m["ptx_lucency_left"], m["ptx_lucency_right"]))
        neg.append(max(t["ptx_lucency_left"], t["ptx_lucency_right"]))
    assert min(rises) > 0.015, rises
    assert max(others) < 0.02 and np.median(others) < 0.002, others
    pairs = np.asarray(pos)[:, None] > np.asarray(neg)[None, :]
    assert pairs.mean() > 0.95            # AUROC over all (positive, negative) pairs
    assert np.mean(neg) < 0 < np.mean(pos)


def test_measure_without_lungs_is_nan_for_every_score():
    m = phantom.measure(np.zeros((128, 128), np.uint16))
    for k in ("ctr", "cp_blunting_left", "cp_blunting_right", "ptx_lucency_left",
              "ptx_lucency_right"):
        assert np.isnan(m[k]), k
