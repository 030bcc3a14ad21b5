from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from warehouse.schema import OHLCV, conform
from warehouse.sources import SourceError, make_source
from warehouse.sources.base import SourceFetchError

PRICES = ("open", "high", "low", "close")


def _tidy(n, step, start=datetime(2021, 1, 1)):
    ts = [start + i * step for i in range(n)]
    price = 100 + np.arange(n, dtype=float)
    return pl.DataFrame(
        {
            "ts": ts,
            "open": price,
            "high": price + 1,
            "low": price - 1,
            "close": price + 0.5,
            "volume_btc": np.ones(n),
        }
    )


def test_tidy_daily_csv_with_date_column(tmp_path):
    df = _tidy(10, timedelta(days=1)).with_columns(date=pl.col("ts").dt.strftime("%Y-%m-%d"))
    path = tmp_path / "btc_daily.csv"
    df.drop("ts").select(["date", "open", "high", "low", "close", "volume_btc"]).write_csv(path)
    src = make_source("ohlcv", "file", path=str(path), symbols=("BTC-USD",))
    assert src.timeframe == "1d"
    got = src.fetch(datetime(2021, 1, 3), datetime(2021, 1, 6))
    assert got["ts"].to_list() == [datetime(2021, 1, d) for d in (3, 4, 5)]
    assert got["volume"].to_list() == [1.0, 1.0, 1.0]
    assert conform(got, OHLCV, "file").height == 3


def test_tidy_hourly_csv_with_iso_utc_times_and_a_gap(tmp_path):
    df = _tidy(48, timedelta(hours=1)).with_columns(
        datetime_utc=pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    hole = pl.col("ts") == datetime(2021, 1, 1, 5)
    gap = df.with_columns([pl.when(hole).then(None).otherwise(pl.col(c)).alias(c) for c in PRICES])
    path = tmp_path / "btc_1h.csv"
    gap.drop("ts").write_csv(path)
    src = make_source("ohlcv", "file", path=str(path), symbols=("BTC-USD",), timeframe="1h")
    got = src.fetch(datetime(2021, 1, 1), datetime(2021, 1, 2))
    assert got.height == 23  # the hour without prices is a gap, not filled
    # a bar with a close missing but its other prices there is a broken row, not a gap
    broken = df.with_columns(close=pl.when(hole).then(None).otherwise(pl.col("close")))
    broken.drop("ts").write_csv(path)
    with pytest.raises(SourceFetchError, match=r"some prices but not all.*2021-01-01 05:00"):
        src.fetch(datetime(2021, 1, 1), datetime(2021, 1, 2))


def test_the_one_minute_bitcoin_layout(tmp_path):
    ts0 = 1609459200  # 2021-01-01T00:00:00Z in unix seconds
    n = 3 * 1440
    price = 30000 + np.arange(n, dtype=float)
    price[100:110] = np.nan  # the famous file has NaN minutes
    raw = pl.DataFrame(
        {
            "Timestamp": ts0 + 60 * np.arange(n),
            "Open": price,
            "High": price + 5,
            "Low": price - 5,
            "Close": price,
            "Volume": np.full(n, 0.5),
        }
    )
    path = tmp_path / "bitstampUSD_1-min_data.csv"
    raw.write_csv(path)
    src = make_source("ohlcv", "file", path=str(path), symbols=("BTC-USD",))
    assert src.timeframe == "1m"
    got = src.fetch(datetime(2021, 1, 1), datetime(2021, 1, 4))
    assert got.height == n - 10
    assert got["ts"][0] == datetime(2021, 1, 1)


def test_minute_file_ingests_and_resamples_to_hours_and_days(tmp_path, warehouse):
    df = _tidy(2 * 1440, timedelta(minutes=1)).rename({"volume_btc": "volume"})
    path = tmp_path / "bars.parquet"
    df.with_columns(symbol=pl.lit("BTC-USD")).write_parquet(path)
    src = make_source("ohlcv", "file", path=str(path))
    assert src.entities == ("BTC-USD",) and src.timeframe == "1m"
    start, end = datetime(2021, 1, 1), datetime(2021, 1, 3)
    res = warehouse.replace_bars(src.timeframe, src.fetch(start, end), start, end, src.entities)
    assert {r.table: r.rows_after for r in res} == {"ohlcv_1m": 2880, "ohlcv_1h": 48, "ohlcv": 2}


@pytest.mark.parametrize(
    ("write", "options", "message"),
    [
        (None, {}, "does not exist"),
        (
            lambda p: _tidy(5, timedelta(days=1)).drop("close").write_csv(p),
            {"symbols": ("X",)},
            "tidy layout needs",
        ),
        (lambda p: _tidy(5, timedelta(days=1)).write_csv(p), {}, "set exactly one symbol"),
        (
            lambda p: _tidy(5, timedelta(days=1)).write_csv(p),
            {"symbols": ("X",), "timeframe": "1m"},
            "holds 1d bars but timeframe '1m'",
        ),
        (lambda p: _tidy(5, timedelta(minutes=5)).write_csv(p), {"symbols": ("X",)}, "300 s apart"),
    ],
)
def test_unusable_files_fail_with_a_message_naming_the_file(tmp_path, write, options, message):
    path = tmp_path / "bars.csv"
    if write:
        write(path)
    with pytest.raises(SourceError, match=message):
        make_source("ohlcv", "file", path=str(path), **options)


def test_a_path_is_required():
    with pytest.raises(SourceError, match="needs a path"):
        make_source("ohlcv", "file")
