"""No silent loss from a bad file: what a new user tried, through the real ingest asset.

Re-ingesting 100 good daily bars from a CSV whose last line is truncated (`2012-04-09,4.7,4`)
used to exit 0, log "replaced 100 rows with 99" and pass every check, the stored 2012-04-09 bar
gone; a bar with high below low was written over the good one and only then caught. Now a short
or malformed line is an error naming the file and the line, the staged write is audited by the
table's blocking suite before it is published, and a write that leaves fewer rows than the
warehouse held fails unless confirmed (`allow_shrink`).
"""

import json
import subprocess
from datetime import date, datetime, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest

from assets.ingest import AuditFailure, ohlcv_bars, publish
from assets.quality import QUALITY_CHECKS
from assets.resources import MarketSourcesResource
from pipelines.defs.resources import default_resources
from tests.processes import BIN, ROOT, instance_env
from warehouse import DataPaths, Warehouse
from warehouse.quality import FRESHNESS_RULE, validate_window
from warehouse.sources import make_source
from warehouse.sources.base import SourceFetchError
from warehouse.sources.csvfile import check_rows
from warehouse.store import ShrinkingWindowError

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
    assert "BTC-USD: 1 of its 100 rows, from 2012-04-09" in message and str(path) in message
    assert """'{"ops": {"ohlcv_bars": {"config": {"allow_shrink": true}}}}'""" in message
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


# --- the write-audit-publish rules, through `publish` (what the asset calls) ------------------


def _publish(store, table, source, start, end, rows=None, **kw):
    rows = source.fetch(start, end) if rows is None else rows
    tf = getattr(source, "timeframe", "1d")
    return publish(store, table, tf, rows, (start, end), source, (start, end), **kw)


def test_a_bad_hourly_bar_is_rolled_back_though_its_daily_bar_looks_fine(warehouse):
    hourly = make_source("ohlcv", "synthetic", timeframe="1h", symbols=["BTC-USD"])
    start, end = datetime(2021, 1, 1), datetime(2021, 1, 5)
    _publish(warehouse, "ohlcv", hourly, start, end)
    before = {t: warehouse.read(t) for t in ("ohlcv", "ohlcv_1h")}
    rows = hourly.fetch(start, end)
    bad = pl.col("ts") == datetime(2021, 1, 2, 5)
    rows = rows.with_columns(high=pl.when(bad).then(pl.col("low") * 0.9).otherwise(pl.col("high")))
    with pytest.raises(AuditFailure, match="consistent_bars") as err:
        _publish(warehouse, "ohlcv", hourly, start, end, rows)
    assert err.value.report.success  # the daily table alone would have passed
    assert all(warehouse.read(t).equals(df) for t, df in before.items())


def test_an_old_gap_or_an_entity_no_longer_configured_does_not_block_a_good_write(warehouse):
    src = make_source("ohlcv", "synthetic", symbols=["BTC-USD", "ACME"])
    start, end = datetime(2021, 1, 1), datetime(2021, 2, 1)
    rows = src.fetch(start, end)
    holed = rows.filter(~((pl.col("symbol") == "BTC-USD") & (pl.col("ts") == datetime(2021, 1, 9))))
    warehouse.replace_window("ohlcv", holed, start, end, src.entities, "past")  # an old outage
    # the refresh rewrites the last days of BTC only (ACME left out of the config)
    btc = make_source("ohlcv", "synthetic", symbols=["BTC-USD"])
    tail = datetime(2021, 1, 28)
    _publish(warehouse, "ohlcv", btc, tail, end)  # the old gap is there before and after: passes
    # but a write that adds a gap is refused, naming it
    cut = btc.fetch(tail, end).filter(pl.col("ts") != datetime(2021, 1, 30))
    with pytest.raises((AuditFailure, ShrinkingWindowError)):
        _publish(warehouse, "ohlcv", btc, tail, end, cut)
    fresh = btc.fetch(start, end)  # the whole window again, the hole filled: passes
    _publish(warehouse, "ohlcv", btc, start, end, fresh)
    assert warehouse.read("ohlcv", start, end, ["BTC-USD"]).height == 31


