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


def test_age_bins_of_the_printed_marginals():
    assert C.age_bin(None) == C.age_bin(float("nan")) == C.age_bin(-1) == 0
    assert C.AGE_BINS[C.age_bin(19.9)] == "0-19"
    assert C.AGE_BINS[C.age_bin(70)] == "70-79"
    assert C.AGE_BINS[C.age_bin(101)] == "80+"


def test_age_is_continuous_with_unknown_and_null_apart():
    """A known age is an id beyond the table that decodes to its years (to 0.1 y); a
    record's unknown age (-1, NaN, "unknown") and the not-specified null are table rows."""
    for years in (0.0, 0.1, 35.0, 35.4, 70.0, 149.9):
        tok = C.age_token(years)
        assert tok >= C.vocab_size() and C.age_years(tok) == pytest.approx(years, abs=0.05)
    assert C.age_token(35.0) != C.age_token(65.0)    # a decade apart: different conditions
    unknown = C.age_token(-1.0)
    assert unknown == C.age_token(float("nan")) == C.age_token("unknown") < C.vocab_size()
    null = C.age_token(None)
    assert null == C.null_tokens()[C.AGE_POS] and null not in (unknown, C.age_value_row())
    for bad in (150.0, 200.0, -3.0, float("inf")):
        with pytest.raises(C.ConditionError, match=r"age must be in \[0, 150\) years"):
            C.age_token(bad)
    with pytest.raises(C.ConditionError, match="age must be a number of years"):
        C.age_token("old")


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


def test_joint_dropout_makes_the_unconditional_row_the_sampler_guides_against():
    """Per-group drops of 0.1 alone give an all-null row with probability 1e-6; "all"
    makes it ~10% of rows, and the per-group drops still happen on the other rows."""
    rows = np.tile(_row(), (20000, 1))
    probs = {g: 0.1 for g in C.GROUPS}
    nulls = C.null_tokens()
    alone = C.dropout(rows, np.random.default_rng(0), probs)
    assert (alone == nulls).all(1).sum() == 0
    out = C.dropout(rows, np.random.default_rng(0), {"all": 0.1, **probs})
    uncond = (out == nulls).all(1)
    assert abs(uncond.mean() - 0.1) < 0.01
    sex = C.group_slices()["sex"]
    sex_only = (out[:, sex] == nulls[sex]).all(1) & ~uncond
    assert abs(sex_only.mean() - 0.9 * 0.1) < 0.01


def test_keep_only_and_group_sets():
    row = _row()
    nulls = C.null_tokens()
    sl = C.group_slices()
    kept = C.keep_only(row, ["demographics"])
    for g in ("sex", "age", "race"):
        np.testing.assert_array_equal(kept[sl[g]], row[sl[g]])
    for g in ("findings", "view", "source"):
        np.testing.assert_array_equal(kept[sl[g]], nulls[sl[g]])
    np.testing.assert_array_equal(C.keep_only(row, []), nulls)
    np.testing.assert_array_equal(C.keep_only(row, list(C.GROUPS)), row)
    with pytest.raises(C.ConditionError, match="unknown condition group 'colour'"):
        C.keep_only(row, ["colour"])


def test_parse_user_conditions():
    c = C.Conditions.parse("Cardiomegaly, Pleural Effusion=uncertain", sex="f", age=70, view="pa")
    d = c.describe()
    assert d["findings"]["Cardiomegaly"] == "positive"
    assert d["findings"]["Pleural Effusion"] == "uncertain"
    assert d["findings"]["No Finding"] == "negative" and d["findings"]["Edema"] == "negative"
    assert (d["sex"], d["view"]) == ("F", "PA")
    assert C.Conditions.parse("").describe()["findings"]["No Finding"] == "positive"
    assert c.label() == "Cardiomegaly, Pleural Effusion? | F 70y PA"


