"""Exact behaviour of warehouse/store.py that the broader store tests leave open: upsert by key,
rows_per_year, window bounds of either type, the messages of refused writes, the readers given
to baseline and audit, the lock, and the lake views. Small hand-built frames keep them fast."""

import re
import threading
from datetime import date, datetime, timedelta

import polars as pl
import pytest
from filelock import FileLock, Timeout

from warehouse import Warehouse
from warehouse import store as store_module
from warehouse.lake import Lake
from warehouse.schema import FORECASTS, ONCHAIN, SchemaError, table_spec
from warehouse.store import ShrinkingWindowError, WarehouseBusyError, WriteResult

D = [datetime(2021, 1, d) for d in range(1, 11)]  # 2021-01-01 ... 2021-01-10


def _bars(times, symbol="BTC-USD", close=None):
    """OHLCV bars (daily or hourly alike) at `times`; `close` sets every close (else 100 + i)."""
    n = len(times)
    closes = [float(close if close is not None else 100 + i) for i in range(n)]
    return pl.DataFrame(
        {
            "symbol": [symbol] * n,
            "ts": list(times),
            "open": closes,
            "high": [c + 1 for c in closes],
            "low": [c - 1 for c in closes],
            "close": closes,
            "volume": [1.0] * n,
        }
    )


def _hours(start, n):
    return [start + timedelta(hours=h) for h in range(n)]


def _onchain(rows):
    """On-chain rows from (asset, day of January 2021, {column: value}) with 1.0 elsewhere."""
    values = [c for c in ONCHAIN.columns if c not in ONCHAIN.key]
    return pl.DataFrame(
        [
            {"asset": a, "date": date(2021, 1, d), **{c: over.get(c, 1.0) for c in values}}
            for a, d, over in rows
        ],
        schema=ONCHAIN.columns,
    )


def _macro(days, series="DGS10"):
    return pl.DataFrame(
        {
            "series": [series] * len(days),
            "date": [date(2021, 1, d) for d in days],
            "value": [float(d) for d in days],
            "published": [date(2021, 1, d) for d in days],
        }
    )


def _forecasts(rows):
    """Forecast rows from (symbol, as_of, model_version, p_up)."""
    n = len(rows)
    floats = {c: [0.1] * n for c, t in FORECASTS.columns.items() if t == pl.Float64()}
    return pl.DataFrame(
        {
            **floats,
            "symbol": [r[0] for r in rows],
            "as_of": [r[1] for r in rows],
            "model_version": [r[2] for r in rows],
            "model": ["mamba2"] * n,
            "fold": ["2021"] * n,
            "p_up": [r[3] for r in rows],
            "direction_horizon": [90] * n,
            "sigma_window": [30] * n,
            "created_at": [datetime(2021, 2, 1)] * n,
        }
    ).select(list(FORECASTS.columns))


# --- upsert -------------------------------------------------------------------------------


def test_upsert_inserts_new_keys_and_replaces_only_rows_with_the_same_full_key(warehouse):
    first = _forecasts([("BTC-USD", D[0], "v1", 0.3), ("ETH-USD", D[0], "v1", 0.3)])
    assert warehouse.upsert("forecasts", first, "model") == WriteResult("forecasts", 0, 2, 2)
    # the same key is replaced; a key differing in one column (model_version, as_of) is new
    second = _forecasts(
        [("BTC-USD", D[0], "v1", 0.9), ("BTC-USD", D[0], "v2", 0.5), ("BTC-USD", D[1], "v1", 0.1)]
    )
    assert warehouse.upsert("forecasts", second) == WriteResult("forecasts", 1, 3, 4)
    stored = warehouse.read("forecasts").select("symbol", "as_of", "model_version", "p_up")
    assert stored.rows() == [
        ("BTC-USD", D[0], "v1", 0.9),
        ("BTC-USD", D[0], "v2", 0.5),
        ("BTC-USD", D[1], "v1", 0.1),
        ("ETH-USD", D[0], "v1", 0.3),
    ]
    # re-writing the same rows never duplicates them
    assert warehouse.upsert("forecasts", second) == WriteResult("forecasts", 3, 3, 4)
    assert warehouse.read("forecasts").equals(
        warehouse.read("forecasts").unique(maintain_order=True)
    )


