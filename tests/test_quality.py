from datetime import date, datetime, timedelta

import polars as pl
import pytest

from ml.features import (
    FeatureConfig,
    compute_features,
    model_feature_columns,
    onchain_feature_columns,
)
from warehouse.quality import (
    validate_features,
    validate_moves,
    validate_rules,
    validate_table,
)

BAD_DAY = datetime(2018, 3, 5)


def _on_bad_day(col, value):
    return pl.when(pl.col("ts") == BAD_DAY).then(value).otherwise(pl.col(col)).alias(col)


def test_clean_synthetic_tables_pass(synthetic_ohlcv, synthetic_onchain, synthetic_macro):
    for table, df in (
        ("ohlcv", synthetic_ohlcv),
        ("onchain", synthetic_onchain),
        ("macro", synthetic_macro),
    ):
        report = validate_table(table, df)
        assert report.success, report.summary()
        assert len(report.outcomes) >= 8


@pytest.mark.parametrize(
    ("mutate", "rule"),
    [
        (
            lambda df: df.with_columns(_on_bad_day("high", pl.col("low") * 0.9)),
            "expect_column_pair_values_a_to_be_greater_than_b(column_A=high, column_B=low",
        ),
        (
            lambda df: df.with_columns(_on_bad_day("low", pl.lit(-1.0))),
            "expect_column_values_to_be_between(column=low",
        ),
        (
            lambda df: df.with_columns(_on_bad_day("volume", pl.lit(-5.0))),
            "expect_column_values_to_be_between(column=volume",
        ),
        (
            lambda df: df.with_columns(_on_bad_day("close", pl.lit(None, pl.Float64))),
            "expect_column_values_to_not_be_null(column=close",
        ),
        (
            lambda df: pl.concat([df, df.filter(pl.col("ts") == BAD_DAY)]),
            "expect_compound_columns_to_be_unique",
        ),
        (
            lambda df: df.sort("ts", descending=True),
            "expect_column_values_to_be_increasing(column=ts",
        ),
    ],
)
def test_each_planted_problem_fails_its_rule_and_names_the_rows(synthetic_ohlcv, mutate, rule):
    report = validate_table("ohlcv", mutate(synthetic_ohlcv))
    assert not report.success
    failed = [f for f in report.failures if f.rule.startswith(rule)]
    assert failed, report.summary()
    assert failed[0].unexpected_count >= 1
    assert failed[0].examples
    assert rule.split("(")[0] in report.summary()


def test_the_bad_rows_are_the_examples(synthetic_ohlcv):
    bad = synthetic_ohlcv.with_columns(_on_bad_day("high", pl.col("low") * 0.5))
    report = validate_table("ohlcv", bad)
    failure = next(f for f in report.failures if "column_B=low" in f.rule)
    assert failure.unexpected_count == 3  # one bad row for each of the three symbols
    assert {e["ts"] for e in failure.examples} == {BAD_DAY}
    assert {e["symbol"] for e in failure.examples} == {"BTC-USD", "ACME", "GLBX"}


def test_macro_published_before_observation_fails(synthetic_macro):
    bad = synthetic_macro.with_columns(published=pl.col("date") - pl.duration(days=3))
    report = validate_table("macro", bad)
    assert any("column_A=published" in f.rule for f in report.failures)


# --- polars rules: gaps, staleness, freshness, extreme moves; the features suite -------------


def _failed(report, name):
    return [f for f in report.failures if f.expectation == name]


def test_clean_tables_pass_the_rules(synthetic_ohlcv, synthetic_onchain, synthetic_macro):
    end = datetime(2022, 1, 1)
    for table, df in (
        ("ohlcv", synthetic_ohlcv),
        ("onchain", synthetic_onchain),
        ("macro", synthetic_macro),
    ):
        report = validate_rules(table, df, datetime(2021, 6, 1), end)
        assert report.success, report.summary()
    assert validate_moves(synthetic_ohlcv).success


def test_a_missing_crypto_day_is_a_gap_but_a_stock_weekend_is_not(synthetic_ohlcv):
    sunday = datetime(2018, 3, 4)
    bad = synthetic_ohlcv.filter(~((pl.col("symbol") == "BTC-USD") & (pl.col("ts") == sunday)))
    report = validate_rules("ohlcv", bad)
    [gap] = _failed(report, "mambacast_expect_no_gaps")
    assert gap.unexpected_count == 1
    assert gap.examples[0]["symbol"] == "BTC-USD"
    assert gap.examples[0]["ts"] == BAD_DAY and gap.examples[0]["missing"] == 1
    assert "mambacast_expect_no_gaps" in report.summary()


def test_a_stock_missing_a_business_week_is_a_gap(synthetic_ohlcv):
    week = pl.col("ts").is_between(datetime(2018, 3, 5), datetime(2018, 3, 9))
    bad = synthetic_ohlcv.filter(~((pl.col("symbol") == "ACME") & week))
    [gap] = _failed(validate_rules("ohlcv", bad), "mambacast_expect_no_gaps")
    assert gap.examples == [
        {
            "symbol": "ACME",
            "previous": date(2018, 3, 2),
            "ts": datetime(2018, 3, 12),
            "missing": 5,
            "calendar": "business",
        }
    ]


