"""The exact contracts of the leakage checks in ml/leakage.py, on small hand-made frames: the
report fields (rule, passed, checked, offending rows, the detail's columns, rows and fix), the
tolerance and timestamp boundaries, and the helpers behind them. Written to kill the mutants
`make mutate` (mutmut) left surviving in ml/leakage.py; each test was checked to fail on its
mutants and pass on the real code."""

from datetime import date, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from ml.dataset import TEST, TRAIN, VAL, Standardizer
from ml.leakage import (
    LeakageReport,
    _diff,
    _first_offenders,
    _mismatches,
    check_fit_independence,
    check_label_alignment,
    check_scaler_matches_training_rows,
    check_split_hygiene,
    check_truncation_invariance,
    default_cuts,
    label_horizon,
    lanes_scaler,
    perturb_rows,
    standardizer_close,
)


def d(day: int, hour: int = 0) -> datetime:
    return datetime(2024, 1, day, hour)


# --- LeakageReport.summary ----------------------------------------------------------------------


def test_summary_of_a_failure_names_the_counts_and_shows_the_first_five_rows_by_default():
    report = LeakageReport("rule_x", False, 9, pl.DataFrame({"i": list(range(7))}), "why.")
    assert report.summary() == (
        "rule_x: FAILED, 7 offending rows of 9. why. e.g. "
        "[{'i': 0}, {'i': 1}, {'i': 2}, {'i': 3}, {'i': 4}]"
    )
    assert report.summary(max_rows=2) == (
        "rule_x: FAILED, 7 offending rows of 9. why. e.g. [{'i': 0}, {'i': 1}]"
    )


def test_summary_of_a_pass_names_the_rule_and_the_rows_checked():
    assert LeakageReport("rule_x", True, 3, detail="2 columns").summary() == (
        "rule_x: passed on 3 rows. 2 columns"
    )


# --- (a) truncation invariance: the comparison (_mismatches) -------------------------------------

# frames are built inside the tests, never at import: mutmut's workers fork from a server that
# collected this module, and a polars thread pool started before a fork hangs the child


def _ohlcv() -> pl.DataFrame:
    return pl.DataFrame(
        {"symbol": ["X"] * 6, "ts": [d(i) for i in range(1, 7)], "close": [1.0, 2, 3, 4, 5, 6]}
    )


def _onchain() -> pl.DataFrame:
    return pl.DataFrame({"date": [date(2024, 1, i) for i in range(1, 7)]})


def _macro() -> pl.DataFrame:
    return pl.DataFrame({"published": [date(2024, 1, i) for i in range(1, 7)]})


def _against(stored: pl.DataFrame, recomputed: pl.DataFrame, columns, tol=1e-9):
    """The stored snapshot compared with a feature code that returns `recomputed`, no cuts."""
    return check_truncation_invariance(
        _ohlcv(), _onchain(), _macro(), lambda o, c, m: recomputed, columns, [], tol, stored
    )


def _frame(values: dict, symbols=None) -> pl.DataFrame:
    n = len(next(iter(values.values())))
    return pl.DataFrame(
        {"symbol": symbols or ["X"] * n, "ts": [d(i + 1) for i in range(n)]}
    ).with_columns([pl.Series(k, v, dtype=pl.Float64) for k, v in values.items()])


def test_a_difference_counts_only_above_tol_times_one_plus_the_recomputed_value():
    # recomputed b = 1, tol 0.5: the bound is 0.5 * (1 + |b|) = 1.0, exactly
    stored = _frame({"f": [2.0, 2.25, 1.5, 0.0]})  # at the bound, above it, inside, at -1.0
    report = _against(stored, _frame({"f": [1.0, 1.0, 1.0, 1.0]}), ["f"], tol=0.5)
    assert report.offending.select("ts", "stored_value", "truncated_value").rows() == [
        (d(2), 2.25, 1.0)
    ]


def test_nan_and_infinite_values_differ_from_finite_ones_and_tiny_differences_do_not():
    stored = _frame({"f": [1.0, 1.0, 1.0 + 1e-12, float("nan"), float("-inf"), 5.0]})
    recomputed = _frame({"f": [float("inf"), float("nan"), 1.0, float("nan"), float("inf"), 5.0]})
    report = _against(stored, recomputed, ["f"])
    got = report.offending.select("ts", "stored_value", "truncated_value").rows()
    assert [r[0] for r in got] == [d(1), d(2), d(5)]
    assert got[0][1:] == (1.0, float("inf")) and got[2][1:] == (float("-inf"), float("inf"))
    assert got[1][1] == 1.0 and np.isnan(got[1][2])


