"""The DuckDB store: raw tables, idempotent partition writes, serialized access, lake views."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import duckdb
import polars as pl
from filelock import FileLock, Timeout

from warehouse.lake import Lake
from warehouse.paths import DataPaths
from warehouse.schema import (
    TABLES,
    TIMEFRAME_BUCKET,
    SchemaError,
    TableSpec,
    coarser_timeframes,
    conform,
    ohlcv_table,
    table_spec,
)

_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


class WarehouseBusyError(RuntimeError):
    """Another process held the warehouse lock for longer than the timeout."""


class ShrinkingWindowError(SchemaError):
    """A replace would delete stored rows of the window without replacing them (fewer rows, or
    rows moved to other times).

    Nothing was written. A source that lost or cut rows (a truncated file, a short API page, a
    source that stopped serving old rows) would otherwise delete stored data without a trace.
    """


# Reads a table inside the write's transaction, seeing the staged rows: (table, start, end)
Reader = Callable[[str, "datetime | date | None", "datetime | date | None"], pl.DataFrame]
# Called with a Reader after the staged write, before the commit; raising rolls it all back.
Audit = Callable[[Reader], None]


@dataclass(frozen=True)
class WriteResult:
    table: str
    rows_deleted: int
    rows_inserted: int
    rows_after: int


class Warehouse:
    """One DuckDB file. Every connection, read or write, holds a file lock for its lifetime.

    DuckDB allows one read-write process per file; the lock turns "database is locked" failures
    of parallel Dagster steps into short waits. Connections are short-lived on purpose.
    """

    def __init__(self, paths: DataPaths, lock_timeout_s: float = 600.0) -> None:
        self.paths = paths
        self.lock_timeout_s = lock_timeout_s
        self._lock = FileLock(str(paths.lock_file), thread_local=False)

    @property
    def path(self) -> Path:
        return self.paths.duckdb_file

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open the database under the cross-process lock, creating the raw tables if needed."""
        self.paths.root.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=self.lock_timeout_s)
        except Timeout:
            raise WarehouseBusyError(
                f"The warehouse {self.path} stayed locked for {self.lock_timeout_s:.0f} s by another "
                f"process (lock file {self.paths.lock_file}). Wait for that run to finish, or stop it."
            ) from None
        try:
            con = duckdb.connect(str(self.path))
            try:
                for spec in TABLES.values():
                    con.execute(spec.duckdb_ddl())
                yield con
            finally:
                con.close()
        finally:
            self._lock.release()

    def replace_window(
        self,
        table: str,
        df: pl.DataFrame,
        start: datetime | date,
        end: datetime | date,
        entities: Sequence[str],
        source: str = "unknown",
        *,
        allow_shrink: bool = False,
        audit: Audit | None = None,
        baseline: Audit | None = None,
    ) -> WriteResult:
        """Replace the rows of `entities` with time in [start, end) by `df`, in one transaction.

        Re-running with the same input leaves the table unchanged; a failure anywhere rolls the
        whole write back, so readers see either the old window or the new one. The write is
        staged, then published (write-audit-publish): it raises ShrinkingWindowError when a
        stored row of the window would be deleted and not replaced (unless `allow_shrink`),
        and `audit`, given a reader of the staged tables, may raise to roll everything back;
        `baseline`, given the same reader before anything is deleted, sees the stored state.
        """
        spec = table_spec(table)
        rows = conform(df, spec, source)
        _check_inside_window(rows, spec, start, end, entities, source)
        lo, hi = _window_bounds(spec, start, end)
        with self.connect() as con, _transaction(con):
            if baseline is not None:
                baseline(_reader(con))
            before = None if allow_shrink else _snapshot(con, spec, lo, hi, entities)
            deleted = _delete_window(con, spec, lo, hi, entities)
            incoming = rows.to_arrow()  # noqa: F841 (read by DuckDB's replacement scan)
            con.execute(f"INSERT INTO {spec.name} SELECT * FROM incoming")  # noqa: S608
            if before is not None:
                _refuse_shrink(con, spec, lo, hi, before, source)
            if audit is not None:
                audit(_reader(con))
        return WriteResult(spec.name, deleted, rows.height, self.count(spec.name))

    def replace_bars(
        self,
        timeframe: str,
        df: pl.DataFrame,
        start: datetime,
        end: datetime,
        entities: Sequence[str],
        source: str = "unknown",
        *,
        allow_shrink: bool = False,
        audit: Audit | None = None,
        baseline: Audit | None = None,
    ) -> list[WriteResult]:
        """Replace a window of `timeframe` bars and rebuild the coarser bars from them.

        Minute bars also rebuild the hourly and daily tables for the window, hourly bars the
        daily one; everything happens in one transaction. The window must start and end on UTC
        day boundaries when there is a coarser table to rebuild. `allow_shrink` and `audit` are
        as in replace_window; the shrink rule holds for every table rebuilt.
        """
        spec = table_spec(ohlcv_table(timeframe))
        rows = conform(df, spec, source)
        _check_inside_window(rows, spec, start, end, entities, source)
        lo, hi = _window_bounds(spec, start, end)
        coarser = coarser_timeframes(timeframe)
        if coarser and (_not_midnight(lo) or _not_midnight(hi)):
            raise SchemaError(
                f"{timeframe} bars are resampled into {coarser}: the window [{lo}, {hi}) must "
                "start and end at 00:00 UTC"
            )
        results = []
        with self.connect() as con, _transaction(con):
            if baseline is not None:
                baseline(_reader(con))
            tables = [spec, *(table_spec(ohlcv_table(tf)) for tf in coarser)]
            before = (
                {}
                if allow_shrink
                else {t.name: _snapshot(con, t, lo, hi, entities) for t in tables}
            )
            deleted = _delete_window(con, spec, lo, hi, entities)
            incoming = rows.to_arrow()  # noqa: F841 (read by DuckDB's replacement scan)
            con.execute(f"INSERT INTO {spec.name} SELECT * FROM incoming")  # noqa: S608
            results.append((spec.name, deleted, rows.height))
            for tf in coarser:
                dst = table_spec(ohlcv_table(tf))
                gone = _delete_window(con, dst, lo, hi, entities)
                # Identifiers and the bucket width come from the fixed registry in schema.py.
                made = con.execute(
                    f"INSERT INTO {dst.name} SELECT symbol, "  # noqa: S608
                    f"time_bucket(INTERVAL '{TIMEFRAME_BUCKET[tf]}', ts) AS bucket, "
                    "arg_min(open, ts), max(high), min(low), arg_max(close, ts), sum(volume) "
                    f"FROM {spec.name} WHERE symbol IN (SELECT unnest(?)) AND ts >= ? AND ts < ? "
                    "GROUP BY symbol, bucket",
                    [list(entities), lo, hi],
                ).fetchall()[0][0]
                results.append((dst.name, gone, int(made)))
            for name, snap in before.items():
                _refuse_shrink(con, table_spec(name), lo, hi, snap, source)
            if audit is not None:
                audit(_reader(con))
        return [WriteResult(t, d, n, self.count(t)) for t, d, n in results]

    def upsert(self, table: str, df: pl.DataFrame, source: str = "unknown") -> WriteResult:
        """Insert the rows of `df`, replacing the stored rows with the same key, in one
        transaction: re-writing a row (a forecast re-run for the same bar) never duplicates it."""
        spec = table_spec(table)
        rows = conform(df, spec, source)
        keys = " AND ".join(f"t.{k} = incoming.{k}" for k in spec.key)
        with self.connect() as con, _transaction(con):
            incoming = rows.to_arrow()  # noqa: F841 (read by DuckDB's replacement scan)
            # Identifiers come from the fixed table registry; the values from the frame.
            deleted = int(
                con.execute(
                    f"DELETE FROM {spec.name} t WHERE EXISTS "  # noqa: S608
                    f"(SELECT 1 FROM incoming WHERE {keys})"
                ).fetchall()[0][0]
            )
            con.execute(f"INSERT INTO {spec.name} SELECT * FROM incoming")  # noqa: S608
        return WriteResult(spec.name, deleted, rows.height, self.count(spec.name))

    def read(
        self,
        table: str,
        start: datetime | date | None = None,
        end: datetime | date | None = None,
        entities: Sequence[str] | None = None,
    ) -> pl.DataFrame:
        """Rows of a raw table, optionally restricted to [start, end) and some entities, in key order."""
        with self.connect() as con:
            return _read(con, table, start, end, entities)

    def count(self, table: str) -> int:
        spec = table_spec(table)
        with self.connect() as con:
            return int(con.execute(f"SELECT count(*) FROM {spec.name}").fetchall()[0][0])  # noqa: S608

    def rows_per_year(self, table: str, start: datetime, end: datetime) -> dict[str, int]:
        """Rows of `table` with time in [start, end), per calendar year ("2024": 366), years
        without rows left out: the row counts of yearly partitions."""
        spec = table_spec(table)
        sql = (
            f"SELECT CAST(year({spec.time_column}) AS VARCHAR), count(*) FROM {spec.name} "  # noqa: S608
            f"WHERE {spec.time_column} >= ? AND {spec.time_column} < ? GROUP BY 1 ORDER BY 1"
        )
        with self.connect() as con:
            return {y: int(n) for y, n in con.execute(sql, [start, end]).fetchall()}

    def summary(self, table: str) -> pl.DataFrame:
        """Row count and time range per entity: what a person checks after an ingest."""
        spec = table_spec(table)
        sql = (
            f"SELECT {spec.entity_column} AS entity, count(*) AS rows, "  # noqa: S608
            f"min({spec.time_column}) AS first, max({spec.time_column}) AS last "
            f"FROM {spec.name} GROUP BY 1 ORDER BY 1"
        )
        with self.connect() as con:
            return pl.from_arrow(con.sql(sql).to_arrow_table())

    def refresh_lake_views(self, lake: Lake, tables: Sequence[str]) -> list[str]:
        """Create or replace a view `lake_<table>` over the current version of each lake table
        that has one (the view then names that version's folder)."""
        made = []
        with self.connect() as con:
            for name in tables:
                if not _IDENT.match(name):
                    raise SchemaError(
                        f"Invalid lake table name {name!r}: use lower-case letters, digits, _"
                    )
                if not lake.exists(name):
                    continue
                # A view body cannot take parameters; the path is ours (validated name and
                # version, quoted). The version is a path segment, not a column of the view.
                # Only the partition folders (`<entity>=<e>/year=<y>/`) of the committed write
                # folder: never another write's folder that a killed write left inside a
                # legacy version folder.
                folder = lake.version_dir(name)
                pattern = str(folder / "*=*" / "**" / "*.parquet").replace("'", "''")
                # the entity (symbol, series) stays a string: DuckDB would read an all-digit
                # one (`100`, `007`) as a number, as polars did before the lake fixed its types
                entity = next((p.name.split("=", 1)[0] for p in sorted(folder.glob("*=*"))), None)
                types = (
                    f", hive_types = {{'{entity}': 'VARCHAR'}}"
                    if entity and _IDENT.match(entity)
                    else ""
                )
                con.execute(
                    f"CREATE OR REPLACE VIEW lake_{name} AS SELECT * EXCLUDE (version) FROM "  # noqa: S608
                    f"read_parquet('{pattern}', hive_partitioning = true, union_by_name = true"
                    f"{types})"
                )
                made.append(f"lake_{name}")
        return made