def test_a_forward_filled_macro_series_is_stale(synthetic_macro):
    frozen = (pl.col("series") == "DGS10") & (pl.col("date") >= date(2019, 1, 1))
    bad = synthetic_macro.with_columns(
        value=pl.when(frozen & (pl.col("date") > date(2019, 1, 2)))
        .then(None)
        .otherwise(pl.col("value"))
        .forward_fill()
        .over("series")
    )
    report = validate_rules("macro", bad, datetime(2019, 1, 1), datetime(2022, 1, 1))
    [stale] = _failed(report, "mambacast_expect_macro_not_stale")
    assert {e["series"] for e in stale.examples} == {"DGS10"}
    assert stale.examples[0]["last_new_value"] == date(2019, 1, 2)
    assert stale.examples[0]["business_days_without_new_value"] == 11


def test_a_macro_series_that_stopped_only_warns(synthetic_macro):
    bad = synthetic_macro.filter(
        (pl.col("series") != "DGS2") | (pl.col("date") < date(2021, 11, 1))
    )
    report = validate_rules("macro", bad, datetime(2021, 12, 1), datetime(2022, 1, 1))
    # a series ending before another is a ragged edge the features handle, not a defect
    assert report.success, report.summary()
    warned = {w.expectation: w for w in report.warnings}
    assert set(warned) == {
        "mambacast_expect_macro_current",
        "mambacast_expect_fresh_newest_partition",
    }
    assert {e["series"] for w in warned.values() for e in w.examples} == {"DGS2"}
    assert warned["mambacast_expect_macro_current"].examples[0]["last_new_value"] == date(
        2021, 10, 29
    )
    assert "1 of 5 expectations" not in report.summary()
    assert "warning mambacast_expect_macro_current" in report.summary()


def test_on_chain_rows_lagging_the_window_end_only_warn(synthetic_onchain):
    lagging = synthetic_onchain.filter(pl.col("date") < date(2021, 12, 29))
    report = validate_rules("onchain", lagging, datetime(2021, 12, 1), datetime(2022, 1, 1))
    assert report.success, report.summary()
    [fresh] = report.warnings
    assert fresh.expectation == "mambacast_expect_fresh_newest_partition"
    assert fresh.examples[0]["asset"] == "BTC" and fresh.examples[0]["missing"] == 3


def test_a_stock_missing_a_federal_holiday_and_two_more_days_is_not_a_gap(synthetic_ohlcv):
    # Martin Luther King Day 2018 (Monday 15) is not counted; Tuesday and Wednesday are
    days = pl.col("ts").is_between(datetime(2018, 1, 15), datetime(2018, 1, 17))
    holiday = synthetic_ohlcv.filter(~((pl.col("symbol") == "ACME") & days))
    assert validate_rules("ohlcv", holiday).success
    longer = pl.col("ts").is_between(datetime(2018, 1, 15), datetime(2018, 1, 18))
    gap = synthetic_ohlcv.filter(~((pl.col("symbol") == "ACME") & longer))
    [failure] = _failed(validate_rules("ohlcv", gap), "mambacast_expect_no_gaps")
    assert failure.examples[0]["missing"] == 3


def test_data_ending_before_the_window_end_is_not_fresh(synthetic_ohlcv):
    report = validate_rules("ohlcv", synthetic_ohlcv, datetime(2021, 12, 1), datetime(2022, 1, 10))
    [fresh] = _failed(report, "mambacast_expect_fresh_newest_partition")
    assert {e["symbol"] for e in fresh.examples} == {"BTC-USD", "ACME", "GLBX"}
    assert validate_rules("ohlcv", synthetic_ohlcv, None, datetime(2022, 1, 1)).success


def test_an_extreme_one_bar_move_is_reported(synthetic_ohlcv):
    jump = (pl.col("symbol") == "GLBX") & (pl.col("ts") == BAD_DAY)
    bad = synthetic_ohlcv.with_columns(
        [pl.when(jump).then(pl.col(c) * 3).otherwise(pl.col(c)).alias(c) for c in OHLC]
    )
    report = validate_moves(bad, datetime(2018, 1, 1))
    assert not report.success
    moves = report.failures[0]
    assert moves.expectation == "mambacast_expect_no_extreme_one_bar_move"
    assert [(e["symbol"], e["ts"]) for e in moves.examples] == [
        ("GLBX", BAD_DAY),
        ("GLBX", BAD_DAY.replace(day=6)),
    ]


OHLC = ["open", "high", "low", "close"]
CFG = FeatureConfig()
MODEL = model_feature_columns(CFG)
ONCHAIN = tuple(onchain_feature_columns(CFG))


