"""FRED connectors offline: fredapi against recorded ALFRED XML, fredgraph.csv, and local files."""

from __future__ import annotations

import logging
from datetime import date, datetime
from pathlib import Path

import polars as pl
import pytest

from tests.httpfixture import (
    FIXTURES,
    ReplayServer,
    Reply,
    chain_text,
    http_server_fixture,  # noqa: F401 (registers `http_server`)
)
from warehouse.schema import MACRO, conform
from warehouse.sources.base import SourceError, SourceFetchError, make_source, registered_sources
from warehouse.sources.fred import FredFileMacro, FredMacro
from warehouse.sources.retry import RetryPolicy

FR = FIXTURES / "fred"
OBS = "/fred/series/observations"
CSV = "/graph/fredgraph.csv"
KEY = "abcdef0123456789abcdef0123456789"  # a made-up key in FRED's 32-character format
FAST = RetryPolicy(attempts=3, base_delay_s=0.0, max_delay_s=0.0)
XML = "text/xml; charset=UTF-8"
JAN1, JAN9 = datetime(2024, 1, 1), datetime(2024, 1, 9)


@pytest.fixture(autouse=True)
def no_key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FRED_API_KEY", raising=False)


def api(server: ReplayServer, **kw) -> FredMacro:
    kw.setdefault("series", ("DGS10",))
    return FredMacro(mode="api", api_key=KEY, api_root=f"{server.url}/fred", policy=FAST, **kw)


def csv(server: ReplayServer, **kw) -> FredMacro:
    kw.setdefault("series", ("DGS10",))
    kw.setdefault("mode", "csv")
    return FredMacro(csv_url=f"{server.url}{CSV}", policy=FAST, timeout_s=5, **kw)


def xml(name: str, status: int = 200) -> Reply:
    return Reply.file(f"fred/{name}", content_type=XML, status=status)


def rows(df: pl.DataFrame) -> list[tuple]:
    return [(r["date"], r["value"], r["published"]) for r in df.iter_rows(named=True)]


def test_registered_under_macro():
    assert {"fred", "fred_file"} <= set(registered_sources("macro"))


# -- API mode ----------------------------------------------------------------------------------
def test_api_mode_uses_first_releases_and_their_vintage_dates(http_server: ReplayServer):
    http_server.route(OBS, xml("dgs10_all_releases.xml"))
    df = api(http_server).fetch(JAN1, JAN9)

    assert conform(df, MACRO, "fred").equals(df)
    assert rows(df) == [
        (date(2024, 1, 2), 3.95, date(2024, 1, 3)),
        (date(2024, 1, 3), 3.91, date(2024, 1, 4)),  # first release, not the later revision
        (date(2024, 1, 4), 3.99, date(2024, 1, 8)),  # first released as "." (missing)
        (date(2024, 1, 5), 4.05, date(2024, 1, 8)),
        (date(2024, 1, 8), 4.01, date(2024, 1, 9)),
    ]
    (req,) = http_server.requests
    assert req.query == {
        "series_id": "DGS10",
        "realtime_start": "1776-07-04",
        "realtime_end": "9999-12-31",
        "api_key": KEY,
    }


def test_api_mode_observations_in_the_first_vintage_get_the_next_business_day(
    http_server: ReplayServer,
):
    http_server.route(OBS, xml("dgs10_all_releases.xml"))
    df = api(http_server).fetch(datetime(2023, 12, 27), datetime(2023, 12, 29))
    # Both first appear in ALFRED's earliest vintage (2023-12-29): release dates unknown.
    assert rows(df) == [
        (date(2023, 12, 27), 3.79, date(2023, 12, 28)),
        (date(2023, 12, 28), 3.84, date(2023, 12, 29)),
    ]


