"""Security properties, each tested against the real code path:

- the UI binds 127.0.0.1 unless told otherwise (`make ui`, the test helpers);
- the FRED key only travels as `dg.EnvVar`: a real ingest (retries and error bodies echoing the
  key included) leaves it in no event, run record, snapshot, log, compute log or stored file;
- symbols, names and versions from configuration cannot write outside the data directory;
- every `torch.load` passes `weights_only=True`, and a checkpoint carrying a pickled object
  does not run it;
- SQL takes values as bound parameters: quotes and SQL in a symbol are stored verbatim.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import secrets
import shutil
import sqlite3
import subprocess
import warnings
import zlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import duckdb
import polars as pl
import pytest

from tests.httpfixture import ReplayServer, Reply
from tests.processes import BIN, ROOT, instance_env, ui_command
from warehouse import ArtifactStore, DataPaths, Lake, Warehouse
from warehouse.lake import LakeError
from warehouse.paths import PathOutsideError, check_inside
from warehouse.sources import make_source
from warehouse.sources.base import SourceError, check_entities, check_safe_entities, is_safe_entity

OBS = "/fred/series/observations"
XML = "text/xml; charset=UTF-8"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
UNSAFE = ["../x", "../../etc", "/tmp/x", "a/../../b", "..", "x\x00y", "C:\\x", "a b", "x/"]
# names that can be stored end to end: DuckDB values and lake partition folders
SAFE = ["BTC-USD", "^GSPC", "BTC-USDT-USDT", "BRK.B", "DGS10", "btc", "A_B"]
# safe in requests (ccxt pairs, Yahoo FX), never stored as they are: ccxt maps its pairs
# (BTC/USDT -> BTC-USDT), and the resource refuses them from any other source
REQUEST_ONLY = ["BTC/USDT", "BTC/USDT:USDT", "EURUSD=X"]
EVIL = "x'); DROP TABLE ohlcv; --"
OBRIEN = "O'Brien"


# -- the webserver binds 127.0.0.1 -------------------------------------------------------------
def _make_ui(*args: str, env: dict[str, str] | None = None) -> str:
    """The `dg dev` line `make ui` would run (make -n: nothing is executed)."""
    out = subprocess.run(
        ["make", "-n", "ui", *args],
        cwd=ROOT,
        env={**os.environ, "DATA_DIR": "/nonexistent/mambacast-data", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    (line,) = [ln for ln in out.splitlines() if "dg dev" in ln]
    return line


def _host(cmd: list[str] | str) -> str:
    parts = cmd.split() if isinstance(cmd, str) else cmd
    flag = "--host" if "--host" in parts else "-h"
    return parts[parts.index(flag) + 1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_ui_binds_loopback_unless_ui_host_opts_in():
    assert _host(_make_ui()) == "127.0.0.1"
    # an exported HOST (shells and containers set it to the machine's name) changes nothing
    assert _host(_make_ui(env={"HOST": "0.0.0.0"})) == "127.0.0.1"
    assert _host(_make_ui("UI_HOST=0.0.0.0")) == "0.0.0.0"  # the documented opt-in
    assert _host(_make_ui(env={"UI_HOST": "192.0.2.7"})) == "192.0.2.7"


def test_every_ui_command_the_project_builds_binds_loopback():
    # the webserver, `dagster dev` and `dg dev` the CLI and browser tests start
    assert _host(ui_command(3000)) == "127.0.0.1"
    assert _host(ui_command(3000, "dagster", "dev")) == "127.0.0.1"
    assert _host(ui_command(3000, "dg", "dev")) == "127.0.0.1"
    # no file starts a UI on every interface, or without -h (checked line by line)
    files = [ROOT / "Makefile", ROOT / "README.md", *ROOT.glob("pipelines/*.py")]
    files.append(ROOT / "deploy" / "README.md")
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for line in path.read_text().splitlines():
            assert not _binds_beyond_loopback(rel, line), f"{rel}: {line}"
    # the scan flags what it must, and lets through only the reviewed exceptions
    web = "dagster-webserver -w workspace.yaml"
    assert _binds_beyond_loopback("README.md", f"{web} -h 0.0.0.0")
    assert _binds_beyond_loopback("README.md", web)  # outside deploy/: -h is explicit
    assert _binds_beyond_loopback("deploy/README.md", f"{web} -h 0.0.0.0")
    assert _binds_beyond_loopback("README.md", f"{web} -h 0.0.0.0  # inside the pod")
    assert not _binds_beyond_loopback("README.md", f"{web} -h 127.0.0.1")
    assert not _binds_beyond_loopback("Makefile", "UI_HOST=0.0.0.0 make ui")
    assert _binds_beyond_loopback("README.md", "dg dev --port 3000")  # no --host: flagged
    assert not _binds_beyond_loopback("Makefile", "$(DG) dev --host $(UI_HOST) --port 3")
    assert not _binds_beyond_loopback("README.md", "dg dev --host 127.0.0.1 --port 3000")
    assert not _binds_beyond_loopback("deploy/README.md", web)  # the default, 127.0.0.1
    assert not _binds_beyond_loopback("deploy/README.md", f"{web} -h 0.0.0.0 in the pod")
    assert not _binds_beyond_loopback("deploy/README.md", f"{web} -h 0.0.0.0 (behind the Ingress)")


_UI_START = re.compile(r"(dagster(-webserver| dev)|\bdg dev)\b")
# deploy/ runs the webserver inside a Kubernetes pod, where only the pod's network (the Service
# and the ingress in front of it) reaches it: it binds 0.0.0.0 there, on a line that says so.
_IN_POD = re.compile(r"\b(pods?|ingress)\b", re.IGNORECASE)


def _binds_beyond_loopback(rel: str, line: str) -> bool:
    """Whether `line` of file `rel` starts (or documents starting) a UI on more than loopback.

    Everywhere but deploy/, 0.0.0.0 appears only as the documented opt-in UI_HOST=0.0.0.0 and
    every UI start names its host (127.0.0.1 or $(UI_HOST)). In deploy/, a start without -h
    binds dagster's default, 127.0.0.1, and 0.0.0.0 is allowed only on a line about the pod or
    the ingress in front of it.
    """
    if rel.startswith("deploy/"):
        wide = "0.0.0.0" in line or (
            _UI_START.search(line) is not None
            and re.search(r"(-h|--host) (?!127\.0\.0\.1\b|localhost\b)", line) is not None
        )
        return wide and not _IN_POD.search(line)
    if "0.0.0.0" in line and "UI_HOST=0.0.0.0" not in line:
        return True
    return bool(
        _UI_START.search(line)
        and ("-w workspace.yaml" in line or re.search(r"\bdg dev\s+-", line) is not None)
        and not re.search(r"(-h|--host) (127\.0\.0\.1|\$\(UI_HOST\))", line)
    )


# -- the FRED key is never stored ----------------------------------------------------------------
def _inflate(blob: bytes) -> str:
    try:
        return zlib.decompress(blob).decode("latin-1")
    except zlib.error:
        return ""


def _texts(path: Path) -> Iterator[tuple[str, str]]:
    """What `path` holds, as text: the raw bytes, and for SQLite, DuckDB, Parquet and zlib /
    gzip data also the decoded content (Dagster stores snapshots zlib-compressed)."""
    raw = path.read_bytes()
    yield str(path), raw.decode("latin-1")
    if raw.startswith(b"SQLite format 3\x00"):
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for name in names:
                for row in con.execute(f'SELECT * FROM "{name}"'):  # noqa: S608 (names from sqlite)
                    for cell in row:
                        if isinstance(cell, bytes):
                            yield f"{path}:{name}", cell.decode("latin-1")
                            yield f"{path}:{name}", _inflate(cell)
                        else:
                            yield f"{path}:{name}", str(cell)
        finally:
            con.close()
    elif path.suffix == ".duckdb":
        con = duckdb.connect(str(path), read_only=True)
        try:
            for (name,) in con.execute(
                "SELECT table_name FROM information_schema.tables"
            ).fetchall():
                yield f"{path}:{name}", str(con.sql(f'SELECT * FROM "{name}"').fetchall())  # noqa: S608
        finally:
            con.close()
    elif path.suffix == ".parquet":
        yield str(path), str(pl.read_parquet(path).rows())
    elif raw[:2] == b"\x1f\x8b":
        import gzip

        yield str(path), gzip.decompress(raw).decode("latin-1")


def _stored_texts(*roots: Path) -> list[tuple[str, str]]:
    return [t for root in roots for p in sorted(root.rglob("*")) if p.is_file() for t in _texts(p)]


def _records_text(instance) -> str:
    """Every run, its config, tags, job and plan snapshots, and every stored event, serialized."""
    from dagster._serdes import serialize_value

    parts = []
    for run in instance.get_runs():
        parts += [serialize_value(run), json.dumps(run.run_config), json.dumps(run.tags)]
        parts.append(serialize_value(instance.get_job_snapshot(run.job_snapshot_id)))
        parts.append(
            serialize_value(instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id))
        )
        for entry in instance.all_logs(run.run_id):
            parts.append(serialize_value(entry))
            if entry.dagster_event is not None and entry.dagster_event.is_step_materialization:
                mat = entry.dagster_event.step_materialization_data.materialization
                parts.append(repr(mat.metadata))
    return "\n".join(parts)


def _fred_error(status: int, key: str, text: str) -> Reply:
    """A FRED error body that echoes the key (as a misbehaving server or proxy might)."""
    body = f'<?xml version="1.0"?>\n<error code="{status}" message="{text} api_key={key} {key}"/>'
    return Reply(status, body, content_type=XML, headers={"Retry-After": "0"})


def _run_config(server: ReplayServer, series: str) -> dict:
    sources = {
        "macro_source": "fred",
        "fred_mode": "api",  # fails at setup unless the EnvVar reached the resource
        "fred_api_root": f"{server.url}/fred",
        "macro_series": [series],
        "until": "2024-01-09",
    }
    return {
        "resources": {"sources": {"config": sources}},
        "execution": {"config": {"in_process": True}},
    }


@pytest.mark.slow
def test_fred_secret_never_stored(tmp_path, monkeypatch, caplog, capfd):
    """A real ingest of `macro_series` from FRED (a local server) with FRED_API_KEY set: the
    CLI run gets a 429 and a 500 echoing the key before the data; an in-process run of the
    definitions' resources gets a 500 and then a 400 echoing the key, and fails. The key is
    then nowhere: events, runs, snapshots, metadata, logs, compute logs, every file."""
    import dagster as dg

    from assets.ingest import macro_series
    from pipelines.defs.resources import default_resources

    caplog.set_level("DEBUG")
    key = secrets.token_hex(16)  # FRED's 32-character format, unguessable
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    env = instance_env(tmp_path)  # the instance `make instance` creates, in tmp_path/data
    env = {k: v for k, v in env.items() if k not in PROXY_VARS} | {
        "FRED_API_KEY": key,
        "NO_PROXY": "127.0.0.1,localhost",
        "MAMBACAST_ALLOW_LOOPBACK_SOURCES": "1",  # the FRED root is the local server
    }
    data, home = Path(env["MAMBACAST_DATA_DIR"]), Path(env["DAGSTER_HOME"])
    with ReplayServer() as server:
        # 1. the CLI, as `make demo` runs: 429, 500 echoing the key, then the observations
        server.route(
            OBS,
            _fred_error(429, key, "Too Many Requests."),
            _fred_error(500, key, "Internal Server Error."),
            Reply.file("fred/dgs10_all_releases.xml", content_type=XML),
        )
        cli = subprocess.run(
            [str(BIN / "dagster"), "asset", "materialize", "-m", "pipelines.definitions"]
            + ["--select", "macro_series", "--partition", "2024", "--config-json"]
            + [json.dumps(_run_config(server, "DGS10"))],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        cli_output = cli.stdout + cli.stderr
        assert cli.returncode == 0, cli_output[-3000:]
        assert server.count(OBS) == 3  # both failures were retried
        assert all(r.query.get("api_key") == key for r in server.requests)  # the key was sent

    with ReplayServer() as server:
        # 2. in this process, the definitions' own resources: 500 echoing the key, then a 400
        #    echoing it: the run fails, its error stored in the event log
        monkeypatch.setenv("FRED_API_KEY", key)
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        monkeypatch.setenv("MAMBACAST_ALLOW_LOOPBACK_SOURCES", "1")
        resources = default_resources(str(data))
        assert isinstance(resources["sources"].fred_api_key, dg.EnvVar)
        server.route(
            OBS,
            _fred_error(500, key, "Internal Server Error."),
            _fred_error(400, key, "Bad Request.  The value for variable api_key is not valid."),
        )
        with dg.DagsterInstance.from_config(str(home)) as instance:
            result = dg.materialize(
                [macro_series],
                partition_key="2024",
                resources=resources,
                run_config=_run_config(server, "DGS2"),
                instance=instance,
                raise_on_error=False,
            )
            assert not result.success
            records = _records_text(instance)
            runs = instance.get_runs()
        assert server.count(OBS) == 2  # the 500 was retried, the 400 was not
    captured = capfd.readouterr()
    logs = "\n".join([caplog.text, captured.out, captured.err, cli_output])
    stored = _stored_texts(home, data)

    # The checks can see what they look for: the rows, the retries and their warnings (in this
    # process's log, the CLI's output and the step's compute log), the stored failure, and the
    # key's EnvVar reference in the job snapshots (read back from the zlib-compressed rows too).
    assert len(runs) == 2
    assert Warehouse(DataPaths.at(data)).read("macro")["series"].to_list() == ["DGS10"] * 5
    assert any(where.endswith(".duckdb:macro") and "DGS10" in text for where, text in stored)
    assert "HTTP 400" in records and "HTTP 429" in cli_output and "HTTP 500" in caplog.text
    assert "retry 1/4" in caplog.text and "retry 2/4" in cli_output
    assert any("compute_logs" in where and "retry 1/4" in text for where, text in stored)
    env_ref = re.compile(r'fred_api_key\\?": \{\\?"env\\?": \\?"FRED_API_KEY')
    assert env_ref.search(records)
    assert any(where.endswith("runs.db:snapshots") and env_ref.search(t) for where, t in stored)

    leaks = [where for where, text in stored if key in text]
    assert leaks == [], f"the FRED key is stored in {sorted(set(leaks))}"
    assert key not in records, "the FRED key is in a run record, snapshot or event"
    assert key not in logs, "the FRED key is in the logs or the CLI's output"


def test_definitions_pass_the_fred_secret_as_an_env_var_reference(monkeypatch, tmp_path):
    """What the UI and every run record show for the key: the variable's name, not its value."""
    import dagster as dg
    from dagster._core.remote_representation.external_data import RepositorySnap
    from dagster._serdes import serialize_value

    from pipelines.definitions import defs as load_defs
    from pipelines.defs.resources import default_resources

    key = secrets.token_hex(16)
    monkeypatch.setenv("FRED_API_KEY", key)
    defs = dg.Definitions(
        assets=load_defs().assets, resources=default_resources(str(tmp_path / "d"))
    )
    snap = RepositorySnap.from_def(defs.get_repository_def())
    (sources,) = [r for r in snap.resources if r.name == "sources"]
    assert type(sources.configured_values["fred_api_key"]).__name__ == "ResourceConfigEnvVarSnap"
    assert sources.configured_values["fred_api_key"].name == "FRED_API_KEY"
    assert key not in serialize_value(snap)
    monkeypatch.delenv("FRED_API_KEY")
    assert default_resources(str(tmp_path / "d"))["sources"].fred_api_key is None  # unset: keyless


