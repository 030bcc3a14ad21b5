"""Ragged edges: sources whose series start, end or lag on different dates do not block the
graph. Macro and on-chain values are carried up to a limit, inputs missing at the end are
dropped from the model columns with a warning, and the blocking checks still catch defects."""

from datetime import date, datetime, timedelta

import dagster as dg
import polars as pl
import pytest

from assets.features import features
from assets.ingest import macro_series
from assets.leakage import features_truncation_invariance
from assets.quality import QUALITY_CHECKS, features_quality
from assets.resources import MarketSourcesResource, WarehouseResource
from ml.features import (
    FeatureConfig,
    compute_features,
    macro_series_of,
    model_feature_columns,
    onchain_feature_columns,
    onchain_symbols_of,
    select_model_columns,
)
from ml.leakage import check_truncation_invariance
from tests.conftest import NO_SHARED_DATA, SHARED_DATA
from warehouse import DataPaths, Lake, Warehouse
from warehouse.quality import (
    check_gaps,
    merge_reports,
    validate_features,
    validate_rules,
    validate_table,
)
from warehouse.sources import make_source

CFG = FeatureConfig()
START, END = datetime(2019, 1, 1), datetime(2021, 7, 1)  # the last bar is 2021-06-30
DTWEXBGS_LAST = date(2021, 2, 26)  # the dollar index ends four months before the price
ONCHAIN_LAST = date(2021, 6, 28)  # on-chain rows lag the price by two days
FOUR = ("DTWEXBGS", "DGS10", "DGS2", "T10Y2Y")
THREE = ("DGS10", "DGS2", "T10Y2Y")


def _write_macro_csv(path, macro: pl.DataFrame) -> None:
    """The wide FRED layout of ../shared/data/macro_fred_daily.csv, empty cells where missing."""
    wide = macro.pivot(on="series", index="date", values="value").sort("date")
    wide.select("date", *FOUR).write_csv(path)


