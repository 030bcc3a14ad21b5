"""The real command-line entry points, run as a user would, in subprocesses."""

import itertools
import json
import subprocess
from datetime import datetime

import dagster as dg
import pytest

from assets.resources import MarketSourcesResource
from pipelines.definitions import defs
from tests.processes import (
    BIN,
    ROOT,
    free_port,
    instance_env,
    ui_command,
    wait_for_asset_graph,
)
from warehouse import DataPaths, Warehouse

UNTIL = "2024-01-04"  # the sources' cutoff: the 2024 partition holds 1-3 January


def _ingest_command(year: str) -> list[str]:
    """The real CLI: materialize the three ingest assets for one (year) partition."""
    config = {"resources": {"sources": {"config": {"until": UNTIL}}}}
    return [
        str(BIN / "dagster"),
        "asset",
        "materialize",
        "-m",
        "pipelines.definitions",
        "--select",
        "ohlcv_bars,onchain_metrics,macro_series",
        "--partition",
        year,
        "--config-json",
        json.dumps(config),
    ]


def _dg_launch_command(year: str) -> list[str]:
    """The same run through the dg CLI, on the project's [tool.dg] code location."""
    config = {"resources": {"sources": {"config": {"until": UNTIL}}}}
    return [
        str(BIN / "dg"),
        "launch",
        "--assets",
        "ohlcv_bars,onchain_metrics,macro_series",
        "--partition",
        year,
        "--config-json",
        json.dumps(config),
    ]


def _expected_rows(*windows: tuple[datetime, datetime]) -> dict[str, int]:
    """What the default (synthetic) sources hold for the windows."""
    sources = MarketSourcesResource()
    return {
        t: sum(sources.source(t).fetch(a, b).height for a, b in windows)
        for t in ("ohlcv", "onchain", "macro")
    }


@pytest.mark.slow
def test_dagster_asset_materialize_and_dg_launch_land_one_partition_in_warehouse_and_instance(
    tmp_path, monkeypatch
):
    env = instance_env(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    # `dagster asset materialize`, then `dg launch`: the second run replaces the partition
    # instead of adding to it
    for cmd in (_ingest_command("2024"), _dg_launch_command("2024")):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    wh = Warehouse(DataPaths.at(env["MAMBACAST_DATA_DIR"]))
    expected = _expected_rows((datetime(2024, 1, 1), datetime(2024, 1, 4)))
    assert expected["ohlcv"] >= 3 + 2 * 2  # BTC-USD every day, the stocks on 2 and 3 January
    assert {t: wh.count(t) for t in expected} == expected
    assert wh.read("ohlcv")["ts"].max() == datetime(2024, 1, 3)  # nothing from the cutoff on
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        runs = instance.get_runs()
        assert len(runs) == 2 and all(r.is_success for r in runs)
        assert runs[0].tags["dagster/partition"] == "2024"
        # a one-partition run records Dagster's table keys: the partition's rows, the table's
        for asset, table in (("ohlcv_bars", "ohlcv"), ("macro_series", "macro")):
            event = instance.get_latest_materialization_event(dg.AssetKey(asset))
            md = event.asset_materialization.metadata
            assert md["dagster/partition_row_count"].value == expected[table]
            assert md["dagster/row_count"].value == wh.count(table)
            assert md["dagster/table_name"].value == f"warehouse.main.{table}"


@pytest.mark.slow
def test_webserver_serves_the_graph_on_localhost(tmp_path):
    env = instance_env(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        ui_command(port),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        nodes = wait_for_asset_graph(
            f"http://127.0.0.1:{port}", proc, output=lambda: proc.stderr.read()[-3000:]
        )
        got = {n["assetKey"]["path"][0]: n["groupName"] for n in nodes}
        assert got["ohlcv_bars"] == "ingest" and got["backtest"] == "backtest"
        # every asset of the definitions, in its group (not a hand-kept count)
        graph = defs().resolve_asset_graph()
        assert got == {
            k.to_user_string(): graph.get(k).group_name for k in graph.get_all_asset_keys()
        }
        assert got["evaluation"] == "evaluation" and got["literature_baselines"] == "training"
        assert got["latest_forecast"] == "forecast"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


@pytest.mark.slow
def test_two_cli_runs_writing_different_partitions_at_once_both_succeed(tmp_path, monkeypatch):
    env = instance_env(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    procs = [
        subprocess.Popen(
            _ingest_command(year),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for year in ("2023", "2024")
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-6000:] for e in errors]
    wh = Warehouse(DataPaths.at(env["MAMBACAST_DATA_DIR"]))
    expected = _expected_rows(
        (datetime(2023, 1, 1), datetime(2024, 1, 1)), (datetime(2024, 1, 1), datetime(2024, 1, 4))
    )
    assert {t: wh.count(t) for t in expected} == expected
    # the DuckDB writers share one concurrency slot (pipelines/dagster.yaml): across both runs,
    # no two ingest steps ran at the same time
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        spans = sorted(
            (s.start_time, s.end_time, s.step_key)
            for run in instance.get_runs()
            for s in instance.get_run_step_stats(run.run_id)
            if s.step_key in ("ohlcv_bars", "onchain_metrics", "macro_series")
        )
    assert len(spans) == 6, spans
    for (_, end, a), (start, _, b) in itertools.pairwise(spans):
        assert start >= end - 0.05, f"{a} and {b} overlapped"