# -- symbols and paths stay inside the data directory --------------------------------------------
@pytest.mark.parametrize("name", UNSAFE + [EVIL, OBRIEN, "", "x" * 65, 7])
def test_the_shared_entity_check_rejects_names_that_could_become_paths(name):
    assert not is_safe_entity(name)
    with pytest.raises(SourceError) as err:
        check_entities([name], source="test", hint="-", valid=lambda _: True, invalid=str)
    msg = str(err.value)
    assert repr(name) in msg and "Fix the symbols option" in msg and "'test'" in msg


def test_the_shared_entity_check_keeps_real_symbols(tmp_path):
    for name in SAFE + REQUEST_ONLY:
        assert is_safe_entity(name), name
    check_safe_entities(SAFE + REQUEST_ONLY, source="test")
    names = check_entities(SAFE, source="test", hint="-", valid=lambda _: True, invalid=str)
    assert names == tuple(SAFE)
    # SAFE names are stored end to end: a lake snapshot partitioned by them is written
    df = pl.DataFrame({"symbol": SAFE, "ts": [datetime(2021, 1, 1)] * len(SAFE), "x": 1.0})
    assert len(Lake(tmp_path).write_snapshot("features", df, time_column="ts", version="v1")) == 7
    for name in REQUEST_ONLY:  # the lake refuses those: the resource must refuse them first
        with pytest.raises(LakeError, match="cannot be hive partition values"):
            Lake(tmp_path).write_snapshot(
                "labels", df.with_columns(symbol=pl.lit(name)), time_column="ts", version="v1"
            )