def _write_coinmetrics_csv(path, onchain: pl.DataFrame) -> None:
    """The Coin Metrics community CSV layout (metric ids as columns, one asset per file)."""
    onchain.select(
        "date",
        pl.col("tx_count").alias("TxCnt"),
        pl.col("active_addresses").alias("AdrActCnt"),
        pl.col("fees_native").alias("FeeTotNtv"),
        pl.col("hash_rate").alias("HashRate"),
        pl.col("difficulty").alias("DiffMean"),
    ).write_csv(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """CSV files whose series end on different dates, made from the synthetic market."""
    folder = tmp_path_factory.mktemp("ragged")
    macro = make_source("macro", "synthetic").fetch(START - timedelta(days=60), END)
    macro = macro.filter((pl.col("series") != "DTWEXBGS") | (pl.col("date") <= DTWEXBGS_LAST))
    onchain = make_source("onchain", "synthetic").fetch(START, END)
    _write_macro_csv(folder / "macro.csv", macro)
    _write_coinmetrics_csv(folder / "onchain.csv", onchain.filter(pl.col("date") <= ONCHAIN_LAST))
    return folder


def _read(files, series=FOUR):
    """(ohlcv, onchain, macro) through the file connectors, as ingest would write them."""
    ohlcv = make_source("ohlcv", "synthetic", symbols=("BTC-USD", "ACME")).fetch(START, END)
    onchain = make_source("onchain", "coinmetrics_csv", path=str(files / "onchain.csv")).fetch(
        START, END
    )
    macro = make_source("macro", "fred_file", path=str(files / "macro.csv"), series=series).fetch(
        START - timedelta(days=60), END
    )
    return ohlcv, onchain, macro


@pytest.fixture(scope="module")
def ragged(files):
    ohlcv, onchain, macro = _read(files)
    frame = compute_features(ohlcv, onchain, macro, CFG)
    chosen = select_model_columns(frame, CFG, macro_series_of(macro), onchain_symbols_of(onchain))
    return {"raw": (ohlcv, onchain, macro), "frame": frame, "chosen": chosen}


def _after_warmup(frame: pl.DataFrame) -> pl.DataFrame:
    return (
        frame.sort(["symbol", "ts"])
        .with_columns(_bar=pl.int_range(pl.len()).over("symbol"))
        .filter(pl.col("_bar") >= CFG.warmup_bars)
    )


def _validate(frame: pl.DataFrame, chosen, onchain: pl.DataFrame, columns=None):
    return validate_features(
        frame,
        columns or chosen.columns,
        chosen.onchain_columns,
        CFG.warmup_bars,
        carried_columns=chosen.carried_columns,
        max_missing_share=CFG.max_missing_share,
        onchain_symbols=onchain_symbols_of(onchain),
    )


def test_a_macro_series_ending_early_is_dropped_with_a_warning_and_the_rest_kept(ragged):
    chosen = ragged["chosen"]
    [dropped] = chosen.dropped
    assert dropped.name == "DTWEXBGS" and dropped.source == "macro"
    assert dropped.stale_at_end == ("ACME", "BTC-USD")
    # carried for 10 days after its last publication (Monday 2021-03-01), then gone
    assert dropped.last_carried == "2021-03-11"
    assert "10-day carry limit on the newest bar" in dropped.message()
    assert not {"DTWEXBGS", "DTWEXBGS_chg_5"} & set(chosen.columns)
    assert {"DGS10", "DGS10_chg_5", "DGS2", "T10Y2Y_chg_5"} <= set(chosen.columns)
    assert chosen.onchain_columns == onchain_feature_columns(CFG)
    assert chosen.columns == [
        c for c in model_feature_columns(CFG) if c not in ("DTWEXBGS", "DTWEXBGS_chg_5")
    ]


def test_model_columns_have_no_nulls_after_the_warm_up(ragged):
    warm, chosen = _after_warmup(ragged["frame"]), ragged["chosen"]
    dense = [c for c in chosen.columns if c not in chosen.onchain_columns]
    assert warm.select(dense).null_count().sum_horizontal().item() == 0
    btc = warm.filter(pl.col("symbol") == "BTC-USD")
    assert btc.select(chosen.onchain_columns).null_count().sum_horizontal().item() == 0
    # the dropped series is still in the frame for people, null once its carry ran out
    assert warm["DTWEXBGS"].null_count() > 0


def test_on_chain_rows_lagging_the_price_are_carried_with_their_age(ragged):
    _, onchain, _ = ragged["raw"]
    btc = ragged["frame"].filter(pl.col("symbol") == "BTC-USD").sort("ts")
    last = btc.tail(2)
    assert last["ts"].to_list() == [datetime(2021, 6, 29), datetime(2021, 6, 30)]
    # both bars use day 06-28's totals: bar 06-29 as usual (day d-1), bar 06-30 one day late
    assert last["onchain_age_days"].to_list() == [0, 1]
    day = onchain.filter(pl.col("date") == ONCHAIN_LAST).row(0, named=True)
    assert last["fees_per_tx"].to_list() == pytest.approx(
        [day["fees_native"] / day["tx_count"]] * 2
    )


def test_on_chain_data_lagging_past_the_carry_limit_is_dropped(ragged):
    ohlcv, onchain, macro = ragged["raw"]
    late = onchain.filter(pl.col("date") <= date(2021, 6, 20))  # 10 days behind the price
    frame = compute_features(ohlcv, late, macro, CFG)
    chosen = select_model_columns(frame, CFG, macro_series_of(macro), onchain_symbols_of(late))
    dropped = {v.name: v for v in chosen.dropped}
    assert set(dropped) == {"DTWEXBGS", *onchain_feature_columns(CFG)}
    assert dropped["fees_per_tx"].stale_at_end == ("BTC-USD",)
    assert chosen.onchain_columns == []
    assert chosen.carried_columns == [c for s in THREE for c in (s, f"{s}_chg_5")]
    assert _validate(frame, chosen, late).success


def test_the_quality_checks_pass_on_ragged_sources_and_warn_about_the_edges(ragged):
    ohlcv, onchain, macro = ragged["raw"]
    for table, rows, lagging in (("macro", macro, "DTWEXBGS"), ("onchain", onchain, "BTC")):
        report = merge_reports(validate_table(table, rows), validate_rules(table, rows, START, END))
        assert report.success, report.summary()
        warned = {w.expectation: w for w in report.warnings}
        assert "mambacast_expect_fresh_newest_partition" in warned, report.summary()
        for w in warned.values():
            assert {next(iter(e.values())) for e in w.examples} == {lagging}
        assert "warning mambacast_expect_fresh_newest_partition" in report.summary()
    frame, chosen = ragged["frame"], ragged["chosen"]
    assert _validate(frame, chosen, onchain).success
    # without the rule, the candidate columns fail: DTWEXBGS is null on every newest bar
    candidates = model_feature_columns(CFG, macro_series_of(macro))
    report = validate_features(
        frame,
        candidates,
        chosen.onchain_columns,
        CFG.warmup_bars,
        carried_columns=[c for c in candidates if c.startswith(FOUR)],
        max_missing_share=1.0,
        onchain_symbols=["BTC-USD"],
    )
    [failure] = report.failures
    assert failure.expectation == "mambacast_expect_carried_on_newest_bar"
    assert {(e["symbol"], e["column"]) for e in failure.examples} >= {
        ("ACME", "DTWEXBGS"),
        ("BTC-USD", "DTWEXBGS"),
    }


def test_only_the_configured_macro_series_get_columns(files):
    ohlcv, onchain, macro = _read(files, series=THREE)
    assert macro_series_of(macro) == THREE
    frame = compute_features(ohlcv, onchain, macro, CFG)
    assert not [c for c in frame.columns if c.startswith("DTWEXBGS")]
    chosen = select_model_columns(frame, CFG, macro_series_of(macro), onchain_symbols_of(onchain))
    assert chosen.dropped == []
    assert not [c for c in chosen.columns if c.startswith("DTWEXBGS")]
    assert {"DGS10", "DGS2_chg_5", "T10Y2Y"} <= set(chosen.columns)
    report = _validate(frame, chosen, onchain)
    assert report.success, report.summary()


def test_a_series_starting_after_most_bars_is_dropped_one_starting_early_is_kept(ragged):
    ohlcv, onchain, macro = ragged["raw"]
    late = macro.filter((pl.col("series") != "T10Y2Y") | (pl.col("date") >= date(2020, 6, 1)))
    frame = compute_features(ohlcv, onchain, late, CFG)
    chosen = select_model_columns(frame, CFG, macro_series_of(late), onchain_symbols_of(onchain))
    dropped = {v.name: v for v in chosen.dropped}
    assert set(dropped) == {"DTWEXBGS", "T10Y2Y"}
    assert dropped["T10Y2Y"].stale_at_end == ()
    assert "bars after the warm-up (at most 5% allowed)" in dropped["T10Y2Y"].reasons[0]
    # DGS10 starts two months before the price: every bar after the warm-up has it
    assert {v.name: v.missing_share for v in chosen.verdicts}["DGS10"] == 0.0
    assert _validate(frame, chosen, onchain).success


def test_carried_values_use_only_publications_up_to_the_bar(ragged):
    ohlcv, onchain, macro = ragged["raw"]
    dollar = macro.filter(pl.col("series") == "DTWEXBGS")
    btc = ragged["frame"].filter(pl.col("symbol") == "BTC-USD")
    for row in btc.filter(
        pl.col("ts").is_between(datetime(2021, 2, 15), datetime(2021, 3, 20))
    ).iter_rows(named=True):
        day = row["ts"].date()
        known = dollar.filter(pl.col("published") <= day).sort(["published", "date"]).tail(1)
        age = (day - known["published"][0]).days
        expected = known["value"][0] if age <= CFG.macro_max_staleness_days else None
        assert row["DTWEXBGS"] == expected, day
        assert row["DTWEXBGS_age_days"] == (age if expected is not None else None), day
    carried = [
        *model_feature_columns(CFG),
        "DTWEXBGS_age_days",
        "DGS10_age_days",
        "onchain_age_days",
    ]
    report = check_truncation_invariance(
        ohlcv,
        onchain,
        macro,
        lambda o, c, m: compute_features(o, c, m, CFG),
        carried,
        # inside DTWEXBGS's carry, just after it, and inside the on-chain lag at the end
        cuts=[datetime(2021, 3, 4), datetime(2021, 3, 15), datetime(2021, 6, 30)],
    )
    assert report.passed, report.summary()


@pytest.mark.parametrize(
    ("hole", "passes"),
    [
        # DTWEXBGS in January 2016 (the blizzard): Friday 22, Monday 25, Tuesday 26
        ((date(2016, 1, 22), date(2016, 1, 26)), True),
        # a business week, as DTWEXBGS in February 2010 (4 days) and one more
        ((date(2017, 2, 6), date(2017, 2, 10)), True),
        # Christmas week 2016: Fri 23, Mon 26 (the observed holiday, not counted), Tue-Fri
        ((date(2016, 12, 23), date(2016, 12, 30)), True),
        ((date(2017, 2, 6), date(2017, 2, 13)), False),  # 6 business days
        ((date(2017, 5, 1), date(2017, 5, 12)), False),  # two weeks: a broken download
    ],
)
def test_the_gap_rule_tolerates_short_holes_and_holidays_not_long_gaps(
    synthetic_macro, hole, passes
):
    first, last = hole
    rows = synthetic_macro.filter(
        (pl.col("series") != "DTWEXBGS") | ~pl.col("date").is_between(first, last)
    )
    report = validate_rules("macro", rows, datetime(2016, 1, 1), datetime(2022, 1, 1))
    assert report.success is passes, report.summary()
    if not passes:
        [gap] = report.failures
        assert gap.expectation == "mambacast_expect_no_gaps"
        [example] = gap.examples
        assert example["series"] == "DTWEXBGS" and example["previous"] < first
        assert example["missing"] > 5


def test_a_long_gap_counts_business_days_without_federal_holidays(synthetic_macro):
    # the two weeks around Thanksgiving 2017 (Thursday 23): 10 business days, one a holiday
    rows = synthetic_macro.filter(
        (pl.col("series") != "DGS2")
        | ~pl.col("date").is_between(date(2017, 11, 20), date(2017, 12, 1))
    )
    gap = check_gaps("macro", rows)
    assert gap.examples == [
        {
            "series": "DGS2",
            "previous": date(2017, 11, 17),
            "date": date(2017, 12, 4),
            "missing": 9,
            "calendar": "business",
        }
    ]


def test_the_features_asset_drops_the_early_ending_series_and_its_checks_pass(ragged, tmp_path):
    ohlcv, onchain, macro = ragged["raw"]
    root = tmp_path / "data"
    store = Warehouse(DataPaths.at(root), lock_timeout_s=60)
    store.replace_bars("1d", ohlcv, START, END, ["BTC-USD", "ACME"], "test")
    store.replace_window("onchain", onchain, START, END, ["BTC"], "test")
    store.replace_window("macro", macro, START - timedelta(days=60), END, list(FOUR), "test")
    result = dg.materialize(
        [features, features_quality, features_truncation_invariance],
        resources={"warehouse": WarehouseResource(data_dir=str(root))},
    )
    assert result.success
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == {"features_quality", "features_truncation_invariance"}
    assert all(e.passed for e in evaluations.values()), evaluations
    md = result.asset_materializations_for_node("features")[0].metadata
    assert list(md["dropped_inputs"].value) == ["DTWEXBGS"]
    meta = Lake(DataPaths.at(root).lake).read_meta("features")
    assert meta["model_columns"] == ragged["chosen"].columns
    assert meta["macro_series"] == list(FOUR) and meta["onchain_symbols"] == ["BTC-USD"]
    assert [i["name"] for i in meta["inputs"] if not i["kept"]] == ["DTWEXBGS"]


# --- the real files in ../shared/data (skipped without them) ----------------------------------

needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=NO_SHARED_DATA)


