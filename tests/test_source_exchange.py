"""The ccxt OHLCV connector, offline: Binance REST responses are served from fixture files.

ccxt sends every HTTP request through the exchange instance's `fetch(url, method, headers, body)`;
the tests replace it with FakeBinance, which answers /api/v3/exchangeInfo and /api/v3/klines the
way Binance does (klines from `startTime`, at most `limit` rows, the still-open bar included) and
can fail the first N kline requests with the errors ccxt raises for HTTP 429 / 503.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import ccxt
import polars as pl
import pytest
import requests

from warehouse.schema import OHLCV, conform
from warehouse.sources.base import SourceError, SourceFetchError, registered_sources
from warehouse.sources.exchange import CcxtOHLCV, warehouse_symbol
from warehouse.sources.retry import RetryPolicy

FIXTURES = Path(__file__).parent / "fixtures" / "exchange"
NOW = datetime(2024, 1, 12, 15, 0)  # the 2024-01-12 daily bar is still open
FAST = RetryPolicy(attempts=4, base_delay_s=0.0)


def load(name: str) -> list | dict:
    return json.loads((FIXTURES / name).read_text())


class FakeBinance:
    """Stands in for Binance's REST API behind ccxt's transport method."""

    def __init__(
        self, klines: dict[tuple[str, str], list] | None = None, failures: list | None = None
    ) -> None:
        self.klines = klines or {
            ("BTCUSDT", "1d"): load("klines_BTCUSDT_1d.json"),
            ("ETHUSDT", "1d"): load("klines_ETHUSDT_1d.json"),
            ("BTCUSDT", "1h"): load("klines_BTCUSDT_1h.json"),
        }
        self.failures = list(failures or [])
        self.kline_requests: list[dict[str, str]] = []

    def __call__(self, url: str, method: str = "GET", headers=None, body=None):
        parts = urlsplit(url)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path == "/api/v3/exchangeInfo":
            return load("exchange_info_spot.json")
        if parts.path in ("/fapi/v1/exchangeInfo", "/dapi/v1/exchangeInfo"):
            return load("exchange_info_futures.json")
        if parts.path == "/api/v3/klines":
            self.kline_requests.append(query)
            if self.failures:
                raise self.failures.pop(0)
            rows = self.klines.get((query["symbol"], query["interval"]), [])
            since = int(query.get("startTime", 0))
            page = [r for r in rows if r[0] >= since][: int(query.get("limit", 500))]
            return json.loads(json.dumps(page))  # a fresh decoded body, as from the wire
        raise ccxt.BadRequest(f"binance {method} {url} 400 unexpected request in test")

    def starts(self) -> list[datetime]:
        return [
            datetime.fromtimestamp(int(q["startTime"]) / 1000, UTC).replace(tzinfo=None)
            for q in self.kline_requests
        ]


def make(fake: FakeBinance, **options) -> CcxtOHLCV:
    options = {"retry": FAST, "now": lambda: NOW, "sleep": lambda s: None, **options}
    source = CcxtOHLCV(**options)
    source.client.fetch = fake
    return source


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any request that escapes the fake fails loudly instead of reaching the network."""

    def refuse(self, url, method="GET", headers=None, body=None):
        raise AssertionError(f"network request in a test: {method} {url}")

    monkeypatch.setattr(ccxt.Exchange, "fetch", refuse)


def test_registered_and_rate_limited(offline: None) -> None:
    source = CcxtOHLCV()
    assert "ccxt" in registered_sources("ohlcv")
    assert (source.name, source.table, source.timeframe) == ("ccxt", "ohlcv", "1d")
    assert source.client.enableRateLimit is True
    assert source.entities == ("BTC-USDT",)


def test_symbol_mapping(offline: None) -> None:
    assert warehouse_symbol("BTC/USDT") == "BTC-USDT"
    assert warehouse_symbol("BTC/USDT:USDT") == "BTC-USDT-USDT"
    fake = FakeBinance()
    source = make(fake, symbols=("BTC/USDT", "ETH/USDT"))
    assert source.entities == ("BTC-USDT", "ETH-USDT")
    df = source.fetch(datetime(2024, 1, 1), datetime(2024, 1, 4))
    assert df["symbol"].unique(maintain_order=True).to_list() == ["BTC-USDT", "ETH-USDT"]
    assert [q["symbol"] for q in fake.kline_requests] == ["BTCUSDT", "ETHUSDT"]
    eth = df.filter(pl.col("symbol") == "ETH-USDT").row(0, named=True)
    first = load("klines_ETHUSDT_1d.json")[0]
    assert eth["ts"] == datetime(2024, 1, 1)
    assert [eth[c] for c in ("open", "high", "low", "close", "volume")] == [
        float(v) for v in first[1:6]
    ]