def test_an_infinite_or_nan_value_equals_the_same_value():
    """|inf - inf| and NaN - NaN are NaN, which polars orders above every number: equal
    infinities and NaN on both sides (0 / 0 features such as a flat window's range position)
    must not read as a leak, while inf against -inf or a number still does."""
    inf, nan = float("inf"), float("nan")
    same = _frame({"f": [inf, -inf, nan, 1.0]})
    report = _against(same, _frame({"f": [inf, -inf, nan, 1.0]}), ["f"])
    assert report.passed, report.offending
    report = _against(same, _frame({"f": [-inf, 1.0, 2.0, nan]}), ["f"])
    assert report.offending["ts"].to_list() == [d(1), d(2), d(3), d(4)]


def test_a_column_the_recomputation_lacks_is_null_there_so_every_stored_value_differs():
    stored = _frame({"f": [1.0, 2.0, 3.0], "g": [1.0, None, 3.0]})
    report = _against(stored, _frame({"f": [1.0, 2.0, 3.0]}), ["f", "g"])
    assert report.offending.select("ts", "column", "stored_value", "truncated_value").rows() == [
        (d(1), "g", 1.0, None),
        (d(3), "g", 3.0, None),
    ]
    assert report.offending.schema["truncated_value"] == pl.Float64


def test_a_stored_row_missing_from_the_recomputation_is_an_offending_row():
    stored = _frame({"f": [1.0, 2.0, 3.0]}, symbols=["X", "X", "Y"])
    report = _against(stored, _frame({"f": [1.0, 2.0]}), ["f"])
    assert report.offending.select("symbol", "ts", "stored_value", "truncated_value").rows() == [
        ("Y", d(3), 3.0, None)
    ]


def test_the_recomputation_s_key_types_are_cast_to_the_stored_snapshot_s():
    # read back from Parquet, the snapshot's symbol may be categorical and its ts in ms
    stored = _frame({"f": [1.0, 2.0, 3.0]}).with_columns(
        pl.col("symbol").cast(pl.Categorical), pl.col("ts").cast(pl.Datetime("ms"))
    )
    report = _against(stored, _frame({"f": [1.0, 2.0, 4.0]}), ["f"])
    assert report.offending.select("symbol", "ts", "stored_value", "truncated_value").rows() == [
        ("X", d(3), 3.0, 4.0)
    ]


def test_mismatches_names_the_reference_values_full_value_by_default():
    bad = _mismatches(_frame({"f": [1.0, 2.0]}), _frame({"f": [1.0, 3.0]}), ["f"], 1e-9)
    assert bad.columns == ["symbol", "ts", "column", "full_value", "truncated_value"]
    assert bad.rows() == [("X", d(2), "f", 2.0, 3.0)]


# --- (a) truncation invariance: the report --------------------------------------------------------


def _clean(o, c, m):
    return o.select("symbol", "ts", f=pl.col("close"), g=pl.col("close") * 2)


def _next_close(o, c, m):
    """f reads the next bar's close: a look-ahead leak."""
    return _clean(o, c, m).with_columns(f=pl.col("f").shift(-1).over("symbol"))


RULE = "truncation_invariance(features at t depend only on data known at t)"
STORED_RULE = "truncation_invariance(stored features at t depend only on data known at t)"


def test_a_look_ahead_feature_is_named_at_each_cut_with_its_full_and_truncated_values():
    cuts = [d(4), d(6)]
    report = check_truncation_invariance(
        _ohlcv(), _onchain(), _macro(), _next_close, ["f", "g"], cuts
    )
    assert report.rule == RULE
    assert not report.passed
    assert report.checked == 3 + 5  # the rows before each cut
    assert report.offending.to_dicts() == [
        {"symbol": "X", "ts": d(3), "column": "f", "full_value": 4.0, "truncated_value": None,
         "cut": d(4)},
        {"symbol": "X", "ts": d(5), "column": "f", "full_value": 6.0, "truncated_value": None,
         "cut": d(6)},
    ]  # fmt: skip
    assert report.detail.startswith(
        "cuts ['2024-01-04', '2024-01-06'], 2 columns; columns that changed at the cuts: ['f'];"
        " first offending rows: f at 2024-01-03 00:00:00 (X, cut 2024-01-04). The features on"
        " these rows (full_value) differ"
    )
    assert "(truncated_value)" in report.detail and "a look-ahead leak" in report.detail
    assert report.detail.endswith(" in the feature definitions.")
    assert "stored" not in report.detail


