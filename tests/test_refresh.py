"""The daily refresh: year partitions, an incremental fetch of only the new days, and a file
source that grows by one day at a time."""

from datetime import datetime, timedelta

import dagster as dg
import polars as pl
import pytest

from assets.ingest import INGEST_ASSETS, OVERLAP_DAYS, resume_point
from assets.quality import QUALITY_CHECKS
from assets.resources import MarketSourcesResource
from pipelines.definitions import defs
from pipelines.defs.resources import default_resources
from pipelines.defs.schedules import IN_PROCESS, INCREMENTAL, refresh_request
from warehouse import DataPaths, Lake, Warehouse
from warehouse.sources.synthetic import SyntheticOHLCV

ALL_ASSETS = list(defs().assets)
REFRESH = dg.AssetSelection.groups("ingest", "features", "forecast")
FIRST = datetime(2021, 3, 2)  # a Tuesday: the next three days are business days for macro too


def _write_bars(bars: pl.DataFrame, path, until: datetime) -> None:
    """The exchange's export as of `until`: every complete day before it."""
    bars.filter(pl.col("ts") < until).select(
        date=pl.col("ts").dt.strftime("%Y-%m-%d"),
        open="open",
        high="high",
        low="low",
        close="close",
        volume="volume",
    ).write_csv(path)


def _run(
    root, sources: MarketSourcesResource, tags: dict, run_config=None, instance=None
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [*ALL_ASSETS, *QUALITY_CHECKS],
        selection=REFRESH,
        resources={**default_resources(str(root)), "sources": sources},
        tags=tags,
        # materialize() runs in process anyway; its executor takes no `in_process` switch
        run_config={k: v for k, v in (run_config or {}).items() if k != "execution"},
        instance=instance,
    )


def _counts(root) -> dict[str, int]:
    wh, lake = Warehouse(DataPaths.at(root)), Lake(DataPaths.at(root).lake)
    return {
        **{t: wh.count(t) for t in ("ohlcv", "onchain", "macro")},
        "features": lake.read("features").height,
        "labels": lake.read("labels").height,
        "forecasts": wh.count("forecasts"),
    }


@pytest.fixture
def market(tmp_path):
    # from 2017: enough history before 2020 to train the 2021 fold's model
    bars = SyntheticOHLCV(symbols=("BTC-USD",)).fetch(datetime(2017, 1, 1), datetime(2021, 4, 1))
    path = tmp_path / "btc.csv"

    def sources(until: datetime) -> MarketSourcesResource:
        _write_bars(bars, path, until)
        return MarketSourcesResource(
            ohlcv_source="file",
            ohlcv_path=str(path),
            symbols=["BTC-USD"],
            until=f"{until:%Y-%m-%d}",
        )

    return tmp_path / "data", sources


def _train_a_model(root, instance) -> None:
    """The training dataset and a quick one-seed Mamba2 of the 2021 fold, as retrain_job's
    mamba_model trains it (the same process function, one epoch)."""
    from pipelines.train_sequences import train_sequence_models

    result = dg.materialize(
        ALL_ASSETS,
        selection=dg.AssetSelection.assets("training_dataset"),
        resources=default_resources(str(root)),
        instance=instance,
    )
    assert result.success
    fast = {"epochs": 1, "tbptt_len": 256, "patience": 1, "min_steps": 0}
    train_sequence_models(str(root), ["2021"], ["mamba2"], [0], fast, log=lambda _: None)


def _forecast_md(result) -> dict:
    (md,) = [m.metadata for m in result.asset_materializations_for_node("latest_forecast")]
    return md


