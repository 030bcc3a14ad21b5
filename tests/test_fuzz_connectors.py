"""Fuzz every connector's parser with truncated and corrupted payloads, through the real write path.

Each test first stores a good payload's rows with `assets.ingest.publish` (over a window that
reaches before the fuzzed one, so that rows outside the fuzzed window exist), keeps a copy of the
bar / on-chain / macro tables, then lets hypothesis corrupt the payload of the fuzzed window:
text-level (truncate at a byte, delete / duplicate / swap lines, insert bytes, replace a token)
and, for JSON payloads, structural (drop or duplicate an element, cut a row short, truncate a
list, drop a key, set a value to null / text / NaN / a negative number). The connector fetches
the corrupted payload, and the rows are published as the ingest asset publishes them.

The outcome must be one of:
- a clean error (SourceError, SourceFetchError, SchemaError - ShrinkingWindowError included - or
  AuditFailure) and every table exactly as stored before; any other exception is a bug;
- success, and then the window holds exactly the rows the connector returned (conformed; the
  coarser bar tables their resampling), no stored key of the window is lost and nothing outside
  the window changed.

Examples per connector: MAMBACAST_FUZZ_EXAMPLES (default 20; an audited write costs about a second
of Great Expectations, an early error much less), derandomized, so every run draws the same
payloads; each test prints how many examples ended in each outcome (`pytest -s` shows it).
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import math
import os
import random
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import requests
import yfinance.base
import yfinance.data
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from assets.ingest import AuditFailure, publish
from tests.httpfixture import (
    ReplayServer,
    Reply,
    http_server_fixture,  # noqa: F401 (registers `http_server`)
)
from tests.test_source_exchange import FakeBinance
from tests.test_source_yahoo import (
    FakeYahoo,
    yahoo,  # noqa: F401 (autouse: isolates yfinance's state)
)
from tests.test_source_yahoo import make as make_yahoo
from warehouse import DataPaths, Warehouse
from warehouse.quality import us_federal_holidays
from warehouse.schema import SchemaError, conform, ohlcv_table, table_spec
from warehouse.sources import make_source
from warehouse.sources.base import SourceError, SourceFetchError
from warehouse.sources.exchange import CcxtOHLCV
from warehouse.sources.retry import RetryPolicy

EXAMPLES = int(os.environ.get("MAMBACAST_FUZZ_EXAMPLES", "20"))
CLEAN = (SourceError, SourceFetchError, SchemaError, AuditFailure)
FAST = RetryPolicy(attempts=2, base_delay_s=0.0, max_delay_s=0.0)
BAR_TABLES = ("ohlcv_1m", "ohlcv_1h", "ohlcv")
TABLES = {"ohlcv": BAR_TABLES, "onchain": ("onchain",), "macro": ("macro",)}
SHOWN = 20_000  # payloads up to this size are printed whole when an example fails
FILE_NUMBERS = itertools.count()

JAN1, FEB1, MAR1 = datetime(2024, 1, 1), datetime(2024, 2, 1), datetime(2024, 3, 1)
DAYS = [JAN1.date() + timedelta(days=i) for i in range(60)]  # 2024-01-01 .. 2024-02-29
HOLIDAYS = set(us_federal_holidays())
BUSINESS_DAYS = [d for d in DAYS if d.weekday() < 5 and d not in HOLIDAYS]


# -- corruptions -------------------------------------------------------------------------------
TEXT_OPS = (
    "truncate",
    "delete_line",
    "duplicate_line",
    "insert_bytes",
    "replace_token",
    "swap_lines",
)
# what a corrupted cell or value may turn into
FILLERS = (
    "",
    " ",
    "nan",
    "NaN",
    "null",
    "None",
    "inf",
    "-inf",
    "1e309",
    "-1",
    "-0.01",
    "0",
    "abc",
    "n/a",
    ".",
    ",",
    '"',
    "'",
    "1,2",
    "]",
    "}",
    "<x>",
    "\n",
    "\t",
    "2024-02-30",
    "2024-13-01",
    "9999-12-31",
    "1970-01-01",
    "2024-02-10",
    "1707523200",
    "12345678901234567890",
    "true",
    "é",
    "\x00",
)
TOKEN = re.compile(rb"[^\s,:;\"'<>=\[\]{}/]+")


class Corruption:
    """A corrupted body: `what` says the operation and where, `page` which body it changed."""

    def __init__(self, what: str, page: int, body: bytes) -> None:
        self.what, self.page, self.body = what, page, body

    def __repr__(self) -> str:
        return f"Corruption({self.what!r}, page={self.page}, {len(self.body)} bytes)"


def _filler() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(FILLERS), st.text(max_size=6))


@st.composite
def text_corruption(draw: st.DrawFn, good: bytes) -> tuple[str, bytes]:
    """One text-level corruption of `good`: (what was done, the corrupted bytes)."""
    lines = good.splitlines(keepends=True)
    op = draw(st.sampled_from(TEXT_OPS if len(lines) > 1 else TEXT_OPS[:1] + TEXT_OPS[3:5]))
    line = st.integers(0, len(lines) - 1)
    if op == "truncate":
        k = draw(st.integers(0, len(good) - 1))
        return f"truncate at byte {k}", good[:k]
    if op == "delete_line":
        i = draw(line)
        return f"delete line {i + 1} {lines[i][:80]!r}", b"".join(lines[:i] + lines[i + 1 :])
    if op == "duplicate_line":
        i, j = draw(line), draw(st.integers(0, len(lines)))
        out = lines[:j] + [lines[i] if lines[i].endswith(b"\n") else lines[i] + b"\n"] + lines[j:]
        return f"copy line {i + 1} {lines[i][:80]!r} before line {j + 1}", b"".join(out)
    if op == "insert_bytes":
        k, junk = draw(st.integers(0, len(good))), draw(st.binary(min_size=1, max_size=8))
        return f"insert {junk!r} at byte {k}", good[:k] + junk + good[k:]
    if op == "replace_token":
        spans = [m.span() for m in TOKEN.finditer(good)]
        a, b = spans[draw(st.integers(0, len(spans) - 1))]
        text = draw(_filler()).encode()
        return f"replace {good[a:b]!r} at byte {a} by {text!r}", good[:a] + text + good[b:]
    i, j = draw(line), draw(line)
    out = list(lines)
    out[i], out[j] = out[j], out[i]
    if not b"".join(out).endswith(b"\n") and good.endswith(b"\n"):
        out[-1] += b"\n"
    return f"swap lines {i + 1} and {j + 1}", b"".join(out)


def _nodes(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    yield path, obj
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nodes(v, (*path, i))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nodes(v, (*path, k))


def _at(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _negative(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return -1
    if isinstance(value, int | float):
        return -value if value else -1
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return "-1"
        return value[1:] if value.startswith("-") else f"-{value}"
    return -1


@st.composite
def json_corruption(draw: st.DrawFn, good: Any, dump: Callable[[Any], bytes]) -> tuple[str, bytes]:
    """One structural corruption of the decoded JSON `good`, serialized with `dump`."""
    nodes = list(_nodes(good))
    lists = [p for p, n in nodes if isinstance(n, list) and n]
    dicts = [p for p, n in nodes if isinstance(n, dict) and n]
    # a row: a list or object held in a list (a candle, a Coin Metrics row)
    rows = [
        p
        for p, n in nodes
        if p and isinstance(n, list | dict) and len(n) > 1 and isinstance(_at(good, p[:-1]), list)
    ]
    values = [p for p, n in nodes if p and not isinstance(n, list | dict)]
    ops = {
        "drop_element": lists,
        "duplicate_element": lists,
        "truncate_list": lists,
        "cut_row": rows,
        "drop_key": dicts,
        "set_value": values,
    }
    op = draw(st.sampled_from(sorted(o for o, ps in ops.items() if ps)))
    path = draw(st.sampled_from(ops[op]))
    obj = copy.deepcopy(good)
    node = _at(obj, path)
    if op in ("drop_element", "duplicate_element"):
        i = draw(st.integers(0, len(node) - 1))
        if op == "drop_element":
            del node[i]
        else:
            node.insert(i, copy.deepcopy(node[i]))
        what = f"{op} {i} of {list(path)}"
    elif op in ("truncate_list", "cut_row"):
        k = draw(st.integers(0, len(node) - 1))
        if isinstance(node, list):
            del node[k:]
        else:
            for key in list(node)[k:]:
                del node[key]
        what = f"{op} {list(path)} to {k} entries"
    elif op == "drop_key":
        key = draw(st.sampled_from(sorted(node)))
        del node[key]
        what = f"drop key {key!r} of {list(path)}"
    else:
        old = node
        new = draw(
            st.one_of(
                st.sampled_from([None, "abc", "", math.nan, math.inf, 0, True, [], {}]),
                st.just(_negative(old)),
                _filler(),
            )
        )
        _at(obj, path[:-1])[path[-1]] = new
        what = f"set {list(path)} from {old!r} to {new!r}"
    return what, dump(obj)


def corruptions(bodies: tuple[bytes, ...], decoded: tuple[Any, ...] | None, dump) -> Any:
    """Corruptions of one body of a payload (several bodies: the pages of an API answer)."""

    @st.composite
    def one(draw: st.DrawFn) -> Corruption:
        page = draw(st.integers(0, len(bodies) - 1))
        kinds = [text_corruption(bodies[page])]
        if decoded is not None:
            kinds.append(json_corruption(decoded[page], dump))
        what, body = draw(st.one_of(kinds))
        return Corruption(what, page, body)

    return one()


def dump_rows(obj: Any, indent: str = "") -> str:
    """JSON with every list or object of plain values on one line, the rest one item a line:
    one candle or metrics row per line, as the recorded fixtures are laid out."""
    if not isinstance(obj, list | dict) or not any(isinstance(v, list | dict) for v in _items(obj)):
        return json.dumps(obj)
    inner = indent + " "
    if isinstance(obj, list):
        parts = [inner + dump_rows(v, inner) for v in obj]
        return "[\n" + ",\n".join(parts) + "\n" + indent + "]"
    parts = [f"{inner}{json.dumps(k)}: {dump_rows(v, inner)}" for k, v in obj.items()]
    return "{\n" + ",\n".join(parts) + "\n" + indent + "}"


def _items(obj: list | dict) -> list:
    return list(obj.values()) if isinstance(obj, dict) else obj


def dump_bytes(obj: Any) -> bytes:
    return (dump_rows(obj) + "\n").encode()


# -- good payloads -----------------------------------------------------------------------------
def bars(rng: random.Random, times: list, price: float, step: float = 0.01) -> list[tuple]:
    """(time, open, high, low, close, volume) rows of a random walk; prices in cents."""
    out = []
    close = price
    for t in times:
        o = close
        c = round(max(1.0, o * (1 + rng.gauss(0, step))), 2)
        h = round(max(o, c) * (1 + abs(rng.gauss(0, step / 2))) + 0.01, 2)
        low = round(max(0.01, min(o, c) * (1 - abs(rng.gauss(0, step / 2))) - 0.01), 2)
        out.append((t, o, h, low, c, round(rng.uniform(10, 5000), 4)))
        close = c
    return out


def csv_text(header: str, rows: list[tuple]) -> bytes:
    return (header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)).encode()


def day_bars(seed: int = 1) -> list[tuple]:
    return bars(random.Random(seed), DAYS, 42000.0, 0.03)


def onchain_rows(seed: int = 2) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "day": d,
            "TxCnt": rng.randint(300_000, 700_000),
            "AdrActCnt": rng.randint(600_000, 1_000_000),
            "FeeTotNtv": round(rng.uniform(10, 90), 3),
            "HashRate": round(rng.uniform(4e8, 6e8), 2),
            "DiffMean": round(7.2e13 + rng.uniform(0, 1e12), 1),
            "UTXOCnt": rng.randint(170_000_000, 180_000_000),
        }
        for d in DAYS
    ]


def rates(seed: int, level: float) -> list[tuple[date, float]]:
    """A daily rate on every business day, changing every day (never stale)."""
    rng = random.Random(seed)
    out, value = [], level
    for d in BUSINESS_DAYS:
        value = round(value + rng.choice([-1, 1]) * rng.randint(1, 6) / 100, 2)
        out.append((d, value))
    return out


def next_business_day(d: date) -> date:
    d += timedelta(days=1)
    while d.weekday() >= 5:
        d += timedelta(days=1)
    return d


def in_window(d: date | datetime, window: tuple[datetime, datetime]) -> bool:
    t = d if isinstance(d, datetime) else datetime.combine(d, datetime.min.time())
    return window[0] <= t < window[1]


# -- the write path and its checks -------------------------------------------------------------
@dataclass
class Case:
    """One connector: how to serve a payload to it and fetch, and which windows to use."""

    name: str
    table: str  # ohlcv | onchain | macro
    full: tuple[datetime, datetime]  # the window stored first
    window: tuple[datetime, datetime]  # the window fetched from the corrupted payload
    # the good payload served for a window: one body per response (or the file)
    payload: Callable[[tuple[datetime, datetime]], tuple[bytes, ...]]
    # build the connector on the served bodies and fetch the window: (source, rows)
    fetch: Callable[[tuple[bytes, ...], tuple[datetime, datetime]], tuple[Any, pl.DataFrame]]
    is_json: bool = False
    examples: int = EXAMPLES


def timeframe_of(source: Any) -> str:
    return getattr(source, "timeframe", "1d")


def tables_of(case: Case) -> tuple[str, ...]:
    return TABLES[case.table]


def store_and_publish(case: Case, store: Warehouse, bodies, window) -> tuple[Any, pl.DataFrame]:
    """What the ingest asset does for a whole-partition run: fetch, then publish."""
    source, rows = case.fetch(bodies, window)
    publish(store, case.table, timeframe_of(source), rows, window, source, window)
    return source, rows


def read_all(store: Warehouse, case: Case) -> dict[str, pl.DataFrame]:
    return {t: store.read(t) for t in tables_of(case)}


def _bounds(table: str, window: tuple[datetime, datetime]) -> tuple[Any, Any]:
    spec = table_spec(table)
    if spec.columns[spec.time_column] == pl.Date():
        return window[0].date(), window[1].date()
    return window


def _inside(table: str, window, entities) -> pl.Expr:
    spec = table_spec(table)
    lo, hi = _bounds(table, window)
    t = pl.col(spec.time_column)
    return (t >= lo) & (t < hi) & pl.col(spec.entity_column).is_in(list(entities))


def resample(rows: pl.DataFrame, every: str) -> pl.DataFrame:
    return (
        rows.sort("symbol", "ts")
        .group_by("symbol", pl.col("ts").dt.truncate(every))
        .agg(
            pl.col("open").first(),
            pl.col("high").max(),
            pl.col("low").min(),
            pl.col("close").last(),
            pl.col("volume").sum(),
        )
        .sort("symbol", "ts")
    )


def check_outcome(
    case: Case,
    store: Warehouse,
    before: dict[str, pl.DataFrame],
    source: Any,
    rows: pl.DataFrame | None,
    error: BaseException | None,
) -> None:
    """The warehouse holds the old data (after an error) or the new complete data, never a mix."""
    after = read_all(store, case)
    if error is not None:
        for t in tables_of(case):
            assert after[t].equals(before[t]), (
                f"{case.name}: {type(error).__name__} was raised but table {t} changed: "
                f"{error}\nbefore:\n{before[t]}\nafter:\n{after[t]}"
            )
        return
    assert rows is not None
    written = tables_of(case)
    if case.table == "ohlcv":  # the source's bar table and every coarser one, rebuilt
        written = BAR_TABLES[BAR_TABLES.index(ohlcv_table(timeframe_of(source))) :]
    primary = written[0]
    spec = table_spec(primary)
    fetched = conform(rows, spec, source.name).sort(list(spec.key))
    for t in tables_of(case):
        s = table_spec(t)
        inside = _inside(t, case.window, source.entities)
        keys = [s.entity_column, s.time_column]
        assert after[t].filter(~inside).equals(before[t].filter(~inside)), (
            f"{case.name}: rows of {t} outside the window changed"
        )
        if t not in written:
            assert after[t].equals(before[t]), f"{case.name}: {t} was not written but changed"
            continue
        lost = (
            before[t].filter(inside).select(keys).join(after[t].select(keys), on=keys, how="anti")
        )
        assert lost.is_empty(), f"{case.name}: stored keys of {t} lost without an error:\n{lost}"
        held = after[t].filter(inside).sort(list(s.key))
        if t == primary:
            assert held.equals(fetched), (
                f"{case.name}: the window of {t} is not the fetched rows:\nheld\n{held}\n"
                f"fetched\n{fetched}"
            )
        else:  # a coarser bar table, rebuilt from the finer rows
            every = {"ohlcv_1h": "1h", "ohlcv": "1d"}[t]
            assert_frame_equal(held, resample(fetched, every), check_exact=False, rel_tol=1e-9)


def show(corruption: Corruption, good: tuple[bytes, ...]) -> str:
    """The corruption and the corrupted payload (whole when small, else the changed lines)."""
    bad = corruption.body
    head = f"{corruption.what} (body {corruption.page}, {len(bad)} bytes)"
    if len(bad) <= SHOWN:
        return f"{head}:\n{bad.decode('utf-8', 'backslashreplace')}"
    diff = difflib.unified_diff(
        good[corruption.page].decode("utf-8", "backslashreplace").splitlines(),
        bad.decode("utf-8", "backslashreplace").splitlines(),
        "good",
        "corrupted",
        n=2,
        lineterm="",
    )
    return head + ":\n" + "\n".join(list(diff)[:80])


def fuzz(case: Case, root: Path) -> None:
    """Store the good payload, then run the corrupted ones through fetch + publish."""
    base = DataPaths.at(root / "stored")
    store = Warehouse(base, lock_timeout_s=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warnings are reported per example, never raised
        _, rows = store_and_publish(case, store, case.payload(case.full), case.full)
        assert rows.height, f"{case.name}: the good payload has no rows"
        stored = read_all(store, case)
        # the good payload of the fuzzed window publishes cleanly and changes nothing
        good = case.payload(case.window)
        source, rows = store_and_publish(case, store, good, case.window)
        check_outcome(case, store, stored, source, rows, None)
        before = read_all(store, case)
        for t in tables_of(case):
            assert before[t].equals(stored[t]), f"{case.name}: re-publishing changed {t}"
    snapshot = root / "snapshot.duckdb"
    shutil.copyfile(base.duckdb_file, snapshot)
    decoded = tuple(json.loads(b) for b in good) if case.is_json else None
    counter = iter(range(1_000_000))
    outcomes: Counter[str] = Counter()

    @settings(
        max_examples=case.examples,
        deadline=None,
        derandomize=True,
        database=None,
        # no shrinking: a corruption is one small edit already, and each rerun costs an audit
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(corruption=corruptions(good, decoded, dump_bytes))
    def run(corruption: Corruption) -> None:
        note(show(corruption, good))
        paths = DataPaths.at(root / f"example{next(counter)}")
        paths.root.mkdir(parents=True)
        shutil.copyfile(snapshot, paths.duckdb_file)
        store = Warehouse(paths, lock_timeout_s=60)
        bodies = tuple(corruption.body if i == corruption.page else b for i, b in enumerate(good))
        source = rows = error = None
        try:
            with warnings.catch_warnings(record=True) as seen, pytest.MonkeyPatch.context() as mp:
                warnings.simplefilter("always")
                isolate_yfinance(mp)
                try:
                    source, rows = store_and_publish(case, store, bodies, case.window)
                except CLEAN as exc:
                    error = exc
                except Exception as exc:
                    raise AssertionError(
                        f"{case.name}: {type(exc).__name__} is not a clean error "
                        f"(SourceError, SourceFetchError, SchemaError or AuditFailure): {exc}\n"
                        f"payload: {show(corruption, good)}"
                    ) from exc
            for w in seen:
                note(f"warning: {w.category.__name__}: {w.message}")
            outcome = type(error).__name__ if error else "success"
            outcomes[outcome] += 1
            note(f"outcome: {outcome}: {error}")
            check_outcome(case, store, before, source, rows, error)
        finally:
            shutil.rmtree(paths.root, ignore_errors=True)

    run()
    print(f"{case.name}: {sum(outcomes.values())} examples, outcomes {dict(outcomes)}")


def isolate_yfinance(mp: pytest.MonkeyPatch) -> None:
    """Per example, what the `yahoo` fixture does per test: fresh singletons and counters."""
    mp.setattr(yfinance.data.SingletonMeta, "_instances", {})
    mp.setattr(yfinance.base, "_tz_info_fetch_ctr", 0)
    yfinance.data.YfData.cache_get.cache_clear()


# -- file: OHLCV CSV ---------------------------------------------------------------------------
def fresh_file(tmp: Path, name: str, body: bytes) -> Path:
    """`body` written to a new file: a file rewritten within one clock tick at the same size
    would keep its (size, mtime) stamp, and the connectors skip checking a file they checked."""
    path = tmp / f"{next(FILE_NUMBERS)}-{name}"
    path.write_bytes(body)
    return path


def file_fetch(tmp: Path, name: str, **options) -> Callable:
    def fetch(bodies: tuple[bytes, ...], window) -> tuple[Any, pl.DataFrame]:
        path = fresh_file(tmp, name, bodies[0])
        source = make_source("ohlcv", "file", path=str(path), **options)
        return source, source.fetch(*window)

    return fetch


def file_daily_case(tmp_path: Path) -> Case:
    body = csv_text(
        "date,open,high,low,close,volume",
        [(t.isoformat(), *r) for t, *r in day_bars()],
    )
    case = Case(
        "file daily",
        "ohlcv",
        (JAN1, MAR1),
        (FEB1, MAR1),
        lambda w: (body,),
        file_fetch(tmp_path, "btc_daily.csv", symbols=("BTC-USD",), timeframe="1d"),
    )
    return case


def hourly_body() -> bytes:
    hours = [JAN1 + timedelta(hours=h) for h in range(6 * 24)]
    rows = []
    for i, symbol in enumerate(("BTC-USD", "ETH-USD")):
        walk = bars(random.Random(10 + i), hours, 42000.0 / (1 + 17 * i), 0.004)
        rows += [(symbol, f"{t:%Y-%m-%dT%H:%M:%SZ}", *r) for t, *r in walk]
    return csv_text("symbol,datetime_utc,open,high,low,close,volume", rows)


def file_hourly_case(tmp_path: Path) -> Case:
    body = hourly_body()
    case = Case(
        "file hourly",
        "ohlcv",
        (JAN1, JAN1 + timedelta(days=6)),
        (JAN1 + timedelta(days=3), JAN1 + timedelta(days=6)),
        lambda w: (body,),
        file_fetch(tmp_path, "hourly.csv", symbols=("BTC-USD", "ETH-USD"), timeframe="1h"),
    )
    return case


def file_minute_case(tmp_path: Path) -> Case:
    minutes = [JAN1 + timedelta(minutes=m) for m in range(2 * 1440)]
    walk = bars(random.Random(20), minutes, 42000.0, 0.0005)
    epoch = datetime(1970, 1, 1)
    body = csv_text(
        "Timestamp,Open,High,Low,Close,Volume",
        [(int((t - epoch).total_seconds()), *r) for t, *r in walk],
    )
    case = Case(
        "file 1-minute",
        "ohlcv",
        (JAN1, JAN1 + timedelta(days=2)),
        (JAN1 + timedelta(days=1), JAN1 + timedelta(days=2)),
        lambda w: (body,),
        file_fetch(tmp_path, "btc_1m.csv", symbols=("BTC-USD",), timeframe="1m"),
    )
    return case


# -- coinmetrics: the API and CSV files --------------------------------------------------------
CM_PATH = "/v4/timeseries/asset-metrics"


def cm_api_payload(server: ReplayServer) -> Callable:
    def payload(window) -> tuple[bytes, ...]:
        rows = [
            {
                "asset": "btc",
                "time": f"{r['day']}T00:00:00.000000000Z",
                **{k: str(v) for k, v in r.items() if k != "day"},
            }
            for r in onchain_rows()
            if in_window(r["day"], window)
        ]
        half = len(rows) // 2
        page1 = {"data": rows[:half], "next_page_url": f"{server.url}/page-two?cursor=2"}
        return dump_bytes(page1), dump_bytes({"data": rows[half:]})

    return payload


def coinmetrics_api_case(tmp_path: Path, http_server: ReplayServer) -> Case:
    def fetch(bodies, window):
        http_server.route(CM_PATH, Reply(200, bodies[0]))
        http_server.route("/page-two", Reply(200, bodies[1]))
        source = make_source(
            "onchain", "coinmetrics", base_url=f"{http_server.url}/v4", policy=FAST, timeout_s=5
        )
        return source, source.fetch(*window)

    case = Case(
        "coinmetrics", "onchain", (JAN1, MAR1), (FEB1, MAR1), cm_api_payload(http_server), fetch
    )
    case.is_json = True
    return case


def coinmetrics_csv_case(tmp_path: Path) -> Case:
    metrics = ["AdrActCnt", "FeeTotNtv", "HashRate", "TxCnt", "DiffMean", "UTXOCnt"]
    body = csv_text(
        "time," + ",".join(metrics),
        [(r["day"].isoformat(), *(r[m] for m in metrics)) for r in onchain_rows()],
    )

    def fetch(bodies, window):
        path = fresh_file(tmp_path, "btc.csv", bodies[0])
        source = make_source("onchain", "coinmetrics_csv", path=str(path), assets=("BTC",))
        return source, source.fetch(*window)

    return Case("coinmetrics_csv", "onchain", (JAN1, MAR1), (FEB1, MAR1), lambda w: (body,), fetch)


# -- fred: the API (fredapi, ALFRED XML), the keyless CSV download and files -------------------
FRED_KEY = "abcdef0123456789abcdef0123456789"  # made up, FRED's 32-character format


def alfred_xml() -> bytes:
    """All releases of DGS10: each value first released the next business day; every fifth
    observation revised a week later."""
    lines = []
    for i, (d, v) in enumerate(rates(30, 3.9)):
        first = next_business_day(d)
        if i % 5 == 2:
            later = first + timedelta(days=7)
            lines.append((first, later - timedelta(days=1), d, v))
            lines.append((later, date(9999, 12, 31), d, round(v + 0.01, 2)))
        else:
            lines.append((first, date(9999, 12, 31), d, v))
    body = "".join(
        f'  <observation realtime_start="{a}" realtime_end="{b}" date="{d}" value="{v}"/>\n'
        for a, b, d, v in lines
    )
    return (
        '<?xml version="1.0" encoding="utf-8" ?>\n'
        '<observations realtime_start="1776-07-04" realtime_end="9999-12-31" '
        f'count="{len(lines)}" offset="0" limit="100000">\n{body}</observations>\n'
    ).encode()


def fred_api_case(tmp_path: Path, http_server: ReplayServer) -> Case:
    body = alfred_xml()

    def fetch(bodies, window):
        http_server.route(
            "/fred/series/observations", Reply(200, bodies[0], content_type="text/xml")
        )
        source = make_source(
            "macro",
            "fred",
            series=("DGS10",),
            mode="api",
            api_key=FRED_KEY,
            api_root=f"{http_server.url}/fred",
            policy=FAST,
        )
        return source, source.fetch(*window)

    return Case("fred api", "macro", (JAN1, MAR1), (FEB1, MAR1), lambda w: (body,), fetch)


def fred_csv_case(tmp_path: Path, http_server: ReplayServer) -> Case:

    def payload(window) -> tuple[bytes, ...]:
        rows = [(d.isoformat(), v) for d, v in rates(31, 4.3) if in_window(d, window)]
        return (csv_text("observation_date,DGS10", rows),)

    def fetch(bodies, window):
        http_server.route("/graph/fredgraph.csv", Reply(200, bodies[0], content_type="text/csv"))
        source = make_source(
            "macro",
            "fred",
            series=("DGS10",),
            mode="csv",
            csv_url=f"{http_server.url}/graph/fredgraph.csv",
            policy=FAST,
            timeout_s=5,
        )
        return source, source.fetch(*window)

    return Case("fred csv mode", "macro", (JAN1, MAR1), (FEB1, MAR1), payload, fetch)


def fred_file_fetch(tmp: Path, series: tuple[str, ...]) -> Callable:
    def fetch(bodies, window):
        path = fresh_file(tmp, "macro.csv", bodies[0])
        source = make_source("macro", "fred_file", path=str(path), series=series)
        return source, source.fetch(*window)

    return fetch


def fred_file_wide_case(tmp_path: Path) -> Case:
    ten, two = dict(rates(32, 3.9)), dict(rates(33, 4.3))
    # every calendar day, as ../shared/data's file: empty cells on weekends and holidays
    body = csv_text(
        "date,DGS10,DGS2",
        [(d.isoformat(), ten.get(d, ""), two.get(d, "")) for d in DAYS],
    )
    case = Case(
        "fred_file wide",
        "macro",
        (JAN1, MAR1),
        (FEB1, MAR1),
        lambda w: (body,),
        fred_file_fetch(tmp_path, ("DGS10", "DGS2")),
    )
    return case


def fred_file_long_case(tmp_path: Path) -> Case:
    rows = [
        (s, d.isoformat(), v, next_business_day(d).isoformat())
        for s, seed, level in (("DGS10", 34, 3.9), ("DGS2", 35, 4.3))
        for d, v in rates(seed, level)
    ]
    body = csv_text("series,date,value,published", rows)
    case = Case(
        "fred_file long",
        "macro",
        (JAN1, MAR1),
        (FEB1, MAR1),
        lambda w: (body,),
        fred_file_fetch(tmp_path, ("DGS10", "DGS2")),
    )
    return case


# -- ccxt: Binance klines behind ccxt's HTTP session -------------------------------------------
CCXT_NOW = MAR1 + timedelta(hours=6)


def klines(window) -> list[list]:
    """Binance's kline rows (open time, prices as text, close time, ...) in the window."""
    out = []
    for d, o, h, low, c, v in day_bars(40):
        start = datetime.combine(d, datetime.min.time())
        if not in_window(start, window):
            continue
        ms = int(start.replace(tzinfo=UTC).timestamp() * 1000)
        row = [ms, f"{o:.8f}", f"{h:.8f}", f"{low:.8f}", f"{c:.8f}", f"{v:.8f}"]
        out.append([*row, ms + 86_399_999, f"{v * c:.8f}", 1000, f"{v / 2:.8f}", "0", "0"])
    return out