def test_clean_features_pass_with_the_cuts_and_column_count_in_the_detail():
    report = check_truncation_invariance(_ohlcv(), _onchain(), _macro(), _clean, ["f", "g"], [d(4)])
    assert (report.rule, report.passed, report.checked) == (RULE, True, 3)
    assert report.detail == "cuts ['2024-01-04'], 2 columns"
    assert report.offending.is_empty()


def _leak_in(columns):
    """Column j reads whether a bar j + 1 days later exists: it changes at every cut, first
    j + 1 days before it."""

    def compute(o, c, m):
        last = pl.col("ts").max()
        return o.select(
            "symbol",
            "ts",
            *[
                (last - pl.col("ts") > timedelta(days=j)).cast(pl.Float64).alias(name)
                for j, name in enumerate(columns)
            ],
        )

    return compute


# an order a hash-based unique() does not keep: the columns are named in order of first offence
SCRAMBLED = ["e", "d", "c", "b", "a", "z", "y"]


def test_the_columns_that_changed_are_listed_in_order_of_their_first_offending_row():
    ohlcv = pl.DataFrame(
        {"symbol": ["X"] * 12, "ts": [d(i) for i in range(1, 13)], "close": [1.0] * 12}
    )
    compute = _leak_in(SCRAMBLED[::-1])  # the column that leaks earliest last
    report = check_truncation_invariance(ohlcv, _onchain(), _macro(), compute, SCRAMBLED, [d(12)])
    assert f"columns that changed at the cuts: {SCRAMBLED};" in report.detail


def test_a_snapshot_unlike_the_feature_code_output_is_reported_at_all_the_data_and_the_cuts():
    full = _clean(_ohlcv(), None, None)
    stored = full.with_columns(
        g=pl.when(pl.col("ts") == d(2)).then(-1.0).otherwise(pl.col("g")),  # before the cut
        f=pl.when(pl.col("ts") == d(5)).then(-1.0).otherwise(pl.col("f")),  # after it
    )
    report = check_truncation_invariance(
        _ohlcv(), _onchain(), _macro(), _clean, ["f", "g"], [d(4)], stored=stored
    )
    assert report.rule == STORED_RULE
    assert not report.passed
    assert report.checked == 6 + 3  # every stored row, then the stored rows before the cut
    assert report.offending.to_dicts() == [  # the comparison on all the data first
        {"symbol": "X", "ts": d(2), "column": "g", "stored_value": -1.0, "truncated_value": 4.0,
         "cut": None},
        {"symbol": "X", "ts": d(5), "column": "f", "stored_value": -1.0, "truncated_value": 5.0,
         "cut": None},
        {"symbol": "X", "ts": d(2), "column": "g", "stored_value": -1.0, "truncated_value": 4.0,
         "cut": d(4)},
    ]  # fmt: skip
    assert report.detail.startswith(
        "cuts ['2024-01-04'], 2 columns, and every stored row against the features of all the"
        " raw data; columns that differ from the feature code's output on all the raw data:"
        " ['f', 'g']; first offending rows: g at 2024-01-02 00:00:00 (X, all the data); f at"
        " 2024-01-05 00:00:00 (X, all the data). "
    )
    assert "(materialize features again); do not train on this snapshot;" in report.detail
    assert (
        "; columns that changed at the cuts: ['g']; first offending rows: g at 2024-01-02"
        " 00:00:00 (X, cut 2024-01-04). The stored features on these rows (stored_value) differ"
    ) in report.detail
    assert "(truncated_value)" in report.detail and "a look-ahead leak" in report.detail
    assert " in the code that wrote the snapshot or in the feature definitions" in report.detail
    assert report.detail.endswith("; do not train on this snapshot.")


