"""Metadata helpers: what a person wants to see on a materialization in the UI.

Tables carry Dagster's standard keys, so the UI's column view, row counts and table names work
as they do for any Dagster project: `dagster/column_schema` (on the definition, from the
declared columns; on each materialization, the stored frame's own), `dagster/table_name` (the
DuckDB name to query: a raw table, or the `lake_<table>` view over a lake table's current
version), `dagster/row_count`, `dagster/partition_row_count`; artifacts carry `dagster/uri`."""

import base64
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from warehouse.schema import TableSpec, duckdb_type

# DuckDB names the catalog of a database file after the file (warehouse/paths.py duckdb_file)
CATALOG = "warehouse"


def table_name(table: str) -> str:
    """The fully qualified DuckDB name of a warehouse table or view."""
    return f"{CATALOG}.main.{table}"


def column_schema(columns: Mapping[str, pl.DataType], key: Sequence[str] = ()) -> dg.TableSchema:
    """A Dagster table schema: each column with its DuckDB type; key columns are not null."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name,
                duckdb_type(dtype),
                constraints=dg.TableColumnConstraints(nullable=False) if name in key else None,
            )
            for name, dtype in columns.items()
        ]
    )


def raw_table_definition(spec: TableSpec) -> dict[str, Any]:
    """Definition metadata of an asset that writes the warehouse table `spec`."""
    return {
        "dagster/column_schema": column_schema(spec.columns, spec.key),
        "dagster/table_name": table_name(spec.name),
    }


def lake_table_definition(table: str, columns: Mapping[str, pl.DataType]) -> dict[str, Any]:
    """Definition metadata of an asset that writes lake table `table` with `columns`."""
    return {
        "dagster/column_schema": column_schema(columns, ("symbol", "ts")),
        "dagster/table_name": table_name(f"lake_{table}"),
    }


def lake_table_result(table: str, frame: pl.DataFrame) -> dict[str, Any]:
    """Materialization metadata of a lake table write: the stored frame's exact columns (those
    a run's data and settings chose), its view's name and its row count."""
    return {
        "dagster/column_schema": column_schema(frame.schema, ("symbol", "ts")),
        "dagster/table_name": table_name(f"lake_{table}"),
        "dagster/row_count": dg.MetadataValue.int(frame.height),
    }


def uri(path: Path) -> dict[str, Any]:
    """`dagster/uri` of a file or folder, and the same place as a path (the UI shows both)."""
    return {
        "dagster/uri": dg.MetadataValue.text(Path(path).resolve().as_uri()),
        "path": dg.MetadataValue.path(str(path)),
    }


def table_md(df: pl.DataFrame, rows: int = 10, floatfmt: str = ".4g") -> dg.MetadataValue:
    """A markdown table of the first `rows` rows."""
    return dg.MetadataValue.md(
        df.head(rows).to_pandas().to_markdown(index=False, floatfmt=floatfmt)
    )


def png_md(fig: Any, alt: str) -> dg.MetadataValue:
    """Embed a matplotlib figure as a PNG in markdown metadata."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return dg.MetadataValue.md(
        f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"
    )


def frame_summary(df: pl.DataFrame, time_col: str = "ts") -> dict[str, dg.MetadataValue]:
    first, last = (df[time_col].min(), df[time_col].max()) if df.height else (None, None)
    return {
        "dagster/row_count": dg.MetadataValue.int(df.height),
        "columns": dg.MetadataValue.int(df.width),
        "first": dg.MetadataValue.text(str(first)),
        "last": dg.MetadataValue.text(str(last)),
    }


def check_result(
    passed: bool,
    summary: str,
    metadata: dict[str, Any],
    failing: dict[str, pl.DataFrame] | None = None,
    *,
    rows: int = 20,
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
) -> dg.AssetCheckResult:
    """An asset check result from a rule report's verdict, shared by the quality and leakage
    checks: the summary becomes the description (cut to 2,000 characters) and each frame in
    `failing` a markdown table of its first `rows` rows, so a failure shows the rows behind it."""
    tables = {key: table_md(frame, rows=rows) for key, frame in (failing or {}).items()}
    return dg.AssetCheckResult(
        passed=passed,
        severity=severity,
        description=summary[:2000],
        metadata={**metadata, **tables},
    )


def report_metadata(report: Any, window: str) -> dict[str, Any]:
    """What a quality report shows on a check evaluation: counts, the window it covered, and
    its failed expectations and its warnings in a table each (rule, unexpected rows, a few
    examples). Shared by the ingest tables' checks and the audit of a staged ingest write."""
    from warehouse.quality import outcomes_frame

    metadata: dict[str, Any] = {
        "rows_checked": report.rows,
        "window": window,
        "expectations": len(report.outcomes),
        "failed": len(report.failures),
        "warned": len(report.warnings),
    }
    if report.failures:
        metadata["failures"] = table_md(outcomes_frame(report.failures), rows=50)
    if report.warnings:
        metadata["warnings"] = table_md(outcomes_frame(report.warnings), rows=50)
    return metadata