def test_upsert_errors_name_the_given_source_or_unknown_and_write_nothing(warehouse):
    bad = _forecasts([("BTC-USD", D[0], "v1", 0.3)]).drop("p_up")
    with pytest.raises(
        SchemaError, match=r"^source 'unknown' -> table 'forecasts': columns do not match"
    ):
        warehouse.upsert("forecasts", bad)
    with pytest.raises(SchemaError, match=r"^source 'latest_forecast' -> table 'forecasts': "):
        warehouse.upsert("forecasts", bad, source="latest_forecast")
    assert warehouse.count("forecasts") == 0


# --- rows_per_year ------------------------------------------------------------------------


def test_rows_per_year_counts_rows_in_the_half_open_window_per_calendar_year(warehouse):
    times = [
        datetime(2018, 6, 1),
        datetime(2020, 1, 1),
        datetime(2020, 12, 31),
        datetime(2021, 3, 1),
        datetime(2022, 1, 1),
    ]
    warehouse.replace_window("ohlcv", _bars(times), times[0], datetime(2023, 1, 1), ["BTC-USD"])
    # a year without rows (2019) is left out; a row at the end (2022-01-01) is outside
    start, end = datetime(2018, 1, 1), datetime(2022, 1, 1)
    assert warehouse.rows_per_year("ohlcv", start, end) == {"2018": 1, "2020": 2, "2021": 1}
    # a row at the start is inside; one microsecond later it is not
    start = datetime(2020, 1, 1)
    assert warehouse.rows_per_year("ohlcv", start, end) == {"2020": 2, "2021": 1}
    later = start + timedelta(microseconds=1)
    assert warehouse.rows_per_year("ohlcv", later, end) == {"2020": 1, "2021": 1}
    assert warehouse.rows_per_year("ohlcv_1h", start, end) == {}


# --- window bounds: _as_time and _check_inside_window -------------------------------------


def test_a_datetime_bound_of_a_date_table_is_truncated_to_its_day(warehouse):
    warehouse.replace_window("macro", _macro(range(1, 11)), D[0], datetime(2021, 2, 1), ["DGS10"])
    got = warehouse.read("macro", datetime(2021, 1, 5, 12), datetime(2021, 1, 7, 12))
    assert got["date"].to_list() == [date(2021, 1, 5), date(2021, 1, 6)]


def test_a_date_bound_of_a_date_table_is_used_as_it_is(warehouse):
    warehouse.replace_window("macro", _macro(range(1, 11)), D[0], datetime(2021, 2, 1), ["DGS10"])
    got = warehouse.read("macro", date(2021, 1, 5), date(2021, 1, 7))
    assert got["date"].to_list() == [date(2021, 1, 5), date(2021, 1, 6)]


def test_a_date_bound_of_a_timestamp_table_is_its_midnight(warehouse):
    hourly = _bars(_hours(D[0], 72))
    warehouse.replace_window("ohlcv_1h", hourly, date(2021, 1, 1), date(2021, 1, 4), ["BTC-USD"])
    got = warehouse.read("ohlcv_1h", date(2021, 1, 2), date(2021, 1, 3))
    assert got["ts"].to_list() == _hours(D[1], 24)
    # the refusal names the window in the table's type: midnight timestamps
    late = _bars([datetime(2021, 1, 3, 0)])
    with pytest.raises(
        SchemaError,
        match=re.escape(
            "source 'file' -> table 'ohlcv_1h': 1 rows lie outside the requested window "
            "[2021-01-01 00:00:00, 2021-01-03 00:00:00)"
        ),
    ):
        warehouse.replace_window(
            "ohlcv_1h", late, date(2021, 1, 1), date(2021, 1, 3), ["BTC-USD"], "file"
        )