def _bars_csv(path: Path, symbol: str | None = None) -> Path:
    days = pl.date_range(datetime(2024, 1, 1), datetime(2024, 1, 5), eager=True)
    bars = pl.DataFrame({"date": days.dt.strftime("%Y-%m-%d")}).with_columns(
        open=pl.lit(1.0), high=pl.lit(2.0), low=pl.lit(0.5), close=pl.lit(1.5), volume=pl.lit(9.0)
    )
    if symbol is not None:
        bars = bars.with_columns(symbol=pl.lit(symbol))
    bars.write_csv(path)
    return path


@pytest.mark.parametrize("symbol", REQUEST_ONLY)
def test_the_resource_refuses_entities_the_lake_cannot_store(tmp_path, symbol):
    """Safe in a request, but not a partition folder: refused before the ingest writes, with
    the symbol and the fix named (else the features step fails after the rows are stored)."""
    from assets.resources import MarketSourcesResource

    plain, tagged = _bars_csv(tmp_path / "plain.csv"), _bars_csv(tmp_path / "t.csv", symbol)
    for symbols, path in (([symbol], plain), ([], tagged)):
        res = MarketSourcesResource(ohlcv_source="file", ohlcv_path=str(path), symbols=symbols)
        with pytest.raises(SourceError, match="cannot be stored") as err:
            res.source("ohlcv")
        assert repr(symbol) in str(err.value) and "Rename them" in str(err.value)


