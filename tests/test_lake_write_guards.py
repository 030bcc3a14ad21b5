"""Guards on the write side of warehouse/lake.py: `Lake.write_snapshot`, its garbage
collection (`_collect`, `_discard`), partition staging and `versions()`.

Each test pins one part of the module docstring's crash-safety and layout contract that the
older tests left open: every kind of leftover a killed write (or the previous release) leaves is
collected in one pass, and the table folder is synced after it (and not when nothing changed);
each file and folder of a write is fsynced exactly once before the commit; a write whose files
or folder vanish, or that fails after its commit point, leaves exactly one committed snapshot;
paths that resolve outside the lake are refused with a message naming what; `_meta.json` is
readable text; the unlocked-write warning says what it skips. They kill surviving mutants of
`make mutate` (benchmarks/mutation.py; figures in benchmarks/results/mutation.md).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
from collections import Counter
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

import warehouse.lake as lake_module
from warehouse import Lake
from warehouse.lake import LakeError
from warehouse.paths import PathOutsideError

WID = re.compile(r"w-[0-9]+-[0-9a-f]{8}")
TMP = re.compile(r"\.(.+)\.[0-9a-f]{32}\.tmp")


def _frame(symbols=("ACME", "BTC-USD"), years=(2020, 2021), x: float = 0.0) -> pl.DataFrame:
    rows = [
        {"symbol": s, "ts": datetime(y, m, 1), "x": x + y + m / 100}
        for s in symbols
        for y in years
        for m in (1, 6)
    ]
    return pl.DataFrame(rows)


def _write(root: Path, df: pl.DataFrame | None = None, version: str = "v1", **kw) -> list[Path]:
    df = _frame() if df is None else df
    return Lake(root).write_snapshot("features", df, time_column="ts", version=version, **kw)


def _sorted(df: pl.DataFrame) -> pl.DataFrame:
    return df.select("symbol", "ts", "x").sort("symbol", "ts")


def _legacy(vdir: Path, df: pl.DataFrame, meta: dict) -> None:
    """`df` in the layout of the release before write folders, in folder `vdir`."""
    with_year = df.with_columns(year=pl.col("ts").dt.year())
    for (symbol, year), part in with_year.group_by(["symbol", "year"]):
        path = vdir / f"symbol={symbol}" / f"year={year}" / "part-0.parquet"
        path.parent.mkdir(parents=True)
        part.drop("symbol", "year").sort("ts").write_parquet(path)
    (vdir / "_meta.json").write_text(json.dumps(meta))


def _committed_only(vdir: Path) -> None:
    """`vdir` holds its HEAD and the write folder HEAD names, nothing else."""
    head = (vdir / "HEAD").read_text().strip()
    assert sorted(p.name for p in vdir.iterdir()) == sorted(["HEAD", head])


# --- garbage collection -------------------------------------------------------------------


def test_a_write_collects_every_kind_of_leftover_in_one_pass(tmp_path):
    """Leftovers of killed writes and of the previous release's swaps, side by side: all go
    in the next write's collection (none stops it), a version moved aside whose folder is
    missing comes back whole, and a version with an unreadable HEAD is left for a person."""
    root = tmp_path / "lake"
    table = root / "features"
    _write(root, version="c")
    old_c = _sorted(Lake(root).read("features", "c"))
    moved = _frame(symbols=("ETH-USD",), x=500.0)
    # Sorted as _collect walks them: the restored one first, so every later kind is after it.
    _legacy(table / f".old.{'0' * 32}.d", moved, {"n": "moved", "version": "d"})
    _legacy(table / f".old.{'0' * 32}.d2", moved, {"n": "moved", "version": "d2"})
    (table / f".old.{'1' * 32}.c").mkdir()  # version=c exists: a stale copy, deleted
    (table / f".staging.{'2' * 32}.e").mkdir()  # a staged version never swapped in
    (table / f".staging.{'2' * 32}.e" / "_meta.json").write_text("{}")
    (table / f".trash.{'3' * 32}").mkdir()
    (table / f".CURRENT.{'4' * 32}.tmp").write_text("v9\n")
    (table / "version=a" / "w-1-00000000").mkdir(parents=True)  # a first write killed
    (table / "version=a2").mkdir()  # another (a write collects twice: before and after)
    (table / "version=b").mkdir()
    (table / "version=b" / "HEAD").write_text("not a write id\n")
    (table / "version=b" / "w-2-00000000").mkdir()
    orphan = table / "version=c" / "w-3-00000000"  # a killed re-write of c
    orphan.mkdir()
    (table / "version=c" / f".HEAD.{'5' * 32}.tmp").write_text("w-3-00000000\n")

    _write(root, version="f")

    names = sorted(p.name for p in table.iterdir())
    assert names == ["CURRENT", *(f"version={v}" for v in ("b", "c", "d", "d2", "f"))]
    assert sorted(p.name for p in (table / "version=b").iterdir()) == ["HEAD", "w-2-00000000"]
    _committed_only(table / "version=c")
    lake = Lake(root)
    assert _sorted(lake.read("features", "c")).equals(old_c)
    assert _sorted(lake.read("features", "d")).equals(_sorted(moved))
    assert lake.read_meta("features", "d2") == {"n": "moved", "version": "d2"}
    assert lake.versions("features")[-1] == "f"
    assert set(lake.versions("features")) == {"c", "d", "d2", "f"}


@pytest.mark.parametrize(
    "leftover",
    [
        f".trash.{'a' * 32}",
        f".CURRENT.{'b' * 32}.tmp",
        f".staging.{'c' * 32}.v2",
        f".old.{'d' * 32}.v2",  # version=v2 is missing: renamed back, not deleted
    ],
)
def test_a_collection_that_changes_the_table_folder_syncs_it(tmp_path, monkeypatch, leftover):
    """Whatever the collection removes from (or renames back into) the table folder is made
    durable by syncing that folder once; the collection of a clean table syncs nothing."""
    root = tmp_path / "lake"
    table = root / "features"
    _write(root)
    synced: list[Path] = []
    monkeypatch.setattr(lake_module, "fsync_dir", lambda folder: synced.append(Path(folder)))
    Lake(root)._collect(table)
    assert synced == []  # nothing to do: no fsync

    path = table / leftover
    if leftover.endswith(".tmp"):
        path.write_text("v9\n")
    else:
        path.mkdir()
        (path / "_meta.json").write_text("{}")
    Lake(root)._collect(table)
    assert synced == [table]
    assert not path.exists()
    assert (table / "version=v2").is_dir() == leftover.startswith(".old.")


def test_discarding_skips_a_path_already_gone_and_removes_the_rest(tmp_path):
    table = tmp_path / "lake" / "features"
    table.mkdir(parents=True)
    there = table / "version=b"
    (there / "w-1-00000000").mkdir(parents=True)
    Lake(tmp_path / "lake")._discard(table, [table / "version=a", there])
    assert list(table.iterdir()) == []


def test_a_version_folder_that_cannot_be_synced_does_not_stop_the_collection(tmp_path, monkeypatch):
    """Syncing the version folders that held discarded write folders is best effort (the
    renames out of them are in the table folder, which is synced)."""
    root = tmp_path / "lake"
    table = root / "features"
    _write(root)
    orphan = table / "version=v1" / "w-1-00000000"
    orphan.mkdir()
    real = lake_module.fsync_dir

    def failing(folder):
        if Path(folder) != table:
            raise OSError(errno.EIO, "I/O error")
        real(folder)

    monkeypatch.setattr(lake_module, "fsync_dir", failing)
    Lake(root)._collect(table)
    assert not orphan.exists()
    assert [p.name for p in table.iterdir() if p.name.startswith(".")] == []


# --- durability of a write ---------------------------------------------------------------


def test_each_file_and_folder_of_a_write_is_fsynced_once_before_the_commit(tmp_path, monkeypatch):
    """Files are synced as they are written (on their temporary name), every folder of the
    write folder once, deepest first, by fsync_tree: nothing is left unsynced at the commit
    and nothing is synced twice."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to name an fsynced descriptor")
    root = tmp_path / "lake"
    real, synced = os.fsync, []

    def spy(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    files = _write(root, meta={"n": 1})
    monkeypatch.undo()
    folder = Lake(root).version_dir("features")
    seen = Counter()
    for path in synced:
        if path == folder or folder in path.parents:
            rel = path.relative_to(folder)
            found = TMP.fullmatch(path.name)
            if found:
                seen[f"file {rel.parent / found.group(1)}"] += 1
            else:
                seen[f"{'dir' if path.is_dir() else 'synced again'} {rel}"] += 1
    dirs = [folder, *(p for p in folder.rglob("*") if p.is_dir())]
    expected = Counter(f"dir {p.relative_to(folder)}" for p in dirs)
    expected.update(f"file {f.relative_to(folder)}" for f in [*files, folder / "_meta.json"])
    assert seen == expected


# --- a write that fails ------------------------------------------------------------------


def test_a_partition_lost_while_being_written_is_not_committed_and_is_named(tmp_path, monkeypatch):
    root = tmp_path / "lake"
    _write(root, meta={"n": "old"})
    old = _sorted(Lake(root).read("features"))
    real, written = lake_module.write_parquet_atomic, []

    def losing(df, path, **kwargs):
        real(df, path, **kwargs)
        written.append(path)
        if len(written) == 2:
            written[0].unlink()  # someone deleted the first file; the folder is still there

    monkeypatch.setattr(lake_module, "write_parquet_atomic", losing)
    with pytest.raises(LakeError, match="while being written; not committed") as e:
        _write(root, _frame(x=1000.0), meta={"n": "new"})
    monkeypatch.undo()
    lost = written[0].relative_to(written[0].parents[2])  # symbol=<s>/year=<y>/part-0.parquet
    assert f"{written[0].parents[2]} lost {[str(lost)]}" in str(e.value)
    lake = Lake(root)
    assert _sorted(lake.read("features")).equals(old)
    assert lake.read_meta("features")["n"] == "old"
    _committed_only(root / "features" / "version=v1")  # the failed write's folder is gone


def test_a_write_whose_folder_vanishes_before_its_first_file_fails_without_recreating_it(
    tmp_path, monkeypatch
):
    """Partition folders are not re-created under a write folder someone removed: the write
    fails at its first file instead of committing a folder it rebuilt."""
    root = tmp_path / "lake"
    _write(root, meta={"n": "old"})
    old = _sorted(Lake(root).read("features"))
    real, folders = lake_module.write_parquet_atomic, []

    def vanishing(df, path, **kwargs):
        if not folders:
            folders.append(path.parents[2])
            shutil.rmtree(path.parents[2])
        real(df, path, **kwargs)

    monkeypatch.setattr(lake_module, "write_parquet_atomic", vanishing)
    with pytest.raises(FileNotFoundError):
        _write(root, _frame(x=1000.0), meta={"n": "new"})
    monkeypatch.undo()
    assert not folders[0].exists()
    assert _sorted(Lake(root).read("features")).equals(old)
    _committed_only(root / "features" / "version=v1")


def test_an_error_after_the_commit_point_keeps_the_committed_write_folder(tmp_path, monkeypatch):
    """HEAD was replaced (the new snapshot is committed) but syncing its folder failed: the
    error propagates, and the folder HEAD now names stays, so the version reads whole."""
    root = tmp_path / "lake"
    _write(root, meta={"n": "old"})
    vdir = root / "features" / "version=v1"
    old_head = (vdir / "HEAD").read_text()
    real = lake_module.fsync_dir

    def failing_after_commit(folder):
        if Path(folder) == vdir and (vdir / "HEAD").read_text() != old_head:
            raise OSError(errno.EIO, "I/O error")
        real(folder)

    monkeypatch.setattr(lake_module, "fsync_dir", failing_after_commit)
    new = _frame(x=1000.0)
    with pytest.raises(OSError, match="I/O error"):
        _write(root, new, meta={"n": "new"})
    monkeypatch.undo()
    lake = Lake(root)
    assert _sorted(lake.read("features")).equals(_sorted(new))
    assert lake.read_meta("features")["n"] == "new"


# --- what a write refuses, and says --------------------------------------------------------


def test_a_missing_column_is_refused_naming_the_table_and_the_column(tmp_path):
    with pytest.raises(LakeError, match=r"Lake table 'features' needs column 'ts'; it has"):
        _write(tmp_path / "lake", _frame().rename({"ts": "time"}))
    with pytest.raises(LakeError, match=r"needs column 'asset'; it has \['symbol', 'ts', 'x'\]"):
        _write(tmp_path / "lake", entity_column="asset")


def test_a_table_folder_linked_outside_the_lake_is_refused_naming_the_table(tmp_path):
    root, outside = tmp_path / "lake", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "features").symlink_to(outside)
    with pytest.raises(PathOutsideError, match=r"Refusing to write lake table 'features'"):
        _write(root)
    assert list(outside.iterdir()) == []


