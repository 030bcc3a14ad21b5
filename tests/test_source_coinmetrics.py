"""Coin Metrics connectors offline: the API against recorded pages on a local server, and CSVs."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path

import polars as pl
import pytest

from tests.httpfixture import (
    FIXTURES,
    ReplayServer,
    Reply,
    http_server_fixture,  # noqa: F401 (registers `http_server`)
)
from warehouse.schema import ONCHAIN, conform
from warehouse.sources.base import SourceError, SourceFetchError, make_source, registered_sources
from warehouse.sources.coinmetrics import CoinMetricsCsvOnchain, CoinMetricsOnchain
from warehouse.sources.retry import RetryPolicy

CM = FIXTURES / "coinmetrics"
PATH = "/v4/timeseries/asset-metrics"
FAST = RetryPolicy(attempts=3, base_delay_s=0.0, max_delay_s=0.0)
JAN1, JAN6 = datetime(2024, 1, 1), datetime(2024, 1, 6)


def api(server: ReplayServer, **kw) -> CoinMetricsOnchain:
    return CoinMetricsOnchain(base_url=f"{server.url}/v4", policy=FAST, timeout_s=5, **kw)


def test_registered_under_onchain():
    assert {"coinmetrics", "coinmetrics_csv"} <= set(registered_sources("onchain"))


def test_pages_are_followed_by_token_and_values_mapped(http_server: ReplayServer):
    http_server.route(
        PATH, Reply.file("coinmetrics/page1_token.json"), Reply.file("coinmetrics/page2_last.json")
    )
    df = api(http_server).fetch(JAN1, JAN6)

    assert df.schema == pl.Schema(ONCHAIN.columns)
    assert conform(df, ONCHAIN, "coinmetrics").equals(df)
    assert df["date"].to_list() == [date(2024, 1, d) for d in range(1, 6)]
    assert df["asset"].unique().to_list() == ["BTC"]
    first = df.row(0, named=True)
    assert first["tx_count"] == 410000 and first["active_addresses"] == 701234
    assert first["fees_native"] == 31.5 and first["hash_rate"] == 512345678.25
    # Not served by the community tier (absent from the rows): null, not an error.
    assert df["difficulty"].null_count() == 5 and df["utxo_count"].null_count() == 5
    assert df.filter(pl.col("date") == date(2024, 1, 5))["hash_rate"].item() is None

    q1, q2 = (r.query for r in http_server.requests)
    assert q1["assets"] == "btc" and q1["frequency"] == "1d" and q1["page_size"] == "10000"
    assert q1["metrics"].split(",") == [
        "TxCnt",
        "AdrActCnt",
        "FeeTotNtv",
        "HashRate",
        "DiffMean",
        "UTXOCnt",
    ]
    # Our end is exclusive; Coin Metrics is told so explicitly.
    assert (q1["start_time"], q1["end_time"], q1["end_inclusive"]) == (
        "2024-01-01",
        "2024-01-06",
        "false",
    )
    assert "next_page_token" not in q1
    assert (
        q2["next_page_token"] == "0.MjAyNC0wMS0wNFQwMDowMDowMFo"
        and q2["start_time"] == "2024-01-01"
    )


def test_next_page_url_is_fetched_unmodified_when_there_is_no_token(http_server: ReplayServer):
    page1 = (CM / "page1_url.json").read_text().replace("{BASE}", http_server.url)
    http_server.route(PATH, Reply(200, page1))
    http_server.route("/page-two", Reply.file("coinmetrics/page2_url.json"))
    df = make_source("onchain", "coinmetrics", base_url=f"{http_server.url}/v4", policy=FAST).fetch(
        JAN1, datetime(2024, 1, 3)
    )
    assert df.height == 2
    assert df["difficulty"].to_list() == [72006146478567.1] * 2
    assert df["utxo_count"].to_list() == [179000000.0, 179100000.0]
    assert http_server.requests[1].raw == "/page-two?opaque=cursor-2"


def test_rows_outside_the_window_are_dropped(http_server: ReplayServer):
    # A server that ignored end_inclusive=false must not leak the end day into the window.
    http_server.route(
        PATH, Reply.file("coinmetrics/page1_token.json"), Reply.file("coinmetrics/page2_last.json")
    )
    df = api(http_server).fetch(datetime(2024, 1, 2), datetime(2024, 1, 4))
    assert df["date"].to_list() == [date(2024, 1, 2), date(2024, 1, 3)]


def test_rate_limit_is_retried(http_server: ReplayServer):
    http_server.route(PATH, Reply(429), Reply.file("coinmetrics/page2_last.json"))
    assert api(http_server).fetch(JAN1, JAN6).height == 2
    assert http_server.count(PATH) == 2


@pytest.mark.parametrize(
    ("reply", "needle"),
    [
        (
            Reply(200, b'{"data": [{"asset": "btc", "time": "2024-01-01T00:00:00.000000000Z"'),
            "not valid JSON",
        ),
        (Reply(200, b"<html>maintenance</html>", content_type="text/html"), "not valid JSON"),
        (Reply.file("coinmetrics/no_data.json"), "no 'data' list"),
        (Reply.file("coinmetrics/bad_value.json"), "FeeTotNtv on 2024-01-01 is 'n/a'"),
        (Reply(200, b'{"data": [{"asset": "btc", "time": "yesterday"}]}'), "not an ISO timestamp"),
        (
            Reply(200, b'{"data": [{"asset": "eth", "time": "2024-01-01T00:00:00Z"}]}'),
            "not requested",
        ),
        (
            Reply.file("coinmetrics/error_403.json", status=403),
            "is not available with supplied credentials",
        ),
    ],
)
def test_bad_payloads_fail_naming_source_and_range(http_server: ReplayServer, reply, needle):
    http_server.route(PATH, reply)
    with pytest.raises(SourceFetchError) as err:
        api(http_server).fetch(JAN1, JAN6)
    msg = str(err.value)
    assert needle in msg
    assert "coinmetrics" in msg and "[2024-01-01, 2024-01-06)" in msg
    assert http_server.count(PATH) == 1  # none of these is worth a retry


def test_a_second_page_cut_off_mid_json_returns_nothing_partial(http_server: ReplayServer):
    page2 = (CM / "page2_last.json").read_bytes()
    http_server.route(
        PATH, Reply.file("coinmetrics/page1_token.json"), Reply(200, page2[: len(page2) // 2])
    )
    with pytest.raises(SourceFetchError, match=r"not valid JSON"):
        api(http_server).fetch(JAN1, JAN6)


def test_a_connection_dropped_mid_page_is_retried_then_reported(http_server: ReplayServer):
    page2 = (CM / "page2_last.json").read_bytes()
    http_server.route(
        PATH, Reply.file("coinmetrics/page1_token.json"), Reply(200, page2, truncate_to=40)
    )
    with pytest.raises(
        SourceFetchError, match=r"coinmetrics: fetching BTC on-chain days .* 3 attempts"
    ):
        api(http_server).fetch(JAN1, JAN6)
    assert http_server.count(PATH) == 1 + FAST.attempts


def test_a_server_repeating_its_cursor_cannot_loop_forever(http_server: ReplayServer):
    http_server.route(PATH, Reply.file("coinmetrics/page1_token.json"))
    with pytest.raises(SourceFetchError, match="repeated a page cursor"):
        api(http_server).fetch(JAN1, JAN6)
    assert http_server.count(PATH) == 2


def test_5xx_forever_gives_up(http_server: ReplayServer):
    http_server.route(PATH, Reply(502, b"bad gateway"))
    with pytest.raises(SourceFetchError, match=r"\[2024-01-01, 2024-01-06\).*3 attempts.*502"):
        api(http_server).fetch(JAN1, JAN6)


def test_empty_and_inverted_windows(http_server: ReplayServer):
    src = api(http_server)
    empty = src.fetch(datetime(2024, 1, 1, 3), datetime(2024, 1, 1, 9))  # inside one day
    assert empty.height == 0 and empty.schema == pl.Schema(ONCHAIN.columns)
    assert http_server.requests == []
    with pytest.raises(SourceError, match="empty or inverted"):
        src.fetch(JAN6, JAN1)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"assets": ()}, "No assets"),
        ({"assets": ("BTC", "btc")}, "Duplicate"),
        ({"assets": ("BTC&x=1",)}, "Invalid asset"),
        ({"page_size": 20000}, "page_size"),
        ({"base_url": "ftp://example"}, "base_url"),
    ],
)
def test_bad_options_raise_source_error(options, needle):
    with pytest.raises(SourceError, match=needle):
        CoinMetricsOnchain(**options)


# -- CSV -------------------------------------------------------------------------------------
def test_csv_with_time_column_and_all_metrics():
    df = CoinMetricsCsvOnchain(CM / "time_only.csv").fetch(JAN1, datetime(2024, 1, 4))
    assert conform(df, ONCHAIN, "coinmetrics_csv").equals(df)
    assert df["date"].to_list() == [date(2024, 1, 1), date(2024, 1, 2), date(2024, 1, 3)]
    assert df["difficulty"][2] == 73197634206448.4
    assert df["utxo_count"].to_list() == [179000000.0, 179100000.0, None]
    assert df["hash_rate"][2] is None  # an empty cell is null


def test_csv_current_layout_takes_difficulty_from_diffmean_lukmol():
    df = CoinMetricsCsvOnchain(CM / "shared_like_current.csv").fetch(datetime(2023, 12, 31), JAN6)
    assert df["date"].to_list() == [date(2023, 12, 31), date(2024, 1, 1), date(2024, 1, 2)]
    assert df["difficulty"].to_list() == [67957790298897.9, 72006146478567.1, 72006146478567.1]
    assert df["utxo_count"].null_count() == 3
    assert df["tx_count"].to_list() == [390000.0, 410000.0, 455000.0]


def test_csv_difficulty_of_zero_on_a_day_without_blocks_is_missing(tmp_path: Path):
    # the head of ../shared/data's file: no block between the genesis block and block 1
    path = tmp_path / "genesis.csv"
    path.write_text(
        "date,AdrActCnt,BlkCnt,FeeTotNtv,HashRate,TxCnt,DiffMean_lukmol\n"
        "2009-01-03,0,0,0,,0,1\n"
        "2009-01-04,0,0,0,,0,0\n"
        "2009-01-09,19,14,0,9.4e-07,0,1\n"
    )
    df = CoinMetricsCsvOnchain(path).fetch(datetime(2009, 1, 1), datetime(2009, 2, 1))
    assert df["difficulty"].to_list() == [1.0, None, 1.0]
    assert df["tx_count"].to_list() == [0.0, 0.0, 0.0]


def test_csv_legacy_layout_uses_diffmean():
    src = make_source("onchain", "coinmetrics_csv", path=str(CM / "legacy_like.csv"))
    df = src.fetch(datetime(2020, 7, 1), datetime(2020, 8, 1))
    assert df.height == 3 and df["difficulty"].to_list() == [17345948872516.1] * 3
    assert df["fees_native"].to_list() == [60.5, 75.25, 95.0]


def test_csv_with_asset_column_filters_assets():
    btc = CoinMetricsCsvOnchain(CM / "multi_asset.csv").fetch(JAN1, JAN6)
    assert btc["asset"].to_list() == ["BTC", "BTC"]
    both = CoinMetricsCsvOnchain(CM / "multi_asset.csv", assets=("BTC", "ETH")).fetch(JAN1, JAN6)
    assert both.height == 3 and both.filter(pl.col("asset") == "ETH")["hash_rate"].item() is None


def test_csv_empty_window():
    df = CoinMetricsCsvOnchain(CM / "time_only.csv").fetch(
        datetime(2030, 1, 1), datetime(2030, 2, 1)
    )
    assert df.height == 0 and df.schema == pl.Schema(ONCHAIN.columns)


def test_csv_missing_file_names_path_and_expected_columns(tmp_path: Path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(SourceError) as err:
        CoinMetricsCsvOnchain(missing)
    assert str(missing) in str(err.value) and "'time' or 'date'" in str(err.value)


def test_csv_missing_date_column_names_path_and_expected_columns():
    with pytest.raises(SourceError) as err:
        CoinMetricsCsvOnchain(CM / "no_date_column.csv")
    assert "no_date_column.csv" in str(err.value) and "'time' or 'date'" in str(err.value)
    assert "TxCnt" in str(err.value)


def test_csv_file_removed_after_construction_fails_at_fetch(tmp_path: Path):
    path = tmp_path / "btc.csv"
    path.write_bytes((CM / "time_only.csv").read_bytes())
    src = CoinMetricsCsvOnchain(path)
    path.unlink()
    with pytest.raises(SourceError, match="no file at"):
        src.fetch(JAN1, JAN6)


def test_csv_non_numeric_cells_and_asset_mismatch():
    with pytest.raises(SourceError, match=r"'tx_count' holds non-numeric text 'lots'"):
        CoinMetricsCsvOnchain(CM / "bad_number.csv").fetch(JAN1, JAN6)
    with pytest.raises(SourceError, match="holds one asset"):
        CoinMetricsCsvOnchain(CM / "time_only.csv", assets=("BTC", "ETH"))
