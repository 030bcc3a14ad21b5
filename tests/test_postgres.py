"""The demo's graph on the shared-deployment instance (deploy/dagster.yaml): a real PostgreSQL
server, started here on loopback from the installed binaries, holds the runs, the events and the
check evaluations; the webserver reads them from there.

Needs PostgreSQL's server binaries (Debian's `postgresql`, `pg_config --bindir`; `.ci/run`
installs it); skipped only where they are missing. As root, initdb and pg_ctl run as the
`postgres` user (they refuse to run as root)."""

import contextlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import ROOT, free_port, serving_ui, ui_command

psycopg2 = pytest.importorskip(
    "psycopg2", reason="psycopg2 comes with dagster-postgres (.[deploy])"
)
pytest.importorskip("dagster_postgres", reason="dagster-postgres is not installed (.[deploy])")

pytestmark = pytest.mark.slow

DB = "mambacast"
USER = "postgres"
DAGSTER = str(Path(sys.executable).parent / "dagster")
# The demo's two runs (pipelines.run: `make demo`), through the real CLI: its range, up to the
# training dataset in one run (in process: many small steps), then its last two walk-forward
# folds through every model, the backtest, the evaluation and the latest forecast in a second
# run (forked step processes, so the duckdb_writer pool is held across processes). Smaller
# settings than the demo's: one seed and one epoch, fewer bootstrap resamples.
DEMO_RANGE, FOLDS = "2019...2024", "2023...2024"
UPSTREAM = "*training_dataset"
FOLD_ASSETS = (
    "model,mamba_model,sequence_baselines,literature_baselines,predictions,backtest,evaluation,"
    "latest_forecast"
)
SEQUENCE = {"seeds": [0], "epochs": 1, "patience": 1}
FOLD_CONFIG = {
    "ops": {
        "mamba_model": {"config": SEQUENCE},
        "sequence_baselines": {"config": SEQUENCE},
        "literature_baselines": {"config": SEQUENCE},
        "evaluation": {"config": {"n_boot": 200, "mcs_reps": 200}},
    }
}
IN_PROCESS = {"execution": {"config": {"in_process": True}}}


def _bindir() -> Path | None:
    """The folder with initdb and pg_ctl: `pg_config --bindir` (Debian keeps them off the PATH),
    else the PATH or Debian's folders; None when there are none."""
    candidates = []
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        candidates.append(Path(out.stdout.strip()))
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)  # Debian's
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


