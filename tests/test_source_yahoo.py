"""The Yahoo Finance OHLCV connector, offline at the HTTP transport.

yfinance sends every request through the Session it is given (`Ticker(..., session=)`); the tests
hand it FakeYahoo, a requests.Session whose `request` answers the cookie (fc.yahoo.com), crumb
(/v1/test/getcrumb) and chart (/v8/finance/chart/<symbol>) endpoints from fixture files, and can
answer the first N price-history requests with an HTTP error.

yfinance keeps process-wide state (a session singleton, a memo of GET responses, on-disk time zone
and cookie caches); the `yahoo` fixture isolates each test from it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import polars as pl
import pytest
import requests
import yfinance.base
import yfinance.cache
import yfinance.data

from warehouse.schema import OHLCV, conform
from warehouse.sources.base import SourceError, SourceFetchError, registered_sources
from warehouse.sources.retry import RetryPolicy
from warehouse.sources.yahoo import YahooOHLCV

FIXTURES = Path(__file__).parent / "fixtures" / "yahoo"
NOW = datetime(2024, 1, 12, 15, 0)  # Friday 10:00 in New York: that day's bar is still open
FAST = RetryPolicy(attempts=3, base_delay_s=0.0)
ADJ = 0.98712  # adjclose / close in chart_SPY_1d.json


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


class FakeYahoo(requests.Session):
    """Yahoo Finance's HTTP endpoints, served from fixtures.

    `failures` are (status, body) pairs returned, in order, to price-history chart requests
    (those with period1/period2) before the fixture is served.
    """

    def __init__(
        self,
        charts: dict[tuple[str, str], dict | bytes] | None = None,
        failures: list[tuple[int, bytes]] | None = None,
    ) -> None:
        super().__init__()
        self.charts = charts or {
            ("SPY", "1d"): load("chart_SPY_1d.json"),
            ("SPY", "1h"): load("chart_SPY_1h.json"),
        }
        self.failures = list(failures or [])
        self.history_requests: list[dict] = []
        self.requests_seen = 0

    def request(self, method: str, url: str, params=None, **kwargs) -> requests.Response:
        self.requests_seen += 1
        params = dict(params or {})
        path = urlsplit(url).path
        if path.startswith("/v8/finance/chart/"):
            symbol = path.rsplit("/", 1)[1]
            if "period1" in params:
                self.history_requests.append({"symbol": symbol, **params})
                if self.failures:
                    return _response(url, *self.failures.pop(0))
            body = self.charts.get((symbol, params.get("interval", "1d")))
            if body is None:
                return _response(url, 404, (FIXTURES / "chart_not_found.json").read_bytes())
            return _response(url, 200, body if isinstance(body, bytes) else json.dumps(body))
        if path == "/v1/test/getcrumb":
            return _response(url, 200, b"Xy1cRumB.9", "text/plain")
        if path.startswith("/v10/finance/quoteSummary/"):
            return _response(url, 404, (FIXTURES / "quote_summary_not_found.json").read_bytes())
        # fc.yahoo.com (cookie) and the consent pages: Yahoo answers 404 / HTML without a form
        return _response(url, 404, b"<html><body>Not here</body></html>", "text/html")


def _response(
    url: str, status: int, body: bytes | str, content_type: str = "application/json"
) -> requests.Response:
    response = requests.Response()
    response.url, response.status_code, response.encoding = url, status, "utf-8"
    response._content = body.encode() if isinstance(body, str) else body
    response.headers["Content-Type"] = content_type
    response.reason = {200: "OK", 404: "Not Found", 429: "Too Many Requests"}.get(status, "Error")
    return response


@pytest.fixture(autouse=True)
def yahoo(monkeypatch: pytest.MonkeyPatch):
    """Isolate yfinance's process-wide state and forbid any session but the fake."""
    monkeypatch.setattr(yfinance.data.SingletonMeta, "_instances", {})
    monkeypatch.setattr(yfinance.cache._TzCacheManager, "_tz_cache", yfinance.cache._TzCacheDummy())
    monkeypatch.setattr(
        yfinance.cache._CookieCacheManager, "_Cookie_cache", yfinance.cache._CookieCacheDummy()
    )
    monkeypatch.setattr(yfinance.base, "_tz_info_fetch_ctr", 0)

    def no_real_session():
        raise AssertionError("yfinance tried to open a real HTTP session in a test")

    monkeypatch.setattr(yfinance.data, "new_session", no_real_session)
    yfinance.data.YfData.cache_get.cache_clear()
    yield
    yfinance.data.YfData.cache_get.cache_clear()


def make(fake: FakeYahoo, **options) -> YahooOHLCV:
    options = {"retry": FAST, "now": lambda: NOW, "sleep": lambda s: None, **options}
    return YahooOHLCV(session=fake, **options)


