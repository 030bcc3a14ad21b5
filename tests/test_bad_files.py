"""No silent loss from a bad file: what a new user tried, through the real ingest asset.

Re-ingesting 100 good daily bars from a CSV whose last line is truncated (`2012-04-09,4.7,4`)
used to exit 0, log "replaced 100 rows with 99" and pass every check, the stored 2012-04-09 bar
gone; a bar with high below low was written over the good one and only then caught. Now a short
or malformed line is an error naming the file and the line, the staged write is audited by the
table's blocking suite before it is published, and a write that leaves fewer rows than the
warehouse held fails unless confirmed (`allow_shrink`).
"""

from datetime import date, datetime, timedelta

import dagster as dg
import numpy as np
import polars as pl
import pytest

from assets.ingest import ohlcv_bars
from assets.quality import QUALITY_CHECKS
from assets.resources import MarketSourcesResource
from pipelines.definitions import default_resources
from warehouse import DataPaths, Warehouse

FIRST = date(2012, 1, 1)
LAST = date(2012, 4, 9)  # the 100th day
QUALITY = dg.AssetCheckKey(dg.AssetKey("ohlcv_bars"), "ohlcv_quality")


def _good_lines() -> list[str]:
    rng = np.random.default_rng(7)
    close = 4.7 * np.exp(np.cumsum(rng.normal(0, 0.02, 100)))
    lines = ["date,open,high,low,close,volume"]
    for i, c in enumerate(close):
        day = FIRST + timedelta(days=i)
        o = c * 0.99
        lines.append(f"{day},{o:.4f},{max(o, c) * 1.01:.4f},{min(o, c) * 0.99:.4f},{c:.4f},{i + 1}")
    assert day == LAST and len(lines) == 101
    return lines


def _write(path, lines: list[str], newline_at_end: bool = True) -> None:
    path.write_text("\n".join(lines) + ("\n" if newline_at_end else ""))


def _ingest(root, path, instance=None, **config) -> dg.ExecuteInProcessResult:
    sources = MarketSourcesResource(
        ohlcv_source="file",
        ohlcv_path=str(path),
        symbols=["BTC-USD"],
        until=f"{LAST + timedelta(days=1)}",
    )
    return dg.materialize(
        [ohlcv_bars, *QUALITY_CHECKS],
        selection=dg.AssetSelection.assets(ohlcv_bars),
        partition_key="2012",
        resources={**default_resources(str(root)), "sources": sources},
        run_config={"ops": {"ohlcv_bars": {"config": config}}} if config else None,
        raise_on_error=False,
        instance=instance,
    )


def _failure(result: dg.ExecuteInProcessResult) -> str:
    """The failure's messages (a step's, or the sources resource's when the file cannot even be
    opened), down their chains of causes."""
    assert not result.success, "the ingest did not fail"
    parts = []
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        while error is not None:
            parts.append(error.message)
            error = error.cause
    assert parts, "no failure message"
    return "\n".join(parts)


@pytest.fixture
def stored(tmp_path):
    """A data directory holding the 100 good bars, ingested through the asset, and the file."""
    root, path = tmp_path / "data", tmp_path / "btc_daily.csv"
    lines = _good_lines()
    _write(path, lines)
    result = _ingest(root, path)
    assert result.success
    store = Warehouse(DataPaths.at(root))
    before = store.read("ohlcv")
    assert before.height == 100
    return root, path, lines, store, before


def test_a_truncated_file_is_an_error_naming_the_file_and_line_and_nothing_is_written(stored):
    root, path, lines, store, before = stored
    _write(path, [*lines[:-1], "2012-04-09,4.7,4"], newline_at_end=False)
    result = _ingest(root, path)
    assert not result.success
    message = _failure(result)
    assert str(path) in message and "line 101" in message and "'2012-04-09,4.7,4'" in message
    assert "3 fields" in message and "6 fields" in message
    assert store.read("ohlcv").equals(before)
    assert store.read("ohlcv")["ts"].max() == datetime(2012, 4, 9)


def test_a_truncated_file_cut_in_its_date_or_mid_file_is_an_error_too(stored):
    root, path, lines, store, before = stored
    for broken, line in (
        ([*lines[:-1], "2012-04-0"], 101),
        ([*lines[:50], "2012-02-19,5.1", *lines[51:]], 51),
        ([*lines[:50], lines[50] + ",7", *lines[51:]], 51),
    ):
        _write(path, broken, newline_at_end=False)
        message = _failure(_ingest(root, path))
        assert f"line {line}:" in message, message
        assert store.read("ohlcv").equals(before)


def test_a_bar_with_some_prices_missing_is_an_error(stored):
    root, path, lines, store, before = stored
    _write(path, [*lines[:-1], "2012-04-09,4.7,4.9,,4.8,3"])
    message = _failure(_ingest(root, path))
    assert "some prices but not all" in message and "2012-04-09" in message
    assert store.read("ohlcv").equals(before)


def test_a_failed_quality_check_never_costs_the_good_bar(stored):
    root, path, lines, store, before = stored
    day, o, h, low, c, v = lines[-1].split(",")
    _write(path, [*lines[:-1], f"{day},{o},{float(low) * 0.9:.4f},{low},{c},{v}"])
    with dg.DagsterInstance.ephemeral() as instance:
        result = _ingest(root, path, instance)
        message = _failure(result)
        # the check's verdict is recorded under its own name, with the failing rule, in this run
        record = instance.get_latest_asset_check_evaluation_record(QUALITY)
    assert "ohlcv_quality" in message and "nothing was written" in message
    assert store.read("ohlcv").equals(before)  # the good 2012-04-09 bar is still there
    assert record.run_id == result.run_id
    check = record.event.asset_check_evaluation
    assert not check.passed and "rolled back" in check.description
    assert "high" in check.metadata["failures"].value


def test_a_whole_line_cut_from_the_end_fails_unless_the_shrink_is_confirmed(stored):
    root, path, lines, store, before = stored
    _write(path, lines[:-1])  # a file that parses, cut at a line boundary: 99 bars
    message = _failure(_ingest(root, path))
    assert "BTC-USD: 1 of its 100 rows, from 2012-04-09" in message and "allow_shrink" in message
    assert store.read("ohlcv").equals(before)
    result = _ingest(root, path, allow_shrink=True)
    assert result.success
    assert store.read("ohlcv").equals(before.head(99))


def test_a_good_re_ingest_of_the_same_file_passes_and_changes_nothing(stored):
    root, path, lines, store, before = stored
    result = _ingest(root, path)
    assert result.success
    md = result.asset_materializations_for_node("ohlcv_bars")[0].metadata
    assert md["rows_replaced"].value == 100 and md["rows_inserted"].value == 100
    assert store.read("ohlcv").equals(before)
    # one more good day is a normal append
    extra = LAST + timedelta(days=1)
    _write(path, [*lines, f"{extra},5,5.1,4.9,5,1"])
    sources = {"until": f"{extra + timedelta(days=1)}"}
    result = dg.materialize(
        [ohlcv_bars],
        partition_key="2012",
        resources={
            **default_resources(str(root)),
            "sources": MarketSourcesResource(
                ohlcv_source="file", ohlcv_path=str(path), symbols=["BTC-USD"], **sources
            ),
        },
    )
    assert result.success and store.count("ohlcv") == 101
    assert pl.Series(store.read("ohlcv")["ts"]).max() == datetime(2012, 4, 10)
