"""Coin Metrics on-chain data: the API v4 (community tier by default) and Coin Metrics CSV files.

Both connectors return daily rows in the ONCHAIN schema. Coin Metrics metric ids map to our
columns as follows:

    tx_count         <- TxCnt
    active_addresses <- AdrActCnt
    fees_native      <- FeeTotNtv   (BTC, not USD)
    hash_rate        <- HashRate    (TH/s for BTC)
    difficulty       <- DiffMean    (CSV files: DiffMean, else DiffMean_lukmol; see below)
    utxo_count       <- UTXOCnt

A metric the source does not provide is returned as null: the free community tier no longer
serves DiffMean or UTXOCnt, so `difficulty` and `utxo_count` are null there (the request asks
the API to skip forbidden or unsupported metrics instead of failing the whole request).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import polars as pl
import requests

from warehouse.schema import ONCHAIN
from warehouse.sources.base import (
    SourceError,
    SourceFetchError,
    check_entities,
    day_window,
    empty_frame,
    register,
)
from warehouse.sources.csvfile import CsvFileSource
from warehouse.sources.http import get_with_retries
from warehouse.sources.retry import RetryPolicy

# Our ONCHAIN column -> the Coin Metrics metric id requested from the API.
API_METRICS: dict[str, str] = {
    "tx_count": "TxCnt",
    "active_addresses": "AdrActCnt",
    "fees_native": "FeeTotNtv",
    "hash_rate": "HashRate",
    "difficulty": "DiffMean",
    "utxo_count": "UTXOCnt",
}
# Our ONCHAIN column -> CSV columns tried in order. `DiffMean_lukmol` is the mining-difficulty
# column that ../shared/data adds to the current community CSV (from lukmol/gamlss-btc-VaR,
# agreeing with Coin Metrics DiffMean in median), because that CSV has no DiffMean any more.
CSV_METRICS: dict[str, tuple[str, ...]] = {
    col: (metric, "DiffMean_lukmol") if col == "difficulty" else (metric,)
    for col, metric in API_METRICS.items()
}
CSV_DATE_COLUMNS = ("time", "date")
VALUE_COLUMNS = [c for c in ONCHAIN.columns if c not in ("asset", "date")]


def _check_assets(assets: str | tuple[str, ...] | list[str], source: str) -> tuple[str, ...]:
    """Coin Metrics asset codes, upper-cased as the warehouse stores them."""
    return check_entities(
        assets,
        source=source,
        what="assets",
        hint="e.g. assets=('BTC',)",
        valid=lambda a: isinstance(a, str) and a.isalnum(),
        invalid=lambda bad: (
            f"Invalid asset ids {bad} for source {source!r}; use Coin Metrics asset codes "
            "such as 'BTC' or 'ETH'"
        ),
        normalize=str.upper,
    )


@register("onchain", "coinmetrics")
@dataclass
class CoinMetricsOnchain:
    """Daily on-chain metrics from the Coin Metrics API v4 `timeseries/asset-metrics` endpoint.

    Options: `assets` (Coin Metrics asset codes, returned upper-case), `base_url` (the
    community API by default; a test server in tests), `page_size` (at most 10000), `policy`
    (retries), `timeout_s` per request. `fetch` follows `next_page_token` / `next_page_url`
    until the last page and returns all rows or raises SourceFetchError: never a partial
    result. `difficulty` and `utxo_count` are null on the community tier (see module doc).
    """

    assets: tuple[str, ...] = ("BTC",)
    base_url: str = "https://community-api.coinmetrics.io/v4"
    page_size: int = 10000
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float = 30.0
    name: str = "coinmetrics"
    table: str = "onchain"

    def __post_init__(self) -> None:
        self.assets = _check_assets(self.assets, self.name)
        if not isinstance(self.page_size, int) or not 1 <= self.page_size <= 10000:
            raise SourceError(
                f"page_size for source {self.name!r} must be an integer in 1..10000, "
                f"got {self.page_size!r}"
            )
        if not self.base_url.startswith(("http://", "https://")):
            raise SourceError(
                f"base_url for source {self.name!r} must be an http(s) URL, got {self.base_url!r}"
            )

    @property
    def entities(self) -> tuple[str, ...]:
        return self.assets

    def fetch(self, start: datetime, end: datetime) -> pl.DataFrame:
        """Rows for the UTC days in [start, end) in the ONCHAIN schema, sorted by asset, date.

        Raises SourceFetchError naming the source and the range on HTTP failures (after
        retries), malformed or truncated JSON, a missing `data` list, or non-numeric values.
        """
        first, stop = day_window(start, end, self.name)
        if first >= stop:
            return empty_frame("onchain")
        what = f"{'/'.join(self.assets)} on-chain days [{first}, {stop})"
        api_url = f"{self.base_url.rstrip('/')}/timeseries/asset-metrics"
        url = api_url
        base_params: dict[str, Any] = {
            "assets": ",".join(a.lower() for a in self.assets),
            "metrics": ",".join(API_METRICS.values()),
            "frequency": "1d",
            "start_time": first.isoformat(),
            # Coin Metrics includes end_time by default; our window excludes its end.
            "end_time": stop.isoformat(),
            "end_inclusive": "false",
            "page_size": self.page_size,
            "ignore_forbidden_errors": "true",
            "ignore_unsupported_errors": "true",
        }
        expected = (stop - first).days * len(self.assets)
        max_pages = expected // self.page_size + 10  # bounds the loop against a looping server
        rows: list[dict[str, Any]] = []
        params: dict[str, Any] | None = base_params
        seen: set[str] = set()
        with requests.Session() as session:
            for _ in range(max_pages):
                resp = get_with_retries(
                    url,
                    params,
                    source=self.name,
                    what=what,
                    policy=self.policy,
                    timeout_s=self.timeout_s,
                    session=session,
                )
                data, token, next_url = self._parse_page(resp, what)
                rows.extend(data)
                if not token and not next_url:
                    break
                cursor = token or next_url or ""
                if cursor in seen:
                    raise SourceFetchError(
                        f"{self.name}: fetching {what} failed: the server repeated a page "
                        "cursor, so paging would never end"
                    )
                seen.add(cursor)
                # Prefer the token on our own URL; next_page_url is only used when no token
                # is given (it is fetched unmodified, as the API documents).
                if token:
                    url, params = api_url, {**base_params, "next_page_token": token}
                else:
                    url, params = str(next_url), None
            else:
                raise SourceFetchError(
                    f"{self.name}: fetching {what} failed: more than {max_pages} pages for "
                    f"about {expected} rows; the server keeps sending next pages"
                )
        return self._frame(rows, what, first, stop)

    def _parse_page(
        self, resp: requests.Response, what: str
    ) -> tuple[list[dict[str, Any]], str | None, str | None]:
        fail = f"{self.name}: fetching {what} failed"
        try:
            payload = resp.json()
        except ValueError as exc:
            raise SourceFetchError(
                f"{fail}: the response is not valid JSON (malformed or cut off: {exc}); "
                "retry later, or lower page_size if pages are being truncated"
            ) from None
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
            keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
            raise SourceFetchError(
                f"{fail}: the response has no 'data' list (got {keys}); expected the Coin "
                "Metrics v4 shape {'data': [...], 'next_page_token': ...}"
            )
        data = payload["data"]
        if not all(isinstance(r, dict) for r in data):
            raise SourceFetchError(f"{fail}: 'data' holds non-object entries")
        token = payload.get("next_page_token")
        next_url = payload.get("next_page_url")
        return data, (str(token) if token else None), (str(next_url) if next_url else None)

    def _frame(
        self, rows: list[dict[str, Any]], what: str, first: date, stop: date
    ) -> pl.DataFrame:
        fail = f"{self.name}: fetching {what} failed"
        by_code = {a.lower(): a for a in self.assets}
        cols: dict[str, list[Any]] = {c: [] for c in ONCHAIN.columns}
        for row in rows:
            code = str(row.get("asset", "")).lower()
            if code not in by_code:
                raise SourceFetchError(
                    f"{fail}: a row for asset {row.get('asset')!r} that was not requested "
                    f"(requested {list(self.assets)})"
                )
            day = _parse_time(row.get("time"))
            if day is None:
                raise SourceFetchError(
                    f"{fail}: row time {row.get('time')!r} is not an ISO timestamp like "
                    "'2024-01-01T00:00:00.000000000Z'"
                )
            if not first <= day < stop:
                continue
            cols["asset"].append(by_code[code])
            cols["date"].append(day)
            for col, metric in API_METRICS.items():
                value = row.get(metric)
                try:
                    cols[col].append(_number(value))
                except ValueError:
                    raise SourceFetchError(
                        f"{fail}: {metric} on {day} is {value!r}, not a finite number"
                    ) from None
        return pl.DataFrame(cols, schema=ONCHAIN.columns).sort("asset", "date")


def _parse_time(value: Any) -> date | None:
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def _number(value: Any) -> float | None:
    """A Coin Metrics value (a decimal string, or null) as a float; ValueError if not numeric."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(value)  # true / false, or a list or an object where a value belongs
    out = float(value)  # ValueError on text like "n/a"
    if not math.isfinite(out):
        raise ValueError(value)
    return out