def test_three_day_refresh_on_a_growing_file_adds_exactly_one_day_each_time(market, tmp_path):
    root, sources = market
    backfill = {
        "dagster/asset_partition_range_start": "2017",
        "dagster/asset_partition_range_end": "2021",
    }
    # a throwaway instance of its own: instance_for_test leaves DAGSTER_HOME-bound state behind
    # that breaks later in-process materializations in the same test process
    with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
        result = _run(root, sources(FIRST), backfill, instance=instance)
        assert result.success
        # no model yet: the forecast is skipped, not failed
        assert not result.asset_materializations_for_node("latest_forecast")
        _train_a_model(root, instance)
        result = dg.materialize(
            ALL_ASSETS,
            selection=dg.AssetSelection.assets("latest_forecast"),
            resources=default_resources(str(root)),
            instance=instance,
        )
        first = _forecast_md(result)
        assert first["mode"].value.startswith("recomputed from the start")  # no state yet
        before = _counts(root)
        assert before["forecasts"] > 30  # the model's out-of-sample days of 2021 so far
        newest = Warehouse(DataPaths.at(root)).read("ohlcv")["ts"].max()
        assert newest == FIRST - timedelta(days=1)
        for day in range(1, 4):
            today = FIRST + timedelta(days=day)
            request = refresh_request(instance, today + timedelta(hours=1))
            assert request.run_config == {**INCREMENTAL, **IN_PROCESS}
            result = _run(root, sources(today), request.tags, request.run_config, instance)
            assert result.success
            # each ingest fetched the new day and re-read its overlap before it (rewritten, not
            # added: the window is replaced)
            for asset, table in (("ohlcv_bars", "ohlcv"), ("onchain_metrics", "onchain")):
                (md,) = [m.metadata for m in result.asset_materializations_for_node(asset)]
                since = today - timedelta(days=1 + OVERLAP_DAYS[table])
                assert md["window"].value == f"[{since:%Y-%m-%d}, {today:%Y-%m-%d})", asset
                assert md["rows_inserted"].value - md["rows_replaced"].value == 1, asset
                assert md["rows_replaced"].value == OVERLAP_DAYS[table], asset
            # the forecast carried its state over the one new bar, not the history
            md = _forecast_md(result)
            assert md["mode"].value == "carried the saved state forward"
            assert md["bars_run"].value == 1 and md["rows_written"].value == 1
            assert md["as_of"].value == f"{today - timedelta(days=1):%Y-%m-%d}"
            after = _counts(root)
            grew = {k: after[k] - before[k] for k in after}
            # one bar, one on-chain row, one row per macro series (three daily ones, the dollar
            # index and the spread), one feature row, one label row and one forecast
            assert grew["ohlcv"] == 1 and grew["onchain"] == 1, grew
            assert grew["features"] == 1 and grew["labels"] == 1, grew
            assert grew["forecasts"] == 1, grew
            assert grew["macro"] >= 1, grew
            before = after
        assert Warehouse(DataPaths.at(root)).read("ohlcv")["ts"].max() == FIRST + timedelta(days=2)
        # a re-run for the same bar replaces its forecast with the same numbers
        stored = Warehouse(DataPaths.at(root)).read("forecasts").drop("created_at")
        request = refresh_request(instance, FIRST + timedelta(days=3, hours=2))
        result = _run(root, sources(FIRST + timedelta(days=3)), request.tags, INCREMENTAL, instance)
        assert result.success and _forecast_md(result)["rows_written"].value == 1
        again = Warehouse(DataPaths.at(root)).read("forecasts").drop("created_at")
        assert again.height == stored.height
        assert again.equals(stored)


def test_an_incremental_refresh_with_nothing_new_rewrites_only_its_overlap(market):
    root, sources = market
    src = sources(FIRST)
    tags = {
        "dagster/asset_partition_range_start": "2021",
        "dagster/asset_partition_range_end": "2021",
    }
    assert _run(root, src, tags).success
    before = Warehouse(DataPaths.at(root)).read("ohlcv")
    result = _run(root, src, tags, INCREMENTAL)
    assert result.success
    (md,) = [m.metadata for m in result.asset_materializations_for_node("ohlcv_bars")]
    assert md["rows_inserted"].value == md["rows_replaced"].value == OVERLAP_DAYS["ohlcv"]
    assert Warehouse(DataPaths.at(root)).read("ohlcv").equals(before)
    # with no overlap there is nothing to fetch at all
    no_overlap = {"ops": {"ohlcv_bars": {"config": {"incremental": True, "overlap_days": 0}}}}
    result = _run(root, src, tags, no_overlap)
    (md,) = [m.metadata for m in result.asset_materializations_for_node("ohlcv_bars")]
    assert md["rows_inserted"].value == 0 and md["window"].value.startswith("empty")
    assert Warehouse(DataPaths.at(root)).read("ohlcv").equals(before)


def test_the_resume_point_follows_the_entity_that_lags_most(tmp_path):
    wh = Warehouse(DataPaths.at(tmp_path))
    src = SyntheticOHLCV(symbols=("BTC-USD", "ACME"))
    wh.replace_bars(
        "1d",
        src.fetch(datetime(2021, 1, 1), datetime(2021, 1, 10)),
        datetime(2021, 1, 1),
        datetime(2021, 1, 10),
        src.entities,
        "synthetic",
    )
    # ACME (a stock) has no weekend bars: its newest bar is Friday 8 January
    assert resume_point(wh, "ohlcv", ["BTC-USD", "ACME"], "1d") == datetime(2021, 1, 9)
    assert resume_point(wh, "ohlcv", ["BTC-USD"], "1d") == datetime(2021, 1, 10)
    assert resume_point(wh, "ohlcv", ["BTC-USD", "GLBX"], "1d") is None  # GLBX has no rows
    hourly = SyntheticOHLCV(symbols=("BTC-USD",), timeframe="1h")
    rows = hourly.fetch(datetime(2021, 1, 1), datetime(2021, 1, 2))
    wh.replace_bars(
        "1h",
        rows.filter(pl.col("ts").dt.hour() < 13),
        datetime(2021, 1, 1),
        datetime(2021, 1, 2),
        ["BTC-USD"],
        "synthetic",
    )
    # an incomplete day of hourly bars is fetched again from its start
    assert resume_point(wh, "ohlcv_1h", ["BTC-USD"], "1h") == datetime(2021, 1, 1)


def test_a_window_after_the_cutoff_ingests_nothing_and_until_must_be_a_date(tmp_path):
    with pytest.raises(ValueError, match="sources.until='2021/03/01' is not a date"):
        MarketSourcesResource(until="2021/03/01").cutoff()
    assert MarketSourcesResource(until="2999-01-01").cutoff() <= datetime.now() + timedelta(days=1)
    result = dg.materialize(
        [*INGEST_ASSETS],
        resources={
            **default_resources(str(tmp_path)),
            "sources": MarketSourcesResource(until="2020-06-01"),
        },
        partition_key="2021",
    )
    assert result.success
    assert Warehouse(DataPaths.at(tmp_path)).count("ohlcv") == 0