def test_api_mode_several_series_and_auto_mode_with_env_key(http_server, monkeypatch):
    monkeypatch.setenv("FRED_API_KEY", KEY)
    http_server.route(OBS, xml("dgs10_all_releases.xml"), xml("dgs2_all_releases.xml"))
    src = make_source(
        "macro", "fred", series=("DGS10", "DGS2"), api_root=f"{http_server.url}/fred", policy=FAST
    )
    assert src.effective_mode == "api"
    df = src.fetch(JAN1, datetime(2024, 1, 4))
    assert df.group_by("series").len().sort("series").rows() == [("DGS10", 2), ("DGS2", 2)]
    assert [r.query["series_id"] for r in http_server.requests] == ["DGS10", "DGS2"]


def test_api_mode_empty_series_and_empty_window(http_server: ReplayServer):
    http_server.route(OBS, xml("empty_releases.xml"))
    src = api(http_server)
    df = src.fetch(JAN1, JAN9)
    assert df.height == 0 and df.schema == pl.Schema(MACRO.columns)
    assert src.fetch(datetime(2024, 1, 1, 1), datetime(2024, 1, 1, 2)).height == 0  # same day
    assert http_server.count(OBS) == 1
    with pytest.raises(SourceError, match="empty or inverted"):
        src.fetch(JAN9, JAN1)


def test_api_5xx_is_retried_then_succeeds(http_server: ReplayServer):
    http_server.route(
        OBS, xml("error_500.xml", 500), Reply(503, b"busy"), xml("dgs2_all_releases.xml")
    )
    assert api(http_server, series=("DGS2",)).fetch(JAN1, JAN9).height == 3
    assert http_server.count(OBS) == 3


def test_api_5xx_forever_fails_without_the_key_anywhere(http_server: ReplayServer, caplog):
    caplog.set_level(logging.DEBUG)
    http_server.route(OBS, xml("error_500.xml", 500))
    src = api(http_server)
    with pytest.raises(SourceFetchError) as err:
        src.fetch(JAN1, JAN9)
    msg = str(err.value)
    assert "fred" in msg and "DGS10 from 2024-01-01 to 2024-01-09" in msg and "3 attempts" in msg
    assert http_server.count(OBS) == FAST.attempts
    assert "retry 1/2" in caplog.text
    assert KEY not in msg and KEY not in caplog.text and KEY not in repr(src)
    assert KEY not in chain_text(err.value)  # not even in the chained exceptions


@pytest.mark.parametrize(
    ("reply", "needle"),
    [
        (xml("error_400_series.xml", 400), "The series does not exist"),
        (xml("error_400_key.xml", 400), "api_key is not registered"),
        (
            Reply(
                200, b"<observations><observation date='2024-01-02' value='3.9'", content_type=XML
            ),
            "not valid FRED observations XML",
        ),
        (
            Reply(200, b"<html><body>Service unavailable</body>", content_type="text/html"),
            "not valid FRED observations XML",
        ),
        (
            Reply(
                200,
                b"<observations><observation date='2024-01-02' value='abc' realtime_start='2024-01-03'/></observations>",
                content_type=XML,
            ),
            "not valid FRED observations XML",
        ),
        (
            Reply(
                200, b"<observations><observation value='3.9'/></observations>", content_type=XML
            ),
            "fred: fetching DGS10",
        ),
    ],
)
def test_api_bad_responses_fail_at_once_naming_series_and_range(http_server, caplog, reply, needle):
    caplog.set_level(logging.DEBUG)
    http_server.route(OBS, reply)
    with pytest.raises(SourceFetchError) as err:
        api(http_server).fetch(JAN1, JAN9)
    msg = str(err.value)
    assert needle in msg and "DGS10 from 2024-01-01 to 2024-01-09" in msg
    assert KEY not in msg and KEY not in caplog.text
    assert http_server.count(OBS) == 1


def test_api_payload_cut_off_mid_transfer_is_retried_then_reported(http_server: ReplayServer):
    body = (FR / "dgs10_all_releases.xml").read_bytes()
    http_server.route(OBS, Reply(200, body, content_type=XML, truncate_to=300))
    with pytest.raises(SourceFetchError, match="3 attempts") as err:
        api(http_server).fetch(JAN1, JAN9)
    assert KEY not in str(err.value)
    assert http_server.count(OBS) == FAST.attempts


