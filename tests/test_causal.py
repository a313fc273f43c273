"""The structural causal model of the metadata (cxr_rf.causal): Gumbel-max abduction,
interventions, fitting, graphs, --set parsing, and a realistic edit on phantom metadata."""
import json

import numpy as np
import pytest

from cxr_rf import causal, errors
from cxr_rf import conditioning as cond

A, B, C = "sex", "Cardiomegaly", "Pleural Effusion"     # A -> B -> C, A -> C


def small_model(c_var=C, seed=0):
    """A -> B -> C and A -> C with random (known) tables; C is ``c_var``."""
    r = np.random.default_rng(seed)
    g = causal.Graph({B: [A], c_var: [A, B]}, nodes=[A, B, c_var])
    kA, kB, kC = (len(causal.DOMAINS[v]) for v in (A, B, c_var))
    tables = {A: r.dirichlet(np.ones(kA) * 2), B: r.dirichlet(np.ones(kB) * 2, kA),
              c_var: r.dirichlet(np.ones(kC) * 2, (kA, kB))}
    return causal.Model(g, tables)


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


# --------------------------------------------------------------------- intervention semantics

def test_counterfactual_matches_closed_form_binary():
    m = small_model()
    tC = m.tables[C]
    rng = np.random.default_rng(1)
    for a, b_obs, c_obs in [("M", "negative", "positive"), ("F", "positive", "negative"),
                            ("M", "positive", "positive"), ("F", "negative", "negative")]:
        ai, bi = causal.value_index(A, a), causal.value_index(B, b_obs)
        b_new = "positive" if b_obs == "negative" else "negative"
        p_old, p_new = tC[ai, bi, 1], tC[ai, 1 - bi, 1]
        # Binary Gumbel-max is a logistic threshold: P(C'=1 | C=1) = min(p, p')/p', etc.
        exact = (min(p_new, p_old) / p_old if c_obs == "positive"
                 else max(0.0, p_new - p_old) / (1 - p_old))
        d = causal.counterfactual_distribution(m, {A: a, B: b_obs, C: c_obs}, {B: b_new}, rng,
                                               n_samples=20000)
        assert d[C]["states"]["positive"] == pytest.approx(exact, abs=0.015)
        assert d[A]["changed"] == 0.0 and d[B]["changed"] == 1.0


def test_counterfactual_matches_brute_force_twin_network():
    """Ternary child: rejection sampling over all prior exogenous noise (independent code)."""
    cv = "view"
    m = small_model(cv, seed=3)
    kA, kB, kC = 3, 2, 4
    r = np.random.default_rng(2)
    n = 600_000
    gA, gB, gC = (r.gumbel(size=(n, k)) for k in (kA, kB, kC))
    la, lb, lc = np.log(m.tables[A]), np.log(m.tables[B]), np.log(m.tables[cv])
    xa = np.argmax(la + gA, -1)
    xb = np.argmax(lb[xa] + gB, -1)
    xc = np.argmax(lc[xa, xb] + gC, -1)
    obs = (1, 0, 2)                           # sex M, Cardiomegaly negative, view AP
    keep = (xa == obs[0]) & (xb == obs[1]) & (xc == obs[2])
    assert keep.sum() > 5000
    cf = np.argmax(lc[xa[keep], 1] + gC[keep], -1)        # do(B = positive), twin network
    brute = np.bincount(cf, minlength=kC) / keep.sum()
    d = causal.counterfactual_distribution(m, {A: "M", B: "negative", cv: "AP"},
                                           {B: "positive"}, np.random.default_rng(4), 20000)
    got = np.array([d[cv]["states"][v] for v in causal.DOMAINS[cv]])
    np.testing.assert_allclose(got, brute, atol=0.02)


def test_non_descendants_fixed_and_null_intervention_is_identity():
    m = small_model()
    rng = np.random.default_rng(0)
    obs = {A: "F", B: "positive", C: "negative"}
    for cf in causal.intervene(m, obs, {B: "negative"}, rng, n_samples=200):
        assert cf.values[A] == "F" and cf.values[B] == "negative"
        assert all(ch["variable"] != A for ch in cf.changes)
    for cf in causal.intervene(m, obs, {B: "positive"}, rng, n_samples=200):   # composition
        assert cf.values == cf.factual == obs and cf.changes == []
    d = causal.counterfactual_distribution(m, obs, {A: "M"}, rng, 500)
    assert d[A]["states"]["M"] == 1.0


