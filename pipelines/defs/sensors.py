"""The sensors: `run_failure_alert` logs every failed run (and the blocking checks that stopped
it) and posts it to the alerts webhook when one is set (pipelines/alerts.py)."""

import dagster as dg

from pipelines.alerts import AlertsResource, failure_payload


@dg.run_failure_sensor(
    name="run_failure_alert",
    default_status=dg.DefaultSensorStatus.RUNNING,
    # runs of `dagster asset materialize` (make demo, make evaluate) carry no code-location
    # origin; without this the sensor would see only runs launched by schedules or the UI
    monitor_all_code_locations=True,
    description="Every failed run (and every blocking check failure that stopped one) is logged "
    "and, with MAMBACAST_ALERT_WEBHOOK set, posted to that webhook as JSON.",
)
def run_failure_alert(context: dg.RunFailureSensorContext, alerts: AlertsResource) -> None:
    alerts.send(failure_payload(context), context.log)