def test_api_mode_without_key_explains_the_fix():
    with pytest.raises(SourceError) as err:
        FredMacro(mode="api")
    msg = str(err.value)
    assert "FRED_API_KEY" in msg and "mode 'csv'" in msg and "auto" in msg


def test_key_is_masked_in_repr_and_taken_from_env(monkeypatch):
    monkeypatch.setenv("FRED_API_KEY", KEY)
    src = FredMacro()
    assert src.api_key == KEY and src.effective_mode == "api"
    assert KEY not in repr(src) and "api_key" not in repr(src)
    assert FredMacro(mode="csv").effective_mode == "csv"


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"mode": "xml"}, "Unknown mode"),
        ({"series": ()}, "No series"),
        ({"series": ("DGS10&api_key=x",)}, "Invalid FRED series"),
        ({"series": ("DGS10", "dgs10")}, "Duplicate"),
        ({"api_key": "  "}, "empty"),
    ],
)
def test_bad_options(options, needle):
    with pytest.raises(SourceError, match=needle):
        FredMacro(**options)


# -- CSV mode ----------------------------------------------------------------------------------
def test_csv_mode_parses_fredgraph_and_sets_next_business_day(http_server: ReplayServer):
    http_server.route(CSV, Reply.file("fred/dgs10_fredgraph.csv", content_type="text/csv"))
    df = csv(http_server).fetch(JAN1, datetime(2024, 1, 16))
    assert conform(df, MACRO, "fred").equals(df)
    assert rows(df) == [
        (date(2024, 1, 2), 3.95, date(2024, 1, 3)),
        (date(2024, 1, 3), 3.92, date(2024, 1, 4)),
        (date(2024, 1, 4), 3.99, date(2024, 1, 5)),
        (date(2024, 1, 5), 4.05, date(2024, 1, 8)),  # Friday -> Monday
        (date(2024, 1, 8), 4.01, date(2024, 1, 9)),
    ]  # 2024-01-15 is empty (a holiday) and dropped
    (req,) = http_server.requests
    assert req.query == {"id": "DGS10", "cosd": "2024-01-01", "coed": "2024-01-15"}


def test_csv_mode_old_date_header_and_dot_for_missing(http_server: ReplayServer):
    http_server.route(
        CSV, Reply.file("fred/dgs10_fredgraph.csv"), Reply.file("fred/dgs2_fredgraph_legacy.csv")
    )
    df = csv(http_server, series=("DGS10", "DGS2")).fetch(JAN1, datetime(2024, 1, 5))
    dgs2 = df.filter(pl.col("series") == "DGS2")
    assert dgs2["date"].to_list() == [date(2024, 1, 2), date(2024, 1, 3)]  # 01-04 is "."
    assert df.filter(pl.col("series") == "DGS10").height == 3
    assert [r.query["id"] for r in http_server.requests] == ["DGS10", "DGS2"]


def test_auto_mode_without_key_falls_back_to_csv_with_one_log_line(http_server, caplog):
    caplog.set_level(logging.INFO, logger="mambacast.sources")
    src = csv(http_server, mode="auto")
    assert src.effective_mode == "csv"
    records = [r for r in caplog.records if "FRED_API_KEY" in r.getMessage()]
    assert len(records) == 1 and "CSV" in records[0].getMessage()
    http_server.route(CSV, Reply.file("fred/dgs10_fredgraph.csv"))
    assert src.fetch(JAN1, JAN9).height == 5


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "empty"),
        (b"<!DOCTYPE html><html><body>Not found</body></html>\n", "unexpected CSV header"),
        (b"observation_date,DGS2\n2024-01-02,4.33\n", "unexpected CSV header"),
        (b"observation_date,DGS10\n2024-01-02,3.95\n2024-01-0", "not YYYY-MM-DD"),
        (b"observation_date,DGS10\n2024-01-02,3.95\n2024-01-03,N/A\n", "'N/A', not a number"),
    ],
)
def test_csv_mode_bad_payloads(http_server: ReplayServer, body, needle):
    http_server.route(CSV, Reply(200, body, content_type="text/csv"))
    with pytest.raises(SourceFetchError) as err:
        csv(http_server).fetch(JAN1, JAN9)
    assert needle in str(err.value) and "DGS10 from 2024-01-01 to 2024-01-09" in str(err.value)