@contextmanager
def _transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    con.begin()
    try:
        yield
        con.commit()
    except BaseException:
        con.rollback()
        raise


def _read(
    con: duckdb.DuckDBPyConnection,
    table: str,
    start: datetime | date | None = None,
    end: datetime | date | None = None,
    entities: Sequence[str] | None = None,
) -> pl.DataFrame:
    spec = table_spec(table)
    clauses, params = [], []
    if entities is not None:
        clauses.append(f"{spec.entity_column} IN (SELECT unnest(?))")
        params.append(list(entities))
    if start is not None:
        clauses.append(f"{spec.time_column} >= ?")
        params.append(_as_time(spec, start))
    if end is not None:
        clauses.append(f"{spec.time_column} < ?")
        params.append(_as_time(spec, end))
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"SELECT * FROM {spec.name}{where} ORDER BY {', '.join(spec.key)}"  # noqa: S608
    arrow = con.sql(sql, params=params).to_arrow_table()
    return pl.from_arrow(arrow).select([pl.col(c).cast(t) for c, t in spec.columns.items()])


def _reader(con: duckdb.DuckDBPyConnection) -> Reader:
    """Reads of the tables as the open transaction sees them (the staged rows included)."""
    return lambda table, start=None, end=None: _read(con, table, start, end)


