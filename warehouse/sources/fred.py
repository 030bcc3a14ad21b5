"""FRED macro series: the FRED/ALFRED API (with a key), FRED's keyless CSV download, or a file.

`published` is the date a value became public, and feature joins use it, so each mode says
where it comes from:

- mode "api" (needs a FRED API key): the ALFRED vintages of every observation are fetched with
  fredapi's `get_series_all_releases`; each row carries the value of its *first* release and
  `published` = that release's `realtime_start`. Values first released as "." (missing) count
  from their first numeric release. Observations already present in the series' earliest
  ALFRED vintage predate ALFRED's record of the series, so their true release date is unknown;
  for those, `published` = the next business day after the observation date, and never later
  than that first vintage.
- mode "csv" (no key): https://fred.stlouisfed.org/graph/fredgraph.csv returns the latest
  values only, with no vintage dates, so `published` = the next business day (Mon-Fri, no
  holiday calendar) after the observation date. That fits the daily H.15 rates (DGS10, DGS2,
  T10Y2Y); DTWEXBGS (H.10) is released weekly, so for it the rule is optimistic by up to a
  week. Use the API for exact publication dates.
- mode "auto" (the default): the API when a key is given or FRED_API_KEY is set, else the CSV
  download (logged once).

Missing observations ("." or empty) are dropped, never returned as rows. The API key is never
written to a log line, an error message or the connector's repr.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import re
import urllib.error
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import polars as pl
import requests
from fredapi import Fred

from warehouse.schema import MACRO
from warehouse.sources.base import (
    SourceError,
    SourceFetchError,
    check_entities,
    day_window,
    empty_frame,
    in_days,
    register,
)
from warehouse.sources.csvfile import CsvFileSource
from warehouse.sources.http import display_url, get_with_retries, parse_retry_after, redact
from warehouse.sources.retry import RetryableError, RetryPolicy, with_retries

log = logging.getLogger("mambacast.sources")

DEFAULT_SERIES = ("DTWEXBGS", "DGS10", "DGS2", "T10Y2Y")
API_ROOT = "https://api.stlouisfed.org/fred"
CSV_URL = "https://fred.stlouisfed.org/graph/fredgraph.csv"
KEY_ENV = "FRED_API_KEY"
MODES = ("auto", "api", "csv")
MISSING = (".", "")
DATE_COLUMNS = ("date", "observation_date")
_SERIES_ID = re.compile(r"^[A-Z0-9_]{1,64}$")


def _series_id(series: object) -> str:
    return str(series).upper()


def _check_series(series: tuple[str, ...] | list[str] | str, source: str) -> tuple[str, ...]:
    """FRED series ids, upper-cased as FRED writes them."""
    return check_entities(
        series,
        source=source,
        what="series",
        hint="e.g. series=('DGS10',)",
        valid=lambda s: bool(_SERIES_ID.match(_series_id(s))),
        invalid=lambda bad: (
            f"Invalid FRED series ids {bad} for source {source!r}; ids are letters, digits "
            "and underscores, e.g. 'DGS10'"
        ),
        normalize=_series_id,
    )


def next_business_day(col: str = "date") -> pl.Expr:
    """The Monday-Friday day after `col` (no holiday calendar): the keyless publication rule."""
    return pl.col(col).dt.add_business_days(1, roll="backward")


def _find(exc: BaseException | None, kind: type[BaseException]) -> Any:
    """The first exception of `kind` along exc's cause/context chain, or None."""
    for _ in range(10):
        if exc is None:
            return None
        if isinstance(exc, kind):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@register("macro", "fred")