def test_csv_mode_404_fails_at_once(http_server: ReplayServer):
    http_server.route(CSV, Reply(404, b"Series not found", content_type="text/plain"))
    with pytest.raises(SourceFetchError, match=r"HTTP 404.*id=DGS10"):
        csv(http_server).fetch(JAN1, JAN9)
    assert http_server.count(CSV) == 1


def test_csv_mode_empty_window_makes_no_request(http_server: ReplayServer):
    df = csv(http_server).fetch(datetime(2024, 1, 3, 8), datetime(2024, 1, 3, 20))
    assert df.height == 0 and df.schema == pl.Schema(MACRO.columns)
    assert http_server.requests == []


# -- files -------------------------------------------------------------------------------------
def test_file_wide_layout():
    src = FredFileMacro(FR / "macro_wide.csv")
    df = src.fetch(JAN1, JAN9)
    assert conform(df, MACRO, "fred_file").equals(df)
    counts = dict(df.group_by("series").len().rows())
    assert counts == {"DGS10": 5, "DGS2": 4, "T10Y2Y": 4, "DTWEXBGS": 4}
    jan5 = df.filter(pl.col("date") == date(2024, 1, 5))
    assert jan5["published"].unique().to_list() == [date(2024, 1, 8)]
    vix = FredFileMacro(FR / "macro_wide.csv", series=("VIXCLS",)).fetch(JAN1, JAN9)
    assert vix.height == 4  # "." and empty cells are dropped


def test_file_long_layout_keeps_its_publication_dates():
    src = make_source(
        "macro", "fred_file", path=str(FR / "macro_long.csv"), series=("DGS10", "DGS2", "DTWEXBGS")
    )
    df = src.fetch(JAN1, JAN9)
    assert df.rows() == [
        ("DGS10", date(2024, 1, 2), 3.95, date(2024, 1, 3)),
        ("DGS10", date(2024, 1, 3), 3.92, date(2024, 1, 4)),
        ("DGS2", date(2024, 1, 2), 4.33, date(2024, 1, 3)),
        ("DTWEXBGS", date(2024, 1, 5), 119.7, date(2024, 1, 8)),
    ]


def test_file_long_layout_without_published_uses_next_business_day():
    df = FredFileMacro(FR / "macro_long_unpublished.csv", series=("DGS10",)).fetch(JAN1, JAN9)
    assert rows(df) == [
        (date(2024, 1, 5), 4.05, date(2024, 1, 8)),
        (date(2024, 1, 8), 4.01, date(2024, 1, 9)),
    ]
    with pytest.raises(SourceError, match=r"\['DGS2'\] do not occur"):
        FredFileMacro(FR / "macro_long_unpublished.csv", series=("DGS10", "DGS2")).fetch(JAN1, JAN9)


def test_file_errors_name_the_path_and_the_expected_columns(tmp_path: Path):
    with pytest.raises(SourceError) as err:
        FredFileMacro(tmp_path / "absent.csv")
    assert "absent.csv" in str(err.value) and "'date'" in str(err.value)
    with pytest.raises(SourceError) as err:
        FredFileMacro(FR / "macro_no_date.csv")
    assert "macro_no_date.csv" in str(err.value) and "no date column" in str(err.value)
    with pytest.raises(SourceError, match=r"no column for series \['DCOILWTICO'\]"):
        FredFileMacro(FR / "macro_wide.csv", series=("DGS10", "DCOILWTICO"))


def test_file_empty_window():
    df = FredFileMacro(FR / "macro_wide.csv").fetch(datetime(2030, 1, 1), datetime(2030, 2, 1))
    assert df.height == 0 and df.schema == pl.Schema(MACRO.columns)
