"""Guards of warehouse/lake.py's read side and module helpers, pinned where tests/test_lake.py
and tests/test_atomic_rewrite.py leave them loose.

What is pinned: which files and folders the durability helpers fsync (`fsync_dir` refuses what
is not a folder; `fsync_tree` syncs every folder deepest first and every file unless told they
were synced as written, never following a link); `remove_path` doing nothing when what it
deletes is removed by someone else under it; the atomic writers' defaults (the folder is made
and synced unless told not to; zstd Parquet with statistics); write ids one nanosecond past the
newest when the clock lags; how a reader decides to start over or to raise at once (a legacy or
HEAD-named folder collected while it read, a version that has nothing, a HEAD naming a folder
deleted by hand, an unreadable HEAD), the pauses between its 12 attempts and the error it ends
with (chained to the last read's error); hidden files left out of a snapshot's files; and the
messages a user reads (the table, the path, the fix).

These tests kill mutants that survived `make mutate` (benchmarks/mutation.py; figures in
benchmarks/results/mutation.md). Polars runs only inside tests (mutmut forks after collecting).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime
from pathlib import Path, PosixPath

import duckdb
import polars as pl
import pytest

import warehouse.lake as lake_module
from warehouse import Lake
from warehouse.lake import LakeError


def _frame(x: float = 1.0, symbols=("ACME", "BTC-USD")) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "symbol": list(symbols),
            "ts": [datetime(2020, 1, 1)] * len(symbols),
            "x": [x] * len(symbols),
        }
    )


def _write(lake: Lake, df: pl.DataFrame, version: str = "v1", **kw) -> list[Path]:
    return lake.write_snapshot("features", df, time_column="ts", version=version, **kw)


def _legacy(lake: Lake, df: pl.DataFrame, version: str = "v1") -> Path:
    """`version` as the release before write folders stored it: no HEAD, files in place."""
    vdir = lake.table_dir("features") / f"version={version}"
    for symbol in df["symbol"].to_list():
        path = vdir / f"symbol={symbol}" / "year=2020" / "part-0.parquet"
        path.parent.mkdir(parents=True)
        df.filter(pl.col("symbol") == symbol).drop("symbol").write_parquet(path)
    (vdir / "_meta.json").write_text(json.dumps({"version": version}))
    (vdir.parent / "CURRENT").write_text(version + "\n")
    return vdir


def _record_fsyncs(monkeypatch) -> list[str]:
    """Patch os.fsync to record the path of every descriptor synced, in order."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(lake_module.os, "fsync", fsync)
    return synced


def _record_dir_syncs(monkeypatch) -> list[Path]:
    synced: list[Path] = []
    monkeypatch.setattr(lake_module, "fsync_dir", lambda folder: synced.append(Path(folder)))
    return synced


# --- durability helpers ------------------------------------------------------------------


def test_fsync_dir_refuses_a_file(tmp_path):
    """It opens with O_DIRECTORY: given a file it fails rather than sync something else."""
    target = tmp_path / "f"
    target.write_text("x")
    with pytest.raises(NotADirectoryError):
        lake_module.fsync_dir(target)
    lake_module.fsync_dir(tmp_path)  # a folder is fine


def _tree(root: Path) -> tuple[list[str], list[str]]:
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    files = [root / "a" / "b" / "f1", root / "a" / "f2", root / "f3"]
    for f in files:
        f.write_text("x")
    dirs = [root / "a" / "b", root / "a", root / "c", root]
    return [str(d) for d in dirs], [str(f) for f in files]


def test_fsync_tree_syncs_every_file_and_every_folder_deepest_first(tmp_path, monkeypatch):
    root = tmp_path / "t"
    dirs, files = _tree(root)
    synced = _record_fsyncs(monkeypatch)
    lake_module.fsync_tree(root)  # files default to synced too
    assert sorted(synced) == sorted(dirs + files)
    for i, path in enumerate(synced):  # nothing under a folder is synced after the folder
        assert not [p for p in synced[i + 1 :] if p.startswith(path + os.sep)], synced