def spy_daily() -> dict:
    return load("chart_SPY_1d.json")["chart"]["result"][0]


def test_daily_bars_in_schema() -> None:
    fake = FakeYahoo()
    df = make(fake).fetch(datetime(2024, 1, 1), datetime(2024, 1, 13))
    # 9 sessions served: 2024-01-04 has null prices, 2024-01-12 is still open at NOW
    days = [2, 3, 5, 8, 9, 10, 11]
    assert df["ts"].to_list() == [datetime(2024, 1, d) for d in days]
    assert df["symbol"].unique().to_list() == ["SPY"]
    assert df.schema == pl.Schema(OHLCV.columns)
    assert conform(df, OHLCV, "yfinance").equals(df)

    (request,) = fake.history_requests
    assert request["symbol"] == "SPY" and request["interval"] == "1d"
    # whole New York days covering the window: 2024-01-01 00:00 EST .. 2024-01-13 00:00 EST
    assert request["period1"] == int(datetime(2024, 1, 1, 5, tzinfo=UTC).timestamp())
    assert request["period2"] == int(datetime(2024, 1, 13, 5, tzinfo=UTC).timestamp())

    raw = spy_daily()["indicators"]["quote"][0]
    assert df["close"][0] == pytest.approx(raw["close"][0] * ADJ)
    assert df["open"][0] == pytest.approx(raw["open"][0] * ADJ)
    assert df["volume"][0] == raw["volume"][0]  # volume is not price-adjusted


def test_raw_prices_without_auto_adjust() -> None:
    df = make(FakeYahoo(), auto_adjust=False).fetch(datetime(2024, 1, 2), datetime(2024, 1, 4))
    raw = spy_daily()["indicators"]["quote"][0]
    assert df["close"].to_list() == raw["close"][:2]
    assert df["high"].to_list() == raw["high"][:2]


def test_hourly_bars_are_utc_open_times() -> None:
    fake = FakeYahoo()
    src = make(fake, timeframe="1h", now=lambda: datetime(2024, 1, 10, 19, 45))
    df = src.fetch(datetime(2024, 1, 10, 14), datetime(2024, 1, 10, 20))
    # bars open at 09:30 New York = 14:30 UTC; the 19:30 bar is still open at 19:45
    assert df["ts"].to_list() == [datetime(2024, 1, 10, h, 30) for h in range(14, 19)]
    assert fake.history_requests[0]["interval"] == "1h"
    assert fake.history_requests[0]["period1"] == int(
        datetime(2024, 1, 10, 14, tzinfo=UTC).timestamp()
    )
    conform(df, OHLCV, "yfinance")


def test_rows_outside_window_dropped() -> None:
    df = make(FakeYahoo()).fetch(datetime(2024, 1, 5), datetime(2024, 1, 9, 12))
    assert df["ts"].to_list() == [datetime(2024, 1, 5), datetime(2024, 1, 8), datetime(2024, 1, 9)]


def test_several_symbols() -> None:
    chart = load("chart_SPY_1d.json")
    fake = FakeYahoo(charts={("SPY", "1d"): chart, ("QQQ", "1d"): chart})
    df = make(fake, symbols=("SPY", "QQQ")).fetch(datetime(2024, 1, 1), datetime(2024, 1, 13))
    assert df.group_by("symbol").len().sort("symbol").rows() == [("QQQ", 7), ("SPY", 7)]
    conform(df, OHLCV, "yfinance")


def test_rate_limited_then_success() -> None:
    sleeps: list[float] = []
    # yfinance re-asks once itself after a 4xx; two 429s in a row make it raise YFRateLimitError
    fake = FakeYahoo(failures=[(429, b"Too Many Requests")] * 2)
    df = make(fake, sleep=sleeps.append).fetch(datetime(2024, 1, 1), datetime(2024, 1, 13))
    assert df.height == 7
    assert len(sleeps) == 1
    assert len(fake.history_requests) == 3


@pytest.mark.parametrize(
    "down",
    [(503, b"<html><body>Will be right back...</body></html>"), (500, b"Internal Server Error")],
    ids=["503-maintenance-page", "500-plain"],
)
def test_persistent_outage_names_source_and_range(down: tuple[int, bytes]) -> None:
    fake = FakeYahoo(failures=[down] * 20)
    with pytest.raises(SourceFetchError) as err:
        make(fake).fetch(datetime(2024, 1, 1), datetime(2024, 1, 13))
    msg = str(err.value)
    assert msg.startswith("yfinance:")
    for part in ("SPY 1d", "2024-01-01", "2024-01-13", f"after {FAST.attempts} attempts"):
        assert part in msg
    assert len(fake.history_requests) == 2 * FAST.attempts  # yfinance's own re-ask included