def test_a_snapshot_that_differs_only_after_the_last_cut_names_no_change_at_the_cuts():
    full = _clean(_ohlcv(), None, None)
    stored = full.with_columns(f=pl.when(pl.col("ts") == d(5)).then(-1.0).otherwise(pl.col("f")))
    report = check_truncation_invariance(
        _ohlcv(), _onchain(), _macro(), _clean, ["f", "g"], [d(4)], stored=stored
    )
    assert report.offending.select("ts", "column", "cut").rows() == [(d(5), "f", None)]
    assert "changed at the cuts" not in report.detail
    assert report.detail.endswith("(materialize features again); do not train on this snapshot")


def test_the_stored_columns_that_differ_are_listed_in_the_order_of_the_model_columns():
    ohlcv = pl.DataFrame(
        {"symbol": ["X"] * 12, "ts": [d(i) for i in range(1, 13)], "close": [1.0] * 12}
    )
    stored = _leak_in(SCRAMBLED[::-1])(ohlcv, None, None).with_columns(
        [(1.0 - pl.col(c)).alias(c) for c in SCRAMBLED]  # every value the opposite
    )
    report = check_truncation_invariance(
        ohlcv, _onchain(), _macro(), _leak_in(SCRAMBLED[::-1]), SCRAMBLED, [], stored=stored
    )
    assert f"on all the raw data: {SCRAMBLED};" in report.detail


def test_a_clean_snapshot_passes_and_counts_every_stored_row_and_those_before_each_cut():
    stored = _clean(_ohlcv(), None, None)
    report = check_truncation_invariance(
        _ohlcv(), _onchain(), _macro(), _clean, ["f"], [d(3), d(5)], stored=stored
    )
    assert (report.rule, report.passed, report.checked) == (STORED_RULE, True, 6 + 2 + 4)
    assert report.detail == (
        "cuts ['2024-01-03', '2024-01-05'], 1 columns, and every stored row against the"
        " features of all the raw data"
    )


@pytest.mark.parametrize(("stored", "what"), [(False, "features"), (True, "stored features")])
def test_model_columns_missing_from_the_features_are_the_offending_rows(stored, what):
    snapshot = _clean(_ohlcv(), None, None) if stored else None
    report = check_truncation_invariance(
        _ohlcv(), _onchain(), _macro(), _clean, ["f", "nope", "zz"], [d(4)], stored=snapshot
    )
    assert report.rule == (STORED_RULE if stored else RULE)
    assert (report.passed, report.checked) == (False, 0)
    assert report.offending.to_dicts() == [{"column": "nope"}, {"column": "zz"}]
    assert report.detail == f"model columns missing from the {what}: ['nope', 'zz']"


# --- (a) _first_offenders -----------------------------------------------------------------------


def _offenders(rows) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={"symbol": pl.String, "ts": pl.Datetime("us"), "column": pl.String,
                "cut": pl.Datetime("us")},
        orient="row",
    )  # fmt: skip


def test_first_offenders_names_each_column_s_earliest_row_with_its_cut_or_all_the_data():
    offending = _offenders(
        [
            ("X", d(3), "f", d(4)),
            ("Y", d(2), "f", d(6)),
            ("X", d(2), "f", d(6)),
            ("X", d(5), "g", d(6)),
            ("X", d(2), "g", None),
        ]
    )
    assert _first_offenders(offending) == (
        "f at 2024-01-02 00:00:00 (X, cut 2024-01-06); g at 2024-01-02 00:00:00 (X, all the data)"
    )


def test_first_offenders_names_ten_columns_and_counts_the_rest():
    names = [f"c{i:02d}" for i in range(12)]
    ten = _offenders([("X", d(1, i), c, d(2)) for i, c in enumerate(names[:10])])
    assert _first_offenders(ten).count(" at ") == 10
    assert not _first_offenders(ten).endswith("more columns")
    eleven = _offenders([("X", d(1, i), c, d(2)) for i, c in enumerate(names[:11])])
    text = _first_offenders(eleven)
    assert text.endswith("; c09 at 2024-01-01 09:00:00 (X, cut 2024-01-02); and 1 more columns")
    assert "c10" not in text
    assert _first_offenders(eleven, max_columns=2) == (
        "c00 at 2024-01-01 00:00:00 (X, cut 2024-01-02); "
        "c01 at 2024-01-01 01:00:00 (X, cut 2024-01-02); and 9 more columns"
    )


# --- default_cuts -------------------------------------------------------------------------------