@pytest.fixture(scope="module")
def real():
    first, end = datetime(2011, 8, 18), datetime(2025, 7, 1)
    ohlcv = make_source(
        "ohlcv", "file", path=str(SHARED_DATA / "btc_usd_daily_bitstamp.csv"), symbols=("BTC-USD",)
    ).fetch(first, end)
    onchain = make_source(
        "onchain", "coinmetrics_csv", path=str(SHARED_DATA / "btc_onchain_daily_coinmetrics.csv")
    ).fetch(first, end)
    macro = make_source(
        "macro", "fred_file", path=str(SHARED_DATA / "macro_fred_daily.csv"), series=FOUR
    ).fetch(datetime(2006, 1, 1), end)  # from DTWEXBGS's start, with its 2010 and 2016 holes
    return ohlcv, onchain, macro, end


@pytest.mark.realdata
@needs_shared_data
def test_the_real_files_pass_the_checks_and_keep_every_input(real):
    ohlcv, onchain, macro, end = real
    for table, rows in (("macro", macro), ("onchain", onchain)):
        report = merge_reports(validate_table(table, rows), validate_rules(table, rows, None, end))
        assert report.success and not report.warnings, report.summary()
    frame = compute_features(ohlcv, onchain, macro, CFG)
    chosen = select_model_columns(frame, CFG, macro_series_of(macro), onchain_symbols_of(onchain))
    assert chosen.dropped == [] and chosen.columns == model_feature_columns(CFG)
    assert _validate(frame, chosen, onchain).success


