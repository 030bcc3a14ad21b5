import multiprocessing as mp
from datetime import datetime, timedelta

import duckdb
import numpy as np
import polars as pl
import pytest

from warehouse import DataPaths, Warehouse
from warehouse.schema import SchemaError
from warehouse.sources import make_source
from warehouse.store import ShrinkingWindowError

JAN, FEB, MAR = datetime(2021, 1, 1), datetime(2021, 2, 1), datetime(2021, 3, 1)


def _bars(start, end):
    src = make_source("ohlcv", "synthetic")
    return src, src.fetch(start, end)


def test_replacing_a_window_twice_leaves_the_same_rows(warehouse):
    src, rows = _bars(JAN, FEB)
    first = warehouse.replace_window("ohlcv", rows, JAN, FEB, src.entities, "synthetic")
    second = warehouse.replace_window("ohlcv", rows, JAN, FEB, src.entities, "synthetic")
    assert first.rows_inserted == rows.height and first.rows_deleted == 0
    assert second.rows_deleted == rows.height and second.rows_after == rows.height
    assert warehouse.read("ohlcv").equals(rows.sort(["symbol", "ts"]))


def test_a_window_replaces_only_its_own_rows(warehouse):
    src, jan = _bars(JAN, FEB)
    _, feb = _bars(FEB, MAR)
    warehouse.replace_window("ohlcv", jan, JAN, FEB, src.entities)
    warehouse.replace_window("ohlcv", feb, FEB, MAR, src.entities)
    warehouse.replace_window("ohlcv", feb, FEB, MAR, src.entities)
    assert warehouse.count("ohlcv") == jan.height + feb.height
    # an empty fetch for a window, once confirmed, removes that window's rows for the requested
    # entities only
    warehouse.replace_window("ohlcv", feb.clear(), FEB, MAR, ["ACME"], allow_shrink=True)
    left = warehouse.read("ohlcv", FEB, MAR)
    assert "ACME" not in left["symbol"].to_list()
    assert left.height == feb.filter(pl.col("symbol") != "ACME").height


@pytest.mark.parametrize("table", ["ohlcv", "onchain", "macro"])
def test_rewriting_a_window_after_its_neighbour_keeps_the_neighbours_first_day(warehouse, table):
    """Windows are half-open: re-writing January after February is stored must not touch
    February 1st (a delete inclusive of the window end would lose it silently, the shrink guard
    only watches the window itself), and re-writing February must not touch January 31st."""
    src = make_source(table, "synthetic")
    jan, feb = src.fetch(JAN, FEB), src.fetch(FEB, MAR)
    warehouse.replace_window(table, jan, JAN, FEB, src.entities)
    warehouse.replace_window(table, feb, FEB, MAR, src.entities)
    stored = warehouse.read(table)
    for start, end, rows in ((JAN, FEB, jan), (FEB, MAR, feb), (JAN, FEB, jan)):
        result = warehouse.replace_window(table, rows, start, end, src.entities)
        assert result.rows_deleted == rows.height == result.rows_inserted, (start, result)
        assert warehouse.read(table).equals(stored), (table, start)
    time_col = "ts" if table == "ohlcv" else "date"
    first_feb = warehouse.read(table).filter(
        pl.col(time_col) == pl.lit(FEB).cast(stored[time_col].dtype)
    )
    assert first_feb.height == len(src.entities)


def test_read_filters_by_window_and_entity(warehouse):
    src, rows = _bars(JAN, MAR)
    warehouse.replace_window("ohlcv", rows, JAN, MAR, src.entities)
    got = warehouse.read("ohlcv", FEB, MAR, ["BTC-USD"])
    assert got.height == 28
    assert got["symbol"].unique().to_list() == ["BTC-USD"]