def _hours(start: datetime, days: int) -> pl.Series:
    return pl.Series("ts", [start + timedelta(hours=12 * k) for k in range(2 * days)])


def test_default_cuts_need_four_days_and_take_the_next_publication_weekday_or_the_day_itself():
    # Saturday 6 to Tuesday 9 January: n=2 picks days 2 (Monday) and 3 (Tuesday); the first
    # moves on to Tuesday, the second (wanting a Wednesday) has none after it and stays
    assert default_cuts(_hours(d(6), 4), n=2) == [d(9)]
    assert default_cuts(_hours(d(6), 3), n=2) == []


def test_default_cuts_spread_over_the_later_half_on_tuesday_to_friday_then_the_last_day():
    # 1 to 30 January 2024 (a Monday to a Tuesday), n=3: picks at days 15, 21 and 27 (Tue 16,
    # Mon 22, Sun 28) move to Tue 16, Wed 24 and (no Thursday left) Sun 28; then Tue 30
    assert default_cuts(_hours(d(1), 30)) == [d(16), d(24), d(28), d(30)]
    assert default_cuts(_hours(d(1), 30), n=2) == [d(16), d(28), d(30)]
    # n=5: days 15, 18, 21, 24, 27 move to Tue 16, Wed 24, Thu 25, Fri 26 and Tue 30
    assert default_cuts(_hours(d(1), 30), n=5) == [d(16), d(24), d(25), d(26), d(30)]


# --- (b) label alignment ------------------------------------------------------------------------


def test_label_horizon_reads_the_trailing_bar_count_or_none():
    assert (label_horizon("fwd_ret_5"), label_horizon("direction_90")) == (5, 90)
    assert label_horizon("direction") is None and label_horizon("fwd_ret_5x") is None


LABEL_RULE = "label_alignment(label_end_ts > ts; last h rows of each h-bar label null)"


def _labels() -> pl.DataFrame:
    rows = [  # symbol, ts, label_end_ts, fwd_ret_2, direction
        ("X", d(1), d(3), 0.1, 1.0),
        ("X", d(2), d(2), 0.1, 1.0),  # its window ends at its own time
        ("X", d(3), None, 0.1, 1.0),  # 2 bars from the end: its window is inside the data
        ("X", d(4), None, 0.5, 1.0),  # set within the last 2 bars
        ("X", d(5), None, None, 1.0),
        ("Y", d(1), datetime(2023, 12, 31), None, None),  # ends before its time
        ("Y", d(2), None, None, None),
        ("Y", d(3), None, None, None),
    ]
    schema = ["symbol", "ts", "label_end_ts", "fwd_ret_2", "direction"]
    return pl.DataFrame(rows[::-1], schema=schema, orient="row")


def test_each_misaligned_label_row_is_named_with_its_column_and_problem():
    report = check_label_alignment(_labels(), ["direction", "fwd_ret_2"], max_horizon=2)
    assert (report.rule, report.passed, report.checked) == (LABEL_RULE, False, 8)
    assert report.detail == "2 label columns"
    assert report.offending.rows() == [
        ("X", d(2), "label_end_ts", "label window ends at or before the row time"),
        ("Y", d(1), "label_end_ts", "label window ends at or before the row time"),
        ("X", d(3), "label_end_ts", "label_end_ts missing although the window is inside the data"),
        ("X", d(4), "fwd_ret_2", "set within the last 2 bars, whose 2-bar window runs past the data"),
    ]  # fmt: skip
    assert report.offending.columns == ["symbol", "ts", "column", "problem"]


def test_a_missing_label_end_is_only_checked_with_a_max_horizon():
    report = check_label_alignment(_labels(), ["fwd_ret_2"])
    assert ("X", d(3)) not in report.offending.select("symbol", "ts").rows()
    assert report.offending.height == 3


def test_labels_without_a_horizon_or_end_column_pass_with_nothing_to_check():
    labels = _labels().drop("label_end_ts")
    report = check_label_alignment(labels, ["direction"])
    assert (report.rule, report.passed, report.checked) == (LABEL_RULE, True, 8)
    assert report.offending.is_empty() and report.detail == "1 label columns"


# --- (c) split hygiene --------------------------------------------------------------------------

VAL_START, TEST_START, EMBARGO = d(10), d(20), timedelta(days=2)  # limits 8 and 18 January
REACHES = "label window reaches the next segment (minus embargo)"
MISMATCH = "split does not match the row time"