def test_fsync_tree_with_files_false_syncs_only_the_folders(tmp_path, monkeypatch):
    root = tmp_path / "t"
    dirs, _files = _tree(root)
    synced = _record_fsyncs(monkeypatch)
    lake_module.fsync_tree(root, files=False)
    assert sorted(synced) == sorted(dirs)
    assert synced[-1] == str(root)


def test_fsync_tree_skips_links_but_syncs_the_files_beside_them(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.write_text("x")
    root = tmp_path / "t"
    root.mkdir()
    (root / "a-link").symlink_to(outside)
    for name in ("b", "c"):
        (root / name).write_text("x")
    real_walk = os.walk

    def walk_sorted(top, **kw):  # a fixed listing order: the link first
        for parent, dirs, names in real_walk(top, **kw):
            yield parent, dirs, sorted(names)

    monkeypatch.setattr(lake_module.os, "walk", walk_sorted)
    synced = _record_fsyncs(monkeypatch)
    lake_module.fsync_tree(root)
    assert sorted(synced) == sorted([str(root / "b"), str(root / "c"), str(root)])


class _GoneAfterCheck(PosixPath):
    """A path that someone else deletes right after remove_path looked at it."""

    def is_file(self):
        found = super().is_file()
        if found:
            os.unlink(self)
        return found

    def exists(self):
        found = super().exists()
        if found:
            shutil.rmtree(self)
        return found


def test_remove_path_does_nothing_when_a_file_goes_under_it(tmp_path):
    target = tmp_path / "f"
    target.write_text("x")
    lake_module.remove_path(_GoneAfterCheck(target))
    assert not target.exists()


def test_remove_path_does_nothing_when_a_folder_goes_under_it(tmp_path):
    target = tmp_path / "d"
    (target / "sub").mkdir(parents=True)
    lake_module.remove_path(_GoneAfterCheck(target))
    assert not target.exists()


def test_write_parquet_atomic_makes_and_syncs_the_folder_by_default(tmp_path, monkeypatch):
    synced = _record_dir_syncs(monkeypatch)
    path = tmp_path / "new" / "deeper" / "p.parquet"
    lake_module.write_parquet_atomic(pl.DataFrame({"a": [1, 2]}), path)
    assert pl.read_parquet(path)["a"].to_list() == [1, 2]
    assert synced == [path.parent]


def test_write_parquet_atomic_without_sync_dir_or_mkdir(tmp_path, monkeypatch):
    synced = _record_dir_syncs(monkeypatch)
    path = tmp_path / "p.parquet"
    lake_module.write_parquet_atomic(pl.DataFrame({"a": [1]}), path, sync_dir=False, mkdir=False)
    assert path.is_file() and synced == []
    gone = tmp_path / "gone" / "p.parquet"
    with pytest.raises(FileNotFoundError):  # the folder is not re-created
        lake_module.write_parquet_atomic(pl.DataFrame({"a": [1]}), gone, mkdir=False)
    assert not gone.parent.exists() and synced == []


def test_write_parquet_atomic_writes_zstd_with_statistics(tmp_path):
    path = tmp_path / "p.parquet"
    lake_module.write_parquet_atomic(pl.DataFrame({"a": list(range(100))}), path)
    query = "SELECT compression, stats_min_value, stats_max_value FROM parquet_metadata(?)"
    rows = duckdb.execute(query, [str(path)]).fetchall()
    assert rows == [("ZSTD", "0", "99")]


def test_write_text_atomic_syncs_the_folder_unless_told_not_to(tmp_path, monkeypatch):
    synced = _record_dir_syncs(monkeypatch)
    lake_module.write_text_atomic(tmp_path / "a.txt", "one")
    assert synced == [tmp_path]
    lake_module.write_text_atomic(tmp_path / "b.txt", "two", sync_dir=False)
    assert synced == [tmp_path]
    assert (tmp_path / "a.txt").read_text() == "one" and (tmp_path / "b.txt").read_text() == "two"


def test_a_lagging_clock_gives_write_ids_one_nanosecond_past_the_newest(paths, monkeypatch):
    monkeypatch.setattr(lake_module.time, "time_ns", lambda: 0)
    assert re.fullmatch(r"w-1-[0-9a-f]{8}", lake_module._new_write_id())
    assert re.fullmatch(r"w-501-[0-9a-f]{8}", lake_module._new_write_id(500))
    monkeypatch.setattr(lake_module.time, "time_ns", lambda: 1_000)
    lake = Lake(paths.lake)
    times = []
    for x in (1.0, 2.0, 3.0):  # the clock is stuck: each write id is the next nanosecond
        _write(lake, _frame(x))
        times.append(int(lake.version_dir("features").name.split("-")[1]))
    assert times == [1_000, 1_001, 1_002]


# --- HEAD -------------------------------------------------------------------------------


def test_an_unreadable_head_is_named_with_its_path_and_text(paths):
    lake = Lake(paths.lake)
    _write(lake, _frame())
    head = lake.table_dir("features") / "version=v1" / "HEAD"
    head.write_text("garbage-" * 20)
    with pytest.raises(LakeError) as caught:
        lake.read("features")
    message = str(caught.value)
    assert message.startswith(f"{head} names no write (")
    assert f"({('garbage-' * 20)[:60]!r})" in message


def test_versions_skip_a_version_whose_head_is_unreadable(paths):
    lake = Lake(paths.lake)
    _write(lake, _frame(), version="v1")
    _write(lake, _frame(), version="v2")
    (lake.table_dir("features") / "version=v2" / "HEAD").write_text("not a write id\n")
    assert lake.versions("features") == ["v1"]


def test_a_head_naming_a_folder_deleted_by_hand_raises_at_once(paths):
    lake = Lake(paths.lake)
    _write(lake, _frame())
    folder = lake.version_dir("features")
    shutil.rmtree(folder)
    with pytest.raises(LakeError) as caught:
        lake.read("features")
    assert str(caught.value) == (
        f"HEAD of lake table 'features' version v1 names the missing write folder {folder.name} "
        f"(under {folder.parent}; deleted by hand?): re-write the table"
    )


# --- what a reader raises at once --------------------------------------------------------


def test_reading_a_table_never_written_says_to_materialize_it(paths):
    lake = Lake(paths.lake)
    table = lake.table_dir("features")
    with pytest.raises(LakeError) as caught:
        lake.read("features")
    assert str(caught.value) == (
        f"Lake table 'features' has no snapshot under {table}; materialize it first"
    )


def test_a_version_that_was_never_written_raises_at_once(paths, monkeypatch):
    lake = Lake(paths.lake)
    _write(lake, _frame())
    pauses = []
    monkeypatch.setattr(lake_module.time, "sleep", pauses.append)
    vdir = lake.table_dir("features") / "version=nope"
    with pytest.raises(LakeError) as caught:
        lake.read("features", version="nope")
    assert str(caught.value) == (
        f"Lake table 'features' has no files under {vdir}; materialize it first"
    )
    with pytest.raises(LakeError) as caught:
        lake.read_meta("features", version="nope")
    assert str(caught.value) == (
        f"Lake table 'features' has no _meta.json under {vdir}; materialize it first"
    )
    assert pauses == []  # no retry: nothing is being re-written


def test_current_naming_an_empty_version_raises_at_once(paths, monkeypatch):
    """CURRENT names a version that has neither HEAD nor files and still names it after the
    read: the table has nothing, which retrying cannot change."""
    lake = Lake(paths.lake)
    table = lake.table_dir("features")
    (table / "version=v1").mkdir(parents=True)
    (table / "CURRENT").write_text("v1\n")
    pauses = []
    monkeypatch.setattr(lake_module.time, "sleep", pauses.append)
    with pytest.raises(LakeError, match="has no files under .*version=v1; materialize it first"):
        lake.read("features")
    assert pauses == []


def test_hidden_files_are_not_part_of_a_snapshot(paths):
    lake = Lake(paths.lake)
    files = _write(lake, _frame())
    hidden = files[0].parent / ".part-0.parquet"
    shutil.copy(files[0], hidden)
    assert lake.files("features") == files
    assert lake.read("features").height == 2


@pytest.mark.parametrize("outer", ["run=1", "run=1=2"])
def test_a_lake_under_a_folder_named_with_an_equals_sign_reads_its_own_columns(tmp_path, outer):
    """Polars parses `k=v` folders above the lake too (none is made of `run=1=2`): they are
    not columns of the table, and one it did not make is not an error."""
    lake = Lake(tmp_path / outer / "lake")
    _write(lake, _frame(2.5))
    got = lake.read("features")
    assert got.columns == ["ts", "x", "symbol"]
    assert got["x"].to_list() == [2.5, 2.5]


# --- a reader that starts over -----------------------------------------------------------


def _write_during_resolve(monkeypatch, after_resolve) -> list:
    """Patch Lake._resolve so that `after_resolve(attempt)` runs after each resolution."""
    real, calls = Lake._resolve, []

    def resolve(self, name, version):
        found = real(self, name, version)
        calls.append(found[0])
        after_resolve(len(calls))
        return found

    monkeypatch.setattr(Lake, "_resolve", resolve)
    return calls


def test_a_legacy_version_pruned_while_read_is_read_again_on_the_current_one(paths, monkeypatch):
    lake = Lake(paths.lake)
    _legacy(lake, _frame(1.0))

    def prune_once(attempt):
        if attempt == 1:
            _write(lake, _frame(2.0, symbols=("ACME",)), version="v2", keep_versions=1)

    calls = _write_during_resolve(monkeypatch, prune_once)
    got = lake.read("features")
    assert len(calls) == 2 and not calls[0].exists()
    assert got["x"].to_list() == [2.0] and got["symbol"].to_list() == ["ACME"]


def test_a_write_folder_collected_while_read_is_read_again(paths, monkeypatch):
    lake = Lake(paths.lake)
    _write(lake, _frame(1.0))

    def collect_once(attempt):
        if attempt == 1:
            _write(lake, _frame(2.0))
            _write(lake, _frame(3.0))  # the folder resolved first is collected

    calls = _write_during_resolve(monkeypatch, collect_once)
    meta = lake.read_meta("features")
    assert len(calls) == 2 and not calls[0].exists()
    assert meta["write_id"] == calls[1].name


def _rewrite_every_read(lake: Lake, monkeypatch) -> tuple[list, list]:
    """Each resolution is followed by a write of the other version with keep_versions=1:
    what the reader resolved is always pruned before it reads."""
    _write(lake, _frame(0.0), version="a")
    pauses: list[float] = []
    monkeypatch.setattr(lake_module.time, "sleep", pauses.append)

    def rewrite(attempt):
        _write(lake, _frame(float(attempt)), version="ab"[attempt % 2], keep_versions=1)

    return _write_during_resolve(monkeypatch, rewrite), pauses


_GIVES_UP = (
    r"^Lake table 'features' was re-written 12 times while being read \(each time, the "
    r"snapshot it had resolved was replaced and collected before the read ended\); read it "
    r"again, or when its writes are less frequent$"
)
_PAUSES = [0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.1, 0.1, 0.1, 0.1, 0.1]


def test_a_reader_slower_than_the_writes_gives_up_after_12_tries(paths, monkeypatch):
    """Every read fails (its folder was pruned): 12 attempts, a doubling pause capped at
    0.1 s between them (none after the last), then a LakeError chained to the last failure."""
    lake = Lake(paths.lake)
    calls, pauses = _rewrite_every_read(lake, monkeypatch)
    with pytest.raises(LakeError, match=_GIVES_UP) as caught:
        lake.read_meta("features")
    assert len(calls) == 12
    assert pauses == pytest.approx(_PAUSES)
    cause = caught.value.__cause__
    assert isinstance(cause, LakeError) and "has no _meta.json under" in str(cause)
    assert str(calls[-1]) in str(cause)


def test_a_reader_whose_reads_succeed_on_pruned_folders_gives_up_unchained(paths, monkeypatch):
    """version_dir's read cannot fail, but each folder it resolved was gone when checked: the
    final LakeError has no cause to chain."""
    lake = Lake(paths.lake)
    calls, pauses = _rewrite_every_read(lake, monkeypatch)
    with pytest.raises(LakeError, match=_GIVES_UP) as caught:
        lake.version_dir("features")
    assert len(calls) == 12 and len(pauses) == 11
    assert caught.value.__cause__ is None
