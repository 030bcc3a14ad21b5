"""get_with_retries against a local replay server: retries, give-up, immediate 4xx, Retry-After."""

from __future__ import annotations

import logging

import pytest
import requests

from tests.httpfixture import (
    ReplayServer,
    Reply,
    chain_text,
    http_server_fixture,  # noqa: F401 (registers `http_server`)
)
from warehouse.sources.base import SourceFetchError
from warehouse.sources.http import display_url, get_with_retries, parse_retry_after, redact
from warehouse.sources.retry import RetryPolicy

FAST = RetryPolicy(attempts=4, base_delay_s=0.0, max_delay_s=30.0)
WHAT = "BTC on-chain from 2024-01-01 to 2024-02-01"


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_429_twice_then_200_returns_the_body(http_server: ReplayServer):
    http_server.route("/x", Reply(429), Reply(429), Reply(200, b'{"ok": true}'))
    sleeps = Sleeps()
    resp = get_with_retries(
        f"{http_server.url}/x", {"a": "1"}, source="demo", what=WHAT, policy=FAST, sleep=sleeps
    )
    assert resp.status_code == 200 and resp.json() == {"ok": True}
    assert http_server.count("/x") == 3
    assert len(sleeps) == 2
    assert http_server.requests[0].query == {"a": "1"}


def test_503_forever_gives_up_naming_source_and_range(http_server: ReplayServer):
    http_server.route("/x", Reply(503, b"busy"))
    sleeps = Sleeps()
    with pytest.raises(SourceFetchError) as err:
        get_with_retries(
            f"{http_server.url}/x", None, source="demo", what=WHAT, policy=FAST, sleep=sleeps
        )
    msg = str(err.value)
    assert "demo" in msg and WHAT in msg and "503" in msg and "4 attempts" in msg
    assert http_server.count("/x") == FAST.attempts
    assert len(sleeps) == FAST.attempts - 1


def test_404_fails_at_once_with_status_url_and_hint(http_server: ReplayServer):
    http_server.route("/missing", Reply(404, b'{"error": {"message": "Unknown asset"}}'))
    with pytest.raises(SourceFetchError) as err:
        get_with_retries(
            f"{http_server.url}/missing",
            {"assets": "btc", "api_key": "SECRET123"},
            source="demo",
            what=WHAT,
            policy=FAST,
            sleep=Sleeps(),
        )
    msg = str(err.value)
    assert "HTTP 404" in msg and "/missing?assets=btc" in msg and "Unknown asset" in msg
    assert "Hint:" in msg and WHAT in msg
    assert "SECRET123" not in msg and "api_key=***" in msg
    assert http_server.count("/missing") == 1
    # The key did reach the server: masking is for messages only.
    assert http_server.requests[0].query["api_key"] == "SECRET123"


def test_retry_after_seconds_is_honoured(http_server: ReplayServer):
    http_server.route("/x", Reply(429, headers={"Retry-After": "7"}), Reply(200, b"{}"))
    sleeps = Sleeps()
    get_with_retries(
        f"{http_server.url}/x", None, source="demo", what=WHAT, policy=FAST, sleep=sleeps
    )
    assert sleeps == [7.0]


def test_retry_after_is_capped_by_the_policy(http_server: ReplayServer):
    http_server.route("/x", Reply(503, headers={"Retry-After": "86400"}), Reply(200, b"{}"))
    sleeps = Sleeps()
    get_with_retries(
        f"{http_server.url}/x", None, source="demo", what=WHAT, policy=FAST, sleep=sleeps
    )
    assert sleeps == [FAST.max_delay_s]


def test_connection_cut_mid_body_is_retried(http_server: ReplayServer):
    body = b'{"data": [1, 2, 3, 4, 5, 6, 7, 8, 9]}'
    http_server.route("/x", Reply(200, body, truncate_to=10), Reply(200, body))
    resp = get_with_retries(
        f"{http_server.url}/x", None, source="demo", what=WHAT, policy=FAST, sleep=Sleeps()
    )
    assert resp.json()["data"][-1] == 9
    assert http_server.count("/x") == 2


def test_refused_connection_is_retried_then_fails_without_leaking_the_key(caplog):
    # Bind and close a socket so the port is (very likely) unused.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SourceFetchError) as err:
        get_with_retries(
            f"http://127.0.0.1:{port}/x",
            {"api_key": "SECRET123"},
            source="demo",
            what=WHAT,
            policy=RetryPolicy(attempts=2, base_delay_s=0.0),
            timeout_s=2,
            sleep=Sleeps(),
        )
    assert "SECRET123" not in chain_text(err.value) and "demo" in str(err.value)
    assert "SECRET123" not in caplog.text
    assert "retry 1/1" in caplog.text