def test_a_version_folder_swapped_for_a_link_during_a_write_is_refused(tmp_path, monkeypatch):
    """Another process turns the version folder into a link outside the lake between its
    check and the write folder's: the write folder's own check refuses it, naming the table."""
    root, outside = tmp_path / "lake", tmp_path / "outside"
    outside.mkdir()
    _write(root, version="v0")
    vdir = root / "features" / "version=v1"
    real = lake_module._new_write_id

    def swap(after=0):
        shutil.rmtree(vdir)
        vdir.symlink_to(outside)
        return real(after)

    monkeypatch.setattr(lake_module, "_new_write_id", swap)
    with pytest.raises(PathOutsideError, match=r"Refusing to write lake table 'features'"):
        _write(root)
    assert list(outside.iterdir()) == []


def test_a_partition_folder_swapped_for_a_link_is_refused_naming_the_partition(
    tmp_path, monkeypatch
):
    root, outside = tmp_path / "lake", tmp_path / "outside"
    outside.mkdir()
    real, written = lake_module.write_parquet_atomic, []

    def swap(df, path, **kwargs):
        real(df, path, **kwargs)
        written.append(path)
        if len(written) == 1:  # its entity's other year comes later
            shutil.rmtree(path.parents[1])
            path.parents[1].symlink_to(outside)

    monkeypatch.setattr(lake_module, "write_parquet_atomic", swap)
    with pytest.raises(PathOutsideError) as e:
        _write(root)
    monkeypatch.undo()
    entity = written[0].parents[1].name  # symbol=<s>
    assert str(e.value).startswith(f"Refusing to write lake partition {entity} '")
    assert list(outside.iterdir()) == []
    assert Lake(root).current_version("features") is None


