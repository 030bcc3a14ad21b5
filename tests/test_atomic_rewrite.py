"""Re-writing a lake version or an artifact is as atomic as writing a new one.

Two kinds of test. The SIGKILL tests run the write in a child process that stops for good at a
chosen point (a patched hook tells the parent through a marker file) and is then killed, as
test_kill does for the DuckDB writer. The step tests run the write in this process and, right
before every rename, replace, unlink or rmdir it makes, copy the data directory aside: each copy
is exactly what a SIGKILL at that instant would leave on disk. Every state must read as the old
snapshot or the new one (never a mix), and the next write on it must succeed and leave nothing
behind but the committed versions.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import duckdb
import polars as pl
import pytest

import warehouse.lake as lake_module
from warehouse import ArtifactStore, Lake
from warehouse.artifacts import ArtifactError

ROOT = Path(__file__).resolve().parents[1]


def _frame(symbols, years, x: float) -> pl.DataFrame:
    rows = [
        {"symbol": s, "ts": datetime(y, m, 1), "x": x + y + m / 100}
        for s in symbols
        for y in years
        for m in (1, 6)
    ]
    return pl.DataFrame(rows)


# The re-write keeps two partitions' names (their content changes), drops two and adds four.
OLD = _frame(("ACME", "BTC-USD"), (2019, 2020), 0.0)
NEW = _frame(("ACME", "BTC-USD", "ETH-USD"), (2020, 2021), 1000.0)
OLD_META = {"n": "old", "version": "v1"}
NEW_META = {"n": "new", "version": "v1"}


def _write(lake: Lake, df: pl.DataFrame, meta: dict, version: str = "v1", **kw) -> list[Path]:
    meta = {k: v for k, v in meta.items() if k != "version"}
    return lake.write_snapshot("features", df, time_column="ts", version=version, meta=meta, **kw)


def _sorted(df: pl.DataFrame) -> pl.DataFrame:
    return df.select("symbol", "ts", "x").sort("symbol", "ts")


def _parts(files: list[Path]) -> list[str]:
    """The partition part of each path (`symbol=.../year=.../part-0.parquet`)."""
    return sorted(str(f.relative_to(f.parents[2])) for f in files)


def _part_names(df: pl.DataFrame) -> list[str]:
    keys = df.select("symbol", pl.col("ts").dt.year().alias("year")).unique()
    return sorted(f"symbol={s}/year={y}/part-0.parquet" for s, y in keys.iter_rows())


def _meta(meta: dict) -> dict:
    """A snapshot's meta without its write id (which differs from write to write)."""
    return {k: v for k, v in meta.items() if k != "write_id"}


def _which_snapshot(lake: Lake, version: str | None = None, *, concurrent: bool = False) -> str:
    """'old' or 'new' when every reader agrees on one of the two snapshots; else fail. Unless
    `concurrent` (a writer is running), they must also agree on the write folder, which must
    be the one version_dir names."""
    data, raw = lake.read("features", version), lake.read_meta("features", version)
    listed = lake.files("features", version)
    files, meta = _parts(listed), _meta(raw)
    assert listed, "no files"
    assert not [f for f in listed if any(part.startswith(".") for part in f.parts)], listed
    if not concurrent:
        folder = lake.version_dir("features", version)
        assert all(f.is_relative_to(folder) for f in listed), (folder, listed)
        assert raw.get("write_id", folder.name) == folder.name, (raw, folder)
    for label, df, m in (("old", OLD, OLD_META), ("new", NEW, NEW_META)):
        if _sorted(data).equals(_sorted(df)):
            assert meta == m, f"rows of the {label} snapshot but meta {meta}"
            assert files == _part_names(df), f"rows of the {label} snapshot but files {files}"
            return label
    raise AssertionError(f"readers see neither snapshot: meta {meta}, files {files}")


def _assert_no_leftovers(table: Path, *, written: str = "v1") -> None:
    """Only the committed versions and CURRENT are left in a table folder; each version holds
    its HEAD and the write folder it names, and the version last `written` at most one more
    (the write it replaced, kept for readers that resolved it)."""
    names = sorted(p.name for p in table.iterdir())
    assert all(n == "CURRENT" or n.startswith("version=") for n in names), names
    assert not [p for p in table.rglob("*") if p.name.startswith(".")]
    for vdir in table.glob("version=*"):
        head = (vdir / "HEAD").read_text().strip()
        inner = sorted(p.name for p in vdir.iterdir())
        extra = set(inner) - {"HEAD", head}
        assert "HEAD" in inner and head in inner, inner
        assert len(extra) <= (1 if vdir.name == f"version={written}" else 0), inner
        assert all(re.fullmatch(r"w-[0-9]+-[0-9a-f]{8}", n) for n in extra), inner


