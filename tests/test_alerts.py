"""The run-failure alert: a blocking check failure or a failed run is logged and posted as
JSON to a webhook (a local HTTP server here); the webhook's URL never shows up in a log."""

import json
import logging
from dataclasses import dataclass

import dagster as dg
import polars as pl
import pytest

from assets.ingest import INGEST_ASSETS
from assets.quality import QUALITY_CHECKS
from assets.resources import MarketSourcesResource
from pipelines.alerts import AlertsResource
from pipelines.defs.resources import default_resources
from pipelines.defs.sensors import run_failure_alert
from tests.httpfixture import Reply, http_server_fixture  # noqa: F401 (fixture)
from warehouse.sources.base import register
from warehouse.sources.synthetic import SyntheticOHLCV

SECRET = "T000/B000/not-a-real-token"


@register("ohlcv", "alert-test-corrupt")
@dataclass
class _CorruptOHLCV(SyntheticOHLCV):
    """The synthetic bars with one day whose high is below its low."""

    name: str = "alert-test-corrupt"

    def fetch(self, start, end):
        bars = super().fetch(start, end)
        bad = bars["ts"].min()
        return bars.with_columns(
            high=pl.when(pl.col("ts") == bad).then(pl.col("low") * 0.5).otherwise(pl.col("high"))
        )


def _failed_run(tmp_path, sources: MarketSourcesResource):
    (tmp_path / "home").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "home"))
    result = dg.materialize(
        [*INGEST_ASSETS, *QUALITY_CHECKS],
        selection=[INGEST_ASSETS[0]],
        resources={**default_resources(str(tmp_path / "data")), "sources": sources},
        partition_key="2019",
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    run = instance.get_run_by_id(result.run_id)
    (failure,) = [
        e.dagster_event
        for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    ]
    return instance, run, failure


def _alert(instance, run, failure, url: str) -> None:
    ctx = dg.build_run_status_sensor_context(
        sensor_name="run_failure_alert",
        dagster_event=failure,
        dagster_instance=instance,
        dagster_run=run,
        resources={"alerts": AlertsResource(webhook_url=url)},
    ).for_run_failure()
    run_failure_alert(ctx)


def test_a_blocking_check_failure_is_posted_naming_the_check(tmp_path, http_server, caplog, capsys):
    http_server.route(f"/hook/{SECRET}", Reply(200, b"ok", content_type="text/plain"))
    instance, run, failure = _failed_run(
        tmp_path, MarketSourcesResource(ohlcv_source="alert-test-corrupt", until="2019-03-01")
    )
    capsys.readouterr()
    with caplog.at_level(logging.DEBUG):
        _alert(instance, run, failure, f"{http_server.url}/hook/{SECRET}")
    logged = caplog.text + capsys.readouterr().err
    (post,) = [r for r in http_server.requests if r.method == "POST"]
    body = json.loads(post.body)
    assert body["kind"] == "blocking_check_failure"
    assert body["failed_checks"] == ["ohlcv_bars:ohlcv_quality"]
    assert body["partitions"] == {"partition": "2019"} and body["run_id"] == run.run_id
    assert "ohlcv_bars:ohlcv_quality" in body["text"]  # what a chat webhook shows
    assert "ALERT blocking_check_failure" in logged
    assert SECRET not in logged and "127.0.0.1" in logged  # the host, not the URL


def test_a_failed_run_without_failed_checks_is_posted_with_its_error(tmp_path, http_server):
    http_server.route("/hook", Reply(200, b"ok", content_type="text/plain"))
    instance, run, failure = _failed_run(tmp_path, MarketSourcesResource(until="2019/03/01"))
    _alert(instance, run, failure, f"{http_server.url}/hook")
    (post,) = [r for r in http_server.requests if r.method == "POST"]
    body = json.loads(post.body)
    assert body["kind"] == "run_failure" and body["failed_checks"] == []
    assert body["job"] == run.job_name


def test_a_broken_webhook_is_logged_and_the_alert_stays_in_the_log(http_server, caplog):
    http_server.route("/hook", Reply(500, b"down", content_type="text/plain"))
    log = logging.getLogger("alerts-test")
    alerts = AlertsResource(webhook_url=f"{http_server.url}/hook")
    with caplog.at_level(logging.INFO, logger="alerts-test"):
        assert alerts.send({"kind": "run_failure", "summary": "boom"}, log) is False
    assert "ALERT run_failure: boom" in caplog.text
    assert "Alert webhook failed: HTTPError" in caplog.text
    # without a webhook the alert is only logged
    assert AlertsResource().send({"kind": "run_failure", "summary": "boom"}, log) is False


@pytest.mark.parametrize("configured", [False, True])
def test_the_definitions_take_the_webhook_from_an_env_var(monkeypatch, tmp_path, configured):
    if configured:
        monkeypatch.setenv("MAMBACAST_ALERT_WEBHOOK", f"https://hooks.example/{SECRET}")
    else:
        monkeypatch.delenv("MAMBACAST_ALERT_WEBHOOK", raising=False)
    alerts = default_resources(str(tmp_path))["alerts"]
    if configured:
        assert isinstance(alerts.webhook_url, dg.EnvVar)  # the UI shows the name, not the URL
        assert alerts.webhook_url.env_var_name == "MAMBACAST_ALERT_WEBHOOK"
    else:
        assert alerts.webhook_url is None


def test_the_sensor_alerts_on_runs_without_a_code_location_like_cli_runs(tmp_path, http_server):
    """`dagster asset materialize` runs (make demo, make evaluate) carry no code-location origin:
    the sensor still picks them up on its next tick."""
    from pipelines.definitions import defs

    http_server.route("/hook", Reply(200, b"ok", content_type="text/plain"))
    (tmp_path / "home").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "home"))
    resources = {"alerts": AlertsResource(webhook_url=f"{http_server.url}/hook")}

    def tick(cursor):
        ctx = dg.build_sensor_context(
            instance=instance,
            repository_def=defs().get_repository_def(),
            repository_name="__repository__",
            cursor=cursor,
            resources=resources,
        )
        return run_failure_alert.evaluate_tick(ctx)

    first = tick(None)  # starts watching from now
    result = dg.materialize(
        [*INGEST_ASSETS],
        selection=[INGEST_ASSETS[0]],
        resources={
            **default_resources(str(tmp_path / "data")),
            "sources": MarketSourcesResource(until="2019/03/01"),
        },
        partition_key="2019",
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    tick(first.cursor)
    (post,) = [r for r in http_server.requests if r.method == "POST"]
    assert json.loads(post.body)["run_id"] == result.run_id


def test_a_webhook_that_is_not_http_is_refused_without_reading_anything(tmp_path, caplog):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    log = logging.getLogger("alerts-test")
    with caplog.at_level(logging.INFO, logger="alerts-test"):
        sent = AlertsResource(webhook_url=f"file://{secret}").send(
            {"kind": "run_failure", "summary": "boom"}, log
        )
    assert sent is False and "Alert webhook failed: ValueError" in caplog.text