@pytest.fixture(scope="module")
def feature_frame(synthetic_ohlcv, synthetic_onchain, synthetic_macro):
    end = datetime(2019, 7, 1)
    return compute_features(
        synthetic_ohlcv.filter(pl.col("ts") < end),
        synthetic_onchain.filter(pl.col("date") < end.date()),
        synthetic_macro.filter(pl.col("date") < end.date()),
        CFG,
    )


def test_clean_features_pass_their_suite(feature_frame):
    report = validate_features(feature_frame, MODEL, ONCHAIN)
    assert report.success, report.summary()
    # on-chain columns are null on the stocks, and that is allowed
    assert feature_frame.filter(pl.col("symbol") == "ACME")[ONCHAIN[0]].null_count() > 0


def test_features_rsi_out_of_range_and_nulls_after_warmup_fail(feature_frame):
    day = datetime(2019, 3, 4)
    rsi = next(c for c in MODEL if c.startswith("RSI"))
    bad = feature_frame.with_columns(
        pl.when(pl.col("ts") == day).then(150.0).otherwise(pl.col(rsi)).alias(rsi),
        pl.when((pl.col("ts") == day) & (pl.col("symbol") == "ACME"))
        .then(None)
        .otherwise(pl.col("log_ret_5"))
        .alias("log_ret_5"),
        pl.when((pl.col("ts") == day) & (pl.col("symbol") == "BTC-USD"))
        .then(None)
        .otherwise(pl.col(ONCHAIN[0]))
        .alias(ONCHAIN[0]),
    )
    report = validate_features(bad, MODEL, ONCHAIN)
    rules = {f.rule.split(",")[0]: f for f in report.failures}
    assert set(rules) == {
        f"expect_column_values_to_be_between(column={rsi}",
        "expect_column_values_to_not_be_null(column=log_ret_5)",
        f"expect_column_values_to_not_be_null(column={ONCHAIN[0]})",
    }, report.summary()
    assert rules["expect_column_values_to_not_be_null(column=log_ret_5)"].examples == [
        {"symbol": "ACME", "ts": day, "log_ret_5": None}
    ]


def test_features_missing_a_model_column_fail(feature_frame):
    report = validate_features(feature_frame.drop("log_ret_10"), MODEL, ONCHAIN)
    assert any(f.rule == "expect_column_to_exist(column=log_ret_10)" for f in report.failures)


MACRO_COLS = [c for c in MODEL if c.startswith(("DTWEXBGS", "DGS10", "DGS2", "T10Y2Y"))]
CARRIED = [*MACRO_COLS, *ONCHAIN]


def _null(frame, column, days, symbol: str | None = "BTC-USD"):
    """`column` set to null on `days` for `symbol` (every symbol: None)."""
    hit = pl.col("ts").dt.date().is_in(days)
    if symbol is not None:
        hit = hit & (pl.col("symbol") == symbol)
    return frame.with_columns(pl.when(hit).then(None).otherwise(pl.col(column)).alias(column))


def test_carried_columns_may_be_null_on_a_few_bars_but_not_more(feature_frame):
    def check(frame):
        return validate_features(
            frame, MODEL, ONCHAIN, carried_columns=CARRIED, max_missing_share=0.05
        )

    btc = feature_frame.filter(pl.col("symbol") == "BTC-USD").sort("ts")
    warm_days = btc["ts"].dt.date()[250:-1]  # after the warm-up, not the newest bar
    few = _null(_null(feature_frame, "DGS10", warm_days[:10]), ONCHAIN[0], warm_days[:10])
    assert check(few).success, check(few).summary()
    # without the carried share, the same holes fail
    strict = validate_features(few, MODEL, ONCHAIN)
    assert {f.rule for f in strict.failures} == {
        "expect_column_values_to_not_be_null(column=DGS10)",
        f"expect_column_values_to_not_be_null(column={ONCHAIN[0]})",
    }
    # every symbol, a quarter of 2018: about 10% of the bars after the warm-up
    quarter = pl.date_range(date(2018, 1, 1), date(2018, 3, 31), eager=True)
    many = _null(feature_frame, "DGS10", quarter, symbol=None)
    [failure] = check(many).failures
    assert failure.rule == "expect_column_values_to_not_be_null(column=DGS10, mostly=0.95)"


def test_a_carried_column_null_on_the_newest_bar_fails(feature_frame):
    newest = feature_frame.filter(pl.col("symbol") == "GLBX")["ts"].max()
    bad = _null(feature_frame, "T10Y2Y_chg_5", [newest.date()], symbol="GLBX")
    report = validate_features(bad, MODEL, ONCHAIN, carried_columns=CARRIED, max_missing_share=0.05)
    [failure] = report.failures
    assert failure.expectation == "mambacast_expect_carried_on_newest_bar"
    assert failure.examples == [{"symbol": "GLBX", "ts": newest, "column": "T10Y2Y_chg_5"}]
    # a null one bar earlier is within the share
    earlier = _null(feature_frame, "T10Y2Y_chg_5", [(newest - timedelta(days=1)).date()], "GLBX")
    assert validate_features(
        earlier, MODEL, ONCHAIN, carried_columns=CARRIED, max_missing_share=0.05
    ).success