def _wait_paused(child: subprocess.Popen, marker: Path) -> None:
    deadline = time.time() + 120
    while not marker.exists():
        assert child.poll() is None, child.stderr.read()
        assert time.time() < deadline, "the child never reached its pause"
        time.sleep(0.05)


def _run_and_kill(script: str, *args: str, marker: Path) -> None:
    """Run `script` in a child until it writes `marker`, then SIGKILL it."""
    child = subprocess.Popen(
        [sys.executable, "-c", script, *args, str(marker)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_paused(child, marker)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()


# ------------------------------------------------------------------------------------ lake --

# Re-writes version v1 of `features` with the frame in a Parquet file, but stops for good after
# `after` partition files are written.
LAKE_CHILD = """
import sys, time
from pathlib import Path
import polars as pl
import warehouse.lake as lake_module

root, frame, after, marker = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
real = lake_module.write_parquet_atomic
done = []

def write_then_hang(*args, **kwargs):
    real(*args, **kwargs)
    done.append(1)
    if len(done) == after:
        marker.write_text(str(len(done)))
        time.sleep(600)

lake_module.write_parquet_atomic = write_then_hang
lake_module.Lake(Path(root)).write_snapshot(
    "features", pl.read_parquet(frame), time_column="ts", version="v1", meta={"n": "new"}
)
"""


@pytest.mark.parametrize("after", [1, 3, 6], ids=["first-file", "half", "all-files"])
def test_a_lake_rewrite_killed_mid_write_keeps_the_old_snapshot(tmp_path: Path, after: int):
    lake_root = tmp_path / "lake"
    lake = Lake(lake_root)
    _write(lake, OLD, OLD_META)
    assert _which_snapshot(lake) == "old"
    frame = tmp_path / "new.parquet"
    NEW.write_parquet(frame)

    _run_and_kill(LAKE_CHILD, str(lake_root), str(frame), str(after), marker=tmp_path / "paused")

    assert lake.current_version("features") == "v1"
    assert lake.versions("features") == ["v1"]
    assert lake.exists("features")
    assert _which_snapshot(lake) == "old"
    assert _which_snapshot(lake, "v1") == "old"
    # the next write recovers: it commits and removes what the killed one left
    written = _write(lake, NEW, NEW_META)
    assert _parts(written) == _part_names(NEW)
    assert all(p.is_file() for p in written)
    assert _which_snapshot(lake) == "new"
    assert lake.versions("features") == ["v1"]
    _assert_no_leftovers(lake_root / "features")


def test_readers_during_rewrites_get_one_whole_snapshot(tmp_path: Path):
    """A reader racing a writer that re-writes the version back and forth: every read, meta
    and file list is one whole snapshot (the reader starts over when the folder was swapped)."""
    root = tmp_path / "lake"
    _write(Lake(root), OLD, OLD_META)
    done, errors = threading.Event(), []

    def rewrite() -> None:
        try:
            for i in range(6):
                df, meta = (NEW, NEW_META) if i % 2 == 0 else (OLD, OLD_META)
                _write(Lake(root), df, meta)
        except BaseException as err:  # reported by the test below
            errors.append(err)
        finally:
            done.set()

    writer = threading.Thread(target=rewrite)
    writer.start()
    reader, reads = Lake(root), 0
    try:
        while not done.is_set() or reads < 5:
            rows = _sorted(reader.read("features"))
            assert rows.equals(_sorted(OLD)) or rows.equals(_sorted(NEW))
            assert _meta(reader.read_meta("features")) in (OLD_META, NEW_META)
            assert _parts(reader.files("features")) in (_part_names(OLD), _part_names(NEW))
            reads += 1
    finally:
        writer.join()
    assert not errors, errors
    _assert_no_leftovers(root / "features")


_MUTATIONS = ("rename", "replace", "unlink", "remove", "rmdir")


def _record_states(
    monkeypatch: pytest.MonkeyPatch, data: Path, states: Path, write: Callable[[], object]
) -> list[Path]:
    """Run `write()`, copying `data` to `states/<n>` before each rename, replace, unlink, rmdir
    or rmtree it makes (what a SIGKILL then would leave), and once more at the end."""
    copies: list[Path] = []
    busy = []

    def snapshot() -> None:
        if busy:
            return
        busy.append(1)
        try:
            dest = states / f"{len(copies):03d}"
            shutil.copytree(data, dest, symlinks=True)
            copies.append(dest)
        finally:
            busy.clear()

    def before(fn):
        def wrapped(*args, **kwargs):
            snapshot()
            return fn(*args, **kwargs)

        return wrapped

    for name in _MUTATIONS:
        monkeypatch.setattr(os, name, before(getattr(os, name)))
    monkeypatch.setattr(shutil, "rmtree", before(shutil.rmtree))
    try:
        write()
    finally:
        monkeypatch.undo()
    snapshot()
    return copies


# The glob warehouse/store.py refresh_lake_views puts under version_dir(): only partition
# folders (a legacy version's folder can hold a write folder being built, or a killed one's).
STORE_GLOB = "*=*/**/*.parquet"


def _duck_rows(lake: Lake, glob: str = STORE_GLOB) -> pl.DataFrame:
    """What the DuckDB view `refresh_lake_views` makes reads: the same SQL, over version_dir."""
    pattern = str(lake.version_dir("features") / glob).replace("'", "''")
    sql = (
        "SELECT * EXCLUDE (version) FROM "  # noqa: S608 - the same text as warehouse/store.py
        f"read_parquet('{pattern}', hive_partitioning = true, union_by_name = true)"
    )
    with duckdb.connect() as con:
        return pl.from_arrow(con.sql(sql).to_arrow_table())


def _duck_snapshot(lake: Lake, glob: str = STORE_GLOB) -> str:
    rows = _duck_rows(lake, glob)
    for label, df in (("old", OLD), ("new", NEW)):
        if _sorted(rows.with_columns(pl.col("symbol").cast(pl.String))).equals(_sorted(df)):
            return label
    raise AssertionError(f"the DuckDB view reads neither snapshot: {rows}")


def _legacy(data: Path, df: pl.DataFrame, meta: dict, version: str = "v1") -> None:
    """`df` as version `version` in the layout of the release before write folders."""
    vdir = data / "features" / f"version={version}"
    with_year = df.with_columns(year=pl.col("ts").dt.year())
    for (symbol, year), part in with_year.group_by(["symbol", "year"]):
        path = vdir / f"symbol={symbol}" / f"year={year}" / "part-0.parquet"
        path.parent.mkdir(parents=True)
        part.drop("symbol", "year").sort("ts").write_parquet(path)
    (vdir / "_meta.json").write_text(json.dumps({**meta, "version": version}))
    (data / "features" / "CURRENT").write_text(version + "\n")


@pytest.mark.parametrize("start", ["write-folder", "legacy"])
def test_every_step_of_a_lake_rewrite_reads_as_old_or_new_and_recovers(
    tmp_path, monkeypatch, start
):
    """Also: at every step version_dir() names a folder the DuckDB view reads whole (finding
    5: it named a missing folder between the renames), and a legacy version's first re-write
    (its migration) is as atomic as any other."""
    data, states = tmp_path / "lake", tmp_path / "states"
    if start == "legacy":
        _legacy(data, OLD, OLD_META)
    else:
        _write(Lake(data), OLD, OLD_META)
    copies = _record_states(monkeypatch, data, states, lambda: _write(Lake(data), NEW, NEW_META))
    assert len(copies) > 3
    seen = []
    for state in copies:
        lake = Lake(state)
        assert lake.current_version("features") == "v1", state.name
        assert lake.versions("features") == ["v1"], state.name
        assert lake.exists("features"), state.name
        label = _which_snapshot(lake)
        assert _which_snapshot(lake, "v1") == label
        folder = lake.version_dir("features")
        assert folder.is_dir(), state.name
        assert _duck_snapshot(lake) == label, state.name
        seen.append(label)
    # old until one commit point, new from there on
    assert seen[0] == "old" and seen[-1] == "new"
    assert seen == sorted(seen, key=["old", "new"].index), seen
    for state in copies:
        lake = Lake(state)
        _write(lake, NEW, NEW_META)
        assert _which_snapshot(lake) == "new", state.name
        assert _duck_snapshot(lake) == "new", state.name
        _assert_no_leftovers(state / "features")


def test_every_step_of_rewriting_an_older_version_with_pruning_is_whole(tmp_path, monkeypatch):
    """v1 re-written while v2 is current, keeping two versions: v0 is pruned. Every state has
    v2 or v1 current, v1 old or new, and v0 either whole or gone."""
    data, states = tmp_path / "lake", tmp_path / "states"
    v0 = _frame(("ACME",), (2018,), 5.0)
    _write(Lake(data), v0, {"n": "v0"}, version="v0")
    _write(Lake(data), OLD, OLD_META)
    _write(Lake(data), OLD, {"n": "v2"}, version="v2")

    def rewrite():
        _write(Lake(data), NEW, NEW_META, keep_versions=2)

    copies = _record_states(monkeypatch, data, states, rewrite)
    for state in copies:
        lake = Lake(state)
        versions = lake.versions("features")
        assert set(versions) - {"v0"} == {"v1", "v2"}, (state.name, versions)
        assert lake.current_version("features") in ("v1", "v2")
        label = _which_snapshot(lake, "v1")
        if lake.current_version("features") == "v1":
            assert label == "new"
        if "v0" in versions:
            assert _sorted(lake.read("features", "v0")).equals(_sorted(v0)), state.name
            assert _meta(lake.read_meta("features", "v0")) == {"n": "v0", "version": "v0"}
    final = Lake(copies[-1])
    assert final.versions("features") == ["v2", "v1"]
    assert final.current_version("features") == "v1"
    for state in copies:
        lake = Lake(state)
        _write(lake, NEW, NEW_META, keep_versions=2)
        assert lake.versions("features") == ["v2", "v1"], state.name
        assert _which_snapshot(lake) == "new"
        _assert_no_leftovers(state / "features")


def test_a_read_spanning_two_rewrites_returns_one_whole_snapshot(tmp_path, monkeypatch):
    """Finding 1: the reader reads its first file, two re-writes commit (the second deletes the
    folder the reader resolved), then it reads the rest. It must not return a mix (an inode
    check passed here when ext4 re-used the folder's inode); it starts over on the newest."""
    root = tmp_path / "lake"
    _write(Lake(root), OLD, OLD_META)
    old2 = OLD.with_columns(x=pl.col("x") + 5000)
    real, fired = pl.read_parquet, []

    def slow_read(source, **kwargs):
        paths = sorted(source)
        first = real(paths[0], **kwargs)
        if not fired:
            fired.append(paths[0])
            _write(Lake(root), NEW, NEW_META)
            _write(Lake(root), old2, {"n": "old2"})
        return pl.concat([first, real(paths[1:], **kwargs)])

    monkeypatch.setattr(pl, "read_parquet", slow_read)
    rows = _sorted(Lake(root).read("features"))
    monkeypatch.undo()
    assert fired and not fired[0].exists()  # the folder it started on was collected
    assert rows.equals(_sorted(old2))


def test_a_read_spanning_one_rewrite_finishes_on_the_folder_it_resolved(tmp_path, monkeypatch):
    """The write folder a re-write replaced is kept until the next write: a reader that had
    resolved it finishes there, with the old snapshot whole, and need not start over."""
    root = tmp_path / "lake"
    _write(Lake(root), OLD, OLD_META)
    real, resolved = pl.read_parquet, []

    def slow_read(source, **kwargs):
        paths = sorted(source)
        if not resolved:
            resolved.append(paths[0])
            _write(Lake(root), NEW, NEW_META)
        return real(paths, **kwargs)

    monkeypatch.setattr(pl, "read_parquet", slow_read)
    rows = _sorted(Lake(root).read("features"))
    monkeypatch.undo()
    assert len(resolved) == 1 and rows.equals(_sorted(OLD))


@pytest.mark.parametrize("what", ["read", "read_meta", "files"])
def test_a_reader_of_a_folder_being_collected_retries_cleanly(tmp_path, monkeypatch, what):
    """Finding 2: a reader resolved the previous write folder, and the next writes collect it
    while it reads. The collection renames the folder away before deleting anything, so the
    reader sees the whole folder or no folder (never a half-deleted one, never a bare
    FileNotFoundError): it starts over and gets the newest snapshot whole."""
    root = tmp_path / "lake"
    _write(Lake(root), OLD, OLD_META)
    real_resolve, real_remove = Lake._resolve, lake_module.remove_path
    old_folder, during = Lake(root).version_dir("features"), []

    def remove_halfway(path: Path) -> None:
        """Delete half of a collected folder, look at it from readers, then finish."""
        files = sorted(p for p in path.rglob("*") if p.is_file())
        for f in files[: len(files) // 2]:
            f.unlink()
        during.append((old_folder.exists(), _which_snapshot(Lake(root), concurrent=True)))
        real_remove(path)

    def resolve_then_collect(self, name, version):
        found = real_resolve(self, name, version)
        if not during and found[0] == old_folder:
            monkeypatch.setattr(lake_module, "remove_path", remove_halfway)
            _write(Lake(root), NEW, NEW_META)  # old folder kept (one generation)
            _write(Lake(root), NEW, NEW_META)  # now collected, under this reader
            monkeypatch.setattr(lake_module, "remove_path", real_remove)
        return found

    monkeypatch.setattr(Lake, "_resolve", resolve_then_collect)
    got = getattr(Lake(root), what)("features")
    monkeypatch.undo()
    assert during and all(not exists for exists, _label in during), during
    assert all(label == "new" for _exists, label in during), during
    if what == "read":
        assert _sorted(got).equals(_sorted(NEW))
    elif what == "read_meta":
        assert _meta(got) == NEW_META
    else:
        assert _parts(got) == _part_names(NEW) and all(f.is_file() for f in got)


def _at_every_step(monkeypatch, write: Callable[[], object], check: Callable[[], None]) -> int:
    """Run `write()`, calling `check()` (on the live data) right before every rename, replace,
    unlink, rmdir or rmtree it makes. Returns how many checks ran."""
    busy, runs = [], []

    def before(fn):
        def wrapped(*args, **kwargs):
            if not busy:
                busy.append(1)
                try:
                    check()
                    runs.append(1)
                finally:
                    busy.clear()
            return fn(*args, **kwargs)

        return wrapped

    for name in _MUTATIONS:
        monkeypatch.setattr(os, name, before(getattr(os, name)))
    monkeypatch.setattr(shutil, "rmtree", before(shutil.rmtree))
    try:
        write()
    finally:
        monkeypatch.undo()
    return len(runs)


def test_readers_during_every_step_of_writes_never_see_a_missing_table(tmp_path, monkeypatch):
    """Finding 3: in the swap window readers got "has no _meta.json ... materialize it
    first", files() == [] and exists() == False (what refresh_lake_views checks). At every
    step of a re-write, of a new version with pruning and of a legacy version's migration,
    every reader gets a whole snapshot, exists() holds and version_dir() is a folder."""
    root = tmp_path / "lake"
    _legacy(root, OLD, OLD_META, version="v0")
    _write(Lake(root), OLD, OLD_META)

    def check() -> None:
        lake = Lake(root)
        assert lake.exists("features")
        assert lake.version_dir("features").is_dir()
        for v in [None, *lake.versions("features")]:
            rows = _sorted(lake.read("features", v))
            assert rows.equals(_sorted(OLD)) or rows.equals(_sorted(NEW)), v
            assert lake.read_meta("features", v)["n"] in ("old", "new"), v
            assert _parts(lake.files("features", v)) in (_part_names(OLD), _part_names(NEW))

    steps = _at_every_step(monkeypatch, lambda: _write(Lake(root), NEW, NEW_META), check)
    steps += _at_every_step(
        monkeypatch, lambda: _write(Lake(root), OLD, OLD_META, version="v2"), check
    )
    steps += _at_every_step(
        monkeypatch, lambda: _write(Lake(root), NEW, NEW_META, version="v0"), check
    )
    steps += _at_every_step(
        monkeypatch, lambda: _write(Lake(root), OLD, OLD_META, keep_versions=2), check
    )
    assert steps > 12
    assert Lake(root).versions("features") == ["v0", "v1"]
    assert _which_snapshot(Lake(root)) == "old"
    _assert_no_leftovers(root / "features")


def _no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")


def test_without_flock_a_second_writer_deletes_nothing_and_both_commit_whole(
    tmp_path, monkeypatch, caplog
):
    """Finding 4: without flock a second writer's recovery deleted a live writer's folder
    and the live one committed a version missing partitions. Unlocked, a write deletes
    nothing (and says so), so both writes commit whole."""
    root = tmp_path / "lake"
    _write(Lake(root), OLD, OLD_META)
    monkeypatch.setattr(fcntl, "flock", _no_flock)
    real, written = lake_module.write_parquet_atomic, []

    def hooked(*args, **kwargs):
        real(*args, **kwargs)
        written.append(args[1])
        if len(written) == 2:  # writer A is half done: writer B writes v0, then v1 too
            _write(Lake(root), OLD, {"n": "b"}, version="v0")
            _write(Lake(root), OLD, {"n": "b"}, keep_versions=1)

    monkeypatch.setattr(lake_module, "write_parquet_atomic", hooked)
    with caplog.at_level(logging.WARNING, logger="warehouse.lake"):
        files = _write(Lake(root), NEW, NEW_META)
    monkeypatch.undo()
    assert "No flock" in caplog.text
    assert all(f.is_file() for f in files) and _parts(files) == _part_names(NEW)
    lake = Lake(root)
    assert _which_snapshot(lake) == "new"  # A committed last: whole
    # Not pruned without the lock. (Unlocked, versions order by when their writes started,
    # the time in the write id: A's v1 began before B's v0.)
    assert sorted(lake.versions("features")) == ["v0", "v1"]
    assert _sorted(lake.read("features", "v0")).equals(_sorted(OLD))


def test_a_write_whose_folder_is_deleted_under_it_commits_nothing(tmp_path, monkeypatch):
    """Finding 4, the other half: should anything delete a live write's folder anyway, the
    write fails (its partition folders are not re-created) instead of committing the rest."""
    root = tmp_path / "lake"
    _write(Lake(root), OLD, OLD_META)
    real, written = lake_module.write_parquet_atomic, []

    def hooked(df, path, **kwargs):
        real(df, path, **kwargs)
        written.append(path)
        if len(written) == 2:
            shutil.rmtree(path.parents[2])  # the write folder: `<wid>/symbol=/year=/part`

    monkeypatch.setattr(lake_module, "write_parquet_atomic", hooked)
    with pytest.raises((FileNotFoundError, lake_module.LakeError)):
        _write(Lake(root), NEW, NEW_META)
    monkeypatch.undo()
    assert _which_snapshot(Lake(root)) == "old"


def test_a_locked_writer_waits_for_the_one_writing(tmp_path, monkeypatch):
    """With flock, a second writer of the table waits: it cannot collect the live write's
    folder, and each commits whole, in turn."""
    root = tmp_path / "lake"
    _write(Lake(root), OLD, OLD_META)
    real = lake_module.write_parquet_atomic
    paused, go, order = threading.Event(), threading.Event(), []

    def hooked(*args, **kwargs):
        real(*args, **kwargs)
        if threading.current_thread().name == "A" and not paused.is_set():
            paused.set()
            go.wait(60)

    monkeypatch.setattr(lake_module, "write_parquet_atomic", hooked)

    def run(df, meta, label):
        _write(Lake(root), df, meta)
        order.append(label)

    a = threading.Thread(target=run, args=(NEW, NEW_META, "A"), name="A")
    a.start()
    assert paused.wait(60)
    b = threading.Thread(target=run, args=(OLD, OLD_META, "B"), name="B")
    b.start()
    time.sleep(0.5)
    assert order == [] and _which_snapshot(Lake(root)) == "old"  # B waits on A's lock
    go.set()
    a.join(60)
    b.join(60)
    assert order == ["A", "B"]
    assert _which_snapshot(Lake(root)) == "old"
    _assert_no_leftovers(root / "features")


# ------------------------------------------------------------------------------- artifacts --

# Writes version v2 of model/holdout, stopping for good either inside the writer after its first
# file ("inside") or when the finished version is about to be renamed into place ("commit").
ARTIFACT_CHILD = """
import os, sys, time
from pathlib import Path
from warehouse.artifacts import ArtifactStore

root, mode, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

def hang():
    marker.write_text(mode)
    time.sleep(600)

real_rename = os.rename

def rename(src, dst, *args, **kwargs):
    if mode == "commit" and Path(dst).name == "v2":
        hang()
    return real_rename(src, dst, *args, **kwargs)

os.rename = rename

def write(folder):
    (folder / "weights.bin").write_bytes(b"new weights")
    if mode == "inside":
        hang()
    (folder / "config.json").write_text("{}")

ArtifactStore(root).write("model", "holdout", "v2", write, {"n": 2})
"""


def _one_file(name: str, text: str) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        (folder / name).write_text(text)

    return write


def _assert_store_reads_whole(store: ArtifactStore) -> list[str]:
    """Every listed version loads and matches its checksums, LATEST among them."""
    listed = [m["version"] for m in store.list("model", "holdout")]
    assert listed == sorted(set(listed)), listed
    for v in listed:
        store.verify(store.get("model", "holdout", v))
    assert store.latest("model", "holdout").version in listed
    assert [m["version"] for m in store.list("model")] == listed
    return listed


def _assert_no_store_leftovers(partition: Path) -> None:
    names = sorted(p.name for p in partition.iterdir())
    assert all(n == "LATEST" or not n.startswith(".") for n in names), names
    for version in (p for p in partition.iterdir() if p.is_dir()):
        assert not [p for p in version.rglob("*") if p.name.startswith(".")], version


@pytest.mark.parametrize("mode", ["inside", "commit"])
def test_an_artifact_write_killed_midway_leaves_the_store_as_it_was(tmp_path: Path, mode: str):
    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    store.write("model", "holdout", "v1", _one_file("weights.bin", "old"), {"n": 1})

    _run_and_kill(ARTIFACT_CHILD, str(root), mode, marker=tmp_path / "paused")

    assert _assert_store_reads_whole(store) == ["v1"]
    assert store.latest("model", "holdout").version == "v1"
    with pytest.raises(ArtifactError, match="No artifact"):
        store.get("model", "holdout", "v2")
    # the next write of that version succeeds and removes what the killed one left
    art = store.write("model", "holdout", "v2", _one_file("weights.bin", "new"), {"n": 2})
    assert art.created and art.file("weights.bin").read_text() == "new"
    assert _assert_store_reads_whole(store) == ["v1", "v2"]
    assert store.latest("model", "holdout").version == "v2"
    _assert_no_store_leftovers(root / "model" / "holdout")


def test_every_step_of_an_artifact_write_and_rewrite_reads_whole_and_recovers(
    tmp_path, monkeypatch
):
    """A new version v2, then v1 written again (reused, made LATEST again): each state lists
    only whole versions, and the next write of the same versions succeeds without leftovers."""
    root, states = tmp_path / "artifacts", tmp_path / "states"
    ArtifactStore(root).write("model", "holdout", "v1", _one_file("w.bin", "one"), {})
    copies: list[Path] = []

    def write():
        def two(folder: Path) -> None:
            (folder / "w.bin").write_text("two")
            (folder / "extra.json").write_text("{}")

        ArtifactStore(root).write("model", "holdout", "v2", two, {})
        ArtifactStore(root).write("model", "holdout", "v1", _one_file("w.bin", "x"), {})

    copies = _record_states(monkeypatch, root, states, write)
    latest = []
    for state in copies:
        store = ArtifactStore(state)
        listed = _assert_store_reads_whole(store)
        assert listed in (["v1"], ["v1", "v2"]), (state.name, listed)
        latest.append(store.latest("model", "holdout").version)
    assert latest[0] == "v1" and "v2" in latest and latest[-1] == "v1"
    for state in copies:
        store = ArtifactStore(state)
        store.write("model", "holdout", "v2", _one_file("w.bin", "two"), {})
        store.write("model", "holdout", "v1", _one_file("w.bin", "x"), {})
        assert _assert_store_reads_whole(store) == ["v1", "v2"]
        assert store.get("model", "holdout", "v1").file("w.bin").read_text() == "one"
        assert store.latest("model", "holdout").version == "v1"
        _assert_no_store_leftovers(state / "model" / "holdout")


@pytest.mark.parametrize("what", ["read", "read_meta", "files", "exists", "version_dir"])
def test_a_reader_racing_keep_versions_pruning_gets_the_new_version(tmp_path, monkeypatch, what):
    """Review 2, finding 1: the reader has read CURRENT (v1) when a keep_versions=1 write of v2
    commits and prunes v1, before the reader opens v1's HEAD. It must start over on v2, not
    take the missing version for an empty or never-materialized table."""
    data = tmp_path / "lake"
    _write(Lake(data), OLD, OLD_META)
    real, fired = lake_module._read_head, []

    def hooked(vdir):
        if not fired:
            fired.append(vdir)
            monkeypatch.setattr(lake_module, "_read_head", real)
            _write(Lake(data), NEW, {"n": "v2"}, version="v2", keep_versions=1)
        return real(vdir)

    monkeypatch.setattr(lake_module, "_read_head", hooked)
    got = getattr(Lake(data), what)("features")
    assert fired and fired[0].name == "version=v1"
    assert not (data / "features" / "version=v1").exists()  # pruned under the reader
    v2 = data / "features" / "version=v2"
    if what == "read":
        assert _sorted(got).equals(_sorted(NEW))
    elif what == "read_meta":
        assert got["n"] == "v2"
    elif what == "files":
        assert got and all(f.is_relative_to(v2) for f in got)
    elif what == "exists":
        assert got is True
    else:
        assert got.is_dir() and got.parent == v2


def test_a_reader_slower_than_the_writes_fails_with_a_lake_error(tmp_path, monkeypatch):
    """Review 2, finding 4: every attempt's folder is collected while it is read; after the
    last one the reader raises a LakeError that says so, not polars' FileNotFoundError."""
    data = tmp_path / "lake"
    _write(Lake(data), OLD, OLD_META)
    _write(Lake(data), OLD, OLD_META)  # a replaced write is kept until the next write
    monkeypatch.setattr(lake_module, "_READ_BACKOFF_S", 0.0)
    real = pl.read_parquet

    def rewritten_twice_under_it(source, **kwargs):
        _write(Lake(data), OLD, OLD_META)
        _write(Lake(data), OLD, OLD_META)  # the folder the reader resolved is collected
        return real(source, **kwargs)

    monkeypatch.setattr(pl, "read_parquet", rewritten_twice_under_it)
    with pytest.raises(
        lake_module.LakeError, match=r"'features' was re-written 12 times while being read"
    ):
        Lake(data).read("features")


@pytest.mark.parametrize("what", ["read", "read_meta", "files"])
def test_a_head_naming_a_deleted_write_folder_fails_at_once(tmp_path, monkeypatch, what):
    """Review 2, finding 6: HEAD names a write folder someone deleted by hand. That is not a
    re-write to wait out (HEAD does not change): the reader says so at once."""
    data = tmp_path / "lake"
    _write(Lake(data), OLD, OLD_META)
    folder = Lake(data).version_dir("features")
    shutil.rmtree(folder)
    pauses = []
    monkeypatch.setattr(lake_module.time, "sleep", pauses.append)
    with pytest.raises(
        lake_module.LakeError, match=rf"names the missing write folder {folder.name}.*re-write"
    ):
        getattr(Lake(data), what)("features")
    assert not pauses


def test_a_killed_first_write_inside_a_legacy_version_is_collected(tmp_path):
    """Review 2, finding 5: a legacy version (no HEAD) whose first re-write was killed keeps
    the orphan write folder and HEAD temporary; the next write of any version deletes them,
    and nothing of the legacy snapshot."""
    data = tmp_path / "lake"
    _legacy(data, OLD, OLD_META)
    vdir = data / "features" / "version=v1"
    orphan = vdir / "w-1-deadbeef" / "symbol=ZZZ" / "year=2000"
    orphan.mkdir(parents=True)
    (orphan / "part-0.parquet").write_bytes(b"x" * 100)
    (vdir / f".HEAD.{'a' * 32}.tmp").write_text("w-1-deadbeef\n")
    before = sorted(p.relative_to(vdir) for p in vdir.rglob("*") if "w-1-" not in str(p))
    before = [p for p in before if not p.name.startswith(".")]
    _write(Lake(data), NEW, {"n": "v2"}, version="v2")
    assert sorted(p.relative_to(vdir) for p in vdir.rglob("*")) == before
    assert _which_snapshot(Lake(data), "v1") == "old"