def ccxt_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Case:
    exchange = FakeBinance()  # exchangeInfo from the recorded fixtures
    served: dict[str, bytes] = {}

    def request(method: str, url: str, **kwargs) -> requests.Response:
        """ccxt's last step before the socket: klines from the served body, whatever the
        startTime (a later page then repeats the tail, which the connector stops at)."""
        response = requests.Response()
        response.url, response.encoding, response.status_code = url, "utf-8", 200
        response.headers["Content-Type"] = "application/json"
        response.reason = "OK"
        if "/api/v3/klines" in url:
            response._content = served["klines"]
        else:
            response._content = json.dumps(exchange(url)).encode()
        return response

    # one connector for every example: ccxt loads the market list once, as in a long run
    source = CcxtOHLCV(retry=FAST, now=lambda: CCXT_NOW, sleep=lambda s: None)
    monkeypatch.setattr(source.client.session, "request", request)

    def fetch(bodies, window):
        served["klines"] = bodies[0]
        return source, source.fetch(*window)

    case = Case(
        "ccxt", "ohlcv", (JAN1, MAR1), (FEB1, MAR1), lambda w: (dump_bytes(klines(w)),), fetch
    )
    case.is_json = True
    return case


# -- yfinance: Yahoo's chart API behind yfinance's session -------------------------------------
YAHOO_NOW = MAR1 + timedelta(hours=12)