def test_a_row_at_exactly_the_window_end_is_outside_the_window(warehouse):
    rows = _bars(D[:3])  # Jan 1, 2, 3
    with pytest.raises(SchemaError, match=r"1 rows lie outside the requested window") as err:
        warehouse.replace_window("ohlcv", rows, D[0], D[2], ["BTC-USD"], "file")
    assert "'ts': datetime.datetime(2021, 1, 3, 0, 0)" in str(err.value)
    assert warehouse.count("ohlcv") == 0
    # a row at exactly the start is inside
    assert warehouse.replace_window("ohlcv", rows, D[0], D[3], ["BTC-USD"]).rows_inserted == 3


def test_rows_outside_the_window_are_refused_with_two_examples(warehouse):
    rows = _bars(D[:6])
    with pytest.raises(SchemaError, match=r"4 rows lie outside the requested window") as err:
        warehouse.replace_window("ohlcv", rows, D[0], D[2], ["BTC-USD"], "file")
    message = str(err.value)
    assert message.count("'symbol': 'BTC-USD'") == 2
    assert "datetime.datetime(2021, 1, 3, 0, 0)" in message
    assert "datetime.datetime(2021, 1, 4, 0, 0)" in message
    assert message.endswith("; nothing was written")


# --- replace_window: messages, results, baseline and audit readers ------------------------


def test_replace_window_errors_name_the_given_source_or_unknown(warehouse):
    bad = _bars(D[:2]).drop("volume")
    with pytest.raises(SchemaError, match=r"^source 'unknown' -> table 'ohlcv': columns do not"):
        warehouse.replace_window("ohlcv", bad, D[0], D[5], ["BTC-USD"])
    with pytest.raises(SchemaError, match=r"^source 'file' -> table 'ohlcv': columns do not"):
        warehouse.replace_window("ohlcv", bad, D[0], D[5], ["BTC-USD"], "file")
    with pytest.raises(SchemaError, match=r"^source 'file' -> table 'ohlcv': 1 rows lie outside"):
        warehouse.replace_window("ohlcv", _bars(D[:2]), D[0], D[1], ["BTC-USD"], "file")
    with pytest.raises(
        SchemaError,
        match=re.escape(
            "source 'file' -> table 'ohlcv': rows for ['ACME'] which were not requested "
            "(['BTC-USD'])"
        ),
    ):
        warehouse.replace_window("ohlcv", _bars(D[:2], "ACME"), D[0], D[5], ["BTC-USD"], "file")
    assert warehouse.count("ohlcv") == 0


def test_read_keeps_only_rows_before_the_end(warehouse):
    warehouse.replace_window("ohlcv", _bars(D), D[0], datetime(2021, 2, 1), ["BTC-USD"])
    assert warehouse.read("ohlcv", D[3], D[6])["ts"].to_list() == D[3:6]
    assert warehouse.read("ohlcv", end=D[3])["ts"].to_list() == D[:3]


def test_baseline_reads_the_stored_window_and_audit_the_staged_one_by_start_and_end(warehouse):
    warehouse.replace_window("ohlcv", _bars(D), D[0], datetime(2021, 2, 1), ["BTC-USD"])
    seen = {}

    def baseline(read):
        seen["before"] = read("ohlcv", D[3], D[6])["close"].to_list()
        seen["all_before"] = read("ohlcv").height

    def audit(read):
        seen["window"] = read("ohlcv", D[3], D[6]).select("ts", "close").rows()
        seen["from_start"] = read("ohlcv", D[3])["ts"].to_list()
        seen["to_end"] = read("ohlcv", end=D[6])["ts"].to_list()

    new = _bars(D[3:6], close=7.0)
    result = warehouse.replace_window(
        "ohlcv", new, D[3], D[6], ["BTC-USD"], "file", audit=audit, baseline=baseline
    )
    assert result == WriteResult("ohlcv", 3, 3, 10)
    assert seen["before"] == [103.0, 104.0, 105.0] and seen["all_before"] == 10
    assert seen["window"] == [(D[3], 7.0), (D[4], 7.0), (D[5], 7.0)]
    assert seen["from_start"] == D[3:] and seen["to_end"] == D[:6]