def _snapshot(con: duckdb.DuckDBPyConnection, spec: TableSpec, lo, hi, entities) -> str:
    """Copy the window's rows of `entities` into a temporary table (in DuckDB, no transfer to
    Python: a year of minute bars is half a million rows) and return its name. It holds the keys
    as `entity` and `time`, and for tables whose values may be missing (on-chain metrics, macro
    series; not the bar tables, whose prices the quality rules require) the value columns too."""
    values = [] if spec.name.startswith("ohlcv") else _value_columns(spec)
    cols = ", ".join([f"{spec.entity_column} AS entity", f"{spec.time_column} AS time", *values])
    snap = f"_before_{spec.name}"
    # Identifiers come from the fixed table registry; the bounds and entities are bound.
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {snap} AS SELECT {cols} FROM {spec.name} "  # noqa: S608
        f"WHERE {spec.entity_column} IN (SELECT unnest(?)) "
        f"AND {spec.time_column} >= ? AND {spec.time_column} < ?",
        [list(entities), lo, hi],
    )
    return snap


def _value_columns(spec: TableSpec) -> list[str]:
    return [c for c in spec.columns if c not in spec.key]


def _refuse_shrink(con, spec: TableSpec, lo, hi, snap: str, source: str) -> None:
    """Raise ShrinkingWindowError when a row of the snapshot `snap` (the window before the
    write) is not in the table any more, or a value it held is now missing: the write would
    delete stored data without replacing it."""
    match = f"t.{spec.entity_column} = o.entity AND t.{spec.time_column} = o.time"
    lost = con.execute(
        f"SELECT o.entity, count(*), min(o.time), any_value(h.n) FROM {snap} o "  # noqa: S608
        f"JOIN (SELECT entity, count(*) AS n FROM {snap} GROUP BY 1) h USING (entity) "
        f"WHERE NOT EXISTS (SELECT 1 FROM {spec.name} t WHERE {match}) GROUP BY 1 ORDER BY 1"
    ).fetchall()
    problems = []
    if lost:
        rows = "; ".join(f"{e}: {n} of its {held} rows, from {first}" for e, n, first, held in lost)
        problems.append(f"delete stored rows that the new data does not replace ({rows})")
    blanked = []
    for c in _value_columns(spec) if not spec.name.startswith("ohlcv") else []:
        n, entity, first = con.execute(
            f"SELECT count(*), min(o.entity), min(o.time) FROM {snap} o "  # noqa: S608
            f"JOIN {spec.name} t ON {match} WHERE o.{c} IS NOT NULL AND t.{c} IS NULL"
        ).fetchall()[0]
        if n:
            blanked.append(f"{c}: {n} values, e.g. {entity} at {first}")
    if blanked:
        problems.append(f"blank stored values the new data lacks ({'; '.join(blanked)})")
    con.execute(f"DROP TABLE {snap}")
    if problems:
        raise ShrinkingWindowError(
            f"source {source!r} -> table {spec.name!r}: replacing [{lo}, {hi}) would "
            f"{' and '.join(problems)}; nothing was written. The source returned less than "
            "before (a truncated file or page, rows or metrics it no longer serves). Fix the "
            "source, or confirm the loss with `allow_shrink: true` in the ingest asset's config."
        )