def test_split_hygiene_names_each_row_whose_label_reaches_on_or_whose_split_is_wrong():
    rows = [  # ts, split, label_end_ts, problem (None: a clean row)
        (d(1), TRAIN, d(7, 23), None),
        (d(2), TRAIN, d(8), REACHES),  # exactly at val_start - embargo
        (d(3), TRAIN, d(9), REACHES),
        (d(4), TRAIN, None, REACHES),  # a window of unknown end
        (d(9), VAL, d(10), MISMATCH),  # a validation row before val_start
        (d(10), TRAIN, d(11), MISMATCH),  # a training row at val_start
        (d(12), VAL, d(17, 23), None),
        (d(13), VAL, d(18), REACHES),  # exactly at test_start - embargo
        (d(14), VAL, None, REACHES),
        (d(19), TEST, d(25), MISMATCH),  # a test row before test_start
        (d(20), VAL, d(21), MISMATCH),  # a validation row at test_start
        (d(21), TEST, None, None),  # test rows may reach the end of the data
    ]
    data = pl.DataFrame(
        [("X", ts, s, e) for ts, s, e, _ in rows[::-1]],
        schema=["symbol", "ts", "split", "label_end_ts"],
        orient="row",
    )
    report = check_split_hygiene(data, VAL_START, TEST_START, EMBARGO)
    assert report.rule == (
        "split_hygiene(train label_end_ts < 2024-01-08, val label_end_ts < 2024-01-18, embargo 2d)"
    )
    assert (report.passed, report.checked, report.detail) == (False, 12, "")
    assert report.offending.columns == ["symbol", "ts", "split", "label_end_ts", "problem"]
    assert report.offending.rows() == [("X", ts, s, e, p) for ts, s, e, p in rows if p]


def test_a_clean_split_passes_with_an_empty_detail():
    data = pl.DataFrame(
        {"symbol": ["X", "X", "X"], "ts": [d(1), d(12), d(21)], "split": [TRAIN, VAL, TEST],
         "label_end_ts": [d(2), d(13), None]}
    )  # fmt: skip
    report = check_split_hygiene(data, VAL_START, TEST_START, EMBARGO)
    assert (report.passed, report.checked, report.detail) == (True, 3, "")
    assert report.summary() == (
        "split_hygiene(train label_end_ts < 2024-01-08, val label_end_ts < 2024-01-18, "
        "embargo 2d): passed on 3 rows."
    )


# --- (d) fitted transforms ----------------------------------------------------------------------


def _rows(split: bool = False) -> pl.DataFrame:
    data = pl.DataFrame(
        {"symbol": ["X"] * 5, "ts": [d(i) for i in range(1, 6)], "x": [1.0, 2, 3, 4, 5],
         "y": [0.0, 1, 0, 1, 0]}
    )  # fmt: skip
    return data.with_columns(split=pl.Series([TRAIN, TRAIN, VAL, VAL, TEST])) if split else data


def _is_train() -> pl.Series:
    return pl.Series([True, True, False, False, False])


def test_perturb_rows_replaces_the_masked_rows_with_seeded_normal_noise_around_1000():
    data = _rows()
    out = perturb_rows(data, ~_is_train(), ["x", "y"])
    rng = np.random.default_rng(0)
    noise = {c: rng.normal(1e3, 1e2, data.height) for c in ["x", "y"]}
    for c in ["x", "y"]:
        assert out[c].to_list()[:2] == data[c].to_list()[:2]
        assert out[c].to_list()[2:] == noise[c][2:].tolist()
    assert out.select("symbol", "ts").equals(data.select("symbol", "ts"))
    assert perturb_rows(data, ~_is_train(), ["x"], seed=0).equals(
        perturb_rows(data, ~_is_train(), ["x"])
    )
    assert perturb_rows(data, ~_is_train(), ["x"])["y"].equals(data["y"])  # only the columns named


def test_a_fit_on_training_rows_only_passes_fit_independence():
    report = check_fit_independence(
        lambda f: Standardizer.fit(f.head(2), ["x"]), _rows(), _is_train(), ["x"]
    )
    assert report.rule == "fit_independence(fit depends on training rows only)"
    assert (report.passed, report.checked) == (True, 5)
    assert report.detail == "3 non-training rows perturbed"
    assert report.offending.is_empty()