@dataclass
class FredMacro:
    """FRED daily series in the MACRO schema; see the module doc for modes and `published`.

    Options: `series` (FRED ids), `mode` ("auto" | "api" | "csv"), `api_key` (else the
    FRED_API_KEY environment variable; kept out of repr), `api_root` and `csv_url` (the real
    services by default; a local server in tests), `policy` (retries), `timeout_s` (CSV
    requests; fredapi itself sets no timeout). Raises SourceError for mode "api" without a key.
    """

    series: tuple[str, ...] = DEFAULT_SERIES
    mode: Literal["auto", "api", "csv"] = "auto"
    api_key: str | None = field(default=None, repr=False)
    api_root: str = API_ROOT
    csv_url: str = CSV_URL
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float = 30.0
    name: str = "fred"
    table: str = "macro"

    def __post_init__(self) -> None:
        self.series = _check_series(self.series, self.name)
        if self.mode not in MODES:
            raise SourceError(
                f"Unknown mode {self.mode!r} for source {self.name!r}; choose one of {list(MODES)}"
            )
        if self.api_key is None:
            self.api_key = os.environ.get(KEY_ENV) or None
        elif not isinstance(self.api_key, str) or not self.api_key.strip():
            raise SourceError(
                f"api_key for source {self.name!r} is empty; pass a FRED API key or leave it "
                f"unset to read {KEY_ENV}"
            )
        if self.mode == "api" and not self.api_key:
            raise SourceError(
                f"Source {self.name!r} with mode 'api' needs a FRED API key: set the "
                f"{KEY_ENV} environment variable or pass api_key. For keyless access use "
                "mode 'csv' (or source 'fred' with mode 'auto'), which downloads "
                "fredgraph.csv and approximates publication dates as the next business day."
            )
        if self.mode == "auto" and not self.api_key:
            log.info(
                "%s: %s is not set; using FRED's keyless CSV download (publication dates "
                "approximated as the next business day)",
                self.name,
                KEY_ENV,
            )

    @property
    def entities(self) -> tuple[str, ...]:
        return self.series

    @property
    def effective_mode(self) -> Literal["api", "csv"]:
        """The mode `fetch` uses: "api" when a key is available (and mode is not "csv")."""
        return "api" if self.api_key and self.mode != "csv" else "csv"

    def fetch(self, start: datetime, end: datetime) -> pl.DataFrame:
        """Observations dated in the days [start, end), MACRO schema, sorted by series, date.

        Raises SourceFetchError naming the source, series and range on HTTP failures (after
        retries) or malformed / truncated payloads; nothing partial is returned.
        """
        first, stop = day_window(start, end, self.name)
        if first >= stop:
            return empty_frame("macro")
        if self.effective_mode == "api":
            frames = [self._fetch_api(s, first, stop) for s in self.series]
        else:
            with requests.Session() as session:
                frames = [self._fetch_csv(s, first, stop, session) for s in self.series]
        return pl.concat(frames).select(list(MACRO.columns)).sort("series", "date")

    # -- API (fredapi + ALFRED vintages) ---------------------------------------------------
    def _fetch_api(self, series_id: str, first: date, stop: date) -> pl.DataFrame:
        what = f"{series_id} from {first} to {stop} (end exclusive)"
        shown = display_url(
            f"{self.api_root.rstrip('/')}/series/observations",
            {"series_id": series_id, "realtime_start": Fred.earliest_realtime_start},
        )
        fred = Fred(api_key=self.api_key)
        fred.root_url = self.api_root.rstrip("/")

        def call() -> pd.DataFrame:
            try:
                return fred.get_series_all_releases(series_id)
            except Exception as exc:  # fredapi surfaces HTTP, XML and value errors alike
                failure = self._classify(exc, what, shown)
            # Raised outside the handler so fredapi's error (whose URL holds the key) is not
            # kept as __context__.
            raise failure

        releases = with_retries(call, source=self.name, what=what, policy=self.policy)
        try:
            df = self._first_releases(releases)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SourceFetchError(
                f"{self.name}: fetching {what} failed: unexpected observation data "
                f"({type(exc).__name__}: {redact(str(exc), (self.api_key,))})"
            ) from None
        return df.filter(in_days(first, stop)).with_columns(series=pl.lit(series_id))

    def _classify(self, exc: Exception, what: str, shown: str) -> Exception:
        """A RetryableError for transient failures, else a SourceFetchError; key masked."""
        secrets = (self.api_key,)
        fail = f"{self.name}: fetching {what} failed"
        http_error = _find(exc, urllib.error.HTTPError)
        if http_error is not None:
            status = http_error.code
            headers = http_error.headers
            retry_after = parse_retry_after(headers.get("Retry-After") if headers else None)
            http_error.close()
            if status == 429 or status >= 500:
                if retry_after is not None:
                    retry_after = min(retry_after, self.policy.max_delay_s)
                return RetryableError(f"HTTP {status} from {shown}", retry_after_s=retry_after)
            detail = redact(str(exc), secrets) if isinstance(exc, ValueError) else ""
            return SourceFetchError(
                f"{fail}: HTTP {status} from {shown}"
                + (f": {detail}" if detail else "")
                + f". Hint: check that {KEY_ENV} holds a valid key and that the series id "
                "exists on FRED"
            )
        if isinstance(exc, (urllib.error.URLError, OSError, http.client.HTTPException)):
            return RetryableError(
                f"connection failed or was cut off ({type(exc).__name__}) ({shown})"
            )
        if isinstance(exc, (ET.ParseError, ValueError, TypeError, KeyError)):
            return SourceFetchError(
                f"{fail}: the response is not valid FRED observations XML (malformed or cut "
                f"off: {type(exc).__name__}: {redact(str(exc), secrets)}) ({shown})"
            )
        return SourceFetchError(f"{fail}: {type(exc).__name__}: {redact(str(exc), secrets)}")

    @staticmethod
    def _first_releases(releases: pd.DataFrame) -> pl.DataFrame:
        """One row per observation date: its first numeric release and that release's date."""
        schema = {"date": pl.Date(), "realtime_start": pl.Date(), "value": pl.Float64()}
        if releases.empty:
            return pl.DataFrame(schema=schema).with_columns(published=pl.col("date"))
        df = pl.DataFrame(
            {
                "date": [pd.Timestamp(d).date() for d in releases["date"]],
                "realtime_start": [pd.Timestamp(d).date() for d in releases["realtime_start"]],
                # fredapi's "." becomes NaN, or NaT once pandas infers a datetime column.
                "value": [None if pd.isna(v) else float(v) for v in releases["value"]],
            },
            schema=schema,
        ).with_columns(pl.col("value").fill_nan(None))
        earliest_vintage = df["realtime_start"].min()
        firsts = (
            df.drop_nulls("value")
            .sort("date", "realtime_start")
            .group_by("date", maintain_order=True)
            .first()
        )
        return firsts.with_columns(
            published=pl.when(pl.col("realtime_start") == earliest_vintage)
            .then(pl.min_horizontal(next_business_day(), pl.col("realtime_start")))
            .otherwise(pl.col("realtime_start"))
        )

    # -- keyless CSV download --------------------------------------------------------------
    def _fetch_csv(
        self, series_id: str, first: date, stop: date, session: requests.Session
    ) -> pl.DataFrame:
        what = f"{series_id} from {first} to {stop} (end exclusive)"
        params = {
            "id": series_id,
            "cosd": first.isoformat(),
            "coed": (stop - timedelta(days=1)).isoformat(),  # fredgraph's end is inclusive
        }
        resp = get_with_retries(
            self.csv_url,
            params,
            source=self.name,
            what=what,
            policy=self.policy,
            timeout_s=self.timeout_s,
            session=session,
        )
        df = parse_fredgraph_csv(resp.text, series_id, f"{self.name}: fetching {what} failed")
        return df.filter(in_days(first, stop)).with_columns(
            series=pl.lit(series_id), published=next_business_day()
        )