def test_first_writes_racing_to_create_a_table_and_version_both_succeed(tmp_path, monkeypatch):
    """Another writer creates the table folder, then the version folder, just after this one
    found each missing: making a folder that now exists is not an error."""
    root = tmp_path / "lake"
    table = root / "features"
    racing = {table, table / "version=v1"}
    real = Path.is_dir

    def is_dir(self):
        found = real(self)
        if not found and self in racing:
            racing.discard(self)
            os.makedirs(self)
        return found

    monkeypatch.setattr(Path, "is_dir", is_dir)
    files = _write(root)
    monkeypatch.undo()
    assert racing == set()
    assert Lake(root).files("features") == files


def test_an_unlocked_write_warns_naming_the_table_its_version_and_what_it_skips(
    tmp_path, monkeypatch, caplog
):
    root = tmp_path / "lake"
    _write(root)

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with caplog.at_level(logging.WARNING, logger="warehouse.lake"):
        _write(root, version="v2")
    messages = [r.getMessage() for r in caplog.records if r.name == "warehouse.lake"]
    assert messages == [
        f"No flock on {root / 'features'}: writing features version v2 unlocked, without "
        "deleting old write folders or pruning versions"
    ]


def test_meta_json_is_indented_text_with_sorted_keys_and_values_as_strings(tmp_path):
    """A person reads `_meta.json` (and diffs two of them): two-space indented, keys sorted
    whatever order the meta had, values JSON has no type for written as their str()."""
    root = tmp_path / "lake"
    cutoff = datetime(2021, 3, 4, 5, 6)
    _write(root, meta={"zeta": 1, "cutoff": cutoff, "source": Path("raw/ohlcv"), "alpha": [2]})
    folder = Lake(root).version_dir("features")
    expected = {
        "alpha": [2],
        "cutoff": str(cutoff),
        "source": "raw/ohlcv",
        "version": "v1",
        "write_id": folder.name,
        "zeta": 1,
    }
    assert (folder / "_meta.json").read_text() == json.dumps(expected, indent=2, sort_keys=True)
    assert Lake(root).read_meta("features") == expected