def test_the_resource_keeps_ccxt_pairs_and_yahoo_indices(tmp_path):
    from assets.resources import MarketSourcesResource

    ccxt = MarketSourcesResource(ohlcv_source="ccxt", symbols=["BTC/USDT", "ETH/USDT:USDT"])
    assert ccxt.source("ohlcv").entities == ("BTC-USDT", "ETH-USDT-USDT")  # mapped, storable
    yahoo = MarketSourcesResource(ohlcv_source="yfinance", symbols=["^GSPC", "BRK.B"])
    assert yahoo.source("ohlcv").entities == ("^GSPC", "BRK.B")
    path = _bars_csv(tmp_path / "gspc.csv", "^GSPC")
    res = MarketSourcesResource(ohlcv_source="file", ohlcv_path=str(path), symbols=[])
    assert res.source("ohlcv").entities == ("^GSPC",)


def test_a_trailing_newline_is_not_a_lake_or_artifact_name(tmp_path):
    from warehouse.artifacts import ArtifactError

    lake, store = Lake(tmp_path / "lake"), ArtifactStore(tmp_path / "artifacts")
    df = pl.DataFrame({"symbol": ["A\n"], "ts": [datetime(2021, 1, 1)], "x": [1.0]})
    with pytest.raises(LakeError, match="cannot be hive partition values"):
        lake.write_snapshot("features", df, time_column="ts", version="v1")
    one = df.with_columns(symbol=pl.lit("A"))
    with pytest.raises(LakeError, match="Invalid lake version"):
        lake.write_snapshot("features", one, time_column="ts", version="v1\n")
    with pytest.raises(LakeError):
        lake.write_snapshot("features\n", one, time_column="ts", version="v1")
    for kind, part, version in (("model\n", "2021", "v1"), ("model", "2021\n", "v1")):
        with pytest.raises(ArtifactError, match="Invalid artifact"):
            store.write(kind, part, version, lambda d: None, {})
    with pytest.raises(ArtifactError, match="Invalid artifact version"):
        store.write("model", "2021", "v1\n", lambda d: None, {})
    assert not (tmp_path / "lake").exists() or not list((tmp_path / "lake").rglob("*.parquet"))
    assert not list(tmp_path.rglob("*\n*"))


# -- the FRED key goes only to FRED, and only from the environment ------------------------------
@pytest.mark.parametrize(
    "root",
    [
        "http://api.stlouisfed.org/fred",  # FRED, but the key in clear text
        "https://evil.example/fred",
        "https://api.stlouisfed.org.evil.example/fred",
        "https://api.stlouisfed.org@evil.example/fred",
        "http://127.0.0.1@evil.example/fred",
        "http://localhost.evil.example/fred",
        "https://api.stlouisfed.org/fred/../../x",
        "ftp://127.0.0.1/fred",
        "http://127.0.0.1:99999/fred",
        "fred",
    ],
)
def test_the_fred_root_is_fred_or_an_allowed_loopback_server(monkeypatch, root):
    from assets.resources import MarketSourcesResource

    monkeypatch.setenv("MAMBACAST_ALLOW_LOOPBACK_SOURCES", "1")
    res = MarketSourcesResource(macro_source="fred", fred_mode="csv", fred_api_root=root)
    with pytest.raises(SourceError, match="sources.fred_api_root=") as err:
        res.source("macro")
    assert repr(root) in str(err.value) and "Leave fred_api_root empty" in str(err.value)