def test_pagination_across_three_pages(offline: None) -> None:
    fake = FakeBinance()
    df = make(fake, page_limit=4).fetch(datetime(2024, 1, 1), datetime(2024, 1, 13))
    assert fake.starts() == [datetime(2024, 1, 1), datetime(2024, 1, 5), datetime(2024, 1, 9)]
    assert all(q["limit"] == "4" and q["interval"] == "1d" for q in fake.kline_requests)
    # 12 bars served; 2024-01-12 is still open at NOW
    assert df["ts"].to_list() == [datetime(2024, 1, d) for d in range(1, 12)]
    assert df.schema == pl.Schema(OHLCV.columns)
    assert conform(df, OHLCV, "ccxt").equals(df)


def test_last_open_bar_dropped(offline: None) -> None:
    fake = FakeBinance()
    src = make(fake, timeframe="1h", now=lambda: datetime(2024, 1, 1, 9, 30))
    df = src.fetch(datetime(2024, 1, 1), datetime(2024, 1, 2))
    # the fixture's last bar opens at 09:00 and is still forming at 09:30
    assert df["ts"].max() == datetime(2024, 1, 1, 8)
    assert df.height == 9

    # a bar that closes exactly now is complete
    at_close = make(FakeBinance(), timeframe="1h", now=lambda: datetime(2024, 1, 1, 10))
    assert at_close.fetch(datetime(2024, 1, 1), datetime(2024, 1, 2)).height == 10


def test_rows_outside_window_dropped(offline: None) -> None:
    fake = FakeBinance()
    df = make(fake).fetch(datetime(2024, 1, 3, 12), datetime(2024, 1, 6))
    # the exchange answers with every bar from startTime on; only [start, end) opens remain
    assert df["ts"].to_list() == [datetime(2024, 1, 4), datetime(2024, 1, 5)]
    assert len(fake.kline_requests) == 1


def test_duplicate_bars_deduplicated(offline: None) -> None:
    rows = load("klines_BTCUSDT_1d.json")
    repeated = [*rows[:3], rows[2], *rows[3:]]
    fake = FakeBinance(klines={("BTCUSDT", "1d"): repeated})
    df = make(fake).fetch(datetime(2024, 1, 1), datetime(2024, 1, 6))
    assert df["ts"].to_list() == [datetime(2024, 1, d) for d in range(1, 6)]
    conform(df, OHLCV, "ccxt")


def test_rate_limited_then_success(offline: None) -> None:
    sleeps: list[float] = []
    fake = FakeBinance(
        failures=[
            ccxt.RateLimitExceeded("binance GET /api/v3/klines 429 Too Many Requests"),
            ccxt.DDoSProtection("binance GET /api/v3/klines 418 I'm a teapot"),
        ]
    )
    src = make(fake, sleep=sleeps.append)
    df = src.fetch(datetime(2024, 1, 1), datetime(2024, 1, 4))
    assert df.height == 3
    assert len(sleeps) == 2  # two retries, then the third request succeeded
    assert len(fake.kline_requests) == 3


def test_persistent_outage_names_source_and_range(offline: None) -> None:
    outage = [ccxt.ExchangeNotAvailable("binance GET /api/v3/klines 503 Service Unavailable")]
    fake = FakeBinance(failures=outage * 10)
    src = make(fake)
    with pytest.raises(SourceFetchError) as err:
        src.fetch(datetime(2024, 1, 1), datetime(2024, 1, 13))
    msg = str(err.value)
    assert msg.startswith("ccxt:")
    for part in ("binance", "BTC/USDT", "1d", "2024-01-01", "2024-01-13", "after 4 attempts"):
        assert part in msg
    assert "503" in msg
    assert len(fake.kline_requests) == FAST.attempts


def test_timeout_then_success(offline: None) -> None:
    fake = FakeBinance(failures=[ccxt.RequestTimeout("binance GET /api/v3/klines timed out")])
    assert make(fake).fetch(datetime(2024, 1, 1), datetime(2024, 1, 3)).height == 2


def test_rejected_request_is_not_retried(offline: None) -> None:
    fake = FakeBinance(failures=[ccxt.BadRequest('binance {"code":-1100,"msg":"Illegal chars"}')])
    with pytest.raises(SourceFetchError, match=r"rejected the request.*BadRequest"):
        make(fake).fetch(datetime(2024, 1, 1), datetime(2024, 1, 3))
    assert len(fake.kline_requests) == 1


@pytest.mark.parametrize(
    ("fixture", "reason"),
    [
        ("klines_truncated_row.json", "volume is missing"),
        ("klines_non_numeric_price.json", "high is missing or not a number"),
        ("klines_negative_price.json", "prices must be positive"),
    ],
)
def test_malformed_payload(offline: None, fixture: str, reason: str) -> None:
    fake = FakeBinance(klines={("BTCUSDT", "1d"): load(fixture)})
    with pytest.raises(SourceFetchError, match="malformed candle") as err:
        make(fake).fetch(datetime(2024, 1, 1), datetime(2024, 1, 4))
    assert reason in str(err.value)
    assert "BTC/USDT 1d" in str(err.value)


