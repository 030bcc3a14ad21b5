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
    rel = sorted(str(f.relative_to(paths.lake)) for f in files)
    assert rel == [
        "features/version=v1/symbol=ACME/year=2020/part-0.parquet",
        "features/version=v1/symbol=ACME/year=2021/part-0.parquet",
        "features/version=v1/symbol=BTC-USD/year=2020/part-0.parquet",
        "features/version=v1/symbol=BTC-USD/year=2021/part-0.parquet",
    ]
    assert (paths.lake / "features" / "CURRENT").read_text().strip() == "v1"
    back = lake.read("features")
    assert back.columns == ["ts", "x", "symbol"]  # no year, no version column
    assert back.select(df.columns).sort(["symbol", "ts"]).equals(df.sort(["symbol", "ts"]))
    assert lake.read_meta("features") == {"cols": ["x"], "version": "v1"}


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
    assert [str(f.relative_to(paths.lake)) for f in lake.files("features")] == [
        "features/version=v1/symbol=ACME/year=2020/part-0.parquet"
    ]
    assert not (paths.lake / "features" / "version=v1" / "symbol=BTC-USD").exists()


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
    assert lake.read_meta("features") == {"n": 1, "version": "v1"}
    assert not [p for p in paths.lake.rglob("*") if p.name.endswith(".tmp")]


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