def test_a_failed_insert_rolls_back_and_keeps_the_old_rows(warehouse, monkeypatch):
    src, rows = _bars(JAN, FEB)
    warehouse.replace_window("ohlcv", rows, JAN, FEB, src.entities)
    before = warehouse.read("ohlcv")

    class Boom(RuntimeError):
        pass

    real_to_arrow = pl.DataFrame.to_arrow

    def failing_to_arrow(self, *a, **k):  # fails after the DELETE ran inside the transaction
        raise Boom("disk full")

    monkeypatch.setattr(pl.DataFrame, "to_arrow", failing_to_arrow)
    with pytest.raises(Boom):
        warehouse.replace_window("ohlcv", rows, JAN, FEB, src.entities)
    monkeypatch.setattr(pl.DataFrame, "to_arrow", real_to_arrow)
    assert warehouse.read("ohlcv").equals(before)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda df: df.drop("volume"), "missing \\['volume'\\]"),
        (lambda df: df.with_columns(extra=pl.lit(1)), "unexpected \\['extra'\\]"),
        (lambda df: df.with_columns(symbol=pl.lit(None, pl.String)), "null values in key columns"),
        (lambda df: pl.concat([df, df.head(1)]), "duplicate keys"),
        (lambda df: df.with_columns(close=pl.lit(float("nan"))), "infinite or NaN"),
        (lambda df: df.with_columns(close=pl.lit("abc")), "does not cast"),
    ],
)
def test_bad_frames_are_rejected_before_anything_is_written(warehouse, mutate, message):
    src, rows = _bars(JAN, FEB)
    with pytest.raises(SchemaError, match=message):
        warehouse.replace_window("ohlcv", mutate(rows), JAN, FEB, src.entities, "test-source")
    assert warehouse.count("ohlcv") == 0


def test_rows_outside_the_window_or_for_other_entities_are_rejected(warehouse):
    src, rows = _bars(JAN, MAR)
    with pytest.raises(SchemaError, match="outside the requested window"):
        warehouse.replace_window("ohlcv", rows, JAN, FEB, src.entities)
    with pytest.raises(SchemaError, match="which were not requested"):
        warehouse.replace_window("ohlcv", rows, JAN, MAR, ["BTC-USD"])
    assert warehouse.count("ohlcv") == 0


def test_unknown_table_is_refused(warehouse):
    with pytest.raises(SchemaError, match="Unknown warehouse table 'prices'"):
        warehouse.read("prices")


def test_entity_values_are_bound_as_parameters_not_sql(warehouse):
    src, rows = _bars(JAN, FEB)
    warehouse.replace_window("ohlcv", rows, JAN, FEB, src.entities)
    assert warehouse.read("ohlcv", entities=["x' OR '1'='1"]).height == 0
    assert warehouse.count("ohlcv") == rows.height


def test_key_columns_are_not_null_in_duckdb(warehouse, paths):
    warehouse.count("ohlcv")  # creates the schema
    con = duckdb.connect(str(paths.duckdb_file), read_only=True)
    not_null = con.sql(
        "SELECT table_name, constraint_column_names FROM duckdb_constraints() "
        "WHERE constraint_type = 'NOT NULL' ORDER BY 1, 2"
    ).fetchall()
    con.close()
    assert ("ohlcv", ["symbol"]) in not_null and ("ohlcv", ["ts"]) in not_null
    assert ("macro", ["published"]) not in not_null  # only keys are constrained
    assert ("forecasts", ["model_version"]) in not_null
    assert {t for t, _ in not_null} == {
        "ohlcv",
        "ohlcv_1h",
        "ohlcv_1m",
        "onchain",
        "macro",
        "forecasts",
    }


def _minute_bars(start, days, symbol="BTC-USD"):
    n = days * 1440
    ts = pl.datetime_range(start, start + timedelta(days=days), "1m", closed="left", eager=True)
    price = 100 + np.arange(n) * 0.01
    return pl.DataFrame(
        {
            "symbol": symbol,
            "ts": ts,
            "open": price,
            "high": price + 0.5,
            "low": price - 0.5,
            "close": price + 0.01,
            "volume": np.ones(n),
        }
    )


def test_minute_bars_rebuild_hourly_and_daily_bars_in_the_same_write(warehouse):
    start = datetime(2021, 1, 1)
    bars = _minute_bars(start, 2)
    results = warehouse.replace_bars("1m", bars, start, start + timedelta(days=2), ["BTC-USD"])
    assert [(r.table, r.rows_inserted) for r in results] == [
        ("ohlcv_1m", 2880),
        ("ohlcv_1h", 48),
        ("ohlcv", 2),
    ]
    day = warehouse.read("ohlcv").row(0, named=True)
    first_day = bars.head(1440)
    assert day["ts"] == start
    assert day["open"] == first_day["open"][0] and day["close"] == first_day["close"][-1]
    assert day["high"] == first_day["high"].max() and day["low"] == first_day["low"].min()
    assert day["volume"] == 1440
    hour = warehouse.read("ohlcv_1h").row(1, named=True)
    assert hour["ts"] == start + timedelta(hours=1) and hour["open"] == bars["open"][60]
    again = warehouse.replace_bars("1m", bars, start, start + timedelta(days=2), ["BTC-USD"])
    assert [r.rows_after for r in again] == [2880, 48, 2]


