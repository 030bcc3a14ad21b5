"""The Parquet lake: versioned snapshots of derived tables.

Layout, for table `t`:

    lake/t/CURRENT                         the version readers get (a one-line file)
    lake/t/version=<v>/HEAD                the committed write of version v (a one-line file)
    lake/t/version=<v>/<write_id>/         one write of v: immutable once HEAD has named it
        _meta.json                         the meta, with the version and the write_id
        <entity>=<e>/year=<y>/part-0.parquet

The version is derived from the definitions and parameters that made the table (features,
labels) or from the versions it was built from (datasets, predictions), so changing a definition
writes to a new path and leaves the previous version's files as they were. A write id
(`w-<time_ns>-<hex>`) is never reused and has no `=` in it, so hive readers do not take it for a
partition column; `version_dir` names the committed write folder, so a DuckDB view built on it
pins one immutable snapshot. Under the table's lock a write id's time is past that of every
write id a HEAD of the table names (even if the clock steps back), so write ids order the
table's writes: `versions()` (and `keep_versions` pruning, which keeps the newest) sorts by
them, not by file mtimes (coarse, and changed by a copy, a restore or a touch). Legacy
versions (below) sort before all others, by their `_meta.json`'s mtime. Unlocked writers
(no flock) order by when each write started.

A write never changes a folder a reader may have resolved. Under the table's lock it builds a
new write folder (invisible until HEAD names it), fsyncs it, atomically replaces the version's
HEAD (the one commit point), then CURRENT, then collects garbage: write folders of the table that
no HEAD names are deleted, except the one the version's HEAD named just before (a reader that
resolved it can finish; it goes at the table's next write). Whatever is deleted is first renamed
to a hidden `.trash.<hex>` name in the table folder, so a folder is either whole at its name or
gone from it. Crash states (a SIGKILL or power loss at any instant):

    killed while building the write folder    HEAD names the old write: the old snapshot; the
                                              orphan folder is deleted by the next write
    HEAD replaced, CURRENT not yet            version v is the new snapshot; CURRENT names
                                              what it named before (v itself on a re-write)
    CURRENT replaced, garbage not collected   the new snapshot; the next write collects
    killed while collecting garbage           the new snapshot; leftovers (`.trash.*`, folders
                                              no HEAD names) are deleted by the next write

A reader (read, read_meta, files, exists, version_dir) resolves CURRENT -> version -> HEAD ->
write folder and reads it; if the folder left its name while it read (collected), the result is
dropped and it starts over. So does a reader that finds the version CURRENT named with neither
HEAD nor legacy files once CURRENT names another (it was pruned after CURRENT was read): a
result is always one whole committed snapshot, never an empty or missing table that was not.
After 12 attempts (a reader slower than the writes) it raises LakeError saying so; a HEAD that
still names a write folder that is gone (deleted by hand) raises LakeError at once. Entity
values read back as written (strings: the hive columns are typed, not inferred).

Versions written by earlier releases (partitions and `_meta.json` directly in `version=<v>/`,
no HEAD) read as before; the first write of such a version gives it a HEAD and removes the old
files. Until then, a write folder or HEAD temporary a killed first write left in it is deleted
by the next write of any version of the table (never its partitions or `_meta.json`).

Writers take an flock on the table folder. Where the filesystem has none, a write still builds
its own folder and commits by replacing HEAD and CURRENT (safe unlocked: last writer wins, each
whole), but deletes nothing (no garbage collection, no `keep_versions` pruning) and logs that.
POSIX rename semantics are assumed (a rename within a filesystem is atomic).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO, TypeVar

import polars as pl

from warehouse.paths import check_inside

log = logging.getLogger(__name__)

# Used with fullmatch: `$` would also accept a trailing newline ("A\n").
_NAME = re.compile(r"[a-z_][a-z0-9_]*")
# What a partition value (an entity such as BTC-USD or ^GSPC, a version) may be: the folder
# `<column>=<value>`. Sources are checked against it before anything is stored.
PARTITION_VALUE = re.compile(r"[A-Za-z0-9._^-]+")
_VALUE = PARTITION_VALUE
_WRITE_ID = re.compile(r"w-[0-9]{1,20}-[0-9a-f]{8}")
_HEAD = "HEAD"
_META = "_meta.json"
# Hidden, so `version=*` globs skip them, and without `=`, so a hive reader ignores them.
_TRASH = re.compile(r"\.trash\.[0-9a-f]{32}")
_POINTER_TMP = re.compile(r"\.(CURRENT|HEAD)\.[0-9a-f]{32}\.tmp")
# Left by the release before this one (a version staged, moved aside, pruned): cleaned up too.
_ASIDE = re.compile(r"\.(staging|old|trash)\.([0-9a-f]{32})\.(.+)")
# How often a reader starts over when the folder it read was collected; and its first pause.
_READ_ATTEMPTS = 12
_READ_BACKOFF_S = 0.002

T = TypeVar("T")


class LakeError(ValueError):
    """A lake table name, partition value or layout is not usable."""


def fsync_dir(folder: Path) -> None:
    """Make the entries of `folder` (files created, renamed or removed in it) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path, *, files: bool = True) -> None:
    """fsync every folder under `folder` (itself included), deepest first, and unless `files`
    is False (they were synced as they were written) every file."""
    for parent, _dirs, names in os.walk(folder, topdown=False):
        for name in names if files else ():
            path = os.path.join(parent, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(parent))