def test_a_loopback_fred_root_needs_the_opt_in(monkeypatch):
    from assets.resources import MarketSourcesResource

    for ok in ("", "https://api.stlouisfed.org/fred", "https://api.stlouisfed.org/fred/"):
        MarketSourcesResource(macro_source="fred", fred_mode="csv", fred_api_root=ok).source(
            "macro"
        )
    local = ["http://127.0.0.1:8123/fred", "http://localhost/fred", "http://[::1]:8123/fred"]
    for opt_in in (None, "0", "true"):
        if opt_in is None:
            monkeypatch.delenv("MAMBACAST_ALLOW_LOOPBACK_SOURCES", raising=False)
        else:
            monkeypatch.setenv("MAMBACAST_ALLOW_LOOPBACK_SOURCES", opt_in)
        for root in local:
            res = MarketSourcesResource(macro_source="fred", fred_mode="csv", fred_api_root=root)
            with pytest.raises(SourceError, match="MAMBACAST_ALLOW_LOOPBACK_SOURCES=1"):
                res.source("macro")
    monkeypatch.setenv("MAMBACAST_ALLOW_LOOPBACK_SOURCES", "1")
    for root in local:
        res = MarketSourcesResource(macro_source="fred", fred_mode="csv", fred_api_root=root)
        assert res.source("macro").api_root == root


def test_a_literal_fred_key_is_refused(monkeypatch):
    import dagster as dg

    from assets.resources import MarketSourcesResource

    key = secrets.token_hex(16)
    monkeypatch.delenv("FRED_API_KEY", raising=False)
    for literal in (key, "FRED_API_KEY"):
        with pytest.raises(SourceError, match='"env": "FRED_API_KEY"'):
            MarketSourcesResource(fred_api_key=literal).source("ohlcv")
    monkeypatch.setenv("FRED_API_KEY", key)
    with pytest.raises(SourceError, match="literal value"):
        MarketSourcesResource(fred_api_key=secrets.token_hex(16)).source("ohlcv")
    with pytest.raises(SourceError, match="literal value"):
        MarketSourcesResource(fred_api_key=dg.EnvVar("OTHER_KEY")).source("ohlcv")
    ref = MarketSourcesResource(macro_source="fred", fred_api_key=dg.EnvVar("FRED_API_KEY"))
    assert ref.source("macro").api_key == key  # the reference, resolved from the environment
    assert MarketSourcesResource(macro_source="fred").source("macro").api_key == key


def test_a_literal_fred_key_in_run_config_fails_the_run(tmp_path, monkeypatch):
    import dagster as dg

    from assets.ingest import macro_series
    from assets.resources import MarketSourcesResource, WarehouseResource

    key = secrets.token_hex(16)
    monkeypatch.setenv("FRED_API_KEY", key)
    resources = {
        "warehouse": WarehouseResource(data_dir=str(tmp_path / "data")),
        "sources": MarketSourcesResource(),
    }

    def run(value, instance) -> dg.ExecuteInProcessResult:
        config = {"macro_source": "fred", "fred_mode": "csv", "fred_api_key": value}
        return dg.materialize(
            [macro_series],
            partition_key="2024",
            resources=resources,
            run_config={"resources": {"sources": {"config": {**config, "until": "2024-01-02"}}}},
            instance=instance,
            raise_on_error=False,
        )

    with dg.instance_for_test() as instance:
        # the literal equals the environment's key and is still refused: it is in run_config
        for literal in (key, secrets.token_hex(16)):
            result = run(literal, instance)
            assert not result.success
            failure = next(e for e in result.all_events if e.is_failure)
            assert '"env": "FRED_API_KEY"' in str(failure.event_specific_data)
        # the reference passes setup (and then fetches nothing: the window is before 2024)
        monkeypatch.setattr(MarketSourcesResource, "source", _no_source)
        result = run({"env": "FRED_API_KEY"}, instance)
        logs = "\n".join(str(e.event_specific_data) for e in result.all_events if e.is_failure)
        assert "fred_api_key" not in logs
    assert not (tmp_path / "data").exists()


def _no_source(self, table):
    raise SourceError(f"stub: no {table} source in this test")


@pytest.mark.parametrize(
    ("source", "symbol"),
    [
        ("yfinance", ".."),  # yfinance's own pattern allows dots
        ("yfinance", "a..b"),
        ("ccxt", "../x"),  # a "unified" BASE/QUOTE to ccxt's own check
        ("ccxt", "a/../../b"),
        ("ccxt", "BTC/USDT/"),
    ],
)
def test_connectors_reject_unsafe_symbols_their_own_checks_let_through(source, symbol):
    with pytest.raises(SourceError, match="Unsafe symbols") as err:
        make_source("ohlcv", source, symbols=(symbol,))
    assert repr(symbol) in str(err.value)


