"""The Dagster UI in a real browser (`pytest -k browser`).

The UI is served the way `make ui` serves it (`dg dev`, on 127.0.0.1 and
a free port) on a data directory where the demo has run (`python -m pipelines.run demo`, two
`dagster asset materialize` runs), plus one more real CLI run that ingests a year of bars with
one impossible bar (high below low) through the file connector, so that `ohlcv_quality` has a
failed evaluation in that instance (the ingest's audit of its staged write, rolled back). Headless Debian chromium, driven by playwright, then:

1. dismisses the first visit's "Join the Dagster community" dialog with Skip;
2. opens the global asset graph and sees one node per asset group of the definitions;
3. opens the `backtest` asset's latest materialization: every metadata entry it recorded, the
   metrics table (`folds`: return, Sharpe, drawdown per strategy) with the recorded header and
   rows, and the equity-curve plot as an image the browser decoded at the recorded PNG's size;
4. opens the failed check (`ohlcv_quality`) and a passed one (`macro_quality`): the result,
   the evaluation's summary and a link to the run that evaluated it;
5. opens the automation page and sees both schedules;
6. opens the `ohlcv_bars` overview: its Columns section lists every column of the declared
   schema (`dagster/column_schema`) with its type and constraint, and Storage names its DuckDB
   table (`dagster/table_name`).

Each page is saved as a screenshot in `$MAMBACAST_TEST_ARTIFACTS/browser/` (default
`test-artifacts/browser/`), checked to be more than a blank page; a failing step leaves
`failure.png` there. Skipped where Debian's chromium or pip's playwright is missing.
"""

import binascii
import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from PIL import Image, ImageStat

from pipelines.definitions import defs
from tests.processes import (
    BIN,
    ROOT,
    free_port,
    instance_env,
    serving_ui,
    ui_command,
    with_default_sigint,
)
from warehouse.sources import make_source

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
    ),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
)
expect = sync_api.expect

# `make demo`'s range: six years, the last two walk-forward folds (2023, 2024) through every
# model, the backtest and the evaluation; Mamba2 at one seed instead of three. About two
# minutes on 2 cores. Four years (one fold) would save little, and the evaluation of a single
# fold fails now and then.
DEMO = ["--range", "2019...2024", "--seeds", "0"]
PLANTED_YEAR = 2018  # an ingest partition outside the demo's range
BAD_DAY = datetime(PLANTED_YEAR, 6, 15)
FAILED_CHECK = dg.AssetCheckKey(dg.AssetKey("ohlcv_bars"), "ohlcv_quality")
PASSED_CHECK = dg.AssetCheckKey(dg.AssetKey("macro_series"), "macro_quality")
ARTIFACTS = Path(os.environ.get("MAMBACAST_TEST_ARTIFACTS") or ROOT / "test-artifacts") / "browser"
TIMEOUT_MS = 60_000  # a page, a query, a dialog: generous, the suite runs two workers on 2 cores


@dataclass(frozen=True)
class Demo:
    env: dict[str, str]
    backtest: dg.EventLogEntry  # its latest materialization
    failed: dg.AssetCheckEvaluation
    failed_run: str
    passed: dg.AssetCheckEvaluation
    passed_run: str


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _plant_bad_bars(folder: Path) -> Path:
    """A year of the synthetic market's BTC-USD bars as a CSV for the file connector, with one
    bar whose high lies below its low."""
    bars = make_source("ohlcv", "synthetic", symbols=("BTC-USD",)).fetch(
        datetime(PLANTED_YEAR, 1, 1), datetime(PLANTED_YEAR + 1, 1, 1)
    )
    bad = pl.col("ts") == BAD_DAY
    path = folder / "btc_with_a_bad_bar.csv"
    bars.with_columns(
        high=pl.when(bad).then(pl.col("low") * 0.9).otherwise(pl.col("high")),
        date=pl.col("ts").dt.strftime("%Y-%m-%d"),
    ).select("date", "open", "high", "low", "close", "volume").write_csv(path)
    return path