# --- versions() ----------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_versions_skips_a_stray_version_file_wherever_the_listing_puts_it(
    tmp_path, monkeypatch, order
):
    root = tmp_path / "lake"
    _write(root, version="v1")
    _write(root, version="v2")
    (root / "features" / "version=0").write_text("not a version folder\n")
    (root / "features" / "version=z").write_text("nor this\n")
    real = Path.glob

    def listed(self, pattern, **kwargs):
        return iter(sorted(real(self, pattern, **kwargs), reverse=order == "reversed"))

    monkeypatch.setattr(Path, "glob", listed)
    assert Lake(root).versions("features") == ["v1", "v2"]


def test_a_stray_version_folder_with_a_second_equals_sign_is_listed_and_pruned_whole(tmp_path):
    """A folder `version=a=b` (copied in by hand: the lake never writes an `=` in a version)
    is listed under its whole name, so pruning removes that folder and never version `a`."""
    root = tmp_path / "lake"
    table = root / "features"
    _write(root, version="a")
    stray = table / "version=a=b"
    (stray / "w-1-00000000").mkdir(parents=True)
    (stray / "HEAD").write_text("w-1-00000000\n")  # older than every write of the table
    assert Lake(root).versions("features") == ["a=b", "a"]
    _write(root, version="c", keep_versions=2)
    assert sorted(p.name for p in table.iterdir()) == ["CURRENT", "version=a", "version=c"]
    assert Lake(root).versions("features") == ["a", "c"]