def chart(window) -> dict:
    """Yahoo's v8 chart answer for SPY's daily bars in the window (sessions open 09:30 EST)."""
    rows = [
        r for r in bars(random.Random(50), BUSINESS_DAYS, 475.0, 0.008) if in_window(r[0], window)
    ]
    stamps = [
        int(datetime.combine(d, datetime.min.time()).replace(tzinfo=UTC).timestamp()) + 52200
        for d, *_ in rows
    ]
    last = stamps[-1]
    period = {"timezone": "EST", "start": last, "end": last + 23400, "gmtoffset": -18000}
    meta = {
        "currency": "USD",
        "symbol": "SPY",
        "exchangeName": "PCX",
        "instrumentType": "ETF",
        "firstTradeDate": 728317800,
        "regularMarketTime": last + 23400,
        "gmtoffset": -18000,
        "timezone": "EST",
        "exchangeTimezoneName": "America/New_York",
        "regularMarketPrice": rows[-1][4],
        "chartPreviousClose": rows[0][1],
        "priceHint": 2,
        "currentTradingPeriod": {"pre": period, "regular": period, "post": period},
        "dataGranularity": "1d",
        "range": "",
        "validRanges": ["1d", "5d", "1mo", "3mo", "6mo", "1y", "2y", "5y", "10y", "ytd", "max"],
    }
    quote = {
        k: [r[i] for r in rows]
        for k, i in (("open", 1), ("high", 2), ("low", 3), ("close", 4), ("volume", 5))
    }
    quote["volume"] = [int(v * 10_000) for v in quote["volume"]]
    adj = [round(c * 0.99, 6) for c in quote["close"]]
    result = {
        "meta": meta,
        "timestamp": stamps,
        "indicators": {"quote": [quote], "adjclose": [{"adjclose": adj}]},
    }
    return {"chart": {"result": [result], "error": None}}