def _latest_evaluation(
    instance: dg.DagsterInstance, key: dg.AssetCheckKey
) -> tuple[dg.AssetCheckEvaluation, str]:
    record = instance.get_latest_asset_check_evaluation_record(key)
    assert record is not None and record.event is not None, f"{key} was never evaluated"
    return record.event.asset_check_evaluation, record.run_id


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Demo:
    """A data directory where the demo has run, and a failed `ohlcv_quality` evaluation."""
    root = tmp_path_factory.mktemp("browser")
    env = instance_env(root)
    proc = _run([sys.executable, "-m", "pipelines.run", "demo", *DEMO], env, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    # the real CLI, as a user would ingest a file: the audit of the staged write fails the
    # blocking check before anything is published, so does the run
    config = {
        "resources": {
            "sources": {
                "config": {
                    "ohlcv_source": "file",
                    "ohlcv_path": str(_plant_bad_bars(root)),
                    "symbols": ["BTC-USD"],
                }
            }
        }
    }
    planted = [
        str(BIN / "dagster"),
        "asset",
        "materialize",
        "-m",
        "pipelines.definitions",
        "--select",
        "ohlcv_bars",
        "--partition",
        str(PLANTED_YEAR),
        "--config-json",
        json.dumps(config),
    ]
    proc = _run(planted, env, timeout=300)
    assert (
        proc.returncode != 0
        and "add failures to the blocking check ohlcv_quality" in proc.stdout + proc.stderr
    ), (proc.stdout + proc.stderr)[-6000:]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])  # the storage config reads it
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            backtest = instance.get_latest_materialization_event(dg.AssetKey("backtest"))
            failed, failed_run = _latest_evaluation(instance, FAILED_CHECK)
            passed, passed_run = _latest_evaluation(instance, PASSED_CHECK)
    assert backtest is not None and not failed.passed and passed.passed
    return Demo(env, backtest, failed, failed_run, passed, passed_run)


@pytest.fixture(scope="module")
def ui(demo, tmp_path_factory):
    """`make ui` on the demo's data directory: the base URL. The server runs in a session of
    its own, so that it and everything it starts (webserver, daemon, code servers) are stopped
    together, also when the test fails."""
    port = free_port()
    log = tmp_path_factory.mktemp("browser-ui") / "dagster-dev.log"
    cmd = with_default_sigint(ui_command(port, "dg", "dev"))
    with serving_ui(cmd, demo.env, port, log) as base:
        yield base


@pytest.fixture
def page(ui, request):
    """A headless chromium page on the UI; on failure the page is saved as failure.png."""
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    expect.set_options(timeout=TIMEOUT_MS)
    failures = request.session.testsfailed
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000}, base_url=ui)
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on(
                "console",
                lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None,
            )
            yield page
            # the call phase's report is counted before the fixtures are torn down
            if request.session.testsfailed > failures:
                page.screenshot(path=ARTIFACTS / "failure.png")
            (ARTIFACTS / "console-errors.txt").write_text("\n".join(errors) + "\n")
        finally:
            browser.close()


def _screenshot(page, name: str) -> None:
    """Save the page as ARTIFACTS/<name>.png and check it shows more than a blank page: text,
    icons and graphics give hundreds of colours and a spread of brightness."""
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=path)
    with Image.open(path) as shot:
        rgb = shot.convert("RGB")
        colours = rgb.getcolors(maxcolors=rgb.width * rgb.height)
        spread = ImageStat.Stat(rgb.convert("L")).stddev[0]
    assert len(colours) >= 500 and spread >= 8, f"{path}: looks blank ({len(colours)}, {spread})"


def _markdown_table(md: str) -> tuple[list[str], int]:
    """The header cells and the number of rows of a markdown pipe table."""
    lines = [line for line in md.strip().splitlines() if line.strip()]
    return [c.strip() for c in lines[0].strip().strip("|").split("|")], len(lines) - 2


def _markdown_png_size(md: str) -> tuple[int, int]:
    """The size of the PNG embedded in markdown as a data URI."""
    data = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", md)
    assert data, md[:200]
    with Image.open(io.BytesIO(binascii.a2b_base64(data.group(1)))) as png:
        return png.size


def _metadata_row(page, label: str):
    return page.get_by_role("row").filter(has=page.get_by_role("cell", name=label, exact=True))


def _open_markdown(page, label: str):
    """Open the markdown metadata entry `label` in its dialog; return the dialog."""
    _metadata_row(page, label).get_by_text("[Show Markdown]").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(label)
    return dialog


def _close(dialog) -> None:
    dialog.get_by_role("button", name="Close").click()
    expect(dialog).to_have_count(0)


def _open_check(page, key: dg.AssetCheckKey, result: str, evaluation, run_id: str) -> None:
    """The check's page (the Checks tab of its asset, the check selected): its latest result,
    the evaluation's summary, a link to the run that evaluated it, its metadata entries."""
    page.goto(f"/assets/{key.asset_key.to_user_string()}?view=checks&checkDetail={key.name}")
    selected = page.get_by_role("img", name="asset_check").locator("xpath=..")  # its title
    expect(selected).to_have_text(key.name)
    expect(page.get_by_text("Evaluation result", exact=True).locator("xpath=..")).to_have_text(
        re.compile(rf"^Evaluation result\s*{result}$")
    )
    expect(page.get_by_text(evaluation.description.splitlines()[0], exact=True)).to_be_visible()
    expect(page.locator(f'a[href^="/runs/{run_id}"]').first).to_be_visible()
    for label in evaluation.metadata:
        expect(_metadata_row(page, label)).to_be_visible()