def test_change_report_names_the_path():
    m = small_model()
    rng = np.random.default_rng(5)
    seen = False
    for cf in causal.intervene(m, {A: "M", B: "negative", C: "negative"}, {B: "positive"}, rng,
                               n_samples=300):
        assert cf.changes[0] == {"variable": B, "from": "negative", "to": "positive", "via": [],
                                 "path": [B]}
        for ch in cf.changes[1:]:
            assert ch == {"variable": C, "from": "negative", "to": "positive", "via": [B],
                          "path": [B, C]}
            seen = True
    assert seen


# ------------------------------------------------------------------------------ abduction

def test_abducted_noise_reproduces_observation():
    m = small_model("view", seed=7)
    rng = np.random.default_rng(0)
    X = causal.sample(m, 300, rng)
    for row in X[:60]:
        obs = causal.assignment(m, row)
        Xf, noise = causal.abduct(m, obs, rng, n_samples=20)
        assert (Xf == row).all()
        assert (causal.forward(m, noise) == row).all()


def test_abduction_keeps_prior_predictive():
    """Averaged over records drawn from the model, abducted noise is prior noise: the
    counterfactual do(A=a) of the population is the interventional distribution."""
    m = small_model(seed=11)
    rng = np.random.default_rng(0)
    X = causal.sample(m, 30000, rng)
    rows, counts = np.unique(X, axis=0, return_counts=True)
    Y, G = [], []
    for row, k in zip(rows, counts):
        _, noise = causal.abduct(m, causal.assignment(m, row), rng, int(k))
        Y.append(causal.forward(m, noise, do={A: "F"}))
        G.append(noise[C].ravel())
    Y, G = np.concatenate(Y), np.concatenate(G)
    f = causal.value_index(A, "F")
    pB = m.tables[B][f]
    pC = pB @ m.tables[C][f]
    np.testing.assert_allclose(np.bincount(Y[:, m.col[B]], minlength=2) / len(Y), pB, atol=0.012)
    np.testing.assert_allclose(np.bincount(Y[:, m.col[C]], minlength=2) / len(Y), pC, atol=0.012)
    assert G.mean() == pytest.approx(np.euler_gamma, abs=0.03)
    assert G.var() == pytest.approx(np.pi ** 2 / 6, abs=0.06)


def test_unobserved_variable_drawn_from_posterior():
    m = small_model(seed=2)
    rng = np.random.default_rng(0)
    obs = {A: "M", B: None, C: "positive"}
    X, _ = causal.abduct(m, obs, rng, n_samples=20000)
    a = causal.value_index(A, "M")
    post = m.tables[B][a] * m.tables[C][a, :, 1]
    post /= post.sum()
    assert (X[:, m.col[A]] == a).all() and (X[:, m.col[C]] == 1).all()
    assert (X[:, m.col[B]] == 1).mean() == pytest.approx(post[1], abs=0.015)


def test_zero_probability_observation_is_one_line_error():
    m = small_model()
    t = m.tables[B].copy()
    t[causal.value_index(A, "M")] = [1.0, 0.0]
    m = causal.Model(m.graph, {**m.tables, B: t})
    with pytest.raises(errors.UserError) as e:
        causal.abduct(m, {A: "M", B: "positive", C: "negative"}, np.random.default_rng(0))
    assert "probability 0" in one_line(e)
    # zero-probability categories elsewhere are fine: their noise is a prior draw
    X, noise = causal.abduct(m, {A: "M", B: "negative", C: "negative"},
                             np.random.default_rng(0), 50)
    assert (causal.forward(m, noise) == X).all()


# -------------------------------------------------------------------------------- fitting

def _metas(model, X):
    out = []
    for row in X:
        a = causal.assignment(model, row)
        findings = np.full(14, cond.UNMENTIONED, np.int8)
        for f in cond.FINDINGS:
            if f in a:
                findings[cond.FINDINGS.index(f)] = (cond.POSITIVE if a[f] == "positive"
                                                    else cond.NEGATIVE)
        out.append({"findings": findings, "sex": a.get("sex", "unknown"), "age": -1.0,
                    "race": "unknown", "view": a.get("view", "unknown")})
    return out


def test_fit_recovers_known_tables():
    m = small_model("view", seed=5)
    X = causal.sample(m, 40000, np.random.default_rng(0))
    fitted = causal.fit(m.graph, _metas(m, X), alpha=1.0)
    for v in (A, B, "view"):
        np.testing.assert_allclose(fitted.tables[v], m.tables[v], atol=0.03)


