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
    # One representative age per bin, "unknown" (None) included.
    for age in (None, 10, 25, 35, 45, 55, 65, 75, 90):
        ids["age"].add(int(C.encode(zeros, age=age)[sl["age"]][0]))
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
            "age": len(C.AGE_BINS) + 1, "race": len(C.RACES) + 1, "view": len(C.VIEWS) + 1,
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
