"""The Parquet lake: versioned snapshots of derived tables.

Layout: `lake/<table>/version=<v>/<entity>=<e>/year=<y>/part-0.parquet`, the version's
`_meta.json` beside its partitions, and `lake/<table>/CURRENT` naming the version readers get.
The version is derived from the definitions and parameters that made the table (features,
labels) or from the versions it was built from (datasets, predictions), so changing a definition
writes to a new path and leaves the previous version's files as they were.

Every file is written atomically, and `CURRENT` moves to a version only after all its files and
its `_meta.json` are in place: a crash mid-write leaves readers on the previous complete snapshot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import polars as pl

from warehouse.paths import check_inside

# Used with fullmatch: `$` would also accept a trailing newline ("A\n").
_NAME = re.compile(r"[a-z_][a-z0-9_]*")
# What a partition value (an entity such as BTC-USD or ^GSPC, a version) may be: the folder
# `<column>=<value>`. Sources are checked against it before anything is stored.
PARTITION_VALUE = re.compile(r"[A-Za-z0-9._^-]+")
_VALUE = PARTITION_VALUE


class LakeError(ValueError):
    """A lake table name, partition value or layout is not usable."""


@contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file handle on a temporary name in `path`'s folder; on success it is fsynced and
    renamed over `path`. A crash leaves either the old file or the new one, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> None:
    """Write `df` to `path` atomically (zstd, with statistics)."""
    with _atomic_file(path) as fh:
        df.write_parquet(fh, compression="zstd", statistics=True)


def _write_text_atomic(path: Path, text: str) -> None:
    with _atomic_file(path) as fh:
        fh.write(text.encode())


class Lake:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def table_dir(self, name: str) -> Path:
        if not _NAME.fullmatch(name):
            raise LakeError(
                f"Invalid lake table name {name!r}: use lower-case letters, digits and _"
            )
        return self.root / name

    def current_version(self, name: str) -> str | None:
        """The version `CURRENT` names, or None when the table was never written."""
        pointer = self.table_dir(name) / "CURRENT"
        return pointer.read_text().strip() if pointer.exists() else None

    def versions(self, name: str) -> list[str]:
        """Every version stored for `name`, least recently written first."""
        dirs = [d for d in self.table_dir(name).glob("version=*") if d.is_dir()]

        def written_at(d: Path) -> int:
            meta = d / "_meta.json"  # the last file a snapshot writes
            return (meta if meta.exists() else d).stat().st_mtime_ns

        return [d.name.split("=", 1)[1] for d in sorted(dirs, key=written_at)]

    def version_dir(self, name: str, version: str | None = None) -> Path:
        """The folder of `version` (default: the current one) of table `name`."""
        version = version or self.current_version(name)
        if version is None:
            raise LakeError(
                f"Lake table {name!r} has no snapshot under {self.table_dir(name)}; "
                "materialize it first"
            )
        if not _VALUE.fullmatch(version):
            raise LakeError(f"Invalid lake version {version!r} for table {name!r}")
        return self.table_dir(name) / f"version={version}"

    def exists(self, name: str) -> bool:
        return self.current_version(name) is not None and bool(self.files(name))

    def write_snapshot(
        self,
        name: str,
        df: pl.DataFrame,
        *,
        time_column: str,
        version: str,
        meta: dict | None = None,
        entity_column: str = "symbol",
        keep_versions: int | None = None,
    ) -> list[Path]:
        """Write `df` as version `version` of table `name`, one file per (entity, year), with
        `meta` (plus the version) as its `_meta.json`, then make it the current version.

        Re-writing a version replaces its files (stale partitions are removed); other versions
        are not touched, except that with `keep_versions` only that many most recently written
        versions (this one included) are kept: for tables whose version changes with the data.
        """
        if keep_versions is not None and keep_versions < 1:
            raise LakeError(f"keep_versions must be at least 1, got {keep_versions}")
        if df.is_empty():
            raise LakeError(f"Refusing to write an empty snapshot of lake table {name!r}")
        for col in (time_column, entity_column):
            if col not in df.columns:
                raise LakeError(f"Lake table {name!r} needs column {col!r}; it has {df.columns}")
        bad = [v for v in df[entity_column].unique().to_list() if not _VALUE.fullmatch(str(v))]
        if bad:
            raise LakeError(f"{entity_column} values {bad} cannot be hive partition values")
        target = self.version_dir(name, version)
        check_inside(self.root, target, f"lake table {name!r}")
        with_year = df.with_columns(pl.col(time_column).dt.year().alias("year"))
        written: list[Path] = []
        for (entity, year), part in with_year.group_by(
            [entity_column, "year"], maintain_order=True
        ):
            path = target / f"{entity_column}={entity}" / f"year={year}" / "part-0.parquet"
            check_inside(self.root, path, f"lake partition {entity_column}={entity}")
            write_parquet_atomic(part.drop([entity_column, "year"]).sort(time_column), path)
            written.append(path)
        keep = {p.resolve() for p in written}
        for old in target.glob("**/*.parquet"):
            if old.resolve() not in keep:
                old.unlink()
        for d in sorted(target.glob("**/"), key=lambda p: len(p.parts), reverse=True):
            if d != target and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        _write_text_atomic(
            target / "_meta.json",
            json.dumps({**(meta or {}), "version": version}, indent=2, sort_keys=True, default=str),
        )
        _write_text_atomic(self.table_dir(name) / "CURRENT", version + "\n")
        if keep_versions is not None:
            others = [v for v in self.versions(name) if v != version]  # oldest first
            for old in others[: max(0, len(others) + 1 - keep_versions)]:
                shutil.rmtree(self.version_dir(name, old))
        return sorted(written)

    def read(self, name: str, version: str | None = None) -> pl.DataFrame:
        """A version (default: the current one) with its entity column restored from the hive
        path (as string); the year and version path segments are not columns."""
        folder = self.version_dir(name, version)
        if not any(folder.glob("**/*.parquet")):
            raise LakeError(
                f"Lake table {name!r} has no files under {folder}; materialize it first"
            )
        df = pl.read_parquet(folder / "**" / "*.parquet", hive_partitioning=True)
        entity_cols = [c for c in df.columns if c != "year" and f"{c}=" in _first_hive_dir(folder)]
        return df.drop("year", "version", strict=False).with_columns(
            [pl.col(c).cast(pl.String) for c in entity_cols]
        )

    def read_meta(self, name: str, version: str | None = None) -> dict:
        """The `_meta.json` of a version (default: the current one)."""
        path = self.version_dir(name, version) / "_meta.json"
        if not path.exists():
            raise LakeError(
                f"Lake table {name!r} has no _meta.json under {path.parent}; materialize it first"
            )
        return json.loads(path.read_text())

    def files(self, name: str, version: str | None = None) -> list[Path]:
        if version is None and self.current_version(name) is None:
            return []
        return sorted(self.version_dir(name, version).glob("**/*.parquet"))


def _first_hive_dir(table: Path) -> str:
    first = next(iter(sorted(table.glob("*=*"))), None)
    return first.name if first else ""
