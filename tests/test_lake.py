import json
import re
from datetime import datetime

import polars as pl
import pytest

from warehouse import Lake, Warehouse
from warehouse.lake import LakeError


def _frame(years=(2020, 2021), symbols=("BTC-USD", "ACME")):
    rows = [
        {"symbol": s, "ts": datetime(y, m, 1), "x": float(y * 100 + m)}
        for s in symbols
        for y in years
        for m in (1, 6)
    ]
    return pl.DataFrame(rows)


def _write(lake, df, version="v1", **kw):
    return lake.write_snapshot("features", df, time_column="ts", version=version, **kw)


def test_snapshot_uses_versioned_hive_layout_and_reads_back(paths):
    lake = Lake(paths.lake)
    df = _frame()
    files = _write(lake, df, meta={"cols": ["x"]})
    folder = lake.version_dir("features")
    wid = folder.name
    assert re.fullmatch(r"w-[0-9]+-[0-9a-f]{8}", wid)  # no `=`: not a hive column
    assert folder.parent == paths.lake / "features" / "version=v1"
    assert (folder.parent / "HEAD").read_text() == wid + "\n"
    rel = sorted(str(f.relative_to(folder)) for f in files)
    assert rel == [
        "symbol=ACME/year=2020/part-0.parquet",
        "symbol=ACME/year=2021/part-0.parquet",
        "symbol=BTC-USD/year=2020/part-0.parquet",
        "symbol=BTC-USD/year=2021/part-0.parquet",
    ]
    assert lake.files("features") == sorted(files)
    assert (paths.lake / "features" / "CURRENT").read_text().strip() == "v1"
    back = lake.read("features")
    assert back.columns == ["ts", "x", "symbol"]  # no year, no version column
    assert back.select(df.columns).sort(["symbol", "ts"]).equals(df.sort(["symbol", "ts"]))
    assert lake.read_meta("features") == {"cols": ["x"], "version": "v1", "write_id": wid}


def test_a_new_version_gets_a_new_path_and_leaves_the_old_one(paths):
    lake = Lake(paths.lake)
    _write(lake, _frame(), version="v1", meta={"n": 1})
    _write(lake, _frame(symbols=("ACME",)).with_columns(x=pl.lit(0.0)), version="v2", meta={"n": 2})
    assert lake.current_version("features") == "v2"
    assert lake.versions("features") == ["v1", "v2"]
    assert lake.read("features")["x"].to_list() == [0.0] * 4
    assert lake.read("features", version="v1").height == 8
    assert lake.read_meta("features", version="v1")["n"] == 1
    assert all("version=v2" in str(f) for f in lake.files("features"))


def test_rewriting_a_version_removes_partitions_that_are_gone(paths):
    lake = Lake(paths.lake)
    _write(lake, _frame(years=(2019, 2020)))
    _write(lake, _frame(years=(2020,), symbols=("ACME",)))
    folder = lake.version_dir("features")
    assert [str(f.relative_to(folder)) for f in lake.files("features")] == [
        "symbol=ACME/year=2020/part-0.parquet"
    ]
    assert not (lake.version_dir("features") / "symbol=BTC-USD").exists()


def test_keep_versions_prunes_the_least_recently_written(paths):
    lake = Lake(paths.lake)
    for v in ("a", "b", "c"):
        _write(lake, _frame(), version=v, keep_versions=2)
    assert lake.versions("features") == ["b", "c"]
    _write(lake, _frame(), version="b", keep_versions=2)  # re-written: now the newest
    assert lake.versions("features") == ["c", "b"]
    assert lake.current_version("features") == "b"
    with pytest.raises(LakeError, match="keep_versions"):
        _write(lake, _frame(), keep_versions=0)