def test_smoothing_and_unknown_handling():
    g = causal.Graph({B: ["sex"]}, nodes=["sex", B])

    def meta(sex, code):
        f = np.full(14, cond.UNMENTIONED, np.int8)
        f[cond.FINDINGS.index(B)] = code
        return {"findings": f, "sex": sex, "age": -1.0}
    metas = ([meta("M", cond.POSITIVE)] * 3 + [meta("M", cond.NEGATIVE)] * 1
             + [meta("F", cond.NEGATIVE)] * 4 + [meta("unknown", cond.POSITIVE)] * 2
             + [meta("F", cond.UNCERTAIN)] * 5 + [meta("M", cond.UNMENTIONED)] * 2)
    u = causal.fit(g, metas, alpha=1.0, prior="uniform")
    M, Fe, U = (causal.value_index("sex", s) for s in ("M", "F", "unknown"))
    # unmentioned -> negative (2 more negatives for M); uncertain excluded (F stays 0/4)
    assert u.tables[B][M].tolist() == pytest.approx([(3 + 1) / 8, (3 + 1) / 8])
    assert u.tables[B][Fe, 1] == pytest.approx(1 / 6)
    assert u.tables[B][U, 1] == pytest.approx(3 / 4)          # "unknown" is its own parent value
    # the sex table counts every record (B's uncertain ones too): unknown 2, M 6, F 9
    assert u.tables["sex"].tolist() == pytest.approx([3 / 20, 7 / 20, 10 / 20])
    assert u.info["records_per_table"][B] == 12
    x = causal.fit(g, metas, alpha=0.0, unmentioned="exclude", uncertain="positive")
    assert x.tables[B][M, 1] == pytest.approx(3 / 4)
    assert x.tables[B][Fe, 1] == pytest.approx(5 / 9)
    # marginal prior: pseudo-counts alpha * K * marginal
    mg = causal.fit(g, metas, alpha=2.0)
    marg = (np.array([7, 5]) + 2.0) / (12 + 4.0)
    assert mg.tables[B][Fe].tolist() == pytest.approx(list((np.array([4, 0]) + 4 * marg) / 8))
    with pytest.raises(errors.UserError):
        causal.fit(g, metas, uncertain="maybe")


def test_model_save_load(tmp_path):
    m = small_model("view", seed=1)
    p = tmp_path / "scm.json"
    m.save(p)
    m2 = causal.Model.load(p)
    assert m2.graph == m.graph
    for v in m.tables:
        np.testing.assert_allclose(m2.tables[v], m.tables[v])
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
    for bad in ("bad.json", "other.json", "missing.json"):
        with pytest.raises(errors.UserError) as e:
            causal.Model.load(tmp_path / bad)
        one_line(e)


# ---------------------------------------------------------------------------------- graphs

def test_default_graph():
    g = causal.Graph.default()
    assert set(g.nodes) == set(causal.VARIABLES)
    pos = {v: i for i, v in enumerate(g.order)}
    for v, ps in g.parents.items():
        assert all(pos[p] < pos[v] for p in ps)
    for root in ("age", "sex", "race", "view"):
        assert g.parents[root] == ()
    assert set(g.parents["Lung Opacity"]) == {"Edema", "Consolidation", "Atelectasis",
                                              "Pleural Other"}
    assert set(g.children["age"]) == {"Cardiomegaly", "Edema", "Fracture", "Pleural Other",
                                      "Pneumonia", "Pneumothorax"}
    assert g.parents["race"] == () and set(g.children["race"]) == {"Cardiomegaly", "Edema"}
    assert set(g.parents["No Finding"]) == set(cond.FINDINGS) - {"No Finding"}
    assert sum(map(len, g.parents.values())) == 29 + 13


def test_graph_files_and_errors(tmp_path):
    t = tmp_path / "g.txt"
    t.write_text("# demo\nage, sex -> Edema, cardiomegaly\nCardiomegaly -> Pleural Effusion\n")
    g = causal.Graph.load(t)
    assert g.parents["Edema"] == ("age", "sex")
    assert g.parents["Pleural Effusion"] == ("Cardiomegaly",)
    j = tmp_path / "g.json"
    j.write_text(json.dumps({"edges": g.edge_dict()}))
    assert causal.Graph.load(j) == g
    cases = {
        "cycle.txt": ("Edema -> Lung Opacity\nLung Opacity -> Atelectasis\nAtelectasis -> Edema\n",
                      "cycle"),
        "self.txt": ("Edema -> Edema\n", "cycle"),
        "unknown.txt": ("Foo -> Edema\n", "valid: age, sex"),
        "syntax.txt": ("Edema Lung Opacity\n", "line 1"),
        "nofinding.txt": ("No Finding -> Edema\n", "No Finding"),
        "bad.json": ("{\"edges\": [1, 2]}", "expected"),
        "broken.json": ("{\"edges\": ", "JSON"),
    }
    for name, (text, needle) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(errors.UserError) as e:
            causal.Graph.load(tmp_path / name)
        assert needle in one_line(e), name
    with pytest.raises(errors.UserError) as e:
        causal.Graph.load(tmp_path / "cycle.txt")
    msg = one_line(e)
    assert all(v in msg for v in ("Edema", "Lung Opacity", "Atelectasis"))
    with pytest.raises(errors.UserError) as e:
        causal.Graph.load(tmp_path / "nope.txt")
    assert "cannot read" in one_line(e)