_NO_LOCK = (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)


@contextmanager
def dir_lock(folder: Path) -> Iterator[bool]:
    """Hold an exclusive lock on `folder` for the block; yields whether it is held. The lock is
    the kernel's (flock), so it is released when its holder dies, SIGKILL included. On a
    filesystem that has no flock (some network mounts) the block runs unlocked and gets False:
    it must then not delete what another writer may be using."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError as err:
            if err.errno not in _NO_LOCK:
                raise
            locked = False
        yield locked
    finally:
        os.close(fd)  # releases the lock


def remove_path(path: Path) -> None:
    """Delete a folder tree, a file or a link; nothing when it is already gone."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _atomic_file(path: Path, *, sync_dir: bool = True, mkdir: bool = True) -> Iterator[BinaryIO]:
    """A file handle on a temporary name in `path`'s folder; on success it is fsynced and
    renamed over `path` (and the folder fsynced unless `sync_dir` is False: the caller syncs
    it later). A crash leaves either the old file or the new one, never half a file. With
    `mkdir` False the folder must exist (it is not re-created if someone removed it)."""
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def write_parquet_atomic(
    df: pl.DataFrame, path: Path, *, sync_dir: bool = True, mkdir: bool = True
) -> None:
    """Write `df` to `path` atomically (zstd, with statistics)."""
    with _atomic_file(path, sync_dir=sync_dir, mkdir=mkdir) as fh:
        df.write_parquet(fh, compression="zstd", statistics=True)


def write_text_atomic(path: Path, text: str, *, sync_dir: bool = True) -> None:
    with _atomic_file(path, sync_dir=sync_dir) as fh:
        fh.write(text.encode())


def _new_write_id(after: int = 0) -> str:
    """A new write id whose time is past `after` (the table's newest committed write), so that
    write ids order a table's writes even when the clock steps back."""
    return f"w-{max(time.time_ns(), after + 1)}-{uuid.uuid4().hex[:8]}"


def _write_time(wid: str) -> int:
    """The time (ns) in write id `wid`: the order of the table's writes."""
    return int(wid.split("-")[1])


def _read_head(vdir: Path) -> str | None:
    """The write id the HEAD of version folder `vdir` names; None when it has no HEAD."""
    try:
        text = (vdir / _HEAD).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    wid = text.strip()
    if not _WRITE_ID.fullmatch(wid):
        raise LakeError(f"{vdir / _HEAD} names no write ({text[:60]!r})")
    return wid