def test_a_crash_while_writing_a_new_version_leaves_readers_on_the_previous_one(paths, monkeypatch):
    lake = Lake(paths.lake)
    _write(lake, _frame(), version="v1", meta={"n": 1})
    before = lake.read("features")

    calls = []

    def crash_on_second_file(self, file, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            file.write(b"PAR1 half a file")
            raise OSError("killed")
        return original(self, file, *a, **k)

    original = pl.DataFrame.write_parquet
    monkeypatch.setattr(pl.DataFrame, "write_parquet", crash_on_second_file)
    with pytest.raises(OSError, match="killed"):
        _write(lake, _frame().with_columns(x=pl.lit(0.0)), version="v2")
    monkeypatch.undo()
    assert lake.current_version("features") == "v1"
    assert lake.read("features").equals(before)
    meta = lake.read_meta("features")
    assert meta == {"n": 1, "version": "v1", "write_id": meta["write_id"]}
    assert not [p for p in paths.lake.rglob("*") if p.name.endswith(".tmp")]
    assert lake.versions("features") == ["v1"]  # v2 never committed


def test_invalid_names_values_and_versions_are_refused(paths):
    lake = Lake(paths.lake)
    with pytest.raises(LakeError, match="Invalid lake table name"):
        lake.write_snapshot("../etc", _frame(), time_column="ts", version="v1")
    with pytest.raises(LakeError, match="cannot be hive partition values"):
        _write(lake, _frame(symbols=("a/b",)))
    with pytest.raises(LakeError, match="Invalid lake version"):
        _write(lake, _frame(), version="../v1")
    with pytest.raises(LakeError, match="empty snapshot"):
        _write(lake, _frame().clear())
    with pytest.raises(LakeError, match="materialize it first"):
        lake.read("labels")
    with pytest.raises(LakeError, match="materialize it first"):
        lake.read_meta("labels")
    assert not lake.exists("labels") and lake.files("labels") == []


def test_duckdb_views_query_the_current_version(paths):
    lake = Lake(paths.lake)
    _write(lake, _frame(), version="v1")
    _write(lake, _frame(symbols=("ACME",)), version="v2")
    wh = Warehouse(paths)
    assert wh.refresh_lake_views(lake, ["features", "labels"]) == ["lake_features"]
    with wh.connect() as con:
        n, symbols = con.sql(
            "SELECT count(*), count(DISTINCT symbol) FROM lake_features"
        ).fetchall()[0]
        columns = [r[0] for r in con.sql("DESCRIBE lake_features").fetchall()]
    assert (n, symbols) == (4, 1)
    assert "version" not in columns


def _legacy_version(lake, df, version, meta):
    """Version `version` as the release before write folders stored it: partitions and
    `_meta.json` directly in `version=<v>/`, no HEAD."""
    vdir = lake.table_dir("features") / f"version={version}"
    with_year = df.with_columns(year=pl.col("ts").dt.year())
    for (symbol, year), part in with_year.group_by(["symbol", "year"]):
        path = vdir / f"symbol={symbol}" / f"year={year}" / "part-0.parquet"
        path.parent.mkdir(parents=True)
        part.drop("symbol", "year").sort("ts").write_parquet(path)
    (vdir / "_meta.json").write_text(json.dumps({**meta, "version": version}))
    (vdir.parent / "CURRENT").write_text(version + "\n")
    return vdir


def test_a_legacy_version_reads_as_before_and_its_first_write_migrates_it(paths):
    """A data directory written before write folders: readers read it in place; the first
    write of the version gives it a HEAD and deletes the old files, other versions untouched."""
    lake = Lake(paths.lake)
    old = _frame(years=(2019,))
    v0 = _legacy_version(lake, _frame(symbols=("ACME",)), "v0", {"n": 0})
    vdir = _legacy_version(lake, old, "v1", {"n": 1})
    # an orphan of a killed first write is not part of the legacy snapshot
    orphan = vdir / "w-1-0000abcd" / "symbol=ZZZ" / "year=2000" / "part-0.parquet"
    orphan.parent.mkdir(parents=True)
    old.head(1).drop("symbol").write_parquet(orphan)
    assert lake.versions("features") == ["v0", "v1"]
    assert lake.version_dir("features") == vdir and lake.exists("features")
    assert (
        lake.read("features")
        .select(old.columns)
        .sort("symbol", "ts")
        .equals(old.sort("symbol", "ts"))
    )
    assert lake.read_meta("features") == {"n": 1, "version": "v1"}
    assert [f.relative_to(vdir).parts[0] for f in lake.files("features")] == [
        "symbol=ACME",
        "symbol=BTC-USD",
    ]

    new = _frame(years=(2022,), symbols=("ETH-USD",))
    _write(lake, new, meta={"n": 2})
    folder = lake.version_dir("features")
    assert folder.parent == vdir and folder.name == (vdir / "HEAD").read_text().strip()
    assert sorted(p.name for p in vdir.iterdir()) == ["HEAD", folder.name]  # legacy files gone
    assert lake.read("features").select(new.columns).equals(new)
    assert lake.read_meta("features")["n"] == 2
    assert lake.versions("features") == ["v0", "v1"]
    assert lake.read_meta("features", "v0") == {"n": 0, "version": "v0"}  # not migrated
    assert (v0 / "_meta.json").is_file() and not (v0 / "HEAD").exists()
    assert not list(paths.lake.rglob(".*"))


def test_duckdb_views_keep_all_digit_entities_as_strings(paths):
    # all-digit symbols (exchange tickers such as `0700` are) stay the strings they were stored as
    lake = Lake(paths.lake)
    _write(lake, _frame(symbols=("100", "200")), version="v1")
    wh = Warehouse(paths)
    wh.refresh_lake_views(lake, ["features"])
    with wh.connect() as con:
        got = con.sql("SELECT DISTINCT symbol, typeof(symbol) FROM lake_features").fetchall()
    assert sorted(got) == [("100", "VARCHAR"), ("200", "VARCHAR")]
    assert sorted(lake.read("features")["symbol"].unique()) == ["100", "200"]


def test_duckdb_views_pin_one_write_folder(paths):
    """The view names the committed write folder: a later re-write of the version does not
    change what an existing view reads until the views are refreshed, and never mixes."""
    lake = Lake(paths.lake)
    _write(lake, _frame(), version="v1")
    wh = Warehouse(paths)
    wh.refresh_lake_views(lake, ["features"])
    pinned = lake.version_dir("features")
    _write(lake, _frame(symbols=("ACME",)), version="v1")
    assert lake.version_dir("features") != pinned and pinned.is_dir()  # one generation kept
    with wh.connect() as con:
        assert con.sql("SELECT count(*) FROM lake_features").fetchall() == [(8,)]
    wh.refresh_lake_views(lake, ["features"])
    with wh.connect() as con:
        assert con.sql("SELECT count(DISTINCT symbol) FROM lake_features").fetchall() == [(1,)]


def test_versions_are_ordered_by_write_not_by_name_or_mtime(paths):
    """Review 2, finding 2: HEAD mtimes tie on coarse clocks (ties went to the name), and a
    copy, restore or touch re-orders them; the write order is in the committed write id."""
    import os
    import shutil

    lake = Lake(paths.lake)
    for v in ("z", "y", "x"):
        _write(lake, _frame(), version=v)
    heads = sorted(paths.lake.glob("features/version=*/HEAD"))
    for head in heads:  # one coarse tick for all three
        os.utime(head, ns=(10**18, 10**18))
    assert lake.versions("features") == ["z", "y", "x"]
    copy = paths.lake.parent / "copy"
    shutil.copytree(paths.lake, copy)  # new mtimes, in the copy's order
    os.utime(copy / "features" / "version=x" / "HEAD", ns=(1, 1))  # e.g. touch, a restore
    os.utime(copy / "features" / "version=z" / "HEAD", ns=(2 * 10**18, 2 * 10**18))
    assert Lake(copy).versions("features") == ["z", "y", "x"]
    _write(Lake(copy), _frame(), version="w", keep_versions=2)  # prunes the oldest two
    assert Lake(copy).versions("features") == ["x", "w"]


def test_versions_stay_in_write_order_when_the_clock_steps_back(paths, monkeypatch):
    import warehouse.lake as lake_module

    lake = Lake(paths.lake)
    _write(lake, _frame(), version="b")
    now = lake_module.time.time_ns()
    monkeypatch.setattr(lake_module.time, "time_ns", lambda: now - 3600 * 10**9)  # an NTP step
    _write(lake, _frame(), version="a", keep_versions=2)
    _write(lake, _frame(), version="c", keep_versions=2)
    assert lake.versions("features") == ["a", "c"]


def test_legacy_versions_order_before_written_ones(paths):
    import os

    lake = Lake(paths.lake)
    _write(lake, _frame(), version="new")
    legacy = paths.lake / "features" / "version=old"
    part = legacy / "symbol=ACME" / "year=2020" / "part-0.parquet"
    part.parent.mkdir(parents=True)
    _frame(symbols=("ACME",), years=(2020,)).drop("symbol").write_parquet(part)
    (legacy / "_meta.json").write_text(json.dumps({"version": "old"}))
    os.utime(legacy / "_meta.json", ns=(2 * 10**18, 2 * 10**18))  # "newer" by mtime
    assert lake.versions("features") == ["old", "new"]


@pytest.mark.parametrize("entity", ["symbol", "series"])
def test_numeric_looking_entity_values_read_back_unchanged(paths, entity):
    """Review 2, finding 3: hive types were inferred from the folder names, then cast to
    String: '007', '1E5', '0700' read back as '7.0', '100000.0', '700.0'."""
    lake = Lake(paths.lake)
    for version, values in (("v1", ["007", "1E5", "0700"]), ("v2", ["007", "BTC-USD", "12"])):
        df = pl.DataFrame({entity: values, "ts": [datetime(2020, 1, 1)] * 3, "x": [1.0, 2.0, 3.0]})
        lake.write_snapshot("features", df, time_column="ts", version=version, entity_column=entity)
        got = lake.read("features")
        assert got.schema[entity] == pl.String
        assert sorted(got[entity].to_list()) == sorted(values)
        assert sorted(got.columns) == sorted(["ts", "x", entity])