def test_file_symbols_are_checked_by_the_resource(tmp_path):
    """The file connector names its rows after a configured symbol or the file's own column:
    either way the resource refuses a name that is not safe, before anything is written."""
    from assets.resources import MarketSourcesResource

    days = pl.date_range(datetime(2024, 1, 1), datetime(2024, 1, 5), eager=True)
    bars = pl.DataFrame({"date": days.dt.strftime("%Y-%m-%d")}).with_columns(
        open=pl.lit(1.0), high=pl.lit(2.0), low=pl.lit(0.5), close=pl.lit(1.5), volume=pl.lit(9.0)
    )
    plain, tagged = tmp_path / "plain.csv", tmp_path / "tagged.csv"
    bars.write_csv(plain)
    bars.with_columns(symbol=pl.lit("../../evil")).write_csv(tagged)
    ok = MarketSourcesResource(ohlcv_source="file", ohlcv_path=str(plain), symbols=["BTC-USD"])
    assert ok.source("ohlcv").entities == ("BTC-USD",)
    for symbols, path in ((["/tmp/x"], plain), ([], tagged)):
        res = MarketSourcesResource(ohlcv_source="file", ohlcv_path=str(path), symbols=symbols)
        with pytest.raises(SourceError, match="Unsafe ohlcv entities") as err:
            res.source("ohlcv")
        assert "/tmp/x" in str(err.value) or "../../evil" in str(err.value)


def _tree(root: Path, skip: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not p.is_relative_to(skip)}


@pytest.mark.parametrize("bad", ["../x", "../../etc", "/tmp/x", "a/../../b", "..", "."])
def test_nothing_is_written_outside_the_data_directory(tmp_path, bad):
    from ml.live import save_state

    paths = DataPaths.at(tmp_path / "data")
    paths.root.mkdir()
    before = _tree(tmp_path, paths.root)
    absolute = Path(bad)
    existed = absolute.is_absolute() and absolute.exists()
    store, lake = ArtifactStore(paths.artifacts), Lake(paths.lake)

    def write_files(d: Path) -> None:
        (d / "f.txt").write_text("x")

    for kind, part, version in ((bad, "2021", "v1"), ("model", bad, "v1"), ("model", "2021", bad)):
        with pytest.raises(ValueError, match="Invalid artifact") as err:
            store.write(kind, part, version, write_files, {})
        assert repr(bad) in str(err.value)
    df = pl.DataFrame({"symbol": [bad], "ts": [datetime(2021, 1, 1)], "x": [1.0]})
    if "/" in bad:
        with pytest.raises(LakeError, match="cannot be hive partition values"):
            lake.write_snapshot("features", df, time_column="ts", version="v1")
    else:  # "symbol=.." is a plain folder name: written, and inside the lake
        (written,) = lake.write_snapshot("features", df, time_column="ts", version="v1")
        assert written.resolve().is_relative_to(paths.lake / "features" / "version=v1")
    one = df.with_columns(symbol=pl.lit("A"))
    if "/" in bad:
        with pytest.raises(LakeError, match="Invalid lake version"):
            lake.write_snapshot("labels", one, time_column="ts", version=bad)
    else:  # "version=.." too
        (written,) = lake.write_snapshot("labels", one, time_column="ts", version=bad)
        assert written.resolve().is_relative_to(paths.lake / "labels")
    for model, version in ((bad, "v1"), ("mamba2", bad)):
        with pytest.raises(PathOutsideError) as err:
            paths.forecast_state_file(model, version)
        assert repr(bad) in str(err.value) and "data directory" in str(err.value)
    if bad != ".":  # forecast_state/./v1.pt is forecast_state/v1.pt: inside
        with pytest.raises(ValueError, match="Refusing to write a forecast state"):
            save_state(paths.forecast_state / bad / "v1.pt", {}, root=paths.forecast_state)
    assert _tree(tmp_path, paths.root) == before  # nothing new next to the data directory
    assert not absolute.is_absolute() or absolute.exists() == existed  # not created either


def test_a_symlink_out_of_the_data_directory_is_refused(tmp_path):
    """Resolving follows links: a lake or artifact folder linked elsewhere is not written."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    paths = DataPaths.at(tmp_path / "data")
    (paths.lake / "features").mkdir(parents=True)
    (paths.lake / "features" / "version=v1").symlink_to(outside, target_is_directory=True)
    paths.artifacts.mkdir()
    (paths.artifacts / "model").symlink_to(outside, target_is_directory=True)
    df = pl.DataFrame({"symbol": ["A"], "ts": [datetime(2021, 1, 1)], "x": [1.0]})
    with pytest.raises(PathOutsideError, match="outside"):
        Lake(paths.lake).write_snapshot("features", df, time_column="ts", version="v1")
    with pytest.raises(PathOutsideError, match="outside"):
        ArtifactStore(paths.artifacts).write("model", "2021", "v1", lambda d: None, {})
    assert list(outside.iterdir()) == []
    # the checks pass for what stays inside, and name the input when it does not
    assert check_inside(paths.root, paths.lake / "a" / ".." / "b") == paths.lake / "b"
    with pytest.raises(PathOutsideError, match=r"'\.\./x'"):
        check_inside(paths.root, "../x")


def test_a_forecast_state_folder_linked_elsewhere_is_refused(tmp_path):
    """The forecast state stays in forecast_state/: not outside the data directory (the folder
    linked elsewhere), nor elsewhere inside it (a model folder linked into the artifacts)."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    paths = DataPaths.at(tmp_path / "data")
    paths.artifacts.mkdir(parents=True)
    paths.forecast_state.symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathOutsideError, match="forecast state"):
        paths.forecast_state_file("mamba2", "v1")
    paths.forecast_state.unlink()
    paths.forecast_state.mkdir()
    assert paths.forecast_state_file("mamba2", "v1") == paths.forecast_state / "mamba2" / "v1.pt"
    (paths.forecast_state / "mamba2").symlink_to(paths.artifacts, target_is_directory=True)
    with pytest.raises(PathOutsideError, match="outside") as err:
        paths.forecast_state_file("mamba2", "v1")
    assert str(paths.forecast_state) in str(err.value)