def test_not_specified_is_the_null_token_and_unknown_a_value():
    """Unset groups are their nulls; "unknown" is the data value; "=unspecified" is a
    finding's null; unlisted findings take the given (training-data) defaults."""
    sl, nulls = C.group_slices(), C.null_tokens()
    row = C.Conditions.parse("Cardiomegaly").tokens()
    for g in ("sex", "age", "race", "view", "source"):
        np.testing.assert_array_equal(row[sl[g]], nulls[sl[g]])
    unknown = C.Conditions.parse("", sex="unknown", age="unknown", race="unknown",
                                 view="unknown", source="unknown").tokens()
    for g in ("sex", "age", "race", "view", "source"):
        assert unknown[sl[g]][0] != nulls[sl[g]][0]
        assert unknown[sl[g]][0] == C.encode(np.zeros(14, np.int8))[sl[g]][0]   # a record's
    edema = C.FINDINGS.index("Edema")
    c = C.Conditions.parse("Edema=unspecified")
    assert c.findings[edema] == C.UNSPECIFIED and c.tokens()[edema] == nulls[edema]
    assert c.describe()["findings"]["Edema"] == "unspecified"
    assert "Edema=unspecified" not in c.requested()["findings"]
    # CheXpert-like data: unlisted findings are unmentioned; No Finding follows the positives.
    unlisted = {f: C.UNMENTIONED for f in C.FINDINGS}
    c = C.Conditions.parse("Cardiomegaly", unlisted=unlisted)
    assert c.describe()["findings"]["Edema"] == "unmentioned"
    assert c.describe()["findings"]["No Finding"] == "unmentioned"
    assert C.Conditions.parse("", unlisted=unlisted).describe()["findings"]["No Finding"] == "positive"
    # The report: None is the null report, "" an empty one (all padding).
    assert (C.Conditions.parse("").tokens(4)[C.NUM_STRUCTURED:] == nulls[0] * 0 +
            C.null_tokens(4)[C.NUM_STRUCTURED:]).all()
    assert (C.Conditions.parse("", report="").tokens(4)[C.NUM_STRUCTURED:] == C.report_pad_id()).all()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(findings="Cardiomegally"), "unknown finding 'Cardiomegally'; valid: No Finding"),
    (dict(findings="Edema=maybe"), "valid: unmentioned, positive, negative, uncertain, unspecified"),
    (dict(sex="X"), "unknown sex 'X'; valid: unknown, M, F"),
    (dict(view="OBLIQUE"), "unknown view"),
    (dict(age=200.0), "age must be in [0, 150)"),
    (dict(age=150.0), "age must be in [0, 150)"),
    (dict(age="old"), "age must be a number of years, 'unknown' or unset"),
])
def test_bad_conditions_name_the_valid_values(kwargs, needle):
    findings = kwargs.pop("findings", "")
    with pytest.raises(C.ConditionError) as e:
        C.Conditions.parse(findings, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def _group_ids(report_len: int = 3) -> dict[str, set[int]]:
    """Every token id each group can emit, values and null alike, through ``encode`` and
    ``null_tokens`` only (so a layout bug in either shows up, not a copy of the offsets)."""
    zeros = np.zeros(len(C.FINDINGS), np.int8)
    sl = C.group_slices(report_len)
    ids = {g: set() for g in C.GROUPS}
    for f in range(len(C.FINDINGS)):
        for s in range(len(C.STATES)):
            codes = zeros.copy()
            codes[f] = s
            ids["findings"].add(int(C.encode(codes)[f]))
    scalar = {"sex": C.SEXES, "race": C.RACES, "view": C.VIEWS, "source": C.SOURCES}
    for g, values in scalar.items():
        for v in values:
            ids[g].add(int(C.encode(zeros, **{g: v})[sl[g]][0]))
    # The age slot's table rows: a record's unknown and the row known ages embed (their
    # years are ids beyond the table: test_age_is_continuous...).
    ids["age"] |= {int(C.encode(zeros, age=-1.0)[sl["age"]][0]), C.age_value_row()}
    ids["report"].add(int(C.encode(zeros, report_len=report_len)[sl["report"]][0]))   # padding
    for ch in map(chr, range(128)):           # ASCII: one byte each
        ids["report"].add(int(C.encode(zeros, report=ch, report_len=report_len)[sl["report"]][0]))
    nulls = C.null_tokens(report_len)
    for g in C.GROUPS:
        ids[g] |= set(nulls[sl[g]].tolist())
    return ids


def test_token_ids_of_every_group_are_disjoint_and_distinct():
    ids = _group_ids()
    # Each group has exactly as many distinct ids as it has values (+ one null per slot
    # kind): a group reusing another's ids, or two values sharing one, changes these counts.
    want = {"findings": len(C.FINDINGS) * (len(C.STATES) + 1), "sex": len(C.SEXES) + 1,
            "age": len(C.AGE_ROWS) + 1, "race": len(C.RACES) + 1, "view": len(C.VIEWS) + 1,
            "source": len(C.SOURCES) + 1, "report": 128 + 2}   # ASCII bytes + pad + null
    assert {g: len(v) for g, v in ids.items()} == want
    groups = list(ids)
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            assert not ids[a] & ids[b], (a, b, sorted(ids[a] & ids[b]))
    # The groups tile the vocabulary in disjoint ranges, so each group's id range (not just
    # the ids seen) is its own.
    spans = sorted((min(v), max(v), g) for g, v in ids.items())
    for (lo1, hi1, g1), (lo2, hi2, g2) in zip(spans, spans[1:]):
        assert hi1 < lo2, (g1, g2)
    assert spans[0][0] >= 0 and spans[-1][1] < C.vocab_size()


def test_report_bytes_are_encoded_in_order_and_truncated():
    sl = C.group_slices(16)
    pad = C.encode(np.zeros(14, np.int8), report="", report_len=16)[sl["report"]]
    assert len(set(pad.tolist())) == 1           # an empty report is all padding ...
    assert pad[0] not in C.null_tokens(16)       # ... which is not the dropped (null) report
    text = "Effusion 2 cm, ü."                   # 18 UTF-8 bytes: the cut at 16 splits ü
    row = C.encode(np.zeros(14, np.int8), report=text, report_len=16)
    rep = row[sl["report"]]
    # Token - (token of byte 0) recovers the bytes: the ids are an order-preserving shift of
    # the byte values, so the model can tell every byte apart.
    zero = C.encode(np.zeros(14, np.int8), report="\x00", report_len=16)[sl["report"]][0]
    assert bytes((rep - zero).tolist()) == text.encode("utf-8")[:16]
    assert rep[-1] - zero == 0xC3                # bytes, not characters, are kept
    short = C.encode(np.zeros(14, np.int8), report="ab", report_len=16)[sl["report"]]
    assert bytes((short[:2] - zero).tolist()) == b"ab" and (short[2:] == pad[0]).all()
    assert pad[0] not in rep and len(set(rep.tolist())) > 10
    # The report never touches the structured tokens.
    np.testing.assert_array_equal(row[: C.NUM_STRUCTURED],
                                  C.encode(np.zeros(14, np.int8))[: C.NUM_STRUCTURED])