def test_resampled_windows_must_be_whole_days(warehouse):
    start = datetime(2021, 1, 1, 6)
    with pytest.raises(SchemaError, match="must start and end at 00:00 UTC"):
        warehouse.replace_bars(
            "1m", _minute_bars(start, 1), start, start + timedelta(days=1), ["BTC-USD"]
        )
    with pytest.raises(SchemaError, match="Unknown bar timeframe '5m'"):
        warehouse.replace_bars("5m", _minute_bars(start, 1), start, start, ["BTC-USD"])


def _write_month(root: str, month: int, barrier) -> int:
    start, end = datetime(2021, month, 1), datetime(2021, month + 1, 1)
    src = make_source("ohlcv", "synthetic")
    rows = src.fetch(start, end)
    barrier.wait()
    wh = Warehouse(DataPaths.at(root), lock_timeout_s=60)
    for _ in range(5):  # repeated writes widen the window in which the processes overlap
        wh.replace_window("ohlcv", rows, start, end, src.entities)
    return rows.height


def test_parallel_processes_writing_different_partitions_both_succeed(paths):
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            results = [
                pool.apply_async(_write_month, (str(paths.root), m, barrier)) for m in (1, 2, 3, 4)
            ]
            heights = [r.get(timeout=120) for r in results]
    assert Warehouse(paths).count("ohlcv") == sum(heights)


def test_summary_gives_rows_and_range_per_entity(warehouse):
    src, rows = _bars(JAN, FEB)
    warehouse.replace_window("ohlcv", rows, JAN, FEB, src.entities)
    s = warehouse.summary("ohlcv")
    assert s["entity"].to_list() == ["ACME", "BTC-USD", "GLBX"]
    assert s.filter(pl.col("entity") == "BTC-USD")["rows"][0] == 31


def test_a_replace_that_shrinks_the_window_fails_and_keeps_the_rows(warehouse):
    src, jan = _bars(JAN, FEB)
    warehouse.replace_window("ohlcv", jan, JAN, FEB, src.entities)
    before = warehouse.read("ohlcv")
    short = jan.filter(~((pl.col("symbol") == "BTC-USD") & (pl.col("ts") == datetime(2021, 1, 9))))
    with pytest.raises(
        ShrinkingWindowError, match=r"BTC-USD: 1 of its 31 rows, from 2021-01-09"
    ) as err:
        warehouse.replace_window("ohlcv", short, JAN, FEB, src.entities, "file")
    assert "allow_shrink" in str(err.value) and "nothing was written" in str(err.value)
    assert warehouse.read("ohlcv").equals(before)
    # a row moved to another time loses the stored one too
    moved = jan.with_columns(
        ts=pl.when((pl.col("symbol") == "ACME") & (pl.col("ts") == datetime(2021, 1, 4)))
        .then(datetime(2021, 1, 9))
        .otherwise(pl.col("ts"))
    )
    with pytest.raises(ShrinkingWindowError, match=r"ACME: 1 of its 21 rows, from 2021-01-04"):
        warehouse.replace_window("ohlcv", moved, JAN, FEB, src.entities)
    assert warehouse.read("ohlcv").equals(before)
    # the same rows, or more, pass; a confirmed shrink passes too
    warehouse.replace_window("ohlcv", jan, JAN, FEB, src.entities)
    warehouse.replace_window("ohlcv", short, JAN, FEB, src.entities, allow_shrink=True)
    assert warehouse.count("ohlcv") == before.height - 1


def test_shrinking_daily_bars_rebuilt_from_hourly_ones_fails(warehouse):
    hourly = make_source("ohlcv", "synthetic", timeframe="1h", symbols=["BTC-USD"])
    bars = hourly.fetch(JAN, JAN + timedelta(days=4))
    warehouse.replace_bars("1h", bars, JAN, JAN + timedelta(days=4), ["BTC-USD"])
    daily = warehouse.read("ohlcv")
    # a whole day missing: fewer hourly and fewer daily bars
    cut = bars.filter(pl.col("ts") < JAN + timedelta(days=3))
    with pytest.raises(ShrinkingWindowError, match="ohlcv_1h"):
        warehouse.replace_bars("1h", cut, JAN, JAN + timedelta(days=4), ["BTC-USD"])
    assert warehouse.read("ohlcv").equals(daily)
    assert warehouse.count("ohlcv_1h") == bars.height