@pytest.mark.timeout(1200)  # the demo's two runs, beside the rest of the suite on 2 cores
def test_browser_shows_the_demo_graph_backtest_checks_and_schedules(demo, page):
    # 1. first visit: the community dialog, dismissed with Skip
    page.goto("/")
    community = page.get_by_role("dialog").filter(has_text="Join the Dagster community")
    expect(community).to_be_visible()
    _screenshot(page, "01-community-dialog")
    community.get_by_role("button", name="Skip").click()
    expect(community).to_have_count(0)

    # 2. the global asset graph: one node per asset group (groups collapsed, as it opens)
    groups = sorted({spec.group_name for spec in defs().resolve_all_asset_specs()})
    assert {"ingest", "features", "training", "backtest", "evaluation"} <= set(groups)
    page.goto("/asset-groups")
    expect(page.get_by_text("Global asset lineage", exact=True)).to_be_visible()
    nodes = page.locator("[class*=CollapsedGroupNode_collapsedGroupNodeBox]")
    expect(nodes).to_have_count(len(groups))
    for group in groups:
        expect(nodes.get_by_text(group, exact=True)).to_be_visible()
    _screenshot(page, "02-asset-graph")

    # 3. the backtest's latest materialization: its metadata, metrics and plot
    materialization = demo.backtest.asset_materialization
    page.goto("/assets/backtest?view=events")
    expect(page.get_by_text(f"materialized in run {demo.backtest.run_id[:8]}")).to_be_visible()
    expect(page.get_by_text(f"Partition {materialization.partition}")).to_be_visible()
    metadata = materialization.metadata
    for label in metadata:
        expect(_metadata_row(page, label)).to_be_visible()
    expect(_metadata_row(page, "path")).to_contain_text(metadata["path"].value)
    _screenshot(page, "03-backtest-materialization")

    header, rows = _markdown_table(metadata["folds"].value)
    assert {"strategy", "total_return", "sharpe", "max_drawdown"} <= set(header) and rows
    dialog = _open_markdown(page, "folds")
    expect(dialog.get_by_role("columnheader")).to_have_text(header)
    expect(dialog.get_by_role("row")).to_have_count(1 + rows)
    _screenshot(page, "04-backtest-metrics")
    _close(dialog)

    dialog = _open_markdown(page, "equity_curve")
    plot = dialog.get_by_role("img", name="equity curves")
    expect(plot).to_be_visible()
    # decode() settles once the image has loaded: a broken image rejects and fails here
    size = plot.evaluate("img => img.decode().then(() => [img.naturalWidth, img.naturalHeight])")
    assert size[0] > 0 and tuple(size) == _markdown_png_size(metadata["equity_curve"].value)
    _screenshot(page, "05-backtest-equity-curve")
    _close(dialog)

    # 4. a failed and a passed asset check
    _open_check(page, FAILED_CHECK, "Failed", demo.failed, demo.failed_run)
    bad_bar = f"'ts': datetime.datetime({BAD_DAY.year}, {BAD_DAY.month}, {BAD_DAY.day}, 0, 0)"
    expect(page.get_by_text(bad_bar).first).to_be_visible()
    _screenshot(page, "06-check-failed")
    _open_check(page, PASSED_CHECK, "Passed", demo.passed, demo.passed_run)
    _screenshot(page, "07-check-passed")

    # 5. the schedules, on the automation page
    page.goto("/automation")
    for schedule in defs().schedules:
        expect(page.get_by_text(schedule.name, exact=True)).to_be_visible()
    _screenshot(page, "08-schedules")

    # 6. a table's column view: the ingest table's declared schema (dagster/column_schema, from
    # warehouse/schema.py) in the asset's overview, and its DuckDB name (dagster/table_name)
    spec = {s.key.to_user_string(): s for s in defs().resolve_all_asset_specs()}["ohlcv_bars"]
    schema = spec.metadata["dagster/column_schema"]
    page.goto("/assets/ohlcv_bars?view=overview")
    expect(page.get_by_text("Columns", exact=True)).to_be_visible()
    for column in schema.columns:
        name = page.get_by_role("cell", name=column.name, exact=True)
        row = page.get_by_role("row").filter(has=name)
        expect(row).to_have_count(1)
        expect(row).to_contain_text(column.type)
        if not column.constraints.nullable:
            expect(row).to_contain_text("non-nullable")
    typed = page.get_by_role("row").filter(has_text=re.compile(r"VARCHAR|TIMESTAMP|DOUBLE"))
    expect(typed).to_have_count(len(schema.columns))
    expect(page.get_by_text(spec.metadata["dagster/table_name"], exact=True).first).to_be_visible()
    _screenshot(page, "09-table-columns")
