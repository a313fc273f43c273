"""The condition vocabulary: layout, null tokens, CFG dropout, user-facing validation."""
import numpy as np
import pytest

from cxr_rf import conditioning as C


def _row(report="", report_len=0, **kw):
    findings = np.full(len(C.FINDINGS), C.NEGATIVE, np.int8)
    findings[C.FINDINGS.index("Cardiomegaly")] = C.POSITIVE
    return C.encode(findings, sex=kw.get("sex", "F"), age=kw.get("age", 70.0), race="Asian",
                    view="AP", source="phantom", report=report, report_len=report_len)


def test_every_group_value_has_its_own_id_inside_the_vocab():
    ids = set()
    for f in range(len(C.FINDINGS)):
        for s in range(len(C.STATES)):
            codes = np.zeros(len(C.FINDINGS), np.int8)
            codes[f] = s
            ids.add(int(C.encode(codes)[f]))
    assert len(ids) == len(C.FINDINGS) * len(C.STATES)
    for sex in C.SEXES:
        ids.add(int(C.encode(np.zeros(14, np.int8), sex=sex)[14]))
    for view in C.VIEWS:
        ids.add(int(C.encode(np.zeros(14, np.int8), view=view)[17]))
    nulls = C.null_tokens(report_len=4)
    assert not ids & set(nulls.tolist())          # null tokens never collide with values
    assert len(set(nulls[: C.NUM_STRUCTURED].tolist())) == C.NUM_STRUCTURED
    assert max(ids | set(nulls.tolist())) < C.vocab_size()


def test_layout_and_report_bytes():
    row = _row("Cardiomegaly.", report_len=20)
    assert row.shape == (C.num_tokens(20),) and row.dtype == np.int32
    sl = C.group_slices(20)
    assert [sl[g].stop - sl[g].start for g in C.GROUPS] == [14, 1, 1, 1, 1, 1, 20]
    rep = row[sl["report"]]
    assert len(set(rep[13:].tolist())) == 1      # padding after the 13 bytes
    assert C.encode(np.zeros(14, np.int8), report="x" * 50, report_len=8).shape == (C.NUM_STRUCTURED + 8,)


def test_age_bins():
    assert C.age_bin(None) == C.age_bin(float("nan")) == C.age_bin(-1) == 0
    assert C.AGE_BINS[C.age_bin(19.9)] == "0-19"
    assert C.AGE_BINS[C.age_bin(70)] == "70-79"
    assert C.AGE_BINS[C.age_bin(101)] == "80+"


def test_drop_replaces_exactly_the_chosen_groups():
    row = _row("abc", report_len=5)
    nulls = C.null_tokens(5)
    out = C.drop(row, {"sex": True, "report": True})
    sl = C.group_slices(5)
    np.testing.assert_array_equal(out[sl["sex"]], nulls[sl["sex"]])
    np.testing.assert_array_equal(out[sl["report"]], nulls[sl["report"]])
    for g in ("findings", "age", "race", "view", "source"):
        np.testing.assert_array_equal(out[sl[g]], row[sl[g]])
    np.testing.assert_array_equal(C.drop(row, {g: True for g in C.GROUPS}), nulls)


def test_dropout_rates_are_independent_per_group():
    rows = np.tile(_row(), (20000, 1))
    out = C.dropout(rows, np.random.default_rng(0), {"findings": 0.5, "sex": 0.1, "view": 0.0})
    sl, nulls = C.group_slices(), C.null_tokens()
    f_drop = (out[:, sl["findings"]] == nulls[sl["findings"]]).all(1)
    s_drop = (out[:, sl["sex"]] == nulls[sl["sex"]]).all(1)
    assert abs(f_drop.mean() - 0.5) < 0.02 and abs(s_drop.mean() - 0.1) < 0.01
    assert abs((f_drop & s_drop).mean() - 0.05) < 0.01     # independent
    assert not (out[:, sl["view"]] == nulls[sl["view"]]).any()


def test_parse_user_conditions():
    c = C.Conditions.parse("Cardiomegaly, Pleural Effusion=uncertain", sex="f", age=70, view="pa")
    d = c.describe()
    assert d["findings"]["Cardiomegaly"] == "positive"
    assert d["findings"]["Pleural Effusion"] == "uncertain"
    assert d["findings"]["No Finding"] == "negative" and d["findings"]["Edema"] == "negative"
    assert (d["sex"], d["view"]) == ("F", "PA")
    assert C.Conditions.parse("").describe()["findings"]["No Finding"] == "positive"


@pytest.mark.parametrize("kwargs, needle", [
    (dict(findings="Cardiomegally"), "unknown finding 'Cardiomegally'; valid: No Finding"),
    (dict(findings="Edema=maybe"), "valid: unmentioned, positive, negative, uncertain"),
    (dict(sex="X"), "unknown sex 'X'; valid: unknown, M, F"),
    (dict(view="OBLIQUE"), "unknown view"),
    (dict(age=200.0), "age must be in [0, 150)"),
])
def test_bad_conditions_name_the_valid_values(kwargs, needle):
    findings = kwargs.pop("findings", "")
    with pytest.raises(C.ConditionError) as e:
        C.Conditions.parse(findings, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)
