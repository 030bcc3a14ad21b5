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


def test_snapshot_uses_hive_layout_and_reads_back(paths):
    lake = Lake(paths.lake)
    df = _frame()
    files = lake.write_snapshot("features", df, time_column="ts")
    rel = sorted(str(f.relative_to(paths.lake)) for f in files)
    assert rel == [
        "features/symbol=ACME/year=2020/part-0.parquet",
        "features/symbol=ACME/year=2021/part-0.parquet",
        "features/symbol=BTC-USD/year=2020/part-0.parquet",
        "features/symbol=BTC-USD/year=2021/part-0.parquet",
    ]
    back = lake.read("features").select(df.columns).sort(["symbol", "ts"])
    assert back.equals(df.sort(["symbol", "ts"]))


def test_a_new_snapshot_removes_partitions_that_are_gone(paths):
    lake = Lake(paths.lake)
    lake.write_snapshot("features", _frame(years=(2019, 2020)), time_column="ts")
    lake.write_snapshot("features", _frame(years=(2020,), symbols=("ACME",)), time_column="ts")
    assert [str(f.relative_to(paths.lake)) for f in lake.files("features")] == [
        "features/symbol=ACME/year=2020/part-0.parquet"
    ]
    assert not (paths.lake / "features" / "symbol=BTC-USD").exists()


def test_a_crash_while_writing_keeps_the_previous_file_and_leaves_no_temp_file(paths, monkeypatch):
    lake = Lake(paths.lake)
    lake.write_snapshot("features", _frame(), time_column="ts")
    before = lake.read("features")

    def crash(self, file, *a, **k):
        file.write(b"PAR1 half a file")
        raise OSError("killed")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", crash)
    with pytest.raises(OSError, match="killed"):
        lake.write_snapshot("features", _frame().with_columns(x=pl.lit(0.0)), time_column="ts")
    monkeypatch.undo()
    assert lake.read("features").equals(before)
    assert not [p for p in paths.lake.rglob("*") if p.name.endswith(".tmp")]


def test_invalid_names_and_values_are_refused(paths):
    lake = Lake(paths.lake)
    with pytest.raises(LakeError, match="Invalid lake table name"):
        lake.write_snapshot("../etc", _frame(), time_column="ts")
    with pytest.raises(LakeError, match="cannot be hive partition values"):
        lake.write_snapshot("features", _frame(symbols=("a/b",)), time_column="ts")
    with pytest.raises(LakeError, match="empty snapshot"):
        lake.write_snapshot("features", _frame().clear(), time_column="ts")
    with pytest.raises(LakeError, match="materialize it first"):
        lake.read("labels")


def test_meta_round_trips(paths):
    lake = Lake(paths.lake)
    lake.write_meta("features", {"version": "abc", "cols": ["a"]})
    assert lake.read_meta("features") == {"version": "abc", "cols": ["a"]}


def test_duckdb_views_query_the_lake(paths):
    lake = Lake(paths.lake)
    lake.write_snapshot("features", _frame(), time_column="ts")
    wh = Warehouse(paths)
    assert wh.refresh_lake_views(paths.lake, ["features", "labels"]) == ["lake_features"]
    with wh.connect() as con:
        n, symbols = con.sql(
            "SELECT count(*), count(DISTINCT symbol) FROM lake_features"
        ).fetchall()[0]
    assert (n, symbols) == (8, 2)