# ------------------------------------------------------------------------- --set, editing

def test_parse_set():
    assert causal.parse_set(" cardiomegaly=pos, age=30 ,sex=female,view=ap, Edema") == {
        "Cardiomegaly": "positive", "age": 30.0, "sex": "F", "view": "AP", "Edema": "positive"}
    assert causal.parse_set("age=80+") == {"age": "80+"}
    for bad, needle in [("Cardio=positive", "valid:"), ("Edema=maybe", "negative, positive"),
                        ("sex=X", "unknown, M, F"), ("age=old", "years"), ("age=200", "age"),
                        ("race=unknown", "unknown"), ("sex", "value"),
                        ("Edema,Edema=negative", "twice"), ("", "no variable")]:
        with pytest.raises(errors.UserError) as e:
            causal.parse_set(bad)
        assert needle in one_line(e), bad


def test_propagate_false_changes_only_named():
    m = small_model()
    rng = np.random.default_rng(0)
    for cf in causal.intervene(m, {A: "M", B: "negative", C: "negative"}, {B: "positive"}, rng,
                               n_samples=200, propagate=False):
        assert {ch["variable"] for ch in cf.changes} == {B}
        assert cf.values[C] == "negative"


@pytest.fixture(scope="module")
def phantom_model():
    from cxr_rf.data import phantom
    metas = [phantom.describe(0, i) for i in range(500)]
    return causal.fit(causal.Graph.default(), metas)


def test_phantom_age_intervention(phantom_model):
    m = phantom_model
    c = cond.Conditions.parse("Pleural Effusion", sex="F", age=30, race="White", view="PA")
    obs = causal.observed_of(c)
    cfs = causal.intervene(m, obs, {"age": 85}, np.random.default_rng(0), n_samples=400)
    age_kids = set(m.graph.children["age"])
    changed = set()
    for cf in cfs:
        assert cf.values["age"] == "80+"
        assert (cf.values["sex"], cf.values["race"], cf.values["view"]) == ("F", "White", "PA")
        for ch in cf.changes:
            assert ch["path"][0] == "age"
            changed.add(ch["variable"])
    assert changed & age_kids
    new = causal.conditions_with(c, cfs[0], {"age": 85})
    assert new.age == 85.0 and new.sex == "F" and new.race == "White"
    # the plain edit: only age; the model keeps "No Finding" consistent
    new, cf = causal.edit(m, c, "age=85,Cardiomegaly", np.random.default_rng(1), propagate=False)
    assert new.age == 85.0
    diff = [f for f, a, b in zip(cond.FINDINGS, c.findings, new.findings) if a != b]
    assert diff == ["Cardiomegaly"]
    new, cf = causal.edit(m, c, {"Pleural Effusion": "negative"}, np.random.default_rng(2),
                          propagate=False)
    assert new.findings[cond.FINDINGS.index("No Finding")] == cond.POSITIVE
    assert new.findings[cond.FINDINGS.index("Pleural Effusion")] == cond.NEGATIVE
    with pytest.raises(errors.UserError):
        causal.edit(m, c, "No Finding=positive", np.random.default_rng(0))
    with pytest.raises(errors.UserError):
        causal.intervene(m, obs, {"sex": "unknown"}, np.random.default_rng(0))


def test_observed_of_conditions_and_metas(phantom_model):
    c = cond.Conditions.parse("Edema,Atelectasis=uncertain,Lung Lesion=unspecified", age="unknown")
    obs = causal.observed_of(c)
    assert obs["Edema"] == "positive" and obs["Cardiomegaly"] == "negative"
    assert obs["Atelectasis"] is None and obs["Lung Lesion"] is None
    assert obs["age"] == "unknown" and obs["sex"] is None and obs["view"] is None
    meta = {"findings": np.full(14, cond.UNMENTIONED, np.int8), "sex": "M", "age": 47.5,
            "race": "Asian", "view": "AP"}
    assert causal.observed_of(meta)["age"] == "40-49"
    assert causal.observed_of(meta, unmentioned="exclude")["Edema"] is None
    # unspecified demographics and findings are drawn in abduction; the edit keeps them
    new, cf = causal.edit(phantom_model, c, "sex=F", np.random.default_rng(0))
    assert new.sex == "F" and new.age == "unknown" and new.view is None
    lesion = cond.FINDINGS.index("Lung Lesion")
    if cf.values["Lung Lesion"] == cf.factual["Lung Lesion"]:
        assert new.findings[lesion] == cond.UNSPECIFIED