@pytest.mark.parametrize("with_split", [False, True])
def test_a_fit_on_all_rows_fails_naming_the_non_training_rows_and_the_changed_means(with_split):
    data = _rows(with_split)
    report = check_fit_independence(
        lambda f: Standardizer.fit(f, ["x", "y"]), data, _is_train(), ["x"], name="scaler"
    )
    assert report.rule == "fit_independence(scaler depends on training rows only)"
    assert (report.passed, report.checked) == (False, 5)
    keys = ["symbol", "ts", *(["split"] if with_split else [])]
    assert report.offending.equals(data.select(keys).tail(3))
    assert report.detail == (
        "the fitted scaler changed when the 3 non-training rows were perturbed: "
        "mean changed for columns ['x']"
    )


def test_diff_of_two_scalers_lists_at_most_ten_changed_columns():
    cols = [f"c{i}" for i in range(12)]
    a = Standardizer(cols, [0.0] * 12, [1.0] * 12)
    b = Standardizer(cols, [1.0] * 11 + [0.0], [1.0] * 12)
    assert _diff(a, b) == f"mean changed for columns {cols[:10]}"


def test_diff_refuses_scalers_of_different_lengths():
    with pytest.raises(ValueError, match="zip"):
        _diff(Standardizer(["a", "b"], [0.0, 0.0], [1.0, 1.0]), Standardizer(["a"], [0.0], [1.0]))


def test_diff_of_other_objects_shows_the_first_200_characters_of_each():
    assert _diff("a" * 300, "b" * 300) == "a" * 200 + " != " + "b" * 200
    scaler = Standardizer(["a"], [0.0], [1.0])
    assert _diff(scaler, None) == f"{scaler} != None"  # a scaler against something else


def test_standardizer_close_is_within_1e_9_relative_by_default():
    a = Standardizer(["x"], [1.0], [1.0])
    assert standardizer_close(a, Standardizer(["x"], [1.0 + 1e-10], [1.0]))
    assert not standardizer_close(a, Standardizer(["x"], [1.0 + 1e-6], [1.0]))
    assert not standardizer_close(a, Standardizer(["x"], [1.0], [1.0 + 1e-6]))


@pytest.mark.parametrize("field", ["mean", "std"])
def test_standardizer_close_allows_exactly_tol_times_one_plus_the_first_value(field):
    def pair(y):  # a's value 1.0, b's y: the bound is 0.5 * (1 + 1.0) = 1.0
        if field == "mean":
            return Standardizer(["x"], [1.0], [1.0]), Standardizer(["x"], [y], [1.0])
        return Standardizer(["x"], [0.0], [1.0]), Standardizer(["x"], [0.0], [y])

    assert standardizer_close(*pair(2.0), tol=0.5)  # exactly at the bound
    assert standardizer_close(*pair(1.5), tol=0.5)
    assert not standardizer_close(*pair(2.25), tol=0.5)
    assert not standardizer_close(*pair(0.0 - 1e-6), tol=0.5)


def test_standardizer_close_needs_the_same_columns_and_means_and_stds():
    a = Standardizer(["x"], [0.0], [1.0])
    assert not standardizer_close(a, Standardizer(["y"], [0.0], [1.0]))
    assert not standardizer_close(a, Standardizer(["x"], [5.0], [1.0]))
    assert not standardizer_close(a, Standardizer(["x"], [0.0], [5.0]))


@pytest.mark.parametrize("field", ["mean", "std"])
def test_standardizer_close_refuses_value_lists_of_different_lengths(field):
    a = Standardizer(["x", "y"], [0.0, 0.0], [1.0, 1.0])
    b = Standardizer(["x", "y"], [0.0, 0.0], [1.0, 1.0])
    setattr(b, field, [getattr(b, field)[0]])
    with pytest.raises(ValueError, match="zip"):
        standardizer_close(a, b)


SCALER_RULE = "scaler_fit_on_train_only(scaler used == Standardizer.fit(train rows))"


