"""The Kubernetes code location: the project's definitions (pipelines/definitions.py: the same
assets, checks, jobs, schedules, sensor and resources, loaded the same way) with every step of a run in a Kubernetes
Job of its own (dagster-k8s `k8s_job_executor`).

    dagster api grpc -m pipelines.k8s_definitions ...   # the code server in the cluster

The executor takes `k8s_job_executor`'s run config (deploy/k8s/executor.yaml) plus the
`in_process` switch of the local executor: the refresh schedule's runs (a handful of small
steps) ask for it and then run in the run worker's pod, one step after another, instead of a
pod per step. dagster-k8s is imported here only: pipelines.definitions stays free of it.

A Job per step needs the instance's run launcher to be dagster-k8s `K8sRunLauncher`
(deploy/k8s/run_launcher.yaml): the step pods take its image, namespace, service account,
Secrets, environment and volumes, and dagster-k8s reads them off the launcher without checking
its type (under the default launcher the first step would fail with an AttributeError). The
executor refuses any other launcher up front, unless `in_process` keeps the steps in the run's
process.
"""

from __future__ import annotations

import dagster as dg
from dagster._config import process_config
from dagster._core.definitions.executor_definition import multiple_process_executor_requirements
from dagster_k8s import K8sRunLauncher, k8s_job_executor

from pipelines import definitions as local

# k8s_job_executor's own fields, unchanged, and the local executor's switch beside them
K8S_FIELDS = dict(k8s_job_executor.config_schema.config_type.fields)


@dg.executor(
    name="mambacast_k8s_executor",
    config_schema={
        **K8S_FIELDS,
        "in_process": dg.Field(
            bool,
            default_value=False,
            description="Run every step in the run worker's pod, one after another (the refresh "
            "schedule's runs), instead of a Kubernetes Job per step",
        ),
    },
    requirements=multiple_process_executor_requirements(),
)
def mambacast_k8s_executor(init_context: dg.InitExecutorContext):
    """A Kubernetes Job per step (k8s_job_executor), or every step in the run's process."""
    config = dict(init_context.executor_config)
    if config.pop("in_process"):
        in_process = process_config(
            dg.in_process_executor.config_schema.config_type, {"retries": config["retries"]}
        )
        if not in_process.success:
            raise dg.DagsterInvalidConfigError(
                "in_process executor config", in_process.errors, config
            )
        return dg.in_process_executor.executor_creation_fn(
            init_context._replace(executor_config=in_process.value)
        )
    launcher = init_context.instance.run_launcher
    if not isinstance(launcher, K8sRunLauncher):
        raise dg.DagsterInvariantViolationError(
            "mambacast_k8s_executor runs each step in a Kubernetes Job, which needs the "
            "instance's run launcher to be dagster_k8s.K8sRunLauncher (add "
            "deploy/k8s/run_launcher.yaml to the instance's dagster.yaml), but this instance uses "
            f"{type(launcher).__name__}: set in_process: true in the executor config to run the "
            "steps in the run's process, or use the process code location (pipelines.definitions)"
        )
    return k8s_job_executor.executor_creation_fn(init_context._replace(executor_config=config))


@dg.definitions
def defs() -> dg.Definitions:
    """The local code location's definitions (pipelines/definitions.py) with a Job per step."""
    return local.project_definitions(mambacast_k8s_executor)