def test_a_shrinking_replace_names_source_window_lost_rows_blanked_values_and_the_fix(warehouse):
    stored = _onchain([(a, d, {}) for a in ("AAA", "BBB") for d in (1, 2, 3, 4)])
    lo, hi = datetime(2021, 1, 1), datetime(2021, 1, 5)
    warehouse.replace_window("onchain", stored, lo, hi, ["AAA", "BBB"])
    before = warehouse.read("onchain")
    short = _onchain(
        [
            ("AAA", 1, {"tx_count": None}),
            ("AAA", 2, {}),
            ("BBB", 1, {}),
            ("BBB", 3, {"hash_rate": None}),
            ("BBB", 4, {"hash_rate": None}),
        ]
    )
    with pytest.raises(ShrinkingWindowError) as err:
        warehouse.replace_window("onchain", short, lo, hi, ["AAA", "BBB"], "chain")
    message = str(err.value)
    assert message.startswith(
        "source 'chain' -> table 'onchain': replacing [2021-01-01, 2021-01-05) would delete "
        "stored rows that the new data does not replace (AAA: 2 of its 4 rows, from "
        "2021-01-03; BBB: 1 of its 4 rows, from 2021-01-02) and blank stored values the new "
        "data lacks (tx_count: 1 values, e.g. AAA at 2021-01-01; hash_rate: 2 values, e.g. "
        "BBB at 2021-01-03); nothing was written."
    )
    assert "The source returned less than before" in message
    assert "Fix the source, or confirm the loss with `allow_shrink: true`" in message
    assert warehouse.read("onchain").equals(before)


def test_the_shrink_snapshot_holds_values_only_for_tables_whose_values_may_be_missing(warehouse):
    warehouse.replace_window("ohlcv", _bars(D[:3]), D[0], D[5], ["BTC-USD"])
    with warehouse.connect() as con:
        names, columns = [], []
        for table in ("ohlcv", "ohlcv_1h", "onchain"):
            name = store_module._snapshot(con, table_spec(table), D[0], D[5], ["BTC-USD"])
            names.append(name)
            columns.append([r[0] for r in con.execute(f"DESCRIBE {name}").fetchall()])
        held = con.execute("SELECT count(*) FROM _before_ohlcv").fetchall()[0][0]
    assert names == ["_before_ohlcv", "_before_ohlcv_1h", "_before_onchain"]
    assert columns[0] == columns[1] == ["entity", "time"]
    assert columns[2] == ["entity", "time", *[c for c in ONCHAIN.columns if c not in ONCHAIN.key]]
    assert held == 3


# --- replace_bars -------------------------------------------------------------------------


