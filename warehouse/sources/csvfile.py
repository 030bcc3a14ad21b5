"""What the connectors that read one local CSV file of daily rows have in common.

coinmetrics_csv and fred_file check the file when they are built, so that a wrong path or layout
fails before any run starts, and again on each fetch, since the file may have changed or gone
since. A fetch reads the whole file with every cell as text, so that each connector can name a
bad cell itself rather than have polars guess a column type.

`check_rows` is shared with the OHLCV file connector: a CSV reader fills the missing fields of a
short row with nulls, so a file cut off in its last line (`2012-04-09,4.7,4`) would otherwise
read as a row of missing values, be dropped, and quietly cost the stored bar.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from datetime import datetime
from pathlib import Path
from typing import Generic, TypeVar

import polars as pl

from warehouse.sources.base import SourceError, SourceFetchError, day_window, empty_frame, in_days

_SHOWN = 3  # malformed lines quoted in the message
# files already found well-formed in this process: (path, size, mtime_ns) -> True
_CHECKED: dict[tuple[str, int, int], bool] = {}


def file_stamp(path: str | Path) -> tuple[str, int, int]:
    """(resolved path, size, modification time in ns): a file that changes gets a new stamp."""
    st = Path(path).stat()
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


def check_rows(path: str | Path, source: str) -> None:
    """Fail when a line of the CSV file at `path` has more or fewer fields than its header, or
    when the file does not end with a line break (its last line may be cut off mid-value).

    Raises SourceFetchError naming the source, the file, the (1-based) line numbers and the
    lines, so the file can be fixed: a truncated last line, a row cut short, a stray separator.
    Empty lines are skipped, as the reader skips them (before the header too); commas inside
    double-quoted fields are not separators; a header ending in a comma (an unnamed last column)
    accepts rows with or without that last field. The file is read as lines in one streaming
    pass (~0.4 s and ~1.5x its size in memory for 250 MB), once per process for a file that has
    not changed since (same size and modification time). Quoted fields spanning lines are not
    supported (no price file has them).
    """
    stamp = file_stamp(path)
    if _CHECKED.get(stamp):
        return
    line = pl.col("line")
    unquoted = (
        pl.when(line.str.contains('"', literal=True))
        .then(line.str.replace_all(r'"[^"]*"', ""))
        .otherwise(line)
    )
    where = f"{source}: {str(path)!r}"
    try:
        lines = (
            pl.scan_csv(
                path,
                has_header=False,
                separator="\x1f",  # a byte no CSV of ours holds: each line is one field
                quote_char=None,
                infer_schema=False,
                new_columns=["line"],
            )
            .with_row_index("number", offset=1)
            .filter(line.is_not_null())
        )
        header = lines.head(1).collect()
        if header.is_empty():
            return
        head = header["line"][0]
        fields = head.count(",") + 1
        allowed = [fields, fields - 1] if head.rstrip().endswith(",") else [fields]
        bad = (
            lines.filter(pl.col("number") > header["number"][0])
            .with_columns(fields=unquoted.str.count_matches(",", literal=True) + 1)
            .filter(~pl.col("fields").is_in(allowed))
        )
        n_bad = bad.select(pl.len()).collect(engine="streaming").item()
        shown = bad.head(_SHOWN).collect() if n_bad else None
        last = None if _ends_with_newline(path) else lines.tail(1).collect(engine="streaming")
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise SourceFetchError(f"{where}: cannot read it as CSV: {exc}") from exc
    if n_bad:
        listed = "; ".join(
            f"line {r['number']}: {r['fields']} fields, {r['line'][:80]!r}"
            for r in shown.iter_rows(named=True)
        )
        more = f" (and {n_bad - _SHOWN} more)" if n_bad > _SHOWN else ""
        raise SourceFetchError(
            f"{where} has {n_bad} malformed line(s) where the header has {fields} fields: "
            f"{listed}{more}. The file looks truncated or corrupted: fix or remove those lines "
            "(nothing was written)"
        )
    if last is not None and last["number"][0] > header["number"][0]:
        raise SourceFetchError(
            f"{where} does not end with a line break, so its last line (line "
            f"{last['number'][0]}: {last['line'][0][:80]!r}) may have been cut off mid-value, "
            "as by an interrupted download. If the line is complete, end the file with a line "
            "break; otherwise download the file again (nothing was written)"
        )
    _CHECKED[stamp] = True


def _ends_with_newline(path: str | Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() == 0:
            return True
        f.seek(-1, 2)
        return f.read(1) == b"\n"


LayoutT = TypeVar("LayoutT")


class CsvFileSource(ABC, Generic[LayoutT]):
    """Base of a connector dataclass with `path`, `name` and `table` fields.

    A subclass says how its file is laid out (`_layout`, which checks the header read by
    `_columns` and returns what `_rows` needs) and how the file's text becomes table rows
    (`_rows`); `fetch` does the rest.
    """

    path: str | Path
    name: str
    table: str

    @abstractmethod
    def _layout(self) -> LayoutT:
        """What `_rows` needs to know about the file; SourceError if the file does not fit."""

    @abstractmethod
    def _rows(self, raw: pl.DataFrame, layout: LayoutT, in_window: pl.Expr) -> pl.DataFrame:
        """The table's rows from `raw`, the whole file as text, kept where `in_window` holds.

        `in_window` is true for rows whose `date` falls in the days being fetched.
        """

    def _where(self) -> str:
        """The source and the file: the start of every message about the file's contents."""
        return f"{self.name}: {str(self.path)!r}"

    def _columns(self, expected: str) -> list[str]:
        """The file's column names, read without its rows.

        Raises SourceError naming the file and `expected` (what it should hold) when there is
        no such file, or naming the parser's complaint when it cannot be read as CSV.
        """
        path = Path(self.path)
        if not path.is_file():
            raise SourceError(f"{self.name}: no file at {str(path)!r}; expected {expected}")
        try:
            return pl.read_csv(path, n_rows=0, infer_schema=False).columns
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise SourceError(f"{self.name}: cannot read {str(path)!r} as CSV: {exc}") from exc

    def fetch(self, start: datetime, end: datetime) -> pl.DataFrame:
        """Rows for the UTC days in [start, end) in the table's declared schema.

        The layout is checked again first: the file may have changed since the connector was
        built. An empty window returns no rows without reading the file.
        """
        first, stop = day_window(start, end, self.name)
        layout = self._layout()
        if first >= stop:
            return empty_frame(self.table)
        check_rows(self.path, self.name)
        raw = pl.read_csv(self.path, infer_schema=False)
        return self._rows(raw, layout, in_days(first, stop))