def test_payload_that_is_not_a_list_of_candles(offline: None) -> None:
    fake = FakeBinance()
    fake.klines[("BTCUSDT", "1d")] = [[1704067200000, "42283.58"], "garbage"]
    with pytest.raises(SourceFetchError, match="malformed"):
        make(fake).fetch(datetime(2024, 1, 1), datetime(2024, 1, 4))


def test_empty_range(offline: None) -> None:
    fake = FakeBinance()
    df = make(fake).fetch(datetime(2024, 1, 5), datetime(2024, 1, 5))
    assert df.height == 0
    assert df.schema == pl.Schema(OHLCV.columns)
    assert fake.kline_requests == []


def test_window_without_bars(offline: None) -> None:
    fake = FakeBinance()
    df = make(fake).fetch(datetime(2025, 6, 1), datetime(2025, 6, 5))
    assert df.height == 0 and df.schema == pl.Schema(OHLCV.columns)
    conform(df, OHLCV, "ccxt")

    # a window that ends in the future asks nothing for bars that cannot have closed yet
    fake = FakeBinance()
    df = make(fake).fetch(datetime(2024, 1, 12), datetime(2024, 2, 1))
    assert df.height == 0 and fake.kline_requests == []


def test_inverted_window_rejected(offline: None) -> None:
    with pytest.raises(SourceError, match="Inverted window"):
        make(FakeBinance()).fetch(datetime(2024, 1, 5), datetime(2024, 1, 1))


def test_unlisted_symbol(offline: None) -> None:
    fake = FakeBinance()
    with pytest.raises(SourceFetchError) as err:
        make(fake, symbols=("BTC/EUR",)).fetch(datetime(2024, 1, 1), datetime(2024, 1, 4))
    msg = str(err.value)
    assert "'BTC/EUR' is not listed on binance" in msg
    assert "BTC/USDT" in msg  # the closest listed symbols are suggested
    assert fake.kline_requests == []


def test_bad_symbol_from_exchange(offline: None) -> None:
    fake = FakeBinance(failures=[ccxt.BadSymbol("binance does not have market symbol BTC/USDT")])
    with pytest.raises(SourceFetchError, match="does not have market symbol"):
        make(fake).fetch(datetime(2024, 1, 1), datetime(2024, 1, 4))


def test_options_validated_offline(offline: None) -> None:
    with pytest.raises(SourceError, match=r"Unknown ccxt exchange 'binanse'.*binance") as err:
        CcxtOHLCV(exchange="binanse")
    assert "ccxt.exchanges" in str(err.value) and "exchange=" in str(err.value)
    with pytest.raises(SourceError, match=r"timeframe '5m'.*\['1d', '1h', '1m'\]"):
        CcxtOHLCV(timeframe="5m")
    with pytest.raises(SourceError, match="No symbols"):
        CcxtOHLCV(symbols=())
    with pytest.raises(SourceError, match="unified symbols"):
        CcxtOHLCV(symbols=("BTCUSDT",))
    with pytest.raises(SourceError, match="Duplicate"):
        CcxtOHLCV(symbols=("BTC/USDT", "BTC/USDT"))
    with pytest.raises(SourceError, match="page_limit"):
        CcxtOHLCV(page_limit=0)


def test_http_status_codes_mapped_by_ccxt(monkeypatch: pytest.MonkeyPatch) -> None:
    """One layer lower: HTTP 429 / 503 responses go through ccxt's own status mapping.

    The session's `request` is ccxt's last step before the socket, so nothing leaves the test.
    """
    api = FakeBinance()
    statuses = [(429, b'{"code":-1003,"msg":"Too many requests."}'), (503, b"Service Unavailable")]

    def request(method: str, url: str, **kwargs) -> requests.Response:
        response = requests.Response()
        response.url, response.encoding = url, "utf-8"
        response.headers["Content-Type"] = "application/json"
        if "/klines" in url and statuses:
            response.status_code, response._content = statuses.pop(0)
        else:
            response.status_code, response._content = 200, json.dumps(api(url)).encode()
        response.reason = {200: "OK", 429: "Too Many Requests", 503: "Service Unavailable"}[
            response.status_code
        ]
        return response

    sleeps: list[float] = []
    source = CcxtOHLCV(retry=FAST, now=lambda: NOW, sleep=sleeps.append)
    monkeypatch.setattr(source.client.session, "request", request)
    df = source.fetch(datetime(2024, 1, 1), datetime(2024, 1, 4))
    assert df.height == 3 and len(sleeps) == 2