@pytest.mark.parametrize("column", ["symbol", "ts"])
def test_a_null_entity_or_time_is_refused_before_anything_is_written(tmp_path, column):
    """A null entity would share `symbol=None/` with the string 'None' (one group overwriting
    the other) and a null time would commit a `year=None` folder no read can parse: both are
    refused with the column named, and the table is left as it was."""
    lake = Lake(tmp_path / "lake")
    good = pl.DataFrame(
        {"symbol": ["None", "ACME"], "ts": [datetime(2020, 1, 1), datetime(2020, 2, 1)]}
    )
    lake.write_snapshot("features", good, time_column="ts", version="v1")
    bad = good.with_columns(
        pl.when(pl.col("symbol") == "ACME").then(None).otherwise(pl.col(column)).alias(column)
    )
    with pytest.raises(
        LakeError,
        match=rf"column '{column}' has 1 null value\(s\); every row of a snapshot needs an entity and a time: drop or fill them first$",
    ):
        lake.write_snapshot("features", bad, time_column="ts", version="v2")
    assert not (tmp_path / "lake" / "features" / "version=v2").exists()  # refused up front
    assert lake.current_version("features") == "v1"
    assert lake.versions("features") == ["v1"]
    assert lake.read("features").sort("ts")["symbol"].to_list() == ["None", "ACME"]