def test_a_stale_history_lands_and_only_the_check_judges_its_freshness(warehouse):
    src = make_source("ohlcv", "synthetic", symbols=["BTC-USD"])
    start, end = datetime(2012, 1, 1), datetime(2013, 1, 1)
    rows = src.fetch(start, datetime(2012, 4, 10))  # a file ending in April, no `until`
    _publish(warehouse, "ohlcv", src, start, end, rows)
    report = validate_window("ohlcv", warehouse.read, start, end)
    assert [f.expectation for f in report.failures] == [FRESHNESS_RULE]
    assert warehouse.count("ohlcv") == rows.height


def test_a_file_cut_inside_its_last_value_is_an_error(stored):
    root, path, lines, store, before = stored
    _write(path, [*lines[:-1], lines[-1][:-2]], newline_at_end=False)  # volume 100 -> 1
    message = _failure(_ingest(root, path))
    assert "does not end with a line break" in message and "line 101" in message
    assert store.read("ohlcv").equals(before)


@pytest.mark.parametrize(
    ("kind", "fixture", "options"),
    [
        ("onchain", "coinmetrics/shared_like_current.csv", {"assets": ("BTC",)}),
        ("macro", "fred/macro_wide.csv", {"series": ("DGS10", "DGS2")}),
    ],
)
def test_a_truncated_file_of_the_other_csv_connectors_names_the_line(
    tmp_path, kind, fixture, options
):
    good = (Path(__file__).parent / "fixtures" / fixture).read_text().splitlines()
    path = tmp_path / Path(fixture).name
    path.write_text("\n".join([*good, good[-1][: len(good[-1]) // 2]]))
    name = "coinmetrics_csv" if kind == "onchain" else "fred_file"
    with pytest.raises(SourceFetchError, match=rf"line {len(good) + 1}: \d+ fields"):
        make_source(kind, name, path=str(path), **options).fetch(
            datetime(2023, 12, 1), datetime(2024, 2, 1)
        )


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("date,open\r\n2012-01-01,1\r\n", True),  # CRLF
        ("\ufeffdate,open\n2012-01-01,1\n", True),  # a byte-order mark
        ("\ndate,open\n2012-01-01,1\n\n\n", True),  # blank lines before and after
        ("date,open,\n2012-01-01,1\n2012-01-02,2,\n", True),  # an unnamed last column
        ('date,open\n"2012-01-01","1,5"\n', True),  # a quoted separator
        ("date,open\n2012-01-01,1,\n", False),  # a stray separator
        ("date,open\n2012-01-01,1\n2012-01-02,2", False),  # no final line break
    ],
)
def test_check_rows_on_the_layouts_csv_readers_accept(tmp_path, text, ok):
    path = tmp_path / "f.csv"
    path.write_text(text)
    if ok:
        check_rows(path, "file")
    else:
        with pytest.raises(SourceFetchError, match="line 2|line 3"):
            check_rows(path, "file")


@pytest.mark.slow
def test_a_truncated_file_fails_the_cli_as_a_new_user_runs_it(tmp_path):
    """`dagster asset materialize` on the truncated file: a non-zero exit naming the file and
    the line, and the 100 bars of the first ingest still stored."""
    env = instance_env(tmp_path)
    path = tmp_path / "btc_daily.csv"
    lines = _good_lines()

    def ingest() -> subprocess.CompletedProcess:
        config = {
            "resources": {
                "sources": {
                    "config": {
                        "ohlcv_source": "file",
                        "ohlcv_path": str(path),
                        "symbols": ["BTC-USD"],
                        "until": f"{LAST + timedelta(days=1)}",
                    }
                }
            }
        }
        cmd = [str(BIN / "dagster"), "asset", "materialize", "-m", "pipelines.definitions"]
        cmd += ["--select", "ohlcv_bars", "--partition", "2012", "--config-json"]
        return subprocess.run(
            [*cmd, json.dumps(config)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    _write(path, lines)
    first = ingest()
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    _write(path, [*lines[:-1], "2012-04-09,4.7,4"], newline_at_end=False)
    second = ingest()
    out = second.stdout + second.stderr
    assert second.returncode != 0
    assert str(path) in out and "line 101: 3 fields, '2012-04-09,4.7,4'" in out, out[-4000:]
    store = Warehouse(DataPaths.at(tmp_path / "data"))
    assert store.count("ohlcv") == 100 and store.read("ohlcv")["ts"].max() == datetime(2012, 4, 9)