def _delete_window(con: duckdb.DuckDBPyConnection, spec: TableSpec, lo, hi, entities) -> int:
    # Identifiers come from the fixed table registry; values are bound parameters.
    return int(
        con.execute(
            f"DELETE FROM {spec.name} WHERE {spec.entity_column} IN (SELECT unnest(?)) "  # noqa: S608
            f"AND {spec.time_column} >= ? AND {spec.time_column} < ?",
            [list(entities), lo, hi],
        ).fetchall()[0][0]
    )


def _not_midnight(t: datetime | date) -> bool:
    return isinstance(t, datetime) and (t.hour, t.minute, t.second, t.microsecond) != (0, 0, 0, 0)


def _as_time(spec: TableSpec, value: datetime | date) -> datetime | date:
    """A window bound in the type of the table's time column (DATE or TIMESTAMP)."""
    if spec.columns[spec.time_column] == pl.Date():
        return value.date() if isinstance(value, datetime) else value
    return value if isinstance(value, datetime) else datetime(value.year, value.month, value.day)


def _window_bounds(spec: TableSpec, start: datetime | date, end: datetime | date):
    return _as_time(spec, start), _as_time(spec, end)


def _check_inside_window(rows: pl.DataFrame, spec: TableSpec, start, end, entities, source) -> None:
    lo, hi = _window_bounds(spec, start, end)
    t = pl.col(spec.time_column)
    outside = rows.filter((t < lo) | (t >= hi))
    if outside.height:
        raise SchemaError(
            f"source {source!r} -> table {spec.name!r}: {outside.height} rows lie outside the "
            f"requested window [{lo}, {hi}), e.g. {outside.head(2).to_dicts()}; nothing was written"
        )
    unknown = set(rows[spec.entity_column].unique().to_list()) - set(entities)
    if unknown:
        raise SchemaError(
            f"source {source!r} -> table {spec.name!r}: rows for {sorted(unknown)} which were not "
            f"requested ({sorted(entities)}); nothing was written"
        )
