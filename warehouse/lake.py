"""The Parquet lake: hive layout `lake/<table>/symbol=<s>/year=<y>/part-0.parquet`, atomic files."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import polars as pl

_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_VALUE = re.compile(r"^[A-Za-z0-9._^-]+$")


class LakeError(ValueError):
    """A lake table name, partition value or layout is not usable."""


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over `path`.

    A crash leaves either the old file or the new one, never half a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            df.write_parquet(fh, compression="zstd", statistics=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Lake:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def table_dir(self, name: str) -> Path:
        if not _NAME.match(name):
            raise LakeError(
                f"Invalid lake table name {name!r}: use lower-case letters, digits and _"
            )
        return self.root / name

    def exists(self, name: str) -> bool:
        return any(self.table_dir(name).glob("**/*.parquet"))

    def write_snapshot(
        self, name: str, df: pl.DataFrame, time_column: str, entity_column: str = "symbol"
    ) -> list[Path]:
        """Replace table `name` with `df`, one file per (entity, year); stale files are removed.

        Each file is replaced atomically; partitions no longer present are deleted last.
        """
        if df.is_empty():
            raise LakeError(f"Refusing to write an empty snapshot of lake table {name!r}")
        for col in (time_column, entity_column):
            if col not in df.columns:
                raise LakeError(f"Lake table {name!r} needs column {col!r}; it has {df.columns}")
        bad = [v for v in df[entity_column].unique().to_list() if not _VALUE.match(str(v))]
        if bad:
            raise LakeError(f"{entity_column} values {bad} cannot be hive partition values")
        table = self.table_dir(name)
        with_year = df.with_columns(pl.col(time_column).dt.year().alias("year"))
        written: list[Path] = []
        for (entity, year), part in with_year.group_by(
            [entity_column, "year"], maintain_order=True
        ):
            path = table / f"{entity_column}={entity}" / f"year={year}" / "part-0.parquet"
            write_parquet_atomic(part.drop([entity_column, "year"]).sort(time_column), path)
            written.append(path)
        keep = {p.resolve() for p in written}
        for old in table.glob("**/*.parquet"):
            if old.resolve() not in keep:
                old.unlink()
        for d in sorted(table.glob("**/"), key=lambda p: len(p.parts), reverse=True):
            if d != table and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        return sorted(written)

    def read(self, name: str) -> pl.DataFrame:
        """The whole table with its hive columns restored (entity as string, year dropped)."""
        table = self.table_dir(name)
        if not self.exists(name):
            raise LakeError(f"Lake table {name!r} has no files under {table}; materialize it first")
        df = pl.read_parquet(table / "**" / "*.parquet", hive_partitioning=True)
        entity_cols = [c for c in df.columns if c != "year" and f"{c}=" in _first_hive_dir(table)]
        return df.drop("year").with_columns([pl.col(c).cast(pl.String) for c in entity_cols])

    def write_meta(self, name: str, meta: dict) -> Path:
        """Store a table's describing metadata (versions, configs) atomically beside its files."""
        path = self.table_dir(name) / "_meta.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)
        return path

    def read_meta(self, name: str) -> dict:
        path = self.table_dir(name) / "_meta.json"
        if not path.exists():
            raise LakeError(
                f"Lake table {name!r} has no _meta.json under {path.parent}; materialize it first"
            )
        return json.loads(path.read_text())

    def files(self, name: str) -> list[Path]:
        return sorted(self.table_dir(name).glob("**/*.parquet"))


def _first_hive_dir(table: Path) -> str:
    first = next(iter(sorted(table.glob("*=*"))), None)
    return first.name if first else ""