@pytest.mark.realdata
@needs_shared_data
def test_the_real_files_with_the_issue_s_ragged_ends_do_not_block(real):
    ohlcv, onchain, macro, end = real
    # as in the full 2026 files: DTWEXBGS ends six months before the price, on-chain lags
    macro = macro.filter((pl.col("series") != "DTWEXBGS") | (pl.col("date") <= date(2024, 12, 27)))
    onchain = onchain.filter(pl.col("date") <= date(2025, 6, 28))
    for table, rows in (("macro", macro), ("onchain", onchain)):
        report = merge_reports(validate_table(table, rows), validate_rules(table, rows, None, end))
        assert report.success and report.warnings, report.summary()
    frame = compute_features(ohlcv, onchain, macro, CFG)
    chosen = select_model_columns(frame, CFG, macro_series_of(macro), onchain_symbols_of(onchain))
    assert [v.name for v in chosen.dropped] == ["DTWEXBGS"]
    assert chosen.onchain_columns == onchain_feature_columns(CFG)
    assert _validate(frame, chosen, onchain).success
    three = macro.filter(pl.col("series").is_in(THREE))
    frame = compute_features(ohlcv, onchain, three, CFG)
    assert not [c for c in frame.columns if c.startswith("DTWEXBGS")]
    chosen = select_model_columns(frame, CFG, THREE, onchain_symbols_of(onchain))
    assert chosen.dropped == [] and _validate(frame, chosen, onchain).success


def test_the_blocking_macro_check_passes_with_a_warning_when_a_series_ends_early(files, tmp_path):
    [check] = [c for c in QUALITY_CHECKS if {s.name for s in c.check_specs} == {"macro_quality"}]
    sources = MarketSourcesResource(
        macro_source="fred_file",
        macro_path=str(files / "macro.csv"),
        macro_series=list(FOUR),
        until="2021-04-01",
    )
    result = dg.materialize(
        [macro_series, check],
        resources={"warehouse": WarehouseResource(data_dir=str(tmp_path)), "sources": sources},
        partition_key="2021",
    )
    assert result.success
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.passed, evaluation.description
    assert evaluation.metadata["warned"].value == 2 and evaluation.metadata["failed"].value == 0
    assert "warning mambacast_expect_macro_current" in evaluation.description
    assert "DTWEXBGS" in evaluation.metadata["warnings"].value
