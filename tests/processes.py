"""Helpers for the tests that run the real commands in subprocesses (test_cli, test_browser):
a Dagster instance in a data directory, a free port, waiting for the webserver, stopping a
server with everything it started."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def instance_env(tmp_path: Path) -> dict[str, str]:
    """The environment of `make instance` for the data directory `tmp_path/data`: its Dagster
    instance created there (pipelines/dagster.yaml, storage schemas migrated)."""
    home = tmp_path / "data" / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(ROOT / "pipelines" / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "MAMBACAST_DATA_DIR": str(tmp_path / "data"),
        "DAGSTER_HOME": str(home),
        "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS": "true",
        # dg runs in the project's virtualenv (the Makefile sets it too)
        "VIRTUAL_ENV": str(BIN.parent),
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


def ui_command(port: int, *program: str) -> list[str]:
    """The webserver (or `"dagster", "dev"`) on workspace.yaml, or `"dg", "dev"` (what `make ui`
    runs) on the project's [tool.dg] code location; on 127.0.0.1 and `port`."""
    name, *args = program or ("dagster-webserver",)
    if name == "dg":  # run with VIRTUAL_ENV set (instance_env), as the Makefile runs it
        return [str(BIN / name), *args, "--host", "127.0.0.1", "--port", str(port)]
    return [str(BIN / name), *args, "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_asset_graph(
    base: str,
    proc: subprocess.Popen,
    timeout: float = 90,
    output: Callable[[], str] = lambda: "",
) -> list[dict]:
    """Wait until the webserver at `base` answers and has loaded the code location; return its
    asset nodes (`assetKey.path`, `groupName`). Fails with the server's `output()` if it exits."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base}/server_info", timeout=2) as r:
                assert "dagster_webserver_version" in json.loads(r.read())
            break
        except OSError:
            assert proc.poll() is None, f"the server exited ({proc.returncode}): {output()}"
            assert time.time() < deadline, f"webserver did not come up in {timeout:.0f} s"
            time.sleep(0.5)
    query = {"query": "{ assetNodes { assetKey { path } groupName } }"}
    while True:  # the code location loads after the server
        req = urllib.request.Request(
            f"{base}/graphql",
            data=json.dumps(query).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            nodes = json.loads(r.read())["data"]["assetNodes"]
        if nodes:
            return nodes
        assert proc.poll() is None, f"the server exited ({proc.returncode}): {output()}"
        assert time.time() < deadline, f"the code location did not load in {timeout:.0f} s"
        time.sleep(0.5)


def with_default_sigint(cmd: list[str]) -> list[str]:
    """`cmd`, run with SIGINT's default action restored. A shell starts background jobs with
    SIGINT ignored and an ignored signal is inherited: `dagster dev` would then ignore Ctrl-C,
    and SIGTERM too (it maps SIGTERM to its SIGINT handler)."""
    restore = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", restore, *cmd]


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group is still running (zombies, waiting for a parent that
    may never reap them, do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def stop_process_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a server started with `start_new_session=True` and everything it started: SIGINT
    to its whole process group (Ctrl-C in a terminal, what `dagster dev` shuts down cleanly
    on), then SIGKILL to whatever is left after `timeout` seconds."""
    pgid = proc.pid  # a session leader's process group id is its pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGINT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        proc.poll()  # reap the leader as soon as it exits
        if not _group_alive(pgid):
            break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait(timeout=10)


@contextlib.contextmanager
def serving_ui(cmd: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[str]:
    """Run the UI command `cmd` (from ui_command, on `port`) in a session of its own, its output
    in `log`; yield its base URL once the asset graph loads. The whole process group (webserver,
    daemon, code servers) is stopped on exit, also when the test fails."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_asset_graph(base, proc, timeout=180, output=lambda: log.read_text()[-3000:])
        yield base
    finally:
        stop_process_group(proc)
