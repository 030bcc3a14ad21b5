"""OHLCV bars from CSV or Parquet files.

Two layouts are recognised:
- tidy: `date` (YYYY-MM-DD) or `datetime_utc` (YYYY-MM-DDTHH:MM:SSZ, bar open time) or `ts`,
  then `open, high, low, close` and a volume column (`volume`, else the first `volume_*`
  column, or the one named by `volume_column`), optionally `symbol`; other columns are ignored.
  This is the layout of ../shared/data and of the project's own exports.
- the well-known 1-minute Bitcoin CSV: `Timestamp` (unix seconds) and `Open, High, Low, Close,
  Volume` (or `Volume_(BTC)`); rows whose prices are missing are dropped.

Files are scanned lazily with the window pushed down, so a multi-gigabyte minute file costs only
the rows of the partition being ingested, plus one pass over its lines (check_rows): a CSV line
with more or fewer fields than the header (a truncated last line) is an error naming the line,
never a bar with missing prices to drop. A bar with some prices but not all is an error too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl

from warehouse.sources.base import SourceError, SourceFetchError, register
from warehouse.sources.csvfile import check_rows, file_stamp

_TIMEFRAMES = {60: "1m", 3600: "1h", 86400: "1d"}
_PRICES = ("open", "high", "low", "close")
_CSV = (".csv", ".txt")


@register("ohlcv", "file")
@dataclass
class FileOHLCV:
    path: str = ""
    symbols: tuple[str, ...] = ()
    timeframe: str = ""  # "1d", "1h" or "1m"; inferred from the file's bar spacing when empty
    volume_column: str = ""
    name: str = "file"
    table: str = "ohlcv"

    def __post_init__(self) -> None:
        if not self.path:
            raise SourceError(
                "Source 'file' needs a path: set `ohlcv_path` to a CSV or Parquet file"
            )
        file = Path(self.path).expanduser()
        if not file.is_file():
            raise SourceError(f"OHLCV file {file} does not exist; check `ohlcv_path`")
        self._file = file
        if file.suffix.lower() in _CSV:
            check_rows(file, "file")  # a cut-off line must not fail later as a bad date
        try:
            self._read_layout(file)
        except pl.exceptions.PolarsError as exc:
            raise SourceFetchError(
                f"file {file}: cannot read its bars to tell the symbols and the timeframe "
                f"({type(exc).__name__}: {exc}). The file looks corrupted (a repeated header "
                "line, a time or price that does not parse, an unbalanced quote): fix those "
                "lines (nothing was written)"
            ) from exc

    def _read_layout(self, file: Path) -> None:
        """The layout, symbols and timeframe the file holds (polars errors on a bad file)."""
        self._scan, self._layout = _open(file, self.volume_column)
        has_symbol = "symbol" in self._scan.collect_schema().names()
        self.symbols = tuple(self.symbols)
        if not has_symbol and len(self.symbols) != 1:
            raise SourceError(
                f"{file} has no `symbol` column: set exactly one symbol for it (e.g. "
                f"symbols=['BTC-USD']); got {list(self.symbols)}"
            )
        if has_symbol and not self.symbols:
            self.symbols = tuple(
                self._scan.select(pl.col("symbol").unique().sort()).collect()["symbol"].to_list()
            )
        inferred = _infer_timeframe(self._scan, file)
        if self.timeframe and self.timeframe != inferred:
            raise SourceError(
                f"{file} holds {inferred} bars but timeframe {self.timeframe!r} was configured"
            )
        self.timeframe = inferred

    @property
    def entities(self) -> tuple[str, ...]:
        return self.symbols

    def fetch(self, start: datetime, end: datetime) -> pl.DataFrame:
        stamp = file_stamp(self._file)
        if self._file.suffix.lower() in _CSV:
            check_rows(self._file, f"file ({self._layout} layout)")
        lf = self._scan.filter((pl.col("ts") >= start) & (pl.col("ts") < end))
        if "symbol" in lf.collect_schema().names():
            lf = lf.filter(pl.col("symbol").is_in(list(self.symbols)))
        else:
            lf = lf.with_columns(symbol=pl.lit(self.symbols[0]))
        try:
            df = lf.select(["symbol", "ts", *_PRICES, "volume"]).collect()
        except pl.exceptions.PolarsError as exc:
            raise SourceFetchError(
                f"file {self._file}: cannot read bars for [{start:%Y-%m-%d %H:%M}, "
                f"{end:%Y-%m-%d %H:%M}) ({self._layout} layout): {exc}"
            ) from exc
        if file_stamp(self._file) != stamp:
            raise SourceFetchError(
                f"file {self._file} changed while it was being read (a download still running?); "
                "re-run once it is complete (nothing was written)"
            )
        # Missing prices (empty or NaN) are gaps in the file, as in the 1-minute CSV: never filled.
        numeric = [*_PRICES, "volume"]
        df = df.with_columns(pl.col(numeric).fill_nan(None))
        missing = pl.sum_horizontal([pl.col(c).is_null() for c in _PRICES])
        partial = df.filter((missing > 0) & (missing < len(_PRICES)))
        if partial.height:
            row = partial.row(0, named=True)
            raise SourceFetchError(
                f"file {self._file}: {partial.height} bar(s) have some prices but not all, e.g. "
                f"{row['symbol']} at {row['ts']}: "
                f"{ {c: row[c] for c in _PRICES} }. A bar is either complete or a gap (all four "
                "prices empty): fix those rows (nothing was written)"
            )
        return df.drop_nulls(list(_PRICES)).with_columns(pl.col("volume").fill_null(0.0))


def _open(file: Path, volume_column: str) -> tuple[pl.LazyFrame, str]:
    if file.suffix.lower() == ".parquet":
        lf = pl.scan_parquet(file)
    elif file.suffix.lower() in (".csv", ".txt"):
        lf = pl.scan_csv(file, infer_schema_length=10_000)
    else:
        raise SourceError(f"{file}: use a .csv or .parquet file")
    cols = lf.collect_schema().names()
    if "Timestamp" in cols:
        vol = volume_column or next((c for c in ("Volume", "Volume_(BTC)") if c in cols), None)
        need = ["Open", "High", "Low", "Close"]
        if vol is None or any(c not in cols for c in need):
            raise SourceError(
                f"{file}: the 1-minute layout needs Timestamp, {need} and Volume; found {cols}"
            )
        return lf.select(
            pl.from_epoch(pl.col("Timestamp").cast(pl.Int64), time_unit="s")
            .cast(pl.Datetime("us"))
            .alias("ts"),
            *[pl.col(c.title()).cast(pl.Float64).alias(c) for c in _PRICES],
            pl.col(vol).cast(pl.Float64).alias("volume"),
        ), "1-minute Bitcoin"
    time_col = next((c for c in ("datetime_utc", "date", "ts") if c in cols), None)
    vol = volume_column or (
        "volume" if "volume" in cols else next((c for c in cols if c.startswith("volume_")), None)
    )
    missing = [c for c in _PRICES if c not in cols]
    if time_col is None or vol is None or vol not in cols or missing:
        raise SourceError(
            f"{file}: the tidy layout needs a time column (date, datetime_utc or ts), "
            f"{list(_PRICES)} and a volume column; found {cols}"
        )
    t = pl.col(time_col)
    if lf.collect_schema()[time_col] == pl.String():
        t = (
            t.str.strptime(pl.Datetime("us"), "%Y-%m-%dT%H:%M:%SZ")
            if time_col == "datetime_utc"
            else t.str.strptime(pl.Datetime("us"), "%Y-%m-%d")
            if time_col == "date"
            else t.str.to_datetime(time_unit="us")
        )
    extra = [pl.col("symbol").cast(pl.String)] if "symbol" in cols else []
    return lf.select(
        *extra,
        t.cast(pl.Datetime("us")).alias("ts"),
        *[pl.col(c).cast(pl.Float64) for c in _PRICES],
        pl.col(vol).cast(pl.Float64).alias("volume"),
    ), "tidy"


def _infer_timeframe(lf: pl.LazyFrame, file: Path) -> str:
    head = lf.select("ts").head(2000).collect()["ts"].sort()
    step = head.diff().drop_nulls().dt.total_seconds()
    step = step.filter(step > 0)
    if step.is_empty():
        raise SourceError(f"{file}: fewer than two distinct bar times; cannot tell the timeframe")
    seconds = int(step.median())
    if seconds not in _TIMEFRAMES:
        raise SourceError(
            f"{file}: bars are {seconds} s apart; supported: 60 (1m), 3600 (1h), 86400 (1d)"
        )
    return _TIMEFRAMES[seconds]