def test_replace_bars_errors_name_the_given_source_or_unknown(warehouse):
    bad = _bars(_hours(D[0], 24)).drop("volume")
    with pytest.raises(SchemaError, match=r"^source 'unknown' -> table 'ohlcv_1h': columns do"):
        warehouse.replace_bars("1h", bad, D[0], D[1], ["BTC-USD"])
    with pytest.raises(SchemaError, match=r"^source 'exchange' -> table 'ohlcv_1h': columns"):
        warehouse.replace_bars("1h", bad, D[0], D[1], ["BTC-USD"], "exchange")
    with pytest.raises(
        SchemaError, match=r"^source 'exchange' -> table 'ohlcv_1h': 24 rows lie outside"
    ):
        warehouse.replace_bars("1h", _bars(_hours(D[1], 24)), D[0], D[1], ["BTC-USD"], "exchange")


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (D[0], datetime(2021, 1, 2, 12)),  # only the end is off midnight
        (datetime(2021, 1, 1, 12), D[2]),  # only the start is
    ],
)
def test_resampled_bars_refuse_a_window_with_either_bound_off_midnight(warehouse, start, end):
    bars = _bars(_hours(start, int((end - start) / timedelta(hours=1))))
    with pytest.raises(
        SchemaError,
        match=re.escape(
            f"1h bars are resampled into ['1d']: the window [{start}, {end}) must start and end "
            "at 00:00 UTC"
        ),
    ):
        warehouse.replace_bars("1h", bars, start, end, ["BTC-USD"])
    assert warehouse.count("ohlcv_1h") == warehouse.count("ohlcv") == 0


def test_resampled_bars_accept_date_bounds_as_midnight(warehouse):
    bars = _bars(_hours(D[0], 48))
    results = warehouse.replace_bars("1h", bars, date(2021, 1, 1), date(2021, 1, 3), ["BTC-USD"])
    assert results == [WriteResult("ohlcv_1h", 0, 48, 48), WriteResult("ohlcv", 0, 2, 2)]


def test_replace_bars_results_baseline_audit_and_confirmed_shrink(warehouse):
    start, end = D[0], D[4]
    warehouse.replace_bars("1h", _bars(_hours(start, 96)), start, end, ["BTC-USD"])
    seen = {}

    def baseline(read):
        seen["before"] = (read("ohlcv_1h").height, read("ohlcv")["ts"].to_list())

    def audit(read):
        seen["staged"] = (read("ohlcv_1h", start, end).height, read("ohlcv")["ts"].to_list())

    cut = _bars(_hours(start, 72))  # the last day is gone
    results = warehouse.replace_bars(
        "1h", cut, start, end, ["BTC-USD"], allow_shrink=True, audit=audit, baseline=baseline
    )
    assert results == [WriteResult("ohlcv_1h", 96, 72, 72), WriteResult("ohlcv", 4, 3, 3)]
    assert seen["before"] == (96, D[:4])
    assert seen["staged"] == (72, D[:3])


def test_a_shrinking_bar_replace_names_source_table_and_window(warehouse):
    start, end = D[0], D[4]
    warehouse.replace_bars("1h", _bars(_hours(start, 96)), start, end, ["BTC-USD"])
    with pytest.raises(
        ShrinkingWindowError,
        match=re.escape(
            "source 'exchange' -> table 'ohlcv_1h': replacing [2021-01-01 00:00:00, "
            "2021-01-05 00:00:00) would delete stored rows that the new data does not replace "
            "(BTC-USD: 24 of its 96 rows, from 2021-01-04 00:00:00)"
        ),
    ):
        warehouse.replace_bars("1h", _bars(_hours(start, 72)), start, end, ["BTC-USD"], "exchange")
    assert warehouse.count("ohlcv_1h") == 96 and warehouse.count("ohlcv") == 4


# --- the lock -----------------------------------------------------------------------------


def test_the_default_lock_timeout_is_ten_minutes(paths):
    assert Warehouse(paths).lock_timeout_s == 600.0


def test_a_connection_holds_the_lock_file_of_its_data_directory(warehouse, paths):
    with warehouse.connect(), pytest.raises(Timeout):
        FileLock(str(paths.lock_file)).acquire(timeout=0)
    other = FileLock(str(paths.lock_file))
    other.acquire(timeout=0)
    other.release()


