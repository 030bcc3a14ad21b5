"""Alerts: a failed run, or a blocking quality or leakage check that stopped one, is logged and,
with a webhook configured, posted as JSON.

`run_failure_alert` (pipelines/defs/sensors.py) is a run-failure sensor over the code location's jobs (including the
`dagster asset materialize` runs). When the run failed because blocking checks failed it says
so and names them (kind "blocking_check_failure"); otherwise it reports the error (kind
"run_failure"). The webhook URL comes from the environment variable MAMBACAST_ALERT_WEBHOOK
through `dg.EnvVar` (a Slack or Teams incoming webhook, or any endpoint taking a JSON POST); it
is never logged, since such URLs carry their token. A webhook that fails is logged and does not
fail the sensor: the alert is still in the sensor's log.
"""

from __future__ import annotations

import json
import urllib.request
from urllib.parse import urlsplit

import dagster as dg
from pydantic import Field

MAX_SUMMARY = 1500  # characters: chat webhooks cut long messages
PARTITION_TAGS = (
    "dagster/partition",
    "dagster/asset_partition_range_start",
    "dagster/asset_partition_range_end",
)


class AlertsResource(dg.ConfigurableResource):
    """Where alerts go besides the sensor's log."""

    webhook_url: str | None = Field(
        default=None, description="JSON POST endpoint for alerts (from MAMBACAST_ALERT_WEBHOOK)"
    )
    timeout_s: float = Field(default=5.0, gt=0, description="Webhook request timeout")

    def send(self, payload: dict, log) -> bool:
        """Log the alert; post it when a webhook is set. Returns whether a post succeeded."""
        log.warning(f"ALERT {payload['kind']}: {payload['summary']}")
        if not self.webhook_url:
            return False
        # urllib, not requests: urllib3 logs each request line (the URL's path, often the token)
        # at DEBUG; urllib logs nothing, and only the error's class name is logged here
        try:
            host = urlsplit(self.webhook_url).hostname or "?"
            body = json.dumps({"text": payload["summary"], **payload}).encode()  # "text": chats
            request = urllib.request.Request(
                self.webhook_url,
                data=body,
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            if urlsplit(self.webhook_url).scheme not in ("http", "https"):
                raise ValueError("not an http(s) URL")
            with urllib.request.urlopen(request, timeout=self.timeout_s):
                pass
        except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
            log.error(f"Alert webhook failed: {type(exc).__name__}")
            return False
        log.info(f"Alert posted to the webhook at {host}")
        return True


def failed_blocking_checks(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The blocking checks that failed in a run, as "asset:check"."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
    ).records
    failed = []
    for record in records:
        evaluation = record.event_log_entry.dagster_event.event_specific_data
        # only blocking checks failing at ERROR stop what is downstream
        blocking = evaluation.blocking is not False
        if (
            blocking
            and not evaluation.passed
            and evaluation.severity == dg.AssetCheckSeverity.ERROR
        ):
            failed.append(f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}")
    return failed


def failure_payload(context: dg.RunFailureSensorContext) -> dict:
    run = context.dagster_run
    checks = failed_blocking_checks(context.instance, run.run_id)
    partitions = {k.removeprefix("dagster/"): v for k, v in run.tags.items() if k in PARTITION_TAGS}
    where = f"run {run.run_id[:8]} of {run.job_name}" + (f" {partitions}" if partitions else "")
    errors = [
        f"{e.step_key}: {e.step_failure_data.error.message.strip()}"
        for e in context.get_step_failure_events()
        if e.step_failure_data and e.step_failure_data.error
    ]
    if checks:
        kind = "blocking_check_failure"
        summary = f"Blocking checks failed in {where}: {', '.join(checks)}; downstream not built"
    else:
        kind = "run_failure"
        summary = f"{where} failed: {context.failure_event.message or 'no message'}"
    step_errors = "; ".join(e for e in errors if "blocking asset check" not in e)
    if step_errors:
        summary += f". Step errors: {step_errors}"
    summary = summary if len(summary) <= MAX_SUMMARY else summary[: MAX_SUMMARY - 3] + "..."
    return {
        "kind": kind,
        "summary": summary,
        "run_id": run.run_id,
        "job": run.job_name,
        "partitions": partitions,
        "failed_checks": checks,
    }
