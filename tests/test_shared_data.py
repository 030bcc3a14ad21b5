"""Ingest the real files in ../shared/data through the file connectors (skipped without them)."""

from datetime import datetime

import polars as pl
import pytest

from tests.conftest import NO_SHARED_DATA, SHARED_DATA
from warehouse.sources import make_source

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=NO_SHARED_DATA),
]


def _ingest_all(warehouse, source):
    start = datetime(2000, 1, 1)
    end = datetime(2025, 7, 1)
    return warehouse.replace_bars(
        source.timeframe, source.fetch(start, end), start, end, source.entities, source.name
    )


def test_daily_bitstamp_file(warehouse):
    src = make_source(
        "ohlcv", "file", path=str(SHARED_DATA / "btc_usd_daily_bitstamp.csv"), symbols=("BTC-USD",)
    )
    (res,) = _ingest_all(warehouse, src)
    assert (res.table, res.rows_after) == ("ohlcv", 5066)
    s = warehouse.summary("ohlcv").row(0, named=True)
    assert s["first"] == datetime(2011, 8, 18) and s["last"] == datetime(2025, 6, 30)


def test_hourly_bitstamp_file_resamples_to_the_daily_file(warehouse):
    src = make_source(
        "ohlcv", "file", path=str(SHARED_DATA / "btc_usd_1h_bitstamp.csv"), symbols=("BTC-USD",)
    )
    hourly, daily = _ingest_all(warehouse, src)
    assert hourly.rows_after == 37386
    first, last = datetime(2018, 5, 16), datetime(2022, 8, 19)  # the complete days
    ours = warehouse.read("ohlcv", first, last)
    ref = make_source(
        "ohlcv", "file", path=str(SHARED_DATA / "btc_usd_daily_bitstamp.csv"), symbols=("BTC-USD",)
    ).fetch(first, last)
    joined = ours.join(ref, on=["symbol", "ts"], suffix="_ref")
    assert joined.height == (last - first).days
    rel = ((joined["close"] - joined["close_ref"]).abs() / joined["close_ref"]).median()
    assert rel < 1e-9  # the shared README: hourly bars aggregate to the daily file


def test_stock_files(warehouse):
    for name, symbol in (("AAPL_daily_stooq.csv", "AAPL"), ("GSPC_index_daily_yahoo.csv", "^GSPC")):
        src = make_source(
            "ohlcv", "file", path=str(SHARED_DATA / "stocks" / name), symbols=(symbol,)
        )
        _ingest_all(warehouse, src)
        got = warehouse.read("ohlcv", entities=[symbol])
        assert got.height > 6000
        assert got["ts"].max() == datetime(2025, 6, 30)
        assert got["ts"].dt.weekday().max() <= 5
    assert set(warehouse.summary("ohlcv")["entity"]) == {"AAPL", "^GSPC"}


def test_rerunning_a_file_ingest_adds_no_rows(warehouse):
    src = make_source(
        "ohlcv", "file", path=str(SHARED_DATA / "btc_usdt_1h_binance.csv"), symbols=("BTC-USDT",)
    )
    first = [r.rows_after for r in _ingest_all(warehouse, src)]
    again = [r.rows_after for r in _ingest_all(warehouse, src)]
    assert first == again and first[0] == 68881
    assert warehouse.read("ohlcv_1h").select(pl.col("ts").is_duplicated().any()).item() is False


def test_coinmetrics_csv_file(warehouse):
    src = make_source(
        "onchain", "coinmetrics_csv", path=str(SHARED_DATA / "btc_onchain_daily_coinmetrics.csv")
    )
    start, end = datetime(2009, 1, 1), datetime(2025, 7, 1)
    res = warehouse.replace_window(
        "onchain", src.fetch(start, end), start, end, src.entities, src.name
    )
    assert res.rows_after == 6023
    s = warehouse.summary("onchain").row(0, named=True)
    assert (s["first"].isoformat(), s["last"].isoformat()) == ("2009-01-03", "2025-06-30")
    recent = warehouse.read("onchain", datetime(2024, 1, 1), end)
    assert recent["hash_rate"].null_count() == 0 and recent["difficulty"].null_count() == 0


def test_fred_wide_file(warehouse):
    src = make_source("macro", "fred_file", path=str(SHARED_DATA / "macro_fred_daily.csv"))
    start, end = datetime(1962, 1, 1), datetime(2025, 7, 1)
    res = warehouse.replace_window(
        "macro", src.fetch(start, end), start, end, src.entities, src.name
    )
    assert res.rows_after == 45277
    macro = warehouse.read("macro")
    assert (macro["published"] > macro["date"]).all()
    dgs10 = macro.filter(pl.col("series") == "DGS10")
    assert dgs10["date"].min().isoformat() == "1962-01-02"
    assert dgs10["date"].max().isoformat() == "2025-06-30"