def yfinance_case(tmp_path: Path) -> Case:
    def fetch(bodies, window):
        good = dump_bytes(chart(window))
        # every price-history request gets the body (a retry too); the time zone lookup the
        # good chart
        fake = FakeYahoo(charts={("SPY", "1d"): good}, failures=[(200, bodies[0])] * 20)
        source = make_yahoo(fake, symbols=("SPY",), retry=FAST, now=lambda: YAHOO_NOW)
        return source, source.fetch(*window)

    full = (datetime(2024, 1, 2), MAR1)
    case = Case("yfinance", "ohlcv", full, (FEB1, MAR1), lambda w: (dump_bytes(chart(w)),), fetch)
    case.is_json = True
    return case


# -- the tests ---------------------------------------------------------------------------------
def test_fuzz_file_daily_csv(tmp_path: Path) -> None:
    fuzz(file_daily_case(tmp_path), tmp_path)


def test_fuzz_file_hourly_csv(tmp_path: Path) -> None:
    fuzz(file_hourly_case(tmp_path), tmp_path)


def test_fuzz_file_minute_timestamp_csv(tmp_path: Path) -> None:
    fuzz(file_minute_case(tmp_path), tmp_path)


def test_fuzz_coinmetrics_api(tmp_path: Path, http_server: ReplayServer) -> None:
    fuzz(coinmetrics_api_case(tmp_path, http_server), tmp_path)


def test_fuzz_coinmetrics_csv(tmp_path: Path) -> None:
    fuzz(coinmetrics_csv_case(tmp_path), tmp_path)


def test_fuzz_fred_api(tmp_path: Path, http_server: ReplayServer, monkeypatch) -> None:
    monkeypatch.delenv("FRED_API_KEY", raising=False)
    fuzz(fred_api_case(tmp_path, http_server), tmp_path)


def test_fuzz_fred_csv_mode(tmp_path: Path, http_server: ReplayServer, monkeypatch) -> None:
    monkeypatch.delenv("FRED_API_KEY", raising=False)
    fuzz(fred_csv_case(tmp_path, http_server), tmp_path)


def test_fuzz_fred_file_wide(tmp_path: Path) -> None:
    fuzz(fred_file_wide_case(tmp_path), tmp_path)


def test_fuzz_fred_file_long(tmp_path: Path) -> None:
    fuzz(fred_file_long_case(tmp_path), tmp_path)


def test_fuzz_ccxt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fuzz(ccxt_case(tmp_path, monkeypatch), tmp_path)


def test_fuzz_yfinance(tmp_path: Path) -> None:
    fuzz(yfinance_case(tmp_path), tmp_path)