@pytest.mark.parametrize("status", [429, 503])
def test_a_retried_status_logs_and_fails_with_the_key_masked(
    http_server: ReplayServer, caplog, monkeypatch, status: int
):
    """The 429/5xx retry path (issue 15, finding 6): every retry warning and the final error
    show the URL with the key masked, even when the error body echoes the key."""
    body = b'{"error": "too many requests for api_key=SECRET123"}'
    http_server.route("/x", Reply(status, body))
    # libraries imported earlier in the session quieten urllib3 (a level on "urllib3", a
    # disabled logger); its request lines are what this test reads
    pool = logging.getLogger("urllib3.connectionpool")
    monkeypatch.setattr(pool, "disabled", False)
    monkeypatch.setattr(pool, "propagate", True)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3.connectionpool")
    with pytest.raises(SourceFetchError) as err:
        get_with_retries(
            f"{http_server.url}/x",
            {"assets": "btc", "api_key": "SECRET123"},
            source="demo",
            what=WHAT,
            policy=RetryPolicy(attempts=3, base_delay_s=0.0),
            sleep=Sleeps(),
        )
    assert http_server.count("/x") == 3
    assert http_server.requests[0].query["api_key"] == "SECRET123"  # the server got the key
    warnings = [r.getMessage() for r in caplog.records if r.name == "mambacast.sources"]
    assert [w.split("; ")[-1] for w in warnings] == ["retry 1/2 in 0.0 s", "retry 2/2 in 0.0 s"]
    assert all(f"HTTP {status}" in w and "/x?assets=btc&api_key=***" in w for w in warnings)
    # urllib3 logs each request line at DEBUG, query included: masked there too
    requests_logged = [r.getMessage() for r in caplog.records if r.name.startswith("urllib3")]
    gets = [m for m in requests_logged if "GET /x?" in m]  # one or more handlers per request
    assert len(gets) >= 3 and all("GET /x?assets=btc&api_key=*** " in m for m in gets)
    assert f"HTTP {status}" in str(err.value) and "/x?assets=btc&api_key=***" in str(err.value)
    assert "SECRET123" not in caplog.text and "SECRET123" not in chain_text(err.value)


def test_a_given_session_is_used_and_left_open(http_server: ReplayServer):
    http_server.route("/x", Reply(200, b"{}"))
    with requests.Session() as session:
        session.headers["X-Test"] = "yes"
        for _ in range(2):
            get_with_retries(
                f"{http_server.url}/x", None, source="demo", what=WHAT, session=session
            )
    assert http_server.count("/x") == 2


def test_redaction_and_retry_after_parsing():
    assert redact("https://h/p?api_key=abc&x=1") == "https://h/p?api_key=***&x=1"
    assert redact("u?next_page_token=abc") == "u?next_page_token=abc"
    assert redact("the key hunter2 leaked", ("hunter2",)) == "the key *** leaked"
    assert display_url("https://h/p", {"api_key": "k", "b": 2}) == "https://h/p?api_key=***&b=2"
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None


def test_the_urllib3_request_line_filter_is_installed_once_and_masks_keys(caplog):
    """`_mask_urllib3_request_lines` (run at import) puts one redacting filter on urllib3's
    connection-pool logger, however often it runs."""
    from warehouse.sources import http

    pool = logging.getLogger("urllib3.connectionpool")
    before, disabled, propagate = list(pool.filters), pool.disabled, pool.propagate
    pool.disabled, pool.propagate = False, True
    try:
        for f in before:
            pool.removeFilter(f)
        http._mask_urllib3_request_lines()
        http._mask_urllib3_request_lines()
        assert [type(f).__name__ for f in pool.filters] == ["_RedactSecrets"]
        caplog.set_level(logging.DEBUG, logger="urllib3.connectionpool")
        pool.debug('%s "GET /v4/x?assets=btc&api_key=%s HTTP/1.1" 200', "http://h", "SECRET123")
        assert "SECRET123" not in caplog.text and "assets=btc&api_key=*** HTTP/1.1" in caplog.text
    finally:
        for f in list(pool.filters):
            pool.removeFilter(f)
        for f in before:
            pool.addFilter(f)
        pool.disabled, pool.propagate = disabled, propagate