def test_an_audit_sees_the_staged_rows_and_its_failure_publishes_nothing(warehouse):
    src, jan = _bars(JAN, FEB)
    warehouse.replace_window("ohlcv", jan, JAN, FEB, src.entities)
    before = warehouse.read("ohlcv")
    bad = jan.with_columns(
        high=pl.when(pl.col("ts") == datetime(2021, 1, 9)).then(0.5).otherwise(pl.col("high"))
    )
    seen = {}

    class Rejected(Exception):
        pass

    def audit(read):
        staged = read("ohlcv", JAN, FEB)
        seen["rows"] = staged.height
        broken = staged.filter(pl.col("high") < pl.col("low"))
        if broken.height:
            raise Rejected(f"{broken.height} bars with high below low")

    with pytest.raises(Rejected, match="1 bars"):
        warehouse.replace_window("ohlcv", bad, JAN, FEB, src.entities, audit=audit)
    assert seen["rows"] == jan.height
    assert warehouse.read("ohlcv").equals(before)  # the good bars are still there
    warehouse.replace_window("ohlcv", jan, JAN, FEB, src.entities, audit=audit)
    assert warehouse.read("ohlcv").equals(before)


def test_a_replace_that_blanks_stored_values_fails_unless_confirmed(warehouse):
    src = make_source("onchain", "synthetic")
    rows = src.fetch(JAN, FEB)
    warehouse.replace_window("onchain", rows, JAN, FEB, src.entities)
    before = warehouse.read("onchain")
    # the source stopped serving one metric for a day: a null where a value was stored
    day = pl.col("date") == datetime(2021, 1, 9).date()
    blank = rows.with_columns(tx_count=pl.when(day).then(None).otherwise(pl.col("tx_count")))
    with pytest.raises(ShrinkingWindowError, match=r"blank stored values.*tx_count: 1 values"):
        warehouse.replace_window("onchain", blank, JAN, FEB, src.entities)
    assert warehouse.read("onchain").equals(before)
    # a value that appears where none was stored is new data, not a loss
    warehouse.replace_window("onchain", blank, JAN, FEB, src.entities, allow_shrink=True)
    warehouse.replace_window("onchain", rows, JAN, FEB, src.entities)
    assert warehouse.read("onchain").equals(before)


def test_hourly_bars_resample_to_daily_bars_by_an_independent_aggregation(warehouse):
    # the check the real hourly file makes, on synthetic bars so that it always runs: every
    # daily bar equals the UTC day's hourly bars aggregated here in plain Python (first open,
    # highest high, lowest low, last close, summed volume), for every symbol and day; a flat
    # hour (high == low) and an hour missing from one day included
    start, days = datetime(2021, 3, 1), 20
    source = make_source("ohlcv", "synthetic", timeframe="1h", symbols=["BTC-USD", "ACME"])
    full = source.fetch(start, start + timedelta(days=days))
    flat = datetime(2021, 3, 4, 7)  # BTC-USD trades around the clock; ACME not at 07:00
    missing = datetime(2021, 3, 9, 15, 30)  # ACME's hourly bars open at 14:30 ... 20:30 UTC
    bars = full.with_columns(
        [
            pl.when(pl.col("ts") == flat).then(pl.col("close")).otherwise(pl.col(c)).alias(c)
            for c in ("open", "high", "low")
        ]
    ).filter(~((pl.col("symbol") == "ACME") & (pl.col("ts") == missing)))
    assert full.height - bars.height == 1  # the hour is one of ACME's, and it is gone
    assert bars.filter(pl.col("high") == pl.col("low"))["ts"].to_list() == [flat]
    warehouse.replace_bars("1h", bars, start, start + timedelta(days=days), source.entities)
    expected: dict[tuple[str, datetime], dict] = {}
    for row in bars.sort("symbol", "ts").iter_rows(named=True):
        key = (row["symbol"], datetime(row["ts"].year, row["ts"].month, row["ts"].day))
        day = expected.setdefault(
            key, {"open": row["open"], "high": row["high"], "low": row["low"], "volume": 0.0}
        )
        day["high"] = max(day["high"], row["high"])
        day["low"] = min(day["low"], row["low"])
        day["close"] = row["close"]
        day["volume"] += row["volume"]
    got = {(r["symbol"], r["ts"]): r for r in warehouse.read("ohlcv").iter_rows(named=True)}
    assert set(got) == set(expected) and len(got) > days  # ACME trades on business days
    for key, day in expected.items():
        for column, value in day.items():
            assert got[key][column] == pytest.approx(value, rel=1e-12), (key, column)