@register("onchain", "coinmetrics_csv")
@dataclass
class CoinMetricsCsvOnchain(CsvFileSource[list[str]]):
    """Daily on-chain rows from a Coin Metrics CSV file (the `coinmetrics/data` csv layout).

    The file needs a `time` or `date` column (ISO date, or a timestamp whose first ten
    characters are the date) and metric columns named by their Coin Metrics ids (see
    CSV_METRICS; missing metrics come back null, at least one must exist). A file with an
    `asset` column may hold several assets; one without it holds the single asset in `assets`.
    Empty cells are nulls. Problems with the file raise SourceError naming the path.
    """

    path: str | Path
    assets: tuple[str, ...] = ("BTC",)
    name: str = "coinmetrics_csv"
    table: str = "onchain"

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.assets = _check_assets(self.assets, self.name)
        self._layout()  # fail on a wrong path or layout before any run starts

    @property
    def entities(self) -> tuple[str, ...]:
        return self.assets

    def _expected(self) -> str:
        metrics = sorted({m for ms in CSV_METRICS.values() for m in ms})
        return f"a 'time' or 'date' column and metric columns among {metrics}"

    def _layout(self) -> list[str]:
        """The file's header, once it has a date column and at least one metric column."""
        header = self._columns(f"a Coin Metrics CSV with {self._expected()}")
        where = self._where()
        if not any(c in header for c in CSV_DATE_COLUMNS):
            raise SourceError(
                f"{where} has no date column (columns {header[:8]}...); expected {self._expected()}"
            )
        if not any(m in header for ms in CSV_METRICS.values() for m in ms):
            raise SourceError(
                f"{where} has none of the on-chain metric columns; expected {self._expected()}"
            )
        if "asset" not in header and len(self.assets) != 1:
            raise SourceError(
                f"{where} has no 'asset' column, so it holds one asset; "
                f"configure exactly one asset, not {list(self.assets)}"
            )
        return header

    def _rows(self, raw: pl.DataFrame, header: list[str], in_window: pl.Expr) -> pl.DataFrame:
        """ONCHAIN rows sorted by asset, date; only cells inside the window must be numeric."""
        where = self._where()
        date_col = next(c for c in CSV_DATE_COLUMNS if c in header)
        day = pl.col(date_col).str.slice(0, 10).str.to_date("%Y-%m-%d", strict=False)
        bad = raw.filter(day.is_null() & pl.col(date_col).is_not_null())
        if bad.height or raw[date_col].null_count():
            example = bad[date_col].head(1).to_list() or [None]
            raise SourceError(
                f"{where}: column {date_col!r} has values that are not ISO dates "
                f"(e.g. {example[0]!r}); fix or remove those rows"
            )
        has_asset = "asset" in header
        asset = pl.col("asset").str.to_uppercase() if has_asset else pl.lit(self.assets[0])
        exprs: list[pl.Expr] = [asset.alias("asset"), day.alias("date")]
        for col, candidates in CSV_METRICS.items():
            found = next((c for c in candidates if c in header), None)
            exprs.append(pl.col(found).alias(col) if found else pl.lit(None).alias(col))
        out = raw.select(exprs).filter(pl.col("asset").is_in(list(self.assets))).filter(in_window)
        casted = out.with_columns([pl.col(c).cast(pl.Float64, strict=False) for c in VALUE_COLUMNS])
        for c in VALUE_COLUMNS:
            broken = casted[c].is_null() & out[c].is_not_null()
            if broken.any():
                value = out.filter(broken)[c][0]
                raise SourceError(
                    f"{where}: the column feeding {c!r} holds non-numeric text {value!r}; "
                    "fix the file (missing values must be empty cells)"
                )
        # DiffMean is the mean difficulty of the day's blocks: on a day without blocks (5-8
        # January 2009, between the genesis block and block 1) the files say 0 where there is
        # no value; it is stored as missing, like the hash rate those days
        casted = casted.with_columns(
            difficulty=pl.when(pl.col("difficulty") > 0).then(pl.col("difficulty"))
        )
        return casted.select([pl.col(c).cast(t) for c, t in ONCHAIN.columns.items()]).sort(
            "asset", "date"
        )