def test_a_lock_held_past_the_timeout_raises_busy_naming_the_wait_and_the_lock_file(paths):
    holder = FileLock(str(paths.lock_file))
    paths.root.mkdir(parents=True, exist_ok=True)
    holder.acquire(timeout=0)
    try:
        with (
            pytest.raises(
                WarehouseBusyError,
                match=re.escape(
                    f"stayed locked for 0 s by another process (lock file {paths.lock_file})"
                ),
            ),
            Warehouse(paths, lock_timeout_s=0.2).connect(),
        ):
            pass
    finally:
        holder.release()


def test_a_read_from_a_worker_thread_inside_an_open_connection_does_not_wait_for_the_lock(paths):
    # the lock belongs to the Warehouse, not to a thread: an audit that fans its reads out to
    # threads of the same process must not wait the lock timeout on its own connection
    wh = Warehouse(paths, lock_timeout_s=0.5)
    wh.replace_window("ohlcv", _bars(D[:3]), D[0], D[5], ["BTC-USD"])
    got = []

    def worker():
        try:
            got.append(wh.count("ohlcv"))
        except Exception as exc:
            got.append(exc)

    with wh.connect():
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(timeout=10)
    assert got == [3]


# --- lake views ---------------------------------------------------------------------------


def _lake_frame(symbols=("BTC-USD", "ACME")):
    return pl.DataFrame(
        [
            {"symbol": s, "ts": datetime(y, 1, 1), "x": float(i * 10 + y - 2020)}
            for i, s in enumerate(symbols)
            for y in (2020, 2021)
        ]
    )


def test_refresh_lake_views_refuses_an_invalid_table_name_naming_it_and_the_rule(paths):
    with pytest.raises(
        SchemaError,
        match=re.escape("Invalid lake table name 'Bad-Name': use lower-case letters, digits, _"),
    ):
        Warehouse(paths).refresh_lake_views(Lake(paths.lake), ["Bad-Name"])


def test_refresh_lake_views_skips_a_missing_table_and_still_makes_the_later_ones(paths):
    lake = Lake(paths.lake)
    df = _lake_frame()
    lake.write_snapshot("features", df, time_column="ts", version="v1")
    wh = Warehouse(paths)
    assert wh.refresh_lake_views(lake, ["labels", "features"]) == ["lake_features"]
    with wh.connect() as con:
        got = pl.from_arrow(con.sql("SELECT symbol, ts, x FROM lake_features").to_arrow_table())
        tables = {r[0] for r in con.sql("SELECT view_name FROM duckdb_views()").fetchall()}
    assert got.sort("symbol", "ts").equals(df.select(got.columns).sort("symbol", "ts"))
    assert "lake_features" in tables and "lake_labels" not in tables


def test_lake_views_keep_all_digit_symbols_as_the_strings_stored(paths):
    lake = Lake(paths.lake)
    lake.write_snapshot("features", _lake_frame(("100", "200")), time_column="ts", version="v1")
    wh = Warehouse(paths)
    assert wh.refresh_lake_views(lake, ["features"]) == ["lake_features"]
    with wh.connect() as con:
        got = con.sql("SELECT DISTINCT symbol, typeof(symbol) FROM lake_features").fetchall()
    assert sorted(got) == [("100", "VARCHAR"), ("200", "VARCHAR")]


def test_a_lake_entity_column_name_that_is_no_identifier_is_kept_out_of_the_view_sql(paths):
    # the hive_types clause names the entity folder's column only when it is an identifier: a
    # quote in it would otherwise end the SQL string literal
    lake = Lake(paths.lake)
    df = pl.DataFrame({"o'k": ["A", "B"], "ts": [datetime(2021, 1, 1)] * 2, "x": [1.0, 2.0]})
    lake.write_snapshot("features", df, time_column="ts", version="v1", entity_column="o'k")
    wh = Warehouse(paths)
    assert wh.refresh_lake_views(lake, ["features"]) == ["lake_features"]
    with wh.connect() as con:
        got = sorted(con.sql("""SELECT "o'k", x FROM lake_features""").fetchall())
    assert got == [("A", 1.0), ("B", 2.0)]