@dataclass(frozen=True)
class Server:
    port: int
    password: str

    def connect(self, db: str = DB):
        return psycopg2.connect(
            host="127.0.0.1", port=self.port, user=USER, password=self.password, dbname=db
        )


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of its own on 127.0.0.1 and a free port, its data and socket in a
    temporary folder, a password for TCP connections; database `mambacast`. Stopped afterwards,
    also when a test fails."""
    bindir = _bindir()
    if bindir is None:
        pytest.skip(
            "no PostgreSQL server binaries (initdb, pg_ctl in `pg_config --bindir` or on the "
            "PATH): apt-get install postgresql"
        )
    as_root = os.geteuid() == 0
    if as_root:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail(
                "running as root, initdb needs the `postgres` user (Debian's package adds it)"
            )
    # not under pytest's tmp_path: its folders are private to root, the server runs as postgres
    folder = Path(tempfile.mkdtemp(prefix="mambacast-pg-"))
    data, log = folder / "data", folder / "server.log"
    password = secrets.token_hex(16)
    (folder / "pwfile").write_text(password + "\n")
    if as_root:
        for path in (folder, folder / "pwfile"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []

    def pg(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*prefix, *args], capture_output=True, text=True, timeout=timeout, check=True
        )

    port = free_port()
    started = False
    try:
        pg(
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            USER,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",  # TCP clients (Dagster) give the password
            f"--pwfile={folder / 'pwfile'}",
            "--no-sync",
            "-E",
            "UTF8",
        )
        # fsync off: a throwaway server; the socket in the folder, not /var/run/postgresql
        options = f"-p {port} -h 127.0.0.1 -k {folder} -c fsync=off -c max_connections=100"
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start")
        started = True
        server = Server(port, password)
        with contextlib.closing(server.connect("postgres")) as con:
            con.autocommit = True
            con.cursor().execute(f"CREATE DATABASE {DB}")
        yield server
    except subprocess.CalledProcessError as e:
        server_log = log.read_text()[-3000:] if log.exists() else ""
        pytest.fail(f"{e.cmd} failed: {e.stdout}{e.stderr}{server_log}")
    finally:
        if started:
            subprocess.run(
                [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class Demo:
    env: dict[str, str]
    server: Server
    seconds: float


def _materialize(select: str, partition_range: str, config: dict, log: Path) -> None:
    cmd = [DAGSTER, "asset", "materialize", "-m", "pipelines.definitions", "--select", select]
    cmd += ["--partition-range", partition_range, "--config-json", json.dumps(config)]
    with log.open("a") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, f"{select} failed: " + log.read_text()[-6000:]


@pytest.fixture(scope="module")
def demo(postgres, tmp_path_factory) -> Demo:
    """The demo's graph on an instance made from deploy/dagster.yaml, its connection in
    DAGSTER_PG_* variables (the password among them, as a Secret would pass it)."""
    root = tmp_path_factory.mktemp("postgres-demo")
    home = root / "data" / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(ROOT / "deploy" / "dagster.yaml", home / "dagster.yaml")
    env = {
        "MAMBACAST_DATA_DIR": str(root / "data"),
        "DAGSTER_HOME": str(home),
        "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS": "true",
        "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_PORT": str(postgres.port),
        "DAGSTER_PG_USER": USER,
        "DAGSTER_PG_PASSWORD": postgres.password,
        "DAGSTER_PG_DB": DB,
    }
    log = root / "dagster.log"
    started = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        # as `make instance`: the storage schemas before the runs (here in PostgreSQL)
        proc = subprocess.run(
            [DAGSTER, "instance", "migrate"], capture_output=True, text=True, timeout=180
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        _materialize(UPSTREAM, DEMO_RANGE, IN_PROCESS, log)
        _materialize(FOLD_ASSETS, FOLDS, FOLD_CONFIG, log)
    return Demo({**os.environ, **env}, postgres, time.perf_counter() - started)


def _rows(server: Server, sql: str) -> list[tuple]:
    with contextlib.closing(server.connect()) as con, con.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


def _asset_names() -> set[str]:
    from pipelines.definitions import defs

    return {a.key.to_user_string() for a in defs().assets}


def test_postgres_holds_the_demo_runs_materializations_and_check_evaluations(demo):
    server = demo.server
    runs = _rows(server, "SELECT run_id, status FROM runs")
    # the two runs of the demo: up to the training dataset, then the folds and the evaluation
    assert len(runs) == 2 and {s for _, s in runs} == {"SUCCESS"}, runs
    run_ids = {r for r, _ in runs}
    materialized = _rows(
        server,
        "SELECT DISTINCT asset_key, run_id FROM event_logs "
        "WHERE dagster_event_type = 'ASSET_MATERIALIZATION'",
    )
    assert {".".join(json.loads(k)) for k, _ in materialized} == _asset_names()
    assert {r for _, r in materialized} == run_ids
    checks = _rows(
        server,
        "SELECT asset_key, check_name, execution_status FROM asset_check_executions",
    )
    # every quality and leakage check of the first run, each evaluated and passed
    assert len(checks) >= 9 and {s for *_, s in checks} == {"SUCCEEDED"}, checks
    (n,) = _rows(
        server,
        "SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_CHECK_EVALUATION'",
    )[0]
    assert n == len(checks)
    # schedule storage is there too (the schedules start stopped: no state rows yet)
    tables = {t for (t,) in _rows(server, "SELECT tablename FROM pg_tables")}
    assert {"runs", "event_logs", "asset_check_executions", "jobs", "job_ticks"} <= tables
    # and nothing went to SQLite beside the instance
    home = Path(demo.env["DAGSTER_HOME"])
    assert not [p.name for p in home.rglob("*.db")], "a SQLite storage was written"
    print(f"demo on PostgreSQL in {demo.seconds:.0f} s")


def _graphql(base: str, query: str) -> dict:
    req = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        body = json.loads(r.read())
    assert "errors" not in body, body["errors"]
    return body["data"]


RUNS = "{ runsOrError { ... on Runs { results { runId status } } } }"
MATERIALIZATIONS = """{ assetsOrError { ... on AssetConnection { nodes {
    key { path } assetMaterializations(limit: 1) { runId } } } } }"""


def test_the_ui_reads_the_postgres_runs_and_materializations(demo, tmp_path):
    run_ids = {r for (r,) in _rows(demo.server, "SELECT run_id FROM runs")}
    port = free_port()
    with serving_ui(ui_command(port), demo.env, port, tmp_path / "webserver.log") as base:
        runs = _graphql(base, RUNS)["runsOrError"]["results"]
        assert {r["runId"] for r in runs} == run_ids
        assert {r["status"] for r in runs} == {"SUCCESS"}
        nodes = _graphql(base, MATERIALIZATIONS)["assetsOrError"]["nodes"]
        latest = {
            ".".join(n["key"]["path"]): n["assetMaterializations"][0]["runId"]
            for n in nodes
            if n["assetMaterializations"]
        }
        assert set(latest) == _asset_names()
        assert set(latest.values()) <= run_ids