@pytest.mark.parametrize("root", ["", "/", "a\x00b"])
def test_an_empty_or_root_data_directory_is_refused(root):
    from assets.resources import WarehouseResource

    with pytest.raises(ValueError, match="data directory|data_dir"):
        WarehouseResource(data_dir=root).paths  # noqa: B018


def test_a_bad_symbol_fails_the_run_before_anything_is_written(tmp_path):
    import dagster as dg

    from assets.ingest import ohlcv_bars
    from assets.resources import MarketSourcesResource, WarehouseResource

    data = tmp_path / "data"
    result = dg.materialize(
        [ohlcv_bars],
        partition_key="2021",
        resources={
            "warehouse": WarehouseResource(data_dir=str(data)),
            "sources": MarketSourcesResource(ohlcv_source="ccxt", symbols=["../../etc/x"]),
        },
        raise_on_error=False,
    )
    assert not result.success
    errors = [e for e in result.all_events if e.is_failure]
    assert errors and "Unsafe symbols ['../../etc/x']" in str(errors[0].event_specific_data)
    assert not data.exists()  # nothing written anywhere, not even the data directory


# -- model files load with weights_only=True -----------------------------------------------------
def _torch_loads(tree: ast.AST) -> list[ast.Call]:
    """Calls of torch.load (or of `load` imported from torch) in a module."""
    local = {
        a.asname or a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module == "torch"
        for a in n.names
        if a.name == "load"
    }
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and (
            (
                isinstance(n.func, ast.Attribute)
                and n.func.attr == "load"
                and isinstance(n.func.value, ast.Name)
                and n.func.value.id == "torch"
            )
            or (isinstance(n.func, ast.Name) and n.func.id in local)
        )
    ]


def _weights_only(call: ast.Call) -> bool:
    return any(
        k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def _project_sources() -> list[Path]:
    skip = {".venv", ".git", "node_modules", "build", "dist", ".ruff_cache", ".pytest_cache"}
    skip |= {"mutants"}  # mutmut's mutated copies (make mutate; gitignored)
    return [p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts)]


# Test files that load, with weights_only=False, only what the test itself just wrote (never a
# model file or anything from the data directory); reviewed one by one.
FULL_UNPICKLE_REVIEWED = {
    "tests/test_security.py": "the control that shows the pickled payload is live",
}


def test_every_torch_load_passes_weights_only_true():
    calls, unsafe = 0, []
    for path in _project_sources():
        rel = path.relative_to(ROOT).as_posix()
        for call in _torch_loads(ast.parse(path.read_text(), str(path))):
            calls += 1
            if not _weights_only(call) and rel not in FULL_UNPICKLE_REVIEWED:
                unsafe.append(f"{rel}:{call.lineno}")
    assert unsafe == [], f"torch.load without weights_only=True at {unsafe}"
    assert all(rel.startswith("tests/") for rel in FULL_UNPICKLE_REVIEWED)
    assert calls >= 3  # ml/live.py, ml/trainer.py, ml/forecasters/neural.py at least
    # the scan itself: it flags the unsafe forms
    bad = "import torch\nfrom torch import load as L\ntorch.load(p)\ntorch.load(p, weights_only=False)\nL(p)\n"
    assert [_weights_only(c) for c in _torch_loads(ast.parse(bad))] == [False, False, False]


def test_no_pickle_loading_in_the_project():
    """Besides torch.load: no pickle / dill / joblib loads and no np.load(allow_pickle=True)."""
    found = []
    for path in _project_sources():
        if path.name == "test_security.py":
            continue
        for n in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(n, ast.Call):
                continue
            f = n.func
            if (
                isinstance(f, ast.Attribute)
                and isinstance(f.value, ast.Name)
                and f.value.id in {"pickle", "dill", "joblib", "cloudpickle"}
                and f.attr in {"load", "loads"}
            ) or any(
                k.arg == "allow_pickle" and getattr(k.value, "value", None) is True
                for k in n.keywords
            ):
                found.append(f"{path.relative_to(ROOT)}:{n.lineno}")
    assert found == []