def test_truncated_body_retried_then_reported() -> None:
    body = json.dumps(load("chart_SPY_1d.json")).encode()[:700]
    fake = FakeYahoo(failures=[(200, body)] * 20)
    with pytest.raises(SourceFetchError, match=r"unreadable response"):
        make(fake).fetch(datetime(2024, 1, 1), datetime(2024, 1, 13))
    assert len(fake.history_requests) == FAST.attempts

    # a single cut-off answer is retried and then succeeds
    fake = FakeYahoo(failures=[(200, body)])
    assert make(fake).fetch(datetime(2024, 1, 1), datetime(2024, 1, 13)).height == 7


def test_malformed_payload() -> None:
    fake = FakeYahoo(charts={("SPY", "1d"): load("chart_SPY_1d_mismatched.json")})
    sleeps: list[float] = []
    with pytest.raises(SourceFetchError, match=r"SPY 1d.*malformed response") as err:
        make(fake, sleep=sleeps.append).fetch(datetime(2024, 1, 1), datetime(2024, 1, 13))
    assert "same length" in str(err.value)
    assert sleeps == []  # a well-formed but wrong answer is not retried


def test_negative_price_rejected() -> None:
    chart = load("chart_SPY_1d.json")
    chart["chart"]["result"][0]["indicators"]["quote"][0]["low"][1] = -1.0
    fake = FakeYahoo(charts={("SPY", "1d"): chart})
    with pytest.raises(SourceFetchError, match="non-positive or infinite"):
        make(fake, auto_adjust=False).fetch(datetime(2024, 1, 1), datetime(2024, 1, 13))


@pytest.mark.parametrize("info_lookups_done", [0, 2], ids=["quote-summary-404", "no-timezone"])
def test_unknown_symbol(monkeypatch: pytest.MonkeyPatch, info_lookups_done: int) -> None:
    # yfinance asks the quote summary for a time zone only for its first two misses per process
    monkeypatch.setattr(yfinance.base, "_tz_info_fetch_ctr", info_lookups_done)
    sleeps: list[float] = []
    fake = FakeYahoo()
    with pytest.raises(SourceFetchError) as err:
        make(fake, symbols=("NOPE",), sleep=sleeps.append).fetch(
            datetime(2024, 1, 1), datetime(2024, 1, 13)
        )
    msg = str(err.value)
    assert "does not know symbol 'NOPE'" in msg and "[2024-01-01 00:00:00" in msg
    assert sleeps == []
    assert fake.history_requests == []  # it failed at the time zone lookup


def test_explicit_yahoo_error_is_reported() -> None:
    reason = "1h data not available for startTime=1577836800. The requested range must be within the last 730 days."
    body = json.dumps(
        {
            "chart": {
                "result": None,
                "error": {"code": "Unprocessable Entity", "description": reason},
            }
        }
    )
    fake = FakeYahoo(failures=[(422, body.encode())] * 2)
    with pytest.raises(SourceFetchError, match="within the last 730 days"):
        make(fake, timeframe="1h").fetch(datetime(2020, 1, 1), datetime(2020, 1, 2))


def test_window_without_bars() -> None:
    chart = load("chart_SPY_1d.json")
    result = chart["chart"]["result"][0]
    del result["timestamp"]
    result["indicators"] = {"quote": [{}], "adjclose": [{}]}
    fake = FakeYahoo(charts={("SPY", "1d"): chart})
    df = make(fake).fetch(datetime(2024, 1, 6), datetime(2024, 1, 8))  # a weekend
    assert df.height == 0 and df.schema == pl.Schema(OHLCV.columns)


def test_empty_range() -> None:
    fake = FakeYahoo()
    df = make(fake).fetch(datetime(2024, 1, 5), datetime(2024, 1, 5))
    assert df.height == 0 and df.schema == pl.Schema(OHLCV.columns)
    assert fake.requests_seen == 0


def test_options_validated() -> None:
    assert "yfinance" in registered_sources("ohlcv")
    src = YahooOHLCV(symbols=("SPY", "^GSPC", "BRK-B"))
    assert (src.name, src.table, src.timeframe, src.auto_adjust) == (
        "yfinance",
        "ohlcv",
        "1d",
        True,
    )
    assert src.entities == ("SPY", "^GSPC", "BRK-B")
    with pytest.raises(SourceError, match=r"timeframe '1m'.*\['1d', '1h'\]"):
        YahooOHLCV(timeframe="1m")
    with pytest.raises(SourceError, match="No symbols"):
        YahooOHLCV(symbols=())
    with pytest.raises(SourceError, match="EURUSD=X"):
        YahooOHLCV(symbols=("EURUSD=X",))
    with pytest.raises(SourceError, match="Duplicate"):
        YahooOHLCV(symbols=("SPY", "SPY"))
    with pytest.raises(SourceError, match="Inverted window"):
        YahooOHLCV().fetch(datetime(2024, 1, 5), datetime(2024, 1, 1))