def parse_fredgraph_csv(text: str, series_id: str, fail: str) -> pl.DataFrame:
    """`date`, `value` from a fredgraph.csv body (header `observation_date,<ID>` or
    `DATE,<ID>`), missing values dropped. Raises SourceFetchError prefixed by `fail`."""
    expected = f"a header 'observation_date,{series_id}' (or 'DATE,{series_id}')"
    if not text.strip():
        raise SourceFetchError(f"{fail}: the CSV download is empty; expected {expected}")
    try:
        raw = pl.read_csv(io.StringIO(text), infer_schema=False)
    except pl.exceptions.PolarsError as exc:
        raise SourceFetchError(f"{fail}: the CSV download does not parse: {exc}") from None
    cols = raw.columns
    if len(cols) != 2 or cols[0].lower() not in DATE_COLUMNS or cols[1].upper() != series_id:
        raise SourceFetchError(
            f"{fail}: unexpected CSV header {cols[:4]} (is it an error page?); expected {expected}"
        )
    return _parse_values(raw, cols[0], cols[1], fail, SourceFetchError)


def _parse_values(
    raw: pl.DataFrame,
    date_col: str,
    value_col: str,
    fail: str,
    error: type[Exception],
    keep: tuple[str, ...] | list[str] = (),
) -> pl.DataFrame:
    """`date`, `value` (and the `keep` columns) from string columns: "." or empty values
    dropped; anything else that is not an ISO date / a finite number raises `error`."""
    day = pl.col(date_col).str.strip_chars().str.to_date("%Y-%m-%d", strict=False)
    text = pl.col(value_col).str.strip_chars()
    value = pl.when(text.is_in(MISSING)).then(None).otherwise(text).cast(pl.Float64, strict=False)
    out = raw.select(
        day.alias("date"),
        value.alias("value"),
        pl.col(date_col).alias("_d"),
        text.fill_null("").alias("_v"),
        *[pl.col(c) for c in keep],
    )
    bad_date = out.filter(pl.col("date").is_null())
    if bad_date.height:
        raise error(
            f"{fail}: {bad_date.height} rows have a date that is not YYYY-MM-DD, e.g. "
            f"{bad_date['_d'][0]!r} (truncated or corrupt data)"
        )
    bad_value = out.filter(
        (pl.col("value").is_null() & ~pl.col("_v").is_in(MISSING))
        | (pl.col("value").is_not_null() & ~pl.col("value").is_finite())
    )
    if bad_value.height:
        raise error(
            f"{fail}: {value_col} on {bad_value['date'][0]} is {bad_value['_v'][0]!r}, not a "
            "number or '.' (truncated or corrupt data)"
        )
    return out.drop_nulls("value").select("date", "value", *keep)