class _Payload:
    """Unpickling this calls Path.touch on the marker: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_with_a_pickled_object_does_not_run_it(tmp_path):
    import torch

    from ml.live import load_state

    marker, ckpt = tmp_path / "ran", tmp_path / "state.pt"
    torch.save({"format": "x", "model": {"w": torch.zeros(2)}, "evil": _Payload(marker)}, ckpt)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, map_location="cpu", weights_only=True)
    assert load_state(ckpt) is None  # the forecast's state cache: unreadable means absent
    assert not marker.exists()
    # the payload is live: loading without weights_only would have run it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(ckpt, map_location="cpu", weights_only=False)
    assert marker.exists()


# -- SQL takes values as parameters ---------------------------------------------------------------
def _tables(wh: Warehouse) -> list[str]:
    with wh.connect() as con:
        return sorted(
            r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()
        )


def _renamed(df: pl.DataFrame, mapping: dict[str, str]) -> pl.DataFrame:
    return df.with_columns(pl.col("symbol").replace_strict(mapping))


def test_quotes_and_sql_in_a_symbol_are_stored_verbatim(warehouse):
    jan, feb = datetime(2021, 1, 1), datetime(2021, 1, 8)
    src = make_source("ohlcv", "synthetic", symbols=("BTC-USD", "ACME"))
    daily = src.fetch(jan, feb)
    warehouse.replace_window("ohlcv", daily, jan, feb, src.entities)
    tables = _tables(warehouse)
    assert "ohlcv" in tables
    names = {"BTC-USD": EVIL, "ACME": OBRIEN}

    evil = _renamed(daily, names)
    result = warehouse.replace_window("ohlcv", evil, jan, feb, [EVIL, OBRIEN])
    assert result.rows_deleted == 0 and result.rows_inserted == daily.height
    # hourly bars: the coarser daily table is rebuilt with the symbols as a bound list
    hourly = make_source("ohlcv", "synthetic", symbols=("BTC-USD",), timeframe="1h")
    bars = _renamed(hourly.fetch(jan, feb), names)
    written = warehouse.replace_bars("1h", bars, jan, feb, [EVIL])
    assert [w.rows_inserted for w in written][0] == bars.height

    assert _tables(warehouse) == tables  # nothing dropped or created
    got = warehouse.read("ohlcv", entities=[EVIL, OBRIEN])
    assert sorted(got["symbol"].unique().to_list()) == sorted([EVIL, OBRIEN])
    assert (
        warehouse.read("ohlcv", entities=[OBRIEN])
        .drop("symbol")
        .equals(daily.filter(pl.col("symbol") == "ACME").drop("symbol").sort("ts"))
    )
    assert warehouse.read("ohlcv", entities=["BTC-USD", "ACME"]).height == daily.height  # intact
    summary = dict(warehouse.summary("ohlcv").select("entity", "rows").rows())
    assert (summary[EVIL], summary[OBRIEN]) == (summary["BTC-USD"], summary["ACME"])
    assert warehouse.read("ohlcv_1h", entities=[EVIL]).height == bars.height
    # a symbol that only looks like a match selects nothing
    assert warehouse.read("ohlcv", entities=["x' OR '1'='1"]).height == 0
    # replacing the window again replaces exactly those rows, nothing else
    again = warehouse.replace_window("ohlcv", evil, jan, feb, [EVIL, OBRIEN])
    assert again.rows_deleted == again.rows_inserted == daily.height
    assert warehouse.read("ohlcv").height == 2 * daily.height


def test_the_connectors_reject_those_symbols_before_the_store_sees_them():
    for symbol in (EVIL, OBRIEN):
        with pytest.raises(SourceError, match="Unsafe symbols|not ccxt unified|Invalid"):
            make_source("ohlcv", "ccxt", symbols=(f"{symbol}/USDT",))
        with pytest.raises(SourceError) as err:
            check_safe_entities([symbol], source="yfinance")
        assert repr(symbol) in str(err.value)


def test_lake_views_survive_a_quote_in_the_data_directory(tmp_path):
    """The one SQL text built from a path (a view body takes no parameters) is quoted."""
    paths = DataPaths.at(tmp_path / "it's data")
    lake, wh = Lake(paths.lake), Warehouse(paths, lock_timeout_s=60)
    df = pl.DataFrame({"symbol": ["A", "B"], "ts": [datetime(2021, 1, 1)] * 2, "x": [1.0, 2.0]})
    lake.write_snapshot("features", df, time_column="ts", version="v1")
    assert wh.refresh_lake_views(lake, ["features"]) == ["lake_features"]
    with wh.connect() as con:
        assert con.execute("SELECT count(*) FROM lake_features").fetchall() == [(2,)]


# Every value interpolated into SQL text in warehouse/store.py: identifiers from the fixed
# registry in schema.py and clauses made of them. Values go in as `?` parameters. A new
# interpolation fails this test until it is reviewed and added here.
SQL_INTERPOLATIONS = {
    "spec.name",
    "spec.entity_column",
    "spec.time_column",
    "dst.name",
    "TIMEFRAME_BUCKET[tf]",
    "keys",
    "where",
    "' AND '.join(clauses)",
    "', '.join(spec.key)",
    "k",
    "name",
    "pattern",
    "cols",  # _snapshot: spec.entity_column, spec.time_column and spec.columns, aliased
    "snap",  # _snapshot's temporary table: _before_ + spec.name
    "match",  # _refuse_shrink: spec.entity_column and spec.time_column equalities
    "c",  # _refuse_shrink: a value column of the fixed registry (spec.columns)
    "types",  # refresh_lake_views: hive_types of the entity folder name, checked by _IDENT
}
_SQL_WORDS = re.compile(r"\b(SELECT|INSERT|DELETE|CREATE|UPDATE|DROP|WHERE|FROM|IN \(|AND|=)")


def test_store_sql_interpolates_only_reviewed_identifiers():
    tree = ast.parse((ROOT / "warehouse" / "store.py").read_text())
    seen = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.JoinedStr):
            continue
        text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
        if not _SQL_WORDS.search(text):
            continue
        if any(w in text for w in ("failed", "nothing was written", "Invalid", "stayed locked")):
            continue  # an error message, not SQL
        seen |= {ast.unparse(v.value) for v in node.values if isinstance(v, ast.FormattedValue)}
    assert seen, "no SQL found: the scan is broken"
    assert seen <= SQL_INTERPOLATIONS, f"unreviewed values in SQL text: {seen - SQL_INTERPOLATIONS}"
    # the window bounds and entity lists are bound, never formatted in
    assert not seen & {"entities", "start", "end", "lo", "hi", "list(entities)"}