def _head_or_none(vdir: Path) -> str | None:
    with suppress(LakeError):
        return _read_head(vdir)
    return None


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
        try:
            return pointer.read_text().strip()
        except FileNotFoundError:
            return None

    def versions(self, name: str) -> list[str]:
        """Every committed version of `name`, least recently written first: by the time in
        the write id its HEAD names (file mtimes tie on coarse clocks and change with a copy,
        a restore or a touch). Legacy versions (no HEAD) come before every other, as they
        were written before any HEAD was; among themselves by their `_meta.json`'s mtime."""
        table = self.table_dir(name)
        written: dict[str, tuple[int, int]] = {}
        for vdir in table.glob("version=*"):
            if not vdir.is_dir():
                continue
            version = vdir.name.split("=", 1)[1]
            wid = _head_or_none(vdir)
            if wid is not None:
                written[version] = (1, _write_time(wid))
                continue
            try:
                written[version] = (0, (vdir / _META).stat().st_mtime_ns)
            except (FileNotFoundError, NotADirectoryError):  # never committed, or pruned
                continue
        return sorted(written, key=lambda v: (*written[v], v))

    def _newest_write(self, table: Path) -> int:
        """The time in the newest write id any HEAD of the table names (0 when none)."""
        return max(
            (_write_time(wid) for v in table.glob("version=*") if (wid := _head_or_none(v))),
            default=0,
        )

    def _version_path(self, name: str, version: str | None) -> Path:
        """`lake/<name>/version=<version>` (default: the current version), validated."""
        version = version or self.current_version(name)
        if version is None:
            raise LakeError(
                f"Lake table {name!r} has no snapshot under {self.table_dir(name)}; "
                "materialize it first"
            )
        if not _VALUE.fullmatch(version):
            raise LakeError(f"Invalid lake version {version!r} for table {name!r}")
        return self.table_dir(name) / f"version={version}"

    def version_dir(self, name: str, version: str | None = None) -> Path:
        """The folder holding `version` (default: the current one) of table `name`: its
        committed write folder, which never changes (a DuckDB view over it reads one snapshot).
        A version without a HEAD (written by an earlier release, or never) is its own folder."""
        return self._consistent(name, version, lambda folder: folder)

    def exists(self, name: str) -> bool:
        """Whether the current version has files (resolved and retried as a read is)."""
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
        `meta` (plus the version and the write id) as its `_meta.json`, then make it the
        current version. Returns the files written.

        Re-writing a version replaces it whole (partitions that are gone are gone), as writing
        a new one does: readers see the previous files or the new ones, never a mix. Other
        versions are not touched, except that with `keep_versions` only that many most recently
        written versions (this one included) are kept: for tables whose version changes with
        the data.
        """
        if keep_versions is not None and keep_versions < 1:
            raise LakeError(f"keep_versions must be at least 1, got {keep_versions}")
        if df.is_empty():
            raise LakeError(f"Refusing to write an empty snapshot of lake table {name!r}")
        for col in (time_column, entity_column):
            if col not in df.columns:
                raise LakeError(f"Lake table {name!r} needs column {col!r}; it has {df.columns}")
            if nulls := df[col].null_count():
                # a null entity would share the folder of the string 'None' (one group silently
                # overwriting the other), a null time a `year=None` folder no read can parse
                raise LakeError(
                    f"Lake table {name!r}: column {col!r} has {nulls} null value(s); every row "
                    "of a snapshot needs an entity and a time: drop or fill them first"
                )
        bad = [v for v in df[entity_column].unique().to_list() if not _VALUE.fullmatch(str(v))]
        if bad:
            raise LakeError(f"{entity_column} values {bad} cannot be hive partition values")
        vdir = self._version_path(name, version)
        check_inside(self.root, vdir, f"lake table {name!r}")
        table = vdir.parent
        if not table.is_dir():
            table.mkdir(parents=True, exist_ok=True)
            fsync_dir(table.parent)
        with dir_lock(table) as locked:
            if locked:
                self._collect(table)  # what killed writes left
            else:
                log.warning(
                    "No flock on %s: writing %s version %s unlocked, without deleting old "
                    "write folders or pruning versions",
                    table,
                    name,
                    version,
                )
            if not vdir.is_dir():
                vdir.mkdir(exist_ok=True)
                fsync_dir(table)
            previous = _head_or_none(vdir)
            wid = _new_write_id(self._newest_write(table))
            folder = vdir / wid
            check_inside(self.root, folder, f"lake table {name!r}")
            folder.mkdir()
            try:
                parts = self._stage(folder, df, time_column, entity_column)
                write_text_atomic(
                    folder / _META,
                    json.dumps(
                        {**(meta or {}), "version": version, "write_id": wid},
                        indent=2,
                        sort_keys=True,
                        default=str,
                    ),
                    sync_dir=False,
                )
                fsync_tree(folder, files=False)  # the files were, as written
                missing = [str(p) for p in [*parts, Path(_META)] if not (folder / p).is_file()]
                if missing:  # someone deleted our folder (an unlocked cleaner): commit nothing
                    raise LakeError(f"{folder} lost {missing} while being written; not committed")
                fsync_dir(vdir)
                write_text_atomic(vdir / _HEAD, wid + "\n")  # the commit point
            except BaseException:
                if _head_or_none(vdir) != wid:
                    remove_path(folder)  # ours, never named: no reader has it
                raise
            write_text_atomic(table / "CURRENT", version + "\n")
            if locked:
                self._collect(table, keep={vdir.name: previous})
                if keep_versions is not None:
                    others = [v for v in self.versions(name) if v != version]  # oldest first
                    self._drop(table, others[: max(0, len(others) + 1 - keep_versions)])
        return sorted(folder / p for p in parts)

    def _stage(
        self, folder: Path, df: pl.DataFrame, time_column: str, entity_column: str
    ) -> list[Path]:
        """Write the partitions of `df` under the new folder `folder`; their relative paths.
        Partition folders are made one level at a time: if `folder` vanished, this fails."""
        with_year = df.with_columns(pl.col(time_column).dt.year().alias("year"))
        parts: list[Path] = []
        for (entity, year), part in with_year.group_by(
            [entity_column, "year"], maintain_order=True
        ):
            rel = Path(f"{entity_column}={entity}") / f"year={year}" / "part-0.parquet"
            path = folder / rel
            check_inside(self.root, path, f"lake partition {entity_column}={entity}")
            path.parent.parent.mkdir(exist_ok=True)
            path.parent.mkdir(exist_ok=True)
            write_parquet_atomic(
                part.drop([entity_column, "year"]).sort(time_column),
                path,
                sync_dir=False,
                mkdir=False,
            )
            parts.append(rel)
        return parts

    def _drop(self, table: Path, versions: list[str]) -> None:
        """Delete `versions` of the table (locked), each at once: renamed out, then removed."""
        self._discard(table, [table / f"version={old}" for old in versions])

    def _discard(self, table: Path, paths: list[Path]) -> None:
        """Rename each of `paths` to a hidden trash name in `table` (atomic: a reader finds it
        whole at its name or not at all), make that durable, then delete them."""
        trash = []
        for path in paths:
            moved = table / f".trash.{uuid.uuid4().hex}"
            try:
                os.rename(path, moved)
            except FileNotFoundError:
                continue
            trash.append(moved)
        if trash:
            fsync_dir(table)
            for parent in {p.parent for p in paths} - {table}:
                with suppress(OSError):
                    fsync_dir(parent)
        for moved in trash:
            remove_path(moved)

    def _collect(self, table: Path, keep: dict[str, str | None] | None = None) -> None:
        """Called with the table locked: delete what no reader can reach. In every committed
        version, write folders that HEAD does not name (a killed write's, or a replaced one's),
        but for `keep` (version folder name -> a write id, the HEAD just replaced); a legacy
        version's partitions and `_meta.json` once it has a HEAD, and until then the write
        folders and HEAD temporaries in it (a killed first write's); versions never committed
        (a first write killed); stale pointer temporaries and trash."""
        keep = keep or {}
        doomed: list[Path] = []
        changed = False
        for entry in sorted(table.iterdir()):
            name = entry.name
            if name.startswith("version=") and entry.is_dir() and not entry.is_symlink():
                try:
                    wid = _read_head(entry)
                except LakeError:
                    continue  # unreadable HEAD: leave the version for a person to look at
                if wid is None:
                    if not (entry / _META).is_file():
                        doomed.append(entry)  # a first write of it was killed: never committed
                        continue
                    # A legacy version: its partitions and _meta.json are the snapshot; a
                    # write folder or HEAD temporary in it is a killed first write's.
                    for inner in sorted(entry.iterdir()):
                        if _POINTER_TMP.fullmatch(inner.name):
                            inner.unlink(missing_ok=True)
                            changed = True
                        elif _WRITE_ID.fullmatch(inner.name) and not inner.is_symlink():
                            doomed.append(inner)
                    continue
                for inner in sorted(entry.iterdir()):
                    iname = inner.name
                    if iname in (_HEAD, wid, keep.get(name)):
                        continue
                    if _POINTER_TMP.fullmatch(iname):
                        inner.unlink(missing_ok=True)
                        changed = True
                    elif _WRITE_ID.fullmatch(iname) or iname == _META or "=" in iname:
                        doomed.append(inner)  # an old write, or the legacy layout's files
            elif _TRASH.fullmatch(name) or _POINTER_TMP.fullmatch(name):
                remove_path(entry)
                changed = True
            elif found := _ASIDE.fullmatch(name):
                # The previous release's swap: a version moved aside whose own folder is
                # missing goes back; anything else it left is deleted.
                home = table / f"version={found.group(3)}"
                old = found.group(1) == "old" and _VALUE.fullmatch(found.group(3))
                if old and not os.path.lexists(home):
                    os.rename(entry, home)
                    changed = True
                    continue
                remove_path(entry)
                changed = True
        if changed:
            fsync_dir(table)
        self._discard(table, doomed)

    def _resolve(self, name: str, version: str | None) -> tuple[Path, Callable[[], bool]]:
        """The folder holding `version` (default: the current one) now, and a test that it
        still does: a write folder is never re-used, so it holds that snapshot for as long as
        it is at its name; a legacy version's files, as long as no HEAD has replaced them. A
        version with neither (none committed) holds while CURRENT still names it: else it was
        pruned after CURRENT was read, and the read starts over on the version CURRENT names.
        The test raises LakeError when HEAD still names a write folder that is gone (deleted
        by hand): no re-write is under way, so starting over cannot help."""
        vdir = self._version_path(name, version)
        named = vdir.name.split("=", 1)[1]
        wid = _read_head(vdir)
        if wid is not None:
            folder = vdir / wid

            def holds() -> bool:
                if folder.is_dir():
                    return True
                if _head_or_none(vdir) == wid:  # collected folders are never HEAD's
                    raise LakeError(
                        f"HEAD of lake table {name!r} version {named} names the missing write "
                        f"folder {wid} (under {vdir}; deleted by hand?): re-write the table"
                    )
                return False

            return folder, holds
        had = (vdir / _META).is_file()  # a legacy version, or (False) none committed

        def holds_legacy() -> bool:
            if _read_head(vdir) is not None or (vdir / _META).is_file() != had:
                return False
            return had or version is not None or self.current_version(name) == named

        return vdir, holds_legacy

    def _consistent(self, name: str, version: str | None, read: Callable[[Path], T]) -> T:
        """`read(folder)` of one whole snapshot: started over (with a short pause) when the
        folder was collected while it was being read, so a result never mixes two writes."""
        pause = _READ_BACKOFF_S
        failed: BaseException | None = None
        for attempt in range(_READ_ATTEMPTS):
            folder, holds = self._resolve(name, version)
            try:
                result = read(folder)
            except (OSError, LakeError, pl.exceptions.PolarsError) as err:
                if holds():
                    raise
                failed = err
            else:
                if holds():
                    return result
                failed = None
            if attempt < _READ_ATTEMPTS - 1:
                time.sleep(pause)
                pause = min(pause * 2, 0.1)
        raise LakeError(
            f"Lake table {name!r} was re-written {_READ_ATTEMPTS} times while being read (each "
            "time, the snapshot it had resolved was replaced and collected before the read "
            "ended); read it again, or when its writes are less frequent"
        ) from failed

    def read(self, name: str, version: str | None = None) -> pl.DataFrame:
        """A version (default: the current one) with its entity column restored from the hive
        path (as string); the year and version path segments are not columns."""

        def read(folder: Path) -> pl.DataFrame:
            paths = _parquet_files(folder)
            if not paths:
                raise LakeError(
                    f"Lake table {name!r} has no files under {folder}; materialize it first"
                )
            # The hive columns are typed, not inferred from the folder names (that made the
            # symbols 007 and 1E5 the floats 7.0 and 100000.0): polars parses every `k=v`
            # segment of the path, so each needs a type; all but `year` are strings. Only
            # those under `folder` but `year` (the entity) are kept as columns.
            keys = [p.split("=", 1)[0] for p in paths[0].parts if "=" in p]
            inner = [p.split("=", 1)[0] for p in paths[0].relative_to(folder).parts if "=" in p]
            schema = {k: pl.Int64 if k == "year" else pl.String for k in keys}
            df = pl.read_parquet(paths, hive_partitioning=True, hive_schema=schema)
            return df.drop([k for k in schema if k == "year" or k not in inner], strict=False)

        return self._consistent(name, version, read)

    def read_meta(self, name: str, version: str | None = None) -> dict:
        """The `_meta.json` of a version (default: the current one)."""

        def read(folder: Path) -> dict:
            path = folder / _META
            if not path.exists():
                raise LakeError(
                    f"Lake table {name!r} has no _meta.json under {folder}; materialize it first"
                )
            return json.loads(path.read_text())

        return self._consistent(name, version, read)

    def files(self, name: str, version: str | None = None) -> list[Path]:
        """The Parquet files of a version (default: the current one); [] when there is none."""
        if version is None and self.current_version(name) is None:
            return []

        return self._consistent(name, version, _parquet_files)


def _parquet_files(folder: Path) -> list[Path]:
    """The Parquet files of one snapshot folder, sorted: a write folder's, or a legacy
    version's own partitions (not those of a write folder a killed first write left in it)."""
    return sorted(p for p in folder.glob("*=*/**/*.parquet") if not p.name.startswith("."))
