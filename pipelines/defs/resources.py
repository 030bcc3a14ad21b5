"""The resource bindings: every resource key the assets, checks and sensors ask for, bound to the
project's resource classes. The data directory comes from MAMBACAST_DATA_DIR (default `data/`);
secrets (the FRED key, the alert webhook's URL) are `dg.EnvVar` references, so the UI and the
run's config show the variable's name, never its value."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from assets.resources import MarketSourcesResource, WarehouseResource
from pipelines.alerts import AlertsResource
from pipelines.launchers import TrainingLauncher
from warehouse.paths import DEFAULT_DATA_DIR

FRED_KEY_ENV = "FRED_API_KEY"
ALERT_WEBHOOK_ENV = "MAMBACAST_ALERT_WEBHOOK"


def default_resources(data_dir: str | None = None) -> dict[str, dg.ConfigurableResource]:
    """The bindings for a data directory (`data_dir`, else MAMBACAST_DATA_DIR, else `data/`)."""
    root = data_dir or os.environ.get("MAMBACAST_DATA_DIR") or DEFAULT_DATA_DIR
    return {
        "warehouse": WarehouseResource(data_dir=str(Path(root).expanduser().resolve())),
        # Where mamba_model, sequence_baselines and literature_baselines train: a Pipes
        # subprocess beside the step by default, a Kubernetes pod with `kind: k8s`
        # (deploy/k8s/pipes_training.yaml)
        "training_launcher": TrainingLauncher(),
        # The key is passed as an EnvVar reference, so the UI shows the name, never the value.
        "sources": MarketSourcesResource(
            fred_api_key=dg.EnvVar(FRED_KEY_ENV) if os.environ.get(FRED_KEY_ENV) else None
        ),
        # the webhook URL carries its token: an EnvVar reference too
        "alerts": AlertsResource(
            webhook_url=dg.EnvVar(ALERT_WEBHOOK_ENV) if os.environ.get(ALERT_WEBHOOK_ENV) else None
        ),
    }


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=default_resources())