@register("macro", "fred_file")
@dataclass
class FredFileMacro(CsvFileSource[tuple[str, str, list[str]]]):
    """Macro series from a local CSV in the MACRO schema.

    Two layouts: wide (a `date` / `observation_date` column and one column per series id, as
    in ../shared/data/macro_fred_daily.csv) or long (`series`, `date`, `value`, optionally
    `published`). Empty cells and "." are missing and dropped. Without a `published` column,
    `published` = the next business day after the observation date (the CSV-mode rule).
    A missing file, date column or series raises SourceError naming the path.
    """

    path: str | Path
    series: tuple[str, ...] = DEFAULT_SERIES
    name: str = "fred_file"
    table: str = "macro"

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.series = _check_series(self.series, self.name)
        self._layout()  # fail on a wrong path or layout before any run starts

    @property
    def entities(self) -> tuple[str, ...]:
        return self.series

    def _layout(self) -> tuple[str, str, list[str]]:
        """("wide" | "long", the date column, the header)."""
        expected = (
            f"a 'date' (or 'observation_date') column plus one column per series "
            f"{list(self.series)}, or long columns series,date,value[,published]"
        )
        header = self._columns(f"a CSV with {expected}")
        date_col = next((c for c in header if c.lower() in DATE_COLUMNS), None)
        if date_col is None:
            raise SourceError(
                f"{self._where()}: no date column (columns {header[:8]}); expected {expected}"
            )
        if "series" in header and "value" in header:
            return "long", date_col, header
        missing = [s for s in self.series if s not in header]
        if missing:
            raise SourceError(
                f"{self._where()}: no column for series {missing} (columns {header}); "
                f"configure series among those columns, or use a file with {expected}"
            )
        return "wide", date_col, header

    def _rows(
        self, raw: pl.DataFrame, layout: tuple[str, str, list[str]], in_window: pl.Expr
    ) -> pl.DataFrame:
        """MACRO rows sorted by series, date; every value in the file must parse."""
        kind, date_col, header = layout
        where = self._where()
        if kind == "wide":
            parts = [
                _parse_values(raw, date_col, s, where, SourceError).with_columns(
                    series=pl.lit(s), published=next_business_day()
                )
                for s in self.series
            ]
            out = pl.concat(parts)
        else:
            raw = raw.with_columns(pl.col("series").str.strip_chars().str.to_uppercase())
            present = set(raw["series"].drop_nulls().to_list())
            absent = [s for s in self.series if s not in present]
            if absent:
                raise SourceError(
                    f"{where}: series {absent} do not occur in its 'series' column "
                    f"(found {sorted(present)[:10]})"
                )
            raw = raw.filter(pl.col("series").is_in(list(self.series)))
            has_published = "published" in header
            keep = ["series", "published"] if has_published else ["series"]
            out = _parse_values(raw, date_col, "value", where, SourceError, keep=keep)
            if has_published:
                text = pl.col("published").str.strip_chars()
                out = out.with_columns(published=text.str.to_date("%Y-%m-%d", strict=False))
                bad = out.filter(
                    pl.col("published").is_null() | (pl.col("published") < pl.col("date"))
                )
                if bad.height:
                    raise SourceError(
                        f"{where}: {bad.height} rows have a 'published' that is missing, not "
                        f"YYYY-MM-DD or before the observation date, e.g. {bad.row(0)}"
                    )
            else:
                out = out.with_columns(published=next_business_day())
        return out.filter(in_window).select(list(MACRO.columns)).sort("series", "date")
