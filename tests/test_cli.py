"""The real command-line entry points, run as a user would, in subprocesses."""

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import dagster as dg
import pytest

from assets.resources import MarketSourcesResource
from warehouse import DataPaths, Warehouse

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "data" / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(ROOT / "pipelines" / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "MAMBACAST_DATA_DIR": str(tmp_path / "data"),
        "DAGSTER_HOME": str(home),
        "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS": "true",
    }
    # as `make instance` does: create the storage schemas before runs can start concurrently
    subprocess.run(
        [str(BIN / "dagster"), "instance", "migrate"],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return env


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


def _expected_rows(*windows: tuple[datetime, datetime]) -> dict[str, int]:
    """What the default (synthetic) sources hold for the windows."""
    sources = MarketSourcesResource()
    return {
        t: sum(sources.source(t).fetch(a, b).height for a, b in windows)
        for t in ("ohlcv", "onchain", "macro")
    }


@pytest.mark.slow
def test_dagster_asset_materialize_one_partition_lands_in_the_warehouse_and_the_instance(
    tmp_path, monkeypatch
):
    env = _env(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    cmd = _ingest_command("2024")
    for _ in range(2):  # the second run replaces the partition instead of adding to it
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_webserver_serves_the_graph_on_localhost(tmp_path):
    env = _env(tmp_path)
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "dagster-webserver"),
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/server_info", timeout=2) as r:
                    assert "dagster_webserver_version" in json.loads(r.read())
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                assert time.time() < deadline, "webserver did not come up in 90 s"
                time.sleep(0.5)
        query = {"query": "{ assetNodes { assetKey { path } groupName } }"}
        nodes = []
        while not nodes and time.time() < deadline:  # the code location loads after the server
            req = urllib.request.Request(
                f"{base}/graphql",
                data=json.dumps(query).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=10) as r:
                nodes = json.loads(r.read())["data"]["assetNodes"]
            time.sleep(0.5)
        got = {n["assetKey"]["path"][0]: n["groupName"] for n in nodes}
        assert got["ohlcv_bars"] == "ingest" and got["backtest"] == "backtest"
        assert len(got) == 12 and got["evaluation"] == "evaluation"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


@pytest.mark.slow
def test_two_cli_runs_writing_different_partitions_at_once_both_succeed(tmp_path, monkeypatch):
    env = _env(tmp_path)
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