def _scaler_data() -> pl.DataFrame:
    tiny = 2.0**-60  # [-tiny, 0, tiny] has the exact std tiny
    train = {
        "z": [-1.0, 0.0, 1.0], "w": [-1.0, 0.0, 1.0], "o": [1.0, 1.0, 1.0],
        "p": [1.0, 1.0, 1.0], "q": [1.0, 1.0, 1.0], "r": [-tiny, 0.0, tiny],
    }  # fmt: skip
    rows = pl.DataFrame(train).with_columns(split=pl.lit(TRAIN))
    others = pl.DataFrame({c: [100.0, -50.0] for c in train}).with_columns(
        split=pl.Series([VAL, TEST])
    )
    return pl.concat([rows, others])


def test_a_scaler_fitted_on_the_training_rows_passes():
    data = _scaler_data()
    cols = ["z", "w", "o", "p", "q", "r"]
    used = Standardizer.fit(data.filter(pl.col("split") == TRAIN), cols)
    report = check_scaler_matches_training_rows(used, data, cols)
    assert (report.rule, report.passed, report.checked) == (SCALER_RULE, True, 3)
    assert report.detail == "6 columns" and report.offending.is_empty()


def test_the_scaler_columns_off_by_more_than_1e_9_relative_to_the_train_fit_are_named():
    data = _scaler_data()
    cols = ["z", "w", "o", "p", "q", "r"]
    ref = Standardizer.fit(data.filter(pl.col("split") == TRAIN), cols)
    tiny = 2.0**-60
    assert ref.mean == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    assert ref.std == [1.0, 1.0, 1.0, 1.0, 1.0, tiny]  # a zero std is fitted as 1
    r_std = tiny + 1e-9 * (1 + tiny)
    assert abs(r_std - tiny) == 1e-9 * (1 + tiny)  # exactly at the bound
    used = Standardizer(
        cols,
        [1e-9, 1.5e-9, 1.0 + 1e-9, 1.0, 1.0, 0.0],  # z at the bound, w above, o inside
        [1.0, 1.0, 1.0, 1.0 + 1e-9, 1.0 + 2.5e-9, r_std],  # p inside, q above, r at the bound
    )
    report = check_scaler_matches_training_rows(used, data, cols)
    assert (report.rule, report.passed, report.checked) == (SCALER_RULE, False, 3)
    assert report.detail == "the scaler differs from one fitted on the training rows"
    assert report.offending.to_dicts() == [
        {"column": "w", "used_mean": 1.5e-9, "train_mean": 0.0, "used_std": 1.0, "train_std": 1.0},
        {"column": "q", "used_mean": 1.0, "train_mean": 1.0, "used_std": 1.0 + 2.5e-9,
         "train_std": 1.0},
    ]  # fmt: skip


def test_a_scaler_off_by_half_in_the_mean_or_the_std_is_named():
    data = _scaler_data()
    used = Standardizer(["z", "w"], [0.5, 0.0], [1.0, 1.5])
    report = check_scaler_matches_training_rows(used, data, ["z", "w"])
    assert report.offending["column"].to_list() == ["z", "w"]


def test_a_scaler_of_other_columns_fails_as_columns_differ():
    data = _scaler_data()
    used = Standardizer(["z"], [0.0], [1.0])  # fitted on one of the two columns
    report = check_scaler_matches_training_rows(used, data, ["z", "w"])
    assert (report.rule, report.passed, report.checked) == (SCALER_RULE, False, 3)
    assert report.offending.to_dicts() == [{"column": "<columns differ>"}]
    assert report.detail == "the scaler differs from one fitted on the training rows"


def test_lanes_scaler_is_the_standardizer_of_the_training_rows_of_the_lanes():
    n = 8
    keys = {"symbol": ["X"] * n, "ts": [d(i) for i in range(1, n + 1)]}
    features = pl.DataFrame(
        {**keys, "a": [float(i) for i in range(n)], "b": [float(i * i) for i in range(n)]}
    )
    labels = pl.DataFrame(
        {**keys, "direction_2": [1.0, 0.0] * (n // 2), "fwd_ret_1": [0.01] * n,
         "fwd_ret_2": [0.02] * n, "fwd_vol_3": [0.1] * n}
    )  # fmt: skip
    splits = pl.DataFrame({**keys, "split": [TRAIN] * 5 + [VAL] * 2 + [TEST]})
    got = lanes_scaler(features, labels, splits, ("a", "b"), [1, 2], 2, 3)
    expected = Standardizer.fit(features.head(5), ["a", "b"])
    assert (got.columns, got.mean, got.std) == (["a", "b"], expected.mean, expected.std)
    assert expected.mean == [2.0, 6.0]
