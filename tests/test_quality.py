from datetime import datetime

import polars as pl
import pytest

from warehouse.quality import validate_table

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
